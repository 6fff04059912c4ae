"""Checkers for lab 03, the Roofline model.

The oracle for every count is ``utils.roofline``, whose formulas the unit tests derive
by hand; the oracle for measurements is ``utils.bench`` on the same machine.
"""
from __future__ import annotations

import numpy as np

from .. import bench, models
from .. import roofline as rl
from . import exercise, expect_close, expect_equal, expect_type, fail, measurement_warning
from . import expect_flops_bytes as _pair


def _compare(got, cost, what, hint):
    flops, nbytes = _pair(got, what)
    expect_equal(int(round(flops)), int(cost.flops), what=f"{what}: FLOPs", hint=hint)
    expect_equal(int(round(nbytes)), int(cost.bytes), what=f"{what}: bytes", hint=hint)


@exercise
def vector_kernel_cost(fn):
    """``fn(kind, n, s)`` for kind "add" (z = x + y) and "sum" -> (flops, bytes)."""
    for n in (1, 1000, 2**24):
        for s in (4, 2):
            _compare(fn("add", n, s), rl.add(n, s), f"vector_kernel_cost('add', {n}, {s})",
                     "one add per element; read x and y, write z: 3 arrays of n elements")
            _compare(fn("sum", n, s), rl.reduce_sum(n, s), f"vector_kernel_cost('sum', {n}, {s})",
                     "one add per element; read n elements, write one result")
    return "add and sum, 3 sizes, fp32 and bf16"


@exercise
def row_kernel_cost(fn):
    """``fn(kind, rows, cols, s)`` for "softmax" and "layernorm" -> (flops, bytes)."""
    for rows, cols in ((1, 1), (8, 100), (4096, 4096)):
        for s in (4, 2):
            _compare(fn("softmax", rows, cols, s), rl.softmax(rows, cols, s),
                     f"row_kernel_cost('softmax', {rows}, {cols}, {s})",
                     "5 per element (max, subtract, exp, add, divide); read x once, write y once")
            _compare(fn("layernorm", rows, cols, s), rl.layer_norm(rows, cols, s),
                     f"row_kernel_cost('layernorm', {rows}, {cols}, {s})",
                     "8 per element (mean 1, variance 3, normalise 2, affine 2); bytes: x, y, "
                     "and the gamma and beta vectors of length cols")
    return "softmax and layer norm, 3 shapes, fp32 and bf16"


@exercise
def matmul_cost(fn):
    """``fn(m, n, k, s)`` for (m x k) @ (k x n) -> (flops, bytes); GEMV is n = 1."""
    for m, n, k in ((1, 1, 1), (64, 32, 16), (4096, 1, 4096), (1, 4096, 4096),
                    (8192, 8192, 8192), (7, 3, 5)):
        for s in (4, 2, 1):
            _compare(fn(m, n, k, s), rl.gemm(m, n, k, s), f"matmul_cost({m}, {n}, {k}, {s})",
                     "2 FLOPs (multiply and add) for each of m·n·k products; bytes: A (m·k), "
                     "B (k·n) and C (m·n) once each")
    return "6 shapes including GEMV (n = 1), 3 precisions"


@exercise
def attention_decode_cost(fn):
    """``fn(model, context, batch, s)`` -> (flops, bytes) of decode attention."""
    for name in ("llama2-7b", "llama2-70b", "mistral-7b"):
        m = models.get(name)
        for context, batch in ((1, 1), (4096, 1), (1000, 8)):
            _compare(fn(m, context, batch, 2), rl.attention_decode(m, context, batch, 2),
                     f"attention_decode_cost({name}, context={context}, batch={batch}, s=2)",
                     "per layer and sequence: FLOPs 4·context·n_heads·head_dim; elements: "
                     "K and V caches (2·context·n_kv_heads·head_dim) plus q read and output "
                     "written (n_heads·head_dim each)")
    return "MHA and GQA models, 3 context/batch pairs"


@exercise
def attainable(fn):
    """``fn(intensity, peak, bandwidth)``: min(peak, I x B), scalars and arrays."""
    peak, bw = 1e12, 1e11
    for i in (0.0, 0.5, 10.0, 1e4):
        got = fn(i, peak, bw)
        expect_close(float(got), min(peak, i * bw), rtol=1e-12, atol=0.0,
                     what=f"attainable({i}, {peak:g}, {bw:g})",
                     hint="below the ridge the memory roof I·B binds, above it the peak")
    arr = np.array([0.1, 1.0, 10.0, 100.0])
    got = fn(arr, peak, bw)
    expect_close(np.asarray(got, dtype=float), np.minimum(peak, arr * bw), rtol=1e-12, atol=0.0,
                 what="attainable(array, ...)", hint="use np.minimum so arrays work")
    try:
        fn(-1.0, peak, bw)
    except ValueError:
        pass
    else:
        fail("attainable(-1.0, ...)", "ValueError for a negative intensity", "no error",
             "raise ValueError('intensity must be >= 0') on bad input")
    return "scalars, an array, and a ValueError on negative intensity"


@exercise
def measure_roof(fn):
    """``fn()`` -> (peak FLOP/s, bandwidth B/s) measured by the learner's own code.

    Load only ever slows a measurement down, so the two kinds of disagreement with
    ``utils.bench`` (measured back to back) mean different things. Faster than 2x the
    reference is a miscount (FLOPs or bytes overcounted, or a working set that fits in
    cache): it fails. Slower than a third of it may be a busy machine, or an undercount:
    it is a measurement warning, after one more try.
    """
    for attempt in range(2):
        peak, bw = _pair(fn(), "measure_roof()")
        bench.clear_cache()
        ref_peak, ref_bw = bench.peak_flops("fp32"), bench.peak_bandwidth()
        # the reference is a measurement too: taken while other processes held the cores it
        # can be a third of the quiet machine's, so it is measured again (best of up to four)
        # before a learner's figure above 2x of it is called a miscount
        for _ in range(3):
            if peak <= 2.0 * ref_peak and bw <= 2.0 * ref_bw:
                break
            bench.clear_cache()
            ref_peak = max(ref_peak, bench.peak_flops("fp32"))
            ref_bw = max(ref_bw, bench.peak_bandwidth())
        checks = [(peak, ref_peak, "peak FLOP/s", "time a large square fp32 matmul; FLOPs = 2 n^3"),
                  (bw, ref_bw, "bandwidth", "take the best of a STREAM triad a = b + s*c (12 bytes "
                                            "per fp32 element) and a read-only sum (4 bytes per "
                                            "element), on arrays far larger than the last-level "
                                            "cache")]
        for value, ref, what, hint in checks:
            if value > 2.0 * ref:
                fail(f"measure_roof(): {what} is faster than this machine can go",
                     f"at most 2x utils.bench's {ref:.3g}, measured just now (load only slows "
                     "a measurement down)", f"{value:.3g} ({value / ref:.2f}x)",
                     "a miscount: too many FLOPs or bytes claimed, or arrays that fit in "
                     "cache. " + hint)
        slow = [(what, value, ref, hint) for value, ref, what, hint in checks
                if value < 0.33 * ref]
        if not slow:
            break
    for what, value, ref, hint in slow:
        measurement_warning(f"measure_roof(): {what} is far below utils.bench's",
                            f"about {ref:.3g} (utils.bench, measured just now)",
                            f"{value:.3g} ({value / ref:.2f}x), in 2 attempts",
                            "another program busy on this machine, or an undercount: " + hint)
    return (f"peak {peak / 1e9:.1f} GFLOP/s ({peak / ref_peak:.0%} of utils.bench), "
            f"bandwidth {bw / 1e9:.1f} GB/s ({bw / ref_bw:.0%})")


@exercise
def under_the_roof(results, peak, bandwidth):
    """``results``: {kernel: (intensity, achieved FLOP/s)}; each at or under its roof.

    The roof is itself a measurement. A point above the learner's roof is held to the
    best roof seen (the learner's, and ``utils.bench``'s measured afresh): more than 2x
    above it is a miscount (a factor of 2 or 3 in FLOPs or bytes) and fails; 10%–2x above
    it is a measurement warning (the roof measured in a busy moment, turbo, caches).
    """
    expect_type(results, dict, "results", hint="a dict {name: (intensity, achieved)}")
    if len(results) < 5:
        fail("results", "at least 5 measured kernels", f"{len(results)}",
             "measure add, sum, softmax, layernorm, GEMV and two GEMMs")
    pairs = {name: _pair(tuple(pair), f"results[{name!r}]") for name, pair in results.items()}

    def over(p, b, factor):
        return {name: (a, min(p, i * b)) for name, (i, a) in pairs.items()
                if a > factor * min(p, i * b)}

    # a point above the roof first raises the roof: measured afresh, best of up to four
    # tries while a point stays more than 2x above it (a roof measured while other
    # processes held the cores can be a third of the quiet machine's)
    for attempt in range(4):
        if not over(peak, bandwidth, 1.10 if attempt == 0 else 2.0):
            break
        bench.clear_cache()
        peak = max(peak, bench.peak_flops("fp32"))
        bandwidth = max(bandwidth, bench.peak_bandwidth())
    for name, (achieved, roof) in over(peak, bandwidth, 2.0).items():
        fail(f"kernel {name!r} is more than 2x above the roof",
             f"at most its roof {roof:.3g} FLOP/s (the best roof measured on this machine)",
             f"{achieved:.3g} FLOP/s ({achieved / roof:.0%} of the roof)",
             "that far above the roof is a miscount: too many FLOPs claimed? bytes "
             "overcounted (a lower intensity lowers the point's roof)? or the working set "
             "fits in cache (use bigger arrays)")
    for name, (achieved, roof) in over(peak, bandwidth, 1.10).items():
        measurement_warning(f"kernel {name!r} is above the roof",
                            f"at most about its roof {roof:.3g} FLOP/s",
                            f"{achieved:.3g} FLOP/s ({achieved / roof:.0%} of the roof)",
                            "the roof is a measurement too: measured in a busy moment, or a "
                            "kernel that beats STREAM (caches, turbo); rerun both when the "
                            "machine is quiet")
    ratios = [a / min(peak, i * bandwidth) for i, a in pairs.values()]
    return f"{len(results)} kernels at {min(ratios):.0%}–{max(ratios):.0%} of their roof"
