"""The memory hierarchy as an algorithm sees it: tiling, traffic, and the cache sizes.

Chapter 01's library. A GPU kernel keeps a small working set in fast on-chip memory
(registers, shared memory) and streams the rest from slow memory (HBM). This module
makes that explicit on any machine:

* :class:`FastMemory`, a fast memory of a given capacity that counts every byte loaded
  from and stored to slow memory, and refuses to hold more than it has;
* :func:`tiled_matmul`, the classic loop nest over it, and :func:`matmul_traffic`, the
  closed form of the bytes it moves; :func:`best_tile` and :func:`io_lower_bound`
  (the leading term of the tight bound of Smith, Lowery, Langou and van de Geijn, 2019,
  which sharpens Hong and Kung, 1981);
* :func:`flash_attention`, FlashAttention's forward pass (tiles and online softmax,
  Dao et al. 2022, Algorithm 1), and the HBM accesses of standard and flash attention
  counted as that paper's Algorithms 0 and 1 make them (Theorem 2);
* :func:`cache_levels` (the CPU caches the OS reports in sysfs) and :func:`plateaus`
  (a bandwidth sweep summarised per level).

Sizes are in bytes unless a name says elements; the attention counts are in elements,
as the paper states them (multiply by the element size for bytes).
"""
from __future__ import annotations

import math
import numbers
import os
import statistics
from typing import Iterable, Mapping

import torch

from .validate import check_int, check_tensor

__all__ = ["FastMemory", "tiled_matmul", "fast_bytes_needed", "matmul_traffic", "best_tile",
           "io_lower_bound", "flash_attention", "standard_attention_hbm_accesses",
           "flash_attention_hbm_accesses", "cache_levels", "plateaus", "CACHE_ROOT"]

#: Where Linux describes cpu0's caches (one ``indexN`` folder per cache).
CACHE_ROOT = "/sys/devices/system/cpu/cpu0/cache"


# --------------------------------------------------------------------------- validation
# (the course's shared validators; each error names the argument and what was wrong)

def _int(name: str, x, minimum: int = 1) -> int:
    return check_int(name, x, low=minimum)


def _tensor(name: str, x, ndim: int | None = None) -> torch.Tensor:
    return check_tensor(name, x, ndim=ndim, floating=True)


# --------------------------------------------------------------------------- fast memory

class FastMemory:
    """A fast memory of ``capacity`` bytes between the arithmetic and slow memory.

    ``load(view)`` copies a slice of a slow-memory tensor in (counted in ``bytes_read``),
    ``alloc(shape, dtype)`` makes a zeroed buffer in it (an accumulator, no traffic),
    ``store(view, buf)`` copies a buffer out (``bytes_written``), ``free(buf)`` releases
    it. Holding more than ``capacity`` bytes at once raises ``MemoryError``; ``peak`` is
    the most it ever held.
    """

    def __init__(self, capacity: int):
        self.capacity = _int("capacity", capacity)
        self.bytes_read = 0
        self.bytes_written = 0
        self.resident = 0
        self.peak = 0
        self._held: dict[int, int] = {}

    def _take(self, t: torch.Tensor) -> torch.Tensor:
        size = t.numel() * t.element_size()
        if self.resident + size > self.capacity:
            raise MemoryError(f"fast memory full: holding {self.resident} bytes, asked for "
                              f"{size} more, capacity {self.capacity} bytes")
        self.resident += size
        self.peak = max(self.peak, self.resident)
        self._held[id(t)] = size
        return t

    def load(self, view: torch.Tensor) -> torch.Tensor:
        """A fast copy of ``view`` (read from slow memory; counted)."""
        view = _tensor("view", view)
        t = view.clone()
        self._take(t)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def alloc(self, shape, dtype=torch.float32) -> torch.Tensor:
        """A zeroed buffer in fast memory (no slow-memory traffic)."""
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        if not isinstance(shape, (tuple, list, torch.Size)):
            raise TypeError(f"shape must be a tuple of ints, got {type(shape).__name__}")
        shape = tuple(check_int(f"shape[{i}]", s, low=0) for i, s in enumerate(shape))
        return self._take(torch.zeros(shape, dtype=dtype))

    def store(self, view: torch.Tensor, buf: torch.Tensor) -> None:
        """Write fast buffer ``buf`` into slow-memory ``view`` (counted)."""
        if id(buf) not in self._held:
            raise ValueError("store: buf is not a buffer held in this fast memory "
                             "(make it with load or alloc)")
        view = _tensor("view", view)
        if tuple(view.shape) != tuple(buf.shape):
            raise ValueError(f"store: view has shape {tuple(view.shape)}, buf has "
                             f"{tuple(buf.shape)}")
        view.copy_(buf)
        self.bytes_written += buf.numel() * buf.element_size()

    def free(self, buf: torch.Tensor) -> None:
        """Release ``buf``; freeing something not held (or freed twice) is a ValueError."""
        size = self._held.pop(id(buf), None)
        if size is None:
            raise ValueError("free: this tensor is not held in fast memory (never loaded or "
                             "allocated here, or already freed)")
        self.resident -= size


# --------------------------------------------------------------------------- tiled matmul

def fast_bytes_needed(tm: int, tn: int, tk: int, itemsize: int) -> int:
    """Fast memory one step of the tiled matmul holds: a C tile, an A tile and a B tile."""
    for name, v in (("tm", tm), ("tn", tn), ("tk", tk), ("itemsize", itemsize)):
        _int(name, v)
    return (tm * tn + tm * tk + tk * tn) * itemsize


def tiled_matmul(A: torch.Tensor, B: torch.Tensor, mem: FastMemory,
                 tm: int, tn: int, tk: int) -> torch.Tensor:
    """C = A @ B, computed tile by tile through ``mem``.

    Each (tm x tn) tile of C stays in fast memory while the k dimension is streamed in
    (tm x tk) tiles of A and (tk x tn) tiles of B; then the C tile is stored once.
    """
    _tensor("A", A, 2), _tensor("B", B, 2)
    if not isinstance(mem, FastMemory):
        raise TypeError(f"mem must be a FastMemory, got {type(mem).__name__}")
    if A.shape[1] != B.shape[0]:
        raise ValueError(f"A is {tuple(A.shape)} and B is {tuple(B.shape)}: inner sizes differ")
    if A.dtype != B.dtype:
        raise TypeError(f"A and B must have the same dtype, got {A.dtype} and {B.dtype}")
    need = fast_bytes_needed(tm, tn, tk, A.element_size())
    if need > mem.capacity:
        raise ValueError(f"tiles tm={tm}, tn={tn}, tk={tk} need {need} bytes of fast memory; "
                         f"the capacity is {mem.capacity}")
    m, k = A.shape
    n = B.shape[1]
    C = torch.empty(m, n, dtype=A.dtype)
    for i in range(0, m, tm):
        for j in range(0, n, tn):
            c = mem.alloc((min(tm, m - i), min(tn, n - j)), A.dtype)
            for p in range(0, k, tk):
                a = mem.load(A[i:i + tm, p:p + tk])
                b = mem.load(B[p:p + tk, j:j + tn])
                c += a @ b
                mem.free(a)
                mem.free(b)
            mem.store(C[i:i + tm, j:j + tn], c)
            mem.free(c)
    return C


def matmul_traffic(m: int, n: int, k: int, tm: int, tn: int, tk: int, itemsize: int) -> int:
    """Bytes :func:`tiled_matmul` moves: all of A once per column of C tiles, all of B
    once per row of C tiles, C written once.

    ``itemsize * (m k ceil(n/tn) + k n ceil(m/tm) + m n)``; ``tk`` changes nothing.
    """
    for name, v in (("m", m), ("n", n), ("k", k), ("tm", tm), ("tn", tn), ("tk", tk),
                    ("itemsize", itemsize)):
        _int(name, v)
    return itemsize * (m * k * math.ceil(n / tn) + k * n * math.ceil(m / tm) + m * n)


def best_tile(m: int, n: int, k: int, capacity: int, itemsize: int) -> tuple[int, int, int]:
    """The (tm, tn, tk) that fits ``capacity`` bytes and moves the fewest bytes.

    ``tk = 1`` is always best (it costs capacity and saves no traffic). For each tm the
    widest tn that fits is best (traffic never grows with tn); the search over tm keeps
    the smallest traffic (ties: the squarer tile).
    """
    for name, v in (("m", m), ("n", n), ("k", k), ("capacity", capacity), ("itemsize", itemsize)):
        _int(name, v)
    if fast_bytes_needed(1, 1, 1, itemsize) > capacity:
        raise ValueError(f"capacity {capacity} bytes cannot hold even 1x1 tiles "
                         f"(3 elements of {itemsize} bytes)")
    M = capacity // itemsize
    best = None
    for tm in range(1, m + 1):
        # traffic only falls as tn grows, so take the widest tn that fits beside tm
        tn = min(n, (M - tm) // (tm + 1))
        if tn < 1:
            break
        key = (matmul_traffic(m, n, k, tm, tn, 1, itemsize), abs(tm - tn), tm)
        if best is None or key < best[0]:
            best = (key, (tm, tn, 1))
    return best[1]


def io_lower_bound(m: int, n: int, k: int, capacity: int, itemsize: int) -> float:
    """Leading term of the tight I/O lower bound for C = AB: ``2 m n k / sqrt(M)`` elements.

    M is the fast memory in elements (``capacity / itemsize``); returned in bytes.
    Smith, Lowery, Langou, van de Geijn, "A Tight I/O Lower Bound for Matrix
    Multiplication" (2019, arXiv:1702.02017), which sharpens Hong and Kung's (1981)
    Omega(mnk / sqrt(M)).
    """
    for name, v in (("m", m), ("n", n), ("k", k), ("capacity", capacity), ("itemsize", itemsize)):
        _int(name, v)
    M = capacity / itemsize
    return 2 * m * n * k / math.sqrt(M) * itemsize


# --------------------------------------------------------------------------- attention

def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    block_q: int = 64, block_k: int = 64) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, tile by tile with an online softmax (never N x N).

    q: (..., Nq, d), k and v: (..., Nk, d). For each block of queries the running row
    maximum m, the running sum of exponentials l and the unnormalised output are carried
    across key blocks and rescaled when the maximum grows (Dao et al. 2022, Algorithm 1,
    with the loops in the order of FlashAttention-2). Accumulates in float32 (float64 for
    float64 inputs) and returns q's dtype. ``causal`` masks key j > query i (Nq == Nk).
    """
    _tensor("q", q), _tensor("k", k), _tensor("v", v)
    block_q, block_k = _int("block_q", block_q), _int("block_k", block_k)
    if q.dim() < 2 or k.shape != v.shape or q.shape[:-2] != k.shape[:-2] \
            or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"shapes must be q (..., Nq, d), k and v (..., Nk, d); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError("causal attention here needs Nq == Nk")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    Nq, Nk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    out = torch.empty(q.shape, dtype=q.dtype)
    for i in range(0, Nq, block_q):
        qi = q[..., i:i + block_q, :].to(acc) * scale
        rows = qi.shape[-2]
        m = torch.full(qi.shape[:-1], -math.inf, dtype=acc)
        l = torch.zeros(qi.shape[:-1], dtype=acc)
        o = torch.zeros(qi.shape, dtype=acc)
        for j in range(0, Nk, block_k):
            if causal and j > i + rows - 1:
                break                                    # every key here is in the future
            s = qi @ k[..., j:j + block_k, :].to(acc).transpose(-1, -2)
            if causal:
                qpos = torch.arange(i, i + rows).unsqueeze(-1)
                kpos = torch.arange(j, j + s.shape[-1])
                s = s.masked_fill(kpos > qpos, -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            p = torch.exp(s - m_new.unsqueeze(-1))
            alpha = torch.exp(m - m_new)
            l = alpha * l + p.sum(-1)
            o = alpha.unsqueeze(-1) * o + p @ v[..., j:j + block_k, :].to(acc)
            m = m_new
        out[..., i:i + block_q, :] = (o / l.unsqueeze(-1)).to(q.dtype)
    return out


def standard_attention_hbm_accesses(N: int, d: int) -> int:
    """Elements standard attention reads and writes in HBM (Dao et al. 2022, Algorithm 0).

    Read Q, K (2Nd), write S (N^2); read S, write P (2 N^2); read P and V (N^2 + Nd),
    write O (Nd): ``4 N d + 4 N^2``, Theta(Nd + N^2) as Theorem 2 states.
    """
    N, d = _int("N", N), _int("d", d)
    return 4 * N * d + 4 * N * N


def flash_attention_hbm_accesses(N: int, d: int, M: int) -> int:
    """Elements FlashAttention (Dao et al. 2022, Algorithm 1) reads and writes in HBM.

    SRAM of M elements; Bc = ceil(M / 4d), Br = min(Bc, d), Tc = ceil(N / Bc). Step 2
    writes O, l, m (Nd + 2N). The outer loop reads each K_j, V_j once (2Nd in all); each
    of its Tc passes reads all of Q, O, l, m (2Nd + 2N) and writes O, l, m (Nd + 2N):
    ``2Nd + (Nd + 2N) + Tc (3Nd + 4N)``, Theta(N^2 d^2 / M) as Theorem 2 states.
    """
    N, d, M = _int("N", N), _int("d", d), _int("M", M)
    if M < 4 * d:
        raise ValueError(f"M (SRAM, in elements) must be at least 4*d = {4 * d} to hold one "
                         f"row each of Q, K, V and O; got M={M}")
    Bc = math.ceil(M / (4 * d))
    Tc = math.ceil(N / Bc)
    return 2 * N * d + (N * d + 2 * N) + Tc * (3 * N * d + 4 * N)


# --------------------------------------------------------------------------- CPU caches

_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    digits = text.rstrip("KMG")
    suffix = text[len(digits):]
    if not digits.isdigit() or suffix not in _SUFFIX:
        raise ValueError(f"cannot read a cache size from {text!r}")
    return int(digits) * _SUFFIX[suffix]


def cache_levels(root: str = CACHE_ROOT) -> dict[str, int]:
    """Data (and unified) cache sizes by level, from sysfs: ``{"L1": bytes, "L2": ..., ...}``.

    Reads ``root/index*/{level,type,size}``; instruction caches are skipped. Sorted by
    level. An absent ``root`` (not Linux) gives ``{}``.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path, got {type(root).__name__}")
    if not os.path.isdir(root):
        return {}
    levels: dict[int, int] = {}
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if not entry.startswith("index") or not os.path.isdir(path):
            continue
        with open(os.path.join(path, "type")) as f:
            kind = f.read().strip()
        if kind == "Instruction":
            continue
        with open(os.path.join(path, "level")) as f:
            level = int(f.read().strip())
        with open(os.path.join(path, "size")) as f:
            levels[level] = _parse_size(f.read())
    return {f"L{lv}": levels[lv] for lv in sorted(levels)}


def plateaus(sweep: Iterable[tuple[int, float]], levels: Mapping[str, int]) -> dict[str, float]:
    """Median bandwidth of the sweep's points that fit each level, then ``"DRAM"``.

    A point (working set w, bandwidth) belongs to the first level whose capacity is
    >= w, else to DRAM. Levels with no points are left out.
    """
    if not isinstance(levels, Mapping):
        raise TypeError(f"levels must be a mapping of level name -> bytes, got {type(levels).__name__}")
    for lv, cap in levels.items():
        _int(f"levels[{lv!r}]", cap)
    if isinstance(sweep, (str, bytes)) or not isinstance(sweep, Iterable):
        raise TypeError(f"sweep must be (working set, bandwidth) pairs, got {type(sweep).__name__}")
    caps = sorted(levels.items(), key=lambda kv: kv[1])
    groups: dict[str, list[float]] = {}
    for w, bw in sweep:
        _int("working set", w)
        if not (isinstance(bw, numbers.Real) and math.isfinite(bw) and bw > 0):
            raise ValueError(f"bandwidth must be a positive finite number, got {bw!r}")
        name = next((lv for lv, cap in caps if w <= cap), "DRAM")
        groups.setdefault(name, []).append(float(bw))
    order = [lv for lv, _ in caps] + ["DRAM"]
    return {lv: statistics.median(groups[lv]) for lv in order if lv in groups}
