"""utils.edge against llama.cpp's gguf package, the published block sizes, and bad input."""
import math

import gguf
import numpy as np
import pytest
import torch

from utils import edge, quant, tiny, tiny_corpus
from utils.validate import UnknownName

T = gguf.GGMLQuantizationType


def _x(seed=0, shape=(16, 256)):
    g = np.random.default_rng(seed)
    x = (g.standard_normal(shape) * g.uniform(1e-4, 30, (shape[0], 1))).astype(np.float32)
    x[0, :32] = 0.0
    x[1, :32] = np.arange(32) - 15.5
    return x


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0"])
def test_quantize_is_byte_identical_to_gguf(fmt):
    for seed in range(3):
        x = _x(seed)
        assert np.array_equal(edge.quantize(x, fmt), gguf.quants.quantize(x, getattr(T, fmt)))


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0"])
def test_dequantize_equals_gguf(fmt):
    data = gguf.quants.quantize(_x(5), getattr(T, fmt))
    assert np.array_equal(edge.dequantize(data, fmt), gguf.quants.dequantize(data, getattr(T, fmt)))


def test_q4_k_pack_decodes_in_gguf_to_the_intended_values():
    g = np.random.default_rng(1)
    sc, mn, q = g.integers(0, 64, 8), g.integers(0, 64, 8), g.integers(0, 16, 256)
    block = edge.pack_q4_k(0.02, 0.01, sc, mn, q)
    assert block.shape == (144,) and block.dtype == np.uint8
    want = (np.float32(np.float16(0.02)) * sc[:, None] * q.reshape(8, 32)
            - np.float32(np.float16(0.01)) * mn[:, None]).astype(np.float32).reshape(-1)
    assert np.array_equal(gguf.quants.dequantize(block[None], T.Q4_K).reshape(-1), want)
    assert np.array_equal(edge.dequantize(block[None], "Q4_K").reshape(-1), want)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_bits_per_weight_match_gguf_sizes(fmt):
    block, size = gguf.GGML_QUANT_SIZES[getattr(T, fmt)]
    assert edge.bits_per_weight(fmt) == 8 * size / block
    assert {"Q8_0": 8.5, "Q4_0": 4.5, "Q4_K": 4.5, "Q6_K": 6.5625}[fmt] == edge.bits_per_weight(fmt)


def test_zero_block_is_documented_behaviour_of_gguf():
    x = np.zeros((1, 64), np.float32)
    for fmt in ("Q8_0", "Q4_0"):
        ours = edge.quantize(x, fmt)
        assert np.array_equal(ours, gguf.quants.quantize(x, getattr(T, fmt)))
        assert np.array_equal(edge.dequantize(ours, fmt), x)


def test_bad_input():
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="fmt"):
        edge.quantize(x, "Q5_9")
    with pytest.raises(UnknownName):
        edge.bits_per_weight("q4")
    with pytest.raises(ValueError, match="multiple of"):
        edge.quantize(np.ones((2, 48), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="NaN"):
        edge.quantize(np.array([[math.nan] + [0.0] * 31], np.float32), "Q4_0")
    with pytest.raises(ValueError, match="NaN"):
        edge.quantize(np.array([[math.inf] + [0.0] * 31], np.float32), "Q8_0")
    with pytest.raises(TypeError, match="float32"):
        edge.quantize(np.ones((1, 32)), "Q8_0")
    with pytest.raises(ValueError, match="multiple of"):
        edge.dequantize(np.zeros((1, 35), np.uint8), "Q8_0")
    with pytest.raises(ValueError, match="scales"):
        edge.pack_q4_k(1.0, 1.0, np.full(8, 64), np.zeros(8, int), np.zeros(256, int))
    with pytest.raises(ValueError, match="d"):
        edge.pack_q4_k(math.nan, 1.0, np.zeros(8, int), np.zeros(8, int), np.zeros(256, int))
    with pytest.raises(UnknownName, match="Jetson"):
        edge.edge_device("Jetson-TX3")
    with pytest.raises(ValueError, match="bandwidth"):
        edge.decode_tokens_per_s(-1.0, 10.0)
    with pytest.raises(ValueError, match="watts"):
        edge.joules_per_token(math.nan, 10.0)
    with pytest.raises(ValueError, match="n_params"):
        edge.model_bytes(0, "Q4_0")


def test_power_model_by_hand():
    dev = edge.edge_device("Jetson-Orin-Nano-Super")
    tps = edge.decode_tokens_per_s(dev.bandwidth, edge.model_bytes(8 * 10 ** 9, "Q4_0"))
    assert tps == pytest.approx(102e9 / 4.5e9)         # 8e9 weights * 4.5 bits / 8 = 4.5 GB
    assert edge.joules_per_token(7.0, tps) == pytest.approx(7.0 * 4.5e9 / 102e9)


def test_registry_entries_carry_sources():
    assert set(edge.EDGE_DEVICES) >= {"Jetson-AGX-Orin-64GB", "Jetson-Orin-NX-16GB", "Jetson-Orin-Nano-Super"}
    for d in edge.EDGE_DEVICES.values():
        assert d.source and d.bandwidth > 0 and d.memory_bytes > 0 and min(d.power_modes_w) > 0


def test_gguf_file_round_trip(tmp_path):
    model = tiny.load("tiny-target")
    text = tiny_corpus.heldout_text(800)
    ppl = {}
    for fmt in ("F32", "Q8_0", "Q4_0"):
        p = edge.write_gguf(model, tmp_path / f"t-{fmt}.gguf", fmt)
        back = edge.read_gguf(p)
        r = gguf.GGUFReader(str(p))
        kinds = {t.name: t.tensor_type for t in r.tensors}
        assert kinds["blocks.0.mlp.up.weight"] == getattr(T, fmt)
        assert kinds["blocks.0.attn_norm.weight"] == T.F32
        if fmt == "F32":
            for k, v in model.state_dict().items():
                assert torch.equal(back.state_dict()[k], v)
        ppl[fmt] = quant.perplexity(back, text)
    assert ppl["F32"] <= ppl["Q8_0"] * 1.001 and ppl["Q8_0"] <= ppl["Q4_0"] * 1.001
    assert (tmp_path / "t-Q4_0.gguf").stat().st_size < (tmp_path / "t-Q8_0.gguf").stat().st_size / 1.8
    with pytest.raises(ValueError, match="fmt"):
        edge.write_gguf(model, tmp_path / "x.gguf", "Q4_K")


def test_speed_outliers_under_simulated_noise():
    g = np.random.default_rng(0)
    for _ in range(200):                     # +-30% noise on equal speeds: never a warning
        rates = {f: 100.0 * g.uniform(0.7, 1.3) for f in ("F32", "F16", "Q8_0", "Q4_0")}
        assert edge.speed_outliers(rates) == []
    assert edge.speed_outliers({"F32": 100.0, "F16": 95.0, "Q8_0": 30.0, "Q4_0": 250.0}) == ["Q8_0", "Q4_0"]
    assert edge.speed_outliers({"F32": 100.0, "Q4_0": 50.0}) == []        # the band's edge is inside
    with pytest.raises(ValueError, match="F32"):
        edge.speed_outliers({"Q4_0": 1.0})
    with pytest.raises(ValueError, match="Q4_0"):
        edge.speed_outliers({"F32": 1.0, "Q4_0": math.nan})
