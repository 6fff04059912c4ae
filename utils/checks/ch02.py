"""Checkers for lab 02, HBM vs GDDR6X.

Oracles: the datasheet bandwidths in ``utils.hardware`` and the published per-stack
figures of the standards (a learner's calculator must reproduce them within the
published rounding); the technology limits in ``utils.memtech`` for the pin rates a
datasheet implies; STREAM's own kernels and byte counts (McCalpin, stream.c) computed
here on copies; ``utils.bench.stream_bandwidth`` for the measured bandwidth, whose
disagreements are warnings, never failures.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import bench, hardware, memtech
from . import (describe, exercise, expect_close, expect_equal, expect_raises, expect_type, fail,
               measurement_warning)

_BAD_NUMBERS = [0, -1.0, float("nan"), float("inf")]


def _number(x, what):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        fail(f"{what} is not a number", "a float", describe(x), "return a plain number")
    return float(x)


def _bad_input(fn, names):
    """``fn`` must reject a zero, negative, NaN or infinite value, and a string, per argument."""
    good = {"pin_rate": 16e9, "bus_width": 256, "bandwidth": 1e12, "n_params": 7e9,
            "bytes_per_param": 2}
    for i, name in enumerate(names):
        for bad in _BAD_NUMBERS:
            args = [good[n] for n in names]
            args[i] = bad
            expect_raises(lambda: fn(*args), ValueError, f"{fn.__name__}({', '.join(map(repr, args))})",
                    f"a ValueError naming {name}", f"check {name} is finite and positive")
        args = [good[n] for n in names]
        args[i] = "16"
        expect_raises(lambda: fn(*args), TypeError, f"{fn.__name__} with {name}='16' (a string)",
                f"a TypeError naming {name}", "check the type before doing arithmetic")


# --------------------------------------------------------------------------- exercise 1

@exercise
def interface_bandwidth(fn):
    """``fn(pin_rate, bus_width) -> B/s`` against the standards and the datasheets."""
    for rate, width in [(21e9, 384), (6.4e9, 1024), (2e9, 1024), (8.533e9, 64), (1, 8)]:
        got = _number(fn(rate, width), f"interface_bandwidth({rate:g}, {width})")
        expect_close(got, rate * width / 8, rtol=1e-12, what=f"interface_bandwidth({rate:g}, {width})",
                     hint="bits per second per pin times pins gives bits per second; a byte is 8 bits")
    rows = []
    for name, t in memtech.TECHNOLOGIES.items():
        got = fn(t.pin_rate, t.unit_width)
        expect_close(got, t.pin_rate * t.unit_width / 8, rtol=1e-12,
                     what=f"one {t.unit} of {name} ({t.pin_rate / 1e9:g} Gb/s x {t.unit_width} bits)")
    for name, m in memtech.GPU_MEMORY.items():
        if m.pin_rate is None:
            continue
        got = fn(m.pin_rate, m.bus_width)
        sheet = m.bandwidth
        if abs(got - sheet) > 0.5e9:          # datasheets print GB/s to the unit
            fail(f"{name}: {m.pin_rate / 1e9:g} Gb/s x {m.bus_width} bits disagrees with its datasheet",
                 f"{sheet / 1e9:g} GB/s within the published rounding (0.5 GB/s)",
                 f"{got / 1e9:.4g} GB/s", "divide bits by 8 once, at the end")
        rows.append(f"{name} {got / 1e9:.1f} GB/s")
    _bad_input(fn, ["pin_rate", "bus_width"])
    return "standards per stack/device and " + ", ".join(rows) + " match their datasheets"


# --------------------------------------------------------------------------- exercise 2

@exercise
def implied_pin_rate(fn):
    """``fn(bandwidth, bus_width) -> bit/s per pin``; datasheets within the technology's limit."""
    for bw, width in [(1008e9, 384), (819.2e9, 1024), (3.35e12, 5120), (1, 1)]:
        got = _number(fn(bw, width), f"implied_pin_rate({bw:g}, {width})")
        expect_close(got, bw * 8 / width, rtol=1e-12, what=f"implied_pin_rate({bw:g}, {width})",
                     hint="bytes per second times 8 is bits per second, shared by bus_width pins")
    rows = []
    for name, m in memtech.GPU_MEMORY.items():
        if m.bus_width is None:
            continue
        rate = fn(m.bandwidth, m.bus_width)
        expect_close(rate, m.bandwidth * 8 / m.bus_width, rtol=1e-12,
                     what=f"the pin rate {name}'s datasheet implies")
        limit = memtech.tech(m.technology).pin_rate
        rows.append(f"{name} {rate / 1e9:.2f} Gb/s ({m.technology} spec {limit / 1e9:g})")
    _bad_input(fn, ["bandwidth", "bus_width"])
    return "; ".join(rows)


# --------------------------------------------------------------------------- exercise 3

_STREAM_WORDS = {"copy": 2, "scale": 2, "add": 3, "triad": 3}


def _stream_oracle(kind, a, b, c, q):
    a, b, c = a.clone(), b.clone(), c.clone()
    if kind == "copy":
        c[:] = a
    elif kind == "scale":
        b[:] = q * c
    elif kind == "add":
        c[:] = a + b
    else:
        a[:] = b + q * c
    return a, b, c


@exercise
def stream_op(fn):
    """``fn(kind, a, b, c, q) -> bytes``: STREAM's kernel in place, bytes as STREAM counts."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        for kind in ("copy", "scale", "add", "triad"):
            n = 1000
            a, b, c = (torch.randn(n, generator=g, dtype=dtype) for _ in range(3))
            want = _stream_oracle(kind, a, b, c, 3.0)
            ptrs = [t.data_ptr() for t in (a, b, c)]
            call = f"stream_op({kind!r}, a, b, c, 3.0) on {n} {dtype} elements"
            got = fn(kind, a, b, c, 3.0)
            if [t.data_ptr() for t in (a, b, c)] != ptrs:
                fail(f"{call} replaced an array", "the result written into the existing tensor",
                     "a new tensor", "write with out= or a slice assignment, never rebind")
            for name, have, exp in zip("abc", (a, b, c), want):
                expect_close(have, exp, rtol=1e-6, atol=1e-6, what=f"{call}: array {name} afterwards",
                             hint="STREAM: copy c=a; scale b=q*c; add c=a+b; triad a=b+q*c")
            words = _STREAM_WORDS[kind]
            expect_equal(got, words * n * a.element_size(), f"{call}: the bytes counted",
                         hint=f"STREAM counts {words} arrays of n elements for {kind} "
                         "(each array read or written once), times the element size")
    a = torch.ones(4)
    expect_raises(lambda: fn("dot", a, a.clone(), a.clone(), 1.0), ValueError, "stream_op('dot', ...)",
            "a ValueError naming the unknown kind", "accept only copy, scale, add and triad")
    expect_raises(lambda: fn("add", a, torch.ones(5), a.clone(), 1.0), ValueError,
            "stream_op('add') with arrays of 4, 5 and 4 elements", "a ValueError about the sizes",
            "the three arrays must have the same shape")
    return "copy, scale, add, triad in place; 2, 2, 3, 3 arrays counted"


# --------------------------------------------------------------------------- exercise 4

@exercise
def stream_benchmark(fn):
    """``fn(n) -> {kind: B/s}`` measured with the learner's kernels; compared with utils.bench."""
    n = (8 if bench.quick() else 16) * 2**20          # 32 or 64 MiB per fp32 array
    got = fn(n)
    expect_type(got, dict, f"stream_benchmark({n})", hint="return {kind: bytes per second}")
    expect_equal(sorted(got), sorted(_STREAM_WORDS), f"the kinds stream_benchmark({n}) returns")
    for kind, bw in got.items():
        if isinstance(bw, bool) or not isinstance(bw, numbers.Real) or not math.isfinite(bw) or bw <= 0:
            fail(f"stream_benchmark: {kind} is not a positive bandwidth", "B/s > 0", describe(bw),
                 "divide the bytes stream_op returns by the median time")
    for kind in ("copy", "triad"):
        ours = bench.stream_bandwidth(kind, n_bytes=4 * n)
        if not 0.5 <= got[kind] / ours <= 2.0:
            measurement_warning(
                f"STREAM {kind} on {n * 4 // 2**20} MiB arrays", f"about {ours / 1e9:.1f} GB/s "
                f"(utils.bench.stream_bandwidth just now)", f"{got[kind] / 1e9:.1f} GB/s",
                "a byte count that differs from STREAM's, arrays allocated inside the timed "
                "call, or another process using the memory bus")
    return ", ".join(f"{k} {got[k] / 1e9:.1f} GB/s" for k in ("copy", "scale", "add", "triad"))


# --------------------------------------------------------------------------- exercise 5

@exercise
def decode_ceiling(fn):
    """``fn(n_params, bytes_per_param, bandwidth) -> tokens/s`` at batch 1."""
    for n, s, bw in [(7e9, 2, 3.35e12), (70e9, 2, 4.8e12), (70e9, 0.5, 1.008e12), (1, 1, 1)]:
        call = f"decode_ceiling({n:g}, {s:g}, {bw:g})"
        got = _number(fn(n, s, bw), call)
        expect_close(got, bw / (n * s), rtol=1e-12, what=call,
                     hint="each token reads every weight once: bytes per token = n_params x "
                          "bytes_per_param; tokens/s = bandwidth / bytes per token")
    _bad_input(fn, ["n_params", "bytes_per_param", "bandwidth"])
    h100 = hardware.get("H100-SXM").memory_bandwidth
    return f"a 7B bf16 model on an H100 SXM: at most {h100 / 14e9:.0f} tokens/s"
