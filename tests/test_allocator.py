"""utils.allocator: the rules of PyTorch's CUDA caching allocator, the reference model,
the shipped trace, bad input, and (on a GPU) the real allocator's peaks on the same trace."""
import subprocess
import sys

import pytest

from utils import allocator as A

MiB = 1 << 20


def test_constants_are_the_sources():
    # c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize, kSmallSize, kSmallBuffer,
    # kLargeBuffer, kMinLargeAlloc, kRoundLarge
    assert (A.K_MIN_BLOCK_SIZE, A.K_SMALL_SIZE, A.K_SMALL_BUFFER, A.K_LARGE_BUFFER,
            A.K_MIN_LARGE_ALLOC, A.K_ROUND_LARGE) == (512, MiB, 2 * MiB, 20 * MiB, 10 * MiB, 2 * MiB)


@pytest.mark.parametrize("n, r, seg", [
    (0, 512, 2 * MiB), (1, 512, 2 * MiB), (513, 1024, 2 * MiB), (MiB, MiB, 2 * MiB),
    (MiB + 1, MiB + 512, 20 * MiB), (10 * MiB - 1, 10 * MiB, 10 * MiB),
    (10 * MiB - 513, 10 * MiB - 512, 20 * MiB), (21 * MiB, 21 * MiB, 22 * MiB)])
def test_rules_by_hand(n, r, seg):
    assert A.round_size(n) == r
    assert A.segment_size(n) == seg


def test_should_split():
    assert A.should_split(2 * MiB, 2 * MiB - 512, True)
    assert not A.should_split(2 * MiB, 2 * MiB, True)
    assert not A.should_split(20 * MiB, 19 * MiB, False)          # remaining exactly 1 MiB
    assert A.should_split(20 * MiB, 19 * MiB - 512, False)
    assert not A.should_split(40 * MiB, 30 * MiB, False, max_split_size=30 * MiB)
    assert A.should_split(20 * MiB, 19 * MiB, False, expandable=True)


@pytest.mark.parametrize("call", [
    lambda: A.round_size(-1), lambda: A.round_size(1.5), lambda: A.round_size(True),
    lambda: A.segment_size(-5), lambda: A.round_size(float("nan")),
    lambda: A.should_split(10, 20, True), lambda: A.CachingAllocator(capacity=0),
    lambda: A.CachingAllocator(max_split_size=-1), lambda: A.CachingAllocator().malloc(-1),
    lambda: A.CachingAllocator().free(42), lambda: A.replay([("alloc", 0, -3)], A.CachingAllocator()),
    lambda: A.replay([("free", 0, 3)], A.CachingAllocator()), lambda: A.replay("x", A.CachingAllocator()),
])
def test_bad_input_is_a_clear_error(call):
    with pytest.raises((ValueError, TypeError)):
        call()


def test_double_free_names_the_problem():
    a = A.CachingAllocator()
    h = a.malloc(100)
    a.free(h)
    with pytest.raises(ValueError, match="already freed"):
        a.free(h)


def test_blocks_coalesce_and_segments_are_whole_again():
    a = A.CachingAllocator()
    hs = [a.malloc(100 * 1024) for _ in range(5)]
    for h in hs[::2] + hs[1::2]:
        a.free(h)
    assert a.segments() == [[(2 * MiB, False)]]
    a.empty_cache()
    assert a.reserved == 0 and a.segments() == []


def test_reserved_but_unallocated_causes_oom_and_empty_cache_rescues():
    a = A.CachingAllocator(capacity=30 * MiB)
    x = a.malloc(12 * MiB)
    y = a.malloc(12 * MiB)
    a.free(x)
    z = a.malloc(14 * MiB)          # 12 MiB cached block too small: cache released, retried
    assert a.reserved == 26 * MiB
    with pytest.raises(MemoryError, match="reserved but unallocated"):
        a.malloc(16 * MiB)
    a.free(y), a.free(z)


def test_trace_is_real_and_replays():
    t = A.load_trace()
    st = A.trace_stats(t)
    assert st["allocations"] > 1000
    live = set()
    for op, i, n in t:
        assert (op == "alloc") == (i not in live)
        (live.add if op == "alloc" else live.discard)(i)
    r = A.replay(t, A.CachingAllocator())
    assert st["peak_requested"] <= r["peak_allocated"] <= r["peak_reserved"]
    assert 0 <= r["fragmentation"] < 1
    # rounding adds at most 511 B per live block
    assert r["peak_allocated"] - st["peak_requested"] < 0.05 * st["peak_requested"]


_GPU_REPLAY = r"""
import json, torch
from utils import allocator as A
t = A.load_trace()
torch.cuda.init()
torch.cuda.reset_peak_memory_stats()
live = {}
for op, i, n in t:
    if op == "alloc":
        live[i] = torch.empty(n, dtype=torch.uint8, device="cuda")
    else:
        del live[i]
torch.cuda.synchronize()
s = torch.cuda.memory_stats()
ref = A.replay(t, A.CachingAllocator())
print(json.dumps({"real_allocated": s["allocated_bytes.all.peak"],
                  "real_reserved": s["reserved_bytes.all.peak"], **ref}))
"""


@pytest.mark.gpu
def test_real_cuda_allocator_peaks_equal_the_reference():
    import json
    out = subprocess.run([sys.executable, "-c", _GPU_REPLAY], capture_output=True, text=True,
                         timeout=300, check=True).stdout.strip().splitlines()[-1]
    d = json.loads(out)
    assert d["real_allocated"] == d["peak_allocated"]
    assert d["real_reserved"] == d["peak_reserved"]
