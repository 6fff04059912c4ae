"""utils.memtech: bus width x pin rate against the published per-stack and per-GPU figures."""
import math
import re

import pytest

from utils import hardware, memtech as mt


def test_interface_bandwidth_by_hand():
    assert mt.interface_bandwidth(21e9, 384) == 1008e9            # RTX 4090: 21 Gb/s x 384 bits
    assert mt.interface_bandwidth(6.4e9, 1024) == pytest.approx(819.2e9)
    assert mt.implied_pin_rate(1008e9, 384) == pytest.approx(21e9)


# The per-stack or per-device figures the sources print beside the pin rate
PUBLISHED_UNIT_BANDWIDTH = {"HBM2": 307e9, "HBM2e": 410e9, "HBM3": 819e9}


@pytest.mark.parametrize("name, published", sorted(PUBLISHED_UNIT_BANDWIDTH.items()))
def test_unit_bandwidth_matches_the_standard(name, published):
    # "819 GB/s" is 819.2 rounded to 1 GB/s: agree within half a unit of the last digit
    assert abs(mt.tech(name).unit_bandwidth - published) <= 0.5e9


def test_every_technology_is_sourced_and_ordered():
    for t in mt.TECHNOLOGIES.values():
        assert re.search(r"(19|20)\d\d", t.source) and t.unit_width in (16, 32, 1024)
    rate = {n: mt.tech(n).pin_rate for n in mt.TECHNOLOGIES}
    assert rate["HBM2"] < rate["HBM2e"] < rate["HBM3"] < rate["HBM3e"]
    assert rate["GDDR6"] < rate["GDDR6X"] and rate["LPDDR5"] < rate["LPDDR5X"]
    # LPDDR5X, 64 bits (four x16 channels) at 8533 Mb/s: 68.3 GB/s
    assert 4 * mt.tech("LPDDR5X").unit_bandwidth == pytest.approx(68.26e9, rel=1e-3)
    assert mt.tech("hbm3E") is mt.tech("HBM3e")


@pytest.mark.parametrize("name", hardware.names())
def test_every_registry_gpu_has_its_wiring(name):
    g, m = hardware.get(name), mt.gpu_memory(name)
    assert m.technology.lower() == g.memory_type.lower()
    assert m.bandwidth == g.memory_bandwidth
    if m.pin_rate is not None:
        # published pin rate x bus width reproduces the datasheet within its rounding (1 GB/s)
        assert abs(mt.interface_bandwidth(m.pin_rate, m.bus_width) - g.memory_bandwidth) <= 0.5e9
    elif m.bus_width is not None:
        # the rate the datasheet implies is within what the technology allows
        implied = mt.implied_pin_rate(g.memory_bandwidth, m.bus_width)
        assert 0.5 * mt.tech(m.technology).pin_rate < implied <= mt.tech(m.technology).pin_rate
    if m.stacks is not None:
        assert m.bus_width == 1024 * m.stacks


def test_implied_rates_by_hand():
    assert mt.implied_pin_rate(3.35e12, 5120) == pytest.approx(5.234e9, rel=1e-3)   # H100 HBM3
    assert mt.implied_pin_rate(2.039e12, 5120) == pytest.approx(3.186e9, rel=1e-3)  # A100 80GB
    assert mt.implied_pin_rate(5.3e12, 8192) == pytest.approx(5.176e9, rel=1e-3)    # MI300X


def test_decode_ceiling_by_hand():
    # 7e9 bf16 parameters (14 GB) at 3.35 TB/s: at most 239 tokens/s
    assert mt.decode_ceiling(7e9, 2, 3.35e12) == pytest.approx(239.3, rel=1e-3)


@pytest.mark.parametrize("args, exc, match", [
    ((0, 384), ValueError, "pin_rate"), ((-1e9, 384), ValueError, "pin_rate"),
    ((float("nan"), 384), ValueError, "pin_rate"), ((21e9, math.inf), ValueError, "bus_width"),
    (("21", 384), TypeError, "pin_rate"), ((21e9, True), TypeError, "bus_width")])
def test_bad_input_is_named(args, exc, match):
    with pytest.raises(exc, match=match):
        mt.interface_bandwidth(*args)


def test_unknown_names():
    with pytest.raises(KeyError, match="unknown memory technology name 'HBM5'"):
        mt.tech("HBM5")
    with pytest.raises(KeyError, match="unknown GPU"):
        mt.gpu_memory("V100")
    with pytest.raises(ValueError, match="bytes_per_param"):
        mt.decode_ceiling(7e9, 0, 1e12)
