"""The lab-17 checkers pass correct answers and fail likely mistakes with a message.

The correct answers are the library's (utils.paged_kv); each wrong one is a small subclass
or function with one mistake a learner is likely to make.
"""
import math

import pytest
import torch

from utils import paged_kv as pk
from utils.checks import ExerciseFailed, NotAttempted
from utils.checks import ch17 as check

# Logic tests hold the checkers to the library reference; refusal: tests/test_library_answers.py
pytestmark = pytest.mark.usefixtures("library_answers_allowed")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster and steadier on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prefix_manager(num_blocks, block_size):
    return pk.BlockManager(num_blocks, block_size, prefix_caching=True)


def test_right_answers_pass(capsys):
    check.block_allocator(pk.BlockAllocator)
    check.block_manager(pk.BlockManager)
    check.copy_on_write(pk.BlockManager)
    check.prefix_sharing(prefix_manager)
    check.paged_attention(pk.paged_attention)
    check.paged_kv_cache(pk.PagedKVCache, prefix_manager)
    assert capsys.readouterr().out.count("passed") == 6


# -- exercise 1 -----------------------------------------------------------------------------
class IndexErrorWhenEmpty(pk.BlockAllocator):
    def allocate(self):
        block = self._free.pop()          # IndexError on an empty list
        self._refs[block] = 1
        return block


class NoDoubleFreeCheck(pk.BlockAllocator):
    def free(self, block):
        self._refs[block] = max(0, self._refs[block] - 1)
        if self._refs[block] == 0:
            self._free.append(block)


class IgnoresReferenceCounts(pk.BlockAllocator):
    def free(self, block):
        self._check(block)
        if self._refs[block] == 0:
            raise ValueError("double free")
        self._refs[block] -= 1
        self._free.append(block)          # back on the free list while still shared


@pytest.mark.parametrize("cls, match", [(IndexErrorWhenEmpty, "MemoryError"),
                                        (NoDoubleFreeCheck, "double free|already free"),
                                        (IgnoresReferenceCounts, "still shared")])
def test_allocator_mistakes_fail(cls, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.block_allocator(cls)


# -- exercise 2 -----------------------------------------------------------------------------
class BlockPerAppend(pk.BlockManager):
    def append_slots(self, seq, n):
        table = self.tables.setdefault(seq, [])
        start = self.lengths.get(seq, 0)
        table.append(self.allocator.allocate())       # a new block every call
        self.lengths[seq] = start + n
        return [table[-1] * self.block_size + i for i in range(n)], []


class LeaksOnOutOfBlocks(pk.BlockManager):
    def append_slots(self, seq, n):
        table = self.tables.setdefault(seq, [])
        length = self.lengths.get(seq, 0)
        while len(table) < pk.blocks_needed(length + n, self.block_size):
            table.append(self.allocator.allocate())  # raises half-way, keeping what it took
        self.lengths[seq] = length + n
        return [table[p // self.block_size] * self.block_size + p % self.block_size
                for p in range(length, length + n)], []


def test_manager_mistakes_fail():
    with pytest.raises(ExerciseFailed, match="free blocks|number of blocks"):
        check.block_manager(BlockPerAppend)
    with pytest.raises(ExerciseFailed, match="changed the manager"):
        check.block_manager(LeaksOnOutOfBlocks)


# -- exercise 3 -----------------------------------------------------------------------------
class NeverCopies(pk.BlockManager):
    def append_slots(self, seq, n):
        length = self.lengths.get(seq, 0)
        table = self.tables.setdefault(seq, [])
        for _ in range(pk.blocks_needed(length + n, self.block_size) - len(table)):
            table.append(self.allocator.allocate())
        self.lengths[seq] = length + n
        B = self.block_size
        return [table[p // B] * B + p % B for p in range(length, length + n)], []


class CopiesWithoutReportingIt(pk.BlockManager):
    def append_slots(self, seq, n):
        slots, copies = super().append_slots(seq, n)
        return slots, []                     # the data never gets copied


class CopiesFullBlocksToo(pk.BlockManager):
    def append_slots(self, seq, n):
        table = self.tables.get(seq, [])
        copies = []
        if n and table and self.allocator.refcount(table[-1]) > 1:
            copies.append(self._make_last_block_writable(table))
        slots, more = super().append_slots(seq, n)
        return slots, copies + more


def test_copy_on_write_mistakes_fail():
    with pytest.raises(ExerciseFailed, match="copies"):
        check.copy_on_write(NeverCopies)
    with pytest.raises(ExerciseFailed, match="copies|wrong tokens"):
        check.copy_on_write(CopiesWithoutReportingIt)
    with pytest.raises(ExerciseFailed, match="full"):
        check.copy_on_write(CopiesFullBlocksToo)


# -- exercise 4 -----------------------------------------------------------------------------
class PrefixVariant(pk.BlockManager):
    """Prefix caching written out, with switches for three mistakes."""

    whole_prefix, leave_last_token, forget_on_free = True, True, True

    def __init__(self, num_blocks, block_size):
        super().__init__(num_blocks, block_size)
        self.known = {}

    def allocate_prompt(self, seq, token_ids):
        if seq in self.tables:
            raise ValueError("exists")
        B, n = self.block_size, len(token_ids)
        keys = [tuple(token_ids[:(i + 1) * B]) if self.whole_prefix else tuple(token_ids[i * B:(i + 1) * B])
                for i in range(n // B)]
        limit = (n - 1) // B if self.leave_last_token else n // B
        hits = 0
        while hits < limit and keys[hits] in self.known:
            hits += 1
        need = pk.blocks_needed(n, B) - hits
        if need > self.allocator.num_free:
            raise MemoryError("full")
        table = [self.allocator.fork(self.known[k]) for k in keys[:hits]]
        table += [self.allocator.allocate() for _ in range(need)]
        for i in range(hits, len(keys)):
            self.known.setdefault(keys[i], table[i])
        self.tables[seq], self.lengths[seq] = table, n
        return hits * B

    def free(self, seq):
        for block in self.tables[seq]:
            if self.forget_on_free and self.allocator.refcount(block) == 1:
                self.known = {k: b for k, b in self.known.items() if b != block}
        super().free(seq)


class HashesBlocksAlone(PrefixVariant):
    whole_prefix = False


class MatchesTheLastToken(PrefixVariant):
    leave_last_token = False


class NeverForgets(PrefixVariant):
    forget_on_free = False


def test_prefix_mistakes_fail():
    check.prefix_sharing(PrefixVariant)          # the switches' defaults are right
    with pytest.raises(ExerciseFailed, match="prompt 'J'"):
        check.prefix_sharing(HashesBlocksAlone)
    with pytest.raises(ExerciseFailed, match="'E'"):
        check.prefix_sharing(MatchesTheLastToken)
    with pytest.raises(ExerciseFailed, match="A2"):
        check.prefix_sharing(NeverForgets)


# -- exercise 5 -----------------------------------------------------------------------------
def no_length_mask(q, k_pool, v_pool, block_tables, lengths):
    full = torch.full_like(torch.as_tensor(lengths), block_tables.shape[1] * k_pool.shape[2])
    return pk.paged_attention(q, k_pool, v_pool, block_tables, full)


def wrong_gqa_mapping(q, k_pool, v_pool, block_tables, lengths):
    B, H, d = q.shape
    hkv = k_pool.shape[1]
    g = H // hkv
    # pairs query head h with KV head h % hkv instead of h // g
    order = torch.arange(H).reshape(g, hkv).T.reshape(-1)
    out = pk.paged_attention(q[:, order], k_pool, v_pool, block_tables, lengths)
    back = torch.empty_like(out)
    back[:, order] = out
    return back


def wrong_scale(q, k_pool, v_pool, block_tables, lengths):
    return pk.paged_attention(q * math.sqrt(q.shape[-1]) / q.shape[-1], k_pool, v_pool, block_tables, lengths)


def returns_float32(q, k_pool, v_pool, block_tables, lengths):
    return pk.paged_attention(q.float(), k_pool.float(), v_pool.float(), block_tables, lengths)


@pytest.mark.parametrize("fn, match", [(no_length_mask, "wrong values"),
                                       (wrong_gqa_mapping, "2 KV heads"),
                                       (wrong_scale, "wrong values"),
                                       (returns_float32, "dtype")])
def test_paged_attention_mistakes_fail(fn, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.paged_attention(fn)


# -- exercise 6 -----------------------------------------------------------------------------
class ReservesEveryLayer(pk.PagedKVCache):
    def attend(self, layer, q, k_new, v_new):
        if layer > 0:                           # asks the manager for new slots at every layer
            for seq in self.seq_ids:
                self.pool.manager.append_slots(seq, k_new.shape[2])
        return super().attend(layer, q, k_new, v_new)


class SkipsTheCopies(pk.PagedKVCache):
    def _reserve(self, T):
        pool_copy = self.pool.copy_blocks
        self.pool.copy_blocks = lambda copies: None
        try:
            super()._reserve(T)
        finally:
            self.pool.copy_blocks = pool_copy


class AttendsToEverything(pk.PagedKVCache):
    """Forgets the causal mask in prefill: each prompt token sees the whole prompt."""

    def attend(self, layer, q, k_new, v_new):
        import utils.paged_kv as mod
        original = mod.causal_mask
        mod.causal_mask = lambda q_pos, S: torch.ones(q_pos.shape[0], q_pos.shape[1], S, dtype=torch.bool)
        try:
            return super().attend(layer, q, k_new, v_new)
        finally:
            mod.causal_mask = original


@pytest.mark.parametrize("cls, match", [(ReservesEveryLayer, "blocks held"),
                                        (SkipsTheCopies, "after a fork"),
                                        (AttendsToEverything, "greedy tokens|prefilled")])
def test_paged_cache_mistakes_fail(cls, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.paged_kv_cache(cls, prefix_manager)


def test_stubs_are_not_attempted():
    class Stub(pk.BlockAllocator):
        def allocate(self):
            raise NotImplementedError

    def stub(*args):
        raise NotImplementedError

    with pytest.raises(NotAttempted):
        check.block_allocator(Stub)
    with pytest.raises(NotAttempted):
        check.paged_attention(stub)
