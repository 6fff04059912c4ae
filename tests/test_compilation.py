"""utils.compilation: capture, rewrites, the auto-tuner and the calibrators, values and bad input."""
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from utils import compilation as C
from utils import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = torch.randint(0, 44, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model():
    return tiny.load("tiny-target")


# --------------------------------------------------------------------------- capture and rewrites

def test_trace_tiny_computes_what_the_model_computes(model):
    gm = C.trace_tiny(model)
    with torch.no_grad():
        assert torch.equal(gm(TOKENS), model(TOKENS))
    ops = C.count_ops(gm)
    assert ops["Linear"] == 4 * 7 + 1 and ops["Embedding"] == 1
    assert ops["attention"] == 4 and ops["apply_rope"] == 8
    assert list(ops) == sorted(ops)
    assert C.matmul_count(gm) == 29


def test_plain_symbolic_trace_fails_on_the_tiny_model(model):
    # the reason trace_tiny keeps the attention helpers as leaves
    with pytest.raises(Exception):
        fx.symbolic_trace(C.CausalForward(model))


def test_fuse_sibling_linears_on_the_tiny_model(model):
    with torch.no_grad():
        ref = model(TOKENS)
    gm = C.trace_tiny(model)
    assert C.fuse_sibling_linears(gm) == 8
    assert C.matmul_count(gm) == 17
    assert C.count_ops(gm)["narrow"] == 4 * (3 + 2)
    with torch.no_grad():
        torch.testing.assert_close(gm(TOKENS), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(model(TOKENS), ref)           # the model's own layers untouched
    assert C.fuse_sibling_linears(gm) == 0               # nothing left to fuse


def test_fuse_sibling_linears_keeps_biases_apart_from_bias_free():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 2), nn.Linear(4, 5, bias=False)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x), self.c(x)], -1)

    m = M()
    x = torch.randn(3, 4)
    gm = fx.symbolic_trace(m)
    assert C.fuse_sibling_linears(gm) == 1
    assert C.matmul_count(gm) == 2
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-6, atol=1e-6)


def test_fuse_attention_matches_the_unfused_attention(model):
    with torch.no_grad():
        ref = model(TOKENS)
    gm = C.trace_tiny(model)
    assert C.fuse_attention(gm) == 4
    ops = C.count_ops(gm)
    assert ops["sdpa_attention"] == 4 and "attention" not in ops
    with torch.no_grad():
        torch.testing.assert_close(gm(TOKENS), ref, rtol=1e-4, atol=1e-4)


def test_sdpa_attention_equals_tiny_attention_with_gqa():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), \
        torch.randn(2, 2, 5, 8, generator=g)
    mask = tiny.causal_mask(torch.arange(5).expand(2, 5), 5)
    torch.testing.assert_close(C.sdpa_attention(q, k, v, mask), tiny.attention(q, k, v, mask),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError):
        C.sdpa_attention(q, k, v, mask.float())


class LoRA(nn.Module):
    """y = x (W + s B A)^T + b: the merge depends only on weights, so it folds."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(6, 5, generator=g))
        self.a = nn.Parameter(torch.randn(2, 5, generator=g))
        self.b = nn.Parameter(torch.randn(6, 2, generator=g))
        self.bias = nn.Parameter(torch.randn(6, generator=g))

    def forward(self, x):
        return F.linear(x, self.w + 0.5 * (self.b @ self.a), self.bias)


def test_fold_constants_merges_a_lora_update():
    m = LoRA()
    gm = fx.symbolic_trace(m)
    before = C.count_ops(gm)
    assert C.fold_constants(gm) == 1
    after = C.count_ops(gm)
    assert before == {"add": 1, "linear": 1, "matmul": 1, "mul": 1} and after == {"linear": 1}
    x = torch.randn(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-6, atol=1e-6)
    assert C.fold_constants(gm) == 0


@pytest.mark.parametrize("fn", [C.count_ops, C.matmul_count, C.fuse_sibling_linears,
                                C.fuse_attention, C.fold_constants])
def test_graph_functions_refuse_non_graphs(fn):
    with pytest.raises(TypeError, match="gm"):
        fn(nn.Linear(2, 2))


def test_causal_forward_refuses_other_models():
    with pytest.raises(TypeError, match="model"):
        C.CausalForward(nn.Linear(2, 2))


# --------------------------------------------------------------------------- auto-tuner

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _cands(clock, costs, log):
    def make(name):
        def fn(n):
            log.append(name)
            clock.now += costs[name](n)
            return name
        return fn
    return {name: make(name) for name in costs}


def test_autotuner_picks_per_shape_and_caches():
    clock, log = Clock(), []
    u = 2.0 ** -20
    cands = _cands(clock, {"a": lambda n: u * (100 + n * n), "b": lambda n: u * (500 + n * n // 5)}, log)
    t = C.Autotuner(cands, warmup=1, repeats=3, timer=clock)
    assert t.best((8,), 8) == "a" and t.best((64,), 64) == "b"
    assert len(log) == 2 * 2 * 4
    assert t.cache == {(8,): "a", (64,): "b"}
    assert t.timings[(8,)]["a"] == pytest.approx(164 * u)
    assert t(( 64,), 64) == "b" and log[-1] == "b" and len(log) == 17


def test_autotuner_median_ignores_spikes_and_skips_failing_tactics():
    clock, calls = Clock(), {"n": 0}

    def spiky(n):
        calls["n"] += 1
        clock.now += 100.0 if calls["n"] in (2, 4) else 1.0

    def steady(n):
        clock.now += 2.0

    def broken(n):
        raise ValueError("unsupported")

    t = C.Autotuner({"spiky": spiky, "steady": steady, "broken": broken}, warmup=0, repeats=5,
                    timer=clock)
    assert t.best("k", 0) == "spiky"
    assert set(t.timings["k"]) == {"spiky", "steady"}
    with pytest.raises(RuntimeError):
        C.Autotuner({"broken": broken}, timer=clock).best("k", 0)


@pytest.mark.parametrize("args, kwargs, kind", [
    (({},), {}, ValueError), (([1],), {}, TypeError), (({"a": 1},), {}, TypeError),
    (({"a": abs},), {"repeats": 0}, ValueError), (({"a": abs},), {"warmup": -1}, ValueError),
    (({"a": abs},), {"repeats": 2.5}, TypeError), (({"a": abs},), {"timer": 3}, TypeError)])
def test_autotuner_bad_arguments(args, kwargs, kind):
    with pytest.raises(kind):
        C.Autotuner(*args, **kwargs)


def test_autotuner_refuses_unhashable_keys():
    with pytest.raises(TypeError, match="key"):
        C.Autotuner({"a": abs}).best([1, 2], 1)


# --------------------------------------------------------------------------- calibration

def test_abs_histogram_covers_zero_to_max():
    x = torch.tensor([-3.0, 1.0, 0.5, 2.0])
    h, e = C.abs_histogram(x, bins=6)
    assert h.sum() == 4 and e[0] == 0 and e[-1] == 3.0 and h.numel() == 6
    assert h.tolist() == [0, 1, 1, 0, 1, 1]
    assert C.abs_histogram(torch.randn(1000))[0].numel() == 2048 == C.CALIBRATION_FACTS["histogram_bins"][0]


@pytest.mark.parametrize("x, kind", [(torch.zeros(5), ValueError), (torch.tensor([1.0, math.nan]), ValueError),
                                     (torch.empty(0), ValueError), (torch.arange(4), TypeError),
                                     ([1.0, 2.0], TypeError)])
def test_abs_histogram_bad_input(x, kind):
    with pytest.raises(kind):
        C.abs_histogram(x)


def test_max_amax():
    assert C.max_amax(torch.tensor([-4.0, 2.0])) == 4.0
    with pytest.raises(ValueError):
        C.max_amax(torch.tensor([math.inf]))


def test_percentile_amax_by_hand():
    h = torch.tensor([10.0, 0.0, 80.0, 10.0])
    e = torch.arange(5, dtype=torch.float64)
    assert [C.percentile_amax(h, e, p) for p in (10, 10.5, 90, 95, 100)] == [1.0, 3.0, 3.0, 4.0, 4.0]


@pytest.mark.parametrize("h, e, p", [
    (torch.ones(4), torch.arange(5.0), 0), (torch.ones(4), torch.arange(5.0), 101),
    (torch.ones(4), torch.arange(4.0), 50), (-torch.ones(4), torch.arange(5.0), 50),
    (torch.zeros(4), torch.arange(5.0), 50), (torch.ones(4), torch.tensor([0.0, 2, 1, 3, 4]), 50)])
def test_percentile_amax_bad_input(h, e, p):
    with pytest.raises(ValueError):
        C.percentile_amax(h, e, p)


def test_entropy_keeps_the_whole_range_of_a_uniform_and_clips_a_heavy_tail():
    g = torch.Generator().manual_seed(0)
    h, e = C.abs_histogram(torch.rand(100_000, generator=g) * 2 - 1)
    assert C.entropy_amax(h, e) == float(e[-1])
    x = torch.randn(100_000, generator=g)
    x[:5] *= 40                                      # five outliers stretch the range 40x
    h, e = C.abs_histogram(x)
    amax = C.entropy_amax(h, e)
    assert 2.5 < amax < 0.25 * float(e[-1])
    div = C.entropy_divergences(h)
    assert div.shape == (2048 - 128 + 1,) and div.dtype == torch.float64
    i = int(torch.searchsorted(e, torch.tensor(amax, dtype=torch.float64)))
    assert float(div[i - 128]) == float(div.min())


def test_entropy_divergence_by_hand():
    # 4 bins, 2 levels, start at bin 2: at i=2 P = [1, 1+2+4], Q from bins 0..1 = [1, 1]
    h = torch.tensor([1.0, 1.0, 2.0, 4.0])
    d = C.entropy_divergences(h, levels=2, start_bin=2)
    p = torch.tensor([1 / 8, 7 / 8])
    assert float(d[0]) == pytest.approx(float((p * torch.log(p / 0.5)).sum()))
    # i=4: groups {0,1}, {2,3}: Q = [1, 1, 3, 3] / 8, P = [1, 1, 2, 4] / 8
    p4, q4 = torch.tensor([1, 1, 2, 4.0]) / 8, torch.tensor([1, 1, 3, 3.0]) / 8
    assert float(d[2]) == pytest.approx(float((p4 * torch.log(p4 / q4)).sum()))


@pytest.mark.parametrize("h, kind", [(torch.ones(100), ValueError), (torch.zeros(200), ValueError),
                                     (torch.ones(10, 20), ValueError), ("hist", TypeError)])
def test_entropy_bad_input(h, kind):
    with pytest.raises(kind):
        C.entropy_divergences(h)


def test_entropy_amax_bad_edges():
    with pytest.raises(ValueError, match="edges"):
        C.entropy_amax(torch.ones(256), torch.arange(256.0))


def test_fake_quant_rounds_to_the_grid_and_clips():
    x = torch.tensor([0.0, 0.5, 1.0, 2.0, -3.0])
    y = C.fake_quant(x, 1.27)
    assert torch.allclose(y, torch.tensor([0.0, 0.5, 1.0, 1.27, -1.27]))
    with pytest.raises(ValueError):
        C.fake_quant(x, 0.0)


def test_calibrate_and_w8a8_on_the_tiny_model(model):
    acts = C.linear_inputs(model, TOKENS)
    assert len(acts) == 4 * 4 + 1 and acts["blocks.0.attn.wq"].shape == (2 * 40, 128)
    assert acts["blocks.0.mlp.down"].shape == (2 * 40, 384)
    amax = {m: C.calibrate(acts, m) for m in ("max", "percentile", "entropy")}
    for name, x in acts.items():
        assert amax["max"][name] == pytest.approx(float(x.abs().max()))
        assert amax["percentile"][name] <= amax["max"][name] * (1 + 1e-9)
        assert amax["entropy"][name] <= amax["max"][name] * (1 + 1e-9)
    with torch.no_grad():
        ref = model(TOKENS)
        out = C.w8a8(model, amax["max"])(TOKENS)
        assert torch.equal(model(TOKENS), ref)
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.2
    with pytest.raises(ValueError, match="amax"):
        C.w8a8(model, {"lm_head": 1.0})
    with pytest.raises(ValueError):
        C.calibrate(acts, "kl")
    with pytest.raises(TypeError):
        C.linear_inputs(nn.Linear(2, 2), TOKENS)


# --------------------------------------------------------------------------- launch overhead

def test_op_chain_and_per_op_seconds():
    x = torch.tensor([1.0])
    # (1 * 0.5 + 0.25) * 0.5 + 0.25 = 0.625
    assert C.op_chain(x, 4).item() == 0.625
    s = C.per_op_seconds(lambda t: C.op_chain(t, 10), x, 10, repeats=2, number=2)
    assert 0 < s < 1
    with pytest.raises(ValueError):
        C.per_op_seconds(abs, x, 0)


def test_cuda_graph_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA"):
        C.cuda_graph(lambda t: t + 1, torch.ones(2))
