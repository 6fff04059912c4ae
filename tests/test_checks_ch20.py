"""The lab-20 checkers pass correct answers, refuse the library's own, and catch planted bugs.

The correct answers are the library's (utils.quant), accepted here only inside
``allow_library_answers``; each planted bug is a small function written here with one
mistake a learner is likely to make.
"""
import math

import pytest
import torch

from utils import quant as Q
from utils.checks import ExerciseFailed, LibraryAnswer, NotAttempted, allow_library_answers
from utils.checks import ch20 as check

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


RIGHT = [
    (check.int8_quantize, Q.int8_quantize),
    (check.fp8_round, Q.fp8_round),
    (check.nf4_codebook, Q.nf4_codebook),
    (check.nf4_quantize, Q.nf4_quantize),
    (check.llm_int8_matmul, Q.llm_int8_matmul),
    (check.gptq_quantize, Q.gptq_quantize),
]


@pytest.mark.parametrize("checker, answer", RIGHT, ids=[c.__name__ for c, _ in RIGHT])
def test_right_answers_pass(checker, answer, capsys):
    with allow_library_answers():
        checker(answer)
    assert capsys.readouterr().out.startswith(f"✔ {checker.__name__}: passed")


@pytest.mark.parametrize("checker, answer", RIGHT, ids=[c.__name__ for c, _ in RIGHT])
def test_library_reference_is_refused(checker, answer):
    with pytest.raises(LibraryAnswer):
        checker(answer)


def test_a_wrapper_calling_the_library_is_refused():
    def fp8_round(x, fmt):
        return Q.fp8_round(x, fmt)

    with pytest.raises(LibraryAnswer):
        check.fp8_round(fp8_round)


@pytest.mark.parametrize("checker", [c for c, _ in RIGHT], ids=[c.__name__ for c, _ in RIGHT])
def test_stub_is_not_attempted(checker):
    def stub(*args, **kwargs):
        raise NotImplementedError("exercise: fill me in")

    with pytest.raises(NotAttempted):
        checker(stub)


# --------------------------------------------------------------------------- exercise 1

def _int8(x, dim, symmetric, *, divisor=127.0, round_fn=torch.round, eps=True, qmin=-128,
          zp_round=torch.round, check_nan=True):
    if check_nan and not torch.isfinite(x).all():
        raise ValueError("x has NaN or inf")
    if dim is not None and not -x.dim() <= dim < x.dim():
        raise ValueError("dim out of range")
    other = [d for d in range(x.dim()) if dim is None or d != dim % x.dim()]
    lo, hi = x.amin(dim=other), x.amax(dim=other)
    tiny = torch.finfo(torch.float32).eps if eps else 0.0
    shape = [1] * x.dim()
    if dim is not None:
        shape[dim % x.dim()] = x.shape[dim]
    if symmetric:
        s = torch.clamp(torch.maximum(-lo, hi) / divisor, min=tiny)
        z = torch.zeros_like(s, dtype=torch.int64)
    else:
        lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
        s = torch.clamp((hi - lo) / 255, min=tiny)
        z = torch.clamp(qmin - zp_round(lo / s).long(), -128, 127)
    q = torch.clamp(round_fn(x / s.reshape(shape)) + z.reshape(shape), -128, 127).to(torch.int8)
    return q, s, z


def int8_ok(x, dim, symmetric):
    return _int8(x, dim, symmetric)


def int8_divides_by_128(x, dim, symmetric):
    return _int8(x, dim, symmetric, divisor=128.0)


def int8_rounds_half_up(x, dim, symmetric):
    return _int8(x, dim, symmetric, round_fn=lambda v: torch.floor(v + 0.5))


def int8_truncates(x, dim, symmetric):
    return _int8(x, dim, symmetric, round_fn=torch.trunc)


def int8_uint8_zero_point(x, dim, symmetric):
    return _int8(x, dim, symmetric, qmin=0)


def int8_no_nan_check(x, dim, symmetric):
    return _int8(x, dim, symmetric, check_nan=False)


def int8_range_not_widened(x, dim, symmetric):
    if symmetric:
        return _int8(x, dim, symmetric)
    other = [d for d in range(x.dim()) if dim is None or d != dim % x.dim()]
    lo, hi = x.amin(dim=other), x.amax(dim=other)
    s = torch.clamp((hi - lo) / 255, min=torch.finfo(torch.float32).eps)
    z = torch.clamp(-128 - torch.round(lo / s).long(), -128, 127)
    shape = [1] * x.dim()
    if dim is not None:
        shape[dim % x.dim()] = x.shape[dim]
    q = torch.clamp(torch.round(x / s.reshape(shape)) + z.reshape(shape), -128, 127).to(torch.int8)
    return q, s, z


def int8_zero_channel_nan(x, dim, symmetric):
    return _int8(x, dim, symmetric, eps=False)


def test_int8_planted_reference_passes(capsys):
    check.int8_quantize(int8_ok)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize("fn, match", [
    (int8_divides_by_128, "scale"),
    (int8_rounds_half_up, "q"),
    (int8_truncates, "q"),
    (int8_uint8_zero_point, "zero_point"),
    (int8_no_nan_check, "NaN"),
    (int8_range_not_widened, "scale|zero_point"),
    (int8_zero_channel_nan, "scale|NaN|raised"),
])
def test_int8_mistakes_fail(fn, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.int8_quantize(fn)


# --------------------------------------------------------------------------- exercise 2

FP8 = {"e4m3": (3, 7, 448.0, False), "e5m2": (2, 15, 57344.0, True)}


def _fp8(x, fmt, *, ties_even=True, subnormals=True, saturate_inf=True, overflow_inf=True,
         keep_neg_zero=True):
    if fmt not in FP8:
        raise ValueError(f"unknown format {fmt}")
    M, bias, fmax, has_inf = FP8[fmt]
    a = x.double().abs()
    _, e = torch.frexp(torch.where(a > 0, a, torch.ones_like(a)))
    e = e.double() - 1
    if subnormals:
        e = torch.clamp(e, min=1 - bias)
    step = torch.pow(2.0, e - M)
    v = torch.where(torch.isfinite(a), a, torch.zeros_like(a)) / step
    r = (torch.round(v) if ties_even else torch.floor(v + 0.5)) * step
    if has_inf:
        r = torch.where(r > fmax, math.inf if overflow_inf else fmax, r)
        r = torch.where(torch.isinf(a), math.inf, r)
    else:
        r = torch.where(r > fmax, fmax, r)
        r = torch.where(torch.isinf(a), fmax if saturate_inf else math.nan, r)
    r = torch.where(torch.isnan(a), math.nan, r)
    out = torch.copysign(r, x.double()) if keep_neg_zero else torch.where(r == 0, 0.0, r * torch.sign(x.double()))
    return out.float()


def fp8_ok(x, fmt):
    return _fp8(x, fmt)


def fp8_ties_away(x, fmt):
    return _fp8(x, fmt, ties_even=False)


def fp8_flush_subnormals(x, fmt):
    return _fp8(x, fmt, subnormals=False)


def fp8_inf_to_nan(x, fmt):
    return _fp8(x, fmt, saturate_inf=False)


def fp8_e5m2_saturates(x, fmt):
    return _fp8(x, fmt, overflow_inf=False)


def fp8_loses_negative_zero(x, fmt):
    return _fp8(x, fmt, keep_neg_zero=False)


def fp8_float64(x, fmt):
    return _fp8(x, fmt).double()


def test_fp8_planted_reference_passes(capsys):
    check.fp8_round(fp8_ok)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize("fn, match", [
    (fp8_ties_away, "differs"),
    (fp8_flush_subnormals, "subnormal"),
    (fp8_inf_to_nan, "infinity"),
    (fp8_e5m2_saturates, "e5m2"),
    (fp8_loses_negative_zero, "differs"),
    (fp8_float64, "dtype"),
])
def test_fp8_mistakes_fail(fn, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.fp8_round(fn)


# --------------------------------------------------------------------------- exercises 3 and 4

def _codebook(numpy_linspace=False, offset=0.9677083, normalize=True):
    import numpy as np
    from scipy.stats import norm

    lin = (lambda a, b, n: np.linspace(a, b, n)) if numpy_linspace else \
        (lambda a, b, n: torch.linspace(a, b, n).numpy())
    pos = norm.ppf(lin(offset, 0.5, 9)[:-1]).tolist()
    neg = (-norm.ppf(lin(offset, 0.5, 8)[:-1])).tolist()
    v = torch.tensor(sorted(pos + [0.0] + neg), dtype=torch.float64)
    return (v / v.max() if normalize else v).float()


def codebook_ok():
    return _codebook()


def codebook_unnormalized():
    return _codebook(normalize=False)


def codebook_wrong_offset():
    return _codebook(offset=0.99)


def codebook_symmetric_no_zero():
    from scipy.stats import norm

    p = torch.linspace(0.02, 0.98, 16).numpy()
    v = torch.tensor(norm.ppf(p), dtype=torch.float64)
    return (v / v.abs().max()).float()


def test_codebook_numpy_linspace_passes_within_tolerance(capsys):
    def nf4_codebook():
        return _codebook(numpy_linspace=True)       # float64 probabilities: 1-ulp differences

    check.nf4_codebook(nf4_codebook)
    assert "within 2e-7" in capsys.readouterr().out


def test_codebook_right_says_bit_for_bit(capsys):
    check.nf4_codebook(codebook_ok)
    assert "bit for bit" in capsys.readouterr().out


@pytest.mark.parametrize("fn, match", [(codebook_unnormalized, "bitsandbytes"),
                                       (codebook_wrong_offset, "bitsandbytes"),
                                       (codebook_symmetric_no_zero, r"\[7\]")])
def test_codebook_mistakes_fail(fn, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.nf4_codebook(fn)


def _nf4(x, block_size, *, divide=False, ties_up=False, drop_tail=False, no_clamp_zero=False):
    if not torch.isfinite(x).all():
        raise ValueError("x has NaN")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError("block_size must be positive")
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = n // block_size if drop_tail else -(-n // block_size)
    pad = nb * block_size - n
    blocks = (torch.cat([flat, flat.new_zeros(pad)]) if pad >= 0 else flat[: nb * block_size]).reshape(nb, block_size)
    absmax = blocks.abs().amax(1)
    am = absmax if no_clamp_zero else absmax.clamp(min=1e-38)
    scaled = (blocks / am[:, None]) if divide else (blocks * (1.0 / am)[:, None])
    scaled = torch.clamp(scaled, -1, 1).reshape(-1)[:n]
    code = _codebook()
    bounds = (code[:-1] + code[1:]) / 2
    codes = torch.bucketize(scaled, bounds, right=ties_up)
    if no_clamp_zero:
        codes = torch.where(torch.isnan(scaled), 0, codes)
    return codes.to(torch.uint8), absmax


def nf4_ok(x, block_size):
    return _nf4(x, block_size)


def nf4_drops_tail(x, block_size):
    return _nf4(x, block_size, drop_tail=True)


def nf4_zero_block_nan(x, block_size):
    return _nf4(x, block_size, no_clamp_zero=True)


def nf4_per_tensor_absmax(x, block_size):
    codes, absmax = _nf4(x, x.numel())
    return codes, absmax.expand(-(-x.numel() // block_size)).clone()


def nf4_int64_codes(x, block_size):
    codes, absmax = _nf4(x, block_size)
    return codes.long(), absmax


def nf4_nearest_by_argmin_on_wrong_codebook(x, block_size):
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // block_size)
    blocks = torch.cat([flat, flat.new_zeros(nb * block_size - n)]).reshape(nb, block_size)
    absmax = blocks.abs().amax(1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)[:n]
    code = torch.linspace(-1, 1, 16)                      # uniform INT4-like levels, not NF4
    codes = (scaled[:, None] - code[None, :]).abs().argmin(1)
    if not torch.isfinite(x).all():
        raise ValueError("NaN")
    return codes.to(torch.uint8), absmax


def test_nf4_planted_reference_passes(capsys):
    check.nf4_quantize(nf4_ok)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize("fn, match", [
    (nf4_drops_tail, "absmax"),
    (nf4_zero_block_nan, "codes differ"),
    (nf4_per_tensor_absmax, "absmax"),
    (nf4_int64_codes, "dtype"),
    (nf4_nearest_by_argmin_on_wrong_codebook, "codes differ"),
])
def test_nf4_mistakes_fail(fn, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.nf4_quantize(fn)


# --------------------------------------------------------------------------- exercise 5

def _int8mm(x, w, threshold, *, decompose=True, strict=False, zero_cols_first=False,
            keep_outlier_codes=False, per_tensor=False):
    if x.shape[1] != w.shape[1]:
        raise ValueError("x and w disagree on the number of input features")
    xf, wf = x.float(), w.float()
    if threshold > 0 and decompose:
        out_mask = (xf.abs() > threshold) if strict else (xf.abs() >= threshold)
    else:
        out_mask = torch.zeros_like(xf, dtype=torch.bool)
    cols = out_mask.any(0)
    x_in = torch.where(out_mask, 0.0, xf)
    if zero_cols_first:
        x_in[:, cols] = 0
    sx = x_in.abs().amax() .expand(x.shape[0]) if per_tensor else x_in.abs().amax(1)
    qx = torch.round(x_in * (127 / sx.clamp(min=1e-30))[:, None])
    if not keep_outlier_codes:
        qx[:, cols] = 0
    sw = wf.abs().amax(1)
    qw = torch.round(wf * (127 / sw)[:, None])
    out = (qx @ qw.T) * (sx[:, None] * sw[None, :]) / 127 ** 2
    if cols.any():
        out = out + xf[:, cols] @ (qw[:, cols] * sw[:, None] / 127).T
    return out


def int8mm_ok(x, w, threshold):
    return _int8mm(x, w, threshold)


def int8mm_no_decomposition(x, w, threshold):
    return _int8mm(x, w, threshold, decompose=False)


def int8mm_strict_threshold(x, w, threshold):
    return _int8mm(x, w, threshold, strict=True)


def int8mm_counts_outliers_twice(x, w, threshold):
    return _int8mm(x, w, threshold, keep_outlier_codes=True)


def int8mm_per_tensor_scale(x, w, threshold):
    return _int8mm(x, w, threshold, per_tensor=True)


def int8mm_fp32_weights_for_outliers(x, w, threshold):
    out = _int8mm(x, w, threshold)
    cols = (x.abs() >= threshold).any(0) if threshold > 0 else torch.zeros(x.shape[1], dtype=torch.bool)
    if cols.any():
        sw = w.abs().amax(1)
        w_hat = torch.round(w * (127 / sw)[:, None]) * sw[:, None] / 127
        out = out - x[:, cols] @ w_hat[:, cols].T + x[:, cols] @ w[:, cols].T
    return out


def test_int8mm_planted_reference_passes(capsys):
    check.llm_int8_matmul(int8mm_ok)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize("fn", [int8mm_no_decomposition, int8mm_strict_threshold,
                                int8mm_counts_outliers_twice, int8mm_per_tensor_scale,
                                int8mm_fp32_weights_for_outliers])
def test_int8mm_mistakes_fail(fn):
    with pytest.raises(ExerciseFailed, match="bitsandbytes"):
        check.llm_int8_matmul(fn)


# --------------------------------------------------------------------------- exercise 6

def _gptq(w, h, bits, *, update=True, grid_from_updated=False, no_damp=False, reverse=False,
          use_hinv_diag=False):
    if h.shape != (w.shape[1], w.shape[1]):
        raise ValueError("h must be [in, in]")
    W, H = w.double().clone(), h.double().clone()
    cols = W.shape[1]
    maxq = 2 ** bits - 1

    def params(M):
        lo = torch.clamp(M.amin(1, keepdim=True), max=0)
        hi = torch.clamp(M.amax(1, keepdim=True), min=0)
        s = (hi - lo) / maxq
        return s, torch.round(-lo / s)

    s, z = params(W)
    if not no_damp:
        H += 0.01 * H.diag().mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    U = torch.linalg.cholesky(Hinv, upper=True)
    Q = torch.zeros_like(W)
    order = range(cols - 1, -1, -1) if reverse else range(cols)
    for i in order:
        if grid_from_updated:
            s, z = params(W[:, i:])
        q = s[:, 0] * (torch.clamp(torch.round(W[:, i] / s[:, 0]) + z[:, 0], 0, maxq) - z[:, 0])
        Q[:, i] = q
        if update:
            d = Hinv[i, i] if use_hinv_diag else U[i, i]
            err = (W[:, i] - q) / d
            row = Hinv[i, i:] if use_hinv_diag else U[i, i:]
            W[:, i:] -= err[:, None] * row[None, :]
    return Q.float()


def gptq_ok(w, h, bits):
    return _gptq(w, h, bits)


def gptq_no_update(w, h, bits):          # plain round-to-nearest
    return _gptq(w, h, bits, update=False)


def gptq_reverse_order(w, h, bits):
    return _gptq(w, h, bits, reverse=True)


def gptq_grid_from_updated_weights(w, h, bits):
    return _gptq(w, h, bits, grid_from_updated=True)


def gptq_uses_hinv_not_cholesky(w, h, bits):
    return _gptq(w, h, bits, use_hinv_diag=True)


def test_gptq_planted_reference_passes(capsys):
    check.gptq_quantize(gptq_ok)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize("fn, match", [
    (gptq_no_update, "too large"),
    (gptq_reverse_order, "too large|agree"),
    (gptq_grid_from_updated_weights, "grid"),
    (gptq_uses_hinv_not_cholesky, "too large|agree"),
])
def test_gptq_mistakes_fail(fn, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.gptq_quantize(fn)


def test_checker_messages_name_the_call():
    with pytest.raises(ExerciseFailed) as info:
        check.fp8_round(fp8_flush_subnormals)
    text = str(info.value)
    assert "fp8_round" in text and "expected" in text and "hint" in text


def test_a_stub_left_in_an_earlier_exercise_is_named():
    def nf4_codebook():
        raise NotImplementedError("exercise nf4_codebook: replace this line with your code")

    def nf4_quantize(x, block_size):
        code = nf4_codebook()
        return code, code

    with pytest.raises(NotAttempted, match="nf4_codebook"):
        check.nf4_quantize(nf4_quantize)
