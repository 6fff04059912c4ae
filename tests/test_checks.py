"""The exercise-checker framework (utils.checks), through its example module."""
from __future__ import annotations

import inspect
import json
import traceback

import numpy as np
import pytest
import torch

import utils.checks
from utils.checks import (ExerciseFailed, NotAttempted, exercise, expect_close, expect_dtype,
                          expect_equal, expect_shape, expect_type)
from utils.checks import _example as check


def right_softmax(x):
    z = x - x.amax(-1, keepdim=True)
    return z.exp() / z.exp().sum(-1, keepdim=True)


def three_parts(err: ExerciseFailed, exercise_name: str) -> str:
    """The message names the exercise and has expected / got / hint, in that order."""
    msg = str(err)
    assert msg.startswith(f"exercise {exercise_name}: ")
    positions = [msg.find(f"\n  {part}:") for part in ("expected", "got", "hint")]
    assert -1 not in positions and positions == sorted(positions), msg
    return msg


def test_right_answers_pass_with_one_line_each(capsys):
    check.count_flops_matmul(lambda m, n, k: 2 * m * n * k)
    check.transfer_time(lambda nbytes, bandwidth: nbytes / bandwidth)
    assert check.softmax(right_softmax) is None          # nothing shown as Out[]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("✔ count_flops_matmul: passed — ")
    assert lines[2] == "✔ softmax: passed — matches torch.softmax on 3 inputs, including large logits"


def test_wrong_value():
    with pytest.raises(ExerciseFailed) as e:
        check.count_flops_matmul(lambda m, n, k: m * n * k)
    msg = three_parts(e.value, "count_flops_matmul")
    assert "count_flops_matmul(1, 1, 1) is wrong" in msg
    assert "expected: 2 (int)" in msg and "got:      1 (int)" in msg
    assert "k multiplies and k adds" in msg                     # the checker's hint


def test_float_instead_of_int_and_none():
    with pytest.raises(ExerciseFailed) as e:
        check.count_flops_matmul(lambda m, n, k: 2.0 * m * n * k)
    msg = three_parts(e.value, "count_flops_matmul")
    assert "wrong type" in msg and "an int" in msg and "2.0 (float)" in msg and "//" in msg
    with pytest.raises(ExerciseFailed, match="return` statement missing"):
        check.count_flops_matmul(lambda m, n, k: None)


def test_wrong_values_naive_softmax_overflows():
    def naive(x):
        return x.exp() / x.exp().sum(-1, keepdim=True)
    with pytest.raises(ExerciseFailed) as e:
        check.softmax(naive)
    msg = three_parts(e.value, "softmax")
    assert "large values has wrong values" in msg and "NaN" in msg and "maximum" in msg


def test_wrong_shape_dtype_and_type():
    with pytest.raises(ExerciseFailed) as e:
        check.softmax(lambda x: right_softmax(x).transpose(0, -1))
    msg = three_parts(e.value, "softmax")
    assert "wrong shape" in msg and "shape (4, 8)" in msg and "shape (8, 4)" in msg
    with pytest.raises(ExerciseFailed) as e:
        check.softmax(lambda x: right_softmax(x).float())
    msg = three_parts(e.value, "softmax")
    assert "wrong dtype" in msg and "torch.float64" in msg and "torch.float32" in msg
    with pytest.raises(ExerciseFailed) as e:
        check.softmax(lambda x: right_softmax(x).tolist())
    msg = three_parts(e.value, "softmax")
    assert "wrong type" in msg and "a torch.Tensor" in msg and "a list of 4 items" in msg
    with pytest.raises(ExerciseFailed, match=r"\.item\(\)"):
        check.transfer_time(lambda nbytes, bandwidth: torch.tensor(nbytes / bandwidth))


def test_learner_exception_is_explained_with_the_learners_lines():
    def helper(nbytes):
        return nbytes / 0

    def transfer_time(nbytes, bandwidth):
        return helper(nbytes) / bandwidth

    with pytest.raises(ExerciseFailed) as e:
        check.transfer_time(transfer_time)
    msg = three_parts(e.value, "transfer_time")
    assert "your code raised ZeroDivisionError" in msg
    assert "in transfer_time" in msg and "in helper" in msg and "return nbytes / 0" in msg
    assert "_example.py" not in msg and "__init__.py" not in msg  # no checker internals
    # a short traceback: the caller and the decorator, no chained exception
    assert e.value.__suppress_context__ and e.value.__cause__ is None
    assert len(traceback.extract_tb(e.value.__traceback__)) <= 2


def test_checker_breaking_on_the_result_is_explained():
    # a checker that uses a learner's result without the expect_* helpers first
    namespace = {}
    source = "def add_one(fn):\n    return fn() + 1\n"
    exec(compile(source, utils.checks.__file__, "exec"), namespace)  # "lives" in utils/checks
    add_one = exercise(namespace["add_one"])
    add_one(lambda: 1)
    with pytest.raises(ExerciseFailed) as e:
        add_one(lambda: "text")
    msg = three_parts(e.value, "add_one")
    assert "checking your answer raised TypeError" in msg and "unexpected kind" in msg


def test_stub_is_not_attempted():
    def stub(x):
        raise NotImplementedError("replace this line with your code")
    with pytest.raises(NotImplementedError) as e:
        check.softmax(stub)
    assert isinstance(e.value, NotAttempted)
    assert str(e.value) == "exercise softmax: not attempted yet — `stub` is still a stub: fill it in"
    assert e.value.__suppress_context__


def test_recording(tmp_path, monkeypatch):
    report = tmp_path / "outcomes.jsonl"
    monkeypatch.setenv("COURSE_GRADE_REPORT", str(report))
    check.transfer_time(lambda nbytes, bandwidth: nbytes / bandwidth)
    with pytest.raises(ExerciseFailed):
        check.count_flops_matmul(lambda m, n, k: 0)
    with pytest.raises(NotImplementedError):
        check.softmax(lambda x: (_ for _ in ()).throw(NotImplementedError()))
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(r["exercise"], r["status"]) for r in records] == [
        ("transfer_time", "passed"), ("count_flops_matmul", "failed"), ("softmax", "not_attempted")]
    assert all(set(r) == {"exercise", "status", "message", "warnings"} for r in records)
    assert records[0]["message"].startswith("✔ transfer_time: passed")
    assert "expected:" in records[1]["message"] and "hint:" in records[1]["message"]
    monkeypatch.delenv("COURSE_GRADE_REPORT")
    check.transfer_time(lambda nbytes, bandwidth: nbytes / bandwidth)
    assert len(report.read_text().splitlines()) == 3


def test_decorator_name_must_match():
    with pytest.raises(ValueError, match="must match"):
        @exercise("other_name")
        def softmax(fn):
            pass


# ---------------------------------------------------------------- helpers on their own

def failure(fn, *args, **kwargs) -> str:
    with pytest.raises(ExerciseFailed) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "expected:" in msg and "got:" in msg, msg
    return msg


def test_expect_close():
    assert expect_close(1, 1.0) == 1                      # an int is a fine float
    assert "wrong type" in failure(expect_close, None, 1.0)
    assert "'1' (str)" in failure(expect_close, "1", 1.0)
    assert "not a finite number" in failure(expect_close, float("nan"), 1.0)
    assert "what[1] is wrong" in failure(expect_close, [1.0, 2.1], [1.0, 2.0], what="what")
    msg = failure(expect_close, torch.tensor([1.0, float("inf")]), torch.tensor([1.0, 2.0]))
    assert "1 of 2 elements differ" in msg and "inf" in msg and "index (1,)" in msg
    assert "a NumPy array" in failure(expect_close, np.ones(2), torch.ones(2))
    assert "a torch.Tensor" in failure(expect_close, [1.0, 1.0], torch.ones(2))
    expect_close(np.array([1.0]), np.array([1.0 + 1e-9]))
    expect_close(torch.ones(2, dtype=torch.float16), torch.ones(2))   # dtype is not compared


def test_expect_equal():
    assert "an int" in failure(expect_equal, 3.0, 3)
    assert "an int" in failure(expect_equal, True, 1)                 # a bool is not a count
    expect_equal(np.int64(3), 3)
    expect_equal((1, 2), [1, 2])
    assert "[1] has the wrong type" in failure(expect_equal, [1, 2.0], [1, 2])
    assert "wrong length" in failure(expect_equal, [1, 2, 3], [1, 2])
    assert "missing 'b'" in failure(expect_equal, {"a": 1}, {"a": 1, "b": 2})
    assert "wrong dtype" in failure(expect_equal, torch.zeros(3, dtype=torch.int64), torch.zeros(3))
    assert "2 of 3 elements differ" in failure(expect_equal, torch.tensor([1, 5, 6]),
                                               torch.tensor([1, 2, 3]))
    expect_equal(torch.tensor([float("nan")]), torch.tensor([float("nan")]))
    expect_equal([torch.ones(2)], [torch.ones(2)])


def test_expect_shape_dtype_type():
    expect_shape(torch.zeros(2, 3), (None, 3))
    assert "shape (any, 4)" in failure(expect_shape, torch.zeros(2, 3), (None, 4))
    assert "number of dimensions" in failure(expect_shape, torch.zeros(2), (2, 1))
    assert "wrong type" in failure(expect_shape, [[0.0]], (1, 1))
    expect_dtype(np.zeros(2, dtype=np.float32), np.float32)
    assert "wrong type" in failure(expect_dtype, None, torch.float32)
    expect_type(np.float32(1.0), float)
    assert "a tuple" in failure(expect_type, [1, 2], tuple)
    assert "trailing comma" in failure(expect_type, (3,), int)


def test_error_inside_a_decorated_learner_function_is_the_learners():
    import torch

    from utils.checks import ExerciseFailed
    from utils.checks import _example

    @torch.no_grad()
    def broken(m, n, k):
        return [][0]

    with pytest.raises(ExerciseFailed, match="your code raised IndexError"):
        _example.count_flops_matmul(broken)


# ---------------------------------------------------------------- the library's own answer

def test_library_answers_are_refused_in_every_form(tmp_path, monkeypatch):
    import functools

    import utils.paged_kv as pk
    import utils.tiny as tiny
    from utils.checks import LibraryAnswer, library_origin

    report = tmp_path / "outcomes.jsonl"
    monkeypatch.setenv("COURSE_GRADE_REPORT", str(report))

    @exercise
    def takes_anything(answer, *others):
        return "accepted"

    class Inherits(pk.BlockAllocator):        # every method is the library's
        pass

    def paged_attention(*args, **kwargs):     # a thin wrapper around the reference
        return pk.paged_attention(*args, **kwargs)

    for answer, origin in [(pk.BlockAllocator, "utils.paged_kv.BlockAllocator"),
                           (pk.paged_attention, "utils.paged_kv.paged_attention"),
                           (functools.partial(pk.paged_attention), "utils.paged_kv.paged_attention"),
                           (Inherits, "utils.paged_kv.BlockAllocator"),
                           (paged_attention, "utils.paged_kv.paged_attention")]:
        with pytest.raises(LibraryAnswer) as e:
            takes_anything(answer)
        assert isinstance(e.value, ExerciseFailed)
        assert origin in str(e.value) and "the course's reference" in str(e.value)
        assert str(e.value).startswith("exercise takes_anything: ")
    # also as a later argument (an earlier exercise's class swapped for the library's)
    with pytest.raises(LibraryAnswer):
        takes_anything(lambda: 1, pk.BlockAllocator)
    statuses = [json.loads(line)["status"] for line in report.read_text().splitlines()]
    assert statuses == ["library_answer"] * 6

    # the learner's own code passes, including subclasses of the learner's own classes,
    # subclasses of abstract library bases, data from the library, and torch functions
    class Mine:
        def allocate(self):
            return 1

    class MineToo(Mine):
        pass

    class Cache(tiny.KVCache):                # an abstract base meant to be subclassed
        pass

    def paged_attention_own(q):               # same idea, the learner's own body
        return q

    for answer in [Mine, MineToo, Cache, paged_attention_own, torch.softmax, 3,
                   torch.zeros(2), lambda x: x]:
        assert library_origin(answer) is None, answer
    takes_anything(Mine, torch.zeros(2))


def test_every_library_callable_that_a_lab_could_pass_is_refused():
    """Each public function and concrete class of the chapter libraries is a library answer."""
    import importlib
    import pkgutil

    import utils
    from utils.checks import library_origin

    seen = 0
    for info in pkgutil.iter_modules(utils.__path__):
        if info.name in ("checks", "grade", "labgen", "nbrun") or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"utils.{info.name}")
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(value) or (inspect.isclass(value) and not inspect.isabstract(value)):
                assert library_origin(value) is not None, f"utils.{info.name}.{name}"
                seen += 1
    assert seen > 50


# ---------------------------------------------------------------- measurements warn

def test_measurement_warning_passes_the_logic_and_reports_apart(tmp_path, monkeypatch, capsys):
    from utils.checks import measurement_warning

    report = tmp_path / "outcomes.jsonl"
    monkeypatch.setenv("COURSE_GRADE_REPORT", str(report))

    @exercise
    def timed(fn, measured_s):
        expect_equal(fn(2), 4, what="fn(2)")           # logic: exact
        if measured_s > 1.0:                           # measurement: a warning
            measurement_warning("the kernel took longer than the model", "about 1 s",
                                f"{measured_s} s", "another process was busy")
        return "logic right"

    timed(lambda x: 2 * x, 0.5)
    timed(lambda x: 2 * x, 3.0)
    with pytest.raises(ExerciseFailed):
        timed(lambda x: x, 3.0)                        # wrong logic still fails
    out = capsys.readouterr().out
    assert out.count("✔ timed: passed — logic right") == 2
    assert "⚠ measurement: the kernel took longer than the model" in out
    assert "3.0 s" in out and "another process was busy" in out
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert [r["status"] for r in records] == ["passed", "measurement_warning", "failed"]
    assert records[0]["warnings"] == [] and len(records[1]["warnings"]) == 1
    assert records[2]["warnings"] == []                # a failure carries no stale warning
    measurement_warning("outside a check", "x", "y")   # printed at once
    assert "⚠ measurement: outside a check" in capsys.readouterr().out


def test_not_attempted_names_the_stub_and_its_exercise():
    class BlockAllocator:
        def allocate(self):
            raise NotImplementedError("exercise block_allocator: replace this line with your code")

    @exercise
    def later(cls):
        cls().allocate()

    with pytest.raises(NotAttempted) as e:
        later(BlockAllocator)
    msg = str(e.value)
    assert msg.startswith("exercise later: not attempted yet — ")
    assert "`BlockAllocator.allocate` (exercise block_allocator) is still a stub" in msg


def test_a_library_answer_found_inside_the_checker_is_reported_as_such(tmp_path, monkeypatch):
    """A checker that finds the library deeper in the answer (a worker that imports it)
    raises LibraryAnswer itself: the outcome is "library_answer", not "failed"."""
    from utils.checks import LibraryAnswer

    report = tmp_path / "outcomes.jsonl"
    monkeypatch.setenv("COURSE_GRADE_REPORT", str(report))

    @exercise
    def deep(answer):
        if answer == "imports utils.reliability":
            raise LibraryAnswer("the worker imports utils.reliability", "your own code",
                                "utils.reliability", "write it yourself")
        raise ExerciseFailed("wrong", "right", "wrong")

    with pytest.raises(LibraryAnswer):
        deep("imports utils.reliability")
    with pytest.raises(ExerciseFailed):
        deep("something else")
    statuses = [json.loads(line)["status"] for line in report.read_text().splitlines()]
    assert statuses == ["library_answer", "failed"]
