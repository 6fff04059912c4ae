"""Checkers for lab 22, Edge inference at 5-15 W.

The oracle for the block formats is llama.cpp's own Python package, ``gguf``:
``gguf.quants.quantize`` (byte for byte, Q8_0 and Q4_0) and ``gguf.quants.dequantize``
(Q8_0, Q4_0, and the learner's hand-packed Q4_K super-block, decoded to the values the
learner meant). The power model is checked against the formulas computed here.
"""
from __future__ import annotations

import math

import numpy as np

from . import exercise, expect_close, expect_equal, expect_raises, expect_type, fail


def _gguf():
    import gguf
    return gguf


def _inputs(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((6, 128)) * rng.uniform(1e-3, 20, (6, 1))).astype(np.float32)
    a[2, :32] = 0.0                                           # an all-zero block
    a[3, 32:64] = (np.arange(32, dtype=np.float32) - 16) / 4  # exact halves: rounding ties
    a[4, 64:96] = -a[4, 64:96]
    b = rng.standard_normal((2, 3, 64)).astype(np.float32)    # more than two dimensions
    c = np.full((1, 32), 3.0, np.float32)                     # a constant block
    d = (rng.integers(-8, 8, (4, 32)) * 0.25).astype(np.float32)  # values on a grid
    e = np.concatenate([[127.0, -127.0], np.arange(30) - 14.5]).astype(np.float32)[None]  # Q8_0 ties
    f = np.concatenate([[-8.0], np.arange(31) / 2 - 7.25]).astype(np.float32)[None]       # Q4_0 d = 1
    return [a, b, c, d, e, f]


def _quantize_check(fn, fmt: str) -> str:
    gguf = _gguf()
    qtype = getattr(gguf.GGMLQuantizationType, fmt)
    n = 0
    for x in _inputs(22):
        call = f"{fmt.lower()}_quantize(x of shape {x.shape})"
        got = fn(x.copy())
        want = gguf.quants.quantize(x, qtype)
        expect_type(got, np.ndarray, call, hint="return a NumPy uint8 array")
        if got.dtype != np.uint8 or got.shape != want.shape:
            fail(f"{call}: wrong dtype or shape", f"uint8 {want.shape}", f"{got.dtype} {got.shape}",
                 "each block of 32 weights becomes its own bytes, one row per row of x")
        if not np.array_equal(got, want):
            bad = np.argwhere(got != want)[0]
            blk = bad[-1] // (want.shape[-1] // (x.shape[-1] // 32))
            fail(f"{call}: bytes differ from gguf.quants.quantize",
                 f"byte {tuple(bad)} = {want[tuple(bad)]}", f"{got[tuple(bad)]}",
                 f"block {blk} of that row; bytes 0-1 are the float16 scale, then the codes. "
                 "Compute in float32 as ggml does, and mind how ties round")
        n += 1
    expect_raises(lambda: fn(np.array([[1.0, np.nan] + [0.0] * 30], np.float32)), ValueError,
                  f"{fmt.lower()}_quantize(x with a NaN)", "a ValueError naming the NaN")
    expect_raises(lambda: fn(np.ones((2, 48), np.float32)), ValueError,
                  f"{fmt.lower()}_quantize(x of shape (2, 48))",
                  "a ValueError: 48 is not a multiple of the block size 32")
    return f"{n} arrays, byte-identical to gguf.quants.quantize(x, {fmt}); NaN and bad shapes refused"


@exercise
def q8_0_quantize(fn):
    """``fn(x float32 [..., 32k])`` -> ``uint8 [..., 34k]``, Q8_0 blocks."""
    return _quantize_check(fn, "Q8_0")


@exercise
def q4_0_quantize(fn):
    """``fn(x float32 [..., 32k])`` -> ``uint8 [..., 18k]``, Q4_0 blocks."""
    return _quantize_check(fn, "Q4_0")


@exercise
def gguf_dequantize(fn):
    """``fn(data uint8, fmt)`` for "Q8_0"/"Q4_0" -> float32, equal to gguf.quants.dequantize."""
    gguf = _gguf()
    n = 0
    for fmt in ("Q8_0", "Q4_0"):
        qtype = getattr(gguf.GGMLQuantizationType, fmt)
        for x in _inputs(7):
            data = gguf.quants.quantize(x, qtype)
            call = f"gguf_dequantize(data of shape {data.shape}, {fmt!r})"
            got = fn(data.copy(), fmt)
            want = gguf.quants.dequantize(data, qtype).astype(np.float32)
            expect_type(got, np.ndarray, call)
            expect_equal(got, want, call, hint="value = float16 scale (as float32) times the code "
                         "(Q4_0: the nibble minus 8; low nibbles are weights 0-15 of the block)")
            n += 1
    expect_raises(lambda: fn(np.zeros((1, 34), np.uint8), "Q5_9"), ValueError,
                  "gguf_dequantize(data, 'Q5_9')", "a ValueError: unknown format")
    expect_raises(lambda: fn(np.zeros((1, 35), np.uint8), "Q8_0"), ValueError,
                  "gguf_dequantize(data with 35 bytes per row, 'Q8_0')",
                  "a ValueError: 35 is not a multiple of Q8_0's 34 bytes per block")
    return f"{n} arrays decoded exactly as gguf.quants.dequantize; unknown format refused"


@exercise
def pack_q4_k(fn):
    """``fn(d, dmin, scales[8], mins[8], q[256])`` -> 144 uint8 bytes of one Q4_K super-block."""
    gguf = _gguf()
    rng = np.random.default_rng(4)
    cases = [(0.0123, 0.0041, rng.integers(0, 64, 8), rng.integers(0, 64, 8), rng.integers(0, 16, 256))
             for _ in range(4)]
    cases.append((1.0, 0.5, np.full(8, 63), np.full(8, 63), np.full(256, 15)))          # all bits set
    cases.append((0.25, 0.125, np.arange(8) * 9, 63 - np.arange(8) * 9, np.arange(256) % 16))
    for d, dmin, sc, mn, q in cases:
        call = f"pack_q4_k(d={d}, dmin={dmin}, scales={sc.tolist()}, mins={mn.tolist()}, q=...)"
        got = fn(d, dmin, sc.copy(), mn.copy(), q.copy())
        expect_type(got, np.ndarray, call)
        if got.dtype != np.uint8 or got.shape != (144,):
            fail(f"{call}: wrong dtype or shape", "uint8 (144,)", f"{got.dtype} {got.shape}",
                 "2 + 2 + 12 + 128 bytes")
        d16, m16 = np.float32(np.float16(d)), np.float32(np.float16(dmin))
        want = ((d16 * sc.astype(np.float32))[:, None] * q.reshape(8, 32).astype(np.float32)
                - (m16 * mn.astype(np.float32))[:, None]).reshape(-1)
        decoded = gguf.quants.dequantize(got.reshape(1, 144), gguf.GGMLQuantizationType.Q4_K).reshape(-1)
        if not np.array_equal(decoded, want):
            i = int(np.argwhere(decoded != want)[0, 0])
            j = i // 32
            fail(f"{call}: gguf decodes your block to other values",
                 f"weight {i} (sub-block {j}) = d*scales[{j}]*q[{i}] - dmin*mins[{j}] = {want[i]}",
                 f"{decoded[i]}",
                 "check the 12 scale bytes (6-bit scales and mins; sub-blocks 4-7 split their "
                 "bits) and which nibble holds which weight")
    expect_raises(lambda: fn(0.1, 0.1, np.full(8, 64), np.zeros(8, int), np.zeros(256, int)), ValueError,
                  "pack_q4_k(scales with a 64)", "a ValueError: a scale must fit 6 bits, 0..63")
    expect_raises(lambda: fn(math.nan, 0.1, np.zeros(8, int), np.zeros(8, int), np.zeros(256, int)),
                  ValueError, "pack_q4_k(d=nan)", "a ValueError naming d")
    return f"{len(cases)} super-blocks decoded by gguf.quants.dequantize to your values; 4.5 bits/weight"


@exercise
def edge_decode(fn):
    """``fn(bandwidth B/s, n_params, bits_per_weight, watts)`` -> ``(tokens_per_s, joules_per_token)``."""
    cases = [(204.8e9, 8_000_000_000, 4.5, 60.0), (102e9, 1_000_000_000, 8.5, 7.0),
             (102.4e9, 3_000_000_000, 16.0, 25.0), (68e9, 798_848, 32.0, 15.0)]
    for bw, n, bpw, w in cases:
        call = f"edge_decode({bw:g}, {n}, {bpw}, {w})"
        got = fn(bw, n, bpw, w)
        expect_type(got, tuple, call, hint="return (tokens_per_s, joules_per_token)")
        tps = bw / (n * bpw / 8)
        expect_close(got, (tps, w / tps), rtol=1e-9, atol=0, what=call,
                     hint="bytes per token = every weight once: n_params * bits / 8; "
                          "tokens/s = bandwidth / bytes; J/token = W / (tokens/s)")
    for bad, name in (((-1.0, 10, 4.5, 5.0), "bandwidth"), ((1e9, 0, 4.5, 5.0), "n_params"),
                      ((1e9, 10, math.nan, 5.0), "bits_per_weight"), ((1e9, 10, 4.5, 0.0), "watts")):
        expect_raises(lambda bad=bad: fn(*bad), ValueError, f"edge_decode{bad}", f"a ValueError naming {name}")
    return f"{len(cases)} cases of the bandwidth bound and the energy per token"


def _choose_oracle(bandwidth, watts, models, formats, min_tps, max_jpt):
    best = None
    for name, n in models:
        for fmt, bpw in formats:
            tps = bandwidth / (n * bpw / 8)
            if tps >= min_tps and watts / tps <= max_jpt:
                key = (n, bpw)
                if best is None or key > best[0]:
                    best = (key, (name, fmt))
    return None if best is None else best[1]


@exercise
def choose_config(fn):
    """``fn(bandwidth, watts, models, formats, min_tokens_per_s, max_joules_per_token)``
    -> ``(model_name, format_name)`` or ``None``."""
    models = [("1B", 10 ** 9), ("3B", 3 * 10 ** 9), ("8B", 8 * 10 ** 9)]
    formats = [("Q4_0", 4.5), ("Q4_K", 4.5), ("Q6_K", 6.5625), ("Q8_0", 8.5), ("F16", 16.0)]
    cases = [(102e9, 7.0, 20.0, 0.5), (102e9, 25.0, 10.0, 2.0), (204.8e9, 60.0, 20.0, 3.0),
             (204.8e9, 15.0, 5.0, 1.0), (102.4e9, 10.0, 200.0, 1.0), (68e9, 15.0, 15.0, 0.05),
             (102e9, 15.0, 40.0, 0.5), (102e9, 7.0, 100.0, 1.0), (204.8e9, 60.0, 5.0, 0.5)]
    for bw, w, tps, jpt in cases:
        call = f"choose_config({bw:g}, {w}, models, formats, {tps}, {jpt})"
        got = fn(bw, w, list(models), list(formats), tps, jpt)
        want = _choose_oracle(bw, w, models, formats, tps, jpt)
        if want is not None:
            got = tuple(got) if isinstance(got, list) else got
        expect_equal(got, want, call,
                     hint="keep the pairs with tokens/s >= the target and J/token <= the budget; "
                          "prefer more parameters, then more bits per weight; None when nothing fits")
    return f"{len(cases)} budgets: the largest model, then the most precise format, that meets both targets"
