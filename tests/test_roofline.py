"""Kernel FLOP and byte counts, derived by hand in each test."""
import numpy as np
import pytest

from utils import models, roofline as rl


def test_elementwise_and_reductions():
    c = rl.add(1000, 4)
    assert (c.flops, c.bytes) == (1000, 12000)          # read x, y; write z
    assert c.intensity == pytest.approx(1 / 12)
    c = rl.reduce_sum(1000, 2)
    assert (c.flops, c.bytes) == (1000, 2002)


def test_softmax_and_layer_norm():
    c = rl.softmax(8, 100, 4)
    assert (c.flops, c.bytes) == (5 * 800, 2 * 800 * 4)
    c = rl.layer_norm(8, 100, 2)
    assert (c.flops, c.bytes) == (8 * 800, (1600 + 200) * 2)


def test_gemm_and_gemv():
    c = rl.gemm(64, 32, 16, 2)
    assert c.flops == 2 * 64 * 32 * 16
    assert c.bytes == (64 * 16 + 16 * 32 + 64 * 32) * 2
    # square GEMM intensity grows as n/3 per byte-per-element: 2n^3 / (3 n^2 s)
    assert rl.gemm(3000, 3000, 3000, 2).intensity == pytest.approx(2 * 3000 / (3 * 2))
    v = rl.gemv(4096, 4096, 2)
    assert v.flops == 2 * 4096 * 4096 and v.bytes == (4096 * 4096 + 2 * 4096) * 2
    assert v.intensity == pytest.approx(1.0, rel=1e-3)   # GEMV in bf16: ~1 FLOP/byte


def test_attention_decode_intensity_is_the_gqa_ratio():
    # MHA in bf16: 4 T H dh FLOPs over 2 T H dh * 2 bytes -> 1 FLOP/byte
    mha = rl.attention_decode(models.get("llama2-7b"), context=4096)
    assert mha.intensity == pytest.approx(1.0, rel=1e-3)
    # GQA with 8 query heads per KV head reads 8x less cache for the same FLOPs
    gqa = rl.attention_decode(models.get("llama2-70b"), context=4096)
    assert gqa.intensity == pytest.approx(8.0, rel=1e-2)
    assert gqa.flops == 80 * 4 * 4096 * 64 * 128
    # batching sequences does not help: each has its own cache
    b8 = rl.attention_decode(models.get("llama2-7b"), context=4096, batch=8)
    assert b8.intensity == pytest.approx(mha.intensity)


def test_attainable_and_bound():
    np.testing.assert_allclose(rl.attainable([0, 1, 10, 100], 50.0, 10.0), [0, 10, 50, 50])
    assert rl.attainable(2.0, 50.0, 10.0) == 20.0
    assert rl.bound(4.9, 50.0, 10.0) == "memory" and rl.bound(5.0, 50.0, 10.0) == "compute"
    assert rl.gemv(10, 10).time_on(1e9, 1e9) == rl.gemv(10, 10).bytes / 1e9


@pytest.mark.parametrize("call", [lambda: rl.add(-1), lambda: rl.gemm(2, 0, 2),
                                  lambda: rl.softmax(2.5, 3), lambda: rl.attainable(-1, 1, 1)])
def test_bad_sizes_are_rejected(call):
    with pytest.raises(ValueError, match="must be"):
        call()
