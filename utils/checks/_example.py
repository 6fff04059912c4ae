"""An example checker module: the template for ``utils/checks/chNN.py``.

A lab imports it as ``from utils.checks import _example as check`` and calls
``check.softmax(softmax)``. Each checker runs the learner's function on a few
inputs, edge cases included, holds the answers to an oracle (here the formula, or
``torch.softmax``) with the ``expect_*`` helpers, and returns the detail printed
on the pass line. The tests of the checker framework use this module.
"""
from __future__ import annotations

import torch

from . import exercise, expect_close, expect_dtype, expect_equal, expect_shape, expect_type


@exercise
def count_flops_matmul(fn):
    """``fn(m, n, k)``: the FLOP of an (m×k) @ (k×n) matmul, an int."""
    for m, n, k in [(1, 1, 1), (2, 3, 4), (4096, 4096, 8192)]:
        expect_equal(fn(m, n, k), 2 * m * n * k, what=f"count_flops_matmul({m}, {n}, {k})",
                     hint="each of the m·n outputs takes k multiplies and k adds")
    return "2·m·n·k FLOP, as an int, for 3 shapes"


@exercise
def transfer_time(fn):
    """``fn(nbytes, bandwidth)``: seconds to move ``nbytes`` at ``bandwidth`` B/s."""
    cases = [(1e9, 1e9), (80 * 2**30, 3.35e12), (0, 900e9)]
    for nbytes, bandwidth in cases:
        expect_close(fn(nbytes, bandwidth), nbytes / bandwidth, rtol=1e-9, atol=0.0,
                     what=f"transfer_time({nbytes:g}, {bandwidth:g})",
                     hint="time = bytes / (bytes per second), in SI units")
    return "bytes / bandwidth for 3 transfers, including an empty one"


@exercise
def softmax(fn):
    """``fn(x)``: softmax over the last dimension, same shape and dtype as ``x``."""
    generator = torch.Generator().manual_seed(0)
    cases = [((4, 8), torch.float32, 1.0), ((2, 3, 5), torch.float64, 1.0),
             ((2, 6), torch.float32, 1000.0)]  # large logits: exp overflows unless shifted
    for shape, dtype, scale in cases:
        x = torch.randn(shape, generator=generator, dtype=dtype) * scale
        what = f"softmax(x) for x of shape {shape}, {dtype}" + (", large values" if scale > 1 else "")
        got = fn(x.clone())
        expect_type(got, torch.Tensor, what)
        expect_shape(got, x.shape, what)
        expect_dtype(got, dtype, what)
        expect_close(got, torch.softmax(x, dim=-1), rtol=1e-5, atol=1e-6, what=what,
                     hint="subtract each row's maximum before exp, then divide by the row's "
                          "sum over the last dimension")
    return "matches torch.softmax on 3 inputs, including large logits"
