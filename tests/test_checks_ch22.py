"""The lab-22 checkers pass correct answers, refuse the library's own, and catch planted bugs.

The correct answers are the library's (utils.edge), accepted here only inside
``allow_library_answers``; each planted bug is a small function written here with one
mistake a learner is likely to make.
"""
import math

import numpy as np
import pytest

from utils import edge
from utils.checks import ExerciseFailed, LibraryAnswer, NotAttempted, allow_library_answers
from utils.checks import ch22 as check


# --------------------------------------------------------------------------- correct answers
def _blocks(x):
    if x.shape[-1] % 32:
        raise ValueError("last dimension not a multiple of 32")
    if not np.isfinite(x).all():
        raise ValueError("NaN")
    return x.reshape(-1, 32)


def q8(x, rounding="roundf", guard=True, check_nan=True):
    if check_nan:
        b = _blocks(x)
    else:
        if x.shape[-1] % 32:
            raise ValueError("shape")
        b = x.reshape(-1, 32)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d) if guard else np.float32(1) / d
        v = b * inv
        if rounding == "roundf":
            a = np.abs(v); f = np.floor(a)
            q = np.sign(v) * (f + np.floor(2 * (a - f)))
        else:
            q = np.round(v)
        q = np.nan_to_num(q).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // 32 * 34)


def q4(x, signed=True, interleave=False, rounding="trunc"):
    b = _blocks(x)
    if signed:
        m = np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)
    else:
        m = np.abs(b).max(axis=1, keepdims=True)
    d = m / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    v = b * inv + np.float32(8.5) if rounding == "trunc" else np.round(b * inv) + 8
    q = np.clip(np.trunc(v), 0, 15).astype(np.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)) if interleave else (q[:, :16] | (q[:, 16:] << 4))
    out = np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // 32 * 18)


def deq(data, fmt, minus8=True, interleave=False):
    nb = {"Q8_0": 34, "Q4_0": 18}
    if fmt not in nb:
        raise ValueError("fmt")
    if data.shape[-1] % nb[fmt]:
        raise ValueError("shape")
    b = data.reshape(-1, nb[fmt])
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    if fmt == "Q8_0":
        w = d * b[:, 2:].view(np.int8).astype(np.float32)
    else:
        qs = b[:, 2:]
        q = (np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 32) if interleave
             else np.concatenate([qs & 15, qs >> 4], axis=1)).astype(np.float32)
        w = d * (q - (8 if minus8 else 0))
    return w.reshape(*data.shape[:-1], data.shape[-1] // nb[fmt] * 32)


def packk(d, dmin, scales, mins, q, high_bits="right", swap_nibbles=False):
    if not (math.isfinite(d) and math.isfinite(dmin)):
        raise ValueError("d")
    sc, mn, qq = (np.asarray(a) for a in (scales, mins, q))
    if sc.max() > 63 or mn.max() > 63 or qq.max() > 15:
        raise ValueError("range")
    sc, mn, qq = sc.astype(np.uint8), mn.astype(np.uint8), qq.astype(np.uint8)
    s = np.zeros(12, np.uint8)
    for j in range(4):
        if high_bits == "right":
            s[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
            s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6)
        else:                                           # sub-blocks 4-7 lose their top bits
            s[j] = sc[j]
            s[j + 4] = mn[j]
        s[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4)
    qs = qq.reshape(4, 2, 32)
    codes = ((qs[:, 1] | (qs[:, 0] << 4)) if swap_nibbles else (qs[:, 0] | (qs[:, 1] << 4))).reshape(-1)
    return np.concatenate([np.array([d, dmin], np.float16).view(np.uint8), s, codes])


def decode(bw, n, bpw, w, bytes_fix=True, energy_fix=True):
    for v in (bw, n, bpw, w):
        if not math.isfinite(v) or v <= 0:
            raise ValueError("bad argument")
    tps = bw / (n * bpw / 8) if bytes_fix else bw / (n * bpw)
    return tps, (w / tps if energy_fix else w * tps)


def choose(bw, w, models, formats, min_tps, max_j, prefer="big", energy=True, tie="first"):
    best, key = None, None
    for name, n in models:
        for fmt, bpw in formats:
            tps, j = decode(bw, n, bpw, w)
            if tps >= min_tps and (j <= max_j or not energy):
                k = (n, bpw) if prefer == "big" else (-n, bpw)
                better = key is None or (k > key if tie == "first" else k >= key)
                if better:
                    best, key = (name, fmt), k
    return best


RIGHT = [
    (check.q8_0_quantize, q8),
    (check.q4_0_quantize, q4),
    (check.gguf_dequantize, deq),
    (check.pack_q4_k, packk),
    (check.edge_decode, decode),
    (check.choose_config, choose),
]


@pytest.mark.parametrize("checker, answer", RIGHT, ids=[c.__name__ for c, _ in RIGHT])
def test_right_answers_pass(checker, answer, capsys):
    checker(answer)
    assert capsys.readouterr().out.startswith(f"✔ {checker.__name__}: passed")


def test_library_versions_pass_when_allowed(capsys):
    with allow_library_answers():
        check.q8_0_quantize(lambda x: edge.quantize(x, "Q8_0"))
        check.q4_0_quantize(lambda x: edge.quantize(x, "Q4_0"))
        check.gguf_dequantize(edge.dequantize)
        check.pack_q4_k(edge.pack_q4_k)
    assert capsys.readouterr().out.count("passed") == 4


REFUSED = [
    (check.q8_0_quantize, edge.quantize),
    (check.q4_0_quantize, edge.quantize),
    (check.gguf_dequantize, edge.dequantize),
    (check.pack_q4_k, edge.pack_q4_k),
    (check.edge_decode, edge.decode_tokens_per_s),
    (check.choose_config, edge.joules_per_token),
]


@pytest.mark.parametrize("checker, answer", REFUSED, ids=[c.__name__ for c, _ in REFUSED])
def test_library_answers_refused(checker, answer):
    with pytest.raises(LibraryAnswer):
        checker(answer)


def _stub(*args, **kwargs):
    raise NotImplementedError


@pytest.mark.parametrize("checker", [c for c, _ in RIGHT], ids=[c.__name__ for c, _ in RIGHT])
def test_stubs_are_not_attempted(checker):
    with pytest.raises(NotAttempted):
        checker(_stub)


BUGS = [
    (check.q8_0_quantize, lambda x: q8(x, rounding="even"), "ties rounded to even"),
    (check.q8_0_quantize, lambda x: q8(x, check_nan=False), "NaN accepted"),
    (check.q4_0_quantize, lambda x: q4(x, signed=False), "scale from |max|, sign lost"),
    (check.q4_0_quantize, lambda x: q4(x, interleave=True), "nibbles interleaved"),
    (check.q4_0_quantize, lambda x: q4(x, rounding="round"), "round instead of ggml's truncation"),
    (check.gguf_dequantize, lambda d, f: deq(d, f, minus8=False), "Q4_0 codes not offset by 8"),
    (check.gguf_dequantize, lambda d, f: deq(d, f, interleave=True), "Q4_0 nibbles interleaved"),
    (check.pack_q4_k, lambda *a: packk(*a, high_bits="lost"), "6-bit scales of sub-blocks 4-7 truncated"),
    (check.pack_q4_k, lambda *a: packk(*a, swap_nibbles=True), "sub-block nibbles swapped"),
    (check.edge_decode, lambda *a: decode(*a, bytes_fix=False), "bits taken as bytes"),
    (check.edge_decode, lambda *a: decode(*a, energy_fix=False), "J/token = W * tokens/s"),
    (check.choose_config, lambda *a: choose(*a, prefer="small"), "prefers the smallest model"),
    (check.choose_config, lambda *a: choose(*a, energy=False), "ignores the energy budget"),
    (check.choose_config, lambda *a: choose(*a, tie="last"), "ties go to the later format"),
]


@pytest.mark.parametrize("checker, answer, bug", BUGS, ids=[b for _, _, b in BUGS])
def test_planted_bugs_are_caught(checker, answer, bug):
    with pytest.raises(ExerciseFailed):
        checker(answer)
