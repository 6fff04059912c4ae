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


def test_points_above_the_roof_fail():
    from utils import bench
    P, B = bench.peak_flops("fp32"), bench.peak_bandwidth()
    roof = min(P, 1.0 * B)
    ok = {k: (1.0, 0.5 * roof) for k in "abcde"}
    check.under_the_roof(ok, peak=P, bandwidth=B)
    bad = dict(ok, e=(1.0, 3.0 * roof))     # a factor-3 miscount: far above any roof
    with pytest.raises(ExerciseFailed, match="above the roof"):
        check.under_the_roof(bad, peak=P, bandwidth=B)
    with pytest.raises(ExerciseFailed, match="at least 5"):
        check.under_the_roof({"a": (1.0, 1.0)}, P, B)


def test_measure_roof_rejects_implausible_numbers():
    with pytest.raises(ExerciseFailed, match="peak FLOP/s"):
        check.measure_roof(lambda: (1.0, 1e9))
