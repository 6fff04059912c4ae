"""The grader cannot be fooled by the notebook it grades (utils.grade).

Each kernel start costs a few seconds, so several attacks share one submission: a
submission whose answers are all still stubs must score 0 whatever else it does.
"""
from __future__ import annotations

import json

import pytest

from utils import grade
from utils.labgen import make_lab

from test_grade import FLOPS, SETUP, SOFTMAX, notebook, run_grade, save, solution

pytestmark = pytest.mark.timeout(180)

FORGE_REPORT = """\
import json, os
for name in ("softmax", "count_flops_matmul"):
    line = {"exercise": name, "status": "passed", "message": f"✔ {name}: passed", "warnings": []}
    for var in ("COURSE_GRADE_REPORT",):
        if os.environ.get(var):
            open(os.environ[var], "a").write(json.dumps(line) + "\\n")
print("✔ softmax: passed")
print("✔ count_flops_matmul: passed")
"""
REBIND_CHECK = """\
class AlwaysPasses:
    def __getattr__(self, name):
        return lambda *args, **kwargs: print(f"✔ {name}: passed")
check = AlwaysPasses()
"""
PATCH_CHECKERS = """\
import utils.checks, utils.checks._example as example
example.softmax = lambda fn: print("✔ softmax: passed")
example.count_flops_matmul = lambda fn: print("✔ count_flops_matmul: passed")
utils.checks._record = lambda *a, **k: None
utils.checks.ExerciseFailed = type("Nothing", (Exception,), {})
utils.checks._ALLOW_LIBRARY = True
"""


def test_a_stubbed_submission_scores_zero_whatever_it_forges(tmp_path):
    lab = make_lab(solution(), lab_name="99_lab")
    official = save(lab, tmp_path / "official.ipynb")
    attack = make_lab(solution(), lab_name="99_lab")
    # forgeries in an answer cell and in added cells, before and after the checks
    attack.cells[2].source = FORGE_REPORT + REBIND_CHECK + PATCH_CHECKERS + attack.cells[2].source
    extra = notebook(FORGE_REPORT, REBIND_CHECK, PATCH_CHECKERS).cells[1:]
    for i, cell in enumerate(extra):
        cell.id = f"added-{i}"
    again = notebook(FORGE_REPORT).cells[1]
    again.id = "added-again"
    attack.cells = attack.cells[:3] + extra + attack.cells[3:] + [again]
    # the learner's own check cells call the fake `check` too
    attack.cells[len(attack.cells) - 2].source = "check.count_flops_matmul(print)"
    path = save(attack, tmp_path / "attack.ipynb")
    report = grade.grade(path, timeout=60, lab=official)
    statuses = [(r["exercise"], r["status"]) for r in report["exercises"]]
    assert statuses == [("softmax", "not_attempted"), ("count_flops_matmul", "check_changed")]
    assert report["score"] == {"passed": 0, "total": 2}
    assert "not_attempted" in report["exercises"][1]["message"]       # what the real check said
    assert any("grading internals" in e for e in report["errors"])     # flagged for a human


def test_deleted_and_edited_check_cells_score_zero(tmp_path):
    official = save(make_lab(solution(), lab_name="99_lab"), tmp_path / "official.ipynb")
    solved = solution()
    del solved.cells[3]                                               # check.softmax deleted
    solved.cells[-1].source = "print('✔ count_flops_matmul: passed')"  # the other one edited
    path = save(solved, tmp_path / "solved.ipynb")
    report = grade.grade(path, timeout=60, lab=official)
    assert [r["status"] for r in report["exercises"]] == ["check_changed", "check_changed"]
    assert report["score"] == {"passed": 0, "total": 2}
    # the official checks ran anyway, and the instructor sees their verdict
    assert all("says: passed" in r["message"] for r in report["exercises"])
    table = grade.format_report(report)
    assert table.endswith("0/2 exercises passed") and "check changed" in table


def test_the_library_answer_is_refused_even_when_the_learner_allows_it(tmp_path):
    lab_source = notebook("from utils.checks import ch03 as check",
                          "import numpy as np\n"
                          "def attainable(intensity, peak_flops, bandwidth):\n"
                          "    ### BEGIN SOLUTION\n"
                          "    if np.any(np.asarray(intensity) < 0):\n"
                          "        raise ValueError('intensity must be >= 0')\n"
                          "    return np.minimum(peak_flops, np.asarray(intensity) * bandwidth)\n"
                          "    ### END SOLUTION",
                          "check.attainable(attainable)")
    official = save(make_lab(lab_source, lab_name="99_lab"), tmp_path / "official.ipynb")
    submission = make_lab(lab_source, lab_name="99_lab")
    submission.cells[2].source = ("import utils.checks\n"
                                  "utils.checks._ALLOW_LIBRARY = True\n"
                                  "from utils.roofline import attainable")
    path = save(submission, tmp_path / "borrowed.ipynb")
    report = grade.grade(path, timeout=60, lab=official)
    row = report["exercises"][0]
    assert row["status"] == "library_answer", row
    assert "utils.roofline.attainable" in row["message"]
    assert report["score"] == {"passed": 0, "total": 1}
    # the learner's own answer passes in the same setting
    assert grade.grade(save(lab_source, tmp_path / "own.ipynb"), timeout=60,
                       lab=official)["score"] == {"passed": 1, "total": 1}


@pytest.mark.parametrize("args, complaint", [
    (["--timeout", "-5"], "--timeout must be a positive, finite number of seconds, got -5.0"),
    (["--timeout", "nan"], "--timeout must be a positive, finite number of seconds"),
    (["--timeout", "inf"], "--timeout must be a positive, finite number of seconds"),
    (["--timeout", "soon"], "--timeout must be a number of seconds, got 'soon'"),
    (["--total-timeout", "0"], "--total-timeout must be a positive, finite number of seconds"),
    (["--json", "/no/such/folder/out.json"], "the folder /no/such/folder does not exist"),
])
def test_bad_options_are_refused_with_one_line(tmp_path, args, complaint, capsys):
    path = save(solution(), tmp_path / "solved.ipynb")
    assert grade.main([str(path), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and complaint in captured.err


def test_the_lab_comes_from_the_course_not_the_submission(tmp_path, capsys):
    nb = solution()
    nb.metadata["course"] = {"lab": "../../../etc/passwd"}    # not a lab name: ignored
    path = save(nb, tmp_path / "mine.ipynb")
    assert grade.main([str(path)]) == 2
    assert "cannot tell which lab this is" in capsys.readouterr().err
    assert grade.main([str(path), "--lab", str(tmp_path / "missing.ipynb")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_renamed_submission_finds_its_lab_by_metadata(tmp_path):
    lab = grade.read_notebook(grade.COURSE_ROOT / "labs" / "17_paged_attention.ipynb")
    assert lab.metadata["course"]["lab"] == "17_paged_attention"
    path = save(lab, tmp_path / "alice.ipynb")
    assert grade.find_official_lab(path, lab) == grade.COURSE_ROOT / "labs" / "17_paged_attention.ipynb"
