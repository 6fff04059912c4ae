"""Checkers for lab 17, KV cache and PagedAttention.

The oracles: the allocator rules stated in the lab (each scenario below spells out the
state it expects); ``torch.nn.functional.scaled_dot_product_attention`` on the contiguous
cache, with the KV heads expanded for grouped-query attention, for paged attention; and the
tiny target model with its contiguous cache (``utils.tiny.ContiguousKVCache``) for the
paged KV cache, token for token.
"""
from __future__ import annotations

import contextlib
import numbers

import torch
import torch.nn.functional as F

from .. import tiny, tiny_corpus
from ..paged_kv import KVPool
from . import (ExerciseFailed, describe, exercise, expect_close, expect_dtype, expect_equal,
               expect_raises, expect_shape, expect_type, fail)


# --------------------------------------------------------------------------- helpers


def _int(x, what, hint="return a plain Python int"):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        fail(f"{what} has the wrong type", "an int", describe(x), hint)
    return int(x)


def _slots_and_copies(got, what):
    expect_type(got, tuple, what, hint="return a tuple (slots, copies)")
    if len(got) != 2:
        fail(f"{what} has the wrong length", "a tuple of two lists (slots, copies)",
             describe(got), "return slots, copies")
    slots, copies = got
    expect_type(slots, (list, tuple), f"{what}: slots", hint="return the slots as a list of ints")
    expect_type(copies, (list, tuple), f"{what}: copies",
                hint="return the copies as a list of (src_block, dst_block) pairs ([] if none)")
    slots = [_int(s, f"{what}: a slot") for s in slots]
    pairs = []
    for c in copies:
        if not isinstance(c, (list, tuple)) or len(c) != 2:
            fail(f"{what}: a copy has the wrong form", "a pair (src_block, dst_block)", describe(c),
                 "each copy-on-write copy is one (src, dst) pair of block ids")
        pairs.append((_int(c[0], f"{what}: a copy's source"), _int(c[1], f"{what}: a copy's target")))
    return slots, pairs


def _expected_slots(m, seq, start, n):
    table, B = list(m.block_table(seq)), m.block_size
    return [table[p // B] * B + p % B for p in range(start, start + n)]


def _state(m, seqs):
    return ({s: list(m.block_table(s)) for s in seqs}, {s: m.length(s) for s in seqs},
            m.allocator.num_free)


# --------------------------------------------------------------------------- exercise 1

@exercise
def block_allocator(cls):
    """``cls(num_blocks)``: allocate / fork / free with a free list and reference counts."""
    a = cls(4)
    expect_equal(_int(a.num_free, "num_free of a new allocator"), 4, "num_free of a new allocator(4)",
                 hint="every block starts on the free list")
    for b in range(4):
        expect_equal(_int(a.refcount(b), f"refcount({b})"), 0, f"refcount({b}) of a new allocator",
                     hint="a free block has no references")
    ids = [_int(a.allocate(), "allocate()") for _ in range(4)]
    if sorted(ids) != [0, 1, 2, 3]:
        fail("allocate() four times on allocator(4) gave wrong blocks",
             "the four different block ids 0, 1, 2, 3 in some order", f"{ids}",
             "pop a block id off the free list each time; never hand out a block twice")
    expect_equal(a.num_free, 0, "num_free after allocating every block")
    for b in ids:
        expect_equal(a.refcount(b), 1, f"refcount({b}) after allocate()",
                     hint="a newly allocated block has one reference")
    err = expect_raises(a.allocate, MemoryError, "allocate() when every block is in use",
                  "a MemoryError that says the pool is exhausted",
                  "check the free list first: raise MemoryError('out of KV blocks: ...')")
    if not str(err):
        fail("allocate() when every block is in use raised a MemoryError without a message",
             "a message that says what ran out", "an empty message",
             "e.g. MemoryError(f'out of KV blocks: all {self.num_blocks} in use')")
    expect_equal(a.num_free, 0, "num_free after a failed allocate()")

    b0 = ids[0]
    a.fork(b0)
    expect_equal(a.refcount(b0), 2, f"refcount({b0}) after fork({b0})",
                 hint="fork adds one reference to the same block; nothing is allocated")
    expect_equal(a.num_free, 0, "num_free after fork()", hint="fork must not take a block")
    a.free(b0)
    expect_equal(a.refcount(b0), 1, f"refcount({b0}) after fork then free",
                 hint="free drops one reference; the block stays in use while others map it")
    expect_equal(a.num_free, 0, "num_free after freeing a block that is still shared",
                 hint="only put a block back on the free list when its count reaches 0")
    a.free(b0)
    expect_equal(a.refcount(b0), 0, f"refcount({b0}) after its last free")
    expect_equal(a.num_free, 1, "num_free after the last reference is freed")
    expect_raises(lambda: a.free(b0), ValueError, f"free({b0}) of a block that is already free",
            "a ValueError (double free)", "a block whose count is 0 is free: raise ValueError")
    expect_equal(a.num_free, 1, "num_free after a rejected double free",
                 hint="a rejected free must not put the block on the free list a second time")
    expect_equal(a.allocate(), b0, "allocate() with one free block",
                 hint="the only free block is the one just freed")
    expect_raises(a.allocate, MemoryError, "allocate() after the only free block was taken again",
            "a MemoryError", "a double free must not leave the block on the free list twice")
    a.free(ids[1])
    expect_raises(lambda: a.fork(ids[1]), ValueError, "fork() of a free block",
            "a ValueError", "only an allocated block (count >= 1) can be shared")
    for bad in (-1, 4, 10):
        expect_raises(lambda: a.free(bad), ValueError, f"free({bad}) on allocator(4)",
                "a ValueError naming the bad block id", "check 0 <= block < num_blocks")
        expect_raises(lambda: a.fork(bad), ValueError, f"fork({bad}) on allocator(4)",
                "a ValueError", "check 0 <= block < num_blocks")

    big = cls(1000)
    got = [big.allocate() for _ in range(1000)]
    if len(set(got)) != 1000:
        fail("allocate() 1000 times on allocator(1000) repeated a block",
             "1000 different blocks", f"{len(set(got))} different blocks",
             "a block leaves the free list when allocated")
    for b in got[::-1]:
        big.free(b)
    expect_equal(big.num_free, 1000, "num_free after freeing all 1000 blocks")
    again = sorted(big.allocate() for _ in range(1000))
    expect_equal(again, list(range(1000)), "the blocks allocated after freeing everything",
                 hint="every freed block must be reusable")
    return "free list, reference counts, fork/free, MemoryError on exhaustion, ValueError on double free"


# --------------------------------------------------------------------------- exercise 2

@exercise
def block_manager(cls):
    """``cls(num_blocks, block_size)``: ``append_slots`` grows a block table a block at a time."""
    m = cls(6, 4)
    got = _slots_and_copies(m.append_slots("a", 0), "append_slots('a', 0)")
    expect_equal(got, ([], []), "append_slots('a', 0)", hint="no tokens, no slots and no blocks")
    expect_equal(m.allocator.num_free, 6, "free blocks after append_slots('a', 0)",
                 hint="take a block only when a token needs it")
    history = {"a": 0, "b": 0}
    plan = [("a", 1, 1), ("a", 3, 1), ("a", 1, 2), ("b", 6, 2), ("a", 2, 2)]
    for seq, n, blocks in plan:
        start = history[seq]
        slots, copies = _slots_and_copies(m.append_slots(seq, n), f"append_slots({seq!r}, {n})")
        history[seq] += n
        what = f"after append_slots({seq!r}, {n}) (now {history[seq]} tokens, block size 4)"
        expect_equal(m.length(seq), history[seq], f"length({seq!r}) {what}")
        expect_equal(len(m.block_table(seq)), blocks, f"the number of blocks in {seq!r}'s table {what}",
                     hint="a sequence of L tokens holds ceil(L / block_size) blocks: allocate a "
                          "new block only when the last one is full")
        expect_equal(slots, _expected_slots(m, seq, start, n), f"the slots returned {what}",
                     hint="token p of a sequence lives in slot table[p // B] * B + p % B")
        expect_equal(copies, [], f"the copies returned {what}",
                     hint="nothing is shared here, so there is nothing to copy")
    ta, tb = m.block_table("a"), m.block_table("b")
    if set(ta) & set(tb) or len(set(ta + tb)) != len(ta + tb):
        fail("two sequences share a block", "different blocks for 'a' and 'b'",
             f"'a': {ta}, 'b': {tb}", "take every new block from the allocator")
    expect_equal(m.allocator.num_free, 2, "free blocks with 'a' at 7 tokens and 'b' at 6 (6 blocks of 4)")

    before = _state(m, ["a", "b"])
    expect_raises(lambda: m.append_slots("b", 11), MemoryError,
            "append_slots('b', 11) needing 3 new blocks when 2 are free",
            "a MemoryError", "count the blocks needed first and raise before allocating any")
    if _state(m, ["a", "b"]) != before:
        fail("a failed append_slots changed the manager", f"nothing changed: {before}",
             f"{_state(m, ['a', 'b'])}", "all or nothing: check that enough blocks are free "
             "before taking any (a half-grown table would leak blocks)")
    expect_raises(lambda: m.append_slots("a", -1), ValueError, "append_slots('a', -1)",
            "a ValueError", "n must be >= 0")

    m.free("a")
    expect_equal(m.allocator.num_free, 4, "free blocks after free('a')",
                 hint="free every block in the sequence's table")
    expect_equal((m.block_table("a"), m.length("a")), ([], 0), "block_table('a') and length('a') after free('a')",
                 hint="forget the sequence: delete its table and its length")
    expect_raises(lambda: m.free("a"), (KeyError, ValueError), "free('a') twice",
            "a KeyError (unknown sequence)", "a freed sequence is unknown")
    slots, _ = _slots_and_copies(m.append_slots("b", 11), "append_slots('b', 11) after 'a' was freed")
    expect_equal(len(m.block_table("b")), 5, "blocks of 'b' at 17 tokens")
    expect_equal(slots, _expected_slots(m, "b", 6, 11), "the slots of append_slots('b', 11)")

    for bs, n in ((1, 5), (16, 3), (16, 33)):
        m2 = cls(8, bs)
        slots, _ = _slots_and_copies(m2.append_slots(7, n), f"append_slots(7, {n}) with block size {bs}")
        expect_equal(len(m2.block_table(7)), -(-n // bs), f"blocks for {n} tokens with block size {bs}")
        expect_equal(slots, _expected_slots(m2, 7, 0, n), f"slots for {n} tokens with block size {bs}")
    return "slots, a block at a time, all-or-nothing MemoryError, free, block sizes 1, 4, 16"


# --------------------------------------------------------------------------- exercise 3

class _Data:
    """A pool of token values addressed by slot, to follow what the learner's copies do."""

    def __init__(self, m):
        self.B = m.block_size
        self.x = torch.full((m.allocator.num_blocks * self.B,), -1.0, dtype=torch.float64)

    def apply(self, copies, slots, values):
        for src, dst in copies:
            self.x[dst * self.B:(dst + 1) * self.B] = self.x[src * self.B:(src + 1) * self.B].clone()
        self.x[torch.tensor(slots, dtype=torch.long)] = torch.tensor(values, dtype=torch.float64)

    def read(self, m, seq):
        B = self.B
        return [float(self.x[m.block_table(seq)[p // B] * B + p % B]) for p in range(m.length(seq))]


@exercise
def copy_on_write(cls):
    """``cls(num_blocks, block_size)`` with ``fork(parent, child)`` and copy-on-write appends."""
    m, B = cls(12, 4), 4
    data = _Data(m)
    want = {}

    def append(seq, values, n_copies, why):
        start = m.length(seq)
        slots, copies = _slots_and_copies(m.append_slots(seq, len(values)),
                                          f"append_slots({seq!r}, {len(values)})")
        if len(copies) != n_copies:
            fail(f"append_slots({seq!r}, {len(values)}) {why}: wrong number of copies",
                 f"{n_copies} copy-on-write cop{'y' if n_copies == 1 else 'ies'}", f"{copies}",
                 "copy the last block only when it is partly filled AND shared (count > 1); "
                 "a full last block is never written again, so it needs no copy")
        expect_equal(slots, _expected_slots(m, seq, start, len(values)),
                     f"the slots of append_slots({seq!r}, {len(values)}) {why}",
                     hint="after a copy the sequence's last block is the new private block")
        data.apply(copies, slots, values)
        want[seq] = want.get(seq, []) + list(values)

    append(0, [10, 11, 12, 13, 14, 15], 0, "on a new sequence")
    table0 = list(m.block_table(0))
    m.fork(0, 1)
    m.fork(0, 2)
    want[1], want[2] = list(want[0]), list(want[0])
    expect_equal((m.block_table(1), m.length(1)), (table0, 6), "block_table(1), length(1) after fork(0, 1)",
                 hint="the child maps the parent's blocks and has its length; no data is copied")
    for b in table0:
        expect_equal(m.allocator.refcount(b), 3, f"refcount({b}) after two forks of sequence 0",
                     hint="fork adds a reference to every block of the parent")
    expect_equal(m.allocator.num_free, 10, "free blocks after fork", hint="fork allocates nothing")

    append(1, [101], 1, "into a shared, partly filled last block")
    expect_equal(m.block_table(1)[0], table0[0], "the first block of sequence 1 after its copy-on-write",
                 hint="only the last block is copied; full blocks stay shared")
    expect_equal(m.allocator.refcount(table0[1]), 2, f"refcount({table0[1]}) after sequence 1 copied it",
                 hint="the writer drops its reference to the shared block it copied")
    append(2, [201, 202], 1, "into a block still shared by sequences 0 and 2")
    expect_equal(m.allocator.refcount(table0[1]), 1, f"refcount({table0[1]}) after sequence 2 copied it")
    append(0, [16], 0, "when sequence 0 is the last one left on its block")
    expect_equal(m.block_table(0), table0, "block_table(0) after writing into its now-private block",
                 hint="a block with count 1 is private: write in place, do not copy")
    expect_equal(m.allocator.refcount(table0[0]), 3, f"refcount({table0[0]}) (the full block)")

    append(3, list(range(300, 308)), 0, "on a new sequence of two full blocks")
    m.fork(3, 4)
    want[4] = list(want[3])
    append(4, [401, 402], 0, "after a fork whose last block is full")
    expect_equal(m.block_table(4)[:2], m.block_table(3), "the first two blocks of sequence 4")
    append(5, [500, 501, 502], 0, "on a new sequence")
    m.fork(5, 6)
    want[6] = list(want[5])
    append(6, list(range(600, 606)), 1, "crossing a block boundary from a shared last block")
    expect_equal(len(m.block_table(6)), 3, "blocks of sequence 6 at 9 tokens")

    for seq in sorted(want):
        got = data.read(m, seq)
        if got != [float(v) for v in want[seq]]:
            fail(f"sequence {seq} reads back the wrong tokens", f"{want[seq]}",
                 f"{[int(v) for v in got]}",
                 "return every copy (src, dst) so the data can be copied before the write, and "
                 "point the table's last entry at the new block")

    expect_raises(lambda: m.fork(99, 100), (KeyError, ValueError), "fork(99, 100) of an unknown parent",
            "a KeyError", "the parent must exist")
    expect_raises(lambda: m.fork(0, 1), ValueError, "fork(0, 1) onto an existing sequence",
            "a ValueError", "the child must be a new sequence")
    for seq in range(7):
        m.free(seq)
    expect_equal(m.allocator.num_free, 12, "free blocks after freeing every sequence",
                 hint="each sequence drops one reference per block; shared blocks free at zero")

    small = cls(3, 4)
    small.append_slots("a", 2)
    small.fork("a", "b")
    small.append_slots("c", 8)
    before = _state(small, ["a", "b", "c"])
    refs = [small.allocator.refcount(b) for b in range(3)]
    expect_raises(lambda: small.append_slots("b", 1), MemoryError,
            "append_slots('b', 1) that needs a copy-on-write block when none is free",
            "a MemoryError", "the copy needs a new block: check before you copy")
    if _state(small, ["a", "b", "c"]) != before or [small.allocator.refcount(b) for b in range(3)] != refs:
        fail("a failed copy-on-write append changed the manager", "nothing changed",
             f"{_state(small, ['a', 'b', 'c'])}", "count the copy's block in the blocks needed "
             "and raise before touching anything")
    return "fork shares blocks, 3 copy-on-write cases, contents read back right, MemoryError leaves state alone"


# --------------------------------------------------------------------------- exercise 4

@exercise
def prefix_sharing(cls):
    """``cls(num_blocks, block_size)`` with ``allocate_prompt(seq, token_ids)`` -> cached tokens."""
    B = 4
    m = cls(16, B)
    A = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]

    def prompt(seq, tokens, cached, why, hint="hash every token from the start through the end "
               "of each full block, and reuse a block whose hash is known"):
        got = _int(m.allocate_prompt(seq, tokens), f"allocate_prompt({seq!r}, ...)")
        expect_equal(got, cached, f"cached tokens for prompt {seq!r} ({len(tokens)} tokens, {why})", hint=hint)
        expect_equal(m.length(seq), len(tokens), f"length({seq!r}) after allocate_prompt",
                     hint="the sequence holds its whole prompt")
        expect_equal(len(m.block_table(seq)), -(-len(tokens) // B), f"blocks of prompt {seq!r}")
        return m.block_table(seq)

    ta = prompt("A", A, 0, "nothing cached yet")
    tb = prompt("B", A[:8] + [40, 41, 42], 8, "same first two blocks as A")
    expect_equal(tb[:2], ta[:2], "the first two blocks of B", hint="a cache hit maps A's block")
    if tb[2] == ta[2]:
        fail("prompt B shares A's partly filled last block", "a new block for B's third block",
             f"B's table {tb}, A's {ta}", "only full blocks are cached and shared")
    for b in ta[:2]:
        expect_equal(m.allocator.refcount(b), 2, f"refcount({b}) shared by A and B",
                     hint="a cache hit adds a reference (fork) to the cached block")
    tc = prompt("C", [99] + A[1:], 0, "block 0 differs, block 1 has A's tokens",
                hint="the key of block i covers the whole prefix through block i, not block i "
                     "alone: the same tokens after a different start are different K/V")
    if set(tc) & set(ta):
        fail("prompt C shares a block with A", "no shared blocks", f"C {tc}, A {ta}",
             "hash the whole prefix, not just the block's own tokens")
    prompt("J", A[4:8] + [50, 51], 0, "starting with the tokens of A's second block",
           hint="the same tokens at other positions after another prefix have other K/V: key "
                "each block by the whole prefix through it, not by its own tokens")
    td = prompt("D", list(A), 8, "identical to A")
    if td[2] == ta[2]:
        fail("prompt D shares A's partly filled last block", "a new last block", f"D {td}, A {ta}",
             "a partly filled block is still being written: never share it")
    te = prompt("E", A[:8], 4, "exactly A's first two blocks",
                hint="match only blocks that end before the prompt's last token: that token "
                     "must still run through the model to give the first output's logits")
    expect_equal(te[0], ta[0], "the first block of E")
    th = prompt("H", A + [15, 16], 8, "A's blocks, then a third full block")
    prompt("I", A + [15, 16, 17], 12, "H's three full blocks, then one more token",
           hint="register every full block of a new prompt, including those after a hit")
    expect_equal(m.block_table("I")[2], th[2], "I's third block", hint="it is H's third block")
    expect_equal(m.allocator.refcount(ta[0]), 6, f"refcount({ta[0]}): A, B, D, E, H and I share it")
    used = 16 - m.allocator.num_free
    expect_equal(used, 3 + 1 + 3 + 2 + 1 + 1 + 1 + 1, "blocks in use after prompts A, B, C, J, D, E, H, I")
    expect_raises(lambda: m.allocate_prompt("A", A), ValueError, "allocate_prompt('A', ...) for an existing sequence",
            "a ValueError", "allocate_prompt starts a new sequence")

    m.free("A")
    prompt("G", list(A), 8, "after A was freed but B, D, H, I still hold its blocks",
           hint="a cached block stays cached while any sequence holds it")
    for s in ("B", "C", "J", "D", "E", "H", "I", "G"):
        m.free(s)
    expect_equal(m.allocator.num_free, 16, "free blocks after freeing every prompt")
    for _ in range(16):                 # reuse every block for something else
        m.allocate_prompt(f"x{_}", [1, 2, 3, 4][:1 + _ % 4])
    for _ in range(16):
        m.free(f"x{_}")
    forget = ("when a block goes back to the free list, forget its hash: the block will be "
              "reused for other tokens")
    try:
        prompt("A2", list(A), 0, "after every block was freed and reused", hint=forget)
    except (ExerciseFailed, NotImplementedError):
        raise
    except Exception as err:
        fail("allocate_prompt('A2', ...) after every block was freed and reused raised an error",
             "0 cached tokens and three new blocks", f"{type(err).__name__}: {err}", forget)

    tiny_pool = cls(4, B)
    expect_raises(lambda: tiny_pool.allocate_prompt("big", list(range(20))), MemoryError,
            "allocate_prompt of 20 tokens (5 blocks) in a pool of 4", "a MemoryError",
            "count the new blocks needed and raise before taking any")
    expect_equal(tiny_pool.allocator.num_free, 4, "free blocks after the failed allocate_prompt",
                 hint="all or nothing")
    return "prefix hashes through each full block, partial blocks private, last token left to run, hashes forgotten on free"


# --------------------------------------------------------------------------- exercise 5

def _scatter_to_pool(k, v, lengths, block_size, num_blocks, generator):
    """Put contiguous K, V [B, Hkv, S, d] into a shuffled pool; returns pools and tables."""
    B, hkv, S, d = k.shape
    perm = torch.randperm(num_blocks, generator=generator)
    max_blocks = -(-S // block_size)
    tables = torch.zeros(B, max_blocks, dtype=torch.long)
    kp = torch.randn(num_blocks, hkv, block_size, d, generator=generator).to(k.dtype) * 3
    vp = torch.randn(num_blocks, hkv, block_size, d, generator=generator).to(k.dtype) * 3
    used = 0
    for b in range(B):
        L = int(lengths[b])
        nb = -(-L // block_size)
        blocks = perm[used:used + nb]
        used += nb
        tables[b, :nb] = blocks
        for p in range(L):
            kp[blocks[p // block_size], :, p % block_size] = k[b, :, p]
            vp[blocks[p // block_size], :, p % block_size] = v[b, :, p]
    return kp, vp, tables


@exercise
def paged_attention(fn):
    """``fn(q, k_pool, v_pool, block_tables, lengths)`` == SDPA on the contiguous cache."""
    g = torch.Generator().manual_seed(17)
    cases = [  # (heads, kv heads, head dim, block size, lengths, dtype)
        (4, 4, 8, 4, [5, 8, 1], torch.float32),
        (8, 2, 16, 16, [1, 17, 40, 33], torch.float32),
        (6, 1, 8, 3, [7, 2], torch.float32),
        (4, 2, 32, 1, [9, 3], torch.float64),
        (8, 4, 16, 16, [100, 15], torch.bfloat16),
    ]
    for H, hkv, d, bs, lens, dtype in cases:
        lengths = torch.tensor(lens, dtype=torch.long)
        Bn, S = len(lens), max(lens)
        q = torch.randn(Bn, H, d, generator=g).to(dtype)
        k = torch.randn(Bn, hkv, S, d, generator=g).to(dtype)
        v = torch.randn(Bn, hkv, S, d, generator=g).to(dtype)
        num_blocks = sum(-(-L // bs) for L in lens) + 5
        kp, vp, tables = _scatter_to_pool(k, v, lengths, bs, num_blocks, g)
        what = (f"paged_attention with {H} query heads, {hkv} KV heads, head_dim {d}, block size "
                f"{bs}, lengths {lens}, {dtype}")
        got = fn(q.clone(), kp.clone(), vp.clone(), tables.clone(), lengths.clone())
        expect_type(got, torch.Tensor, what)
        expect_shape(got, (Bn, H, d), what, hint="one output vector per query head: [B, n_heads, head_dim]")
        expect_dtype(got, dtype, what, hint="compute in q's dtype (or convert back at the end)")
        ref = torch.empty(Bn, H, d, dtype=dtype)
        for b, L in enumerate(lens):
            kb = k[b, :, :L].repeat_interleave(H // hkv, dim=0)     # [H, L, d]: GQA expanded
            vb = v[b, :, :L].repeat_interleave(H // hkv, dim=0)
            ref[b] = F.scaled_dot_product_attention(q[b][:, None], kb, vb)[:, 0]
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
        expect_close(got, ref, what=what, hint=(
            "gather block_tables[b, i] for i = 0, 1, ... in order (position p is in block "
            "p // block_size, offset p % block_size); mask positions >= lengths[b] (the rest "
            "of the last block and the padding blocks hold other data); query head h reads KV "
            "head h // (n_heads // n_kv_heads); scale by 1/sqrt(head_dim)"), **tol)
    return "matches SDPA on the contiguous cache: MHA, GQA, MQA, block sizes 1-16, ragged lengths, fp32/fp64/bf16"


# --------------------------------------------------------------------------- exercise 6

_MODEL = None


def _model():
    global _MODEL
    if _MODEL is None:
        _MODEL = tiny.load("tiny-target")
    return _MODEL


def _ids(text):
    return torch.tensor(tiny.TOKENIZER.encode(text), dtype=torch.long)


@contextlib.contextmanager
def _one_thread():
    """The tiny model's tensors are small: one thread is faster, and far steadier on a
    busy machine, than several threads contending for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@exercise
def paged_kv_cache(cache_cls, manager_cls=None):
    """``cache_cls(pool, seq_ids=None)``: the tiny target generates the same tokens as with
    a contiguous cache, alone and batched, and the blocks match the tokens held."""
    with _one_thread():
        return _paged_kv_cache(cache_cls, manager_cls)


def _paged_kv_cache(cache_cls, manager_cls):
    from ..paged_kv import BlockManager

    manager_cls = manager_cls or BlockManager
    model = _model()
    cfg = model.config
    prompts = tiny_corpus.prompts(3, seed=1717)
    n_new = 20
    for bs in (1, 5, 16):
        pool = KVPool(cfg, manager_cls(160, bs))
        for text in prompts:
            ids = _ids(text)
            ref = tiny.generate(model, ids, n_new)
            made = []

            def factory(config):
                made.append(cache_cls(pool))
                return made[-1]

            got = tiny.generate(model, ids, n_new, cache_factory=factory)
            expect_equal(got, ref, f"greedy tokens for {text!r} with block size {bs}", hint=(
                "the paged cache must give the same attention as the contiguous one: write "
                "k_new, v_new at the new positions' slots in every layer, gather the sequence's "
                "blocks in table order, keep positions < length + T, and use causal_mask"))
            cache = made[0]
            held = len(ids) + n_new - 1
            expect_equal(cache.lengths.tolist(), [held], f"lengths after generating {n_new} tokens "
                         f"from {len(ids)} (the last token is never fed back)")
            seq = cache.seq_ids[0]
            expect_equal(len(pool.manager.block_table(seq)), -(-held // bs),
                         f"blocks held for {held} tokens with block size {bs}",
                         hint="ask the manager for T new slots once per forward pass (at the first "
                              "layer), not once per layer")
            pool.manager.free(seq)
        expect_equal(pool.manager.allocator.num_free, 160, f"free blocks after freeing every sequence (block size {bs})")

    # a running batch of two requests of different lengths, decoded together
    pool = KVPool(cfg, manager_cls(64, 4))
    texts = tiny_corpus.prompts(2, seed=99)
    paged = [cache_cls(pool) for _ in texts]
    contiguous = [tiny.ContiguousKVCache(cfg, max_len=cfg.max_seq_len) for _ in texts]
    nxt_p, nxt_c = [], []
    for text, cp, cc in zip(texts, paged, contiguous):
        ids = _ids(text)[None]
        lp = model.prefill(ids[:, :7], cp)
        lp = model.prefill(ids[:, 7:], cp)[:, -1]              # two chunks of prompt
        lc = model.prefill(ids, cc)[:, -1]
        expect_close(lp, lc, rtol=1e-4, atol=1e-4, what=f"logits after a prompt prefilled in two chunks ({text!r})",
                     hint="attend must handle T > 1 new tokens after what the cache holds: each "
                          "query sees the cached positions and the new ones up to its own")
        nxt_p.append(int(lp.argmax()))
        nxt_c.append(int(lc.argmax()))
    lengths = paged[0].lengths
    expect_type(lengths, torch.Tensor, "cache.lengths")
    expect_dtype(lengths, torch.long, "cache.lengths")
    expect_shape(lengths, (1,), "cache.lengths of a one-sequence cache")
    tok = torch.tensor(nxt_c)
    for step in range(6):
        lp = model.decode_step(tok, paged)
        lc = model.decode_step(tok, contiguous)
        expect_close(lp, lc, rtol=1e-4, atol=1e-4,
                     what=f"logits of two requests of different lengths decoded together, step {step}",
                     hint="each cache serves its own sequence; lengths must be the committed "
                          "positions (advance adds n after the last layer)")
        tok = lc.argmax(-1)

    # fork: two continuations share the prompt's blocks (needs fork and copy-on-write)
    if hasattr(pool.manager, "fork"):
        ids = _ids(texts[0])
        parent = paged[0]
        child_id = pool.new_seq_id()
        pool.manager.fork(parent.seq_ids[0], child_id)
        child = cache_cls(pool, [child_id])
        base = contiguous[0]
        held = int(base.lengths[0])
        forks = [tiny.ContiguousKVCache(cfg, max_len=cfg.max_seq_len) for _ in range(2)]
        prefix = torch.cat([ids, torch.tensor(_history(model, ids, held - len(ids)))])[None]
        for c in forks:
            model.prefill(prefix, c)
        toks = [torch.tensor([3]), torch.tensor([20])]
        for step in range(3):
            outs = [model.decode_step(t, c) for t, c in zip(toks, (parent, child))]
            refs = [model.decode_step(t, c) for t, c in zip(toks, forks)]
            for name, o, r in zip(("parent", "child"), outs, refs):
                expect_close(o, r, rtol=1e-4, atol=1e-4, what=f"logits of the {name} after a fork, step {step}",
                             hint="do the copy-on-write copies append_slots returns "
                                  "(pool.copy_blocks(copies)) before writing into the new block")
            toks = [torch.tensor([7 + step]), torch.tensor([30 - step])]
    return "same greedy tokens as the contiguous cache (block sizes 1, 5, 16), chunked prefill, batched decode, fork"


def _history(model, ids, n):
    """The n greedy tokens the contiguous run fed back after the prompt (to rebuild it)."""
    return tiny.generate(model, ids, n + 1)[:n] if n > 0 else []
