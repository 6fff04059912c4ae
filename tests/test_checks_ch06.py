"""The lab-06 checkers pass right answers, catch planted bugs and refuse the library's own."""
import math
import numbers
import time

import pytest
import torch

from utils import topology
from utils.checks import ExerciseFailed, LibraryAnswer, allow_library_answers
from utils.checks import ch06 as check

pytestmark = pytest.mark.usefixtures("one_thread")

def _real(name, x):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x!r}")
    return float(x)


def transfer_time(nbytes, bandwidth, latency=0.0, efficiency=1.0):
    nbytes, bandwidth = _real("nbytes", nbytes), _real("bandwidth", bandwidth)
    latency, efficiency = _real("latency", latency), _real("efficiency", efficiency)
    if nbytes < 0 or latency < 0:
        raise ValueError(f"nbytes and latency must be >= 0, got {nbytes!r}, {latency!r}")
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth!r}")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency!r}")
    return latency + nbytes / (bandwidth * efficiency)


PCIE = {1: (2.5e9, 8 / 10), 2: (5e9, 8 / 10), 3: (8e9, 128 / 130), 4: (16e9, 128 / 130),
        5: (32e9, 128 / 130), 6: (64e9, 242 / 256)}


def pcie_bandwidth(gen, lanes):
    for name, x in (("gen", gen), ("lanes", lanes)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must be an int, got {type(x).__name__} {x!r}")
    if gen not in PCIE:
        raise ValueError(f"gen must be one of {sorted(PCIE)}, got {gen}")
    if lanes not in (1, 2, 4, 8, 16):
        raise ValueError(f"lanes must be 1, 2, 4, 8 or 16, got {lanes}")
    rate, efficiency = PCIE[gen]
    return lanes * rate * efficiency / 8


def max_min_fair(capacities, paths):
    for e, c in capacities.items():
        c = _real(f"capacities[{e!r}]", c)
        if c <= 0:
            raise ValueError(f"capacities[{e!r}] must be > 0, got {c!r}")
    for i, p in enumerate(paths):
        if len(p) == 0:
            raise ValueError(f"paths[{i}] is empty")
        for e in p:
            if e not in capacities:
                raise ValueError(f"paths[{i}] crosses link {e!r}, which has no capacity")
    rates = [0.0] * len(paths)
    left = {e: float(c) for e, c in capacities.items()}
    active = list(range(len(paths)))
    while active:
        users = {e: [i for i in active if e in paths[i]] for e in left}
        share = min(left[e] / len(u) for e, u in users.items() if u)
        for i in active:
            rates[i] += share
        for e, u in users.items():
            left[e] -= share * len(u)
        full = {e for e, u in users.items() if u and left[e] <= 1e-9 * capacities[e]}
        active = [i for i in active if not any(e in full for e in paths[i])]
    return rates


def copy_seconds(src, fresh):
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"src must be a torch.Tensor, got {type(src).__name__}")
    if not isinstance(fresh, bool):
        raise TypeError(f"fresh must be True or False, got {fresh!r}")
    dst = torch.empty_like(src)
    if not fresh:
        dst.fill_(0)
    t0 = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - t0


def test_right_answers_pass(capsys):
    check.transfer_time(transfer_time)
    check.pcie_bandwidth(pcie_bandwidth)
    check.max_min_fair(max_min_fair)
    check.copy_seconds(copy_seconds)
    with allow_library_answers():
        check.transfer_time(topology.transfer_time)
        check.max_min_fair(topology.max_min_fair)
    assert capsys.readouterr().out.count("passed") == 6


@pytest.mark.parametrize("name, reference", [
    ("transfer_time", topology.transfer_time),
    ("max_min_fair", topology.max_min_fair),
])
def test_library_reference_refused(name, reference):
    with pytest.raises(LibraryAnswer):
        getattr(check, name)(reference)


def _fails(checker, fn, needle):
    with pytest.raises(ExerciseFailed) as err:
        checker(fn)
    assert needle in str(err.value), str(err.value)


# ---- planted bugs: transfer_time
def test_transfer_time_bits_not_bytes():
    _fails(check.transfer_time, lambda n, b, latency=0.0, efficiency=1.0:
           transfer_time(n, b, latency, efficiency) * 8 if n else latency, "transfer_time(")


def test_transfer_time_efficiency_multiplies():
    def bug(n, b, latency=0.0, efficiency=1.0):
        transfer_time(n, b, latency, efficiency)
        return latency + n * efficiency / b
    _fails(check.transfer_time, bug, "efficiency=0.9")


def test_transfer_time_latency_ignored():
    def bug(n, b, latency=0.0, efficiency=1.0):
        return transfer_time(n, b, latency, efficiency) - latency
    _fails(check.transfer_time, bug, "latency=5e-06")


def test_transfer_time_accepts_negative():
    def bug(n, b, latency=0.0, efficiency=1.0):
        return latency + n / (b * efficiency)
    _fails(check.transfer_time, bug, "ValueError")


# ---- planted bugs: pcie_bandwidth
def test_pcie_raw_bits():
    _fails(check.pcie_bandwidth, lambda g, l: pcie_bandwidth(g, l) / PCIE[g][1], "pcie_bandwidth(1, 1)")


def test_pcie_gen6_as_128b130b():
    def bug(g, l):
        return pcie_bandwidth(g, l) if g < 6 else l * 64e9 * 128 / 130 / 8
    _fails(check.pcie_bandwidth, bug, "pcie_bandwidth(6, 1)")


def test_pcie_both_directions():
    _fails(check.pcie_bandwidth, lambda g, l: 2 * pcie_bandwidth(g, l), "pcie_bandwidth(1, 1)")


def test_pcie_odd_lanes_accepted():
    def bug(g, l):
        if l == 3:
            return 3 * PCIE[g][0] * PCIE[g][1] / 8
        return pcie_bandwidth(g, l)
    _fails(check.pcie_bandwidth, bug, "3 lanes")


# ---- planted bugs: max_min_fair
def test_equal_split_is_not_max_min():
    def bug(caps, paths):
        max_min_fair(caps, paths)
        users = {e: sum(e in p for p in paths) for e in caps}
        return [min(caps[e] / users[e] for e in p) for p in paths]   # no redistribution
    _fails(check.max_min_fair, bug, "max-min fair rates")


def test_narrowest_link_alone():
    def bug(caps, paths):
        max_min_fair(caps, paths)
        return [min(caps[e] for e in p) for p in paths]          # ignores sharing
    _fails(check.max_min_fair, bug, "max-min fair rates")


def test_freezes_everyone_at_first_bottleneck():
    def bug(caps, paths):
        max_min_fair(caps, paths)
        users = {e: sum(e in p for p in paths) for e in caps}
        share = min(caps[e] / n for e, n in users.items() if n)
        return [share] * len(paths)
    _fails(check.max_min_fair, bug, "max-min fair rates")


def test_max_min_no_validation():
    def bug(caps, paths):
        try:
            return max_min_fair(caps, paths)
        except ValueError:
            return [0.0] * len(paths)
    _fails(check.max_min_fair, bug, "ValueError")


# ---- copy_seconds: logic failures fail, slow measurements only warn
def test_copy_rejects_nothing():
    def bug(src, fresh):
        dst = torch.empty_like(src) if isinstance(src, torch.Tensor) else None
        t0 = time.perf_counter()
        if dst is not None:
            dst.copy_(src)
        return time.perf_counter() - t0 + 1e-9
    _fails(check.copy_seconds, bug, "TypeError")


def test_copy_zero_time_fails():
    def bug(src, fresh):
        copy_seconds(src, fresh)
        return 0.0
    _fails(check.copy_seconds, bug, "positive finite")


def test_copy_no_first_touch_only_warns(capsys):
    def no_fault(src, fresh):                  # always a touched buffer: model disagrees
        return copy_seconds(src, False if fresh is True else fresh)
    check.copy_seconds(no_fault)
    out = capsys.readouterr().out
    assert "passed" in out and "first-touch" in out


def test_copy_slow_timer_only_warns(capsys):
    def slow(src, fresh):
        s = copy_seconds(src, fresh)
        return s * 10 if src.numel() > 1 << 20 else s
    check.copy_seconds(slow)
    out = capsys.readouterr().out
    assert "passed" in out and "touched buffer" in out
