"""The roofline model: FLOPs and bytes of common kernels, and where they land.

Counting conventions (chapter 03 explains them; the lab's checkers use them):

* **Bytes** are the *compulsory* traffic to main memory: every input read once and
  every output written once, as if caches were perfect and nothing spilled. Real
  kernels move at least this much, so intensity computed this way is an upper bound.
* **FLOPs** count one per add, multiply, compare, exp or divide on an element; a fused
  multiply-add is two. Per-row scalars (a row's max, its 1/sum) are not counted.

=================  ======================  ===================================
kernel             FLOPs                   bytes (``s`` bytes per element)
=================  ======================  ===================================
add  z = x + y     n                       3 n s
sum  of n          n                       (n + 1) s
softmax  r x c     5 r c (max, sub, exp,   2 r c s
                   add, divide)
layer norm  r x c  8 r c (mean 1, var 3,   (2 r c + 2 c) s   (x, y, gamma, beta)
                   normalise 2, affine 2)
gemv  (m x n) x    2 m n                   (m n + n + m) s
gemm  m x k x n    2 m n k                 (m k + k n + m n) s
=================  ======================  ===================================
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .validate import check_number, resolve_model


@dataclass(frozen=True)
class KernelCost:
    """FLOPs and compulsory bytes of one kernel invocation."""

    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP/byte."""
        return self.flops / self.bytes

    def time_on(self, peak_flops: float, bandwidth: float) -> float:
        """Roofline lower bound on run time: max(compute time, memory time), seconds."""
        return max(self.flops / peak_flops, self.bytes / bandwidth)


def _positive(**sizes) -> None:
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def add(n: int, bytes_per_element: int = 4) -> KernelCost:
    _positive(n=n, bytes_per_element=bytes_per_element)
    return KernelCost(flops=n, bytes=3 * n * bytes_per_element)


def reduce_sum(n: int, bytes_per_element: int = 4) -> KernelCost:
    _positive(n=n, bytes_per_element=bytes_per_element)
    return KernelCost(flops=n, bytes=(n + 1) * bytes_per_element)


def softmax(rows: int, cols: int, bytes_per_element: int = 4) -> KernelCost:
    _positive(rows=rows, cols=cols, bytes_per_element=bytes_per_element)
    return KernelCost(flops=5 * rows * cols, bytes=2 * rows * cols * bytes_per_element)


def layer_norm(rows: int, cols: int, bytes_per_element: int = 4) -> KernelCost:
    _positive(rows=rows, cols=cols, bytes_per_element=bytes_per_element)
    return KernelCost(flops=8 * rows * cols,
                      bytes=(2 * rows * cols + 2 * cols) * bytes_per_element)


def gemv(m: int, n: int, bytes_per_element: int = 4) -> KernelCost:
    _positive(m=m, n=n, bytes_per_element=bytes_per_element)
    return KernelCost(flops=2 * m * n, bytes=(m * n + n + m) * bytes_per_element)


def gemm(m: int, n: int, k: int, bytes_per_element: int = 4) -> KernelCost:
    _positive(m=m, n=n, k=k, bytes_per_element=bytes_per_element)
    return KernelCost(flops=2 * m * n * k,
                      bytes=(m * k + k * n + m * n) * bytes_per_element)


def attention_decode(model, context: int, batch: int = 1, bytes_per_element: int = 2) -> KernelCost:
    """One decode step of attention (all layers) for ``batch`` sequences.

    Each new token's query meets ``context`` cached keys and values in every layer:
    FLOPs 2 x (Q.K^T) + 2 x (P.V) = 4 x context x n_heads x head_dim per layer.
    Bytes: the K and V cache, 2 x context x n_kv_heads x head_dim elements per layer,
    plus the query read and the output written (n_heads x head_dim each).
    Projections (QKV, output) are GEMMs and are counted separately.
    """
    model = resolve_model(model)
    _positive(context=context, batch=batch, bytes_per_element=bytes_per_element)
    L, H, dh, kv = model.n_layers, model.n_heads, model.head_dim, model.kv_dim
    flops = batch * L * 4 * context * H * dh
    elements = batch * L * (2 * context * kv + 2 * H * dh)
    return KernelCost(flops=flops, bytes=elements * bytes_per_element)


def _intensities(intensity) -> np.ndarray:
    if isinstance(intensity, (str, bytes)) or isinstance(intensity, bool):
        raise TypeError(f"intensity must be a number or an array of numbers, got "
                        f"{type(intensity).__name__} {intensity!r}")
    try:
        i = np.asarray(intensity, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"intensity must be a number or an array of numbers, got "
                        f"{type(intensity).__name__}") from None
    if np.asarray(intensity).dtype.kind not in "biuf":
        raise TypeError(f"intensity must hold numbers, got dtype {np.asarray(intensity).dtype}")
    if not np.all(np.isfinite(i)):
        raise ValueError("intensity must be finite (no NaN or inf)")
    if np.any(i < 0):
        raise ValueError("intensity must be >= 0")
    return i


def attainable(intensity, peak_flops: float, bandwidth: float):
    """The roofline, min(peak, intensity x bandwidth); works on arrays."""
    check_number("peak_flops", peak_flops, positive=True)
    check_number("bandwidth", bandwidth, positive=True)
    i = _intensities(intensity)
    out = np.minimum(peak_flops, i * bandwidth)
    return float(out) if out.ndim == 0 else out


def bound(intensity: float, peak_flops: float, bandwidth: float) -> str:
    """'memory' below the ridge point, 'compute' at or above it."""
    check_number("intensity", intensity, nonnegative=True)
    check_number("peak_flops", peak_flops, positive=True)
    check_number("bandwidth", bandwidth, positive=True)
    return "compute" if intensity >= peak_flops / bandwidth else "memory"
