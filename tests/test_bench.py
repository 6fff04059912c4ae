"""Measurement helpers: timing, peaks, bandwidth."""
import time

import pytest
import torch

from utils import bench


def test_time_fn_measures_a_known_duration():
    t = bench.time_fn(time.sleep, 0.002, min_run_time=0.05)
    assert 0.0018 < t.median < 0.5          # sleep never returns early; a busy machine is late
    assert t.runs >= 1 and t.iqr >= 0


def test_time_fn_rejects_bad_input():
    with pytest.raises(TypeError, match="callable"):
        bench.time_fn(42)
    with pytest.raises(ValueError, match="min_run_time"):
        bench.time_fn(time.sleep, 0, min_run_time=-1)


def test_quick_mode_follows_the_environment(monkeypatch):
    monkeypatch.setenv("COURSE_QUICK", "1")
    assert bench.quick()
    monkeypatch.setenv("COURSE_QUICK", "0")
    assert not bench.quick()


def test_peak_flops_is_measured_once_and_reused(monkeypatch):
    bench.clear_cache()
    calls = []
    real = bench.matmul_flops

    def counting(n, dtype="fp32", device=None):
        calls.append(n)
        return real(n, dtype, device)

    monkeypatch.setattr(bench, "matmul_flops", counting)
    first = bench.peak_flops("fp32")
    n_calls = len(calls)
    assert n_calls >= 2 and first > 1e8   # any CPU of the last decade beats 0.1 GFLOP/s
    assert bench.peak_flops("fp32") == first
    assert len(calls) == n_calls


class _FixedTiming:
    """bench.time_fn as a clock that always reads 1 ms: the counting, not the machine."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn, *args, **kwargs):
        self.calls.append(fn)
        fn(*args, **kwargs)                      # the operation still runs, once
        return bench.Timing(median=1e-3, iqr=0.0, runs=1)


def test_matmul_flops_counts_2n3(monkeypatch):
    # the rate is 2 n^3 FLOP over the measured time, whatever the machine's load
    monkeypatch.setattr(bench, "time_fn", _FixedTiming())
    for n in (64, 256):
        assert bench.matmul_flops(n) == pytest.approx(2 * n**3 / 1e-3, rel=1e-12)


def test_stream_bandwidth_counts_bytes_as_stream_does(monkeypatch):
    monkeypatch.setattr(bench, "time_fn", _FixedTiming())
    n_bytes = 8 * 2**20
    n = n_bytes // 4
    assert bench.stream_bandwidth("copy", n_bytes=n_bytes) == pytest.approx(8 * n / 1e-3)
    assert bench.stream_bandwidth("triad", n_bytes=n_bytes) == pytest.approx(12 * n / 1e-3)
    assert bench.stream_bandwidth("read", n_bytes=n_bytes) == pytest.approx(4 * n / 1e-3)


def test_stream_bandwidth_measured_is_a_positive_rate_and_bad_input_is_refused():
    bw = bench.stream_bandwidth("copy", n_bytes=8 * 2**20)
    assert 1e6 < bw < 1e13          # any machine, however busy, moves more than 1 MB/s
    with pytest.raises(ValueError, match="kind"):
        bench.stream_bandwidth("scale")
    with pytest.raises(ValueError, match="n_bytes"):
        bench.stream_bandwidth("copy", n_bytes=-5)


def test_cache_sweep_shape():
    out = bench.cache_sweep([2**16, 2**20])
    assert [ws for ws, _ in out] == [2**16, 2**20]
    assert all(bw > 0 for _, bw in out)


def test_torch_dtype():
    assert bench.torch_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="fp32"):
        bench.torch_dtype("fp12")
