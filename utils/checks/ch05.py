"""Checkers for lab 05, the caching allocator.

The oracles: the rules of PyTorch's CUDA caching allocator as its source states them
(``c10/cuda/CUDACachingAllocator.cpp``: ``round_size``, ``get_allocation_size``,
``get_free_block``, ``should_split``, ``free_block``), computed here from the constants of
``utils.allocator``; hand-worked scenarios whose every block is spelled out below; and the
course's reference allocator replaying the shipped trace of a real training run. Page
faults are measured on this machine, so a count far from the model is a warning only.
"""
from __future__ import annotations

import mmap
import numbers
import tempfile

from .. import allocator as A
from . import (describe, exercise, expect_equal, expect_raises, expect_type, fail,
               measurement_warning)

KiB, MiB = 1024, 1024 * 1024


def _int(x, what, hint="return a plain Python int"):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        fail(f"{what} has the wrong type", "an int", describe(x), hint)
    return int(x)


def _sizes():
    """Request sizes around every boundary of the rules."""
    out = [0, 1, 511, 512, 513, 1000, 1024, 4096, 65_537]
    for edge in (A.K_SMALL_SIZE, A.K_MIN_LARGE_ALLOC, A.K_LARGE_BUFFER, 64 * MiB):
        out += [edge - 512, edge - 511, edge - 1, edge, edge + 1, edge + 511, edge + 512]
    out += [3 * MiB + 7, 10 * MiB - 100, 33 * MiB + 1]
    return out


def _round(n):
    return max(512, -(-n // 512) * 512)


def _segment(n):
    s = _round(n)
    if s <= A.K_SMALL_SIZE:
        return A.K_SMALL_BUFFER
    if s < A.K_MIN_LARGE_ALLOC:
        return A.K_LARGE_BUFFER
    return -(-s // A.K_ROUND_LARGE) * A.K_ROUND_LARGE


def _bad_sizes(fn, name):
    expect_raises(lambda: fn(-1), ValueError, f"{name}(-1)",
                  "a ValueError that says the size is negative",
                  "check nbytes >= 0 first and raise ValueError naming nbytes")
    expect_raises(lambda: fn(1.5), (TypeError, ValueError), f"{name}(1.5)",
                  "a TypeError or ValueError: sizes are whole bytes",
                  "accept only ints (not bool, not float)")
    expect_raises(lambda: fn(True), (TypeError, ValueError), f"{name}(True)",
                  "a TypeError or ValueError: a bool is not a size", "refuse bool explicitly")


# --------------------------------------------------------------------------- exercise 1
@exercise
def round_size(fn):
    """``fn(nbytes) -> int``: the size a request is rounded to."""
    for n in _sizes():
        expect_equal(_int(fn(n), f"round_size({n})"), _round(n), f"round_size({n})",
                     hint="at least kMinBlockSize (512), and a multiple of 512 at or above n")
    _bad_sizes(fn, "round_size")
    return f"{len(_sizes())} sizes around 512 B, 1 MiB, 10 MiB, 20 MiB, 64 MiB"


# --------------------------------------------------------------------------- exercise 2
@exercise
def segment_size(fn):
    """``fn(nbytes) -> int``: the bytes a new segment for the request reserves."""
    for n in _sizes():
        expect_equal(_int(fn(n), f"segment_size({n})"), _segment(n), f"segment_size({n})",
                     hint="decide on the ROUNDED size: <= 1 MiB -> 2 MiB; < 10 MiB -> 20 MiB; "
                          "else round up to a multiple of 2 MiB")
    _bad_sizes(fn, "segment_size")
    return "small 2 MiB, mid 20 MiB, large rounded to 2 MiB, on the rounded size"


# --------------------------------------------------------------------------- exercise 3
def _stats(a, what):
    return {k: _int(getattr(a, k), f"{what}: {k}") for k in
            ("allocated", "reserved", "peak_allocated", "peak_reserved")}


def _expect_stats(a, what, **want):
    got = _stats(a, what)
    for k, v in want.items():
        expect_equal(got[k], v, f"{what}: {k}", hint=_HINTS.get(k, ""))


_HINTS = {
    "allocated": "allocated counts the size of each block handed out: the rounded size if the "
                 "block was split, the whole block if it was not",
    "reserved": "reserved is the sum of the segments asked of the device (segment_size of the "
                "request on a miss); a hit in the cache reserves nothing",
}


@exercise
def caching_allocator(cls):
    """``cls()``: malloc/free with two pools, best fit, splitting, coalescing."""
    # 1. rounding and the small pool's segment, split with the small-pool rule
    a = cls()
    h1 = a.malloc(100)
    _expect_stats(a, "after malloc(100)", allocated=512, reserved=2 * MiB)
    h2 = a.malloc(1000)
    _expect_stats(a, "after malloc(100), malloc(1000)", allocated=512 + 1024, reserved=2 * MiB)
    h3 = a.malloc(768 * KiB)
    h4 = a.malloc(512 * KiB)       # the free rest is 1278.5 KiB: split, though under 1 MiB
    _expect_stats(a, "after malloc(100), malloc(1000), malloc(768 KiB), malloc(512 KiB)",
                  allocated=1536 + 1280 * KiB, reserved=2 * MiB)
    for h in (h1, h2, h3, h4):
        a.free(h)
    _expect_stats(a, "after freeing everything", allocated=0, reserved=2 * MiB,
                  peak_allocated=1536 + 1280 * KiB, peak_reserved=2 * MiB)
    # coalescing: the whole 2 MiB is one free block again, so 1 MiB twice fits
    h1 = a.malloc(MiB)
    h2 = a.malloc(MiB - 512)       # the rest is exactly 512 B: still split (>= kMinBlockSize)
    _expect_stats(a, "malloc(1 MiB), malloc(1 MiB - 512) after freeing the segment",
                  allocated=2 * MiB - 512, reserved=2 * MiB)
    h3 = a.malloc(512)             # takes the last 512 B of the segment
    _expect_stats(a, "malloc(512) into the last 512 B", allocated=2 * MiB, reserved=2 * MiB)
    for h in (h1, h2, h3):
        a.free(h)

    # 3. best fit: the smallest free block that is large enough, not the first
    a = cls()
    b0, b1 = a.malloc(64 * KiB), a.malloc(64 * KiB)
    b2, b3 = a.malloc(32 * KiB), a.malloc(32 * KiB)
    b4, b5 = a.malloc(MiB), a.malloc(832 * KiB)     # fill the 2 MiB segment exactly
    _expect_stats(a, "after filling one 2 MiB segment", allocated=2 * MiB, reserved=2 * MiB)
    a.free(b0)                                       # a 64 KiB hole at the front
    a.free(b2)                                       # a 32 KiB hole after b1
    c = a.malloc(32 * KiB)                           # best fit: the 32 KiB hole
    d = a.malloc(64 * KiB)                           # ... so the 64 KiB hole is still whole
    _expect_stats(a, "malloc(32 KiB), malloc(64 KiB) with a 64 KiB and a 32 KiB hole",
                  allocated=2 * MiB, reserved=2 * MiB)
    for x in (b1, b3, b4, b5, c, d):
        a.free(x)
    _expect_stats(a, "after the best-fit scenario is freed", allocated=0, reserved=2 * MiB)
    h1, h2 = a.malloc(MiB), a.malloc(MiB)   # fit only if the freed blocks merged back
    _expect_stats(a, "malloc(1 MiB) twice after freeing every block of the segment",
                  allocated=2 * MiB, reserved=2 * MiB)
    a.free(h2), a.free(h1)

    # 4. large pool: 1-10 MiB takes a 20 MiB segment, split (remaining > 1 MiB)
    a = cls()
    x = a.malloc(3 * MiB)
    _expect_stats(a, "malloc(3 MiB)", allocated=3 * MiB, reserved=20 * MiB)
    y = a.malloc(int(16.5 * MiB))                  # rest is 17 MiB: fits, rest 0.5 MiB
    _expect_stats(a, "malloc(16.5 MiB) into the 17 MiB left of the 20 MiB segment",
                  allocated=20 * MiB, reserved=20 * MiB)
    a.free(y)
    y = a.malloc(2 * MiB)                           # rest 15 MiB > 1 MiB: split
    _expect_stats(a, "malloc(2 MiB) into the 17 MiB free block", allocated=5 * MiB,
                  reserved=20 * MiB)
    z = a.malloc(12 * MiB)                          # >= 10 MiB: 12 MiB fits the 15 MiB rest
    _expect_stats(a, "malloc(12 MiB) into the 15 MiB free block (rest 3 MiB > 1 MiB)",
                  allocated=17 * MiB, reserved=20 * MiB)
    w = a.malloc(21 * MiB + 1)
    _expect_stats(a, "malloc(21 MiB + 1): a new segment rounded to 2 MiB",
                  allocated=17 * MiB + 22 * MiB, reserved=42 * MiB)
    # small requests never use the large pool
    s = a.malloc(512)
    _expect_stats(a, "malloc(512) with 3 MiB free in the large pool", reserved=44 * MiB)
    for q in (x, y, z, w, s):
        a.free(q)
    _expect_stats(a, "after the large-pool scenario is freed", allocated=0, reserved=44 * MiB,
                  peak_reserved=44 * MiB)

    # 5. bad input
    a = cls()
    expect_raises(lambda: a.malloc(-1), ValueError, "malloc(-1)",
                  "a ValueError: a size cannot be negative", "validate nbytes first")
    h = a.malloc(10)
    a.free(h)
    expect_raises(lambda: a.free(h), ValueError, "free() of a block freed already",
                  "a ValueError (double free)", "keep the live handles; refuse one not in it")
    expect_raises(lambda: a.free(123456789), (ValueError, KeyError),
                  "free() of a handle never allocated", "a ValueError",
                  "keep the live handles; refuse one not in it")
    _expect_stats(a, "after rejected frees", allocated=0, reserved=2 * MiB)

    # 6. the real trace: peaks held to the reference allocator
    trace = A.load_trace()
    ref = A.replay(trace, A.CachingAllocator())
    got = A.replay(trace, cls())
    expect_equal(got["peak_allocated"], ref["peak_allocated"],
                 "peak allocated replaying the training trace",
                 hint="allocated is the sum of handed-out block sizes; check splitting")
    expect_equal(got["peak_reserved"], ref["peak_reserved"],
                 "peak reserved replaying the training trace",
                 hint="check best fit, the split rules of each pool, and coalescing on free")
    return (f"trace of {len(trace)} events: peak allocated {got['peak_allocated'] / MiB:.1f} MiB, "
            f"reserved {got['peak_reserved'] / MiB:.1f} MiB, "
            f"fragmentation {got['fragmentation']:.1%}")


# --------------------------------------------------------------------------- exercise 4
@exercise
def minor_faults(fn):
    """``fn(call) -> (result, faults)``: the minor page faults a call causes."""
    got = fn(lambda: 41 + 1)
    expect_type(got, tuple, "minor_faults(call)", hint="return (call(), faults)")
    if len(got) != 2:
        fail("minor_faults(call) returned the wrong number of values", "(result, faults)",
             describe(got), "return a 2-tuple")
    expect_equal(got[0], 42, "minor_faults(call)[0]", hint="return what call() returned")
    if _int(got[1], "the fault count") < 0:
        fail("a negative fault count", "faults >= 0", str(got[1]),
             "subtract the count before the call from the count after")
    expect_raises(lambda: fn(42), TypeError, "minor_faults(42)",
                  "a TypeError: call must be callable", "check callable(call)")
    page, n = mmap.PAGESIZE, 1024
    with tempfile.TemporaryFile() as f:
        f.truncate(n * page)
        mm = mmap.mmap(f.fileno(), n * page)
        try:
            def touch():
                for i in range(0, n * page, page):
                    mm[i] = 1
                return n
            r, faults = fn(touch)
        finally:
            mm.close()
    expect_equal(r, n, "minor_faults(touch)[0]")
    faults = _int(faults, "the fault count")
    if not n // 32 <= faults <= 2 * n:
        measurement_warning(f"minor faults writing one byte to each of {n} fresh file pages",
                            f"about one per page (between {n // 32} and {2 * n})", str(faults),
                            "the kernel maps several pages per fault (large folios, "
                            "fault-around), or another thread faulted at the same time")
    return f"{faults} minor faults for {n} fresh pages touched"
