"""Quantization: number formats, scales, and the reference implementations of chapter 20.

What is here, in the order the chapter uses it:

* :func:`format_info` — the numeric formats (INT8, INT4, FP8 E4M3 and E5M2, FP4 E2M1,
  NF4): bits, largest finite value, smallest normal and subnormal, each with its source.
* :func:`bits_per_weight` — storage cost of a block format with its scales (NF4 with
  QLoRA's double quantization, MX formats with their shared E8M0 exponent).
* :func:`int8_quantize` / :func:`int8_dequantize` — absmax (symmetric) and zero-point
  (affine) INT8 per tensor or per channel, equal to ``torch.quantize_per_tensor`` /
  ``torch.quantize_per_channel``; :func:`int_quantize_groups` for INT4/INT3 groups.
* :func:`fp_grid`, :func:`fp8_round` — every value of a small float format decoded from
  its bits, and float32 → FP8 rounding by hand (round to nearest even, subnormals,
  saturation), bit-exact against ``tensor.to(torch.float8_e4m3fn / float8_e5m2)``.
* :func:`nf4_codebook`, :func:`nf4_quantize`, :func:`nf4_dequantize`, :func:`nf4_pack` —
  QLoRA's NormalFloat-4, bit-exact against ``bitsandbytes.functional.quantize_4bit``.
* :func:`llm_int8_matmul` — LLM.int8()'s mixed-precision decomposition as bitsandbytes
  computes it.
* :func:`rtn_quantize`, :func:`gptq_quantize`, :func:`quantize_model_weights`,
  :func:`perplexity` — weight-only quantization of the tiny model, round-to-nearest and
  GPTQ, with held-out perplexity.
* :func:`dynamic_int8_benchmark` — ``torch.ao.quantization.quantize_dynamic`` int8 linears
  against fp32 on this CPU; :func:`fp8_matmul_cuda` — ``torch._scaled_mm`` on an FP8 GPU.
* :data:`GPTQ_LLAMA_WIKI2` — a published table quoted beside the tiny model's own numbers.

Quantities are SI (bits, bytes, seconds). Every function validates its arguments and
raises ``ValueError``/``TypeError`` that names the argument.
"""
from __future__ import annotations

import io
import math
import numbers
import time
import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

import torch

from . import validate as _v

__all__ = [
    "FormatInfo", "FORMATS", "format_info", "bits_per_weight", "GPTQ_LLAMA_WIKI2",
    "NF4_QLORA_OFFSET", "LLM_INT8_THRESHOLD",
    "int8_quantize", "int8_dequantize", "int_quantize_groups",
    "fp_grid", "fp8_round", "fp8_bits",
    "bitsandbytes_functional", "nf4_codebook", "nf4_quantize", "nf4_dequantize", "nf4_pack",
    "llm_int8_matmul", "smoothquant_scales", "fake_quant_int8", "awq_search",
    "rtn_quantize", "gptq_quantize", "quantization_error",
    "quantize_model_weights", "perplexity", "dynamic_int8_benchmark", "dynamic_int8_warnings", "fp8_matmul_cuda",
]


# --------------------------------------------------------------------------- validation
# Thin adapters over the shared validators of ``utils.validate``.

def _check_tensor(name: str, x, dtypes=None, ndim=None, finite: bool = True) -> torch.Tensor:
    _v.check_tensor(name, x, ndim=ndim, dtype=tuple(dtypes) if dtypes else None)
    if finite and x.is_floating_point() and x.numel():
        _v.check_finite_tensor(name, x)
    return x


def _check_int(name: str, v, lo: int | None = None, hi: int | None = None) -> int:
    return _v.check_int(name, v, low=lo, high=hi)


def _check_float(name: str, v, positive: bool = False, nonneg: bool = False) -> float:
    return float(_v.check_number(name, v, positive=positive, nonnegative=nonneg))


# --------------------------------------------------------------------------- formats

_OCP_FP8 = ("Micikevicius et al., 'FP8 Formats for Deep Learning' (2022), Table 1; "
            "OCP 8-bit Floating Point Specification (OFP8), Rev. 1.0 (2023)")
_OCP_MX = ("OCP Microscaling Formats (MX) Specification v1.0 (September 2023): MXFP4 = E2M1 "
           "elements, 32 per block, one E8M0 shared scale")
_QLORA = ("Dettmers et al., 'QLoRA: Efficient Finetuning of Quantized LLMs' (2023), Section 3 "
          "(4-bit NormalFloat, double quantization: 0.127 bits per parameter for the scales)")


@dataclass(frozen=True)
class FormatInfo:
    """One numeric format. Floats: ``value = (-1)^s · 2^(e-bias) · 1.m`` (normal) or
    ``2^(1-bias) · 0.m`` (subnormal). ``None`` where a field does not apply."""

    name: str
    kind: str                      # "int", "float" or "codebook"
    bits: int
    max_finite: float              # largest finite magnitude (codebook: of the normalized code)
    min_value: float               # most negative representable value
    min_normal: float | None       # smallest positive normal (floats)
    min_subnormal: float | None    # smallest positive subnormal (floats)
    exponent_bits: int | None
    mantissa_bits: int | None
    bias: int | None
    has_inf: bool
    has_nan: bool
    source: str
    notes: str = ""


FORMATS: Mapping[str, FormatInfo] = MappingProxyType({
    "int8": FormatInfo("int8", "int", 8, 127.0, -128.0, None, None, None, None, None, False, False,
                       "two's complement 8-bit integer", "absmax schemes use [-127, 127]"),
    "int4": FormatInfo("int4", "int", 4, 7.0, -8.0, None, None, None, None, None, False, False,
                       "two's complement 4-bit integer",
                       "GPTQ/AWQ store an unsigned 0..15 code with a zero point"),
    "e4m3": FormatInfo("e4m3", "float", 8, 448.0, -448.0, 2.0 ** -6, 2.0 ** -9, 4, 3, 7, False, True,
                       _OCP_FP8, "no infinities; S.1111.111 is NaN, so 1111.110 = 448 is the "
                       "largest; torch.float8_e4m3fn"),
    "e5m2": FormatInfo("e5m2", "float", 8, 57344.0, -57344.0, 2.0 ** -14, 2.0 ** -16, 5, 2, 15, True,
                       True, _OCP_FP8, "IEEE-like: exponent 11111 is inf/NaN; torch.float8_e5m2"),
    "e2m1": FormatInfo("e2m1", "float", 4, 6.0, -6.0, 1.0, 0.5, 2, 1, 1, False, False, _OCP_MX,
                       "values ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}; the element type of MXFP4 and NVFP4"),
    "nf4": FormatInfo("nf4", "codebook", 4, 1.0, -1.0, None, None, None, None, None, False, False,
                      _QLORA, "16 normal quantiles scaled to [-1, 1], an exact 0; times a "
                      "per-block absmax"),
})


def format_info(name: str) -> FormatInfo:
    """The :class:`FormatInfo` of ``"int8"``, ``"int4"``, ``"e4m3"``, ``"e5m2"``, ``"e2m1"`` or ``"nf4"``."""
    return _info(name, "name")


def _info(name, arg: str) -> FormatInfo:
    """``format_info`` for an argument called ``arg`` (errors name it)."""
    if not isinstance(name, str):
        raise TypeError(f"{arg} must be a format name (str), got {type(name).__name__}")
    try:
        return FORMATS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown format {arg}={name!r}; known: {', '.join(FORMATS)}") from None


def bits_per_weight(fmt: str, block_size: int | None = None, scale_bits: int = 32,
                    double_quant: bool = False, dq_block_size: int = 256,
                    dq_scale_bits: int = 8, dq_outer_bits: int = 32) -> float:
    """Storage bits per weight of ``fmt`` with one scale of ``scale_bits`` per ``block_size`` weights.

    ``block_size=None``: a per-tensor scale, whose cost per weight is negligible (0 here).
    ``double_quant`` (QLoRA): the per-block scales are themselves quantized to
    ``dq_scale_bits`` with one ``dq_outer_bits`` scale per ``dq_block_size`` of them.
    NF4, block 64, fp32 absmax: 4.5 bits; with double quantization 4 + 8/64 + 32/(64·256)
    = 4.127 (QLoRA, Section 3). MXFP4 = ``bits_per_weight("e2m1", 32, scale_bits=8)`` = 4.25.
    """
    bits = _info(fmt, "fmt").bits
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if block_size is None:
        if double_quant:
            raise ValueError("double_quant needs a block_size (it quantizes the per-block scales)")
        return float(bits)
    block_size = _check_int("block_size", block_size, lo=1)
    scale_bits = _check_int("scale_bits", scale_bits, lo=1)
    if not double_quant:
        return bits + scale_bits / block_size
    dq_block_size = _check_int("dq_block_size", dq_block_size, lo=1)
    dq_scale_bits = _check_int("dq_scale_bits", dq_scale_bits, lo=1)
    dq_outer_bits = _check_int("dq_outer_bits", dq_outer_bits, lo=1)
    return bits + dq_scale_bits / block_size + dq_outer_bits / (block_size * dq_block_size)


#: Published perplexities quoted beside the tiny model's (Wiki2 = WikiText-2 test set).
#: Source: IST-DASLab/gptq README (commit 2d65066, July 2023), "summary of LLaMa results",
#: run with --act-order --true-sequential; per-channel asymmetric quantization, no groups
#: except the last column (groups of 128). Column: model -> {setting: perplexity}.
GPTQ_LLAMA_WIKI2: Mapping[str, Mapping[str, float]] = MappingProxyType({
    model: MappingProxyType(dict(zip(("fp16", "rtn4", "gptq4", "rtn3", "gptq3", "gptq3_g128"), row)))
    for model, row in (
        ("LLaMA-7B", (5.68, 6.29, 6.09, 25.54, 8.07, 6.61)),
        ("LLaMA-13B", (5.09, 5.53, 5.36, 11.40, 6.63, 5.62)),
        ("LLaMA-30B", (4.10, 4.54, 4.45, 14.89, 5.69, 4.80)),
        ("LLaMA-65B", (3.53, 3.92, 3.84, 10.59, 5.04, 4.17)),
    )
})
GPTQ_LLAMA_WIKI2_SOURCE = ("GPTQ reference implementation README, github.com/IST-DASLab/gptq "
                           "(commit 2d65066, 2023-07-11), table 'summary of LLaMa results' "
                           "(Frantar et al., GPTQ, ICLR 2023)")

#: QLoRA's NF4 quantile offset: the outermost quantile is at (1 + 0.9677083)/2 … see
#: bitsandbytes.functional.create_normal_map, which builds the table QLoRA uses.
NF4_QLORA_OFFSET = 0.9677083
#: LLM.int8()'s outlier threshold: features with |x| >= 6 stay in 16 bit
#: (Dettmers et al., 'LLM.int8()', NeurIPS 2022, Section 3.2: "α = 6.0").
LLM_INT8_THRESHOLD = 6.0


# --------------------------------------------------------------------------- INT8

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def int8_quantize(x: torch.Tensor, dim: int | None = None, symmetric: bool = True):
    """INT8 quantization per tensor (``dim=None``) or per channel along ``dim``.

    Returns ``(q, scale, zero_point)``: ``q`` int8 of ``x``'s shape, ``scale`` float32 and
    ``zero_point`` int64, 0-d (per tensor) or of length ``x.shape[dim]``.

    * symmetric (absmax, as LLM.int8()): ``scale = absmax / 127``, ``zero_point = 0``,
      codes in [-127, 127];
    * affine (zero point, as ``torch.ao``'s ``MinMaxObserver``): the range is widened to
      include 0, ``scale = (max - min) / 255``, ``zero_point = -128 - round(min / scale)``.

    ``q = clamp(round_half_even(x / scale) + zero_point, -128, 127)``, exactly what
    ``torch.quantize_per_tensor`` / ``torch.quantize_per_channel`` give for the same
    scale and zero point. An all-zero tensor or channel gets ``scale = eps(float32)``
    (as ``torch.ao``'s observers do), so it quantizes to zeros instead of dividing by 0.
    """
    _check_tensor("x", x, _FLOATS)
    if x.numel() == 0:
        raise ValueError("x is empty")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    xf = x.float()
    if dim is None:
        lo, hi = xf.min(), xf.max()
        shape = ()
    else:
        dim = _check_int("dim", dim, lo=-x.dim(), hi=x.dim() - 1) % x.dim()
        other = [d for d in range(x.dim()) if d != dim]
        lo = xf.amin(dim=other) if other else xf
        hi = xf.amax(dim=other) if other else xf
        shape = [1] * x.dim()
        shape[dim] = x.shape[dim]
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        scale = torch.maximum(-lo, hi) / 127
        scale = torch.clamp(scale, min=eps)
        zero = torch.zeros_like(scale, dtype=torch.int64)
    else:
        lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
        scale = torch.clamp((hi - lo) / 255, min=eps)
        zero = torch.clamp(-128 - torch.round(lo / scale).to(torch.int64), -128, 127)
    s, z = scale.reshape(shape), zero.reshape(shape)
    q = torch.clamp(torch.round(xf / s) + z, -128, 127).to(torch.int8)
    return q, scale.float(), zero


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    dim: int | None = None) -> torch.Tensor:
    """``(q - zero_point) · scale`` in float32, broadcasting per-channel parameters along ``dim``."""
    _check_tensor("q", q, (torch.int8,))
    _check_tensor("scale", scale, (torch.float32,))
    _check_tensor("zero_point", zero_point, (torch.int64, torch.int32))
    if dim is None:
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise ValueError("per-tensor dequantization needs one scale and one zero_point")
        return (q.float() - zero_point.float()) * scale
    dim = _check_int("dim", dim, lo=-q.dim(), hi=q.dim() - 1) % q.dim()
    if scale.numel() != q.shape[dim] or zero_point.numel() != q.shape[dim]:
        raise ValueError(f"scale and zero_point must have {q.shape[dim]} entries (q.shape[{dim}])")
    shape = [1] * q.dim()
    shape[dim] = q.shape[dim]
    return (q.float() - zero_point.reshape(shape).float()) * scale.reshape(shape)


def int_quantize_groups(w: torch.Tensor, bits: int, group_size: int | None = None,
                        symmetric: bool = False) -> torch.Tensor:
    """Round-to-nearest ``bits``-bit quantization of a 2-D weight, per row or per group
    of ``group_size`` consecutive columns; returns the dequantized float32 weight.

    Asymmetric (the GPTQ/AWQ convention): codes 0..2^bits-1 with a zero point, range
    widened to include 0. Symmetric: codes in [-(2^(bits-1)-1), 2^(bits-1)-1].
    ``group_size`` must divide the number of columns.
    """
    _check_tensor("w", w, _FLOATS, ndim=2)
    bits = _check_int("bits", bits, lo=2, hi=8)
    rows, cols = w.shape
    g = cols if group_size is None else _check_int("group_size", group_size, lo=1)
    if cols % g:
        raise ValueError(f"group_size {g} does not divide the {cols} columns of w")
    wg = w.float().reshape(rows, cols // g, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = torch.clamp(wg.abs().amax(-1, keepdim=True) / qmax, min=torch.finfo(torch.float32).eps)
        out = torch.clamp(torch.round(wg / scale), -qmax, qmax) * scale
    else:
        scale, zero, maxq = _minmax_params(wg, bits)
        out = _fake_quant(wg, scale, zero, maxq)
    return out.reshape(rows, cols)


def _minmax_params(w: torch.Tensor, bits: int):
    """GPTQ's asymmetric min-max quantizer over the last dimension (range includes 0)."""
    maxq = 2 ** bits - 1
    lo = torch.clamp(w.amin(-1, keepdim=True), max=0)
    hi = torch.clamp(w.amax(-1, keepdim=True), min=0)
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale)
    return scale, zero, maxq


def _fake_quant(w, scale, zero, maxq):
    return scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)


# --------------------------------------------------------------------------- small floats

_FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _float_format(fmt: str) -> FormatInfo:
    info = _info(fmt, "fmt")
    if info.kind != "float":
        raise ValueError(f"fmt must be a float format (e4m3, e5m2, e2m1), got {fmt!r}")
    return info


def fp_grid(fmt: str) -> torch.Tensor:
    """Every bit pattern of a small float format decoded by hand, as float64, indexed by code.

    Code ``c`` has sign ``c >> (E+M)``, exponent field ``e`` and mantissa field ``m``:
    ``e == 0`` → subnormal ``2^(1-bias) · m/2^M``; otherwise ``2^(e-bias) · (1 + m/2^M)``;
    E5M2's all-ones exponent is inf (m = 0) or NaN; E4M3's S.1111.111 is NaN; E2M1 has
    neither. ``fp_grid("e4m3")`` equals ``torch.arange(256, dtype=torch.uint8)
    .view(torch.float8_e4m3fn).double()`` (a test holds it to that).
    """
    f = _float_format(fmt)
    E, M, bias = f.exponent_bits, f.mantissa_bits, f.bias
    out = []
    for code in range(2 ** f.bits):
        s = -1.0 if code >> (E + M) else 1.0
        e = (code >> M) & (2 ** E - 1)
        m = code & (2 ** M - 1)
        if f.name == "e5m2" and e == 2 ** E - 1:
            v = math.inf if m == 0 else math.nan
        elif f.name == "e4m3" and e == 2 ** E - 1 and m == 2 ** M - 1:
            v = math.nan
        elif e == 0:
            v = 2.0 ** (1 - bias) * (m / 2 ** M)
        else:
            v = 2.0 ** (e - bias) * (1 + m / 2 ** M)
        out.append(math.copysign(v, s))
    return torch.tensor(out, dtype=torch.float64)


def fp8_round(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round float32 ``x`` to the nearest value of ``fmt`` (``"e4m3"``, ``"e5m2"`` or
    ``"e2m1"``), by hand; returns float32 values on that grid.

    The rules ``tensor.to(torch.float8_e4m3fn / float8_e5m2)`` follows in PyTorch 2.13:
    round to nearest, ties to the even mantissa; below the smallest normal the step is
    the subnormal spacing ``2^(1-bias-M)``; the sign is kept (also on zero). Overflow:
    E4M3 (no inf) *saturates* every finite or infinite magnitude above 448 to ±448;
    E5M2 rounds normally and goes to ±inf from the midpoint 61440 on (inf stays inf);
    E2M1 (no inf, no NaN) saturates to ±6. NaN stays NaN (E2M1 has none: ValueError).
    """
    f = _float_format(fmt)
    _check_tensor("x", x, (torch.float32,), finite=False)
    if f.name == "e2m1" and bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN, which E2M1 cannot represent")
    M, emin = f.mantissa_bits, 1 - f.bias
    a = x.double().abs()
    # exponent of the leading bit, never below the subnormal range's
    _, e = torch.frexp(torch.where(a > 0, a, torch.ones_like(a)))       # a = m · 2^e, m in [0.5, 1)
    e = torch.clamp(e.double() - 1, min=emin)
    step = torch.pow(2.0, e - M)
    r = torch.round(torch.where(torch.isfinite(a), a, torch.zeros_like(a)) / step) * step
    if f.has_inf:                                   # e5m2: overflow goes to inf
        r = torch.where(r > f.max_finite, math.inf, r)
        r = torch.where(torch.isinf(a), math.inf, r)
    else:                                           # e4m3fn, e2m1: saturate (inf too)
        r = torch.where((r > f.max_finite) | torch.isinf(a), f.max_finite, r)
    r = torch.where(torch.isnan(a), math.nan, r)
    return torch.copysign(r, x.double()).float()


def fp8_bits(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """The uint8 codes of ``fp8_round(x, fmt)`` for e4m3/e5m2 (its exact bit pattern)."""
    if fmt not in _FP8_DTYPES:
        raise ValueError(f"fmt must be 'e4m3' or 'e5m2', got {fmt!r}")
    return fp8_round(x, fmt).to(_FP8_DTYPES[fmt]).view(torch.uint8)


# --------------------------------------------------------------------------- NF4

def bitsandbytes_functional():
    """``bitsandbytes.functional``, imported without its CPU-kernel notice (a logged warning
    on CPUs with AVX-512 BF16 that lack the optional ``kernels`` package)."""
    import logging

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    before = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_functional
    finally:
        log.setLevel(before)
    return bnb_functional


def nf4_codebook() -> torch.Tensor:
    """QLoRA's 16 NF4 values (float32, ascending), built from normal quantiles.

    Eight positive values are the N(0,1) quantiles at 8 evenly spaced probabilities from
    ``NF4_QLORA_OFFSET`` down to (excluding) 0.5, seven negative ones the same with 7
    points, plus an exact 0; all divided by the largest. Equal, bit for bit, to
    ``bitsandbytes.functional.get_4bit_type("nf4")``.
    """
    from scipy.stats import norm

    off = NF4_QLORA_OFFSET
    pos = norm.ppf(torch.linspace(off, 0.5, 9)[:-1].numpy()).tolist()
    neg = (-norm.ppf(torch.linspace(off, 0.5, 8)[:-1].numpy())).tolist()
    values = torch.tensor(sorted(pos + [0.0] + neg), dtype=torch.float64)
    return (values / values.max()).float()


def _check_block(block_size) -> int:
    return _check_int("block_size", block_size, lo=1)


def nf4_quantize(x: torch.Tensor, block_size: int = 64):
    """NF4 blockwise quantization of ``x`` (flattened) as bitsandbytes does it.

    Returns ``(codes, absmax)``: ``codes`` uint8 in 0..15, shape ``(x.numel(),)``, one
    per element (unpacked: :func:`nf4_pack` packs two per byte); ``absmax`` float32, one
    per block of ``block_size`` consecutive elements. A last, shorter block has its own
    absmax (bitsandbytes' behaviour when ``block_size`` does not divide ``x.numel()``).
    Each element is normalized as ``x · (1/absmax)`` (float32; an all-zero block uses
    ``1/1e-38`` and stays 0), clamped to [-1, 1], and mapped to the nearest code value;
    a value exactly between two codes goes to the lower one.
    """
    _check_tensor("x", x, _FLOATS)
    if x.numel() == 0:
        raise ValueError("x is empty")
    block_size = _check_block(block_size)
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // block_size)
    pad = nblocks * block_size - n
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(nblocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[:n]
    code = nf4_codebook()
    bounds = (code[:-1] + code[1:]) / 2
    codes = torch.bucketize(scaled, bounds).to(torch.uint8)
    return codes, absmax


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, block_size: int = 64,
                   shape=None) -> torch.Tensor:
    """``codebook[codes] · absmax[block]`` in float32, reshaped to ``shape`` (default flat)."""
    _check_tensor("codes", codes, (torch.uint8,), ndim=1)
    _check_tensor("absmax", absmax, (torch.float32,), ndim=1)
    block_size = _check_block(block_size)
    n = codes.numel()
    if absmax.numel() != -(-n // block_size):
        raise ValueError(f"absmax has {absmax.numel()} entries; {n} codes in blocks of "
                         f"{block_size} need {-(-n // block_size)}")
    if bool((codes > 15).any()):
        raise ValueError("codes must be in 0..15")
    values = nf4_codebook()[codes.long()] * absmax.repeat_interleave(block_size)[:n]
    return values if shape is None else values.reshape(shape)


def nf4_pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble, as bitsandbytes stores them:
    uint8 of shape ``(ceil(n/2), 1)`` (an odd count is padded with code 7, the value 0.0)."""
    _check_tensor("codes", codes, (torch.uint8,), ndim=1)
    if bool((codes > 15).any()):
        raise ValueError("codes must be in 0..15")
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


# --------------------------------------------------------------------------- LLM.int8()

def llm_int8_matmul(x: torch.Tensor, w: torch.Tensor, threshold: float = LLM_INT8_THRESHOLD):
    """LLM.int8()'s ``x @ w.T`` with outlier features kept in high precision.

    ``x``: ``[tokens, in]``, ``w``: ``[out, in]``, float32 (or 16-bit); returns float32
    ``[tokens, out]``. As bitsandbytes computes it:

    1. outlier columns: input features where any ``|x| >= threshold`` (none if threshold is 0);
    2. ``x`` quantized row-wise (one absmax per token, over the entries below the
       threshold) to int8 in [-127, 127], the outlier columns' codes set to 0; ``w``
       quantized row-wise (one absmax per output feature) to int8;
    3. int32 product of the codes, times ``absmax_x[:, None] · absmax_w[None, :] / 127²``;
    4. plus ``x[:, outliers] @ ŵ[:, outliers].T`` in float, ŵ the dequantized int8 weight
       (bitsandbytes keeps only the int8 weight).

    A row whose every entry is an outlier has absmax 0 and contributes only through step 4.
    """
    _check_tensor("x", x, _FLOATS, ndim=2)
    _check_tensor("w", w, _FLOATS, ndim=2)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but w has {w.shape[1]} input columns")
    threshold = _check_float("threshold", threshold, nonneg=True)
    xf, wf = x.float(), w.float()
    if threshold > 0:
        outlier = xf.abs() >= threshold
        cols = outlier.any(dim=0)
    else:
        outlier = torch.zeros_like(xf, dtype=torch.bool)
        cols = torch.zeros(xf.shape[1], dtype=torch.bool)
    x_in = torch.where(outlier, 0.0, xf)
    sx = x_in.abs().amax(dim=1)
    qx = torch.round(x_in * (127.0 / torch.where(sx > 0, sx, 1.0))[:, None])
    qx[:, cols] = 0
    sw = wf.abs().amax(dim=1)
    qw = torch.round(wf * (127.0 / torch.where(sw > 0, sw, 1.0))[:, None])
    acc = (qx.double() @ qw.double().T).float()         # exact integer accumulation
    out = acc * (sx[:, None] * sw[None, :]) / (127.0 * 127.0)
    if bool(cols.any()):
        w_hat = qw[:, cols] * (sw[:, None] / 127.0)
        out = out + xf[:, cols] @ w_hat.T
    return out


# --------------------------------------------------------------------------- GPTQ

def rtn_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest baseline: per-row asymmetric min-max ``bits``-bit, dequantized float32."""
    return int_quantize_groups(w, bits, None, symmetric=False)


def quantization_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """The layer-output error GPTQ minimizes, ``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` (= Σ‖(W-Ŵ)x‖² · 2 with H = 2XXᵀ)."""
    _check_tensor("w", w, _FLOATS, ndim=2)
    _check_tensor("w_hat", w_hat, _FLOATS, ndim=2)
    _check_tensor("h", h, _FLOATS, ndim=2)
    if w.shape != w_hat.shape or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"shapes do not fit: w {tuple(w.shape)}, w_hat {tuple(w_hat.shape)}, "
                         f"h {tuple(h.shape)} (h must be [in, in])")
    d = (w - w_hat).double()
    return float(torch.einsum("ij,jk,ik->", d, h.double(), d))


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, damp: float = 0.01) -> torch.Tensor:
    """GPTQ (Frantar et al. 2023, Algorithm 1 without lazy batches): quantize the columns of
    ``w`` ``[out, in]`` one at a time, each error spread over the columns not yet quantized
    through the Cholesky factor of ``H⁻¹``; ``h`` = 2·XXᵀ ``[in, in]`` of the calibration inputs.

    The grid is :func:`rtn_quantize`'s (per row, asymmetric, from the original ``w``).
    Dead inputs (``H_ii = 0``) get ``H_ii = 1`` and weight 0; ``damp · mean(diag H)`` is
    added to the diagonal. Returns the dequantized float32 weight.
    """
    _check_tensor("w", w, _FLOATS, ndim=2)
    _check_tensor("h", h, _FLOATS, ndim=2)
    bits = _check_int("bits", bits, lo=2, hi=8)
    damp = _check_float("damp", damp, nonneg=True)
    rows, cols = w.shape
    if h.shape != (cols, cols):
        raise ValueError(f"h must be [{cols}, {cols}] for w of shape {tuple(w.shape)}, got {tuple(h.shape)}")
    W = w.double().clone()
    H = h.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    scale, zero, maxq = _minmax_params(W, bits)
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i in range(cols):
        col = W[:, i]
        q = _fake_quant(col[:, None], scale, zero, maxq)[:, 0]
        Q[:, i] = q
        err = (col - q) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
    return Q.float()


def _check_tiny_model(name: str, model) -> None:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config") or not hasattr(model, "blocks"):
        raise TypeError(f"{name} must be a tiny model (utils.tiny.TinyTransformer), got {type(model).__name__}")


def _block_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.startswith("blocks.")]


@torch.no_grad()
def quantize_model_weights(model, method: str, bits: int, calib_tokens: torch.Tensor | None = None,
                           quantize_fn: Callable | None = None, damp: float = 0.01):
    """A copy of a tiny model with every linear layer of its blocks quantized (weight-only).

    ``method``: ``"rtn"`` or ``"gptq"`` (embedding and output head stay float32, as in the
    GPTQ paper). GPTQ runs block by block: the calibration batch ``calib_tokens`` ``[B, T]``
    goes through the already-quantized earlier blocks, each linear's inputs give its
    ``H = 2XXᵀ``. ``quantize_fn(w, h, bits)`` replaces :func:`gptq_quantize` (a learner's).
    """
    import copy

    _check_tiny_model("model", model)
    if quantize_fn is not None and not callable(quantize_fn):
        raise TypeError(f"quantize_fn must be callable, got {type(quantize_fn).__name__}")
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    bits = _check_int("bits", bits, lo=2, hi=8)
    q = copy.deepcopy(model).eval()
    if method == "rtn":
        for _, lin in _block_linears(q):
            lin.weight.copy_(rtn_quantize(lin.weight, bits))
        return q
    _check_tensor("calib_tokens", calib_tokens, (torch.int64,), ndim=2)
    fn = quantize_fn or gptq_quantize
    for b, block in enumerate(q.blocks):
        linears = [(n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        hs = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in linears}

        def hook(name):
            def f(mod, inp, out):
                xx = inp[0].reshape(-1, inp[0].shape[-1]).double()
                hs[name] += 2 * xx.T @ xx
            return f

        handles = [m.register_forward_hook(hook(n)) for n, m in linears]
        try:
            q(calib_tokens)
        finally:
            for hd in handles:
                hd.remove()
        for n, m in linears:
            m.weight.copy_(fn(m.weight.detach().clone(), hs[n].float(), bits))
    return q


@torch.no_grad()
def perplexity(model, text: str, seq_len: int | None = None) -> float:
    """exp(mean next-character cross-entropy) of a tiny model over ``text``, in windows of ``seq_len``."""
    from . import tiny

    _check_tiny_model("model", model)
    if not isinstance(text, str) or len(text) < 2:
        raise ValueError("text must be a string of at least 2 characters")
    seq_len = _check_int("seq_len", seq_len or model.config.max_seq_len, lo=2)
    try:
        ids = torch.tensor(tiny.CharTokenizer().encode(text))
    except ValueError as e:
        raise ValueError(f"text: {e}") from None
    n = (ids.numel() - 1) // seq_len
    if n == 0:
        raise ValueError(f"text is shorter than seq_len + 1 = {seq_len + 1} characters")
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1: n * seq_len + 1].reshape(n, seq_len)
    loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, model.config.vocab), y.reshape(-1))
    return float(torch.exp(loss))


# --------------------------------------------------------------------------- SmoothQuant, AWQ

def smoothquant_scales(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``s_j = max|X_j|^α / max|W_:,j|^(1-α)``
    (Xiao et al. 2023, Section 4, Eq. 4): ``(X / s) @ (W · s)ᵀ = X @ Wᵀ`` exactly, and the
    activations' outlier channels shrink while the weights' grow. ``w``: ``[out, in]``."""
    _check_tensor("act_absmax", act_absmax, _FLOATS, ndim=1)
    _check_tensor("w", w, _FLOATS, ndim=2)
    alpha = _check_float("alpha", alpha)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if act_absmax.numel() != w.shape[1]:
        raise ValueError(f"act_absmax has {act_absmax.numel()} channels, w has {w.shape[1]} input columns")
    if bool((act_absmax < 0).any()):
        raise ValueError("act_absmax must be >= 0 (it is a maximum of absolute values)")
    a = act_absmax.float().clamp(min=1e-5)
    b = w.float().abs().amax(0).clamp(min=1e-5)
    return a.pow(alpha) / b.pow(1 - alpha)


def fake_quant_int8(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Absmax INT8 quantize-dequantize (per tensor, or per slice along ``dim``), float32."""
    q, scale, zero = int8_quantize(x, dim, symmetric=True)
    return int8_dequantize(q, scale, zero, dim)


def awq_search(w: torch.Tensor, x: torch.Tensor, bits: int = 4, group_size: int | None = None,
               grid: int = 20):
    """AWQ's activation-aware scaling (Lin et al. 2024, Section 3.2): scale input channel
    ``j`` of the weight by ``s_j = mean|x_j|^α`` before round-to-nearest and divide it back
    after, with α chosen on a grid of ``grid`` points in [0, 1) to minimize the output error
    ``‖x Wᵀ - x Q(W·s)/sᵀ‖²`` on calibration inputs ``x`` ``[n, in]``.

    Returns ``(w_hat, alpha, errors)``: the dequantized weight, the chosen α and the error
    at each grid point (α = 0 is plain round-to-nearest).
    """
    _check_tensor("w", w, _FLOATS, ndim=2)
    _check_tensor("x", x, _FLOATS, ndim=2)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features, w has {w.shape[1]} input columns")
    grid = _check_int("grid", grid, lo=1)
    xf, wf = x.float(), w.float()
    ref = xf @ wf.T
    mean_abs = xf.abs().mean(0).clamp(min=1e-8)
    best, errors = None, []
    for k in range(grid):
        alpha = k / grid
        s = mean_abs.pow(alpha)
        s = s / torch.sqrt(s.max() * s.min())
        w_hat = int_quantize_groups(wf * s, bits, group_size) / s
        err = float(((xf @ w_hat.T - ref) ** 2).sum())
        errors.append(err)
        if best is None or err < best[0]:
            best = (err, alpha, w_hat)
    return best[2], best[1], errors


# --------------------------------------------------------------------------- measured

def _state_bytes(module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getbuffer().nbytes


def dynamic_int8_benchmark(d_model: int = 1024, n_layers: int = 4, batch: int = 8,
                           repeats: int = 7, seed: int = 0) -> dict:
    """fp32 vs ``torch.ao.quantization.quantize_dynamic`` (int8 weights, activations
    quantized on the fly) on a stack of ``n_layers`` ``d_model``-wide linears, this CPU.

    Returns bytes of each serialized state dict, the best-of-``repeats`` seconds per
    forward of ``batch`` rows (fp32 and int8 interleaved, so load hits both alike), and
    the largest relative output error.
    """
    d_model = _check_int("d_model", d_model, lo=8)
    n_layers = _check_int("n_layers", n_layers, lo=1)
    batch = _check_int("batch", batch, lo=1)
    repeats = _check_int("repeats", repeats, lo=1)
    seed = _check_int("seed", seed, lo=0)
    torch.manual_seed(seed)
    fp32 = torch.nn.Sequential(*[torch.nn.Linear(d_model, d_model) for _ in range(n_layers)]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic
        int8 = quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)
    x = torch.randn(batch, d_model)
    times = {"fp32": [], "int8": []}
    with torch.no_grad():
        ref, got = fp32(x), int8(x)
        for _ in range(repeats):
            for name, m in (("fp32", fp32), ("int8", int8)):
                t = time.perf_counter()
                for _ in range(5):
                    m(x)
                times[name].append((time.perf_counter() - t) / 5)
    err = float((got - ref).abs().max() / ref.abs().max())
    return {"bytes_fp32": _state_bytes(fp32), "bytes_int8": _state_bytes(int8),
            "seconds_fp32": min(times["fp32"]), "seconds_int8": min(times["int8"]),
            "max_rel_error": err, "params": sum(p.numel() for p in fp32.parameters())}


def dynamic_int8_warnings(result: Mapping, report: bool = True) -> list[tuple[str, str, str, str]]:
    """Hold a :func:`dynamic_int8_benchmark` result to the model; never raises for a timing.

    The model: int8 weights take about a quarter of fp32's bytes (0.30 allowed for biases,
    which stay fp32, and pickling), and an int8 linear is not slower than fp32 on a CPU
    with int8 dot-product instructions. Each disagreement is a tuple ``(what, expected,
    got, likely cause)``; with ``report`` each is also passed to
    ``utils.checks.measurement_warning`` (a ⚠ line, not a failure).
    """
    if not isinstance(result, Mapping):
        raise TypeError(f"result must be the dict from dynamic_int8_benchmark, got {type(result).__name__}")
    need = ("bytes_fp32", "bytes_int8", "seconds_fp32", "seconds_int8")
    missing = [k for k in need if k not in result]
    if missing:
        raise ValueError(f"result lacks {', '.join(missing)}")
    for k in need:
        _check_float(f"result[{k!r}]", result[k], positive=True)
    out = []
    ratio = result["bytes_int8"] / result["bytes_fp32"]
    if ratio > 0.30:
        out.append(("int8 state dict size", "at most 0.30 of fp32's bytes", f"{ratio:.2f}",
                    "a different serialization of packed weights in this PyTorch build"))
    speedup = result["seconds_fp32"] / result["seconds_int8"]
    if speedup < 1.0:
        out.append(("int8 dynamic linear speed", "not slower than fp32 on a CPU with int8 dot products",
                    f"{speedup:.2f}x fp32's speed", "no VNNI/SDOT instructions on this CPU, or another "
                    "process busy during the timing; quantizing activations costs time at small sizes"))
    if report:
        from .checks import measurement_warning

        for w in out:
            measurement_warning(*w)
    return out


def fp8_matmul_cuda(a: torch.Tensor, b: torch.Tensor):
    """On an FP8 GPU (H100 and later): ``a @ b`` with both operands cast to E4M3 with
    per-tensor scales, through ``torch._scaled_mm``; returns ``(out_bf16, reference_bf16)``.

    ``a`` ``[m, k]``, ``b`` ``[k, n]`` on CUDA; raises RuntimeError without CUDA.
    """
    _check_tensor("a", a, _FLOATS, ndim=2)
    _check_tensor("b", b, _FLOATS, ndim=2)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner dimensions differ: a {tuple(a.shape)}, b {tuple(b.shape)}")
    if not torch.cuda.is_available():
        raise RuntimeError("fp8_matmul_cuda needs a CUDA GPU with FP8 tensor cores")
    fmax = FORMATS["e4m3"].max_finite
    sa = (a.abs().max().float() / fmax).clamp(min=1e-12)
    sb = (b.abs().max().float() / fmax).clamp(min=1e-12)
    a8 = (a.float() / sa).to(torch.float8_e4m3fn)
    b8 = (b.float() / sb).to(torch.float8_e4m3fn).t().contiguous().t()   # column-major
    out = torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    return out, (a.bfloat16() @ b.bfloat16())
