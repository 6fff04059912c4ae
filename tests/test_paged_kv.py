"""utils.paged_kv: allocator, block tables, sharing, paged attention, the paged cache and
the usage model. Expected values are worked out by hand in each test."""
import math
import random

import pytest
import torch

from utils import memory, tiny, tiny_corpus
from utils import paged_kv as pk


# -- blocks ------------------------------------------------------------------------------
def test_blocks_needed():
    assert [pk.blocks_needed(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError):
        pk.blocks_needed(3, 0)


def test_allocator_hands_out_low_ids_first_and_reuses_the_last_freed():
    a = pk.BlockAllocator(3)
    assert [a.allocate(), a.allocate()] == [0, 1]
    a.free(0)
    assert a.allocate() == 0
    assert a.allocate() == 2
    with pytest.raises(pk.OutOfBlocks, match="all 3 blocks"):
        a.allocate()
    assert isinstance(pk.OutOfBlocks("x"), MemoryError)


def test_allocator_reference_counts_and_errors():
    a = pk.BlockAllocator(2)
    b = a.allocate()
    assert a.fork(b) == b and a.refcount(b) == 2
    a.free(b)
    assert a.refcount(b) == 1 and a.num_free == 1
    a.free(b)
    assert a.refcount(b) == 0 and a.num_free == 2
    with pytest.raises(ValueError, match="double free"):
        a.free(b)
    assert a.num_free == 2
    with pytest.raises(ValueError, match="is free"):
        a.fork(b)
    for bad in (-1, 2, 1.0, True):
        with pytest.raises(ValueError):
            a.free(bad)
    with pytest.raises(ValueError):
        pk.BlockAllocator(0)


def test_append_slots_grows_a_block_at_a_time():
    m = pk.BlockManager(4, block_size=4)
    assert m.append_slots("a", 3) == ([0, 1, 2], [])           # block 0
    assert m.append_slots("b", 1) == ([4], [])                 # block 1
    assert m.append_slots("a", 3) == ([3, 8, 9], [])           # fills block 0, then block 2
    assert m.block_table("a") == [0, 2] and m.length("a") == 6
    assert m.slot("a", 4) == 8
    with pytest.raises(pk.OutOfBlocks):
        m.append_slots("b", 8)                                 # needs 2 more, 1 free
    assert m.block_table("b") == [1] and m.length("b") == 1 and m.num_free_blocks == 1
    m.free("a")
    assert m.num_free_blocks == 3 and m.block_table("a") == [] and m.length("a") == 0
    with pytest.raises(KeyError):
        m.free("a")


def test_fork_and_copy_on_write_follow_the_vllm_example():
    # Kwon et al. 2023, Fig. 8: a 7-token prompt in blocks of 4, two samples; the first
    # writer copies the shared last block, the second writes in place.
    m = pk.BlockManager(8, block_size=4)
    m.append_slots("A1", 7)
    m.fork("A1", "A2")
    assert m.allocator.refcount(0) == 2 and m.allocator.refcount(1) == 2
    slots, copies = m.append_slots("A1", 1)
    assert copies == [(1, 2)] and slots == [2 * 4 + 3]
    assert m.block_table("A1") == [0, 2] and m.block_table("A2") == [0, 1]
    assert m.allocator.refcount(1) == 1
    assert m.append_slots("A2", 1) == ([1 * 4 + 3], [])
    assert m.copies == 1
    # a full last block needs no copy
    m.fork("A2", "A3")
    assert m.append_slots("A3", 1) == ([3 * 4], [])
    for s in ("A1", "A2", "A3"):
        m.free(s)
    assert m.num_free_blocks == 8


def test_copy_on_write_is_all_or_nothing():
    m = pk.BlockManager(2, block_size=4)
    m.append_slots("a", 2)
    m.fork("a", "b")
    m.append_slots("c", 4)
    with pytest.raises(pk.OutOfBlocks):
        m.append_slots("b", 1)
    assert m.block_table("b") == [0] and m.allocator.refcount(0) == 2 and m.length("b") == 2


def test_prefix_caching_shares_full_blocks_of_equal_prefixes():
    m = pk.BlockManager(10, block_size=2, prefix_caching=True)
    assert m.allocate_prompt("x", [1, 2, 3, 4, 5]) == 0       # blocks 0 [1,2], 1 [3,4], 2 [5]
    assert m.allocate_prompt("y", [1, 2, 3, 4, 9]) == 4       # shares 0 and 1
    assert m.block_table("y") == [0, 1, 3]
    assert m.allocate_prompt("z", [7, 2, 3, 4, 5]) == 0       # same block 1 tokens, other prefix
    assert m.block_table("z") == [4, 5, 6]
    assert m.allocate_prompt("w", [1, 2, 3, 4]) == 2          # the last token must still run
    assert m.block_table("w") == [0, 7]
    assert [m.allocator.refcount(b) for b in (0, 1)] == [3, 2]
    for s in ("x", "y", "z", "w"):
        m.free(s)
    assert m.num_free_blocks == 10 and m._cached == {}
    plain = pk.BlockManager(10, block_size=2)
    plain.allocate_prompt("x", [1, 2, 3, 4, 5])
    assert plain.allocate_prompt("y", [1, 2, 3, 4, 5]) == 0   # no prefix caching: no hits


# -- attention ---------------------------------------------------------------------------
def _reference_attention(q, k, v):
    """softmax(q k / sqrt(d)) v for one query head, written with Python sums (float64)."""
    d = len(q)
    scores = [sum(q[i] * kk[i] for i in range(d)) / math.sqrt(d) for kk in k]
    top = max(scores)
    w = [math.exp(s - top) for s in scores]
    z = sum(w)
    return [sum(w[j] * v[j][i] for j in range(len(v))) / z for i in range(d)]


def test_paged_attention_matches_a_hand_written_reference():
    g = torch.Generator().manual_seed(3)
    H, hkv, d, bs = 4, 2, 3, 2
    kp = torch.randn(6, hkv, bs, d, generator=g, dtype=torch.float64)
    vp = torch.randn(6, hkv, bs, d, generator=g, dtype=torch.float64)
    q = torch.randn(2, H, d, generator=g, dtype=torch.float64)
    tables = torch.tensor([[4, 1, 0], [2, 5, 5]])
    lengths = torch.tensor([5, 3])
    out = pk.paged_attention(q, kp, vp, tables, lengths)
    assert out.shape == (2, H, d) and out.dtype == torch.float64
    for b in range(2):
        L = int(lengths[b])
        blocks = [int(x) for x in tables[b]]
        for h in range(H):
            kv_head = h // (H // hkv)
            k = [kp[blocks[p // bs], kv_head, p % bs].tolist() for p in range(L)]
            v = [vp[blocks[p // bs], kv_head, p % bs].tolist() for p in range(L)]
            want = _reference_attention(q[b, h].tolist(), k, v)
            assert out[b, h].tolist() == pytest.approx(want, abs=1e-12)


def test_gather_kv_puts_positions_in_order():
    pool = torch.arange(3 * 1 * 2 * 1, dtype=torch.float32).reshape(3, 1, 2, 1)   # block b holds 2b, 2b+1
    assert pk.gather_kv(pool, [2, 0], 3).flatten().tolist() == [4, 5, 0]
    with pytest.raises(ValueError):
        pk.gather_kv(pool, [2], 3)


# -- the paged cache on the tiny model -----------------------------------------------------
@pytest.fixture(scope="module")
def model():
    before = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny tensors: one thread is faster and steadier
    yield tiny.load("tiny-target")
    torch.set_num_threads(before)


def test_paged_cache_generates_the_same_tokens(model):
    pool = pk.KVPool(model.config, pk.BlockManager(64, block_size=4))
    for text in tiny_corpus.prompts(2, seed=5):
        ids = tiny.TOKENIZER.encode(text)
        made = []
        got = tiny.generate(model, ids, 12, cache_factory=lambda c: made.append(pk.PagedKVCache(pool)) or made[-1])
        assert got == tiny.generate(model, ids, 12)
        assert pool.manager.blocks_in_use == -(-(len(ids) + 11) // 4)
        made[0].free()
    assert pool.manager.num_free_blocks == 64
    assert pool.bytes_per_block == 2 * 4 * 2 * 4 * 32 * 4    # K+V, layers, KV heads, slots, dim, fp32


def test_prefix_cached_prompt_skips_the_cached_tokens(model):
    pool = pk.KVPool(model.config, pk.BlockManager(64, block_size=4, prefix_caching=True))
    system = tiny.TOKENIZER.encode("q: what does the cow say? a: moo. ")
    full = torch.tensor(system + tiny.TOKENIZER.encode("the sky is"))[None]
    first = pk.PagedKVCache(pool, ["first"], start=[pool.manager.allocate_prompt("first", full[0].tolist())])
    want = model.prefill(full, first)[:, -1]
    second = torch.tensor(system + tiny.TOKENIZER.encode("a: snow is"))[None]   # differs right after the system prompt
    cached = pool.manager.allocate_prompt("second", second[0].tolist())
    assert cached == len(system) // 4 * 4 == 32          # 34 shared tokens: 8 full blocks
    cache = pk.PagedKVCache(pool, ["second"], start=[cached])
    got = model.prefill(second[:, cached:], cache)[:, -1]
    ref = model.prefill(second, tiny.ContiguousKVCache(model.config, max_len=64))[:, -1]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(want, ref)


# -- the usage model -------------------------------------------------------------------------
def test_kv_usage_by_hand():
    # (3, 2): after pass 1 the cache holds 3 tokens, after pass 2 it holds 4 (= F).
    # (5, 1): one pass, 5 tokens (= F).
    trace = [(3, 2), (5, 1)]
    u = pk.kv_usage(trace, "max", max_len=8)
    assert (u.steps, u.token_slots, u.reserved_slots, u.unused_slots) == (3, 12, 1, 24 - 13)
    u = pk.kv_usage(trace, "oracle", max_len=8)
    assert (u.token_slots, u.reserved_slots, u.unused_slots) == (12, 1, 0)
    u = pk.kv_usage(trace, "pow2", max_len=8)        # reserves 3 + 2 = 5 and 5 + 1 = 6
    assert (u.token_slots, u.reserved_slots, u.unused_slots) == (12, 1, 2 + 1)
    u = pk.kv_usage(trace, "paged", block_size=4)    # holds 4, 4 and 8 slots
    assert (u.token_slots, u.reserved_slots, u.unused_slots) == (12, 1, 3)
    assert u.allocated_slots == 16 and u.used_share == 0.75 and u.mean_slots == 16 / 3
    assert pk.max_concurrent(u, 100) == 100 * 3 // 16
    assert pk.max_concurrent(pk.kv_usage(trace, "max", max_len=8), 100) == 100 // 8
    with pytest.raises(ValueError, match="more than max_len"):
        pk.kv_usage([(8, 2)], "max", max_len=8)
    with pytest.raises(ValueError, match="unknown scheme"):
        pk.kv_usage(trace, "buddy")


def test_request_trace_is_seeded_and_bounded():
    trace = pk.request_trace(500, seed=4, prompt_median=300, output_median=200, sigma=1.5, max_len=1024)
    assert trace == pk.request_trace(500, seed=4, prompt_median=300, output_median=200, sigma=1.5, max_len=1024)
    assert all(p >= 1 and o >= 1 and p + o <= 1024 for p, o in trace)
    rng = random.Random(4)
    p0 = round(rng.lognormvariate(math.log(300), 1.5))
    o0 = round(rng.lognormvariate(math.log(200), 1.5))
    assert trace[0] == (min(max(1, p0), 1023), min(max(1, o0), 1024 - min(max(1, p0), 1023)))


def test_paging_wastes_under_a_block_per_request():
    trace = pk.request_trace(300, seed=1)
    u = pk.kv_usage(trace, "paged", block_size=16)
    assert (u.reserved_slots + u.unused_slots) < 16 * u.steps
    assert pk.kv_usage(trace, "max").used_share < pk.kv_usage(trace, "pow2").used_share \
        < pk.kv_usage(trace, "oracle").used_share < u.used_share


# -- published numbers ---------------------------------------------------------------------
def test_published_numbers_agree_with_each_other():
    fig13 = pk.PUBLISHED["vllm_batched_requests_sharegpt"]
    assert round(fig13["vllm"] / fig13["orca_max"], 1) == 4.3      # Section 6.2
    assert round(fig13["vllm"] / fig13["orca_oracle"], 1) == 2.2
    share = pk.PUBLISHED["vllm_token_state_share"]
    assert (share["orca_max"], share["orca_oracle"]) == (0.204, 0.382)   # Section 1
    assert 1 - share["vllm"] < 0.04
    assert pk.PUBLISHED["vllm_default_block_size"]["tokens"] == 16
    mla = pk.PUBLISHED["deepseek_v2_mla"]
    assert mla["d_c"] == 4 * mla["head_dim"] and mla["d_rope"] == mla["head_dim"] // 2   # Table 1's 9/2 d_h l
    assert memory.kv_cache_bytes_per_token("opt-13b") == 2 * 5120 * 40 * 2           # 800 KB, Section 3
