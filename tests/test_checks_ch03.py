"""Lab 03's checkers pass the right answers and fail wrong ones with a useful message."""
import numpy as np
import pytest

from utils import roofline as rl
from utils.checks import ExerciseFailed, NotAttempted
from utils.checks import ch03 as check

# Logic tests hold the checkers to the library reference; refusal: tests/test_library_answers.py
pytestmark = pytest.mark.usefixtures("library_answers_allowed")


def right_vector(kind, n, s):
    c = rl.add(n, s) if kind == "add" else rl.reduce_sum(n, s)
    return c.flops, c.bytes


def test_right_answers_pass(capsys):
    check.vector_kernel_cost(right_vector)
    check.row_kernel_cost(lambda kind, r, c, s: (
        (5 * r * c, 2 * r * c * s) if kind == "softmax" else (8 * r * c, (2 * r * c + 2 * c) * s)))
    check.matmul_cost(lambda m, n, k, s: (2 * m * n * k, (m * k + k * n + m * n) * s))
    check.attention_decode_cost(lambda model, T, b, s: (
        rl.attention_decode(model, T, b, s).flops, rl.attention_decode(model, T, b, s).bytes))
    check.attainable(rl.attainable)
    assert capsys.readouterr().out.count("passed") == 5


def test_gemm_forgetting_the_output_write_fails_with_a_hint():
    with pytest.raises(ExerciseFailed) as e:
        check.matmul_cost(lambda m, n, k, s: (2 * m * n * k, (m * k + k * n) * s))
    msg = str(e.value)
    assert "bytes" in msg and "expected" in msg and "got" in msg and "hint" in msg


def test_counting_a_multiply_add_as_one_flop_fails():
    with pytest.raises(ExerciseFailed, match="FLOPs"):
        check.matmul_cost(lambda m, n, k, s: (m * n * k, (m * k + k * n + m * n) * s))


def test_wrong_return_type_is_named():
    with pytest.raises(ExerciseFailed, match="tuple"):
        check.vector_kernel_cost(lambda kind, n, s: [n, 3 * n * s])


def test_mha_formula_on_a_gqa_model_fails():
    def uses_query_heads_for_cache(model, T, b, s):
        L, H, dh = model.n_layers, model.n_heads, model.head_dim
        return b * L * 4 * T * H * dh, b * L * (2 * T * H * dh + 2 * H * dh) * s
    with pytest.raises(ExerciseFailed, match="llama2-70b"):
        check.attention_decode_cost(uses_query_heads_for_cache)


def test_attainable_without_validation_or_arrays_fails():
    with pytest.raises(ExerciseFailed, match="ValueError"):
        check.attainable(lambda i, p, b: np.minimum(p, np.asarray(i) * b))
    with pytest.raises(ExerciseFailed):
        check.attainable(lambda i, p, b: min(p, i * b))   # breaks on arrays


def test_stub_is_not_attempted():
    def stub(*args):
        raise NotImplementedError
    with pytest.raises(NotAttempted):
        check.matmul_cost(stub)


@pytest.fixture
def quiet_machine(monkeypatch):
    """utils.bench as a machine whose roof is P = 1e11 FLOP/s, B = 1e10 B/s when asked."""
    from utils import bench
    monkeypatch.setattr(bench, "peak_flops", lambda dtype="fp32": 1e11)
    monkeypatch.setattr(bench, "peak_bandwidth", lambda: 1e10)
    monkeypatch.setattr(bench, "clear_cache", lambda: None)
    return 1e11, 1e10


def test_points_above_the_roof(quiet_machine, capsys):
    P, B = quiet_machine
    roof = min(P, 1.0 * B)
    ok = {k: (1.0, 0.5 * roof) for k in "abcde"}
    check.under_the_roof(ok, peak=P, bandwidth=B)
    assert "⚠" not in capsys.readouterr().out
    bad = dict(ok, e=(1.0, 3.0 * roof))     # a factor-3 miscount: far above any roof
    with pytest.raises(ExerciseFailed, match="more than 2x above the roof"):
        check.under_the_roof(bad, peak=P, bandwidth=B)
    with pytest.raises(ExerciseFailed, match="at least 5"):
        check.under_the_roof({"a": (1.0, 1.0)}, P, B)
    # the learner's roof was measured in a busy moment (half the machine): the fresh roof
    # holds the kernels, no warning
    check.under_the_roof(dict(ok, e=(1.0, 0.9 * roof)), peak=P / 2, bandwidth=B / 2)
    assert "⚠" not in capsys.readouterr().out
    # 30% above even the best roof: a measurement warning, the exercise still passes
    check.under_the_roof(dict(ok, e=(1.0, 1.3 * roof)), peak=P, bandwidth=B)
    out = capsys.readouterr().out
    assert "✔ under_the_roof: passed" in out and "⚠ measurement: kernel 'e' is above the roof" in out


def test_a_roof_measured_while_busy_is_measured_again(monkeypatch, capsys):
    """Learner's roof and the first fresh one both taken while other processes held the
    cores (a third of the machine): a correct kernel 2.5x above them is held to the roof
    measured once the machine is quiet, and passes."""
    from utils import bench
    flops = iter([3e10, 3e10, 1e11, 1e11])
    bws = iter([3e9, 3e9, 1e10, 1e10])
    monkeypatch.setattr(bench, "peak_flops", lambda dtype="fp32": next(flops))
    monkeypatch.setattr(bench, "peak_bandwidth", lambda: next(bws))
    monkeypatch.setattr(bench, "clear_cache", lambda: None)
    results = {k: (1.0, 0.5e10) for k in "abcd"}
    results["e"] = (1.0, 0.75e10)          # 2.5x the busy roof, 75% of the quiet one
    check.under_the_roof(results, peak=3e10, bandwidth=3e9)
    out = capsys.readouterr().out
    assert "✔ under_the_roof: passed" in out and "⚠" not in out


def test_measure_roof_measures_a_busy_reference_again(monkeypatch, capsys):
    """utils.bench's first reference taken while the machine was busy (a third of its
    speed): the learner's correct figures, 2.5x that, pass against the quiet re-measure."""
    from utils import bench
    flops = iter([4e10, 1e11, 1e11])
    bws = iter([4e9, 1e10, 1e10])
    monkeypatch.setattr(bench, "peak_flops", lambda dtype="fp32": next(flops))
    monkeypatch.setattr(bench, "peak_bandwidth", lambda: next(bws))
    monkeypatch.setattr(bench, "clear_cache", lambda: None)
    check.measure_roof(lambda: (1e11, 1e10))
    out = capsys.readouterr().out
    assert "✔ measure_roof: passed" in out and "⚠" not in out


def test_measure_roof_fails_miscounts_and_warns_on_slow_machines(quiet_machine, capsys):
    check.measure_roof(lambda: (0.9e11, 1.1e10))
    assert "⚠" not in capsys.readouterr().out
    with pytest.raises(ExerciseFailed, match="peak FLOP/s is faster than this machine can go"):
        check.measure_roof(lambda: (2.5e11, 1e10))         # FLOPs counted twice over
    with pytest.raises(ExerciseFailed, match="bandwidth is faster"):
        check.measure_roof(lambda: (1e11, 3e10))           # bytes overcounted 3x
    check.measure_roof(lambda: (1.0, 1e9))                 # slow: busy machine or undercount
    out = capsys.readouterr().out
    assert "✔ measure_roof: passed" in out
    assert "⚠ measurement: measure_roof(): peak FLOP/s is far below" in out
    assert "bandwidth" not in out.split("⚠")[1].splitlines()[0]
