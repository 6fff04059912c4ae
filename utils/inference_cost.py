"""Prefill and decode on the roofline: FLOPs, bytes, time per token, cost per token.

Chapter 16 explains the counting; lab 16's checkers hold the learner's counts to these
functions. One *step* is one forward pass of the model over ``batch`` sequences, each of
which already has ``cached`` tokens in its KV cache and brings ``new`` tokens:

* **prefill** of a prompt of T tokens: ``new = T``, ``cached = 0``;
* **decode** at context T (the new token attends to T keys, itself included):
  ``new = 1``, ``cached = T - 1``.

Counting convention (the same as :meth:`utils.models.ModelSpec.flops_per_token` and
:func:`utils.roofline.attention_decode`), with N = ``model.matmul_params()`` (every
projection of every layer and the LM head), L layers, H query heads of width d_h, and
kv = ``model.kv_dim``, s bytes per element:

* **FLOPs** = batch x the sum, over the new tokens, of ``flops_per_token(keys it attends
  to)``. The i-th new token (i = 1 .. new) attends to ``cached + i`` keys, so

      FLOPs = batch x [ 2 N new + 4 L H d_h (new x cached + new (new + 1) / 2) ].

  Only the unmasked half of causal attention is counted (what a fused kernel computes).
* **Bytes** are compulsory traffic: the weights, read once per step whatever the batch;
  and per sequence and layer what a fused (flash-style) attention kernel must read and
  write: Q of the new tokens, K and V of all ``cached + new`` positions, and O:

      bytes = s x [ N + batch x L x ( 2 (cached + new) kv + 2 new H d_h ) ].

  Decode bytes are therefore ``N s + attention_decode(model, T, batch, s).bytes``.
  Embedding rows, norm weights, the activations between matmuls and the logits are left
  out: they are small next to the weights and the KV cache for every registry model.

Times are roofline lower bounds, ``max(FLOPs / P, bytes / B)``; with ``n_gpus`` the step
is assumed to split perfectly over n GPUs (ideal tensor parallelism, communication
ignored), so P and B are multiplied by n. Money is in dollars; prices are always the
caller's assumption, never stored here.
"""
from __future__ import annotations

import math
import numbers

from . import hardware as _hardware
from . import memory as _memory
from . import models as _models
from .models import ModelSpec
from .roofline import KernelCost
from .validate import check_number, resolve_gpu, resolve_model

__all__ = ["BYTES_PER_ELEMENT", "as_spec", "step_cost", "prefill_cost", "decode_cost",
           "decode_intensity_limit", "decode_knee_batch", "step_time", "max_decode_batch",
           "usd_per_million_tokens"]

#: Bytes per element of the precisions the chapter uses for weights and KV cache.
BYTES_PER_ELEMENT = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}


def _count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def _bytes_per_element(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"bytes_per_element must be a positive number (2 for bf16, 4 for "
                         f"fp32), got {value!r}")
    return value


def as_spec(model) -> ModelSpec:
    """A :class:`~utils.models.ModelSpec` for ``model``.

    ``model`` may be a ModelSpec, a registry name (``"llama2-7b"``), a
    :class:`utils.tiny.TinyConfig`, or a :class:`utils.tiny.TinyTransformer` (anything
    with such a ``.config``). A tiny model maps to a Llama-style spec: gated (SwiGLU) MLP,
    RMSNorm, no biases, untied LM head, so its ``param_count()`` equals the PyTorch
    module's ``num_params()``.
    """
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        return resolve_model(model)
    cfg = getattr(model, "config", model)
    needed = ("vocab", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "max_seq_len")
    if all(hasattr(cfg, f) for f in needed):
        return ModelSpec(name=getattr(model, "name", "tiny"), n_layers=cfg.n_layers,
                         hidden=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                         ffn_hidden=cfg.d_ff, ffn_kind="gated", vocab=cfg.vocab,
                         context=cfg.max_seq_len, tied_embeddings=False)
    raise TypeError(f"model must be a ModelSpec, a registry name, a TinyConfig or a "
                    f"TinyTransformer, got {type(model).__name__}")


def step_cost(model, batch: int, new: int, cached: int = 0,
              bytes_per_element: float = 2) -> KernelCost:
    """FLOPs and compulsory bytes of one forward step (see the module docstring)."""
    m = as_spec(model)
    b = _count("batch", batch)
    t = _count("new", new)
    c = _count("cached", cached, minimum=0)
    s = _bytes_per_element(bytes_per_element)
    n = m.matmul_params()
    L, H, dh, kv = m.n_layers, m.n_heads, m.head_dim, m.kv_dim
    attended = t * c + t * (t + 1) // 2              # sum over new tokens of keys attended
    flops = b * (2 * n * t + 4 * L * H * dh * attended)
    elements = n + b * L * (2 * (c + t) * kv + 2 * t * H * dh)
    return KernelCost(flops=flops, bytes=elements * s)


def prefill_cost(model, batch: int, prompt_len: int, bytes_per_element: float = 2) -> KernelCost:
    """One prefill step: ``batch`` prompts of ``prompt_len`` tokens into empty caches."""
    _count("prompt_len", prompt_len)
    return step_cost(model, batch, prompt_len, 0, bytes_per_element)


def decode_cost(model, batch: int, context: int, bytes_per_element: float = 2) -> KernelCost:
    """One decode step: one new token per sequence, each attending to ``context`` keys.

    ``context`` counts the new token itself, so the cache held ``context - 1`` tokens
    before the step. FLOPs = batch x ``model.flops_per_token(context)``.
    """
    ctx = _count("context", context)
    return step_cost(model, batch, 1, ctx - 1, bytes_per_element)


def decode_intensity_limit(model, context: int, bytes_per_element: float = 2) -> float:
    """The intensity decode approaches as the batch grows without bound (FLOP/byte).

    Weights are shared by the batch but every sequence brings its own KV cache, so
    I(batch) -> (FLOPs per sequence) / (KV and attention bytes per sequence). When this
    is below a GPU's ridge point, no batch makes decode compute-bound.
    """
    one = decode_cost(model, 1, context, bytes_per_element)
    weights = as_spec(model).matmul_params() * _bytes_per_element(bytes_per_element)
    return one.flops / (one.bytes - weights)


def decode_knee_batch(model, peak_flops: float, bandwidth: float, context: int,
                      bytes_per_element: float = 2) -> int | None:
    """Smallest batch at which a decode step's intensity reaches the ridge ``P / B``.

    Returns None when no batch does (:func:`decode_intensity_limit` is below the ridge).
    """
    check_number("peak_flops", peak_flops, positive=True)
    check_number("bandwidth", bandwidth, positive=True)
    ridge = peak_flops / bandwidth
    one = decode_cost(model, 1, context, bytes_per_element)
    weights = as_spec(model).matmul_params() * _bytes_per_element(bytes_per_element)
    f, a = one.flops, one.bytes - weights           # per-sequence FLOPs and bytes
    if f <= ridge * a:
        return None
    # b f / (W + b a) >= r  <=>  b >= r W / (f - r a); settle rounding on the exact test.
    b = max(1, math.ceil(ridge * weights / (f - ridge * a)))

    def reaches(k):
        return decode_cost(model, k, context, bytes_per_element).intensity >= ridge

    while b > 1 and reaches(b - 1):
        b -= 1
    while not reaches(b):
        b += 1
    return b


def step_time(cost: KernelCost, gpu, dtype: str = "bf16", n_gpus: int = 1) -> float:
    """Roofline lower bound (seconds) of ``cost`` on ``n_gpus`` GPUs of type ``gpu``.

    ``gpu`` is a :class:`utils.hardware.GPUSpec` or a registry name; ``dtype`` picks the
    dense peak. The step is assumed to split perfectly over the GPUs.
    """
    if not callable(getattr(cost, "time_on", None)):
        raise TypeError(f"cost must be a KernelCost, got {type(cost).__name__}")
    spec = resolve_gpu(gpu)
    n = _count("n_gpus", n_gpus)
    return cost.time_on(n * spec.flops(dtype), n * spec.memory_bandwidth)


def max_decode_batch(model, gpu, context: int, n_gpus: int = 1, bytes_per_element: float = 2,
                     usable_fraction: float = 0.9) -> int:
    """Most sequences of ``context`` tokens whose KV cache fits beside the weights.

    Capacity is ``usable_fraction`` of the GPUs' marketed memory; weights and KV cache
    both use ``bytes_per_element``. Returns 0 when the weights alone do not fit.
    """
    spec = resolve_gpu(gpu)
    m = as_spec(model)
    n = _count("n_gpus", n_gpus)
    ctx = _count("context", context)
    check_number("usable_fraction", usable_fraction)
    if not 0 < usable_fraction <= 1:
        raise ValueError(f"usable_fraction must be in (0, 1], got {usable_fraction!r}")
    room = n * spec.memory_bytes * usable_fraction - _memory.weights_bytes(m, bytes_per_element)
    per_sequence = _memory.kv_cache_bytes(m, ctx, 1, bytes_per_element)
    return max(0, int(room // per_sequence))


def usd_per_million_tokens(tokens_per_second: float, usd_per_gpu_hour: float,
                           n_gpus: int = 1) -> float:
    """Dollars per million tokens for ``n_gpus`` GPUs rented at ``usd_per_gpu_hour`` each."""
    check_number("tokens_per_second", tokens_per_second, positive=True)
    check_number("usd_per_gpu_hour", usd_per_gpu_hour, nonnegative=True)
    n = _count("n_gpus", n_gpus)
    return n * usd_per_gpu_hour / 3600 / tokens_per_second * 1e6
