"""Activation recomputation (activation checkpointing): what autograd saves, and what it costs.

Chapter 12 and its lab measure memory as the bytes autograd *saves for the backward
pass*, seen through ``torch.autograd.graph.saved_tensors_hooks``:

* :class:`SavedTensorMeter` — a context manager that counts every saved tensor once per
  distinct storage (two views of one buffer cost one buffer), follows each until autograd
  lets go of it, and reports what is held now (``live``), the most ever held at once
  (``peak``) and, optionally, the whole timeline;
* :func:`saved_bytes` (forward only) and :func:`measure_step` (forward and backward,
  bytes and FLOPs) wrap it for one call.

The models the chapter measures: :class:`ResidualMLP` blocks stacked by :func:`mlp_stack`
(each block counts its forward calls, so recomputation can be counted), and a GPT-style
:class:`TransformerLayer` whose attention core is a swappable function
(:func:`attention_core` is the plain one).

The segment-checkpointing model of Chen et al. 2016, exact for these blocks:
:func:`segment_sizes`, :func:`segment_memory`, :func:`best_segments`,
:func:`continuous_optimum`; and the production mechanism it is checked against,
:func:`checkpoint_segments`, built on ``torch.utils.checkpoint``. What recomputation
costs a transformer layer in FLOPs: :func:`layer_forward_flops`, :func:`recompute_overhead`.

All sizes are bytes; FLOPs are counted by :class:`MatmulFlops` with PyTorch's formulas.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import flop_registry

from .validate import check_callable, check_int, check_number, check_tensor

__all__ = [
    "PUBLISHED", "SavedTensorMeter", "saved_bytes", "MatmulFlops", "StepMeasure", "measure_step",
    "ResidualMLP", "mlp_stack", "run_blocks", "attention_core", "TransformerLayer",
    "segment_sizes", "SegmentMemory", "segment_memory", "best_segments",
    "continuous_optimum", "checkpoint_segments", "layer_forward_flops", "recompute_overhead",
]

#: Published claims quoted by chapter 12, each with where it is printed.
PUBLISHED = {
    "chen2016": {
        "memory": "O(sqrt(n)) memory to train an n-layer network",
        "compute": "the computational cost of one extra forward pass per mini-batch",
        "extreme": "O(log n) memory with O(n log n) extra forward computation",
        "resnet1000_memory_before_bytes": 48e9,
        "resnet1000_memory_after_bytes": 7e9,
        "resnet1000_extra_time_fraction": 0.30,
        "source": ("T. Chen, B. Xu, C. Zhang, C. Guestrin, 'Training Deep Nets with Sublinear "
                   "Memory Cost', arXiv:1604.06174 (2016), abstract: 1,000-layer residual "
                   "network on ImageNet, 48G -> 7G of memory with 30 percent additional "
                   "running time"),
    },
    "korthikanti2022": {
        "activation_memory_reduction": 5.0,
        "recompute_overhead_reduction": 0.90,
        "mfu_530b": 0.542,
        "mfu_530b_full_recompute": 0.421,
        # Section 5: selective recomputation's extra FLOPs, for the paper's two model shapes
        # (s = 2048; GPT-3 h = 12288, MT-NLG h = 20480, Table 3). They equal s / (6h + s),
        # the attention core's share of one forward pass; :func:`recompute_overhead` counts
        # the same FLOPs against forward + backward, s / (18h + 3s), a third of that.
        "selective_extra_flops": {
            "gpt3-175b": {"seq_len": 2048, "hidden": 12288, "fraction": 0.027},
            "mt-nlg-530b": {"seq_len": 2048, "hidden": 20480, "fraction": 0.016},
        },
        "selective_extra_flops_source": (
            "V. Korthikanti et al., arXiv:2205.05198, Section 5: selective activation "
            "recomputation costs 2.7% extra FLOPs for GPT-3 and 1.6% for MT-NLG (s = 2048; "
            "model shapes in Table 3)"),
        "source": ("V. Korthikanti et al., 'Reducing Activation Recomputation in Large "
                   "Transformer Models', arXiv:2205.05198 (2022; MLSys 2023), abstract: "
                   "sequence parallelism and selective recomputation with tensor "
                   "parallelism reduce activation memory by 5x and the execution-time "
                   "overhead of recomputation by over 90%; 530B GPT on 2240 A100s: MFU "
                   "54.2% vs 42.1% with full recomputation"),
    },
}


# ---------------------------------------------------------------------------------------
# Measuring saved tensors
# ---------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def _ignored_keys(ignore) -> set:
    if ignore is None:
        return set()
    if isinstance(ignore, nn.Module):
        ignore = list(ignore.parameters()) + list(ignore.buffers())
    elif isinstance(ignore, torch.Tensor):
        ignore = [ignore]
    keys = set()
    for t in ignore:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ignore must hold tensors (or be an nn.Module), got "
                            f"{type(t).__name__}")
        keys.add(_storage_key(t)[0])
    return keys


class _Saved:
    """What the meter's pack hook hands autograd: the tensor, plus a release on delete."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor, key, meter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Count the bytes autograd saves for backward, once per distinct storage.

    Use as a context manager around a forward pass (and, to see recomputation, the
    backward too)::

        with SavedTensorMeter(ignore=model) as m:
            y = model(x)
            stored = m.live          # held for backward now
            y.backward(g)
        m.peak                       # the most held at any moment

    Every tensor that an operation saves for its backward goes through the pack hook.
    The meter keys it by its storage (``untyped_storage().data_ptr()``), so a view of a
    tensor already saved costs nothing more, and counts the whole storage's bytes. It
    wraps each saved tensor in a small object that autograd keeps as long as it needs
    the tensor; when autograd drops it (after the node's backward ran, or with the
    graph), the storage's count goes down, and at zero its bytes leave ``live``.

    ``ignore``: tensors (or a module, meaning its parameters and buffers) whose storages
    are not counted: parameters are saved by every matmul but are not activations.
    ``timeline=True`` records ``live`` after every change in :attr:`timeline`.

    Tensors saved under another saved-tensor hook nested inside this one (such as the
    recomputation inside ``torch.utils.checkpoint``, or its selective-checkpoint cache)
    are invisible here: the innermost hook wins.
    """

    def __init__(self, ignore=None, timeline: bool = False):
        self._ignore = _ignored_keys(ignore)
        self._refs: dict[int, list[int]] = {}   # data_ptr -> [references, bytes]
        self.live = 0
        self.peak = 0
        self.packed = 0          # tensors packed (every save, including repeats)
        self.distinct = 0        # storages counted (a storage saved again after release counts again)
        self.total = 0           # bytes of all storages counted
        self.timeline: list[int] | None = [] if timeline else None
        self._hooks = None

    # -- hooks ---------------------------------------------------------------------------
    def _pack(self, t):
        self.packed += 1
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return t
        key, nbytes = _storage_key(t)
        if nbytes == 0 or key in self._ignore:
            return t
        ref = self._refs.get(key)
        if ref is None:
            self._refs[key] = [1, nbytes]
            self.live += nbytes
            self.distinct += 1
            self.total += nbytes
            self.peak = max(self.peak, self.live)
            if self.timeline is not None:
                self.timeline.append(self.live)
        else:
            ref[0] += 1
        return _Saved(t, key, self)

    @staticmethod
    def _unpack(obj):
        return obj.tensor if isinstance(obj, _Saved) else obj

    def _release(self, key):
        ref = self._refs.get(key)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self._refs[key]
            if self.timeline is not None:
                self.timeline.append(self.live)

    # -- context manager -------------------------------------------------------------------
    def __enter__(self):
        if self._hooks is not None:
            raise RuntimeError("this SavedTensorMeter is already in use; make a new one")
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    def __repr__(self):
        return (f"SavedTensorMeter(live={self.live:,} B, peak={self.peak:,} B, "
                f"distinct={self.distinct}, packed={self.packed})")


def saved_bytes(fn: Callable, *args, ignore=None, **kwargs) -> int:
    """Bytes of the distinct storages that ``fn(*args, **kwargs)`` saves for backward.

    Forward only: the number is what the graph holds when ``fn`` returns, i.e. what a
    training step keeps between its forward and its backward.
    """
    check_callable("fn", fn)
    with SavedTensorMeter(ignore=ignore) as m:
        out = fn(*args, **kwargs)
        stored = m.live
    del out
    return stored


class MatmulFlops(TorchDispatchMode):
    """Count the FLOPs of every matmul-like op (mm, addmm, bmm, attention...) run inside.

    ``with MatmulFlops() as f: ...`` then ``f.total``; ``f.by_op`` maps op names to FLOPs.
    The formulas are PyTorch's own (``torch.utils.flop_counter.flop_registry``): 2 FLOPs
    per multiply-add; elementwise ops count zero. Unlike ``FlopCounterMode`` it does not
    track modules, so it also works when a custom ``autograd.Function`` calls
    ``torch.autograd.grad`` inside its backward (as a hand-made checkpoint does).
    """

    def __init__(self):
        super().__init__()
        self.total = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            n = int(formula(*args, **kwargs, out_val=out))
            self.total += n
            name = str(func._overloadpacket)
            self.by_op[name] = self.by_op.get(name, 0) + n
        return out


@dataclass(frozen=True)
class StepMeasure:
    """One forward and backward, measured: bytes saved for backward and FLOPs."""

    stored: int          # bytes held for backward when the forward returns
    peak: int            # most bytes held at once, forward and backward (recomputation included)
    forward_flops: int   # matmul FLOPs of the forward (:class:`MatmulFlops`)
    step_flops: int      # matmul FLOPs of forward + backward, recomputation included
    timeline: tuple = () # live bytes after every change, when asked for

    @property
    def backward_flops(self) -> int:
        return self.step_flops - self.forward_flops


def measure_step(fn: Callable, *inputs, ignore=None, grad: torch.Tensor | None = None,
                 timeline: bool = False, seed: int = 0) -> StepMeasure:
    """Run ``out = fn(*inputs)`` and ``out.backward(grad)``, measuring both.

    ``grad`` is the upstream gradient (default: a seeded standard normal of ``out``'s
    shape, so no loss function adds saved tensors of its own). Gradients accumulate in
    ``.grad`` as usual; zero them first if that matters. Returns a :class:`StepMeasure`.
    """
    check_callable("fn", fn)
    check_int("seed", seed)
    with SavedTensorMeter(ignore=ignore, timeline=timeline) as m, MatmulFlops() as flops:
        out = fn(*inputs)
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            raise ValueError("fn must return a tensor that requires grad (is any input or "
                             "parameter requires_grad=True?)")
        stored = m.live
        forward_flops = flops.total
        if grad is None:
            gen = torch.Generator().manual_seed(seed)
            grad = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
        out.backward(grad)
        del out
    return StepMeasure(stored=stored, peak=m.peak, forward_flops=int(forward_flops),
                       step_flops=flops.total,
                       timeline=tuple(m.timeline) if timeline else ())


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------
class ResidualMLP(nn.Module):
    """``y = x + W2 relu(W1 x + b1) + b2``, the MLP half of a transformer layer.

    For an input of ``batch x width`` elements (``u`` bytes) it saves, for backward, its
    input (for W1's gradient) and the ReLU output (for ReLU's and W2's gradients, one
    storage): ``u (1 + ratio)`` bytes. ``calls`` counts forward calls, so recomputation
    can be counted.
    """

    def __init__(self, width: int, ratio: int = 4):
        super().__init__()
        if not isinstance(width, int) or width <= 0 or not isinstance(ratio, int) or ratio <= 0:
            raise ValueError(f"width and ratio must be positive integers, got {width!r}, {ratio!r}")
        self.fc1 = nn.Linear(width, ratio * width)
        self.fc2 = nn.Linear(ratio * width, width)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.fc2(torch.relu(self.fc1(x)))


def mlp_stack(n: int, width: int, ratio: int = 4, seed: int = 0) -> nn.ModuleList:
    """``n`` :class:`ResidualMLP` blocks with seeded weights, as an ``nn.ModuleList``."""
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n (the number of blocks) must be a positive integer, got {n!r}")
    check_int("width", width, low=1)
    check_int("ratio", ratio, low=1)
    check_int("seed", seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.ModuleList(ResidualMLP(width, ratio) for _ in range(n))


def _check_blocks(blocks) -> list:
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise TypeError("blocks must be a sequence of modules, got a single "
                        f"{type(blocks).__name__}")
    if not isinstance(blocks, Iterable):
        raise TypeError(f"blocks must be a sequence of modules, got {type(blocks).__name__}")
    blocks = list(blocks)
    for b in blocks:
        if not callable(b):
            raise TypeError(f"blocks must hold modules (callables), got {type(b).__name__}")
    return blocks


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Run ``x`` through ``blocks`` one after another, nothing recomputed."""
    _check_blocks(blocks)
    check_tensor("x", x, floating=True)
    for block in blocks:
        x = block(x)
    return x


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   causal: bool = True) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) [+ causal mask]) v`` over the last two dimensions.

    The plain formulation, which saves the ``seq x seq`` probabilities (and the mask)
    for backward; ``torch.nn.functional.scaled_dot_product_attention`` computes the same.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, floating=True)
        if t.dim() < 2 or t.dtype != q.dtype:
            raise ValueError(f"{name} must be (..., seq, head_dim) with q's dtype {q.dtype}, "
                             f"got shape {tuple(t.shape)} and dtype {t.dtype}")
    if k.shape[-1] != q.shape[-1] or v.shape[-2] != k.shape[-2]:
        raise ValueError(f"k must have q's head_dim and v k's seq length; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    s_q, s_k = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if causal:
        mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class TransformerLayer(nn.Module):
    """A GPT-style pre-LayerNorm layer (no dropout), with a swappable attention core.

    ``x + proj(core(q, k, v))`` then ``x + fc2(gelu(fc1(LN(x))))``, with q, k, v from one
    fused projection of ``LN(x)``, split into ``heads`` heads. ``core(q, k, v)`` gets
    tensors of shape ``(batch, heads, seq, head_dim)`` (views into the fused projection's
    output) and returns the same shape; causal masking is the core's job.
    """

    def __init__(self, hidden: int, heads: int, mlp_ratio: int = 4,
                 core: Callable | None = None):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
        self.hidden, self.heads = hidden, heads
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, mlp_ratio * hidden)
        self.fc2 = nn.Linear(mlp_ratio * hidden, hidden)
        self.core = core if core is not None else attention_core

    def forward(self, x):
        b, s, h = x.shape
        a = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=-1)
        q, k, v = (t.view(b, s, a, h // a).transpose(1, 2) for t in (q, k, v))
        o = self.core(q, k, v).transpose(1, 2).reshape(b, s, h)
        x = x + self.proj(o)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


# ---------------------------------------------------------------------------------------
# Segment checkpointing (Chen et al. 2016): the exact memory model, and the real thing
# ---------------------------------------------------------------------------------------
def _count(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def segment_sizes(n: int, k: int) -> list[int]:
    """Split ``n`` blocks into ``k`` contiguous segments, as even as possible, longer first.

    ``segment_sizes(10, 4) == [3, 3, 2, 2]``. Longer segments go first because the
    backward pass reaches them last, when fewer checkpoints are still held.
    """
    n, k = _count("n", n), _count("k", k)
    if k > n:
        raise ValueError(f"k={k} segments cannot be made from n={n} blocks (need 1 <= k <= n)")
    q, r = divmod(n, k)
    return [q + 1] * r + [q] * (k - r)


@dataclass(frozen=True)
class SegmentMemory:
    """Saved-for-backward bytes and recomputation of a segment-checkpointed stack."""

    stored: int        # bytes held between forward and backward
    peak: int          # most bytes held at once (while the worst segment is recomputed)
    recomputed: int    # block forwards run a second time


def _bytes(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer number of bytes, got {value!r}")
    return int(value)


def segment_memory(sizes: Sequence[int], input_bytes: int, block_bytes: int,
                   checkpoint_last: bool = True) -> SegmentMemory:
    """Exact saved bytes of blocks run in segments of ``sizes``, each segment checkpointed.

    Every block has an input of ``input_bytes`` (u) and saves ``block_bytes`` (a, which
    includes its input) when run normally. A checkpointed segment keeps only its input
    (u) until its backward. The backward visits segments last to first; while segment j
    (1-based) is recomputed, the inputs of segments 1..j-1 are still held and segment j
    holds all of its m_j blocks' activations (its own input among them):

        peak = max_j [ (j - 1) u + m_j a ],      stored = k u,      recomputed = n.

    With ``checkpoint_last=False`` the last segment runs normally (as
    ``torch.utils.checkpoint.checkpoint_sequential`` does): it is not recomputed, it
    stores (k - 1) u + m_k a, and the peak is the same.
    """
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise TypeError(f"sizes must be a sequence of segment sizes, got {type(sizes).__name__}")
    sizes = [_count("sizes (each segment size)", m) for m in sizes]
    if not sizes:
        raise ValueError("sizes must hold at least one segment")
    u, a = _bytes("input_bytes", input_bytes), _bytes("block_bytes", block_bytes)
    if a < u:
        raise ValueError(f"block_bytes ({a}) must include the block's input ({u})")
    k, n = len(sizes), sum(sizes)
    peak = max((j * u + m * a for j, m in enumerate(sizes)), default=0)
    if checkpoint_last:
        return SegmentMemory(stored=k * u, peak=max(peak, k * u), recomputed=n)
    return SegmentMemory(stored=(k - 1) * u + sizes[-1] * a, peak=peak,
                         recomputed=n - sizes[-1])


def best_segments(n: int, input_bytes: int, block_bytes: int) -> int:
    """The segment count k (1..n, even split) with the lowest peak; the smallest on ties."""
    n = _count("n", n)
    peaks = [segment_memory(segment_sizes(n, k), input_bytes, block_bytes).peak
             for k in range(1, n + 1)]
    return 1 + min(range(n), key=lambda i: (peaks[i], i))


def continuous_optimum(n: int, input_bytes: float, block_bytes: float) -> tuple[float, float]:
    """``(k*, M*)`` minimising M(k) = k u + (n / k) a over real k: k* = sqrt(n a / u),
    M* = 2 sqrt(n a u). Chen et al.'s sqrt(n) is the case a = u."""
    n = _count("n", n)
    check_number("input_bytes", input_bytes, positive=True)
    check_number("block_bytes", block_bytes, positive=True)
    return math.sqrt(n * block_bytes / input_bytes), 2 * math.sqrt(n * block_bytes * input_bytes)


def checkpoint_segments(blocks: Sequence[nn.Module], x: torch.Tensor, k: int,
                        checkpoint_last: bool = True) -> torch.Tensor:
    """Run ``blocks`` in :func:`segment_sizes` segments, each under
    ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``.

    The production mechanism: the oracle the lab's hand-made version is checked against.
    With ``checkpoint_last=False`` the last segment runs normally.
    """
    blocks = _check_blocks(blocks)
    check_tensor("x", x, floating=True)
    sizes = segment_sizes(len(blocks), k)
    start = 0
    for j, m in enumerate(sizes):
        segment = blocks[start:start + m]
        start += m
        if j == len(sizes) - 1 and not checkpoint_last:
            x = run_blocks(segment, x)
        else:
            x = checkpoint(run_blocks, segment, x, use_reentrant=False)
    return x


# ---------------------------------------------------------------------------------------
# What recomputation costs in a transformer layer
# ---------------------------------------------------------------------------------------
def layer_forward_flops(seq_len: int, batch: int, hidden: int) -> int:
    """Matmul FLOPs of one GPT-style layer's forward (4h MLP): 24 b s h^2 + 4 b s^2 h.

    Counted op by op, 2 FLOPs per multiply-add: Q, K, V projections 6bsh^2, QK^T 2bs^2h,
    (probabilities)V 2bs^2h, output projection 2bsh^2, MLP 16bsh^2. The backward costs
    twice the forward (a gradient for the input and one for the weight of every matmul).
    """
    s, b, h = _count("seq_len", seq_len), _count("batch", batch), _count("hidden", hidden)
    return 24 * b * s * h * h + 4 * b * s * s * h


def recompute_overhead(seq_len: int, hidden: int, recompute: str = "full") -> float:
    """Extra matmul FLOPs of a training step, as a fraction of forward + backward.

    ``"full"``: one more forward, 1/3. ``"selective"``: only QK^T and (probabilities)V
    again, 4bs^2h / (3 (24bsh^2 + 4bs^2h)) = s / (18h + 3s). ``"none"``: 0.
    """
    s, h = _count("seq_len", seq_len), _count("hidden", hidden)
    if recompute == "none":
        return 0.0
    if recompute == "full":
        return 1 / 3
    if recompute == "selective":
        return s / (18 * h + 3 * s)
    raise ValueError(f"unknown recompute mode {recompute!r}; choose 'none', 'selective' or 'full'")
