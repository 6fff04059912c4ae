"""The lab generator (utils.labgen): solution regions become stubs, labs stay in sync."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from utils import labgen
from utils.labgen import LabgenError, make_lab

STUB = 'raise NotImplementedError("replace this line with your code")'
SOFTMAX_STUB = 'raise NotImplementedError("exercise softmax: replace this line with your code")'


def solution_notebook():
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                               "language": "python"}})
    nb.cells = [
        new_markdown_cell("# Lab 99: a test"),
        new_code_cell("from utils.checks import _example as check", execution_count=1),
        new_code_cell("def softmax(x):\n"
                      "    \"\"\"Softmax over the last dimension.\"\"\"\n"
                      "    ### BEGIN SOLUTION\n"
                      "    z = x - x.amax(-1, keepdim=True)\n"
                      "    return z.exp() / z.exp().sum(-1, keepdim=True)\n"
                      "    ### END SOLUTION\n",
                      execution_count=2, metadata={"tags": ["exercise"], "execution": {"iopub.status.busy": "2026-01-01T00:00:00Z"}}),
        new_code_cell("check.softmax(softmax)", execution_count=3,
                      outputs=[new_output("stream", name="stdout", text="✔ softmax: passed\n")]),
        new_code_cell("### BEGIN SOLUTION\nanswer = 42\n### END SOLUTION\n"
                      "print(answer)\n"
                      "def f():\n"
                      "        ### BEGIN SOLUTION\n"
                      "        return 1\n"
                      "        ### END SOLUTION", execution_count=4),
        new_markdown_cell("**Q1.** Why subtract the maximum?\n\n"
                          "### BEGIN ANSWER\nSo that exp does not overflow.\n### END ANSWER\n"),
    ]
    nb.metadata["widgets"] = {"state": {}}
    return nb


def test_make_lab_replaces_regions_and_clears_outputs():
    solution = solution_notebook()
    before = nbformat.writes(solution)
    lab = make_lab(solution)
    assert nbformat.writes(solution) == before                    # the solution is untouched
    src = [cell.source for cell in lab.cells]
    # a stub names the exercise whose check comes next; after the last check, none
    assert src[2] == 'def softmax(x):\n    """Softmax over the last dimension."""\n    ' + SOFTMAX_STUB + "\n"
    assert src[4] == STUB + "\nprint(answer)\ndef f():\n        " + STUB
    assert src[5] == "**Q1.** Why subtract the maximum?\n\n*Your answer here.*\n"
    assert src[0] == solution.cells[0].source and src[3] == solution.cells[3].source
    assert "amax" not in json.dumps(lab) and "overflow" not in json.dumps(lab)
    for cell in lab.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
        assert "execution" not in cell.metadata
    assert lab.cells[2].metadata.tags == ["exercise"]
    assert [c.id for c in lab.cells] == [c.id for c in solution.cells]
    assert lab.metadata.kernelspec == solution.metadata.kernelspec
    assert "widgets" not in lab.metadata
    assert "course" not in lab.metadata                 # no name given
    assert make_lab(solution, lab_name="99_test").metadata.course == {"lab": "99_test"}


def test_make_lab_is_idempotent_and_deterministic():
    solution = solution_notebook()
    lab = make_lab(solution)
    assert nbformat.writes(make_lab(lab)) == nbformat.writes(lab)
    assert nbformat.writes(make_lab(solution)) == nbformat.writes(lab)


@pytest.mark.parametrize("source, complaint", [
    ("### BEGIN SOLUTION\nx = 1\n", "without an '### END SOLUTION'"),
    ("x = 1\n### END SOLUTION\n", "without a '### BEGIN SOLUTION'"),
    ("### BEGIN SOLUTION\n  ### BEGIN SOLUTION\n### END SOLUTION\n", "cannot nest"),
    ("## BEGIN SOLUTION\nx = 1\n## END SOLUTION\n", "looks like a marker"),
    ("### BEGIN ANSWER\nx\n### END ANSWER\n", "does not belong in a code cell"),
])
def test_unbalanced_or_misplaced_markers_name_the_cell(source, complaint):
    nb = solution_notebook()
    nb.cells[3].source = source
    with pytest.raises(LabgenError) as e:
        make_lab(nb, name="solutions/99_test.ipynb")
    assert str(e.value).startswith("solutions/99_test.ipynb: cell 4 (code, id ")
    assert complaint in str(e.value)


def test_solution_marker_in_markdown_is_an_error():
    nb = solution_notebook()
    nb.cells[0].source = "### BEGIN SOLUTION\nsecret\n### END SOLUTION"
    with pytest.raises(LabgenError, match="cell 1 \\(markdown"):
        make_lab(nb)


def make_repo(tmp_path):
    (tmp_path / "solutions").mkdir()
    nbformat.write(solution_notebook(), tmp_path / "solutions" / "99_test.ipynb")
    return tmp_path


def test_check_detects_missing_stale_and_orphan_labs(tmp_path):
    root = make_repo(tmp_path)
    assert labgen.check(root) == ["labs/99_test.ipynb is missing (run python -m utils.labgen)"]
    assert labgen.generate(root) == [root / "labs" / "99_test.ipynb"]
    assert labgen.check(root) == []
    assert labgen.generate(root) == []                            # nothing to rewrite
    text = (root / "labs" / "99_test.ipynb").read_text()
    assert text.endswith("}\n") and '"outputs": []' in text
    nb = nbformat.read(root / "solutions" / "99_test.ipynb", as_version=4)
    nb.cells[0].source = "# Lab 99: a changed title"
    nbformat.write(nb, root / "solutions" / "99_test.ipynb")
    assert labgen.check(root) == ["labs/99_test.ipynb is out of date with "
                                  "solutions/99_test.ipynb (run python -m utils.labgen)"]
    labgen.generate(root)
    (root / "labs" / "98_old.ipynb").write_text(text)
    [orphan] = labgen.check(root)
    assert orphan.startswith("labs/98_old.ipynb has no solutions/98_old.ipynb")


def test_command_line(tmp_path, capsys):
    root = make_repo(tmp_path)
    assert labgen.main(["--check", "--root", str(root)]) == 1
    assert "labs/99_test.ipynb is missing" in capsys.readouterr().out
    assert labgen.main(["--root", str(root)]) == 0
    assert "wrote labs/99_test.ipynb" in capsys.readouterr().out
    bad = solution_notebook()
    bad.cells[2].source = "### BEGIN SOLUTION\n"
    nbformat.write(bad, root / "solutions" / "98_bad.ipynb")
    assert labgen.main(["--root", str(root)]) == 1
    assert "solutions/98_bad.ipynb: cell 3 (code" in capsys.readouterr().out
    (root / "solutions" / "98_bad.ipynb").unlink()
    # as the maintainers run it, from the repository root
    done = subprocess.run([sys.executable, "-m", "utils.labgen", "--check"], cwd=root,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all labs up to date" in done.stdout


def test_the_course_labs_are_in_sync_with_their_solutions():
    """labs/ is generated: after editing a solution, run `python -m utils.labgen`."""
    repo = Path(__file__).resolve().parents[1]
    assert labgen.check(repo) == []
