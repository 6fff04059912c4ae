"""Compilation: graph capture, graph rewrites, tactic selection and INT8 calibration.

What chapter 21 uses, in its order:

* :func:`trace_tiny` — the tiny model's causal forward captured as a ``torch.fx``
  ``GraphModule``. ``torch.fx.symbolic_trace`` alone fails on it (the attention helpers
  check ``isinstance(x, torch.Tensor)``, which a tracing proxy is not), so those helpers
  are kept as leaf calls with the tracer's ``autowrap_functions``.
* :func:`count_ops` — how many times each operation runs in a graph.
* :func:`fuse_sibling_linears` — horizontal fusion: linears that read the same input (Q, K
  and V; SwiGLU's gate and up) become one matmul over concatenated weights.
* :func:`fuse_attention` — the unfused softmax attention replaced by
  ``F.scaled_dot_product_attention`` (the fused kernel: FlashAttention-style on a GPU).
* :func:`fold_constants` — nodes that depend only on weights computed once, at build time.
* :class:`Autotuner` — a tactic selector: time every candidate implementation for a
  shape (warm-up, then repeats, a robust statistic), keep the fastest in a cache.
* :func:`abs_histogram`, :func:`max_amax`, :func:`percentile_amax`,
  :func:`entropy_divergences`, :func:`entropy_amax` — INT8 calibrators on a 2048-bin
  histogram of ``|activation|``; the entropy one is the KL search of TensorRT's entropy
  calibrator (:data:`CALIBRATION_FACTS`).
* :func:`linear_inputs`, :func:`calibrate`, :func:`w8a8` — the tiny model's activations
  collected, calibrated, and the model run with every linear layer's input and weight
  fake-quantized to INT8.
* :func:`op_chain`, :func:`per_op_seconds` — launch overhead: what one small op costs on
  this CPU, eagerly and after capture; :func:`cuda_graph` — capture and replay on a GPU.

Quantities are SI (seconds). Every public function validates its arguments and raises
``TypeError`` / ``ValueError`` naming the bad one.
"""
from __future__ import annotations

import copy
import math
import operator
import statistics
import time
from types import MappingProxyType
from typing import Callable, Hashable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import quant, tiny
from . import validate as _v

__all__ = [
    "CALIBRATION_FACTS", "TORCH_COMPILE_MODES", "TORCH_COMPILE_MODES_SOURCE", "INDUCTOR_SPEEDUP", "LEAF_FUNCTIONS",
    "CausalForward", "trace_tiny", "count_ops", "matmul_count", "fuse_sibling_linears",
    "sdpa_attention", "fuse_attention", "fold_constants",
    "Autotuner",
    "abs_histogram", "max_amax", "percentile_amax", "entropy_divergences", "entropy_amax",
    "fake_quant", "linear_inputs", "calibrate", "w8a8",
    "op_chain", "per_op_seconds", "cuda_graph",
]

#: The facts about TensorRT's calibrators this module implements, each with its source.
CALIBRATION_FACTS = MappingProxyType({
    "histogram_bins": (2048, "Migacz, '8-bit Inference with TensorRT', GTC 2017 (S7310), slide "
                             "'Entropy Calibration - pseudocode': a 2048-bin histogram of |x|; "
                             "pytorch-quantization (NVIDIA/TensorRT repository, tools/"
                             "pytorch-quantization, calib/histogram.py) uses num_bins=2048"),
    "quantized_levels": (128, "Migacz 2017, same slide: candidate distribution quantized into "
                              "128 levels (the positive half of symmetric INT8)"),
    "first_threshold_bin": (128, "Migacz 2017, same slide: thresholds searched for i in "
                                 "range(128, 2048)"),
    "threshold": ("upper edge of the last kept bin", "pytorch-quantization "
                  "_compute_amax_entropy returns calib_bin_edges[i]; the slide writes "
                  "(m + 0.5) x bin width, half a bin (1/4096 of the range) lower"),
    "min_max_calibrator": ("the preferred calibrator for NLP tasks",
                           "TensorRT API reference, IInt8MinMaxCalibrator (C++ API from "
                           "TensorRT 6.0.1; Python API 7.x-10.x)"),
    "deprecation": ("the implicit calibrators are deprecated, superseded by explicit "
                    "quantization", "TensorRT 10.1 API reference, IInt8EntropyCalibrator2 "
                    "and IInt8MinMaxCalibrator"),
    "entropy_calibrator_2": ("the preferred calibrator; required for DLA",
                             "TensorRT C++ API reference, class IInt8EntropyCalibrator2 "
                             "(TensorRT 8.x-10.x; deprecated in 10.1 in favour of explicit "
                             "quantization)"),
})

#: ``torch.compile``'s modes, paraphrased from its docstring (torch 2.13, parameter ``mode``;
#: :data:`TORCH_COMPILE_MODES_SOURCE`).
TORCH_COMPILE_MODES = MappingProxyType({
    "default": "a good balance between performance and overhead",
    "reduce-overhead": "reduces Python overhead with CUDA graphs, for small batches; costs "
                       "memory (the workspace is cached between calls)",
    "max-autotune": "Triton or template matmuls (Triton convolutions on GPU), the best "
                    "configuration picked by profiling; CUDA graphs on by default on GPU",
    "max-autotune-no-cudagraphs": "max-autotune without CUDA graphs",
})
#: TorchInductor's published speedup over eager, with its source.
INDUCTOR_SPEEDUP = MappingProxyType({
    "inference": 2.27, "training": 1.41,
    "source": "Ansel et al., 'PyTorch 2: Faster Machine Learning Through Dynamic Python Bytecode "
              "Transformation and Graph Compilation', ASPLOS 2024, abstract: geometric mean over "
              "180+ real-world models on an NVIDIA A100 GPU",
})
TORCH_COMPILE_MODES_SOURCE = "torch.compile docstring, PyTorch 2.13: parameters `mode` and `options` (max_autotune)"


# --------------------------------------------------------------------------- validation

def _check_graph_module(name: str, gm) -> fx.GraphModule:
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"{name} must be a torch.fx.GraphModule, got {type(gm).__name__}")
    return gm


def _check_hist(hist, edges, min_bins: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    _v.check_tensor("hist", hist, ndim=1)
    _v.check_tensor("edges", edges, ndim=1, floating=True)
    if hist.numel() < min_bins:
        raise ValueError(f"hist must have at least {min_bins} bins, got {hist.numel()}")
    if edges.numel() != hist.numel() + 1:
        raise ValueError(f"edges must have len(hist) + 1 = {hist.numel() + 1} entries, "
                         f"got {edges.numel()}")
    h = hist.double()
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise ValueError("hist must hold finite, non-negative counts")
    if float(h.sum()) <= 0:
        raise ValueError("hist is empty (all counts are 0): nothing to calibrate")
    _v.check_finite_tensor("edges", edges)
    if not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError("edges must be strictly increasing")
    return h, edges.double()


# --------------------------------------------------------------------------- capture

class CausalForward(nn.Module):
    """The tiny model's full causal forward, ``[B, T]`` tokens → ``[B, T, vocab]`` logits,
    without the argument checks of ``TinyTransformer.forward`` (they read token values,
    which a tracer cannot)."""

    def __init__(self, model: tiny.TinyTransformer):
        super().__init__()
        if not isinstance(model, tiny.TinyTransformer):
            raise TypeError(f"model must be a utils.tiny.TinyTransformer, got {type(model).__name__}")
        self.model = model

    def forward(self, tokens):
        B, T = tokens.shape
        positions = torch.arange(T, device=tokens.device).expand(B, T)
        return self.model._run(tokens, positions, None)


#: Functions kept as single calls in a traced graph (they check types a proxy fails).
LEAF_FUNCTIONS = (tiny.attention, tiny.causal_mask, tiny.apply_rope)


def trace_tiny(model: tiny.TinyTransformer) -> fx.GraphModule:
    """``torch.fx`` capture of :class:`CausalForward` over ``model``.

    Modules are inlined down to ``nn.Linear``/``nn.Embedding`` (``call_module`` nodes);
    :data:`LEAF_FUNCTIONS` stay single ``call_function`` nodes. The graph module shares
    ``model``'s parameters (no copy).
    """
    tracer = fx.Tracer(autowrap_functions=LEAF_FUNCTIONS)
    root = CausalForward(model)
    graph = tracer.trace(root)
    return fx.GraphModule(tracer.root, graph, "TinyGraph")


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    return getattr(target, "__name__", str(target))


def count_ops(gm: fx.GraphModule) -> dict[str, int]:
    """``{operation: how many nodes run it}`` over the ``call_*`` nodes of ``gm``.

    A ``call_module`` node counts under its module's class name (``"Linear"``), a
    ``call_function`` under the function's ``__name__`` (``"add"``, ``"getitem"``,
    ``"attention"``), a ``call_method`` under the method's name (``"view"``). Keys sorted.
    """
    _check_graph_module("gm", gm)
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_function", "call_method"):
            key = _op_name(gm, node)
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def matmul_count(gm: fx.GraphModule) -> int:
    """How many ``nn.Linear`` calls (matmul launches) the graph makes."""
    return count_ops(gm).get("Linear", 0)


# --------------------------------------------------------------------------- rewrites

def _unique_name(gm: fx.GraphModule, base: str) -> str:
    name, k = base, 1
    while hasattr(gm, name):
        name, k = f"{base}_{k}", k + 1
    return name


def fuse_sibling_linears(gm: fx.GraphModule) -> int:
    """Horizontal fusion: linears that read the same node become one; returns the number
    of groups fused.

    Nodes ``call_module`` of ``nn.Linear`` with one positional argument are grouped by
    (input node, has bias, dtype, device). Each group of two or more distinct modules is
    replaced by one new ``nn.Linear`` whose weight (and bias) is the concatenation, in
    graph order, of the group's, followed by one ``narrow`` per original output (a view,
    no copy). The original modules are left untouched (the model they came from still
    works); ``gm`` is rewritten in place and recompiled.
    """
    _check_graph_module("gm", gm)
    groups: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, nn.Linear) or not isinstance(node.args[0], fx.Node):
            continue
        key = (node.args[0], mod.bias is not None, mod.weight.dtype, mod.weight.device)
        groups.setdefault(key, []).append(node)
    fused = 0
    for (src, has_bias, dtype, device), nodes in groups.items():
        mods = [gm.get_submodule(n.target) for n in nodes]
        if len(nodes) < 2 or len({id(m) for m in mods}) < len(mods):
            continue
        sizes = [m.out_features for m in mods]
        big = nn.Linear(mods[0].in_features, sum(sizes), bias=has_bias, device=device, dtype=dtype)
        with torch.no_grad():
            big.weight.copy_(torch.cat([m.weight for m in mods]))
            if has_bias:
                big.bias.copy_(torch.cat([m.bias for m in mods]))
        big.requires_grad_(False)
        name = _unique_name(gm, "fused_" + "__".join(n.target.replace(".", "_") for n in nodes))
        gm.add_submodule(name, big)
        with gm.graph.inserting_before(nodes[0]):
            out = gm.graph.call_module(name, (src,))
            start = 0
            for node, size in zip(nodes, sizes):
                piece = gm.graph.call_function(torch.narrow, (out, -1, start, size))
                start += size
                node.replace_all_uses_with(piece)
        for node in nodes:
            gm.graph.erase_node(node)
        fused += 1
    gm.graph.lint()
    gm.recompile()
    return fused


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """:func:`utils.tiny.attention` computed by ``F.scaled_dot_product_attention`` (one
    fused kernel: FlashAttention or memory-efficient attention on a GPU, a fused CPU
    kernel here). Same arguments, same result up to float rounding."""
    _v.check_tensor("q", q, ndim=4, floating=True)
    _v.check_tensor("k", k, ndim=4, floating=True)
    _v.check_tensor("v", v, ndim=4, floating=True)
    _v.check_tensor("mask", mask, ndim=3, dtype=torch.bool)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                          enable_gqa=k.shape[1] != q.shape[1])


def fuse_attention(gm: fx.GraphModule) -> int:
    """Replace every call of :func:`utils.tiny.attention` by :func:`sdpa_attention`;
    returns how many. ``gm`` is rewritten in place and recompiled."""
    _check_graph_module("gm", gm)
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is tiny.attention:
            node.target = sdpa_attention
            n += 1
    gm.graph.lint()
    gm.recompile()
    return n


def fold_constants(gm: fx.GraphModule) -> int:
    """Constant folding: every node whose inputs are all weights (``get_attr``) or Python
    constants is computed now and stored as a new buffer; returns how many nodes were
    folded. Dead nodes are removed and ``gm`` recompiled.

    Only the outermost foldable nodes (those used by a non-foldable node) are kept as
    buffers; the ones inside are dead after folding and eliminated.
    """
    _check_graph_module("gm", gm)
    env: dict[fx.Node, object] = {}
    foldable: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            env[node] = operator.attrgetter(node.target)(gm)
            foldable.add(node)
        elif node.op in ("call_function", "call_method") and node.all_input_nodes and \
                all(a in foldable for a in node.all_input_nodes):
            args = fx.node.map_arg(node.args, lambda a: env[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
            with torch.no_grad():
                if node.op == "call_function":
                    env[node] = node.target(*args, **kwargs)
                else:
                    env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            foldable.add(node)
    folded = 0
    for node in list(gm.graph.nodes):
        if node not in foldable or node.op == "get_attr":
            continue
        if not any(user not in foldable for user in node.users):
            continue
        value = env[node]
        name = _unique_name(gm, f"folded_{node.name}")
        if isinstance(value, torch.Tensor):
            gm.register_buffer(name, value.detach().clone())
        else:
            setattr(gm, name, value)
        with gm.graph.inserting_before(node):
            new = gm.graph.get_attr(name)
        node.replace_all_uses_with(new)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return folded


# --------------------------------------------------------------------------- auto-tuning

class Autotuner:
    """Pick, per key (a shape), the fastest of several implementations, and remember it.

    ``candidates``: ``{name: callable}``, all computing the same function. On the first
    :meth:`best` for a key each candidate runs ``warmup`` untimed calls, then ``repeats``
    calls timed one by one with ``timer``; its cost is the **median** of those (robust to
    a preempted run, unlike the mean). A candidate that raises is skipped for that key
    (a tactic that does not support the shape); the fastest of the rest wins, ties to the
    first in ``candidates`` order, and is stored in :attr:`cache`. Later calls for the key
    run nothing. :attr:`timings` keeps ``{key: {name: seconds}}``.
    """

    def __init__(self, candidates: Mapping[str, Callable], *, warmup: int = 1, repeats: int = 5,
                 timer: Callable[[], float] = time.perf_counter):
        if not isinstance(candidates, Mapping):
            raise TypeError(f"candidates must be a dict name -> callable, got {type(candidates).__name__}")
        if not candidates:
            raise ValueError("candidates is empty: nothing to choose from")
        for name, fn in candidates.items():
            _v.check_callable(f"candidates[{name!r}]", fn)
        self.candidates = dict(candidates)
        self.warmup = _v.check_int("warmup", warmup, low=0)
        self.repeats = _v.check_int("repeats", repeats, low=1)
        self.timer = _v.check_callable("timer", timer)
        self.cache: dict[Hashable, str] = {}
        self.timings: dict[Hashable, dict[str, float]] = {}

    def _measure(self, fn: Callable, args: tuple) -> float:
        for _ in range(self.warmup):
            fn(*args)
        times = []
        for _ in range(self.repeats):
            t0 = self.timer()
            fn(*args)
            times.append(self.timer() - t0)
        return statistics.median(times)

    def best(self, key: Hashable, *args) -> str:
        """The name of the fastest candidate for ``key`` (timed on ``args`` the first time)."""
        try:
            hash(key)
        except TypeError:
            raise TypeError(f"key must be hashable (e.g. a tuple of sizes), got "
                            f"{type(key).__name__}") from None
        if key in self.cache:
            return self.cache[key]
        costs: dict[str, float] = {}
        for name, fn in self.candidates.items():
            try:
                costs[name] = self._measure(fn, args)
            except Exception:           # this tactic does not apply to this shape
                continue
        if not costs:
            raise RuntimeError(f"every candidate raised for key {key!r}")
        winner = min(costs, key=costs.__getitem__)     # first of equal minima
        self.timings[key] = costs
        self.cache[key] = winner
        return winner

    def __call__(self, key: Hashable, *args):
        """Run the chosen candidate for ``key`` on ``args`` and return its result."""
        return self.candidates[self.best(key, *args)](*args)


# --------------------------------------------------------------------------- calibration

def abs_histogram(x: torch.Tensor, bins: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts, edges)``: the histogram of ``|x|`` in ``bins`` equal bins over
    ``[0, max|x|]`` (``torch.histogram``), float64. ``bins`` defaults to TensorRT's 2048."""
    _v.check_tensor("x", x, floating=True)
    bins = _v.check_int("bins", bins, low=1)
    if x.numel() == 0:
        raise ValueError("x is empty")
    _v.check_finite_tensor("x", x)
    a = x.detach().abs().double().reshape(-1).cpu()
    top = float(a.max())
    if top == 0:
        raise ValueError("x is all zeros: no range to calibrate")
    counts, edges = torch.histogram(a, bins=bins, range=(0.0, top))
    return counts, edges


def max_amax(x: torch.Tensor) -> float:
    """The max calibrator: ``max|x|`` (TensorRT's IInt8MinMaxCalibrator, symmetric)."""
    _v.check_tensor("x", x, floating=True)
    if x.numel() == 0:
        raise ValueError("x is empty")
    _v.check_finite_tensor("x", x)
    return float(x.detach().abs().max())


def percentile_amax(hist: torch.Tensor, edges: torch.Tensor, percentile: float = 99.99) -> float:
    """The percentile calibrator: the upper edge of the first bin at which the cumulative
    count reaches ``percentile`` % of the total, so at least that share of |x| is at or
    below the returned value. ``percentile`` in (0, 100]; 100 gives the last edge."""
    h, e = _check_hist(hist, edges)
    p = _v.check_number("percentile", percentile)
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p!r}")
    cum = torch.cumsum(h, 0)
    k = int(torch.searchsorted(cum, p / 100 * float(h.sum())))
    return float(e[min(k, h.numel() - 1) + 1])


_CHUNK = 128     # candidate thresholds per vectorized step (memory: 128 x bins float64)


def entropy_divergences(hist: torch.Tensor, levels: int = 128, start_bin: int = 128) -> torch.Tensor:
    """KL(P || Q) for each candidate threshold bin ``i = start_bin .. len(hist)``.

    P: the first ``i`` bins, with every count beyond them added to bin ``i - 1`` (clipped
    values land on the threshold). Q: bins ``0 .. i-1`` (without the clipped counts) merged
    into ``levels`` groups (bin ``j`` in group ``j * levels // i``), each group's total
    spread evenly over its non-empty bins, empty bins kept at 0. Both normalized;
    ``KL = sum p log(p / q)`` over ``p > 0``, ``inf`` where some ``p > 0`` has ``q = 0``.
    Returns float64 ``[len(hist) - start_bin + 1]``.
    """
    _v.check_tensor("hist", hist, ndim=1)
    levels = _v.check_int("levels", levels, low=1)
    start_bin = _v.check_int("start_bin", start_bin, low=levels)
    h = hist.double()
    if h.numel() < start_bin:
        raise ValueError(f"hist must have at least start_bin={start_bin} bins, got {h.numel()}")
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise ValueError("hist must hold finite, non-negative counts")
    if float(h.sum()) <= 0:
        raise ValueError("hist is empty (all counts are 0): nothing to calibrate")
    n = h.numel()
    tail = torch.flip(torch.cumsum(torch.flip(h, [0]), 0), [0])       # tail[i] = sum h[i:]
    tail = torch.cat([tail, h.new_zeros(1)])
    out = []
    for first in range(start_bin, n + 1, _CHUNK):    # candidates in chunks: [C, n] matrices
        last = min(first + _CHUNK, n + 1)
        i = torch.arange(first, last)[:, None]                                  # [C, 1]
        j = torch.arange(last - 1)[None, :]                                     # [1, w]
        counts = torch.where(j < i, h[None, :last - 1], 0.0)                    # bins 0..i-1
        group = torch.clamp(j * levels // i, max=levels - 1)                   # [C, n]
        g_sum = h.new_zeros(i.shape[0], levels).scatter_add_(1, group, counts)
        g_cnt = h.new_zeros(i.shape[0], levels).scatter_add_(1, group, (counts > 0).double())
        q = torch.where(counts > 0, g_sum.gather(1, group) / g_cnt.gather(1, group).clamp(min=1), 0.0)
        p = counts.scatter_add(1, i - 1, tail[i])                              # clipped -> bin i-1
        p = p / p.sum(1, keepdim=True)
        q_tot = q.sum(1, keepdim=True)
        q = q / torch.where(q_tot > 0, q_tot, 1.0)
        support = p > 0
        ratio = torch.where(support, p / torch.where(q > 0, q, 1.0), 1.0)
        kl = torch.where(support, p * torch.log(ratio), 0.0).sum(1)
        broken = (support & (q == 0)).any(1) | (q_tot[:, 0] <= 0)
        out.append(torch.where(broken, math.inf, kl))
    return torch.cat(out)


def entropy_amax(hist: torch.Tensor, edges: torch.Tensor, levels: int = 128,
                 start_bin: int = 128) -> float:
    """The entropy calibrator: the threshold ``edges[i]`` whose clipped-and-quantized
    distribution is closest to the original in KL divergence
    (:func:`entropy_divergences`); of equal minima the largest ``i``, as NVIDIA's
    pytorch-quantization does."""
    _check_hist(hist, edges, min_bins=start_bin if isinstance(start_bin, int) else 1)
    div = entropy_divergences(hist, levels, start_bin)
    best = float(div.min())
    if not math.isfinite(best):
        raise ValueError("every candidate threshold has infinite divergence")
    last = int(torch.nonzero(div == best).max())
    return float(edges.double()[start_bin + last])


def fake_quant(x: torch.Tensor, amax: float) -> torch.Tensor:
    """Symmetric INT8 quantize-dequantize of ``x`` with scale ``amax / 127``
    (``torch.fake_quantize_per_tensor_affine``, codes in [-127, 127]; values beyond
    ``amax`` clip)."""
    _v.check_tensor("x", x, floating=True)
    amax = _v.check_number("amax", amax, positive=True)
    return torch.fake_quantize_per_tensor_affine(x.float(), amax / 127, 0, -127, 127).to(x.dtype)


def _linear_groups(model: tiny.TinyTransformer) -> dict[str, list[str]]:
    """Linear layers that read the same tensor, keyed by the first one's name."""
    groups: dict[str, list[str]] = {}
    for i in range(model.config.n_layers):
        b = f"blocks.{i}"
        groups[f"{b}.attn.wq"] = [f"{b}.attn.wq", f"{b}.attn.wk", f"{b}.attn.wv"]
        groups[f"{b}.attn.wo"] = [f"{b}.attn.wo"]
        groups[f"{b}.mlp.gate"] = [f"{b}.mlp.gate", f"{b}.mlp.up"]
        groups[f"{b}.mlp.down"] = [f"{b}.mlp.down"]
    groups["lm_head"] = ["lm_head"]
    return groups


def linear_inputs(model: tiny.TinyTransformer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every linear layer (Q, K and V share one, so do gate and up) over a
    forward of ``tokens``, as ``{first layer's name: [tokens, features]}``."""
    if not isinstance(model, tiny.TinyTransformer):
        raise TypeError(f"model must be a utils.tiny.TinyTransformer, got {type(model).__name__}")
    _v.check_tensor("tokens", tokens, ndim=2, floating=False)
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name in _linear_groups(model):
        mod = model.get_submodule(name)
        hooks.append(mod.register_forward_pre_hook(
            lambda m, inp, name=name: seen.__setitem__(name, inp[0].detach().reshape(-1, inp[0].shape[-1]))))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return {name: seen[name] for name in _linear_groups(model)}


def calibrate(acts: Mapping[str, torch.Tensor], method: str, percentile: float = 99.99,
              bins: int = 2048) -> dict[str, float]:
    """``{name: amax}`` for each activation by ``method``: ``"max"``, ``"percentile"``
    or ``"entropy"`` (histograms of ``bins`` bins)."""
    if not isinstance(acts, Mapping) or not acts:
        raise TypeError("acts must be a non-empty dict name -> activation tensor")
    _v.check_choice("method", method, ("max", "percentile", "entropy"))
    out = {}
    for name, x in acts.items():
        if method == "max":
            out[name] = max_amax(x)
            continue
        hist, edges = abs_histogram(x, bins)
        out[name] = percentile_amax(hist, edges, percentile) if method == "percentile" \
            else entropy_amax(hist, edges)
    return out


def w8a8(model: tiny.TinyTransformer, amax: Mapping[str, float]) -> tiny.TinyTransformer:
    """A copy of ``model`` whose linear layers compute in simulated INT8: weights per
    output channel by absmax (``quant.fake_quant_int8``), inputs per tensor with the
    calibrated ``amax`` of their group (:func:`fake_quant`). ``amax`` keys as
    :func:`linear_inputs` returns them."""
    if not isinstance(model, tiny.TinyTransformer):
        raise TypeError(f"model must be a utils.tiny.TinyTransformer, got {type(model).__name__}")
    if not isinstance(amax, Mapping):
        raise TypeError(f"amax must be a mapping of layer group -> amax, got {type(amax).__name__}")
    groups = _linear_groups(model)
    missing = [k for k in groups if k not in amax]
    if missing:
        raise ValueError(f"amax has no entry for {', '.join(missing)}")
    q = copy.deepcopy(model)
    for first, members in groups.items():
        a = _v.check_number(f"amax[{first!r}]", amax[first], positive=True)
        for name in members:
            lin = q.get_submodule(name)
            with torch.no_grad():
                lin.weight.copy_(quant.fake_quant_int8(lin.weight, 0))
            lin.register_forward_pre_hook(lambda m, inp, a=a: (fake_quant(inp[0], a),))
    return q


# --------------------------------------------------------------------------- launch overhead

def op_chain(x: torch.Tensor, n: int = 100) -> torch.Tensor:
    """``n`` small elementwise ops in a row (``x * 0.5 + 0.25``, alternately): each is a
    separate kernel launch eagerly; a compiler fuses the chain into one."""
    if not isinstance(x, (torch.Tensor, fx.Proxy)):      # a Proxy while fx traces the chain
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    n = _v.check_int("n", n, low=1)
    for i in range(n):
        x = x * 0.5 if i % 2 == 0 else x + 0.25
    return x


def per_op_seconds(fn: Callable, x: torch.Tensor, n_ops: int, repeats: int = 7,
                   number: int = 20) -> float:
    """Seconds per op: best of ``repeats`` runs of ``number`` calls of ``fn(x)``, divided
    by ``n_ops * number`` (the best run is the one least disturbed by other load)."""
    _v.check_callable("fn", fn)
    n_ops = _v.check_int("n_ops", n_ops, low=1)
    repeats = _v.check_int("repeats", repeats, low=1)
    number = _v.check_int("number", number, low=1)
    _v.check_tensor("x", x)
    fn(x)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    best = math.inf
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(number):
            fn(x)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best / (n_ops * number)


def cuda_graph(fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor,
               warmup: int = 3) -> Callable[[torch.Tensor], torch.Tensor]:
    """Capture ``fn(example)`` into a CUDA graph; return ``replay(x)``, which copies ``x``
    into the captured input, replays every kernel with one launch and returns (a clone
    of) the output. Needs CUDA; ``x`` must have ``example``'s shape and dtype."""
    _v.check_callable("fn", fn)
    _v.check_tensor("example", example)
    warmup = _v.check_int("warmup", warmup, low=1)
    if not example.is_cuda:
        raise ValueError("cuda_graph needs a CUDA tensor as example (CUDA graphs are a GPU feature)")
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):                # warm-up off the default stream
        for _ in range(warmup):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)

    def replay(x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.shape != static_in.shape or x.dtype != static_in.dtype:
            raise ValueError(f"x must be a tensor of shape {tuple(static_in.shape)} and dtype "
                             f"{static_in.dtype}, as captured")
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    return replay
