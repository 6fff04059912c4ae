"""Measurement: timing, and this machine's peak FLOP/s and memory bandwidth.

Timing is built on ``torch.utils.benchmark.Timer``: it warms up, runs the statement in
blocks until enough time has passed, synchronises CUDA when the tensors live there,
and reports the median of the blocks. We never time with a hand-made loop.

The machine's peaks are measured once per kernel session and cached, so every cell
that asks for "this machine's roofline" sees the same numbers.

Quick mode (smaller problem sizes, shorter runs) is on when ``COURSE_QUICK=1``; the
test suite sets it. A learner running a notebook by hand gets the full sizes.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.utils.benchmark as tbench

from .validate import check_callable, check_int, check_number

_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16,
           "fp16": torch.float16}


def quick() -> bool:
    """True when the course runs in quick mode (under the test suite)."""
    return os.environ.get("COURSE_QUICK", "0").strip().lower() in ("1", "true", "yes")


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'fp32' -> torch.float32, and so on; a torch dtype passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class Timing:
    """Result of :func:`time_fn`: seconds per call."""

    median: float
    iqr: float
    runs: int

    def __str__(self) -> str:
        return f"{self.median * 1e6:,.1f} µs ± {self.iqr * 1e6:,.1f} µs (IQR, {self.runs} blocks)"


def time_fn(fn: Callable, *args, min_run_time: Optional[float] = None, **kwargs) -> Timing:
    """Median seconds per call of ``fn(*args, **kwargs)``.

    ``torch.utils.benchmark.Timer.blocked_autorange`` picks how many calls to put in a
    block so that timer overhead is negligible, runs blocks for ``min_run_time``
    seconds (0.2 s, 0.05 s in quick mode) after a warm-up call, and synchronises CUDA.
    """
    check_callable("fn", fn)
    if min_run_time is None:
        min_run_time = 0.05 if quick() else 0.2
    check_number("min_run_time", min_run_time, positive=True)    # NaN or inf would never end
    timer = tbench.Timer(stmt="fn(*args, **kwargs)",
                         globals={"fn": fn, "args": args, "kwargs": kwargs},
                         num_threads=torch.get_num_threads())
    fn(*args, **kwargs)  # warm-up: first-call allocation, lazy init, kernel selection
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing(median=m.median, iqr=m.iqr, runs=len(m.times))


# -- this machine's peaks -----------------------------------------------------------
_CACHE: dict = {}


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=quick())


def matmul_flops(n: int, dtype: str = "fp32", device=None) -> float:
    """Measured FLOP/s of an n x n x n matmul (2 n^3 FLOPs) on ``device``."""
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"matrix size n must be a positive integer, got {n!r}")
    dev = _device(device)
    dt = torch_dtype(dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=dev, dtype=dt)
    b = torch.randn(n, n, generator=g).to(device=dev, dtype=dt)
    out = torch.empty(n, n, device=dev, dtype=dt)
    t = time_fn(torch.matmul, a, b, out=out)
    return 2 * n**3 / t.median


def peak_flops(dtype: str = "fp32", device=None) -> float:
    """This machine's peak matmul FLOP/s for ``dtype``, measured once and cached.

    Takes the best of a few square sizes: large enough to be compute-bound, small
    enough to run in seconds on a laptop (up to 2048 on CPU, 8192 on GPU).
    """
    dev = _device(device)
    key = ("flops", str(dev), dtype, quick())
    if key not in _CACHE:
        if dev.type == "cuda":
            sizes = [2048, 4096] if quick() else [4096, 8192]
        else:
            sizes = [512, 1024] if quick() else [512, 1024, 2048]
        best = 0.0
        with _progress(len(sizes), f"peak {dtype} matmul") as bar:
            for n in sizes:
                best = max(best, matmul_flops(n, dtype, dev))
                bar.update()
        _CACHE[key] = best
    return _CACHE[key]


def stream_bandwidth(kind: str = "triad", n_bytes: Optional[int] = None, device=None) -> float:
    """STREAM-style memory bandwidth (B/s) over arrays of ``n_bytes`` each (fp32).

    kind  operation            bytes counted per element (as STREAM counts them)
    copy  b = a                8   (read a, write b)
    triad a = b + s * c        12  (read b and c, write a)
    read  sum(a)               4   (read a; not in STREAM, which always writes)
    Default arrays are 128 MiB (64 MiB quick), larger than any CPU's last-level cache.
    Kernels that mostly read (GEMV, reductions) can beat copy and triad, whose
    writes cost extra on most memory systems; ``read`` is their roof.
    """
    if kind not in ("copy", "triad", "read"):
        raise ValueError(f"kind must be 'copy', 'triad' or 'read', got {kind!r}")
    if n_bytes is None:
        n_bytes = (64 if quick() else 128) * 2**20
    if not isinstance(n_bytes, int) or n_bytes < 4:
        raise ValueError(f"n_bytes must be an integer >= 4, got {n_bytes!r}")
    dev = _device(device)
    n = n_bytes // 4
    a = torch.ones(n, device=dev)
    b = torch.full((n,), 2.0, device=dev)
    c = torch.full((n,), 0.5, device=dev)
    if kind == "copy":
        t = time_fn(b.copy_, a)
        return 8 * n / t.median
    if kind == "read":
        t = time_fn(torch.sum, a)
        return 4 * n / t.median
    t = time_fn(torch.add, b, c, alpha=3.0, out=a)
    return 12 * n / t.median


def peak_bandwidth(device=None) -> float:
    """This machine's main-memory bandwidth (best of copy, triad and read), cached."""
    dev = _device(device)
    key = ("bw", str(dev), quick())
    if key not in _CACHE:
        with _progress(3, "STREAM copy/triad/read") as bar:
            best = 0.0
            for kind in ("copy", "triad", "read"):
                best = max(best, stream_bandwidth(kind, device=dev))
                bar.update()
        _CACHE[key] = best
    return _CACHE[key]


def cache_sweep(sizes: Iterable[int], device=None) -> list[tuple[int, float]]:
    """Copy bandwidth against working-set size: [(bytes in flight, B/s), ...].

    The working set is source plus destination. Small sets live in L1/L2 and copy
    faster than main memory allows; the curve steps down at each cache capacity.
    """
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise TypeError(f"sizes must be an iterable of byte counts, got {type(sizes).__name__}")
    sizes = list(sizes)
    for ws in sizes:
        check_int("sizes (each working-set size)", ws, low=1)
    out = []
    with _progress(len(sizes), "cache sweep") as bar:
        for ws in sizes:
            out.append((ws, stream_bandwidth("copy", n_bytes=max(ws // 2, 4), device=device)))
            bar.update()
    return out


def machine_name() -> str:
    """A short description of this machine's compute device."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def clear_cache() -> None:
    """Forget cached measurements (the next call measures again)."""
    _CACHE.clear()
