"""Lab 16's checkers pass the right answers and fail wrong ones with a useful message."""
import numpy as np
import pytest
import torch

from utils import inference_cost as ic
from utils.checks import ExerciseFailed, NotAttempted
from utils.checks import ch16 as check


pytestmark = pytest.mark.usefixtures("one_thread", "library_answers_allowed")   # see tests/conftest.py


def right_prefill(m, b, T, s):
    c = ic.prefill_cost(m, b, T, s)
    return c.flops, c.bytes


def right_decode(m, b, T, s):
    c = ic.decode_cost(m, b, T, s)
    return c.flops, c.bytes


def right_knee(batches, y):
    b, y = np.asarray(batches, float), np.asarray(y, float)
    if b.shape != y.shape or len(b) < 2 or np.any(y <= 0) or np.any(np.diff(b) <= 0):
        raise ValueError("bad sweep")
    return float(y.max() / (y / b).max())


def test_right_answers_pass(capsys):
    check.prefill_cost(right_prefill)
    check.decode_cost(right_decode)
    check.decode_knee(ic.decode_knee_batch)
    check.find_knee(right_knee)
    assert capsys.readouterr().out.count("passed") == 4


def test_full_square_attention_in_prefill_is_named():
    def square(m, b, T, s):
        f, q = right_prefill(m, b, T, s)
        L, H, dh = m.n_layers, m.n_heads, m.head_dim
        return f + b * 4 * L * H * dh * (T * T - T * (T + 1) // 2), q
    with pytest.raises(ExerciseFailed, match=r"new\(new \+ 1\)/2|new\(new\+1\)/2"):
        check.prefill_cost(square)


def test_weights_read_per_sequence_fail_with_the_reason():
    def per_sequence(m, b, T, s):
        f, q = right_prefill(m, b, T, s)
        return f, q + (b - 1) * s * m.matmul_params()
    with pytest.raises(ExerciseFailed, match="once per step"):
        check.prefill_cost(per_sequence)


def test_mha_cache_on_a_gqa_model_fails():
    def mha(m, b, T, s):
        f, _ = right_decode(m, b, T, s)
        L, H, dh = m.n_layers, m.n_heads, m.head_dim
        return f, s * (m.matmul_params() + b * L * (2 * T * H * dh + 2 * H * dh))
    with pytest.raises(ExerciseFailed, match="kv_dim"):
        check.decode_cost(mha)


def test_decode_off_by_one_context_fails():
    with pytest.raises(ExerciseFailed, match="decode_cost"):
        check.decode_cost(lambda m, b, T, s: right_decode(m, b, T + 1, s))


def test_missing_value_errors_fail():
    def no_check(m, b, T, s):
        if T < 1:
            return 0, 0
        return right_prefill(m, b, T, s)
    with pytest.raises(ExerciseFailed, match="ValueError"):
        check.prefill_cost(no_check)


def test_knee_one_too_small_and_a_knee_that_does_not_exist_fail():
    def last_below(m, p, bw, T, s):
        k = ic.decode_knee_batch(m, p, bw, T, s)
        return None if k is None else max(1, k - 1)
    with pytest.raises(ExerciseFailed, match="intensity"):
        check.decode_knee(last_below)

    def never_none(m, p, bw, T, s):
        k = ic.decode_knee_batch(m, p, bw, T, s)
        return 10**6 if k is None else k
    with pytest.raises(ExerciseFailed, match="None"):
        check.decode_knee(never_none)


def test_knee_from_the_first_point_only_fails_on_noisy_data():
    def first_point(batches, y):
        right_knee(batches, y)                    # keeps the ValueErrors
        return float(max(y) / (y[0] / batches[0]))
    with pytest.raises(ExerciseFailed, match="find_knee"):
        check.find_knee(first_point)


def test_sweeps_without_the_roofline_shape_warn_and_pass(capsys):
    """The shape of a measured sweep depends on the machine: a warning, never a failure."""
    b = [1, 2, 4, 8, 16, 32, 64, 128]
    good = [min(1e9 * x, 8e9) for x in b]
    check.decode_sweep(b, good, 8, right_knee(b, good))
    assert "⚠" not in capsys.readouterr().out
    rising = [1e9 * x for x in b]
    for args, warning in [((b, [1e9] * 8, 8, 1.0), "did not rise"),
                          ((b, rising, 8, right_knee(b, rising)), "not flattened"),
                          ((b, good, 100, right_knee(b, good)), "far from the prediction")]:
        check.decode_sweep(*args)
        out = capsys.readouterr().out
        assert "✔ decode_sweep: passed" in out and f"⚠ measurement: " in out and warning in out
    with pytest.raises(ExerciseFailed, match="at least 4 batches"):   # the logic still fails
        check.decode_sweep(b[:3], good[:3], 8, 2.0)
    with pytest.raises(ExerciseFailed, match="predicted knee"):
        check.decode_sweep(b, good, None, 8.0)


def _time_step(model, phase, batch, context, scale=1.0):
    return scale * check._reference_time(model, phase, batch, context)


def test_time_step_accepts_a_real_measurement_and_rejects_milliseconds():
    def right(model, phase, batch, context):
        if phase not in ("prefill", "decode"):
            raise ValueError(phase)
        return _time_step(model, phase, batch, context)
    check.time_step(right)
    with pytest.raises(ExerciseFailed, match="milliseconds"):
        check.time_step(lambda m, p, b, c: _time_step(m, p, b, c, scale=1000.0))


def test_a_time_far_from_the_checkers_warns_and_a_wrong_step_fails(capsys):
    def fast(model, phase, batch, context):
        if phase not in ("prefill", "decode"):
            raise ValueError(phase)
        return _time_step(model, phase, batch, context) / 5
    check.time_step(fast)
    out = capsys.readouterr().out
    assert "✔ time_step: passed" in out and "⚠ measurement: " in out and "disagrees" in out
    with pytest.raises(ExerciseFailed, match="times another step"):
        check.time_step(lambda m, p, b, c: _time_step(m, p, b, c) / 100)   # units mixed up


def test_stub_is_not_attempted():
    def stub(*args):
        raise NotImplementedError
    with pytest.raises(NotAttempted):
        check.decode_cost(stub)
