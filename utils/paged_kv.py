"""Paged KV cache: blocks, block tables, sharing, paged attention, and the waste it removes.

Chapter 17 and its lab. The mechanism, after Kwon et al. 2023 (vLLM), in four layers:

* :class:`BlockAllocator` — a pool of equal blocks: a free list and a reference count per
  block; ``allocate``, ``fork`` (one more reference) and ``free``, with clear errors on
  exhaustion (:class:`OutOfBlocks`, a ``MemoryError``) and on a double free.
* :class:`BlockManager` — one block table per sequence (logical block i of the sequence
  lives in physical block ``table[i]``), grown a block at a time by
  :meth:`~BlockManager.append_slots`; :meth:`~BlockManager.fork` for parallel sampling and
  beam search, with copy-on-write of a shared, partly filled last block; and
  :meth:`~BlockManager.allocate_prompt`, prefix caching by hashing full blocks.
* :func:`paged_attention` — decode attention that gathers K and V through the block tables
  from a pool ``[num_blocks, n_kv_heads, block_size, head_dim]``.
* :class:`KVPool` and :class:`PagedKVCache` — the physical memory of every layer and a
  :class:`utils.tiny.KVCache` over it, so the tiny models generate with a paged cache.

And the accounting the chapter measures: :func:`request_trace` (seeded prompt and output
lengths), :func:`kv_usage` (how many cache slots each allocation scheme holds, averaged over
every decode step of every request, split into token states, slots reserved for tokens to
come, and slots never used), :func:`max_concurrent` (how many requests a memory budget
holds at once) and :func:`run_batch`, which decodes real requests with the tiny model and
counts the same quantities on the caches themselves.

Sizes are counts of tokens (slots) or blocks; multiply by
:func:`utils.memory.kv_cache_bytes_per_token` for bytes.
"""
from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

import numpy as np
import torch

from .tiny import KVCache, TinyConfig, attention, causal_mask
from .validate import check_callable, check_int, check_tensor

__all__ = [
    "PUBLISHED", "OutOfBlocks", "BlockAllocator", "BlockManager", "blocks_needed",
    "paged_attention", "gather_kv", "KVPool", "PagedKVCache",
    "SCHEMES", "KVUsage", "request_trace", "kv_usage", "max_concurrent", "BatchRun", "run_batch",
    "draw_block_tables",
]

_VLLM = ("W. Kwon, Z. Li, S. Zhuang, Y. Sheng, L. Zheng, C. H. Yu, J. E. Gonzalez, H. Zhang, "
         "I. Stoica, 'Efficient Memory Management for Large Language Model Serving with "
         "PagedAttention', SOSP 2023, arXiv:2309.06180")

#: Published figures quoted by chapter 17, each with where it is printed.
PUBLISHED = {
    # Figure 2: average share of KV-cache memory holding token states during the
    # experiment of Section 6.2 (OPT-13B). Section 1: "only 20.4% - 38.2% of the KV cache
    # memory is used to store the actual token states in the existing systems".
    "vllm_token_state_share": {
        "orca_max": 0.204, "orca_pow2": 0.268, "orca_oracle": 0.382, "vllm": 0.963,
        "source": f"{_VLLM}, Figure 2 and Section 1",
    },
    # Section 6.1: how the three Orca baselines reserve space for a request's output.
    "vllm_orca_baselines": {
        "orca_max": "reserves up to the model's maximum sequence length, 2048 tokens",
        "orca_pow2": "over-reserves the output space by at most 2x (25 tokens -> 32)",
        "orca_oracle": "knows each request's true output length",
        "source": f"{_VLLM}, Section 6.1",
    },
    # Section 3.1: the three kinds of waste of contiguous pre-allocation.
    "vllm_waste_kinds": {
        "kinds": ("reserved slots for future tokens",
                  "internal fragmentation due to over-provisioning for potential maximum "
                  "sequence lengths",
                  "external fragmentation from the memory allocator like the buddy allocator"),
        "source": f"{_VLLM}, Section 3.1 and Figure 3",
    },
    # Section 4.3: "vLLM limits all the memory wastes for a request within one block".
    "vllm_waste_bound_blocks": {"blocks": 1, "source": f"{_VLLM}, Section 4.3"},
    # Section 7.2: "vLLM sets its default block size as 16".
    "vllm_default_block_size": {"tokens": 16, "source": f"{_VLLM}, Section 7.2"},
    # Figure 13a: average number of batched requests, OPT-13B, ShareGPT trace at 2 req/s.
    # Section 6.2: "2.2x more requests at the same time than Orca (Oracle) and 4.3x more
    # requests than Orca (Max)".
    "vllm_batched_requests_sharegpt": {
        "orca_max": 7.00, "orca_pow2": 9.81, "orca_oracle": 13.62, "vllm": 30.42,
        "source": f"{_VLLM}, Figure 13a and Section 6.2",
    },
    # Section 6.3, Figure 15: memory saved by sharing blocks (blocks saved / blocks without
    # sharing), OPT-13B on the Alpaca trace; the ShareGPT ranges are in the same paragraph.
    "vllm_sharing_savings": {
        "parallel_sampling_alpaca": (0.061, 0.098), "beam_search_alpaca": (0.376, 0.552),
        "parallel_sampling_sharegpt": (0.162, 0.305), "beam_search_sharegpt": (0.443, 0.663),
        "source": f"{_VLLM}, Section 6.3 and Figure 15",
    },
    # Section 7.1: the block-table indirection costs "20-26% higher attention kernel
    # latency, compared to the highly-optimized FasterTransformer implementation".
    "vllm_kernel_overhead": {"low": 0.20, "high": 0.26, "source": f"{_VLLM}, Section 7.1, Figure 18a"},
    # Abstract: throughput "by 2-4x with the same level of latency" vs FasterTransformer, Orca.
    "vllm_throughput": {"low": 2, "high": 4, "source": f"{_VLLM}, abstract"},
    # DeepSeek-V2 (arXiv:2405.04434): MLA caches a latent of d_c plus a decoupled RoPE key of
    # d_h^R per token and layer (Table 1: (d_c + d_h^R) l elements, about 9/2 d_h l);
    # Section 3.1.2: 60 layers, 128 heads of 128, d_c = 512, d_h^R = 64. Abstract: compared
    # with DeepSeek 67B it "reduces the KV cache by 93.3%" and "boosts the maximum
    # generation throughput to 5.76 times".
    "deepseek_v2_mla": {
        "n_layers": 60, "n_heads": 128, "head_dim": 128, "d_c": 512, "d_rope": 64,
        "kv_reduction_vs_67b": 0.933, "throughput_vs_67b": 5.76,
        "source": ("DeepSeek-AI, 'DeepSeek-V2: A Strong, Economical, and Efficient "
                   "Mixture-of-Experts Language Model', arXiv:2405.04434 (2024), abstract, "
                   "Section 2.1.4 (Table 1) and Section 3.1.2"),
    },
}


# ---------------------------------------------------------------------------------------
# Input checking
# ---------------------------------------------------------------------------------------
def _count(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def blocks_needed(n_tokens: int, block_size: int) -> int:
    """Blocks that hold ``n_tokens`` tokens: ceil(n_tokens / block_size)."""
    n = _count("n_tokens", n_tokens)
    b = _count("block_size", block_size, minimum=1)
    return -(-n // b)


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------
class OutOfBlocks(MemoryError):
    """The pool has fewer free blocks than an allocation needs."""


class BlockAllocator:
    """``num_blocks`` equal blocks: a free list and a reference count per block.

    ``allocate()`` takes a free block and gives it one reference; ``fork(block)`` adds a
    reference (one more sequence maps the same physical block); ``free(block)`` drops one
    and puts the block back on the free list when none is left. The free list is a stack:
    a fresh allocator hands out 0, 1, 2, ... and a block just freed is the next one reused.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = _count("num_blocks", num_blocks, minimum=1)
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._refs = [0] * self.num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block: int) -> int:
        self._check(block)
        return self._refs[block]

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks(f"out of KV blocks: all {self.num_blocks} blocks are in use")
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def fork(self, block: int) -> int:
        """One more reference to an allocated block; returns the block."""
        self._check(block)
        if self._refs[block] == 0:
            raise ValueError(f"cannot share block {block}: it is free (allocate it first)")
        self._refs[block] += 1
        return block

    def free(self, block: int) -> None:
        """Drop one reference; the block returns to the free list at zero."""
        self._check(block)
        if self._refs[block] == 0:
            raise ValueError(f"double free: block {block} is already free")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    def _check(self, block) -> None:
        if isinstance(block, bool) or not isinstance(block, numbers.Integral) \
                or not 0 <= block < self.num_blocks:
            raise ValueError(f"block id must be an integer in [0, {self.num_blocks}), got {block!r}")


class BlockManager:
    """Block tables for many sequences over one :class:`BlockAllocator`.

    Sequence ``s`` holds ``length(s)`` tokens; token ``p`` lives in physical block
    ``block_table(s)[p // block_size]`` at offset ``p % block_size``, i.e. in *slot*
    ``block * block_size + offset`` of the pool. Blocks are taken one at a time, only when
    the last one is full, so a sequence wastes less than one block.

    Sharing: :meth:`fork` maps a child onto its parent's blocks (reference counts go up);
    when a sequence appends into a partly filled last block that another sequence also
    maps, :meth:`append_slots` first copies it to a private block (copy-on-write) and
    returns the copy for the caller to perform on the data. With ``prefix_caching=True``,
    :meth:`allocate_prompt` reuses full blocks whose whole prefix was seen before.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, prefix_caching: bool = False):
        self.block_size = _count("block_size", block_size, minimum=1)
        self.allocator = BlockAllocator(num_blocks)
        self.prefix_caching = bool(prefix_caching)
        self.tables: dict[Hashable, list[int]] = {}
        self.lengths: dict[Hashable, int] = {}
        self._cached: dict[int, int] = {}     # prefix hash -> block holding that prefix's last block
        self._hash_of: dict[int, int] = {}    # block -> its prefix hash
        self.copies = 0                        # copy-on-write copies made so far

    # -- queries --------------------------------------------------------------------------
    def block_table(self, seq: Hashable) -> list[int]:
        return list(self.tables.get(seq, ()))

    def length(self, seq: Hashable) -> int:
        return self.lengths.get(seq, 0)

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def blocks_in_use(self) -> int:
        return self.allocator.num_blocks - self.allocator.num_free

    def slot(self, seq: Hashable, position: int) -> int:
        """The pool slot holding token ``position`` of ``seq``."""
        if not 0 <= position < self.length(seq):
            raise IndexError(f"sequence {seq!r} has {self.length(seq)} tokens; no position {position}")
        return self.tables[seq][position // self.block_size] * self.block_size + position % self.block_size

    # -- growth -----------------------------------------------------------------------------
    def append_slots(self, seq: Hashable, n: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Room for ``n`` more tokens of ``seq`` (a new sequence starts empty).

        Returns ``(slots, copies)``: the pool slot of each new token, in order, and the
        copy-on-write copies ``(src_block, dst_block)`` to do on the data *before* writing.
        All or nothing: raises :class:`OutOfBlocks` and changes nothing when the pool is
        too small.
        """
        n = _count("n", n)
        B = self.block_size
        table = self.tables.get(seq, [])
        length = self.lengths.get(seq, 0)
        cow = length % B != 0 and self.allocator.refcount(table[-1]) > 1 and n > 0
        new_blocks = blocks_needed(length + n, B) - len(table)
        need = new_blocks + int(cow)
        if need > self.allocator.num_free:
            raise OutOfBlocks(f"sequence {seq!r} needs {need} more blocks for {n} tokens "
                              f"but only {self.allocator.num_free} of "
                              f"{self.allocator.num_blocks} are free")
        copies = []
        if cow:
            copies.append(self._make_last_block_writable(table))
        for _ in range(new_blocks):
            table.append(self.allocator.allocate())
        self.tables[seq] = table
        self.lengths[seq] = length + n
        slots = [table[p // B] * B + p % B for p in range(length, length + n)]
        return slots, copies

    def _make_last_block_writable(self, table: list[int]) -> tuple[int, int]:
        old = table[-1]
        new = self.allocator.allocate()
        self.allocator.free(old)       # one reference fewer; others still map it
        table[-1] = new
        self.copies += 1
        return old, new

    # -- sharing ------------------------------------------------------------------------------
    def fork(self, parent: Hashable, child: Hashable) -> None:
        """``child`` maps the same blocks as ``parent`` (no data is copied)."""
        if parent not in self.tables:
            raise KeyError(f"cannot fork unknown sequence {parent!r}")
        if child in self.tables:
            raise ValueError(f"sequence {child!r} already exists")
        self.tables[child] = [self.allocator.fork(b) for b in self.tables[parent]]
        self.lengths[child] = self.lengths[parent]

    def allocate_prompt(self, seq: Hashable, token_ids: Sequence[int]) -> int:
        """Blocks for a new sequence's whole prompt; returns how many leading tokens are cached.

        With prefix caching, each full block is keyed by a hash of *every* token id from the
        start of the prompt through the end of that block. A block whose key was seen
        before is shared (its reference count goes up) instead of allocated, and its K/V
        need not be computed again. Only blocks that end before the prompt's last token
        are matched, so at least one token is left to run (its logits start generation).
        New full blocks are registered for later prompts. The partly filled last block is
        never shared. All or nothing, like :meth:`append_slots`.
        """
        if seq in self.tables:
            raise ValueError(f"sequence {seq!r} already exists; allocate_prompt starts a new one")
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
            raise TypeError(f"token_ids must be a sequence of token ids, got {type(token_ids).__name__}")
        tokens = [check_int(f"token_ids[{i}]", t, low=0) for i, t in enumerate(token_ids)]
        n, B = len(tokens), self.block_size
        if n == 0:
            raise ValueError("the prompt is empty")
        keys, key = [], 0
        for i in range(n // B):
            key = hash((key, tuple(tokens[i * B:(i + 1) * B])))
            keys.append(key)
        hits = 0
        if self.prefix_caching:
            while hits < (n - 1) // B and keys[hits] in self._cached:
                hits += 1
        need = blocks_needed(n, B) - hits
        if need > self.allocator.num_free:
            raise OutOfBlocks(f"prompt of {n} tokens needs {need} new blocks but only "
                              f"{self.allocator.num_free} of {self.allocator.num_blocks} are free")
        table = [self.allocator.fork(self._cached[k]) for k in keys[:hits]]
        table += [self.allocator.allocate() for _ in range(need)]
        if self.prefix_caching:
            for i in range(hits, len(keys)):
                if keys[i] not in self._cached:
                    self._cached[keys[i]] = table[i]
                    self._hash_of[table[i]] = keys[i]
        self.tables[seq] = table
        self.lengths[seq] = n
        return hits * B

    # -- release ----------------------------------------------------------------------------
    def free(self, seq: Hashable) -> None:
        """Drop ``seq``: each of its blocks loses a reference (freed at zero)."""
        if seq not in self.tables:
            raise KeyError(f"cannot free unknown sequence {seq!r}")
        for block in self.tables.pop(seq):
            if self.allocator.refcount(block) == 1 and block in self._hash_of:
                del self._cached[self._hash_of.pop(block)]   # forget a prefix about to be freed
            self.allocator.free(block)
        del self.lengths[seq]


# ---------------------------------------------------------------------------------------
# Paged attention
# ---------------------------------------------------------------------------------------
def gather_kv(pool: torch.Tensor, table: Sequence[int] | torch.Tensor, n_tokens: int) -> torch.Tensor:
    """One sequence's K (or V) in position order, ``[n_kv_heads, n_tokens, head_dim]``,
    gathered from a pool ``[num_blocks, n_kv_heads, block_size, head_dim]``."""
    check_tensor("pool", pool, ndim=4)
    table = _block_ids("table", table, pool.device, ndim=1)
    nb, hkv, bs, d = pool.shape
    need = blocks_needed(n_tokens, bs)
    if table.numel() < need:
        raise ValueError(f"{n_tokens} tokens need {need} blocks of {bs}; the table has {table.numel()}")
    _check_ids_in_pool("table", table[:need], nb)
    return pool[table[:need]].transpose(0, 1).reshape(hkv, need * bs, d)[:, :n_tokens]


def _block_ids(name: str, ids, device, ndim: int) -> torch.Tensor:
    """Block ids as a long tensor on ``device``: an int tensor or a sequence of ints."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer block ids, got dtype {ids.dtype}")
        t = ids.to(device=device, dtype=torch.long)
    else:
        try:
            t = torch.as_tensor(ids, device=device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a tensor or sequence of integer block ids, "
                            f"got {type(ids).__name__}") from None
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer block ids, got {ids!r}")
        t = t.long()
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _check_ids_in_pool(name: str, ids: torch.Tensor, num_blocks: int) -> None:
    if ids.numel() and bool(((ids < 0) | (ids >= num_blocks)).any()):
        raise ValueError(f"{name} holds block ids outside the pool's 0..{num_blocks - 1}: "
                         f"{ids.tolist()}")


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    block_tables: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Decode attention over a paged cache: one query per sequence.

    q: ``[B, n_heads, head_dim]``; k_pool, v_pool: ``[num_blocks, n_kv_heads, block_size,
    head_dim]``; block_tables: ``[B, max_blocks]`` int (row b lists sequence b's blocks in
    order; entries past its last block are ignored); lengths: ``[B]`` int, each >= 1.
    Returns ``[B, n_heads, head_dim]`` in q's dtype: softmax(q k^T / sqrt(d)) v over each
    sequence's first ``lengths[b]`` positions, query head h reading KV head
    h // (n_heads // n_kv_heads) (grouped-query attention).
    """
    check_tensor("q", q, ndim=3, floating=True)
    check_tensor("k_pool", k_pool, ndim=4, dtype=q.dtype)
    check_tensor("v_pool", v_pool, shape=tuple(k_pool.shape), dtype=q.dtype)
    B, H, d = q.shape
    nb, hkv, bs, _ = k_pool.shape
    if H % hkv or k_pool.shape[-1] != d:
        raise ValueError(f"q's {H} heads of {d} cannot read k_pool's {hkv} KV heads of "
                         f"{k_pool.shape[-1]}")
    tables = _block_ids("block_tables", block_tables, q.device, ndim=2)
    lengths = _block_ids("lengths", lengths, q.device, ndim=1)
    if tables.shape[0] != B or lengths.shape[0] != B:
        raise ValueError(f"block_tables must have {B} rows and lengths {B} entries (one per "
                         f"query), got {tuple(tables.shape)} and {tuple(lengths.shape)}")
    S = tables.shape[1] * bs
    if B and not (bool((lengths >= 1).all()) and bool((lengths <= S).all())):
        raise ValueError(f"lengths must be in 1..{S} (the block table holds {tables.shape[1]} "
                         f"blocks of {bs}; a query needs at least one key), got {lengths.tolist()}")
    used = torch.arange(tables.shape[1], device=q.device)[None, :] < (-(-lengths // bs))[:, None]
    _check_ids_in_pool("block_tables", tables[used], nb)
    tables = torch.where(used, tables, 0)                  # entries past the end are ignored
    k = k_pool[tables].transpose(1, 2).reshape(B, hkv, S, d)     # [B, Hkv, S, d] in position order
    v = v_pool[tables].transpose(1, 2).reshape(B, hkv, S, d)
    mask = (torch.arange(S, device=q.device)[None, :] < lengths[:, None])[:, None, :]   # [B, 1, S]
    return attention(q[:, :, None], k, v, mask)[:, :, 0]


# ---------------------------------------------------------------------------------------
# A paged KV cache for the tiny models
# ---------------------------------------------------------------------------------------
class KVPool:
    """The physical KV memory of a paged cache, and the manager that hands out its blocks.

    ``k`` and ``v`` are ``[n_layers, num_blocks, n_kv_heads, block_size, head_dim]``: block
    ``i`` of every layer belongs to whichever sequence maps block ``i``. ``manager`` is a
    :class:`BlockManager` or anything with the same ``block_size``, ``allocator.num_blocks``,
    ``append_slots``, ``block_table``, ``length`` and ``free``.
    """

    def __init__(self, config: TinyConfig, manager, device=None, dtype: torch.dtype = torch.float32):
        self.config, self.manager = config, manager
        self.block_size = int(manager.block_size)
        self.num_blocks = int(manager.allocator.num_blocks)
        shape = (config.n_layers, self.num_blocks, config.n_kv_heads, self.block_size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._next_id = 0

    def new_seq_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def copy_blocks(self, copies: Iterable[tuple[int, int]]) -> None:
        """Perform copy-on-write copies ``(src, dst)`` in every layer, K and V."""
        for src, dst in copies:
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def bytes_in_use(self) -> int:
        used = self.num_blocks - self.manager.allocator.num_free
        return used * self.bytes_per_block


class PagedKVCache(KVCache):
    """A :class:`utils.tiny.KVCache` whose sequences live in the blocks of a :class:`KVPool`.

    ``seq_ids`` name the batch's sequences in the pool's manager (new ones start empty; a
    sequence made by ``fork`` or ``allocate_prompt`` starts where the manager has it:
    at its length, or, for a prompt with cached prefix blocks, at the number of cached
    tokens given as ``start``). At the first layer of a forward pass the cache asks the
    manager for the slots of the new positions (doing any copy-on-write copies); every
    layer then writes its K, V there, gathers each sequence through its block table and
    attends with :func:`utils.tiny.attention`.
    """

    def __init__(self, pool: KVPool, seq_ids: Sequence[Hashable] | None = None, batch_size: int = 1,
                 start: Sequence[int] | None = None):
        self.pool = pool
        self.seq_ids = list(seq_ids) if seq_ids is not None else [pool.new_seq_id() for _ in range(batch_size)]
        if not self.seq_ids:
            raise ValueError("a PagedKVCache needs at least one sequence")
        m = pool.manager
        first = [m.length(s) for s in self.seq_ids] if start is None else list(start)
        self._lengths = torch.tensor(first, dtype=torch.long)
        self._where = None        # (blocks, offsets) of the positions being written

    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths.clone()

    def _reserve(self, T: int) -> None:
        m, bs = self.pool.manager, self.pool.block_size
        self._where = []
        for b, seq in enumerate(self.seq_ids):
            start = int(self._lengths[b])
            missing = start + T - m.length(seq)
            if missing > 0:
                _, copies = m.append_slots(seq, missing)
                self.pool.copy_blocks(copies)
            table = torch.tensor(m.block_table(seq), dtype=torch.long, device=self.pool.k.device)
            pos = torch.arange(start, start + T, device=self.pool.k.device)
            self._where.append((table, table[pos // bs], pos % bs))

    def attend(self, layer, q, k_new, v_new):
        B, hkv, T, d = k_new.shape
        if B != len(self.seq_ids):
            raise ValueError(f"k_new has {B} sequences; the cache holds {len(self.seq_ids)}")
        if self._where is None:
            self._reserve(T)
        kp, vp = self.pool.k[layer], self.pool.v[layer]
        outs = []
        for b in range(B):
            table, blocks, offsets = self._where[b]
            kp[blocks, :, offsets] = k_new[b].transpose(0, 1)
            vp[blocks, :, offsets] = v_new[b].transpose(0, 1)
            start = int(self._lengths[b])
            S = start + T
            k, v = gather_kv(kp, table, S), gather_kv(vp, table, S)
            q_pos = torch.arange(start, S, device=q.device)[None]
            outs.append(attention(q[b:b + 1], k[None], v[None], causal_mask(q_pos, S)))
        return torch.cat(outs)

    def advance(self, n: int) -> None:
        self._lengths += n
        self._where = None

    def free(self) -> None:
        """Give the batch's blocks back to the pool."""
        for seq in self.seq_ids:
            self.pool.manager.free(seq)


# ---------------------------------------------------------------------------------------
# How much memory each allocation scheme holds
# ---------------------------------------------------------------------------------------
SCHEMES = ("max", "pow2", "oracle", "paged")


@dataclass(frozen=True)
class KVUsage:
    """Cache slots held, summed over every decode step of every request of a trace.

    ``token_slots`` hold K/V of tokens already processed; ``reserved_slots`` are held for
    tokens the request will still generate; ``unused_slots`` are held but never filled
    before the request ends (internal fragmentation). All are slot-steps (one slot held
    for one step); ``steps`` is the number of request-steps.
    """

    scheme: str
    steps: int
    token_slots: int
    reserved_slots: int
    unused_slots: int

    @property
    def allocated_slots(self) -> int:
        return self.token_slots + self.reserved_slots + self.unused_slots

    @property
    def used_share(self) -> float:
        return self.token_slots / self.allocated_slots

    @property
    def waste_share(self) -> float:
        return 1 - self.used_share

    @property
    def mean_slots(self) -> float:
        """Slots one request holds on average while it runs."""
        return self.allocated_slots / self.steps


def request_trace(n: int, seed: int = 0, prompt_median: int = 256, output_median: int = 128,
                  sigma: float = 1.0, max_len: int = 2048) -> list[tuple[int, int]]:
    """``n`` (prompt_len, output_len) pairs, each drawn from a lognormal distribution.

    Medians and the log-space spread ``sigma`` are the caller's assumption about the
    traffic; draws are rounded and clipped so that ``1 <= prompt < max_len`` and
    ``1 <= output <= max_len - prompt``. ``random.Random(seed)``: the same pairs on every
    machine.
    """
    n = _count("n", n)
    max_len = _count("max_len", max_len, minimum=2)
    for name, v in (("prompt_median", prompt_median), ("output_median", output_median), ("sigma", sigma)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0:
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = min(max(1, round(rng.lognormvariate(math.log(prompt_median), sigma))), max_len - 1)
        o = min(max(1, round(rng.lognormvariate(math.log(output_median), sigma))), max_len - p)
        out.append((p, o))
    return out


def _trace_arrays(trace) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(trace, dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) == 0:
        raise ValueError("trace must be a non-empty list of (prompt_len, output_len) pairs")
    if (arr < 1).any():
        raise ValueError("prompt and output lengths must be >= 1")
    return arr[:, 0], arr[:, 1]


def kv_usage(trace, scheme: str, max_len: int = 2048, block_size: int = 16) -> KVUsage:
    """Slots held by one allocation scheme over a trace (see :class:`KVUsage`).

    A request with prompt ``p`` and output ``o`` runs ``o`` forward passes (the prefill,
    then ``o - 1`` decode steps); after pass ``t`` (1..o) its cache holds ``L = p + t - 1``
    tokens (the prompt and the outputs fed back so far: the last output is never fed
    back) and it ends at ``F = p + o - 1``. The scheme decides what it holds, ``R``:

    * ``"max"`` — ``max_len`` slots from the start (contiguous, worst-case reservation);
    * ``"pow2"`` — ``p`` plus the output length rounded up to a power of two, capped at
      ``max_len`` (contiguous, a guess that over-reserves the output by at most 2x);
    * ``"oracle"`` — exactly ``F`` (contiguous, knows the output length in advance);
    * ``"paged"`` — ``block_size * ceil(L / block_size)``, growing a block at a time.

    Of ``R``, ``L`` are token states, ``min(R, F) - L`` reserved for tokens to come and
    ``R - min(R, F)`` never used. External fragmentation (holes between contiguous
    chunks of different sizes) is not modelled.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    max_len = _count("max_len", max_len, minimum=1)
    bs = _count("block_size", block_size, minimum=1)
    p, o = _trace_arrays(trace)
    F = p + o - 1
    if scheme != "paged" and (F > max_len).any():
        i = int(np.argmax(F > max_len))
        raise ValueError(f"request {i} needs {int(F[i])} tokens, more than max_len {max_len}")
    steps = int(o.sum())
    first = np.repeat(np.cumsum(o) - o, o)
    t = np.arange(steps, dtype=np.int64) - first + 1
    L = np.repeat(p, o) + t - 1
    Ff = np.repeat(F, o)
    if scheme == "max":
        R = np.full(steps, max_len, dtype=np.int64)
    elif scheme == "oracle":
        R = Ff
    elif scheme == "pow2":
        pow2 = np.array([1 << (int(x) - 1).bit_length() for x in o], dtype=np.int64)
        R = np.repeat(np.minimum(p + pow2, max_len), o)
    else:
        R = -(-L // bs) * bs
    filled = np.minimum(R, Ff)
    return KVUsage(scheme=scheme, steps=steps, token_slots=int(L.sum()),
                   reserved_slots=int((filled - L).sum()), unused_slots=int((R - filled).sum()))


def max_concurrent(usage: KVUsage, budget_slots: int) -> int:
    """Requests a budget of ``budget_slots`` cache slots holds at once, in steady state.

    Each running request holds ``usage.mean_slots`` slots on average, so the budget holds
    ``floor(budget / mean_slots)`` of them (exact integer arithmetic). For ``"max"`` this
    is ``budget // max_len``.
    """
    if not isinstance(usage, KVUsage):
        raise TypeError(f"usage must be a KVUsage (from kv_usage), got {type(usage).__name__}")
    budget = _count("budget_slots", budget_slots)
    return budget * usage.steps // usage.allocated_slots


@dataclass(frozen=True)
class BatchRun:
    """What :func:`run_batch` measured: each request's output, its (prompt, output)
    lengths, and the cache slots held, summed over forward passes and live requests."""

    outputs: list
    trace: list
    token_slots: int      # tokens held in the cache
    held_slots: int       # slots the allocation scheme holds
    steps: int            # request-passes

    @property
    def used_share(self) -> float:
        return self.token_slots / self.held_slots

    @property
    def waste_share(self) -> float:
        return 1 - self.used_share


@torch.no_grad()
def run_batch(model, prompts: Sequence[Sequence[int]], make_cache, held_slots, max_new_tokens: int,
              stop_token: int | None = None, release=None) -> BatchRun:
    """Greedy-decode every prompt, all requests in one running batch.

    ``make_cache(i)`` gives request i its own single-sequence cache. Each request is
    prefilled (its first pass), then every pass decodes one token for all live requests
    together (``model.decode_step`` over the list of caches); a request leaves after
    ``max_new_tokens`` outputs or its ``stop_token``, and ``release(cache)`` (if given) is
    called then. After every pass, before finished requests leave, the run adds the tokens
    the live caches hold and ``held_slots(live_caches)``, the slots the allocation scheme
    holds for them. The totals are what :func:`kv_usage` models for ``trace``.
    """
    for name in ("prefill", "decode_step"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"model must have prefill and decode_step (a TinyTransformer), "
                            f"got {type(model).__name__}")
    if isinstance(prompts, (str, bytes, torch.Tensor)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    check_callable("make_cache", make_cache)
    check_callable("held_slots", held_slots)
    check_int("max_new_tokens", max_new_tokens, low=1)
    if stop_token is not None:
        check_int("stop_token", stop_token, low=0)
    if release is not None:
        check_callable("release", release)
    caches = [make_cache(i) for i in range(len(prompts))]
    outputs = [[] for _ in prompts]
    last = []
    for i, ids in enumerate(prompts):
        logits = model.prefill(torch.as_tensor(ids, dtype=torch.long, device=model.device)[None], caches[i])
        last.append(int(logits[0, -1].argmax()))
    live = list(range(len(prompts)))
    tokens = held = steps = 0
    while live:
        for i in live:
            outputs[i].append(last[i])
        tokens += sum(int(caches[i].lengths.sum()) for i in live)
        held += int(held_slots([caches[i] for i in live]))
        steps += len(live)
        done = [i for i in live if len(outputs[i]) == max_new_tokens
                or (stop_token is not None and outputs[i][-1] == stop_token)]
        for i in done:
            if release is not None:
                release(caches[i])
        live = [i for i in live if i not in done]
        if live:
            tok = torch.tensor([last[i] for i in live], device=model.device)
            logits = model.decode_step(tok, [caches[i] for i in live])
            for j, i in enumerate(live):
                last[i] = int(logits[j].argmax())
    trace = [(len(p), len(o)) for p, o in zip(prompts, outputs)]
    return BatchRun(outputs=outputs, trace=trace, token_slots=tokens, held_slots=held, steps=steps)


# ---------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------
def draw_block_tables(manager: BlockManager, seqs: Sequence[Hashable], names: Sequence[str] | None = None,
                      tokens: dict | None = None, ax=None, title: str | None = None):
    """Draw each sequence's logical blocks (left) and the physical pool (right), with an
    arrow from every logical block to the physical block it maps. Shared blocks are grey
    and show their reference count. ``tokens`` maps a sequence to its token labels."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle

    from .plots import PALETTE

    for attr in ("block_size", "allocator", "block_table"):
        if not hasattr(manager, attr):
            raise TypeError(f"manager must be a BlockManager, got {type(manager).__name__}")
    if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Iterable):
        raise TypeError(f"seqs must be a list of sequence ids, got {type(seqs).__name__}")
    seqs = list(seqs)
    names = list(names) if names is not None else [str(s) for s in seqs]
    B, nb = manager.block_size, manager.allocator.num_blocks
    rows = sum(max(1, len(manager.block_table(s))) for s in seqs) + len(seqs)
    if ax is None:
        _, ax = plt.subplots(figsize=(8.5, 0.36 * max(rows, nb) + 0.9))
    cell = 0.55
    phys_x = B * cell + 3.2
    owner = {}
    for i, s in enumerate(seqs):
        for blk in manager.block_table(s):
            owner.setdefault(blk, i)
    # physical pool, block 0 at the top
    for blk in range(nb):
        y = nb - 1 - blk
        ref = manager.allocator.refcount(blk)
        shared = ref > 1
        color = "0.75" if shared else (PALETTE[owner[blk] % len(PALETTE)] if blk in owner else "white")
        fill, src = _filled(manager, seqs, blk)
        labels = (tokens or {}).get(src[0]) if src else None
        for j in range(B):
            used = j < fill
            ax.add_patch(Rectangle((phys_x + j * cell, y), cell, 0.8, facecolor=color if used else "white",
                                   edgecolor="0.4", lw=0.6, alpha=0.85 if used else 1))
            pos = src[1] * B + j if src else 0
            if used and labels is not None and pos < len(labels):
                ax.text(phys_x + j * cell + cell / 2, y + 0.4, str(labels[pos]), ha="center",
                        va="center", fontsize=6.5, color="black" if shared else "white")
        ax.text(phys_x - 0.15, y + 0.4, f"{blk}", ha="right", va="center", fontsize=8)
        if ref:
            ax.text(phys_x + B * cell + 0.15, y + 0.4, f"ref {ref}", ha="left", va="center",
                    fontsize=7.5, color="0.25")
    ax.text(phys_x + B * cell / 2, nb + 0.2, "physical blocks (pool)", ha="center", fontsize=9)
    # logical blocks per sequence
    y = max(rows, nb) - 1
    for i, s in enumerate(seqs):
        table, length = manager.block_table(s), manager.length(s)
        labels = (tokens or {}).get(s)
        ax.text(-0.2, y + 0.4, names[i], ha="right", va="center", fontsize=9,
                color=PALETTE[i % len(PALETTE)], fontweight="bold")
        for lb, blk in enumerate(table):
            for j in range(B):
                pos = lb * B + j
                used = pos < length
                ax.add_patch(Rectangle((j * cell, y), cell, 0.8, lw=0.6, edgecolor="0.4",
                                       facecolor=PALETTE[i % len(PALETTE)] if used else "white",
                                       alpha=0.85 if used else 1))
                if used and labels is not None and pos < len(labels):
                    ax.text(j * cell + cell / 2, y + 0.4, str(labels[pos]), ha="center",
                            va="center", fontsize=6.5, color="white")
            ax.text(B * cell + 0.1, y + 0.4, f"L{lb}", ha="left", va="center", fontsize=7)
            ty = nb - 1 - blk
            ax.add_patch(FancyArrowPatch((B * cell + 0.7, y + 0.4), (phys_x - 0.55, ty + 0.4),
                                         arrowstyle="-|>", mutation_scale=8, lw=0.7,
                                         color=PALETTE[i % len(PALETTE)], alpha=0.8))
            y -= 1
        y -= 1
    ax.set_xlim(-2.2, phys_x + B * cell + 1.3)
    ax.set_ylim(min(y, -0.5), max(rows, nb) + 0.8)
    ax.set_aspect("auto")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def _filled(manager: BlockManager, seqs, blk: int) -> tuple[int, tuple | None]:
    """How many slots of physical block ``blk`` hold tokens (the most any sequence that
    maps it has filled), and that (sequence, logical block)."""
    B, best, src = manager.block_size, 0, None
    for s in seqs:
        table, length = manager.block_table(s), manager.length(s)
        for lb, b in enumerate(table):
            fill = min(B, length - lb * B)
            if b == blk and fill > best:
                best, src = fill, (s, lb)
    return best, src
