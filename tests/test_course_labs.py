"""The grader on the course's own notebooks: every freshly generated lab is "not
attempted" throughout (not failed, not crashed), and the grader passes a solution.

nbval already re-executes every solution and fails on any check cell that raises, so
grading every solution again would only double the suite's time; one solution is graded
end to end to hold the grader itself to the course's notebooks."""
from pathlib import Path

import pytest

from utils import grade

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
LABS = sorted((ROOT / "labs").glob("*.ipynb"))


def test_every_solution_has_a_lab_and_exercises():
    assert SOLUTIONS, "no solutions found"
    assert [p.name for p in SOLUTIONS] == [p.name for p in LABS]
    for path in SOLUTIONS:
        assert grade.find_exercises(grade.read_notebook(path)), f"{path.name} has no exercises"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", [ROOT / "solutions" / "03_roofline.ipynb"], ids=lambda p: p.name)
def test_solution_passes_every_exercise(path):
    report = grade.grade(path, timeout=120, total_timeout=240)
    failed = [(r["exercise"], r["status"], r.get("message", "")[:300])
              for r in report["exercises"] if r["status"] not in grade.PASSING]
    assert not failed, failed
    assert report["score"]["passed"] == report["score"]["total"] >= 3


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", LABS, ids=lambda p: p.name)
def test_lab_is_not_attempted(path):
    report = grade.grade(path, timeout=120, total_timeout=240)
    statuses = {r["exercise"]: r["status"] for r in report["exercises"]}
    assert set(statuses.values()) == {"not_attempted"}, statuses
