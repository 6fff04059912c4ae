"""Checkers for lab 12, activation checkpointing.

The oracles: ``utils.recompute.SavedTensorMeter`` for saved bytes (its counts are unit-
tested against bytes written out by hand), ``torch.utils.checkpoint.checkpoint`` for
segment checkpointing (saved bytes and gradients), the un-checkpointed model for
outputs and gradients, ``utils.recompute.segment_memory`` for the memory model, and
``torch.nn.functional.scaled_dot_product_attention`` for the attention core.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import recompute as rc
from . import exercise, expect_close, expect_dtype, expect_equal, expect_shape, expect_type, fail


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32, requires_grad=False):
    t = torch.randn(*shape, generator=_gen(seed), dtype=dtype)
    return t.requires_grad_(requires_grad)


def _int(got, what, hint=""):
    expect_type(got, int, what, hint or "return a plain Python int number of bytes")
    return int(got)


# ----------------------------------------------------------------------------- exercise 1
@exercise
def saved_bytes(fn):
    """``fn(f, *args, ignore=())``: bytes of the distinct storages f's forward saves."""
    x = _randn(64, 32, seed=1, requires_grad=True)
    y = _randn(64, 32, seed=2, requires_grad=True)
    nb = 64 * 32 * 4
    lin = torch.nn.Linear(32, 16)
    cases = [
        ("x * y (saves both factors)", lambda: fn(lambda a, b: a * b, x, y), 2 * nb,
         "a product saves both inputs: each needs the other for its gradient"),
        ("x.exp() (saves its output)", lambda: fn(torch.exp, x), nb,
         "exp's gradient is its own output, so the output is what is saved"),
        ("x * x (one storage saved twice)", lambda: fn(lambda a: a * a, x), nb,
         "both saved operands are the same tensor: count each storage once, keyed by "
         "t.untyped_storage().data_ptr()"),
        ("x.sin() then a slice of x, .cos() (a view of a saved storage)",
         lambda: fn(lambda a: a.sin() + a[:32].cos().repeat(2, 1), x), nb,
         "a view (x[:32]) shares x's storage: count storages, not tensors, and count a "
         "storage's full nbytes()"),
        ("x + y (saves nothing)", lambda: fn(lambda a, b: a + b, x, y), 0,
         "an addition's gradient needs neither input"),
        ("relu(linear(x)), ignoring the layer's parameters",
         lambda: fn(lambda a: torch.relu(lin(a)), x, ignore=list(lin.parameters())),
         nb + 64 * 16 * 4,
         "linear saves its input (for the weight's gradient) and the weight (for the input's); "
         "relu saves its output. Leave out storages of the tensors in `ignore`"),
    ]
    for what, call, expected, hint in cases:
        got = _int(call(), f"saved_bytes for {what}")
        expect_equal(got, expected, what=f"saved_bytes for {what}", hint=hint)
    # no grad anywhere -> nothing saved
    with torch.no_grad():
        got = _int(fn(torch.exp, x), "saved_bytes under torch.no_grad()")
    expect_equal(got, 0, what="saved_bytes of exp under torch.no_grad()",
                 hint="without autograd nothing is saved; count only what the pack hook sees")
    return "6 functions (products, views, repeats, parameters ignored) and no_grad, byte-exact"


# ----------------------------------------------------------------------------- exercise 2
def _segment(n=3, width=16, seed=0):
    blocks = rc.mlp_stack(n, width, seed=seed)
    params = [p for b in blocks for p in b.parameters()]
    return blocks, params, (lambda t: rc.run_blocks(blocks, t))


def _grads(params, x):
    out = [p.grad.clone() if p.grad is not None else None for p in params]
    return out + ([x.grad.clone() if x.grad is not None else None] if x.requires_grad else [])


def _zero(blocks, x=None):
    for b in blocks:
        b.zero_grad(set_to_none=True)
        b.calls = 0
    if x is not None:
        x.grad = None


def _compare_grads(got, want, what, hint):
    """allclose, and report whether all are bitwise equal."""
    bitwise = True
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            continue
        if g is None:
            fail(f"{what}: gradient {i}", "a gradient", "None",
                 hint + "; return a gradient for every input that needs one")
        expect_close(g, w, rtol=1e-5, atol=1e-6, what=f"{what}: gradient {i}", hint=hint)
        bitwise &= torch.equal(g, w)
    return bitwise


@exercise
def checkpoint_fn(fn):
    """``fn(run, x, params)``: run(x) that saves only x and recomputes run in backward."""
    bitwise_all = True
    for requires_grad in (True, False):
        blocks, params, run = _segment()
        x = _randn(8, 16, seed=3, requires_grad=requires_grad)
        g = _randn(8, 16, seed=4)
        what = f"checkpoint_fn(run, x, params) with x.requires_grad={requires_grad}"
        # reference: the plain segment
        ref = run(x)
        ref.backward(g)
        want = _grads(params, x)
        _zero(blocks, x)
        # the learner's
        with rc.SavedTensorMeter(ignore=params) as meter:
            y = fn(run, x, params)
            expect_type(y, torch.Tensor, what)
            stored = meter.live
            calls_forward = [b.calls for b in blocks]
            expect_shape(y, ref.shape, what)
            expect_dtype(y, ref.dtype, what)
            if not torch.equal(y, ref.detach()):
                expect_close(y, ref.detach(), rtol=1e-6, atol=1e-7, what=f"{what}: output",
                             hint="the forward must compute run(x) unchanged")
            if not y.requires_grad:
                fail(f"{what}: output", "a tensor that requires grad (part of the graph)",
                     "a tensor with requires_grad=False",
                     "return the output of your torch.autograd.Function's apply(...), and pass "
                     "the parameters to apply so autograd knows the output depends on them")
            y.backward(g)
        expect_equal(calls_forward, [1] * len(blocks), what=f"{what}: block calls in forward",
                     hint="run the segment exactly once in forward")
        expect_equal([b.calls for b in blocks], [2] * len(blocks),
                     what=f"{what}: block calls after backward",
                     hint="the backward must recompute the segment once (a second forward), "
                          "with grad enabled, and differentiate that")
        expect_equal(stored, x.numel() * x.element_size(),
                     what=f"{what}: bytes saved for backward",
                     hint="save only the input x (ctx.save_for_backward(x)); run the segment "
                          "in forward without recording a graph (the Function's forward "
                          "already runs with grad disabled)")
        bitwise_all &= _compare_grads(_grads(params, x), want, what,
                                      "recompute y = run(x) from a detached copy of x that "
                                      "requires grad, then torch.autograd.grad(y, (x, *params), grad_out)")
    # against torch.utils.checkpoint: same saved bytes, same gradients
    blocks, params, run = _segment(seed=5)
    x = _randn(8, 16, seed=6, requires_grad=True)
    oracle = rc.measure_step(lambda t: torch.utils.checkpoint.checkpoint(run, t, use_reentrant=False),
                             x, ignore=params)
    want = _grads(params, x)
    _zero(blocks, x)
    mine = rc.measure_step(lambda t: fn(run, t, params), x, ignore=params)
    expect_equal(mine.stored, oracle.stored,
                 what="bytes saved, against torch.utils.checkpoint(use_reentrant=False)",
                 hint="both should keep exactly the segment's input")
    bitwise_all &= _compare_grads(_grads(params, x), want,
                                  "gradients against torch.utils.checkpoint", "")
    return ("saves only x, recomputes once, gradients equal to the plain segment and to "
            f"torch.utils.checkpoint ({'bitwise' if bitwise_all else 'within 1e-5'})")


# ----------------------------------------------------------------------------- exercise 3
def _order_log(blocks):
    log, handles = [], []
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(lambda mod, args, i=i: log.append(i)))
    return log, handles


@exercise
def checkpoint_segments(fn):
    """``fn(blocks, x, k)``: k segments, sizes as even as possible and longer first, each
    checkpointed."""
    bitwise_all = True
    for n, k in ((5, 1), (5, 2), (5, 5), (7, 3), (6, 4)):
        blocks = rc.mlp_stack(n, 16, seed=n + k)
        params = list(blocks.parameters())
        x = _randn(8, 16, seed=7, requires_grad=True)
        g = _randn(8, 16, seed=8)
        what = f"checkpoint_segments(blocks, x, k={k}) with n={n} blocks"
        ref = rc.run_blocks(blocks, x)
        ref.backward(g)
        want = _grads(params, x)
        _zero(blocks, x)
        oracle = rc.measure_step(lambda t: rc.checkpoint_segments(blocks, t, k), x, ignore=params,
                                 grad=g)
        _zero(blocks, x)
        log, handles = _order_log(blocks)
        try:
            with rc.SavedTensorMeter(ignore=params) as meter:
                y = fn(blocks, x, k)
                expect_type(y, torch.Tensor, what)
                stored = meter.live
                expect_shape(y, ref.shape, what)
                expect_close(y, ref.detach(), rtol=1e-6, atol=1e-7, what=f"{what}: output",
                             hint="run every block once, in order")
                y.backward(g)
        finally:
            for h in handles:
                h.remove()
        sizes = rc.segment_sizes(n, k)
        starts = [sum(sizes[:j]) for j in range(k)]
        expected = list(range(n))
        for j in reversed(range(k)):
            expected += list(range(starts[j], starts[j] + sizes[j]))
        expect_equal(log, expected, what=f"{what}: the order blocks ran in (forward, then "
                                         "recomputation during backward)",
                     hint=f"segment sizes {sizes} (as even as possible, longer first); each "
                          "segment, the last included, is recomputed once when backward reaches "
                          "it, so recomputation visits segments last to first")
        expect_equal(stored, oracle.stored,
                     what=f"{what}: bytes saved for backward (oracle: torch.utils.checkpoint "
                          "on each segment)",
                     hint="each segment keeps only its input: k inputs in all")
        bitwise_all &= _compare_grads(_grads(params, x), want, what,
                                      "gradients must equal those of the plain stack")
    for bad in (0, 6):
        blocks = rc.mlp_stack(5, 16)
        try:
            fn(blocks, _randn(2, 16), bad)
        except ValueError:
            continue
        fail(f"checkpoint_segments(blocks of 5, x, k={bad})",
             "ValueError (k must be between 1 and the number of blocks)", "no error",
             "check 1 <= k <= len(blocks) and raise ValueError with a clear message")
    return ("5 (n, k) pairs: segment order, k saved inputs as torch.utils.checkpoint, "
            f"gradients {'bitwise equal' if bitwise_all else 'within 1e-5'}; bad k rejected")


# ----------------------------------------------------------------------------- exercise 4
@exercise
def checkpoint_cost(fn):
    """``fn(n, k, u, a)`` -> (stored, peak, recomputed) for k checkpointed segments."""
    for n, k, u, a in ((1, 1, 10, 10), (8, 1, 100, 500), (8, 2, 100, 500), (8, 3, 100, 500),
                       (8, 8, 100, 500), (16, 5, 8192, 40960), (96, 10, 3, 171),
                       (10, 4, 7, 7), (64, 9, 1, 1)):
        got = fn(n, k, u, a)
        what = f"checkpoint_cost(n={n}, k={k}, u={u}, a={a})"
        expect_type(got, tuple, what, hint="return a tuple (stored, peak, recomputed)")
        if len(got) != 3:
            fail(what, "a tuple of three ints (stored, peak, recomputed)",
                 f"a tuple of length {len(got)}", "return (stored, peak, recomputed)")
        want = rc.segment_memory(rc.segment_sizes(n, k), u, a)
        names = ("stored", "peak", "recomputed")
        hints = ("between forward and backward each of the k segments holds its input u",
                 "while segment j (1-based, sizes longer first) is recomputed, the inputs of "
                 "segments 1..j-1 are still held and segment j holds m_j blocks of a bytes: "
                 "peak = max over j of (j-1)u + m_j a",
                 "every block's forward runs once more, in its segment's recomputation")
        for part, expected, name, hint in zip(got, (want.stored, want.peak, want.recomputed),
                                              names, hints):
            expect_equal(_int(part, f"{what}: {name}"), expected, what=f"{what}: {name}", hint=hint)
    return "9 cases, exact, including uneven segments and k = 1 and k = n"


# ----------------------------------------------------------------------------- exercise 5
def _sdpa_case(b, a, s, d, causal, dtype, seed):
    q = _randn(b, a, s, d, seed=seed, dtype=dtype, requires_grad=True)
    k = _randn(b, a, s, d, seed=seed + 1, dtype=dtype, requires_grad=True)
    v = _randn(b, a, s, d, seed=seed + 2, dtype=dtype, requires_grad=True)
    g = _randn(b, a, s, d, seed=seed + 3, dtype=dtype)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    want = torch.autograd.grad(ref, (q, k, v), g)
    return q, k, v, g, ref.detach(), want


@exercise
def attention_core_recompute(fn):
    """``fn(q, k, v, causal=True)``: softmax(q k^T / sqrt(d)) v saving only q, k, v."""
    for (b, a, s, d), causal, dtype in (((2, 3, 16, 8), True, torch.float32),
                                        ((2, 3, 16, 8), False, torch.float32),
                                        ((1, 2, 33, 4), True, torch.float64),
                                        ((2, 2, 64, 8), True, torch.float32)):
        q, k, v, g, ref, want = _sdpa_case(b, a, s, d, causal, dtype, seed=s)
        what = f"attention_core_recompute(q, k, v, causal={causal}) for shape {(b, a, s, d)}, {dtype}"
        with rc.SavedTensorMeter() as meter:
            out = fn(q, k, v, causal=causal)
            stored = meter.live
        expect_type(out, torch.Tensor, what)
        expect_shape(out, ref.shape, what)
        expect_dtype(out, dtype, what)
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
        expect_close(out, ref, **tol, what=f"{what}: output (oracle: scaled_dot_product_attention)",
                     hint="scale the scores by 1/sqrt(head_dim); with causal=True, query i sees "
                          "keys 0..i only (mask the upper triangle with -inf before softmax)")
        qkv_bytes = 3 * q.numel() * q.element_size()
        expect_equal(stored, qkv_bytes, what=f"{what}: bytes saved for backward",
                     hint="save q, k and v only (3 x batch x heads x seq x head_dim elements); "
                          "the seq x seq scores and probabilities must be recomputed in backward, "
                          "not saved")
        got = torch.autograd.grad(out, (q, k, v), g)
        for name, gg, ww in zip("qkv", got, want):
            expect_close(gg, ww, **tol, what=f"{what}: gradient of {name}",
                         hint="in backward, recompute the core from q, k, v with grad enabled "
                              "and differentiate it with torch.autograd.grad")
    # plugged into a transformer layer, with q, k, v views of one fused projection
    torch.manual_seed(0)
    plain = rc.TransformerLayer(32, 4)
    mine = rc.TransformerLayer(32, 4, core=fn)
    mine.load_state_dict(plain.state_dict())
    x = _randn(2, 24, 32, seed=9, requires_grad=True)
    g = _randn(2, 24, 32, seed=10)
    ref = rc.measure_step(plain, x, ignore=plain, grad=g)
    want = [p.grad.clone() for p in plain.parameters()] + [x.grad.clone()]
    x.grad = None
    got_m = rc.measure_step(mine, x, ignore=mine, grad=g)
    got = [p.grad.clone() for p in mine.parameters()] + [x.grad.clone()]
    for i, (gg, ww) in enumerate(zip(got, want)):
        expect_close(gg, ww, rtol=1e-4, atol=1e-5,
                     what=f"TransformerLayer(core=your function): gradient {i}",
                     hint="the core receives non-contiguous views (b, heads, s, d) of one fused "
                          "projection; keep them as they are")
    probs = 4 * 2 * 24 * 24 * 4        # heads x batch x s x s fp32 probabilities
    if not got_m.stored <= ref.stored - probs:
        fail("TransformerLayer(core=your function): bytes saved",
             f"at most {ref.stored - probs} (the plain layer's {ref.stored} minus the "
             f"{probs}-byte probabilities)", f"{got_m.stored}",
             "the probabilities must not be saved")
    return ("matches scaled_dot_product_attention (causal and not, fp32 and fp64), saves only "
            f"q, k, v; in a layer {ref.stored:,} -> {got_m.stored:,} bytes saved")
