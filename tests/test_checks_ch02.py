"""The lab-02 checkers pass right answers, catch planted bugs and refuse the library's own."""
import math

import pytest
import torch

from utils import bench, memtech
from utils.checks import ExerciseFailed, LibraryAnswer, allow_library_answers
from utils.checks import ch02 as check

pytestmark = pytest.mark.usefixtures("one_thread")


def _validate(**kw):
    for name, x in kw.items():
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{name} must be a number")
        if not math.isfinite(x) or x <= 0:
            raise ValueError(f"{name} must be positive and finite")


def stream_op(kind, a, b, c, q):
    if kind not in ("copy", "scale", "add", "triad"):
        raise ValueError(f"unknown kind {kind!r}")
    if not a.shape == b.shape == c.shape:
        raise ValueError("arrays differ in shape")
    if kind == "copy":
        c.copy_(a)
    elif kind == "scale":
        torch.mul(c, q, out=b)
    elif kind == "add":
        torch.add(a, b, out=c)
    else:
        torch.add(b, c, alpha=q, out=a)
    return {"copy": 2, "scale": 2, "add": 3, "triad": 3}[kind] * a.numel() * a.element_size()


def stream_benchmark(n):
    a, b, c = torch.ones(n), torch.full((n,), 2.0), torch.full((n,), 0.5)
    out = {}
    for kind in ("copy", "scale", "add", "triad"):
        nbytes = stream_op(kind, a, b, c, 3.0)
        out[kind] = nbytes / bench.time_fn(stream_op, kind, a, b, c, 3.0).median
    return out


def test_right_answers_pass(capsys):
    with allow_library_answers():
        check.interface_bandwidth(memtech.interface_bandwidth)
        check.implied_pin_rate(memtech.implied_pin_rate)
        check.decode_ceiling(memtech.decode_ceiling)
    check.stream_op(stream_op)
    check.stream_benchmark(stream_benchmark)
    assert capsys.readouterr().out.count("passed") == 5


@pytest.mark.parametrize("name, reference", [
    ("interface_bandwidth", memtech.interface_bandwidth),
    ("implied_pin_rate", memtech.implied_pin_rate),
    ("decode_ceiling", memtech.decode_ceiling),
    ("stream_benchmark", bench.stream_bandwidth)])
def test_library_reference_is_refused(name, reference):
    with pytest.raises(LibraryAnswer):
        getattr(check, name)(reference)


# -- exercise 1 ---------------------------------------------------------------------------
def bandwidth_in_bits(pin_rate, bus_width):
    _validate(pin_rate=pin_rate, bus_width=bus_width)
    return pin_rate * bus_width                        # forgets the 8 bits per byte


def bandwidth_ddr_twice(pin_rate, bus_width):
    _validate(pin_rate=pin_rate, bus_width=bus_width)
    return 2 * pin_rate * bus_width / 8                # doubles a rate that is already per pin


def bandwidth_no_checks(pin_rate, bus_width):
    return pin_rate * bus_width / 8


def bandwidth_accepts_nan(pin_rate, bus_width):
    if isinstance(pin_rate, str) or isinstance(bus_width, str):
        raise TypeError("numbers please")
    if pin_rate <= 0 or bus_width <= 0:                # NaN and inf slip through
        raise ValueError("positive please")
    return pin_rate * bus_width / 8


@pytest.mark.parametrize("fn, match", [(bandwidth_in_bits, "wrong"), (bandwidth_ddr_twice, "wrong"),
                                       (bandwidth_no_checks, "ValueError"),
                                       (bandwidth_accepts_nan, "nan|inf")])
def test_interface_bandwidth_bugs_are_caught(fn, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.interface_bandwidth(fn)


# -- exercise 2 ---------------------------------------------------------------------------
def rate_forgets_bits(bandwidth, bus_width):
    _validate(bandwidth=bandwidth, bus_width=bus_width)
    return bandwidth / bus_width


def rate_per_stack(bandwidth, bus_width):
    _validate(bandwidth=bandwidth, bus_width=bus_width)
    return bandwidth * 8 / 1024                        # assumes one stack


@pytest.mark.parametrize("fn", [rate_forgets_bits, rate_per_stack])
def test_implied_rate_bugs_are_caught(fn):
    with pytest.raises(ExerciseFailed, match="wrong"):
        check.implied_pin_rate(fn)


# -- exercise 3 ---------------------------------------------------------------------------
def stream_rebinds(kind, a, b, c, q):
    if kind not in ("copy", "scale", "add", "triad") or not a.shape == b.shape == c.shape:
        raise ValueError("bad")
    if kind == "copy":
        c = a.clone()                                  # a new tensor: the caller's c is unchanged
        return 2 * a.numel() * a.element_size()
    return stream_op(kind, a, b, c, q)


def stream_counts_triad_as_four(kind, a, b, c, q):
    nbytes = stream_op(kind, a, b, c, q)
    return nbytes + (a.numel() * a.element_size() if kind == "triad" else 0)


def stream_counts_elements(kind, a, b, c, q):
    return stream_op(kind, a, b, c, q) // a.element_size()


def stream_wrong_triad(kind, a, b, c, q):
    if kind == "triad":
        torch.add(c, b, alpha=q, out=a)                # a = c + q*b: operands swapped
        return 3 * a.numel() * a.element_size()
    return stream_op(kind, a, b, c, q)


def stream_no_checks(kind, a, b, c, q):
    try:
        return stream_op(kind, a, b, c, q)
    except ValueError:
        return 0


@pytest.mark.parametrize("fn, match", [(stream_rebinds, "array c afterwards"),
                                       (stream_counts_triad_as_four, "bytes counted"),
                                       (stream_counts_elements, "bytes counted"),
                                       (stream_wrong_triad, "array a afterwards"),
                                       (stream_no_checks, "'dot'")])
def test_stream_op_bugs_are_caught(fn, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.stream_op(fn)


# -- exercise 4: measurement warns, logic fails --------------------------------------------
def test_stream_benchmark_logic_and_warnings(capsys, monkeypatch):
    monkeypatch.setattr(check.bench, "stream_bandwidth", lambda kind, n_bytes: 10e9)
    check.stream_benchmark(lambda n: {k: 10e9 for k in ("copy", "scale", "add", "triad")})
    out = capsys.readouterr().out
    assert "passed" in out and "⚠" not in out
    check.stream_benchmark(lambda n: {k: 3e9 for k in ("copy", "scale", "add", "triad")})
    out = capsys.readouterr().out
    assert "passed" in out and out.count("⚠") == 2          # copy and triad, 3.3x slow
    with pytest.raises(ExerciseFailed, match="kinds"):
        check.stream_benchmark(lambda n: {"copy": 1e9, "triad": 1e9})
    with pytest.raises(ExerciseFailed, match="positive bandwidth"):
        check.stream_benchmark(lambda n: {k: -1.0 for k in ("copy", "scale", "add", "triad")})


# -- exercise 5 ---------------------------------------------------------------------------
def ceiling_in_bits(n_params, bytes_per_param, bandwidth):
    _validate(n_params=n_params, bytes_per_param=bytes_per_param, bandwidth=bandwidth)
    return bandwidth / (n_params * bytes_per_param * 8)


def ceiling_ignores_precision(n_params, bytes_per_param, bandwidth):
    _validate(n_params=n_params, bytes_per_param=bytes_per_param, bandwidth=bandwidth)
    return bandwidth / (2 * n_params)


def ceiling_no_checks(n_params, bytes_per_param, bandwidth):
    return bandwidth / (n_params * bytes_per_param)


@pytest.mark.parametrize("fn, match", [(ceiling_in_bits, "wrong"), (ceiling_ignores_precision, "wrong"),
                                       (ceiling_no_checks, "ValueError")])
def test_decode_ceiling_bugs_are_caught(fn, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.decode_ceiling(fn)
