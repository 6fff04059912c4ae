"""Checkers for lab 03, the Roofline model.

The oracle for every count is ``utils.roofline``, whose formulas the unit tests derive
by hand; the oracle for measurements is ``utils.bench`` on the same machine.
"""
from __future__ import annotations

import numpy as np

from .. import bench, models
from .. import roofline as rl
from . import exercise, expect_flops_bytes as _pair, expect_close, expect_equal, expect_type, fail


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

    Measurements on a shared machine are noisy, so the learner's numbers and the
    reference are taken back to back, up to three times; one agreeing pair passes.
    """
    for attempt in range(3):
        peak, bw = _pair(fn(), "measure_roof()")
        bench.clear_cache()
        ref_peak, ref_bw = bench.peak_flops("fp32"), bench.peak_bandwidth()
        problems = [
            (what, value, ref, hint)
            for value, ref, what, hint in [
                (peak, ref_peak, "peak FLOP/s", "time a large square fp32 matmul; FLOPs = 2 n^3"),
                (bw, ref_bw, "bandwidth", "take the best of a STREAM triad a = b + s*c (12 bytes "
                                          "per fp32 element) and a read-only sum (4 bytes per "
                                          "element), on arrays far larger than the last-level "
                                          "cache")]
            if not 0.33 * ref <= value <= 1.5 * ref]
        if not problems:
            return (f"peak {peak / 1e9:.1f} GFLOP/s ({peak / ref_peak:.0%} of utils.bench), "
                    f"bandwidth {bw / 1e9:.1f} GB/s ({bw / ref_bw:.0%})")
    what, value, ref, hint = problems[0]
    fail(f"measure_roof(): {what} is implausible for this machine",
         f"within 0.33x–1.5x of utils.bench's {ref:.3g} on this machine",
         f"{value:.3g} ({value / ref:.2f}x), in 3 attempts", hint)


@exercise
def under_the_roof(results, peak, bandwidth):
    """``results``: {kernel: (intensity, achieved FLOP/s)}; each within 10% of the roof.

    A point above the learner's roof is held once more to a roof measured afresh by
    ``utils.bench``: on a shared machine the learner's roof may have been measured in a
    busy moment. A miscount (a factor of 2 or 3 in FLOPs or bytes) fails either way.
    """
    expect_type(results, dict, "results", hint="a dict {name: (intensity, achieved)}")
    if len(results) < 5:
        fail("results", "at least 5 measured kernels", f"{len(results)}",
             "measure add, sum, softmax, layernorm, GEMV and two GEMMs")
    pairs = {name: _pair(tuple(pair), f"results[{name!r}]") for name, pair in results.items()}

    def over(p, b):
        return {name: (a, min(p, i * b)) for name, (i, a) in pairs.items()
                if a > 1.10 * min(p, i * b)}

    above = over(peak, bandwidth)
    if above:
        bench.clear_cache()
        above = over(max(peak, bench.peak_flops("fp32")), max(bandwidth, bench.peak_bandwidth()))
    for name, (achieved, roof) in above.items():
        fail(f"kernel {name!r} is more than 10% above the roof",
             f"at most 10% above its roof {roof:.3g} FLOP/s",
             f"{achieved:.3g} FLOP/s ({achieved / roof:.0%} of the roof)",
             "a point above the roof means a miscount: too few FLOPs claimed? bytes "
             "overcounted? or the working set fits in cache (use bigger arrays)")
    ratios = [a / min(peak, i * bandwidth) for i, a in pairs.values()]
    return f"{len(results)} kernels at {min(ratios):.0%}–{max(ratios):.0%} of their roof"
