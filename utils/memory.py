"""Memory calculator: what a transformer needs in device memory to train or to serve.

Every result is in **bytes** (SI base unit); convert only when displaying. The pieces:

* model states: :func:`weights_bytes`, :func:`gradient_bytes`, :func:`optimizer_bytes`;
* their sharding over data-parallel ranks with ZeRO: :func:`zero_bytes_per_device`, and
  the traffic that costs: :func:`zero_comm_bytes_per_step`;
* activations saved for the backward pass, with tensor/sequence parallelism and
  recomputation: :func:`activation_bytes_per_layer` (and, tensor by tensor,
  :func:`activation_breakdown_per_layer`);
* the KV cache of inference: :func:`kv_cache_bytes_per_token`, :func:`kv_cache_bytes`;
* the totals: :func:`training_bytes_per_device`, :func:`inference_bytes`, :func:`min_gpus`.

Functions that add several parts return a small frozen dataclass (a *breakdown*) whose
fields are the parts in bytes and whose ``.total`` is their sum; ``.as_dict()`` gives
the parts and the total, ``str()`` a readable table.

A model is given as a :class:`utils.models.ModelSpec`, a registry name (``"llama2-7b"``),
or, where only a parameter count matters, a plain integer. Sizes (parameters, tokens,
batch, degrees of parallelism) must be positive integers; an integer-valued float such as
``7.5e9`` is accepted. Bytes per element may be fractional (0.5 for 4-bit weights).

Sources (every paper number used below comes from one of these):

* Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models" (arXiv:2205.05198; MLSys 2023), Section 4 and Table 2: activation memory.
  (Full recompute with sequence parallelism, 2sbh/t, is Megatron-LM's implementation:
  Table 2 lists full recomputation only as 2sbh.)
* Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models" (SC20; arXiv:1910.02054), Section 3.1 (16 bytes per parameter for
  mixed-precision Adam), Section 5 and Figure 1 (the three stages), Section 7
  (communication volume).
* PyTorch ``torch.optim.AdamW`` / ``SGD`` / ``Adafactor``: the optimizer state each one
  allocates per parameter tensor (``exp_avg``, ``exp_avg_sq``; ``momentum_buffer``;
  ``row_var``/``col_var`` or ``variance``; plus a scalar ``step``).
* Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost"
  (arXiv:1804.04235): factored second moment, no first moment.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Union

from . import hardware as _hardware
from . import models as _models
from .models import ModelSpec
from .validate import resolve_gpu, resolve_model

__all__ = [
    "MemoryBreakdown", "ZeroMemory", "CommVolume", "TrainingMemory", "InferenceMemory",
    "RECOMPUTE_MODES", "ZERO_STAGES", "OPTIMIZERS", "SOURCES",
    "param_count", "tensor_shapes",
    "weights_bytes", "gradient_bytes", "optimizer_bytes", "optimizer_bytes_per_param",
    "zero_bytes_per_device", "zero_comm_bytes_per_step",
    "activation_breakdown_per_layer", "activation_bytes_per_layer", "logits_bytes",
    "kv_cache_bytes_per_token", "kv_cache_bytes",
    "training_bytes_per_device", "inference_bytes", "min_gpus",
]

SOURCES = {
    "activations": ("Korthikanti et al. 2022, 'Reducing Activation Recomputation in Large "
                    "Transformer Models', arXiv:2205.05198, Section 4 and Table 2; full "
                    "recompute with sequence parallelism (2sbh/t): Megatron-LM's "
                    "implementation, Table 2 lists 2sbh"),
    "zero": ("Rajbhandari et al. 2020, 'ZeRO: Memory Optimizations Toward Training Trillion "
             "Parameter Models', SC20, arXiv:1910.02054, Sections 3.1, 5, 7 and Figure 1"),
    "adam_state": ("PyTorch torch.optim.Adam/AdamW: per parameter tensor, state 'exp_avg' "
                   "and 'exp_avg_sq' (same shape and dtype as the parameter) and a scalar "
                   "'step'"),
    "adafactor": ("Shazeer & Stern 2018, 'Adafactor: Adaptive Learning Rates with Sublinear "
                  "Memory Cost', arXiv:1804.04235; PyTorch torch.optim.Adafactor state "
                  "'row_var'/'col_var' (tensors of 2+ dims) or 'variance' (vectors)"),
}

Number = Union[int, float]
ModelLike = Union[ModelSpec, str]

RECOMPUTE_MODES = ("none", "selective", "full")
ZERO_STAGES = (0, 1, 2, 3)


# ---------------------------------------------------------------------------------------
# Input checking: every error names the argument, the rule and the value that broke it.
# ---------------------------------------------------------------------------------------
def _size(name: str, value, *, minimum: int = 1) -> int:
    """A count (tokens, layers, parameters, ranks): an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not isinstance(value, numbers.Integral):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value}")
    return value


def _per_element(name: str, value) -> Number:
    """Bytes per element: a positive, finite number (fractional allowed, e.g. 0.5 for int4)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of bytes, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else value


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _recompute(value) -> str:
    if not isinstance(value, str) or value not in RECOMPUTE_MODES:
        raise ValueError(f"unknown recompute mode {value!r}; choose one of "
                         f"{', '.join(map(repr, RECOMPUTE_MODES))}")
    return value


def _zero_stage(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value not in ZERO_STAGES:
        raise ValueError(f"unknown ZeRO stage {value!r}; stage must be 0 (plain data "
                         f"parallelism), 1 (optimizer states sharded), 2 (+ gradients) "
                         f"or 3 (+ parameters)")
    return int(value)


def _model(model, name: str = "model") -> ModelSpec:
    return resolve_model(model, name)


def _tp_divides_heads(tp: int, heads: int) -> None:
    if heads % tp:
        raise ValueError(f"tp={tp} does not divide heads={heads}: tensor parallelism gives "
                         f"each of the tp ranks an equal share of the attention heads")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _times(count: int, per: Number) -> Number:
    """count x bytes-per-element, kept an int when both are ints."""
    return count * per


# ---------------------------------------------------------------------------------------
# Breakdowns
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryBreakdown:
    """Base of the breakdowns: every field is a number of bytes; ``total`` adds them."""

    @property
    def total(self) -> Number:
        return sum(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict:
        """The parts, in field order, then ``"total"`` (all in bytes)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["total"] = self.total
        return d

    def __str__(self) -> str:
        rows = [f"{k:<12} {v / 1e9:12.3f} GB  ({v / 2**30:10.3f} GiB)"
                for k, v in self.as_dict().items()]
        return f"{type(self).__name__}\n" + "\n".join(rows)


@dataclass(frozen=True)
class ZeroMemory(MemoryBreakdown):
    """Model-state bytes on one data-parallel rank (ZeRO, Rajbhandari et al. 2020)."""

    params: Number      # 16-bit parameters used in forward and backward
    grads: Number       # 16-bit gradients
    optimizer: Number   # optimizer states (fp32 master copy, momentum, variance for Adam)


@dataclass(frozen=True)
class CommVolume(MemoryBreakdown):
    """Bytes one data-parallel rank sends per training step (and receives, as many)."""

    reduce_scatter: Number  # gradients
    all_gather: Number      # reduced gradients (stage 0) or parameters (stages 1-3)


@dataclass(frozen=True)
class TrainingMemory(MemoryBreakdown):
    """Bytes on one device during training."""

    params: Number
    grads: Number
    optimizer: Number
    activations: Number  # saved for backward, all layers and in-flight micro-batches
    logits: Number       # fp32 logits for the loss (0 unless asked for)


@dataclass(frozen=True)
class InferenceMemory(MemoryBreakdown):
    """Bytes to serve: the weights plus the KV cache (transient activations left out)."""

    weights: Number
    kv_cache: Number


# ---------------------------------------------------------------------------------------
# Model states: weights, gradients, optimizer
# ---------------------------------------------------------------------------------------
def tensor_shapes(model: ModelLike) -> list[tuple[int, ...]]:
    """The shape of every parameter tensor of ``model``, as PyTorch would store them.

    Linear weights are (out, in). Their element count adds up to
    ``model.param_count()``. Needed where the *shape*, not just the count, matters
    (Adafactor's factored state).
    """
    m = _model(model)
    d, kv, f, V = m.hidden, m.kv_dim, m.ffn_hidden, m.vocab
    norm = [(d,), (d,)] if m.norm == "layernorm" else [(d,)]
    layer = list(norm)                                        # attention norm
    layer += [(d, d), (kv, d), (kv, d), (d, d)]               # q, k, v, o
    if m.bias:
        layer += [(d,), (kv,), (kv,), (d,)]
    layer += list(norm)                                       # MLP norm
    if m.ffn_kind == "gated":
        layer += [(f, d), (f, d), (d, f)]                     # gate, up, down
        if m.bias:
            layer += [(f,), (f,), (d,)]
    else:
        layer += [(f, d), (d, f)]                             # up, down
        if m.bias:
            layer += [(f,), (d,)]
    shapes = [(V, d)]                                         # token embedding
    if m.learned_positions:
        shapes.append((m.learned_positions, d))
    shapes += layer * m.n_layers
    shapes += norm                                            # final norm
    if not m.tied_embeddings:
        shapes.append((V, d))                                 # LM head
    return shapes


def param_count(model_or_params) -> int:
    """Parameters of a ModelSpec, a model name, a list of tensor shapes, or an integer."""
    return _param_count(model_or_params, "model_or_params")


def _param_count(value, name: str) -> int:
    if isinstance(value, (ModelSpec, str)):
        return _model(value, name).param_count()
    if isinstance(value, (list, tuple)):
        return sum(math.prod(_shape(s)) for s in value)
    return _size(name, value)


def _shape(s) -> tuple[int, ...]:
    if not isinstance(s, (list, tuple)):
        raise TypeError(f"a tensor shape must be a tuple of integers, got {s!r}")
    return tuple(_size("shape dimension", x) for x in s)


def weights_bytes(model_or_params, bytes_per_param: Number = 2) -> Number:
    """Bytes of the weights: parameters x ``bytes_per_param`` (2 for bf16/fp16)."""
    return _times(_param_count(model_or_params, "model_or_params"),
                  _per_element("bytes_per_param", bytes_per_param))


def gradient_bytes(model_or_params, bytes_per_grad: Number = 2) -> Number:
    """Bytes of the gradients: one per parameter, ``bytes_per_grad`` each (2 in 16-bit)."""
    return _times(_param_count(model_or_params, "model_or_params"),
                  _per_element("bytes_per_grad", bytes_per_grad))


# Per parameter, fp32 state (4 bytes an element):
#   adam / adamw   exp_avg (m) + exp_avg_sq (v)                            8 B
#   sgd            nothing (PyTorch SGD with momentum=0 keeps no buffer)   0 B
#   sgd_momentum   momentum_buffer                                         4 B
#   adafactor      row and column second-moment factors, no momentum       ~0 B (shape-dependent)
# plus, with mixed precision, the fp32 master copy of the weights          4 B
# PyTorch also keeps a scalar 'step' tensor per parameter *tensor* (not per element) for
# Adam/AdamW/Adafactor; a few hundred bytes for a whole model, left out here.
# Mixed-precision Adam: 4 + 4 + 4 = 12 B/param, the K = 12 of ZeRO (Section 3.1).
_STATE_ELEMENTS_PER_PARAM = {"adam": 2, "adamw": 2, "sgd": 0, "sgd_momentum": 1}
OPTIMIZERS = ("adamw", "adam", "sgd", "sgd_momentum", "adafactor")
_FP32 = 4


def _optimizer(name) -> str:
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    return key


def _adafactor_state_elements(shape: tuple[int, ...]) -> int:
    # torch.optim.Adafactor: a tensor of 2+ dims keeps row_var (shape with last dim -> 1)
    # and col_var (shape with second-to-last dim -> 1); a vector or scalar keeps a full
    # 'variance'. No first moment.
    if len(shape) >= 2:
        lead = math.prod(shape[:-2])
        return lead * shape[-2] + lead * shape[-1]
    return math.prod(shape)


def optimizer_bytes(model_or_params, optimizer: str = "adamw", master_weights: bool = True) -> Number:
    """Bytes of optimizer state (fp32) for ``model_or_params``.

    ``optimizer``: ``"adamw"``/``"adam"`` 8 B/param (exp_avg, exp_avg_sq), ``"sgd"`` 0,
    ``"sgd_momentum"`` 4 (momentum_buffer), ``"adafactor"`` the factored second moment
    (needs tensor shapes: a ModelSpec, a model name or a list of shapes, not a bare count).
    ``master_weights``: add the fp32 master copy of the weights kept in mixed-precision
    training, 4 B/param. AdamW with master weights is the 12 B/param of ZeRO's K = 12.
    The scalar ``step`` PyTorch keeps per parameter tensor is left out.
    """
    opt = _optimizer(optimizer)
    master = _flag("master_weights", master_weights)
    n = param_count(model_or_params)
    if opt == "adafactor":
        if isinstance(model_or_params, (ModelSpec, str)):
            shapes = tensor_shapes(model_or_params)
        elif isinstance(model_or_params, (list, tuple)):
            shapes = [_shape(s) for s in model_or_params]
        else:
            raise ValueError("adafactor's factored state depends on tensor shapes: pass a "
                             "ModelSpec, a model name or a list of shapes, not a bare "
                             "parameter count")
        state = _FP32 * sum(_adafactor_state_elements(s) for s in shapes)
    else:
        state = _FP32 * _STATE_ELEMENTS_PER_PARAM[opt] * n
    return state + (_FP32 * n if master else 0)


def optimizer_bytes_per_param(optimizer: str = "adamw", master_weights: bool = True,
                              model: ModelLike | None = None) -> Number:
    """Optimizer bytes per parameter (ZeRO's K): 12 for mixed-precision AdamW.

    Adafactor's depends on the shapes, so it needs ``model``.
    """
    opt = _optimizer(optimizer)
    master = _flag("master_weights", master_weights)
    if opt == "adafactor":
        if model is None:
            raise ValueError("adafactor's bytes per parameter depend on the tensor shapes: "
                             "pass model=")
        m = _model(model)
        return optimizer_bytes(m, opt, master) / m.param_count()
    return _FP32 * _STATE_ELEMENTS_PER_PARAM[opt] + (_FP32 if master else 0)


# ---------------------------------------------------------------------------------------
# ZeRO (Rajbhandari et al. 2020)
# ---------------------------------------------------------------------------------------
def zero_bytes_per_device(params, stage: int, dp: int, optimizer_bytes_per_param: Number = 12,
                          *, param_bytes: Number = 2, grad_bytes: Number = 2) -> ZeroMemory:
    """Model-state bytes on one of ``dp`` data-parallel ranks under ZeRO ``stage``.

    ZeRO, Section 5 and Figure 1, with Psi = ``params``, K = ``optimizer_bytes_per_param``
    (12 for mixed-precision Adam: fp32 master params, momentum, variance), Nd = ``dp``:

    ====== ===================================  ========================
    stage  what is sharded over the Nd ranks    bytes per rank
    ====== ===================================  ========================
    0      nothing (plain data parallelism)     (2 + 2 + K) Psi
    1      optimizer states (P_os)              2Psi + 2Psi + K Psi / Nd
    2      + gradients (P_os+g)                 2Psi + (2 + K) Psi / Nd
    3      + parameters (P_os+g+p)              (2 + 2 + K) Psi / Nd
    ====== ===================================  ========================

    A sharded tensor of Psi elements holds ceil(Psi / Nd) on each rank (frameworks pad
    the flat buffer to a multiple of Nd); when Nd divides Psi this is the paper's Psi/Nd.
    ``param_bytes``/``grad_bytes`` (2 in the paper) let a what-if change the precision.

    Returns a :class:`ZeroMemory` (``params``, ``grads``, ``optimizer``; ``.total``).
    """
    psi = _param_count(params, "params")
    stage = _zero_stage(stage)
    dp = _size("dp", dp)
    k = _per_element("optimizer_bytes_per_param", optimizer_bytes_per_param)
    pb = _per_element("param_bytes", param_bytes)
    gb = _per_element("grad_bytes", grad_bytes)
    shard = _ceil_div(psi, dp)
    return ZeroMemory(
        params=_times(shard if stage >= 3 else psi, pb),
        grads=_times(shard if stage >= 2 else psi, gb),
        optimizer=_times(shard if stage >= 1 else psi, k),
    )


def zero_comm_bytes_per_step(params, stage: int, dp: int, bytes_per_element: Number = 2,
                             exact: bool = False) -> CommVolume:
    """Bytes one data-parallel rank sends per step (ZeRO, Section 7).

    Stage 0 all-reduces the gradients, which a bandwidth-optimal implementation does as
    a reduce-scatter then an all-gather, Psi elements each: 2 Psi (Section 7.1). Stages 1
    and 2 reduce-scatter the gradients (Psi) and all-gather the updated parameters (Psi):
    2 Psi as well, "the same as baseline DP" (Section 7.2.1). Stage 3 also all-gathers the
    parameters before the forward and again before the backward: Psi + 2 Psi = 3 Psi, 1.5x
    the baseline (Section 7.2.2).

    The paper's figures are the large-Nd limit. With ``exact=True`` each collective is
    multiplied by (Nd - 1) / Nd, what a rank actually sends in a ring reduce-scatter or
    all-gather. With ``dp == 1`` nothing is sent in either mode.

    Returns a :class:`CommVolume` (``reduce_scatter``, ``all_gather``; ``.total``).
    """
    psi = _param_count(params, "params")
    stage = _zero_stage(stage)
    dp = _size("dp", dp)
    b = _per_element("bytes_per_element", bytes_per_element)
    exact = _flag("exact", exact)
    if dp == 1:
        return CommVolume(reduce_scatter=0, all_gather=0)
    rs_elems = psi
    ag_elems = 2 * psi if stage == 3 else psi
    if exact:
        factor = (dp - 1) / dp
        return CommVolume(reduce_scatter=rs_elems * b * factor, all_gather=ag_elems * b * factor)
    return CommVolume(reduce_scatter=_times(rs_elems, b), all_gather=_times(ag_elems, b))


# ---------------------------------------------------------------------------------------
# Activations (Korthikanti et al. 2022, Section 4)
# ---------------------------------------------------------------------------------------
# The tensors one GPT-style transformer layer saves for its backward pass. Notation of the
# paper: s sequence length, b micro-batch, h hidden, a attention heads, t tensor-parallel
# size. Activations are 16-bit (2 bytes an element), dropout masks 1 byte an element.
# The MLP is h -> 4h -> h with GeLU; there is dropout after attention probabilities, after
# the attention block and after the MLP; two layer norms (pre-norm).
#
# Each row: (name, coefficient, unit, split by tensor parallelism, dropped by selective
#            recompute). unit "sbh" means coefficient * s*b*h bytes; "as2b" means
#            coefficient * a*s*s*b bytes.
_ACTIVATION_TERMS = (
    # -- layer norm before attention: its input, 2 bytes x sbh ----------------------  2sbh
    ("ln1.input", 2, "sbh", False, False),
    # -- attention block: 11sbh + 5as^2b ------------------------------------------------
    # Q, K, V projections share one input (the layer-norm output), 2sbh.
    ("attn.qkv_input", 2, "sbh", False, False),
    # Q K^T needs both Q and K: 2sbh + 2sbh.
    ("attn.q_and_k", 4, "sbh", True, False),
    # softmax keeps its output, a score per head per query-key pair: 2 x a s^2 b.
    ("attn.softmax_output", 2, "as2b", True, True),
    # dropout on the attention probabilities keeps a 1-byte mask: a s^2 b.
    ("attn.softmax_dropout_mask", 1, "as2b", True, True),
    # (attention probabilities) x V keeps both operands: 2as^2b for the dropped-out
    # probabilities, 2sbh for V.
    ("attn.dropout_output", 2, "as2b", True, True),
    ("attn.v", 2, "sbh", True, False),
    # the output projection keeps its input, 2sbh.
    ("attn.out_proj_input", 2, "sbh", True, False),
    # dropout after the attention block keeps a mask, sbh.
    ("attn.dropout_mask", 1, "sbh", False, False),
    #   attention total: 2 + 4 + 2 + 2 + 1 = 11 sbh, and 2 + 1 + 2 = 5 as^2b.
    # -- layer norm before the MLP ------------------------------------------------------  2sbh
    ("ln2.input", 2, "sbh", False, False),
    # -- MLP block: 19sbh ---------------------------------------------------------------
    # first linear keeps its input 2sbh; GeLU keeps its input, 4h wide: 8sbh; second
    # linear keeps its input, also 4h wide: 8sbh; dropout mask sbh. 2 + 8 + 8 + 1 = 19.
    ("mlp.fc1_input", 2, "sbh", False, False),
    ("mlp.gelu_input", 8, "sbh", True, False),
    ("mlp.fc2_input", 8, "sbh", True, False),
    ("mlp.dropout_mask", 1, "sbh", False, False),
    # -- layer norms: 2sbh + 2sbh = 4sbh ------------------------------------------------
)
# Per layer: 11 + 19 + 4 = 34 sbh, plus 5 as^2b  ->  sbh (34 + 5as/h)   (Section 4.1).
#
# Tensor parallelism (Section 4.2.1) splits the attention heads and the 4h MLP width over
# t ranks. What is split (True in the table): Q, K (4), V (2), output-projection input (2),
# GeLU input (8), fc2 input (8) = 24 sbh, and all 5 as^2b. What stays whole on every rank:
# both layer-norm inputs (4), the QKV input (2), the fc1 input (2) and the two dropout
# masks after attention and MLP (1 + 1) = 10 sbh. Hence sbh (10 + 24/t + 5as/(ht)).
#
# Sequence parallelism (Section 4.2.2) splits those 10 sbh along the sequence over the
# same t ranks (each rank keeps its sequence shard of the layer-norm and linear inputs and
# all-gathers again in the backward), so every term is divided by t: sbh/t (34 + 5as/h).
#
# Selective recomputation (Section 5) recomputes softmax, its dropout and the dropout
# output from the stored Q and K: the whole 5 as^2b term goes, leaving sbh (10 + 24/t), or
# 34 sbh/t with sequence parallelism.
#
# Full recomputation keeps only each layer's input: 2sbh, the one full-recompute entry of
# Table 2. The /t with sequence parallelism is not in the table: it is what Megatron-LM's
# implementation stores, because with sequence parallelism the layer input it checkpoints
# is already split along the sequence over the t ranks (its --distribute-saved-activations
# option, which splits the saved input without sequence parallelism, is then switched
# off), so each rank keeps 2sbh/t.


def _check_layer_dims(seq_len, batch, hidden, heads, tp):
    s = _size("seq_len", seq_len)
    b = _size("batch", batch)
    h = _size("hidden", hidden)
    a = _size("heads", heads)
    t = _size("tp", tp)
    if h % a:
        raise ValueError(f"hidden={h} is not divisible by heads={a}")
    _tp_divides_heads(t, a)
    return s, b, h, a, t


def activation_breakdown_per_layer(seq_len: int, batch: int, hidden: int, heads: int, tp: int = 1,
                                   sequence_parallel: bool = False,
                                   recompute: str = "none") -> dict[str, int]:
    """Bytes of each tensor one transformer layer saves for backward, on one device.

    Same model and arguments as :func:`activation_bytes_per_layer`; the keys name the
    saved tensors (``"attn.softmax_output"``, ``"mlp.gelu_input"``, ...; with full
    recomputation the single ``"layer_input"``), in forward order. Its values add up to
    :func:`activation_bytes_per_layer`.
    """
    s, b, h, a, t = _check_layer_dims(seq_len, batch, hidden, heads, tp)
    sp = _flag("sequence_parallel", sequence_parallel)
    mode = _recompute(recompute)
    if mode == "full":
        # h is a multiple of a, a of t: the division is exact.
        return {"layer_input": 2 * s * b * h // (t if sp else 1)}
    out = {}
    for name, coef, unit, tp_split, selective in _ACTIVATION_TERMS:
        if mode == "selective" and selective:
            continue
        full = coef * s * b * h if unit == "sbh" else coef * a * s * s * b
        out[name] = full // t if (tp_split or sp) else full   # exact: t | a | h
    return out


def activation_bytes_per_layer(seq_len: int, batch: int, hidden: int, heads: int, tp: int = 1,
                               sequence_parallel: bool = False, recompute: str = "none") -> int:
    """Activation bytes one transformer layer saves for backward, per device.

    Korthikanti et al. 2022, Section 4 and Table 2, with s = ``seq_len``, b = ``batch``
    (the micro-batch), h = ``hidden``, a = ``heads``, t = ``tp``; 16-bit activations and
    1-byte dropout masks, a GPT-style layer (LayerNorm, 4h GeLU MLP, dropout):

    ===============================  =============  ===================  =========
    parallelism                      ``"none"``     ``"selective"``      ``"full"``
    ===============================  =============  ===================  =========
    none (t = 1)                     sbh(34+5as/h)  34sbh                2sbh
    tensor parallel                  sbh(10+24/t    sbh(10 + 24/t)       2sbh
                                     + 5as/(ht))
    tensor + sequence parallel       sbh/t(34       34sbh/t              2sbh/t
                                     + 5as/h)
    ===============================  =============  ===================  =========

    Every entry is the paper's Table 2 except full recompute with sequence parallelism:
    the table lists full recomputation only as 2sbh; 2sbh/t is Megatron-LM's
    implementation, which checkpoints the layer input in its sequence-parallel layout,
    split along the sequence over the t ranks.

    ``recompute``: ``"none"``, ``"selective"`` (recompute the attention core, drop the
    5as^2b term) or ``"full"`` (keep only the layer input). Multi-query or grouped-query
    attention (smaller K and V), SwiGLU MLPs, other MLP widths and models without dropout
    change the constants; the formula is then an approximation. The transient working
    set of the one layer being recomputed during a full-recompute backward is not counted.
    Returns an int (bytes).
    """
    return sum(activation_breakdown_per_layer(seq_len, batch, hidden, heads, tp,
                                              sequence_parallel, recompute).values())


def logits_bytes(seq_len: int, batch: int, vocab: int, tp: int = 1, bytes_per_element: Number = 4) -> Number:
    """Bytes of the logits kept for the cross-entropy loss, per device.

    s x b x v elements, fp32 (4 bytes) by default, split over ``tp`` ranks along the
    vocabulary (vocab-parallel output layer): Korthikanti et al. 2022, Section 4.3, 4sbv/t.
    With a vocabulary that ``tp`` does not divide, a rank holds ceil(v / tp) columns.
    """
    s = _size("seq_len", seq_len)
    b = _size("batch", batch)
    v = _size("vocab", vocab)
    t = _size("tp", tp)
    return _times(s * b * _ceil_div(v, t), _per_element("bytes_per_element", bytes_per_element))


# ---------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------
def kv_cache_bytes_per_token(model: ModelLike, bytes_per_element: Number = 2) -> Number:
    """KV-cache bytes per token: 2 (K and V) x layers x KV heads x head dim x bytes.

    Grouped-query attention shrinks it through ``n_kv_heads``: Llama-2-7B (32 layers, 32
    KV heads of 128) needs 524,288 B = 0.5 MiB a token in 16-bit, Llama-2-70B (80 layers,
    8 KV heads of 128) 327,680 B = 320 KiB.
    """
    m = _model(model)
    b = _per_element("bytes_per_element", bytes_per_element)
    return _times(2 * m.n_layers * m.n_kv_heads * m.head_dim, b)


def kv_cache_bytes(model: ModelLike, seq_len: int, batch: int, bytes_per_element: Number = 2) -> Number:
    """KV-cache bytes for ``batch`` sequences of ``seq_len`` tokens each."""
    s = _size("seq_len", seq_len)
    b = _size("batch", batch)
    return kv_cache_bytes_per_token(model, bytes_per_element) * s * b


# ---------------------------------------------------------------------------------------
# Totals
# ---------------------------------------------------------------------------------------
def training_bytes_per_device(model: ModelLike, seq_len: int, micro_batch: int, tp: int = 1,
                              pp: int = 1, dp: int = 1, zero_stage: int = 0,
                              sequence_parallel: bool = False, recompute: str = "none", *,
                              bytes_per_param: Number = 2, bytes_per_grad: Number = 2,
                              optimizer: str = "adamw", master_weights: bool = True,
                              in_flight_microbatches: int | None = None,
                              include_logits: bool = False) -> TrainingMemory:
    """Bytes on the most loaded device of a tp x pp x dp training job.

    Model states: the parameter count is split evenly over the tp x pp model-parallel
    ranks (a simplification: real frameworks replicate norms across tp and put the
    embedding and LM head on the first and last stages), then ZeRO ``zero_stage`` shards
    that share over the ``dp`` ranks (:func:`zero_bytes_per_device`), with
    ``bytes_per_param``/``bytes_per_grad`` for weights/gradients and K from
    :func:`optimizer_bytes_per_param` (12 for mixed-precision AdamW).

    Activations: :func:`activation_bytes_per_layer` for the micro-batch, times the
    ceil(n_layers / pp) layers of one pipeline stage, times the micro-batches in flight.
    With the 1F1B schedule the first stage holds the most: ``pp`` micro-batches (fewer if
    the step has fewer micro-batches), which makes its total L/p x p = L layers' worth
    (Korthikanti et al. 2022, Section 4.2.3). ``in_flight_microbatches`` overrides it
    (e.g. 1 for a single micro-batch, or GPipe's all-micro-batches). Embedding dropout and
    the output-layer inputs are left out; ``include_logits=True`` adds the fp32 logits
    (:func:`logits_bytes`), which really sit on the last stage, so the sum is exact for
    ``pp == 1`` and an upper bound otherwise. Framework workspace, the CUDA context,
    allocator fragmentation and temporary buffers (e.g. full-size gradient buckets) are
    not modelled.

    Returns a :class:`TrainingMemory` (``params``, ``grads``, ``optimizer``,
    ``activations``, ``logits``; ``.total``).
    """
    m = _model(model)
    s = _size("seq_len", seq_len)
    mb = _size("micro_batch", micro_batch)
    tp = _size("tp", tp)
    pp = _size("pp", pp)
    dp = _size("dp", dp)
    _tp_divides_heads(tp, m.n_heads)
    if pp > m.n_layers:
        raise ValueError(f"pp={pp} is larger than the {m.n_layers} layers of {m.name}: "
                         f"every pipeline stage needs at least one layer")
    in_flight = pp if in_flight_microbatches is None else _size("in_flight_microbatches",
                                                                in_flight_microbatches)
    k = optimizer_bytes_per_param(optimizer, master_weights, model=m)
    states = zero_bytes_per_device(_ceil_div(m.param_count(), tp * pp), zero_stage, dp, k,
                                   param_bytes=bytes_per_param, grad_bytes=bytes_per_grad)
    per_layer = activation_bytes_per_layer(s, mb, m.hidden, m.n_heads, tp,
                                           sequence_parallel, recompute)
    activations = per_layer * _ceil_div(m.n_layers, pp) * in_flight
    logits = logits_bytes(s, mb, m.vocab, tp) if _flag("include_logits", include_logits) else 0
    return TrainingMemory(params=states.params, grads=states.grads, optimizer=states.optimizer,
                          activations=activations, logits=logits)


def inference_bytes(model: ModelLike, seq_len: int, batch: int, bytes_per_param: Number = 2,
                    kv_bytes_per_element: Number = 2) -> InferenceMemory:
    """Bytes to serve ``batch`` sequences of ``seq_len`` tokens: weights + KV cache.

    Returns an :class:`InferenceMemory` (``weights``, ``kv_cache``; ``.total``). The
    activations of a forward pass are transient and small next to these; not counted.
    """
    m = _model(model)
    return InferenceMemory(weights=weights_bytes(m, bytes_per_param),
                           kv_cache=kv_cache_bytes(m, seq_len, batch, kv_bytes_per_element))


def min_gpus(model: ModelLike, gpu, workload: str = "inference", *, seq_len: int | None = None,
             batch: int = 1, usable_fraction: float = 1.0, recompute: str = "full",
             **kwargs) -> int:
    """Fewest GPUs of type ``gpu`` (a GPUSpec or registry name) that hold the state.

    ``workload="inference"``: weights + KV cache for ``batch`` sequences of ``seq_len``
    tokens (default: the model's context), split evenly over the GPUs (as tensor
    parallelism roughly does); extra keyword arguments go to :func:`inference_bytes`.

    ``workload="training"``: ZeRO-3 data parallelism over the GPUs, each running a
    micro-batch of ``batch`` sequences of ``seq_len`` tokens with ``recompute`` (default
    full recomputation); extra keyword arguments go to :func:`training_bytes_per_device`.
    Activations do not shrink with more GPUs, so when they alone do not fit, no count
    does and a ValueError says so.

    ``usable_fraction`` of the marketed ``memory_bytes`` is counted as available (the
    driver, CUDA context and allocator take some). Returns an int.
    """
    spec = resolve_gpu(gpu)
    m = _model(model)
    if isinstance(usable_fraction, bool) or not isinstance(usable_fraction, numbers.Real) \
            or not 0 < usable_fraction <= 1:
        raise ValueError(f"usable_fraction must be in (0, 1], got {usable_fraction!r}")
    capacity = spec.memory_bytes * usable_fraction
    s = m.context if seq_len is None else seq_len
    if workload == "inference":
        need = inference_bytes(m, s, batch, **kwargs).total
        return max(1, math.ceil(need / capacity))
    if workload == "training":
        def per_device(n):
            return training_bytes_per_device(m, s, batch, dp=n, zero_stage=3,
                                             recompute=recompute, **kwargs).total
        fixed = training_bytes_per_device(m, s, batch, dp=1, zero_stage=3, recompute=recompute,
                                          **kwargs)
        room = capacity - fixed.activations - fixed.logits
        if room <= 0:
            raise ValueError(f"activations alone ({(fixed.activations + fixed.logits) / 1e9:.1f}"
                             f" GB) exceed the {capacity / 1e9:.1f} GB usable on one "
                             f"{spec.name}; shrink batch or seq_len, or recompute more")
        n = max(1, math.ceil((fixed.params + fixed.grads + fixed.optimizer) / room))
        while per_device(n) > capacity:   # ceil-sharding can leave a few bytes over
            n += 1
        return n
    raise ValueError(f"unknown workload {workload!r}; choose 'inference' or 'training'")


# ---------------------------------------------------------------------------------------
# Published numbers that the calculator reproduces (chapter 11 and its lab print them next
# to what the calculator gives). Stored as the papers print them, with their inputs.
# ---------------------------------------------------------------------------------------
def _frozen(**kw):
    from types import MappingProxyType
    return MappingProxyType(kw)


PUBLISHED = _frozen(
    # Model-state bytes per device for Psi = 7.5B, Nd = 64, K = 12: baseline data
    # parallelism, then P_os, P_os+g, P_os+g+p (stages 0..3), in GB.
    zero_figure1=_frozen(params=7_500_000_000, dp=64, k=12, gb=(120, 31.4, 16.6, 1.9),
                         source="Rajbhandari et al. 2020 (ZeRO), Figure 1"),
    # GPT-2 with 1.5B parameters trained with mixed-precision Adam needs at least 24 GB.
    zero_gpt2=_frozen(params=1_500_000_000, gb=24,
                      source="Rajbhandari et al. 2020 (ZeRO), Section 3.1"),
    # Sequence parallelism with selective recomputation "reduces activation memory by 5x".
    korthikanti_reduction=_frozen(factor=5,
                                  source="Korthikanti et al. 2022, arXiv:2205.05198, abstract"),
    # OPT-13B: "the KV cache of a single token demands 800 KB" (2 x 5120 x 40 x 2 bytes)
    # and a 2048-token request "can be as much as 1.6 GB". Both in binary units:
    # 800 KiB = 819,200 B a token, and 2048 of them 1.5625 GiB (1.68e9 B: 1.7 GB in
    # decimal units, so the paper's 1.6 is the binary figure rounded).
    vllm_opt13b_kv=_frozen(model="opt-13b", kb_per_token=800, tokens=2048, gb_per_request=1.6,
                           source="Kwon et al. 2023 (vLLM, SOSP 2023), Section 3"),
)
__all__ += ["PUBLISHED"]
