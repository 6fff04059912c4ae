"""utils.recompute against bytes and FLOPs written out by hand, and the ch12 checkers
against deliberately wrong answers.

Expected values are products of tensor sizes (what each op saves is documented autograd
behaviour), never obtained by calling the code under test twice.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from utils import recompute as rc
from utils.checks import ExerciseFailed
from utils.checks import ch12

# Logic tests hold the checkers to the library reference; refusal: tests/test_library_answers.py
pytestmark = pytest.mark.usefixtures("library_answers_allowed")

F32 = 4


# -- the meter ---------------------------------------------------------------------------
def test_meter_counts_distinct_storages():
    x = torch.randn(100, requires_grad=True)
    y = torch.randn(100, requires_grad=True)
    assert rc.saved_bytes(lambda a, b: a * b, x, y) == 2 * 100 * F32     # both factors
    assert rc.saved_bytes(lambda a: a * a, x) == 100 * F32               # one storage, twice
    assert rc.saved_bytes(lambda a, b: a + b, x, y) == 0                 # nothing
    assert rc.saved_bytes(torch.exp, x) == 100 * F32                     # its output
    # a view of x saved by a second op is the same storage: still 100 elements
    assert rc.saved_bytes(lambda a: a.sin() + a[:50].cos().repeat(2), x) == 100 * F32


def test_meter_ignores_parameters_and_no_grad():
    lin = torch.nn.Linear(16, 32)
    x = torch.randn(8, 16)
    # addmm saves its input (8 x 16) and the weight (ignored); relu saves 8 x 32
    assert rc.saved_bytes(lambda a: torch.relu(lin(a)), x, ignore=lin) == (8 * 16 + 8 * 32) * F32
    # the weight is saved only when the input needs a gradient
    assert rc.saved_bytes(lambda a: torch.relu(lin(a)), x) == (8 * 16 + 8 * 32) * F32
    xg = x.clone().requires_grad_()
    assert rc.saved_bytes(lambda a: torch.relu(lin(a)), xg) == (8 * 16 + 8 * 32 + 32 * 16) * F32
    assert rc.saved_bytes(lambda a: torch.relu(lin(a)), xg, ignore=lin) == (8 * 16 + 8 * 32) * F32
    with torch.no_grad():
        assert rc.saved_bytes(lambda a: torch.relu(lin(a)), x, ignore=lin) == 0


def test_meter_follows_release_and_peak():
    x = torch.randn(1000, requires_grad=True)
    with rc.SavedTensorMeter(timeline=True) as m:
        y = x.exp().sin()          # exp saves its output, sin its input (the same storage)
        assert m.live == 1000 * F32
        y.sum().backward()
    assert m.live == 0 and m.peak == 1000 * F32
    assert m.timeline == [1000 * F32, 0]


def test_meter_rejects_bad_ignore_and_reuse():
    with pytest.raises(TypeError):
        rc.SavedTensorMeter(ignore=[1, 2])
    m = rc.SavedTensorMeter()
    with m:
        pass
    with pytest.raises(RuntimeError):
        with m:
            pass


def test_residual_mlp_saves_input_and_hidden():
    blocks = rc.mlp_stack(3, 8, ratio=4)
    x = torch.randn(5, 8)
    # per block: its input (5 x 8) and the ReLU output (5 x 32)
    assert rc.saved_bytes(lambda t: rc.run_blocks(blocks, t), x, ignore=blocks) == 3 * (40 + 160) * F32


def test_transformer_layer_saved_bytes_by_hand():
    b, s, h, a = 2, 16, 32, 4
    torch.manual_seed(0)
    layer = rc.TransformerLayer(h, a)
    x = torch.randn(b, s, h, requires_grad=True)
    sbh = s * b * h
    # 16 sbh-sized fp32 tensors (LN inputs 2, QKV input 1, q k v copies 3, proj input 1,
    # fc1 input 1, GELU input 4, fc2 input 4), probabilities a s^2 b, bool mask s^2,
    # two layer norms' mean and rstd (2 x 2 x b s floats)
    expected = 16 * sbh * F32 + a * s * s * b * F32 + s * s + 4 * b * s * F32
    assert rc.saved_bytes(layer, x, ignore=layer) == expected


def test_attention_core_matches_sdpa():
    q, k, v = (torch.randn(2, 3, 10, 4, dtype=torch.float64) for _ in range(3))
    for causal in (True, False):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert torch.allclose(rc.attention_core(q, k, v, causal=causal), ref)


# -- FLOPs ----------------------------------------------------------------------------------
def test_matmul_flops_by_hand():
    a = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    with rc.MatmulFlops() as f:
        (a @ w).relu().sum().backward()
    fwd = 2 * 8 * 16 * 32
    assert f.total == 3 * fwd      # forward, then grad of a and grad of w


def test_measure_step_mlp():
    blocks = rc.mlp_stack(4, 8)
    x = torch.randn(6, 8)
    m = rc.measure_step(lambda t: rc.run_blocks(blocks, t), x, ignore=blocks)
    per_block = (6 * 8 + 6 * 32) * F32
    assert m.stored == m.peak == 4 * per_block
    fwd = 4 * 2 * (2 * 6 * 8 * 32)   # two matmuls of 6 x 8 x 32 per block
    assert m.forward_flops == fwd
    # backward: weight grads for every matmul, input grads for all but the first block's fc1
    assert m.step_flops == fwd + fwd + (fwd - 2 * 6 * 8 * 32)
    with pytest.raises(ValueError):
        rc.measure_step(lambda t: t * 2, torch.randn(3))


# -- segment model --------------------------------------------------------------------------
def test_segment_sizes():
    assert rc.segment_sizes(10, 4) == [3, 3, 2, 2]
    assert rc.segment_sizes(5, 5) == [1] * 5
    assert rc.segment_sizes(7, 1) == [7]
    for bad in ((5, 0), (5, 6), (0, 1), (5, 2.0)):
        with pytest.raises(ValueError):
            rc.segment_sizes(*bad)


def test_segment_memory_by_hand():
    u, a = 10, 50
    # sizes 3, 3, 2: peaks (0u + 3a, 1u + 3a, 2u + 2a) = (150, 160, 120)
    cost = rc.segment_memory([3, 3, 2], u, a)
    assert (cost.stored, cost.peak, cost.recomputed) == (30, 160, 8)
    last = rc.segment_memory([3, 3, 2], u, a, checkpoint_last=False)
    assert (last.stored, last.peak, last.recomputed) == (2 * u + 2 * a, 160, 6)
    one = rc.segment_memory([8], u, a)
    assert (one.stored, one.peak, one.recomputed) == (u, 8 * a, 8)
    with pytest.raises(ValueError):
        rc.segment_memory([2, 2], 10, 5)          # a block saves at least its input
    with pytest.raises(ValueError):
        rc.segment_memory([], 1, 1)


def test_best_segments_and_continuous_optimum():
    # a = u, n = 16: peaks k=1..16 computed by hand: k=3 (6,5,5) -> max(6, 1+5, 2+5) = 7
    assert rc.best_segments(16, 1, 1) == 3
    k, m = rc.continuous_optimum(16, 1, 5)
    assert k == pytest.approx(math.sqrt(80)) and m == pytest.approx(2 * math.sqrt(80))


def _measured_peak(blocks, x, k):
    """Peak with a hand-made checkpoint (recomputation visible to the meter)."""
    class Ck(torch.autograd.Function):
        @staticmethod
        def forward(ctx, run, t, *ps):
            ctx.run = run
            ctx.save_for_backward(t, *ps)
            return run(t)

        @staticmethod
        def backward(ctx, g):
            t, *ps = ctx.saved_tensors
            t = t.detach().requires_grad_(ctx.needs_input_grad[1])
            with torch.enable_grad():
                y = ctx.run(t)
            ins = [z for z, need in zip([t, *ps], ctx.needs_input_grad[1:]) if need]
            gs = iter(torch.autograd.grad(y, ins, g))
            return (None, *[next(gs) if need else None for need in ctx.needs_input_grad[1:]])

    def run(t):
        start = 0
        for m in rc.segment_sizes(len(blocks), k):
            seg = blocks[start:start + m]
            start += m
            t = Ck.apply(lambda z, seg=seg: rc.run_blocks(seg, z), t,
                         *[p for b in seg for p in b.parameters()])
        return t

    return rc.measure_step(run, x, ignore=blocks)


@pytest.mark.parametrize("n,k", [(6, 1), (6, 2), (7, 3), (8, 8)])
def test_segment_memory_matches_measurement(n, k):
    blocks = rc.mlp_stack(n, 8)
    x = torch.randn(4, 8)
    u, a = 4 * 8 * F32, (4 * 8 + 4 * 32) * F32
    m = _measured_peak(blocks, x, k)
    cost = rc.segment_memory(rc.segment_sizes(n, k), u, a)
    assert (m.stored, m.peak) == (cost.stored, cost.peak)


def test_checkpoint_segments_is_exact():
    blocks = rc.mlp_stack(5, 8)
    x = torch.randn(4, 8, requires_grad=True)
    g = torch.randn(4, 8)
    rc.run_blocks(blocks, x).backward(g)
    ref = [p.grad.clone() for p in blocks.parameters()] + [x.grad.clone()]
    for k, last in ((2, True), (3, False), (5, True)):
        blocks.zero_grad()
        x.grad = None
        m = rc.measure_step(lambda t: rc.checkpoint_segments(blocks, t, k, checkpoint_last=last),
                            x, ignore=blocks, grad=g)
        got = [p.grad for p in blocks.parameters()] + [x.grad]
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        u, a = 4 * 8 * F32, (4 * 8 + 4 * 32) * F32
        assert m.stored == rc.segment_memory(rc.segment_sizes(5, k), u, a, last).stored


def test_recompute_overhead_by_hand():
    s, h = 2048, 12288
    assert rc.layer_forward_flops(s, 1, h) == 24 * s * h * h + 4 * s * s * h
    assert rc.recompute_overhead(s, h, "selective") == pytest.approx(
        4 * s * s * h / (3 * (24 * s * h * h + 4 * s * s * h)))
    assert rc.recompute_overhead(s, h, "full") == pytest.approx(1 / 3)
    assert rc.recompute_overhead(s, h, "none") == 0
    with pytest.raises(ValueError):
        rc.recompute_overhead(s, h, "some")


def test_layer_flops_match_the_counter():
    b, s, h, a = 1, 16, 32, 4
    layer = rc.TransformerLayer(h, a)
    x = torch.randn(b, s, h)
    with rc.MatmulFlops() as f:
        layer(x)
    assert f.total == rc.layer_forward_flops(s, b, h)


# -- the checkers fail on wrong answers -----------------------------------------------------
def _fails(checker, answer):
    with pytest.raises(ExerciseFailed):
        checker(answer)


def test_saved_bytes_checker():
    def counts_tensors_not_storages(fn, *args, ignore=()):
        total = []
        skip = {t.untyped_storage().data_ptr() for t in ignore}

        def pack(t):
            if t.untyped_storage().data_ptr() not in skip:
                total.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*args)
        return sum(total)

    def forgets_ignore(fn, *args, ignore=()):
        return rc.saved_bytes(fn, *args)

    _fails(ch12.saved_bytes, counts_tensors_not_storages)
    _fails(ch12.saved_bytes, forgets_ignore)
    ch12.saved_bytes(lambda fn, *args, ignore=(): rc.saved_bytes(fn, *args, ignore=list(ignore)))


def test_checkpoint_fn_checker():
    def no_checkpoint(run, x, params):
        return run(x)

    def detached(run, x, params):
        with torch.no_grad():
            return run(x)

    _fails(ch12.checkpoint_fn, no_checkpoint)
    _fails(ch12.checkpoint_fn, detached)
    ch12.checkpoint_fn(lambda run, x, params: torch.utils.checkpoint.checkpoint(
        run, x, use_reentrant=False))


def test_checkpoint_segments_checker():
    def last_not_checkpointed(blocks, x, k):
        if not 1 <= k <= len(blocks):
            raise ValueError(k)
        return rc.checkpoint_segments(blocks, x, k, checkpoint_last=False)

    def shorter_first(blocks, x, k):
        if not 1 <= k <= len(blocks):
            raise ValueError(k)
        sizes = rc.segment_sizes(len(blocks), k)[::-1]
        start = 0
        for m in sizes:
            seg = list(blocks)[start:start + m]
            start += m
            x = torch.utils.checkpoint.checkpoint(rc.run_blocks, seg, x, use_reentrant=False)
        return x

    def no_validation(blocks, x, k):
        return rc.checkpoint_segments(blocks, x, max(1, min(k, len(blocks))))

    _fails(ch12.checkpoint_segments, last_not_checkpointed)
    _fails(ch12.checkpoint_segments, shorter_first)
    _fails(ch12.checkpoint_segments, no_validation)
    ch12.checkpoint_segments(rc.checkpoint_segments)


def test_checkpoint_cost_checker():
    def smooth_model(n, k, u, a):
        return k * u, k * u + math.ceil(n / k) * a, n

    def shorter_first(n, k, u, a):
        sizes = rc.segment_sizes(n, k)[::-1]
        return k * u, max(j * u + m * a for j, m in enumerate(sizes)), n

    _fails(ch12.checkpoint_cost, smooth_model)
    _fails(ch12.checkpoint_cost, shorter_first)
    ch12.checkpoint_cost(lambda n, k, u, a: tuple(
        rc.segment_memory(rc.segment_sizes(n, k), u, a).__dict__.values()))


def test_attention_core_checker():
    def saves_everything(q, k, v, causal=True):
        return rc.attention_core(q, k, v, causal=causal)

    def no_scale(q, k, v, causal=True):
        return torch.utils.checkpoint.checkpoint(
            lambda a, b, c: rc.attention_core(a * q.shape[-1] ** 0.5, b, c, causal=causal),
            q, k, v, use_reentrant=False)

    _fails(ch12.attention_core_recompute, saves_everything)
    _fails(ch12.attention_core_recompute, no_scale)
    ch12.attention_core_recompute(lambda q, k, v, causal=True: torch.utils.checkpoint.checkpoint(
        rc.attention_core, q, k, v, causal, use_reentrant=False))
