"""The lab-05 checkers pass right answers, catch planted bugs and refuse the library's own.

Right answers: the library's (utils.allocator) with refusal switched off, and an allocator
written here independently of it (`Alloc`), which also carries each planted bug as a flag.
"""
import resource

import pytest

from utils import allocator as A
from utils.checks import ExerciseFailed, LibraryAnswer, allow_library_answers
from utils.checks import ch05 as check

MiB = 1 << 20


def good_round(n):
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError("nbytes must be an int")
    if n < 0:
        raise ValueError("nbytes must be >= 0")
    return max(512, (n + 511) // 512 * 512)


def good_segment(n):
    s = good_round(n)
    return 2 * MiB if s <= MiB else 20 * MiB if s < 10 * MiB else (s + 2 * MiB - 1) // (2 * MiB) * 2 * MiB


class Alloc:
    """A caching allocator written from the lab's specification; flags plant bugs."""
    rounding, fit, coalesce, small_rule, large_rule = True, "best", True, "ge512", "gt1MiB"

    def __init__(self):
        self.blocks = []          # [addr, size, allocated, segment, small]
        self.top = 0
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.live = {}

    def malloc(self, n):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"bad nbytes {n!r}")
        size = good_round(n) if self.rounding else max(n, 1)
        small = size <= MiB
        free = [b for b in self.blocks if not b[2] and b[4] == small and b[1] >= size]
        if free:
            key = (lambda b: (b[1], b[0])) if self.fit == "best" else (lambda b: b[0])
            blk = min(free, key=key)
        else:
            seg = good_segment(n) if self.rounding else (2 * MiB if small else 20 * MiB if size < 10 * MiB else size)
            blk = [self.top, seg, False, self.top, small]
            self.top += seg + (1 << 30)
            self.blocks.append(blk)
            self.reserved += seg
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        rem = blk[1] - size
        rule = self.small_rule if small else self.large_rule
        split = {"ge512": rem >= 512, "gt512": rem > 512, "gt1MiB": rem > MiB}[rule]
        if split:
            self.blocks.append([blk[0] + size, rem, False, blk[3], small])
            blk[1] = size
        blk[2] = True
        self.live[blk[0]] = blk
        self.allocated += blk[1]
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return blk[0]

    def free(self, h):
        blk = self.live.pop(h, None)
        if blk is None:
            raise ValueError(f"free of unknown or freed handle {h}")
        blk[2] = False
        self.allocated -= blk[1]
        if self.coalesce:
            self.blocks.sort()
            merged = True
            while merged:
                merged = False
                for x, y in zip(self.blocks, self.blocks[1:]):
                    if not x[2] and not y[2] and x[3] == y[3] and x[0] + x[1] == y[0]:
                        x[1] += y[1]
                        self.blocks.remove(y)
                        merged = True
                        break


def good_faults(call):
    if not callable(call):
        raise TypeError("call must be callable")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    r = call()
    return r, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def variant(**flags):
    return type("Planted", (Alloc,), flags)


def test_right_answers_pass(capsys):
    check.round_size(good_round)
    check.segment_size(good_segment)
    check.caching_allocator(Alloc)
    check.minor_faults(good_faults)
    with allow_library_answers():
        check.round_size(A.round_size)
        check.segment_size(A.segment_size)
        check.caching_allocator(A.CachingAllocator)
    assert capsys.readouterr().out.count("passed") == 7


@pytest.mark.parametrize("name, reference", [
    ("round_size", A.round_size), ("segment_size", A.segment_size),
    ("caching_allocator", A.CachingAllocator)])
def test_library_reference_is_refused(name, reference):
    with pytest.raises(LibraryAnswer):
        getattr(check, name)(reference)


@pytest.mark.parametrize("bad", [
    lambda n: max(n, 1),                                       # no rounding
    lambda n: (n + 511) // 512 * 512,                          # 0 -> 0, not 512
    lambda n: max(512, (n + 1023) // 1024 * 1024),            # wrong granule
    lambda n: max(512, abs(n) // 512 * 512 + 512),             # rounds exact multiples up
])
def test_round_size_bugs_caught(bad):
    with pytest.raises(ExerciseFailed):
        check.round_size(bad)


def test_round_size_without_validation_caught():
    with pytest.raises(ExerciseFailed, match="-1"):
        check.round_size(lambda n: max(512, (n + 511) // 512 * 512))


@pytest.mark.parametrize("bad", [
    lambda n: 2 * MiB if n <= MiB else 20 * MiB if n < 10 * MiB else (n + 2 * MiB - 1) // (2 * MiB) * 2 * MiB,
    lambda n: 2 * MiB if good_round(n) < MiB else 20 * MiB if good_round(n) < 10 * MiB
    else good_segment(n),                                      # 1 MiB taken as large
    lambda n: 20 * MiB if MiB < good_round(n) <= 10 * MiB else good_segment(n),  # 10 MiB
    lambda n: good_round(n) if good_round(n) >= 10 * MiB else good_segment(n),   # no 2 MiB round
])
def test_segment_size_bugs_caught(bad):
    def guarded(n):
        good_round(n)
        return bad(n)
    with pytest.raises(ExerciseFailed):
        check.segment_size(guarded)


@pytest.mark.parametrize("flags, match", [
    ({"rounding": False}, "allocated|reserved"),
    ({"fit": "first"}, "reserved"),
    ({"coalesce": False}, "reserved"),
    ({"small_rule": "gt1MiB"}, "allocated"),      # small blocks split with the large rule
    ({"small_rule": "gt512"}, "allocated"),       # remaining of exactly 512 B not split
    ({"large_rule": "ge512"}, "allocated"),       # large blocks split down to 512 B
])
def test_allocator_bugs_caught(flags, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.caching_allocator(variant(**flags))


def test_allocator_without_double_free_check_caught():
    class Lenient(Alloc):
        def free(self, h):
            if h in self.live:
                super().free(h)
    with pytest.raises(ExerciseFailed, match="free"):
        check.caching_allocator(Lenient)


def test_fault_counter_bugs_caught():
    with pytest.raises(ExerciseFailed):
        check.minor_faults(lambda call: (call(), -1))
    with pytest.raises(ExerciseFailed):
        check.minor_faults(lambda call: call())
    with pytest.raises(ExerciseFailed):                    # never checks its argument
        check.minor_faults(lambda call: (call() if callable(call) else None, 0))


def test_fault_count_far_off_is_a_warning_not_a_failure(capsys):
    check.minor_faults(lambda call: (good_faults(call)[0], 0) if callable(call)
                       else (_ for _ in ()).throw(TypeError("call")))
    out = capsys.readouterr().out
    assert "passed" in out and "⚠" in out
