"""PyTorch's CUDA caching allocator, as rules and as a reference model (chapter 05).

Every constant and rule here is the one in PyTorch's source file
``c10/cuda/CUDACachingAllocator.cpp`` (class ``DeviceCachingAllocator``):

===================  ============  ===================================================
constant             value         meaning in the source
===================  ============  ===================================================
``kMinBlockSize``    512 B         every request is rounded up to a multiple of it
``kSmallSize``       1 MiB         the largest request served from the small pool
``kSmallBuffer``     2 MiB         the segment a small-pool miss reserves
``kLargeBuffer``     20 MiB        the segment a 1-10 MiB miss reserves
``kMinLargeAlloc``   10 MiB        from here on a miss reserves just the rounded size
``kRoundLarge``      2 MiB         ... rounded up to a multiple of 2 MiB
===================  ============  ===================================================

The rules, with the function of the source that states each:

* ``round_size``: ``max(512, ceil(n / 512) * 512)`` (the ``roundup_power2_divisions``
  option, off by default, is not modelled).
* ``get_pool``: a rounded size ``<= kSmallSize`` goes to the small pool, else the large.
* ``get_allocation_size``: the bytes ``cudaMalloc`` is asked for on a miss: 2 MiB for the
  small pool, 20 MiB for sizes below 10 MiB, else the size rounded up to 2 MiB.
* ``get_free_block``: best fit -- the free block of the pool with the smallest size
  ``>= size`` (ties: the lowest address; ``BlockComparatorSize`` orders by size, then
  address). With ``max_split_size`` set, a request below it never takes a block of at
  least ``max_split_size``, and a request at or above it never takes a block
  ``>= size + kLargeBuffer``; then the allocator reserves a new segment instead.
* ``should_split``: the rest of the chosen block is split off as a new free block if
  ``remaining >= kMinBlockSize`` in the small pool, and if ``size < max_split_size and
  remaining > kSmallSize`` in the large pool (with ``expandable_segments`` both pools use
  the small-pool rule). An unsplit block is handed out whole, and counts whole in
  "allocated".
* ``alloc_found_block``: the request takes the front of the block; the rest follows it.
* ``free_block`` / ``try_merge_blocks``: a freed block merges with its free neighbours
  in the same segment (previous and next), so a segment never holds two adjacent free
  blocks.
* ``alloc_block`` then ``release_cached_blocks``: when a new segment would pass the
  device's capacity, every cached segment with no allocated part is released and the
  ``cudaMalloc`` is retried once; then it is an out-of-memory error.

Statistics match ``torch.cuda.memory_stats()``: ``allocated`` is the sum of the sizes of
the blocks handed out (``allocated_bytes.all``), ``reserved`` the sum of the segments
(``reserved_bytes.all``), each with its peak. Sizes are bytes.
"""
from __future__ import annotations

import bisect
import json
import math
from pathlib import Path

from .validate import check_bool, check_int, check_number

__all__ = ["K_MIN_BLOCK_SIZE", "K_SMALL_SIZE", "K_SMALL_BUFFER", "K_LARGE_BUFFER",
           "K_MIN_LARGE_ALLOC", "K_ROUND_LARGE", "SOURCE", "round_size", "is_small",
           "segment_size", "should_split", "CachingAllocator", "replay", "load_trace",
           "trace_stats", "TRACE_PATH"]

SOURCE = "PyTorch c10/cuda/CUDACachingAllocator.cpp (DeviceCachingAllocator)"
K_MIN_BLOCK_SIZE = 512                 # kMinBlockSize
K_SMALL_SIZE = 1_048_576               # kSmallSize: largest "small" allocation, 1 MiB
K_SMALL_BUFFER = 2_097_152             # kSmallBuffer: small allocations packed in 2 MiB
K_LARGE_BUFFER = 20_971_520            # kLargeBuffer: 1-10 MiB allocations packed in 20 MiB
K_MIN_LARGE_ALLOC = 10_485_760         # kMinLargeAlloc: 10 MiB
K_ROUND_LARGE = 2_097_152              # kRoundLarge: large allocations rounded to 2 MiB

TRACE_PATH = Path(__file__).resolve().parent / "data" / "alloc_trace_ch05.json"


def _nbytes(name, n, *, low=0):
    return check_int(name, n, low=low)


def round_size(nbytes: int) -> int:
    """The bytes a request of ``nbytes`` takes (``round_size`` in the source)."""
    n = _nbytes("nbytes", nbytes)
    if n < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    return K_MIN_BLOCK_SIZE * ((n + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE)


def is_small(nbytes: int) -> bool:
    """Whether a request of ``nbytes`` is served by the small pool (``get_pool``)."""
    return round_size(nbytes) <= K_SMALL_SIZE


def segment_size(nbytes: int) -> int:
    """The bytes a new segment for a request of ``nbytes`` reserves (``get_allocation_size``
    of the rounded size)."""
    size = round_size(nbytes)
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * ((size + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


def should_split(block_size: int, size: int, small: bool, *, max_split_size: float = math.inf,
                 expandable: bool = False) -> bool:
    """Whether a free block of ``block_size`` serving a rounded ``size`` is split
    (``should_split`` in the source)."""
    b = _nbytes("block_size", block_size, low=1)
    s = _nbytes("size", size, low=1)
    check_bool("small", small)
    check_bool("expandable", expandable)
    check_number("max_split_size", max_split_size, finite=False, positive=True)
    if s > b:
        raise ValueError(f"size ({s} B) must not exceed block_size ({b} B)")
    remaining = b - s
    if small or expandable:
        return remaining >= K_MIN_BLOCK_SIZE
    return s < max_split_size and remaining > K_SMALL_SIZE


class _Block:
    __slots__ = ("addr", "size", "allocated", "prev", "next", "small", "seg")

    def __init__(self, addr, size, small, seg):
        self.addr, self.size, self.small, self.seg = addr, size, small, seg
        self.allocated = False
        self.prev = self.next = None


class CachingAllocator:
    """The course's reference model of one device's caching allocator (one stream).

    ``malloc(nbytes)`` returns a handle (the block's simulated address, an int);
    ``free(handle)`` returns it to the cache. ``capacity`` (bytes, or None for no limit)
    is the device memory ``cudaMalloc`` may hand out; ``max_split_size`` (bytes) is
    ``max_split_size_mb`` in bytes; ``expandable`` models ``expandable_segments:True``
    (one segment per pool that grows in pages of the pool's segment size, 2 MiB small,
    20 MiB large).
    """

    def __init__(self, capacity: int | None = None, *, max_split_size: float = math.inf,
                 expandable: bool = False):
        if capacity is not None:
            capacity = check_int("capacity", capacity, low=1)
        check_number("max_split_size", max_split_size, finite=False, positive=True)
        if max_split_size < K_LARGE_BUFFER:
            raise ValueError(f"max_split_size must be at least 20 MiB (kLargeBuffer; PyTorch's "
                             f"parseMaxSplitSize refuses smaller max_split_size_mb), got "
                             f"{max_split_size}")
        self.capacity = capacity
        self.max_split_size = max_split_size
        check_bool("expandable", expandable)
        self.expandable = expandable
        self._free = {True: [], False: []}     # pool -> sorted [(size, addr, block)]
        self._live: dict[int, _Block] = {}
        self._segments: dict[int, list] = {}   # segment start -> [size, head block]
        self._next_addr = 1 << 32
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0
        self.num_segments = 0
        self.num_device_alloc = 0

    # -- pool bookkeeping ---------------------------------------------------------------
    def _insert(self, b):
        bisect.insort(self._free[b.small], (b.size, b.addr, id(b), b))

    def _remove(self, b):
        lst = self._free[b.small]
        i = bisect.bisect_left(lst, (b.size, b.addr, id(b)))
        assert lst[i][3] is b
        del lst[i]

    def _best_fit(self, size, small):
        lst = self._free[small]
        i = bisect.bisect_left(lst, (size, -1))
        if i == len(lst):
            return None
        b = lst[i][3]
        if not self.expandable:
            if size < self.max_split_size and b.size >= self.max_split_size:
                return None
            if size >= self.max_split_size and b.size >= size + K_LARGE_BUFFER:
                return None
        return b

    def _new_segment(self, nbytes, small):
        if self.capacity is not None and self.reserved + nbytes > self.capacity:
            self.empty_cache()
            if self.reserved + nbytes > self.capacity:
                raise MemoryError(
                    f"out of memory: a new {nbytes} B segment would reserve "
                    f"{self.reserved + nbytes} B of a {self.capacity} B device "
                    f"({self.allocated} B allocated, "
                    f"{self.reserved - self.allocated} B reserved but unallocated)")
        addr = self._next_addr
        self._next_addr += nbytes + (1 << 21)   # gaps: segments are never adjacent
        b = _Block(addr, nbytes, small, addr)
        self._segments[addr] = [nbytes, b]
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.num_segments += 1
        self.num_device_alloc += 1
        return b

    def _grow(self, size, small):
        """Expandable segments: map pages at the end of the pool's one segment."""
        page = K_SMALL_BUFFER if small else K_LARGE_BUFFER
        seg = next((s for s, (n, h) in self._segments.items() if h.small == small), None)
        if seg is None:
            b = self._new_segment(page * math.ceil(size / page), small)
            return b
        tail = self._segments[seg][1]
        while tail.next is not None:
            tail = tail.next
        have = 0 if tail.allocated else tail.size
        extra = page * math.ceil((size - have) / page)
        if self.capacity is not None and self.reserved + extra > self.capacity:
            raise MemoryError(f"out of memory: growing a segment by {extra} B would reserve "
                              f"{self.reserved + extra} B of a {self.capacity} B device")
        self._segments[seg][0] += extra
        self.reserved += extra
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.num_device_alloc += 1
        if tail.allocated:
            b = _Block(tail.addr + tail.size, extra, small, seg)
            tail.next, b.prev = b, tail
        else:
            self._remove(tail)
            tail.size += extra
            b = tail
        return b

    # -- public API ---------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        """Hand out a block for ``nbytes``; returns its handle (address)."""
        size = round_size(nbytes)
        small = size <= K_SMALL_SIZE
        b = self._best_fit(size, small)
        if b is not None:
            self._remove(b)
        elif self.expandable:
            b = self._grow(size, small)
        else:
            b = self._new_segment(segment_size(nbytes), small)
        if should_split(b.size, size, small, max_split_size=self.max_split_size,
                        expandable=self.expandable):
            rest = _Block(b.addr + size, b.size - size, small, b.seg)
            rest.prev, rest.next = b, b.next
            if b.next is not None:
                b.next.prev = rest
            b.next = rest
            b.size = size
            self._insert(rest)
        b.allocated = True
        self._live[b.addr] = b
        self.allocated += b.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return b.addr

    def free(self, handle: int) -> None:
        """Return the block ``handle`` to the cache, merging it with free neighbours."""
        h = check_int("handle", handle)
        b = self._live.pop(h, None)
        if b is None:
            raise ValueError(f"free({h}): no block with this handle is allocated "
                             "(never allocated, or already freed)")
        b.allocated = False
        self.allocated -= b.size
        for nb in (b.prev, b.next):
            if nb is not None and not nb.allocated:
                self._remove(nb)
                if nb is b.prev:
                    b.addr, b.prev = nb.addr, nb.prev
                    if b.prev is not None:
                        b.prev.next = b
                    if self._segments[b.seg][1] is nb:
                        self._segments[b.seg][1] = b
                else:
                    b.next = nb.next
                    if b.next is not None:
                        b.next.prev = b
                b.size += nb.size
        self._insert(b)

    def empty_cache(self) -> None:
        """Release every segment with nothing allocated (``release_cached_blocks``)."""
        for seg in sorted(self._segments):
            size, head = self._segments[seg]
            if not head.allocated and head.next is None and head.prev is None:
                self._remove(head)
                del self._segments[seg]
                self.reserved -= size
                self.num_segments -= 1

    @property
    def fragmentation(self) -> float:
        """``1 - peak_allocated / peak_reserved`` (0 when nothing was reserved)."""
        return 0.0 if self.peak_reserved == 0 else 1.0 - self.peak_allocated / self.peak_reserved

    def segments(self) -> list[list[tuple[int, bool]]]:
        """Each segment, by address, as its blocks' ``(size, allocated)`` in order."""
        out = []
        for seg in sorted(self._segments):
            b, blocks = self._segments[seg][1], []
            while b is not None:
                blocks.append((b.size, b.allocated))
                b = b.next
            out.append(blocks)
        return out


# ---------------------------------------------------------------------------------------
# Traces
# ---------------------------------------------------------------------------------------
def _check_trace(trace):
    if not isinstance(trace, (list, tuple)):
        raise TypeError(f"trace must be a list of (op, id, nbytes) events, got "
                        f"{type(trace).__name__}")
    for i, ev in enumerate(trace):
        if not isinstance(ev, (list, tuple)) or len(ev) != 3 or ev[0] not in ("alloc", "free"):
            raise ValueError(f"trace[{i}] must be ('alloc'|'free', id, nbytes), got {ev!r}")
        check_int(f"trace[{i}] id", ev[1], low=0)
        check_int(f"trace[{i}] nbytes", ev[2], low=0)


def replay(trace, allocator) -> dict:
    """Replay ``trace`` (``('alloc', id, nbytes)`` / ``('free', id, nbytes)`` events) on
    ``allocator`` (``malloc(nbytes) -> handle``, ``free(handle)``). Returns the
    allocator's ``peak_allocated``, ``peak_reserved`` and ``fragmentation``."""
    _check_trace(trace)
    for attr in ("malloc", "free"):
        if not callable(getattr(allocator, attr, None)):
            raise TypeError(f"allocator must have a {attr}() method, got "
                            f"{type(allocator).__name__}")
    handles = {}
    for i, (op, ident, nbytes) in enumerate(trace):
        if op == "alloc":
            if ident in handles:
                raise ValueError(f"trace[{i}]: id {ident} allocated twice without a free")
            handles[ident] = allocator.malloc(nbytes)
        else:
            if ident not in handles:
                raise ValueError(f"trace[{i}]: free of id {ident}, which is not allocated")
            allocator.free(handles.pop(ident))
    pa, pr = int(allocator.peak_allocated), int(allocator.peak_reserved)
    return {"peak_allocated": pa, "peak_reserved": pr,
            "fragmentation": 0.0 if pr == 0 else 1.0 - pa / pr}


def trace_stats(trace) -> dict:
    """The trace itself, without an allocator: events, allocations, and the peak of the
    bytes requested (no rounding, no caching)."""
    _check_trace(trace)
    live, cur, peak, n = {}, 0, 0, 0
    for op, ident, nbytes in trace:
        if op == "alloc":
            live[ident] = nbytes
            cur += nbytes
            n += 1
            peak = max(peak, cur)
        else:
            cur -= live.pop(ident)
    return {"events": len(trace), "allocations": n, "peak_requested": peak}


def load_trace(path=None) -> list[tuple[str, int, int]]:
    """The shipped allocation trace (``scripts/record_alloc_trace.py``) as a list of
    ``(op, id, nbytes)``."""
    p = TRACE_PATH if path is None else Path(path)
    if not p.exists():
        raise ValueError(f"no trace file at {p}")
    data = json.loads(p.read_text())
    trace = [(("alloc" if op == "a" else "free"), int(i), int(n)) for op, i, n in data["events"]]
    _check_trace(trace)
    return trace
