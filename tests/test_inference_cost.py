"""utils.inference_cost: prefill and decode counts, knees, times, memory ceilings, prices.

Expected values are written out by hand from the model shapes, or come from independent
code (the registry's flops_per_token, roofline.attention_decode, a PyTorch module's
parameters, a brute-force search), never from calling the function under test twice.
"""
import math

import pytest
import torch

from utils import hardware, models
from utils import inference_cost as ic
from utils import roofline as rl
from utils.tiny import TinyConfig, TinyTransformer

TINY = TinyConfig(vocab=44, n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, d_ff=384,
                  max_seq_len=256)


def test_tiny_spec_matches_the_pytorch_module():
    module = TinyTransformer(TINY)
    spec = ic.as_spec(module)
    assert spec.param_count() == module.num_params() == 798_848
    linear = sum(mod.weight.numel() for mod in module.modules() if isinstance(mod, torch.nn.Linear))
    assert spec.matmul_params() == linear == 792_064
    assert ic.as_spec(TINY).param_count() == 798_848          # a bare config works too


def test_tiny_decode_by_hand():
    # N = 792064, L = 4, H = 4, d_h = 32, kv = 2 * 32 = 64; one token attending to itself.
    c = ic.decode_cost(TINY, batch=1, context=1, bytes_per_element=4)
    assert c.flops == 2 * 792_064 + 4 * 4 * 4 * 32 * 1 == 1_586_176
    assert c.bytes == 4 * (792_064 + 4 * (2 * 1 * 64 + 2 * 4 * 32)) == 3_174_400


def test_tiny_prefill_by_hand():
    # 2 prompts of 3 tokens: attended keys 1 + 2 + 3 = 6 per prompt.
    c = ic.prefill_cost(TINY, batch=2, prompt_len=3, bytes_per_element=4)
    assert c.flops == 2 * (2 * 792_064 * 3 + 4 * 4 * 4 * 32 * 6) == 9_529_344
    assert c.bytes == 4 * (792_064 + 2 * 4 * (2 * 3 * 64 + 2 * 3 * 128)) == 3_205_120


@pytest.mark.parametrize("name", ["llama2-7b", "llama3-70b", "mistral-7b", "gpt3-175b"])
def test_decode_agrees_with_the_registry_and_chapter_03(name):
    m = models.get(name)
    for batch, ctx in ((1, 1), (8, 4096), (64, 777)):
        c = ic.decode_cost(m, batch, ctx, 2)
        assert c.flops == batch * m.flops_per_token(ctx)
        assert c.bytes == 2 * m.matmul_params() + rl.attention_decode(m, ctx, batch, 2).bytes


def test_prefill_is_the_sum_of_its_tokens():
    m = models.get("llama3-8b")
    T = 37
    assert ic.prefill_cost(m, 1, T).flops == sum(m.flops_per_token(t) for t in range(1, T + 1))
    # a chunk after a cached prefix costs the difference of two prefills in FLOPs
    whole, first = ic.prefill_cost(m, 3, 50), ic.prefill_cost(m, 3, 20)
    assert ic.step_cost(m, 3, 30, 20).flops == whole.flops - first.flops


def test_intensity_is_about_T_for_prefill_and_b_for_short_decode():
    m = models.get("llama2-7b")
    for T in (16, 128, 512):
        assert 0.9 * T < ic.prefill_cost(m, 1, T).intensity <= T * 1.01
    for b in (1, 2, 4, 8):
        assert 0.9 * b < ic.decode_cost(m, b, 16).intensity < 1.1 * b


def test_decode_limit_is_the_large_batch_intensity():
    m = models.get("llama3-70b")
    lim = ic.decode_intensity_limit(m, 4096)
    assert ic.decode_cost(m, 10**8, 4096).intensity == pytest.approx(lim, rel=1e-4)
    # by hand: per sequence 2N + 4 L H d_h T FLOPs over s L (2 T kv + 2 H d_h) bytes
    f = 2 * m.matmul_params() + 4 * 80 * 64 * 128 * 4096
    q = 2 * 80 * (2 * 4096 * 1024 + 2 * 64 * 128)
    assert lim == pytest.approx(f / q, rel=1e-12)


def _brute_knee(m, ridge, ctx, s, limit=100_000):
    for b in range(1, limit):
        if ic.decode_cost(m, b, ctx, s).intensity >= ridge:
            return b
    return None


@pytest.mark.parametrize("name,gpu,ctx", [("llama3-70b", "H100-SXM", 512), ("llama3-70b", "H200", 512),
                                          ("llama3-8b", "H200", 512), ("llama3-70b", "L4", 512)])
def test_knee_is_the_first_batch_at_the_ridge(name, gpu, ctx):
    m, g = models.get(name), hardware.get(gpu)
    knee = ic.decode_knee_batch(m, g.flops("bf16"), g.memory_bandwidth, ctx)
    assert knee == _brute_knee(m, g.flops("bf16") / g.memory_bandwidth, ctx, 2)


def test_no_knee_when_the_cache_caps_intensity():
    g = hardware.get("H100-SXM")
    assert ic.decode_knee_batch(models.get("llama2-7b"), g.flops("bf16"), g.memory_bandwidth, 4096) is None
    assert ic.decode_knee_batch(models.get("llama3-70b"), g.flops("bf16"), g.memory_bandwidth, 4096) is None
    # a CPU-like roof (ridge 2.5 FLOP/B) and the tiny model in fp32
    assert ic.decode_knee_batch(TINY, 100e9, 40e9, 32, 4) == _brute_knee(ic.as_spec(TINY), 2.5, 32, 4)


def test_step_time_is_the_roofline_bound():
    m = models.get("llama2-7b")
    c = ic.decode_cost(m, 1, 4096)
    assert ic.step_time(c, "H100-SXM") == pytest.approx(c.bytes / 3.35e12, rel=1e-12)
    assert ic.step_time(c, "H100-SXM", n_gpus=2) == pytest.approx(c.bytes / 6.7e12, rel=1e-12)
    p = ic.prefill_cost(m, 1, 4096)
    assert ic.step_time(p, hardware.get("H200")) == pytest.approx(p.flops / 989.5e12, rel=1e-12)


def test_max_decode_batch_by_hand():
    # 80 GiB x 0.9 less 6,738,415,616 x 2 bytes of weights, 2 GiB of cache per 4096 tokens
    room = 80 * 2**30 * 0.9 - 2 * 6_738_415_616
    assert ic.max_decode_batch("llama2-7b", "H100-SXM", 4096) == math.floor(room / 2**31) == 29
    assert ic.max_decode_batch("llama3-70b", "L4", 4096) == 0          # weights do not fit


def test_price_per_million_tokens():
    # $3.60 an hour is $0.001 a second; at 1000 tokens/s that is $1 per million tokens
    assert ic.usd_per_million_tokens(1000, 3.6) == pytest.approx(1.0)
    assert ic.usd_per_million_tokens(1000, 3.6, n_gpus=4) == pytest.approx(4.0)


def test_bad_inputs_are_named():
    m = models.get("llama2-7b")
    with pytest.raises(ValueError, match="context"):
        ic.decode_cost(m, 1, 0)
    with pytest.raises(ValueError, match="batch"):
        ic.prefill_cost(m, 0, 16)
    with pytest.raises(ValueError, match="prompt_len"):
        ic.prefill_cost(m, 1, 0)
    with pytest.raises(ValueError, match="bytes_per_element"):
        ic.decode_cost(m, 1, 8, 0)
    with pytest.raises(TypeError, match="ModelSpec"):
        ic.as_spec(3.14)
    with pytest.raises(KeyError, match="unknown model"):
        ic.as_spec("gpt-5")
    with pytest.raises(ValueError, match="tokens_per_second"):
        ic.usd_per_million_tokens(0, 3.0)
