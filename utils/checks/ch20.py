"""Checkers for lab 20, Quantization.

The oracles are the real implementations, not the course's: ``torch.quantize_per_tensor``
/ ``torch.quantize_per_channel`` and ``torch.ao``'s ``MinMaxObserver`` for INT8;
``tensor.to(torch.float8_e4m3fn / torch.float8_e5m2)`` for FP8 rounding, bit for bit;
``bitsandbytes.functional`` (``get_4bit_type``, ``quantize_4bit``, ``int8_vectorwise_quant``,
``int8_linear_matmul``, ``int8_mm_dequant``) for NF4 and LLM.int8(); for GPTQ, the layer
error ``tr(ΔW H ΔWᵀ)`` it minimizes, against round-to-nearest and a reference GPTQ.
"""
from __future__ import annotations

import math
import warnings

import torch

from .. import quant
from . import (describe, exercise, expect_close, expect_dtype, expect_equal, expect_raises,
               expect_shape, expect_type, fail)


# --------------------------------------------------------------------------- helpers


def _same_bits(got: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    both_nan = got.isnan() & exp.isnan()
    return both_nan | ((got == exp) & (torch.signbit(got) == torch.signbit(exp)))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- exercise 1

def _int8_cases():
    g = _gen(20)
    a = torch.randn(12, 20, generator=g) * 2 + 0.7
    a[4] = 0.0                                      # an all-zero channel (dim 0)
    b = torch.randn(6, 5, 8, generator=g).abs() * 3  # all positive: the affine range must include 0
    c = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -126.0])     # absmax scale 1: exact ties
    d = torch.tensor([127.5, -127.5, 0.5, 1.5, 2.5, -0.5, -2.5])      # affine scale 1: exact ties
    return [(a, None), (a, 0), (a, 1), (b, None), (b, 2), (b, 1), (c, None), (d, None)]


@exercise
def int8_quantize(fn):
    """``fn(x, dim, symmetric)`` → ``(q int8, scale float32, zero_point int64)``."""
    n = 0
    for symmetric in (True, False):
        for x, dim in _int8_cases():
            call = f"int8_quantize(x of shape {tuple(x.shape)}, dim={dim}, symmetric={symmetric})"
            got = fn(x.clone(), dim, symmetric)
            expect_type(got, tuple, call, hint="return a tuple (q, scale, zero_point)")
            if len(got) != 3:
                fail(f"{call} returned {len(got)} items", "(q, scale, zero_point)", describe(got),
                     "return q, scale, zero_point")
            q, scale, zp = got
            nch = () if dim is None else (x.shape[dim],)
            expect_dtype(q, torch.int8, f"{call}: q")
            expect_shape(q, x.shape, f"{call}: q")
            expect_dtype(scale, torch.float32, f"{call}: scale")
            expect_shape(scale, nch, f"{call}: scale",
                         hint="per tensor: a 0-d tensor; per channel: one scale per index of dim")
            expect_dtype(zp, torch.int64, f"{call}: zero_point")
            expect_shape(zp, nch, f"{call}: zero_point")
            # the scale and zero point: absmax/127, or torch.ao's MinMaxObserver
            if symmetric:
                other = [d for d in range(x.dim()) if d != (dim if dim is None else dim % x.dim())]
                absmax = x.abs().amax() if dim is None else x.abs().amax(dim=other)
                want_s = torch.clamp(absmax / 127, min=torch.finfo(torch.float32).eps)
                want_z = torch.zeros_like(want_s, dtype=torch.int64)
                hint = ("scale = absmax / 127 over the tensor (or each channel), zero_point = 0; an "
                        "all-zero channel gets scale = torch.finfo(torch.float32).eps")
            else:
                from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    obs = (MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_affine) if dim is None
                           else PerChannelMinMaxObserver(ch_axis=dim % x.dim(), dtype=torch.qint8,
                                                         qscheme=torch.per_channel_affine))
                    obs(x)
                    want_s, want_z = obs.calculate_qparams()
                want_s, want_z = want_s.reshape(nch), want_z.reshape(nch).long()
                hint = ("widen [min, max] to include 0; scale = (max - min) / 255 (at least eps of "
                        "float32); zero_point = -128 - round(min / scale), as torch.ao's MinMaxObserver")
            expect_close(scale, want_s, rtol=1e-6, atol=0, what=f"{call}: scale", hint=hint)
            expect_equal(zp, want_z, f"{call}: zero_point", hint=hint)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dim is None:
                    ref = torch.quantize_per_tensor(x, float(scale), int(zp), torch.qint8)
                else:
                    ref = torch.quantize_per_channel(x, scale.double(), zp, dim % x.dim(), torch.qint8)
            expect_equal(q, ref.int_repr(), f"{call}: q (against torch.quantize_per_"
                         f"{'tensor' if dim is None else 'channel'} with your scale and zero point)",
                         hint="q = clamp(round(x / scale) + zero_point, -128, 127); torch.round rounds "
                              "ties to even, as torch does; broadcast per-channel scales along dim")
            n += 1
    expect_raises(lambda: fn(torch.tensor([1.0, math.nan]), None, True), ValueError,
            "int8_quantize(x with a NaN)", "a ValueError that says x has a NaN",
            "check torch.isfinite(x).all() first: a NaN would poison the scale")
    expect_raises(lambda: fn(torch.zeros(2, 3), 2, True), (ValueError, IndexError),
            "int8_quantize(x of shape (2, 3), dim=2)", "a ValueError naming dim",
            "dim must be in [-x.dim(), x.dim() - 1]")
    return (f"{n} cases, absmax and zero-point, per tensor and per channel, equal to "
            "torch.quantize_per_tensor / quantize_per_channel")


# --------------------------------------------------------------------------- exercise 2

def _fp8_inputs(fmt: str) -> torch.Tensor:
    g = _gen(8)
    grid = quant.fp_grid(fmt)
    finite = grid[torch.isfinite(grid)].float().unique()
    mids = ((finite[:-1].double() + finite[1:].double()) / 2).float()
    up, down = torch.tensor(math.inf), torch.tensor(-math.inf)
    return torch.cat([
        finite, mids, torch.nextafter(mids, up), torch.nextafter(mids, down),
        torch.randint(-2 ** 31, 2 ** 31 - 1, (50_000,), dtype=torch.int32, generator=g).view(torch.float32),
        torch.randn(20_000, generator=g) * 100, torch.rand(5_000, generator=g) * 1e-3,
        torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 1e30, -1e-30, 460.0, 464.0, 470.0,
                      480.0, 57344.0, 60000.0, 61440.0, -61440.0, 2.0 ** -10, 2.0 ** -17]),
    ])


def _fp8_first_kind(x: torch.Tensor, fmt: str) -> str:
    info = quant.format_info(fmt)
    a = x.abs().item()
    if math.isnan(a):
        return "NaN"
    if math.isinf(a):
        return "an infinity"
    if a > info.max_finite:
        return "a value above the largest finite one (saturation/overflow)"
    if 0 < a < info.min_normal:
        return "a subnormal"
    return "a normal value"


@exercise
def fp8_round(fn):
    """``fn(x, fmt)`` for fmt "e4m3"/"e5m2": float32 values on the FP8 grid, equal bit for bit
    to ``x.to(torch.float8_e4m3fn / torch.float8_e5m2).float()``."""
    total = 0
    for fmt, dtype in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        x = _fp8_inputs(fmt)
        got = fn(x.clone(), fmt)
        call = f"fp8_round(x, {fmt!r})"
        expect_type(got, torch.Tensor, call)
        expect_dtype(got, torch.float32, call, hint="return float32 values that lie on the FP8 grid")
        expect_shape(got, x.shape, call)
        exp = x.to(dtype).float()
        bad = ~_same_bits(got, exp)
        if bad.any():
            i = int(bad.nonzero()[0])
            kind = _fp8_first_kind(x[i], fmt)
            fail(f"{call} differs from torch.{dtype} on {int(bad.sum())} of {x.numel()} inputs",
                 f"x = {x[i].item()!r} ({kind}) → {exp[i].item()!r}",
                 f"{got[i].item()!r}",
                 {"a subnormal": "below the smallest normal 2^(1-bias) the spacing stays 2^(1-bias-M)",
                  "NaN": "NaN stays NaN",
                  "an infinity": ("e4m3fn has no inf: torch saturates ±inf to ±448" if fmt == "e4m3"
                                  else "e5m2 keeps ±inf"),
                  "a value above the largest finite one (saturation/overflow)": (
                      "e4m3fn saturates to ±448" if fmt == "e4m3" else
                      "e5m2 rounds to nearest; from the midpoint 61440 on the result is ±inf"),
                  }.get(kind, "round to nearest, ties to the even mantissa; keep the sign (also of 0)"))
        total += x.numel()
    expect_raises(lambda: fn(torch.zeros(3), "e3m4"), ValueError, "fp8_round(x, 'e3m4')",
            "a ValueError naming the unknown format", "accept only 'e4m3' and 'e5m2'")
    return f"{total} inputs (every value, every midpoint and its neighbours, random bits), bit-exact against torch"


# --------------------------------------------------------------------------- exercise 3

@exercise
def nf4_codebook(fn):
    """``fn()`` → the 16 NF4 values, float32 ascending, as QLoRA/bitsandbytes build them."""
    got = fn()
    expect_type(got, torch.Tensor, "nf4_codebook()")
    expect_dtype(got, torch.float32, "nf4_codebook()")
    expect_shape(got, (16,), "nf4_codebook()")
    ref = quant.bitsandbytes_functional().get_4bit_type("nf4", device="cpu")
    if not bool((got[1:] > got[:-1]).all()):
        fail("nf4_codebook() is not sorted ascending", "16 increasing values", describe(got),
             "sort the values: code i is the i-th smallest")
    expect_equal(got[7].item(), 0.0, "nf4_codebook()[7]", hint="NF4 has an exact zero at code 7")
    expect_close(got, ref, rtol=0, atol=2e-7, what="nf4_codebook() against bitsandbytes' NF4 table",
                 hint="8 positive quantiles from torch.linspace(offset, 0.5, 9)[:-1] and 7 negative "
                      "ones from torch.linspace(offset, 0.5, 8)[:-1], offset 0.9677083; divide by the max")
    exact = torch.equal(got, ref)
    return "equal to bitsandbytes' table" + (" bit for bit" if exact else " (within 2e-7)")


# --------------------------------------------------------------------------- exercise 4

@exercise
def nf4_quantize(fn):
    """``fn(x, block_size)`` → ``(codes uint8 [n], absmax float32 [ceil(n/block)])``, equal to
    ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`` unpacked."""
    bnb = quant.bitsandbytes_functional()
    cases = [(4096, 64, "blocks of 64"), (2048, 256, "blocks of 256"),
             (1000, 64, "a last block of 40"), (130, 32, "a zero block and a last block of 2")]
    for n, block, what in cases:
        x = torch.randn(n, generator=_gen(n)) * 2.5
        if n == 130:
            x[:32] = 0.0
        call = f"nf4_quantize(x of {n} values, block_size={block}) ({what})"
        got = fn(x.clone(), block)
        expect_type(got, tuple, call, hint="return a tuple (codes, absmax)")
        if len(got) != 2:
            fail(f"{call} returned {len(got)} items", "(codes, absmax)", describe(got), "return codes, absmax")
        codes, absmax = got
        packed, state = bnb.quantize_4bit(x.reshape(1, -1), blocksize=block, quant_type="nf4")
        ref_codes = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], dim=1).reshape(-1)[:n]
        expect_dtype(absmax, torch.float32, f"{call}: absmax")
        expect_shape(absmax, state.absmax.shape, f"{call}: absmax",
                     hint="one absmax per block of block_size consecutive values; a shorter last block counts")
        expect_close(absmax, state.absmax, rtol=0, atol=0, what=f"{call}: absmax",
                     hint="absmax of each block of the flattened x (an all-zero block has absmax 0)")
        expect_dtype(codes, torch.uint8, f"{call}: codes")
        expect_shape(codes, (n,), f"{call}: codes", hint="one code per value, unpacked, flat")
        bad = codes != ref_codes
        if bad.any():
            i = int(bad.nonzero()[0])
            a = state.absmax[i // block].item()
            fail(f"{call}: {int(bad.sum())} of {n} codes differ from bitsandbytes",
                 f"code {int(ref_codes[i])} for x[{i}] = {x[i].item():.6g} (absmax {a:.6g})",
                 f"code {int(codes[i])}",
                 "normalize x · (1/absmax) in float32, clamp to [-1, 1], take the nearest code value "
                 "(a value exactly between two goes to the lower one); an all-zero block maps to code 7")
    expect_raises(lambda: fn(torch.tensor([1.0, math.nan]), 64), ValueError, "nf4_quantize(x with a NaN)",
            "a ValueError that says x has a NaN", "check torch.isfinite(x).all() first")
    expect_raises(lambda: fn(torch.ones(8), 0), ValueError, "nf4_quantize(x, block_size=0)",
            "a ValueError naming block_size", "block_size must be a positive int")
    return f"{len(cases)} tensors (partial and all-zero blocks included), codes and absmax equal to bitsandbytes"


# --------------------------------------------------------------------------- exercise 5

def _bnb_llm_int8(x, w, threshold):
    bnb = quant.bitsandbytes_functional()
    ca, sca, cols = bnb.int8_vectorwise_quant(x.clone(), threshold=threshold)
    cb, scb, _ = bnb.int8_vectorwise_quant(w.clone())
    out = torch.ops.bitsandbytes.int8_mm_dequant.default(bnb.int8_linear_matmul(ca, cb), sca, scb,
                                                         dtype=torch.float32)
    if cols is not None and cols.numel():
        out = out + x[:, cols] @ (cb[:, cols].float() * scb[:, None] / 127).T
    return out, cols


@exercise
def llm_int8_matmul(fn):
    """``fn(x, w, threshold)`` → float32 ``x @ w.T`` by LLM.int8()'s decomposition, as
    bitsandbytes computes it."""
    g = _gen(5)
    x = torch.randn(24, 64, generator=g)
    x[:, [6, 33]] *= 14                     # two outlier features
    x[3, 10] = 6.0                          # exactly at the threshold: an outlier (|x| >= threshold)
    w = torch.randn(40, 64, generator=g) * 0.08
    exact = x @ w.T
    for thr in (6.0, 0.0, 20.0):
        call = f"llm_int8_matmul(x [24, 64], w [40, 64], threshold={thr})"
        got = fn(x.clone(), w.clone(), thr)
        expect_type(got, torch.Tensor, call)
        expect_dtype(got, torch.float32, call)
        expect_shape(got, (24, 40), call)
        ref, cols = _bnb_llm_int8(x, w, thr)
        ncols = 0 if cols is None else cols.numel()
        expect_close(got, ref, rtol=1e-4, atol=1e-4, what=f"{call} against bitsandbytes ({ncols} outlier columns)",
                     hint="outlier columns: any |x| >= threshold in the column; row absmax of x over the "
                          "entries below the threshold; zero the outlier columns' int8 codes; add "
                          "x[:, outliers] @ dequantized w[:, outliers].T in float")
    err_mixed = (fn(x.clone(), w.clone(), 6.0) - exact).abs().mean().item()
    err_plain = (fn(x.clone(), w.clone(), 0.0) - exact).abs().mean().item()
    expect_raises(lambda: fn(torch.ones(2, 3), torch.ones(4, 5), 6.0), ValueError,
            "llm_int8_matmul(x [2, 3], w [4, 5])", "a ValueError: 3 input features vs 5 weight columns",
            "check x.shape[1] == w.shape[1]")
    return (f"equal to bitsandbytes at thresholds 6, 0, 20; mean error {err_mixed:.4f} with the "
            f"decomposition vs {err_plain:.4f} without")


# --------------------------------------------------------------------------- exercise 6

@exercise
def gptq_quantize(fn):
    """``fn(w, h, bits)`` → the GPTQ-quantized weight (float32, dequantized)."""
    details = []
    for seed, bits, rows, cols in ((1, 4, 24, 48), (2, 3, 16, 64), (3, 2, 8, 32)):
        g = _gen(100 + seed)
        xin = torch.randn(1200, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
        h = 2 * xin.T @ xin
        w = torch.randn(rows, cols, generator=g)
        call = f"gptq_quantize(w [{rows}, {cols}], h, bits={bits})"
        got = fn(w.clone(), h.clone(), bits)
        expect_type(got, torch.Tensor, call)
        expect_dtype(got, torch.float32, call)
        expect_shape(got, w.shape, call)
        if not bool(torch.isfinite(got).all()):
            fail(f"{call} has NaN or inf", "finite values", describe(got),
                 "add damp · mean(diag H) to the diagonal before inverting")
        # every value on its row's grid (the RTN grid of the original row)
        maxq = 2 ** bits - 1
        lo = torch.clamp(w.amin(1, keepdim=True), max=0)
        hi = torch.clamp(w.amax(1, keepdim=True), min=0)
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / scale)
        k = torch.round(got / scale + zero)
        off = (got - scale * (k - zero)).abs() > 1e-4 * scale
        if off.any() or bool(((k < 0) | (k > maxq)).any()):
            fail(f"{call}: values off the {bits}-bit grid", f"each row on its own grid scale·(k - zero), "
                 f"k in 0..{maxq}, from the original row's min and max",
                 f"{int(off.sum())} values off the grid or outside it",
                 "compute scale and zero once per row from the original w, before any update")
        rtn = quant.rtn_quantize(w, bits)
        ref = quant.gptq_quantize(w, h, bits)
        e_got = quant.quantization_error(w, got, h)
        e_rtn = quant.quantization_error(w, rtn, h)
        e_ref = quant.quantization_error(w, ref, h)
        if e_got > 1.02 * e_ref:
            fail(f"{call}: the layer error tr(ΔW H ΔWᵀ) is too large",
                 f"about {e_ref:.4g} (GPTQ); round-to-nearest gives {e_rtn:.4g}",
                 f"{e_got:.4g}" + (" — no better than round-to-nearest" if e_got >= e_rtn else ""),
                 "after quantizing column i, subtract err = (w_i - q_i) / U[i, i] times row i of U "
                 "from the remaining columns, U = upper Cholesky factor of H⁻¹ (with damping)")
        agree = (got - ref).abs().le(1e-4 * scale).float().mean().item()
        if agree < 0.97:
            fail(f"{call}: only {agree:.1%} of the values agree with GPTQ's",
                 "at least 97% (a rounding tie may flip a few)", f"{agree:.1%}",
                 "process the columns in order 0, 1, …; quantize the updated column, not the original")
        details.append(f"{bits}-bit {e_got / e_rtn:.2f}× RTN's error")
    expect_raises(lambda: fn(torch.ones(3, 4), torch.eye(5), 4), ValueError,
            "gptq_quantize(w [3, 4], h [5, 5], 4)", "a ValueError: h must be [4, 4]",
            "check h.shape == (w.shape[1], w.shape[1])")
    return "; ".join(details)
