"""Checkers for lab 16, inference vs training hardware.

The oracles: :mod:`utils.inference_cost` for the counts (its convention is the chapter's,
and its unit tests hold it to ``ModelSpec.flops_per_token``, ``roofline.attention_decode``
and hand-computed values); the tiny model's own ``prefill`` and ``decode_step``, timed by
the checker on this machine, for the measurement; and the defining property of the knee
(intensity at the ridge) rather than a number that rounding could move by one.

Counting convention (the same in the lab notebook): one step runs ``batch`` sequences,
each with ``cached`` tokens in its KV cache and ``new`` tokens to process; N is
``model.matmul_params()``, L layers, H query heads of width d_h, kv = ``model.kv_dim``,
s bytes per element.

    FLOPs = batch * (2 N new + 4 L H d_h (new * cached + new (new + 1) / 2))
    bytes = s * (N + batch * L * (2 (cached + new) kv + 2 new H d_h))

Prefill of T tokens: new = T, cached = 0. Decode at context T: new = 1, cached = T - 1.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import bench, models
from .. import inference_cost as ic
from .. import tiny
from . import exercise, expect_close, expect_type, fail, measurement_warning
from . import expect_flops_bytes as _pair


def _tiny_spec():
    cfg = tiny.TinyConfig(vocab=44, n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, d_ff=384,
                          max_seq_len=256)     # the shipped tiny-target's shape
    return ic.as_spec(cfg)


def _variants(m, batch, new, cached, s):
    """Common wrong answers, each with the hint that names the mistake: (flops, bytes, hint)."""
    N, P = m.matmul_params(), m.param_count()
    L, H, dh, kv = m.n_layers, m.n_heads, m.head_dim, m.kv_dim
    keys = new * cached + new * (new + 1) // 2
    right_f = batch * (2 * N * new + 4 * L * H * dh * keys)
    right_b = s * (N + batch * L * (2 * (cached + new) * kv + 2 * new * H * dh))
    return [
        (batch * (2 * N * new + 4 * L * H * dh * new * (cached + new)), right_b,
         "each new token attends only to the keys before it and itself: token i of the new "
         "ones sees cached + i keys, so the attention sum is new*cached + new(new+1)/2, not "
         "new*(cached + new)"),
        (batch * 2 * N * new, right_b,
         "add attention: 4 L H d_h FLOPs for every key a new token attends to"),
        (batch * (2 * P * new + 4 * L * H * dh * keys), s * (P + batch * L * (2 * (cached + new) * kv
                                                               + 2 * new * H * dh)),
         "count the weights that take part in matmuls, model.matmul_params(), not "
         "param_count(): embedding rows and norm weights are not matmuls"),
        (right_f, s * (batch * N + batch * L * (2 * (cached + new) * kv + 2 * new * H * dh)),
         "the weights are read once per step and shared by the whole batch: N s, not batch N s"),
        (right_f, s * (N + batch * L * (2 * (cached + new) * H * dh + 2 * new * H * dh)),
         "the K and V caches have model.kv_dim = n_kv_heads * head_dim columns, fewer than "
         "the n_heads * head_dim of Q under grouped-query attention"),
        (right_f, s * N,
         "each sequence also moves its attention traffic: K and V of all cached + new "
         "positions, Q and O of the new tokens, in every layer"),
    ]


def _compare(got, m, batch, new, cached, s, what, generic):
    flops, nbytes = _pair(got, what)
    ref = ic.step_cost(m, batch, new, cached, s)
    if round(flops) == ref.flops and round(nbytes) == ref.bytes:
        return
    hint = generic
    for f, b, h in _variants(m, batch, new, cached, s):
        if round(flops) == f and round(nbytes) == b:
            hint = h
            break
    part = "FLOPs" if round(flops) != ref.flops else "bytes"
    fail(f"{what}: the {part} are wrong",
         f"flops = {ref.flops:,}, bytes = {int(ref.bytes):,}",
         f"flops = {flops:,.0f}, bytes = {nbytes:,.0f}", hint)


def _cases():
    t = _tiny_spec()
    return [("tiny-target", t), ("llama2-7b", models.get("llama2-7b")),
            ("llama3-70b", models.get("llama3-70b")), ("mistral-7b", models.get("mistral-7b"))]


def _expect_value_error(call, what, hint):
    try:
        call()
    except ValueError:
        return
    except Exception as err:  # noqa: BLE001 - the learner's code raised something else
        fail(what, "ValueError", f"{type(err).__name__}: {err}", hint)
    fail(what, "ValueError", "no error", hint)


# ----------------------------------------------------------------------------- exercise 1
@exercise
def prefill_cost(fn):
    """``fn(model, batch, prompt_len, s)`` -> (flops, bytes) of one prefill step."""
    generic = ("FLOPs: batch x (2 N T + 4 L H d_h T(T+1)/2); bytes: s x (N + batch x L x "
               "(2 T kv + 2 T H d_h)), with N = model.matmul_params()")
    shapes = {"tiny-target": [(1, 1, 4), (1, 128, 4), (8, 256, 4)],
              "llama2-7b": [(1, 4096, 2), (3, 17, 2)],
              "llama3-70b": [(4, 2048, 2), (1, 1, 2)],
              "mistral-7b": [(2, 1000, 1)]}
    for name, m in _cases():
        for batch, T, s in shapes[name]:
            _compare(fn(m, batch, T, s), m, batch, T, 0, s,
                     f"prefill_cost({name}, batch={batch}, prompt_len={T}, s={s})", generic)
    m = _tiny_spec()
    _expect_value_error(lambda: fn(m, 1, 0, 4), "prefill_cost(..., prompt_len=0, ...)",
                        "an empty prompt is a mistake: raise ValueError for prompt_len < 1")
    _expect_value_error(lambda: fn(m, 0, 16, 4), "prefill_cost(..., batch=0, ...)",
                        "raise ValueError for batch < 1")
    return "tiny model and three Llama-family models (MHA and GQA), exact; bad sizes rejected"


# ----------------------------------------------------------------------------- exercise 2
@exercise
def decode_cost(fn):
    """``fn(model, batch, context, s)`` -> (flops, bytes) of one decode step."""
    generic = ("one new token per sequence attending to `context` keys (itself included): "
               "FLOPs = batch x model.flops_per_token(context); bytes = s x N + "
               "roofline.attention_decode(model, context, batch, s).bytes")
    shapes = {"tiny-target": [(1, 1, 4), (1, 64, 4), (32, 256, 4)],
              "llama2-7b": [(1, 4096, 2), (64, 512, 2)],
              "llama3-70b": [(256, 8192, 2), (8, 4096, 1)],
              "mistral-7b": [(16, 32768, 2)]}
    for name, m in _cases():
        for batch, T, s in shapes[name]:
            _compare(fn(m, batch, T, s), m, batch, 1, T - 1, s,
                     f"decode_cost({name}, batch={batch}, context={T}, s={s})", generic)
    m = _tiny_spec()
    _expect_value_error(lambda: fn(m, 1, 0, 4), "decode_cost(..., context=0, ...)",
                        "the new token attends at least to itself: raise ValueError for "
                        "context < 1")
    return "tiny model and three Llama-family models, batch 1 to 256, contexts 1 to 32768, exact"


# ----------------------------------------------------------------------------- exercise 3
@exercise
def decode_knee(fn):
    """``fn(model, peak, bandwidth, context, s)`` -> smallest compute-bound batch, or None."""
    cases = [("llama3-70b", models.get("llama3-70b"), 989.5e12, 3.35e12, 512, 2),
             ("llama3-70b", models.get("llama3-70b"), 989.5e12, 4.8e12, 512, 2),
             ("llama3-8b", models.get("llama3-8b"), 989.5e12, 4.8e12, 512, 2),
             ("llama3-70b", models.get("llama3-70b"), 989.5e12, 3.35e12, 4096, 2),
             ("llama2-7b", models.get("llama2-7b"), 121e12, 300e9, 512, 2),
             ("tiny-target", _tiny_spec(), 100e9, 40e9, 32, 4),
             ("tiny-target", _tiny_spec(), 100e9, 40e9, 1, 4),
             ("tiny-target", _tiny_spec(), 1e12, 10e9, 64, 4)]
    found = []
    for name, m, peak, bw, T, s in cases:
        what = f"decode_knee({name}, peak={peak:.4g}, bandwidth={bw:.4g}, context={T}, s={s})"
        got = fn(m, peak, bw, T, s)
        ridge = peak / bw
        ref = ic.decode_knee_batch(m, peak, bw, T, s)
        if ref is None:
            if got is not None:
                fail(what, f"None: the intensity never exceeds "
                           f"{ic.decode_intensity_limit(m, T, s):.1f} FLOP/B, below the ridge "
                           f"{ridge:.1f}", repr(got),
                     "as the batch grows the intensity tends to (FLOPs of one sequence) / "
                     "(KV and attention bytes of one sequence); compare that limit with P/B "
                     "first and return None when it does not exceed the ridge")
            found.append("never")
            continue
        if got is None:
            fail(what, f"batch {ref}", "None",
                 f"the limit {ic.decode_intensity_limit(m, T, s):.1f} FLOP/B is above the ridge "
                 f"{ridge:.1f}, so some batch reaches it")
        expect_type(got, int, what, "return the batch as a plain int (or None)")
        at = ic.decode_cost(m, got, T, s).intensity
        below = ic.decode_cost(m, got - 1, T, s).intensity if got > 1 else 0.0
        if not (at >= ridge and below < ridge):
            fail(what, f"batch {ref} (intensity {ic.decode_cost(m, ref, T, s).intensity:.2f} "
                       f">= ridge {ridge:.2f} > intensity at {ref - 1})",
                 f"batch {got}: intensity {at:.2f} there, {below:.2f} one below",
                 "the smallest batch whose decode intensity (your decode_cost) is >= P/B; "
                 "check the ridge is peak / bandwidth and that you return the first batch "
                 "at or above it, not the last below")
        found.append(str(got))
    return f"knees {', '.join(found)} (GPU datasheets and CPU-like roofs)"


# ----------------------------------------------------------------------------- exercise 4
def _reference_time(model, phase, batch, context):
    cfg = model.config
    if phase == "prefill":
        cache = tiny.ContiguousKVCache(cfg, batch_size=batch, max_len=context)
        tokens = torch.zeros(batch, context, dtype=torch.long)

        def run():
            cache.truncate(0)
            model.prefill(tokens, cache)
    else:
        cache = tiny.ContiguousKVCache(cfg, batch_size=batch, max_len=context)
        cache.advance(context - 1)
        tokens = torch.zeros(batch, dtype=torch.long)

        def run():
            cache.truncate(context - 1)
            model.decode_step(tokens, cache)
    return bench.time_fn(run).median


@exercise
def time_step(fn):
    """``fn(model, phase, batch, context)`` -> median seconds of one step, measured.

    Compared with the checker's own timing of the same step, back to back, up to five
    times per case; the machine is shared and noise only slows a run down, so the best
    of the learner's runs must be within 3x of the best of the checker's.
    """
    model = tiny.load("tiny-target")
    cases = [("decode", 1, 64), ("decode", 64, 128), ("prefill", 1, 128), ("prefill", 8, 64)]
    report = []
    for phase, batch, context in cases:
        what = f"time_step(tiny-target, {phase!r}, batch={batch}, context={context})"
        best_got = best_ref = math.inf
        for attempt in range(5):           # noise only slows a run: compare the best of each
            got = fn(model, phase, batch, context)
            expect_type(got, float, what, "return seconds as a float (Timing.median)")
            if not got > 0:
                fail(what, "a positive time in seconds", repr(got), "return Timing.median")
            best_got = min(best_got, got)
            best_ref = min(best_ref, _reference_time(model, phase, batch, context))
            if best_ref / 3 <= best_got <= 3 * best_ref:
                break
        else:
            ratio = best_got / best_ref
            if ratio > 30 or ratio < 1 / 30:
                # interleaved best-of-5 runs: load cannot make one side 30x slower
                hint = ("return seconds, not milliseconds" if ratio > 100 else
                        "decode: a cache of `batch` sequences holding context - 1 tokens, reset "
                        "(truncate) before every step so the context stays fixed; prefill: "
                        "`batch` prompts of `context` tokens into empty caches. Time with "
                        "bench.time_fn and return .median")
                fail(f"{what} times another step than the checker's",
                     f"within 30x of {best_ref * 1e3:.3f} ms (the checker's best of 5, "
                     "interleaved with yours)", f"{best_got * 1e3:.3f} ms (your best of 5)", hint)
            measurement_warning(f"{what} disagrees with the checker's measurement",
                                f"within 3x of {best_ref * 1e3:.3f} ms (the checker's best of 5)",
                                f"{best_got * 1e3:.3f} ms (your best of 5, {ratio:.1f}x)",
                                "a busy machine makes runs noisy; or the step timed is not quite "
                                "the one asked for (cache reset before each step? batch and "
                                "context as given?)")
        report.append(f"{phase} b={batch}: {best_got * 1e3:.2f} ms")
    _expect_value_error(lambda: fn(model, "train", 1, 8), "time_step(model, 'train', ...)",
                        "raise ValueError for a phase other than 'prefill' or 'decode'")
    return "; ".join(report)


# ----------------------------------------------------------------------------- exercise 5
def _knee(batches, y):
    b, y = np.asarray(batches, float), np.asarray(y, float)
    return float(y.max() / (y / b).max())


@exercise
def find_knee(fn):
    """``fn(batches, flops_per_s)`` -> max(flops) / max(flops / batch), the roofline knee."""
    g = np.random.default_rng(16)
    b = [1, 2, 4, 8, 16, 32, 64, 128]
    cases = []
    for k, peak in ((1e9, 3e10), (2e9, 2e9 * 5), (5e8, 1e12)):    # knees 30, 5, beyond the sweep
        exact = [min(k * x, peak) for x in b]
        cases.append((f"y = min({k:g} b, {peak:g})", b, exact))
        noisy = [v * f for v, f in zip(exact, g.uniform(0.6, 1.0, len(b)))]
        cases.append((f"y = min({k:g} b, {peak:g}) with slowdowns of up to 40%", b, noisy))
    cases.append(("three points", [1, 3, 9], [2.0, 5.0, 6.0]))
    for label, xs, ys in cases:
        got = fn(list(xs), list(ys))
        expect_type(got, float, f"find_knee for {label}", "return the knee as a float")
        expect_close(float(got), _knee(xs, ys), rtol=1e-9, atol=0.0, what=f"find_knee for {label}",
                     hint="slope = the largest flops/batch over the sweep (the memory-bound line "
                          "through the origin); plateau = the largest flops; knee = plateau / "
                          "slope. Using the best, not the first, point protects against a slow "
                          "first measurement")
    for label, xs, ys, hint in [
            ("lengths 3 and 2", [1, 2, 4], [1.0, 2.0], "raise ValueError when the lengths differ"),
            ("one point", [1], [1.0], "a knee needs at least two points"),
            ("a zero throughput", [1, 2], [0.0, 1.0], "throughputs must be positive"),
            ("batches not increasing", [2, 1], [1.0, 1.0], "batches must increase")]:
        _expect_value_error(lambda: fn(xs, ys), f"find_knee with {label}", hint)
    return "exact and noisy roofline curves, a knee past the sweep, and bad input rejected"


# ----------------------------------------------------------------------------- measurement
@exercise
def decode_sweep(batches, flops_per_s, predicted, measured):
    """A measured decode sweep has the roofline's shape and a knee near the prediction.

    Robust to a shared machine: throughput must rise at least 3x from the smallest batch
    to the best, the last doubling of the batch must gain less than 1.5x (the curve has
    flattened), and the measured knee must be within 4x of the predicted one.
    """
    b = [int(x) for x in batches]
    y = [float(v) for v in flops_per_s]
    if len(b) < 4 or len(b) != len(y):
        fail("the sweep", "at least 4 batches, one throughput each",
             f"{len(b)} batches, {len(y)} throughputs", "sweep batch 1, 2, 4, ... 128")
    if predicted is None:
        fail("the predicted knee", "a batch", "None",
             "on a CPU the ridge is a few FLOP/byte; use a short context so the weights dominate")
    # The shape of a measured curve depends on the machine and its load: warnings.
    if max(y) < 3 * y[0]:
        measurement_warning("throughput did not rise with the batch",
                            f"the best throughput at least 3x batch {b[0]}'s {y[0]:.3g} FLOP/s",
                            f"best {max(y):.3g} FLOP/s", "is the model bigger than the last-level "
                            "cache, and does the sweep reach batches well past the predicted "
                            "knee? A busy machine flattens the curve too")
    if b[-1] >= 2 * b[-2] and y[-1] > 1.5 * y[-2]:
        measurement_warning("throughput has not flattened at the end of the sweep",
                            f"under 1.5x gain from batch {b[-2]} to {b[-1]}",
                            f"{y[-1] / y[-2]:.2f}x", "extend the sweep to larger batches; a "
                            "slow first measurement at a small batch can do this too")
    if not predicted / 4 <= measured <= 4 * predicted:
        measurement_warning("the measured knee is far from the prediction",
                            f"within 4x of the predicted batch {predicted}", f"{measured:.1f}",
                            "predict with this machine's fp32 peak and bandwidth (s = 4) at the "
                            "sweep's context; measure with the best of several interleaved "
                            "repetitions, when the machine is quiet")
    return (f"throughput x{max(y) / y[0]:.1f} from batch {b[0]} to the best; knee measured "
            f"{measured:.1f} vs predicted {predicted}")
