"""Checkers for lab 01, the GPU memory hierarchy.

Oracles: ``torch.matmul`` for the tiled matmul's result and the closed form of its
traffic (each C tile resident, A and B streamed); a brute-force search over every tile
that fits for the best tile, with the tight I/O lower bound printed beside it;
``torch.nn.functional.scaled_dot_product_attention`` for FlashAttention; the HBM access
counts of Dao et al. (2022), Algorithms 0 and 1, computed here from their steps; fake
sysfs trees for the cache sizes; and ``utils.bench.cache_sweep`` for the measured sweep,
whose disagreements are warnings, never failures.
"""
from __future__ import annotations

import math
import numbers
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import bench
from ..tiling import FastMemory
from . import (describe, exercise, expect_close, expect_dtype, expect_equal, expect_raises,
               expect_shape, expect_type, fail, measurement_warning)


def _fast_bytes(tm, tn, tk, s):
    return (tm * tn + tm * tk + tk * tn) * s


def _reads(m, n, k, tm, tn, s):
    return s * (m * k * math.ceil(n / tn) + k * n * math.ceil(m / tm))


# --------------------------------------------------------------------------- exercise 1

@exercise
def tiled_matmul(fn):
    """``fn(A, B, mem, tm, tn, tk) -> C`` through a counted fast memory."""
    cases = [((64, 48, 40), (16, 8, 4), torch.float32), ((50, 30, 21), (16, 16, 8), torch.float64),
             ((33, 17, 9), (8, 4, 9), torch.float32), ((5, 7, 3), (1, 1, 1), torch.float32)]
    g = torch.Generator().manual_seed(0)
    for (m, n, k), (tm, tn, tk), dtype in cases:
        A = torch.randn(m, k, generator=g, dtype=dtype)
        B = torch.randn(k, n, generator=g, dtype=dtype)
        s = A.element_size()
        mem = FastMemory(_fast_bytes(tm, tn, tk, s))
        call = f"tiled_matmul(A {m}x{k}, B {k}x{n}, mem, tm={tm}, tn={tn}, tk={tk}) in {dtype}"
        try:
            C = fn(A, B, mem, tm, tn, tk)
        except MemoryError as err:
            fail(f"{call} overflowed the fast memory", f"at most {mem.capacity} bytes resident "
                 "at any time", str(err), "free each A and B tile after its product is "
                 "accumulated; hold one C tile, one A tile and one B tile at a time")
        expect_type(C, torch.Tensor, f"{call}: the result")
        expect_shape(C, (m, n), f"{call}: the result")
        expect_dtype(C, dtype, f"{call}: the result")
        expect_close(C, A @ B, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-10,
                     what=f"{call}: C", hint="accumulate every k tile into the C tile "
                     "before storing it; take the edge tiles' true sizes")
        want = _reads(m, n, k, tm, tn, s)
        if mem.bytes_read != want:
            fail(f"{call} read the wrong number of bytes from slow memory",
                 f"{want} bytes: A once per column of C tiles ({m}*{k}*ceil({n}/{tn})) plus B "
                 f"once per row of C tiles ({k}*{n}*ceil({m}/{tm})), times {s} bytes",
                 f"{mem.bytes_read} bytes", "load only through mem.load, each A tile and B "
                 "tile once per C tile; make C's tile with mem.alloc (it is not read)")
        expect_equal(mem.bytes_written, m * n * s, f"{call}: bytes written to slow memory",
                     hint="store each C tile once, after the whole k loop")
        if mem.resident != 0:
            fail(f"{call} left buffers in fast memory", "0 bytes resident at the end",
                 f"{mem.resident} bytes", "free every buffer you load or alloc")
    A, B = torch.ones(8, 8), torch.ones(8, 8)
    expect_raises(lambda: fn(A, B, FastMemory(100), 4, 4, 4), ValueError,
            "tiles 4x4x4 of float32 (192 bytes) with a 100-byte fast memory",
            "a ValueError raised before any work, naming the bytes the tiles need",
            "check (tm*tn + tm*tk + tk*tn) * itemsize <= mem.capacity first")
    expect_raises(lambda: fn(A, torch.ones(7, 8), FastMemory(10_000), 2, 2, 2), ValueError,
            "A 8x8 times B 7x8", "a ValueError (inner sizes differ)", "check A.shape[1] == B.shape[0]")
    return "equals torch.matmul; bytes read and written equal the closed form; never overflows"


# --------------------------------------------------------------------------- exercise 2

def _traffic(m, n, k, tm, tn, s):
    return _reads(m, n, k, tm, tn, s) + m * n * s


def _best_traffic(m, n, k, capacity, s):
    best = None
    for tm in range(1, m + 1):
        for tn in range(1, n + 1):
            if _fast_bytes(tm, tn, 1, s) > capacity:
                break
            t = _traffic(m, n, k, tm, tn, s)
            best = t if best is None else min(best, t)
    return best


@exercise
def best_tile(fn):
    """``fn(m, n, k, capacity, itemsize) -> (tm, tn, tk)`` with the least traffic."""
    ratios = []
    for (m, n, k), capacity, s in [((256, 256, 256), 4 * 1224, 4), ((96, 200, 64), 2000, 2),
                                   ((64, 64, 512), 8 * 300, 8), ((10, 10, 10), 12, 4)]:
        call = f"best_tile({m}, {n}, {k}, capacity={capacity}, itemsize={s})"
        got = fn(m, n, k, capacity, s)
        expect_type(got, tuple, call, hint="return a tuple (tm, tn, tk)")
        if len(got) != 3 or any(isinstance(t, bool) or not isinstance(t, numbers.Integral)
                                or t < 1 for t in got):
            fail(f"{call} is not three positive ints", "(tm, tn, tk)", describe(got),
                 "return positive integer tile sizes")
        tm, tn, tk = (int(t) for t in got)
        need = _fast_bytes(tm, tn, tk, s)
        if need > capacity:
            fail(f"{call} does not fit", f"tiles needing at most {capacity} bytes",
                 f"{got}, which need {need} bytes", "(tm*tn + tm*tk + tk*tn) * itemsize <= capacity")
        best = _best_traffic(m, n, k, capacity, s)
        mine = _traffic(m, n, k, tm, tn, s)
        if mine != best:
            fail(f"{call} is not the best tile", f"a tile that moves {best} bytes (the minimum "
                 "over every tile that fits)", f"{got}, which moves {mine} bytes",
                 "traffic does not depend on tk, but tk takes capacity; search the C tile")
        ratios.append(mine / (2 * m * n * k / math.sqrt(capacity / s) * s))
    expect_raises(lambda: fn(8, 8, 8, 8, 4), ValueError, "best_tile(8, 8, 8, capacity=8, itemsize=4)",
            "a ValueError: 8 bytes cannot hold three 4-byte elements",
            "even 1x1x1 tiles need 3 * itemsize bytes")
    return (f"minimal traffic; {ratios[0]:.2f}x the tight I/O lower bound 2mnk/sqrt(M) at "
            "256^3 with 1224 floats of fast memory")


# --------------------------------------------------------------------------- exercise 3

@exercise
def flash_attention(fn):
    """``fn(q, k, v, causal, block_q, block_k)`` equals scaled_dot_product_attention."""
    g = torch.Generator().manual_seed(2)
    cases = [((2, 3, 37, 16), False, torch.float32, (8, 8)),
             ((2, 3, 37, 16), True, torch.float32, (8, 16)),
             ((1, 2, 64, 32), True, torch.float64, (16, 16)),
             ((1, 2, 64, 32), False, torch.float64, (64, 64)),
             ((1, 1, 50, 8), False, torch.bfloat16, (16, 4)),
             ((1, 4, 33, 64), True, torch.bfloat16, (8, 32)),
             ((1, 1, 1, 8), True, torch.float32, (4, 4))]
    for shape, causal, dtype, (bq, bk) in cases:
        q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
        if shape[-2] > 1:
            q[..., 0, :] *= 40            # a peaked row: an unstable softmax overflows here
        call = f"flash_attention(q {tuple(shape)} {dtype}, causal={causal}, block_q={bq}, block_k={bk})"
        got = fn(q, k, v, causal, bq, bk)
        expect_type(got, torch.Tensor, call)
        expect_shape(got, shape, call)
        expect_dtype(got, dtype, call, hint="accumulate in float32 and cast back to q.dtype")
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}[dtype]
        expect_close(got, ref.to(dtype), rtol=tol, atol=tol, what=call,
                     hint="rescale the running sum and output by exp(m_old - m_new) whenever "
                     "the row maximum grows; divide by the sum only at the end"
                     + ("; mask keys after the query (j > i) in the causal case" if causal else ""))
    q = torch.randn(1, 4, 8)
    expect_raises(lambda: fn(q, q, q, False, 0, 4), ValueError, "block_q=0",
            "a ValueError naming block_q", "blocks must be positive ints")
    expect_raises(lambda: fn(q, torch.randn(1, 4, 7), q, False, 4, 4), ValueError,
            "k of shape (1, 4, 7) with q of shape (1, 4, 8)", "a ValueError about the shapes",
            "q, k and v must share the batch dimensions and head width")
    return "equals SDPA (causal and not; fp32, fp64, bf16; ragged blocks; a peaked row)"


# --------------------------------------------------------------------------- exercise 4

def _standard(N, d):
    # Algorithm 0: read Q, K; write S; read S; write P; read P, V; write O
    return 2 * N * d + N * N + N * N + N * N + N * N + N * d + N * d


def _flash(N, d, M):
    Bc = -(-M // (4 * d))
    Tc = -(-N // Bc)
    per_pass = (N * d + N * d + N + N) + (N * d + N + N)   # read Q, O, l, m; write O, l, m
    return 2 * N * d + (N * d + 2 * N) + Tc * per_pass     # K, V once; step 2 initialises O, l, m


@exercise
def attention_hbm_accesses(fn):
    """``fn(N, d, M) -> (standard, flash)`` element counts of Algorithms 0 and 1."""
    for N, d, M in [(1024, 64, 49152), (4096, 128, 25000), (100, 64, 256), (2048, 64, 98304),
                    (8, 16, 1000)]:
        call = f"attention_hbm_accesses(N={N}, d={d}, M={M})"
        got = fn(N, d, M)
        expect_type(got, tuple, call, hint="return a tuple (standard, flash)")
        if len(got) != 2:
            fail(f"{call} has the wrong length", "two counts (standard, flash)", describe(got))
        std, fl = got
        expect_equal(std, _standard(N, d), f"{call}: standard attention's count",
                     hint="Algorithm 0 writes S and P to HBM and reads each back: count the "
                     "N x N matrices four times, Q, K, V, O once each")
        expect_equal(fl, _flash(N, d, M), f"{call}: FlashAttention's count",
                     hint="Bc = ceil(M/(4d)), Tc = ceil(N/Bc); every outer iteration reads all "
                     "of Q, O, l, m and writes O, l, m; K and V are read once; step 2 writes "
                     "O, l, m once")
    expect_raises(lambda: fn(1024, 64, 100), ValueError, "M=100 with d=64",
            "a ValueError: M must hold at least 4*d elements", "check M >= 4 * d")
    expect_raises(lambda: fn(0, 64, 4096), ValueError, "N=0", "a ValueError naming N",
            "N, d and M must be positive ints")
    r = _standard(4096, 64) / _flash(4096, 64, 49152)
    return f"Algorithms 0 and 1 counted exactly; at N=4096, d=64, M=48K: {r:.1f}x fewer accesses"


# --------------------------------------------------------------------------- exercise 5

def _fake_sysfs(root: Path, entries):
    for i, (level, kind, size) in enumerate(entries):
        d = root / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
        (d / "ways_of_associativity").write_text("8\n")
    (root / "uevent").write_text("")


def _real_levels(root):
    out = {}
    base = Path(root)
    if not base.is_dir():
        return out
    for d in sorted(base.glob("index*")):
        if (d / "type").read_text().strip() == "Instruction":
            continue
        text = (d / "size").read_text().strip().upper()
        num = int(text.rstrip("KMG"))
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        out[int((d / "level").read_text())] = num * mult
    return {f"L{k}": out[k] for k in sorted(out)}


@exercise
def cache_levels(fn):
    """``fn(root) -> {"L1": bytes, "L2": ..., ...}`` read from a sysfs cache folder."""
    trees = [
        ([(1, "Data", "32K"), (1, "Instruction", "64K"), (2, "Unified", "1024K"),
          (3, "Unified", "32768K")], {"L1": 32 * 2**10, "L2": 2**20, "L3": 32 * 2**20}),
        ([(1, "Instruction", "64K"), (1, "Data", "48K"), (2, "Unified", "2M"),
          (3, "Unified", "96M")], {"L1": 48 * 2**10, "L2": 2 * 2**20, "L3": 96 * 2**20}),
        ([(1, "Data", "16K"), (2, "Unified", "512K")], {"L1": 16 * 2**10, "L2": 512 * 2**10}),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (entries, want) in enumerate(trees):
            root = Path(tmp) / f"cpu{i}"
            root.mkdir()
            _fake_sysfs(root, entries)
            listing = ", ".join(f"L{lv} {kind} {size}" for lv, kind, size in entries)
            got = fn(str(root))
            expect_type(got, dict, f"cache_levels on a folder with {listing}")
            expect_equal(got, want, f"cache_levels on a folder with {listing}",
                         hint="skip Instruction caches; 'K' is 1024 bytes, 'M' 1024*1024; "
                         "key by 'L' + level")
    real = "/sys/devices/system/cpu/cpu0/cache"
    expect_equal(fn(real), _real_levels(real), f"cache_levels({real!r}) on this machine")
    return "data and unified caches by level, in bytes" + (
        f"; this machine: {', '.join(f'{k} {v // 1024} KiB' for k, v in _real_levels(real).items())}"
        if _real_levels(real) else "")


# --------------------------------------------------------------------------- exercise 6

def _plateaus(sweep, levels):
    caps = sorted(levels.items(), key=lambda kv: kv[1])
    groups = {}
    for w, bw in sweep:
        name = next((lv for lv, cap in caps if w <= cap), "DRAM")
        groups.setdefault(name, []).append(bw)
    return {lv: statistics.median(groups[lv]) for lv in [c[0] for c in caps] + ["DRAM"]
            if lv in groups}


@exercise
def plateaus(fn):
    """``fn(sweep, levels) -> {level: median bandwidth}``, then "DRAM"."""
    import random

    rng = random.Random(0)
    levels = {"L1": 32 * 2**10, "L2": 2**20, "L3": 32 * 2**20}
    truth = [(2**10, 60e9), (levels["L1"], 60e9), (levels["L2"], 35e9), (levels["L3"], 18e9),
             (2**40, 8e9)]
    sizes = [2**k for k in range(12, 30)]
    for trial in range(4):
        sweep = []
        for w in sizes:
            base = next(bw for cap, bw in truth if w <= cap)
            sweep.append((w, base * rng.uniform(0.8, 1.2)))    # simulated noise
        want = _plateaus(sweep, levels)
        got = fn(sweep, levels)
        expect_type(got, dict, "plateaus on a simulated sweep")
        expect_equal(list(got), list(want), "the levels plateaus returns, in order",
                     hint="a working set w belongs to the first level with w <= capacity, "
                     "else to 'DRAM'; leave out levels without points")
        expect_close([got[k] for k in want], [want[k] for k in want], rtol=1e-12,
                     what="the median bandwidth per level",
                     hint="a point with w <= a level's capacity belongs to the first such level; "
                     "take the median (statistics.median) of each level's points")
    got = fn([(2**25, 10e9), (2**26, 12e9)], levels)
    expect_equal(got, {"L3": 10e9, "DRAM": 12e9}, "plateaus with no points in L1 or L2",
                 hint="w equal to a capacity still fits that level")
    expect_raises(lambda: fn([(4096, -1.0)], levels), ValueError, "a negative bandwidth",
            "a ValueError naming the bad bandwidth", "check each bandwidth is positive and finite")
    return "points grouped by the level they fit in; medians per level"


# --------------------------------------------------------------------------- measurement

@exercise
def measure_sweep(fn):
    """``fn(sizes) -> [(working set, B/s), ...]`` measured on this machine (copy kernel).

    Logic: one pair per size, in order, positive finite bandwidths. Measurement: the
    DRAM-sized point is compared with ``utils.bench.cache_sweep``; disagreements and a
    missing cache step are warnings.
    """
    sizes = [2**15, 2**18, 2**26]
    got = fn(sizes)
    expect_type(got, list, "measure_sweep(sizes)", hint="return a list of (bytes, B/s) pairs")
    expect_equal(len(got), len(sizes), "the number of points measure_sweep returns")
    for (w, bw), want in zip(got, sizes):
        expect_equal(w, want, "a point's working set", hint="return the sizes you were given")
        if isinstance(bw, bool) or not isinstance(bw, numbers.Real) or not math.isfinite(bw) or bw <= 0:
            fail("a measured bandwidth is not a positive number", "B/s > 0", describe(bw),
                 "divide the bytes moved by the median time")
    ours = dict(bench.cache_sweep([2**26]))[2**26]
    mine = got[-1][1]
    if not 0.5 <= mine / ours <= 2.0:
        measurement_warning(
            "copy bandwidth at a 64 MiB working set", f"about {ours / 1e9:.1f} GB/s "
            "(utils.bench.cache_sweep, just now)", f"{mine / 1e9:.1f} GB/s",
            "a miscount of bytes (a copy moves source plus destination) or another "
            "process using the memory bus")
    if got[0][1] <= got[-1][1]:
        measurement_warning(
            "in-cache copy vs DRAM copy", "a 32 KiB working set faster than a 64 MiB one",
            f"{got[0][1] / 1e9:.1f} GB/s vs {got[-1][1] / 1e9:.1f} GB/s",
            "per-call overhead dominates tiny copies; time more copies per measurement")
    return f"64 MiB copy {mine / 1e9:.1f} GB/s (utils.bench: {ours / 1e9:.1f} GB/s)"
