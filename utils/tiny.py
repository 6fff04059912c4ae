"""The tiny model family: a small decoder-only transformer for the inference chapters.

Two trained models ship with the course, ``load("tiny-target")`` and ``load("tiny-draft")``,
character-level models of the toy language in :mod:`utils.tiny_corpus`; a third,
``load("tiny-target-xl")``, has the draft's width and sixteen times its depth, a target that
is expensive next to the draft (chapter 19 times speculative decoding with it). The architecture
is Llama's in miniature: token embedding, rotary position embedding (RoPE), RMSNorm
before each sub-layer, grouped-query attention (GQA), a SwiGLU MLP and an untied LM head
(a separate output matrix, as in Llama 2/3 8B and up; with a 44-token vocabulary tying
would save only ``vocab x d_model`` weights, and untied keeps the two roles apart).

Three ways to run it:

- ``model(tokens)`` — the full causal forward over ``[B, T]`` tokens, for training and as
  the reference every faster path is checked against.
- ``model.prefill(tokens, cache)`` — run ``[B, T]`` new tokens that continue whatever is
  in ``cache`` (empty for a fresh prompt; a chunk of prompt for chunked prefill; the
  draft's proposals for speculative decoding) and return ``[B, T, vocab]`` logits.
- ``model.decode_step(tokens, cache)`` — one new token per sequence, ``[B]`` logits out.

The caller owns the KV cache. The model computes Q, K and V for the new tokens and hands
them to ``cache.attend(layer, q, k_new, v_new)``; the cache stores K and V wherever it
likes and returns the attention output. A paged cache only has to implement
:class:`KVCache` (three members: ``lengths``, ``attend``, ``advance``).

Serving several requests of different lengths: give each request its own cache and
decode them together with ``model.decode_step(tokens, [cache_a, cache_b, ...])``. The
list becomes a :class:`CacheBatch`: projections, MLPs and the LM head run as one batched
matmul over all requests, and attention loops over the requests, each against its own
cache. Requests can join and leave between steps, which is continuous batching.
"""
from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tiny_corpus import ALPHABET
from .validate import check_int, check_number

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODEL_NAMES = ("tiny-draft", "tiny-target", "tiny-target-xl")


# --- tokenizer ------------------------------------------------------------------------

def _check_config(config) -> None:
    if not isinstance(config, TinyConfig):
        raise TypeError(f"config must be a TinyConfig, got {type(config).__name__}")


class CharTokenizer:
    """One token per character of a fixed alphabet; the id is the index in the alphabet."""

    def __init__(self, alphabet: str = ALPHABET, eos: str = "\n"):
        if not isinstance(alphabet, str) or not alphabet:
            raise TypeError(f"alphabet must be a non-empty str, got {alphabet!r}")
        if not isinstance(eos, str) or len(eos) != 1:
            raise TypeError(f"eos must be one character (a str of length 1), got {eos!r}")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated characters")
        if eos not in alphabet:
            raise ValueError(f"end-of-document character eos={eos!r} is not in the alphabet")
        self.alphabet = alphabet
        self._id = {ch: i for i, ch in enumerate(alphabet)}
        self.eos_id = self._id[eos]          # documents end with a newline

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        try:
            return [self._id[ch] for ch in text]
        except KeyError as err:
            pos = next(i for i, ch in enumerate(text) if ch not in self._id)
            raise ValueError(f"character {err.args[0]!r} at position {pos} is not in the "
                             f"vocabulary {self.alphabet!r}") from None

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < len(self.alphabet):
                raise ValueError(f"token id {i!r} is not in [0, {len(self.alphabet)})")
            out.append(self.alphabet[i])
        return "".join(out)


TOKENIZER = CharTokenizer()


# --- configuration --------------------------------------------------------------------

@dataclass(frozen=True)
class TinyConfig:
    vocab: int
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int            # GQA: each KV head serves n_heads // n_kv_heads query heads
    d_ff: int                  # SwiGLU hidden width
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        for f in ("vocab", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"TinyConfig.{f} must be a positive integer, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def kv_bytes_per_token(self, bytes_per_element: int = 4) -> int:
        """Bytes of K and V that one token occupies in the cache, over all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TinyConfig":
        return cls(**json.loads(text))


# --- attention and the KV-cache protocol ----------------------------------------------

def causal_mask(q_positions: torch.Tensor, n_keys: int) -> torch.Tensor:
    """``[B, T, S]`` bool, True where the query at ``q_positions[b, t]`` may see key slot s.

    Keys are stored in position order (slot s holds position s), so a query sees slots
    ``0 .. its own position``. Slots past a shorter sequence's end are masked too.
    """
    if not isinstance(q_positions, torch.Tensor) or q_positions.dim() != 2 or \
            q_positions.is_floating_point() or q_positions.dtype == torch.bool:
        raise TypeError(f"q_positions must be a [B, T] integer tensor, got "
                        f"{getattr(q_positions, 'dtype', type(q_positions).__name__)} "
                        f"{tuple(getattr(q_positions, 'shape', ()))}")
    check_int("n_keys", n_keys, low=1)
    slots = torch.arange(n_keys, device=q_positions.device)
    return slots[None, None, :] <= q_positions[:, :, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), masked) v, with grouped-query attention.

    q: [B, H, T, d]; k, v: [B, Hkv, S, d]; mask: [B, T, S] bool (True = may attend).
    Returns [B, H, T, d]. Query head h reads KV head h // (H // Hkv): the same as
    repeating each KV head H // Hkv times (``repeat_interleave``), without the copy.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):      # cheap: no data is read
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise TypeError(f"{name} must be a 4-D floating-point tensor [B, heads, seq, d], "
                            f"got {getattr(t, 'dtype', type(t).__name__)} "
                            f"{tuple(getattr(t, 'shape', ()))}")
    B, H, T, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[0] != B or k.shape[3] != d or H % Hkv:
        raise ValueError(f"k must be [B={B}, Hkv dividing {H}, S, d={d}], got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3:
        raise TypeError(f"mask must be a [B, T, S] bool tensor, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    g = H // Hkv
    q = q.reshape(B, Hkv, g, T, d)                                 # group query heads
    scores = q @ k.unsqueeze(2).transpose(-1, -2) / math.sqrt(d)   # [B, Hkv, g, T, S]
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    out = scores.softmax(dim=-1) @ v.unsqueeze(2)                  # [B, Hkv, g, T, d]
    return out.reshape(B, H, T, d)


class KVCache(ABC):
    """Where the keys and values of past tokens live, for a batch of sequences.

    The model calls, for ``T`` new tokens per sequence:

    1. ``cache.lengths`` once, to place the new tokens at positions
       ``lengths[b] .. lengths[b] + T - 1`` (their RoPE angles);
    2. ``cache.attend(layer, q, k_new, v_new)`` once per layer, in layer order;
    3. ``cache.advance(T)`` once, after the last layer.

    A paged cache, in outline: keep a block table per sequence; in ``attend`` write
    k_new, v_new into the blocks that hold positions ``lengths[b] ..``, gather each
    sequence's blocks back into position order, and call :func:`attention` with
    :func:`causal_mask`; in ``advance`` add n to each length (new blocks as needed).
    """

    @property
    @abstractmethod
    def lengths(self) -> torch.Tensor:
        """``[B]`` int64: how many positions each sequence already has in the cache."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """Store this layer's new K, V, then attend.

        q: ``[B, n_heads, T, head_dim]``; k_new, v_new: ``[B, n_kv_heads, T, head_dim]``,
        for positions ``lengths[b] .. lengths[b] + T - 1`` (RoPE already applied to q and
        k). Keep k_new, v_new for ``layer``, and return ``[B, n_heads, T, head_dim]``: each
        query attending to every cached key of its sequence up to its own position
        (the :func:`attention` of q over those keys). Must not change ``lengths``.
        """

    @abstractmethod
    def advance(self, n: int) -> None:
        """Commit ``n`` new positions for every sequence (called after the last layer)."""

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])


class ContiguousKVCache(KVCache):
    """One preallocated slab per layer: ``[batch, n_kv_heads, max_len, head_dim]`` for K and V.

    Every sequence reserves ``max_len`` slots up front, used or not; that waste is what
    PagedAttention removes. Rows may hold different lengths (after :meth:`truncate`).
    """

    def __init__(self, config: TinyConfig, batch_size: int = 1, max_len: int | None = None,
                 device=None, dtype: torch.dtype = torch.float32):
        _check_config(config)
        max_len = config.max_seq_len if max_len is None else max_len
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(max_len, int) or not 0 < max_len <= config.max_seq_len:
            raise ValueError(f"max_len must be in [1, {config.max_seq_len}], got {max_len!r}")
        self.config, self.max_len = config, max_len
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths.clone()

    def attend(self, layer, q, k_new, v_new):
        B, _, T, _ = k_new.shape
        if B != self.batch_size or k_new.shape[1:] != (self.config.n_kv_heads, T, self.config.head_dim):
            raise ValueError(f"k_new has shape {tuple(k_new.shape)}, cache expects "
                             f"[{self.batch_size}, {self.config.n_kv_heads}, T, {self.config.head_dim}]")
        if int(self._lengths.max()) + T > self.max_len:
            raise ValueError(f"cache full: {int(self._lengths.max())} + {T} positions > max_len {self.max_len}")
        starts = self._lengths.tolist()
        if min(starts) == max(starts):        # the usual case: one slice for the whole batch
            s = starts[0]
            self.k[layer, :, :, s:s + T] = k_new
            self.v[layer, :, :, s:s + T] = v_new
        else:
            for b, s in enumerate(starts):
                self.k[layer, b, :, s:s + T] = k_new[b]
                self.v[layer, b, :, s:s + T] = v_new[b]
        S = max(starts) + T
        q_pos = self._lengths[:, None] + torch.arange(T, device=q.device)
        return attention(q, self.k[layer, :, :, :S], self.v[layer, :, :, :S], causal_mask(q_pos, S))

    def advance(self, n: int) -> None:
        if int(self._lengths.max()) + n > self.max_len:
            raise ValueError(f"cannot advance by {n}: max_len is {self.max_len}")
        self._lengths += n

    def truncate(self, lengths) -> None:
        """Forget positions past ``lengths`` (an int, or one per sequence); e.g. rejected drafts."""
        new = torch.as_tensor(lengths, dtype=torch.long, device=self._lengths.device).expand_as(self._lengths)
        if (new < 0).any() or (new > self._lengths).any():
            raise ValueError(f"truncate to {new.tolist()} but lengths are {self._lengths.tolist()}")
        self._lengths = new.clone()

    def bytes_reserved(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def bytes_used(self) -> int:
        per_pos = self.k.numel() // (self.batch_size * self.max_len) * self.k.element_size() * 2
        return int(self._lengths.sum()) * per_pos


class CacheBatch(KVCache):
    """Several caches seen as one batch (the continuous-batching pattern).

    Sequence order is the order of ``caches``; a cache holding ``n`` sequences takes the
    next ``n`` rows. Attention runs cache by cache, everything else batched.
    """

    def __init__(self, caches: Sequence[KVCache]):
        if len(caches) == 0:
            raise ValueError("CacheBatch needs at least one cache")
        for c in caches:
            if not isinstance(c, KVCache):
                raise TypeError(f"CacheBatch takes KVCache objects, got {type(c).__name__}")
        self.caches = list(caches)

    @property
    def lengths(self) -> torch.Tensor:
        return torch.cat([c.lengths for c in self.caches])

    def attend(self, layer, q, k_new, v_new):
        outs, row = [], 0
        for c in self.caches:
            n = c.batch_size
            outs.append(c.attend(layer, q[row:row + n], k_new[row:row + n], v_new[row:row + n]))
            row += n
        return torch.cat(outs)

    def advance(self, n: int) -> None:
        for c in self.caches:
            c.advance(n)


# --- the model --------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, ``[max_seq_len, head_dim // 2]`` each."""
    check_int("head_dim", head_dim, low=2)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {head_dim}")
    check_int("max_seq_len", max_seq_len, low=1)
    check_number("theta", theta, positive=True)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x ``[B, H, T, d]`` by angles ``[B, 1, T, d/2]``."""
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if 2 * cos.shape[-1] != x.shape[-1] or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must be [.., seq, d/2] for x's d={x.shape[-1]}, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None):
        B, T, _ = x.shape
        c = self.cfg
        q = self.wq(x).view(B, T, c.n_heads, c.head_dim).transpose(1, 2)      # [B, H, T, d]
        k = self.wk(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)   # [B, Hkv, T, d]
        v = self.wv(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:                       # full sequence: plain causal attention
            pos = torch.arange(T, device=x.device).expand(B, T)
            out = attention(q, k, v, causal_mask(pos, T))
        else:                                   # the cache stores k, v and attends
            out = cache.attend(layer, q, k, v)
        return self.wo(out.transpose(1, 2).reshape(B, T, c.n_heads * c.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, layer, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, layer, cache)
        return x + self.mlp(self.mlp_norm(x))


class TinyTransformer(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab, bias=False)   # untied
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)   # recomputed, not saved
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self):
        g = torch.Generator().manual_seed(0)
        for name, p in self.named_parameters():
            if p.dim() == 2:            # GPT-2 style: N(0, 0.02), residual outputs scaled down
                std = 0.02 / math.sqrt(2 * self.config.n_layers) if name.endswith(("wo.weight", "down.weight")) else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _run(self, tokens, positions, cache):
        x = self.embed(tokens)
        cos = self.rope_cos[positions][:, None]          # [B, 1, T, head_dim/2]
        sin = self.rope_sin[positions][:, None]
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, layer, cache)
        if cache is not None:
            cache.advance(tokens.shape[1])
        return self.lm_head(self.norm(x))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Causal forward over ``[B, T]`` token ids; ``[B, T, vocab]`` logits."""
        _check_tokens(tokens, self.config, ndim=2)
        B, T = tokens.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        return self._run(tokens, torch.arange(T, device=tokens.device).expand(B, T), None)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, cache: KVCache | Sequence[KVCache]) -> torch.Tensor:
        """Run ``[B, T]`` new tokens after what ``cache`` holds; ``[B, T, vocab]`` logits.

        Fills the cache with their K and V. ``cache`` may be a list of caches (see
        :class:`CacheBatch`). All B sequences get T new tokens.
        """
        cache = _as_cache(cache)
        _check_tokens(tokens, self.config, ndim=2)
        B, T = tokens.shape
        if cache.batch_size != B:
            raise ValueError(f"tokens have batch {B} but the cache holds {cache.batch_size} sequences")
        lengths = cache.lengths.to(tokens.device)
        end = int(lengths.max()) + T
        if end > self.config.max_seq_len:
            raise ValueError(f"sequence would reach {end} positions, beyond max_seq_len "
                             f"{self.config.max_seq_len}")
        positions = lengths[:, None] + torch.arange(T, device=tokens.device)
        return self._run(tokens, positions, cache)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: KVCache | Sequence[KVCache]) -> torch.Tensor:
        """One new token per sequence (``[B]`` or ``[B, 1]``); ``[B, vocab]`` logits."""
        _check_tokens(tokens, self.config, ndim=None)
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        elif tokens.dim() != 2 or tokens.shape[1] != 1:
            raise ValueError(f"decode_step takes one token per sequence, [B] or [B, 1]; "
                             f"got shape {tuple(tokens.shape)}")
        return self.prefill(tokens, cache)[:, -1]


def _as_cache(cache) -> KVCache:
    if isinstance(cache, KVCache):
        return cache
    if isinstance(cache, (list, tuple)):
        return CacheBatch(cache)
    raise TypeError(f"expected a KVCache or a list of them, got {type(cache).__name__}")


def _check_tokens(tokens, config: TinyConfig, ndim: int | None) -> None:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"tokens must be an integer tensor (torch.long), got dtype {tokens.dtype}")
    if ndim is not None and tokens.dim() != ndim:
        raise ValueError(f"tokens must have shape [batch, seq_len], got {tuple(tokens.shape)}")
    if tokens.dim() not in (1, 2) or tokens.numel() == 0:
        raise ValueError(f"tokens must be a non-empty [batch] or [batch, seq_len] tensor, "
                         f"got shape {tuple(tokens.shape)}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= config.vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {config.vocab})")


# --- generation -------------------------------------------------------------------------

def sample_next(logits: torch.Tensor, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of ``[B, vocab]`` logits: argmax at temperature 0, else a sample
    from softmax(logits / temperature) drawn with ``generator``. Returns ``[B]`` int64."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    check_number("temperature", temperature, nonnegative=True)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: TinyTransformer, prompt_tokens, max_new_tokens: int, temperature: float = 0.0,
             generator: torch.Generator | None = None,
             cache_factory: Callable[[TinyConfig], KVCache] | None = None,
             stop_token: int | None = None) -> list[int]:
    """Continue one prompt; returns the new token ids (not the prompt).

    ``cache_factory(model.config)`` makes the (single-sequence) cache; by default a
    :class:`ContiguousKVCache` just big enough. Stops early after emitting ``stop_token``
    (e.g. ``TOKENIZER.eos_id``) if given.
    """
    if not hasattr(model, "config") or not callable(getattr(model, "prefill", None)):
        raise TypeError(f"model must be a TinyTransformer, got {type(model).__name__}")
    if isinstance(prompt_tokens, str):
        raise TypeError("prompt_tokens must be token ids, not text; use "
                        "utils.tiny.TOKENIZER.encode(text)")
    try:
        prompt = torch.as_tensor(prompt_tokens, device=model.device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"prompt_tokens must be a sequence of token ids, got "
                        f"{type(prompt_tokens).__name__}") from None
    if prompt.dim() != 1:
        raise ValueError(f"prompt_tokens must be one sequence (1-D), got shape {tuple(prompt.shape)}")
    if prompt.numel() == 0:
        raise ValueError("prompt_tokens must hold at least one token id")
    if prompt.is_floating_point() or prompt.dtype == torch.bool:
        raise TypeError(f"prompt_tokens must be integer token ids, got dtype {prompt.dtype}")
    if int(prompt.min()) < 0 or int(prompt.max()) >= model.config.vocab:
        raise ValueError(f"prompt_tokens must be ids in [0, {model.config.vocab}), got "
                         f"{prompt.tolist()}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    check_number("temperature", temperature, nonnegative=True)
    if stop_token is not None:
        check_int("stop_token", stop_token, low=0)
    total = prompt.numel() + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({prompt.numel()}) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds max_seq_len {model.config.max_seq_len}")
    if cache_factory is None:
        cache = ContiguousKVCache(model.config, max_len=max(total, 1), device=model.device)
    else:
        cache = cache_factory(model.config)
    out: list[int] = []
    if max_new_tokens == 0:
        return out
    logits = model.prefill(prompt[None], cache)[:, -1]
    while True:
        token = sample_next(logits, temperature, generator)
        out.append(int(token))
        if len(out) == max_new_tokens or (stop_token is not None and out[-1] == stop_token):
            return out
        logits = model.decode_step(token, cache)


# --- shipped weights --------------------------------------------------------------------

def save(model: TinyTransformer, path, extra: dict | None = None,
         dtype: torch.dtype = torch.float16) -> None:
    """Write the weights (as ``dtype``) and the config to a safetensors file."""
    from safetensors.torch import save_file

    if not isinstance(model, TinyTransformer):
        raise TypeError(f"model must be a TinyTransformer, got {type(model).__name__}")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    meta = {"config": model.config.to_json(), "alphabet": ALPHABET, "dtype": str(dtype)}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)


def weights_path(name: str) -> Path:
    if not isinstance(name, str):
        raise TypeError(f"name must be a tiny model's name, got {type(name).__name__} {name!r}")
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown tiny model name {name!r}; choose one of {MODEL_NAMES}")
    return WEIGHTS_DIR / f"{name}.safetensors"


def metadata(name: str) -> dict:
    """The training record stored with a shipped model (config, losses, acceptance rates)."""
    from safetensors import safe_open

    with safe_open(str(_existing(weights_path(name))), framework="pt") as f:
        meta = f.metadata()
    return {k: (v if k == "alphabet" else json.loads(v)) for k, v in meta.items() if k != "dtype"}


def load(name: str, device=None) -> TinyTransformer:
    """A shipped model (one of :data:`MODEL_NAMES`), float32, in eval mode."""
    from safetensors import safe_open

    path = _existing(weights_path(name))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    if meta.get("alphabet") != ALPHABET:
        raise ValueError(f"{path} was trained with a different alphabet than utils.tiny_corpus.ALPHABET")
    model = TinyTransformer(TinyConfig.from_json(meta["config"]))
    model.load_state_dict(state)
    return model.to(device or "cpu").eval()


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; make it with `python scripts/train_tiny.py`")
    return path
