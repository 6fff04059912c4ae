"""The grader (utils.grade) and the notebook runner (utils.nbrun), on tiny notebooks.

Each kernel start costs a few seconds, so the tests share a handful of runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from utils import grade, nbrun
from utils.labgen import make_lab

REPO = Path(__file__).resolve().parents[1]

SETUP = "from utils.checks import _example as check"
SOFTMAX = ("def softmax(x):\n"
           "    ### BEGIN SOLUTION\n"
           "    z = x - x.amax(-1, keepdim=True)\n"
           "    return z.exp() / z.exp().sum(-1, keepdim=True)\n"
           "    ### END SOLUTION")
FLOPS = ("def count_flops_matmul(m, n, k):\n"
         "    ### BEGIN SOLUTION\n"
         "    return 2 * m * n * k\n"
         "    ### END SOLUTION")


def notebook(*sources):
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                               "language": "python"}})
    nb.cells = [new_markdown_cell("# A lab")] + [new_code_cell(s) for s in sources]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"          # as a lab and its copies share ids
    return nb


def solution():
    return notebook(SETUP, SOFTMAX, "check.softmax(softmax)",
                    FLOPS, "%time check.count_flops_matmul(count_flops_matmul)")


def save(nb, path):
    nbformat.write(nb, path)
    return path


def run_grade(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "utils.grade", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def official(tmp_path, nb=None):
    """The official lab made from ``nb`` (default: the solution above), saved in tmp_path."""
    return save(make_lab(nb or solution(), lab_name="99_lab"), tmp_path / "official.ipynb")


def test_find_exercises_reads_the_source():
    nb = notebook(SETUP, "check.a(f)  # check.not_this(g)\nx = check.b(h)",
                  "%%time\ncheck.c(f)", "def broken(:\n    check.d(f)", "check.a(f)")
    assert grade.find_exercises(nb) == [("a", 2), ("b", 2), ("c", 3), ("d", 4)]


@pytest.mark.timeout(120)
def test_solved_notebook_passes_and_json_matches(tmp_path):
    path = save(solution(), tmp_path / "03_lab.ipynb")
    out = tmp_path / "result.json"
    done = run_grade(path, "--lab", official(tmp_path), "--json", out)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "2/2 exercises passed"
    assert any(line.split() == ["softmax", "passed"] for line in lines)
    assert any(line.split() == ["count_flops_matmul", "passed"] for line in lines)
    result = json.loads(out.read_text())
    assert result["notebook"] == str(path) and result["errors"] == []
    assert result["score"] == {"passed": 2, "total": 2}
    assert [(e["exercise"], e["status"]) for e in result["exercises"]] == [
        ("softmax", "passed"), ("count_flops_matmul", "passed")]
    assert result["exercises"][0]["message"].startswith("✔ softmax: passed — ")


@pytest.mark.timeout(120)
def test_generated_lab_is_not_attempted(tmp_path):
    path = save(make_lab(solution()), tmp_path / "03_lab.ipynb")
    before = path.read_bytes()
    result = grade.grade(path, timeout=60, lab=official(tmp_path))
    assert [(e["exercise"], e["status"]) for e in result["exercises"]] == [
        ("softmax", "not_attempted"), ("count_flops_matmul", "not_attempted")]
    assert result["score"] == {"passed": 0, "total": 2}
    assert path.read_bytes() == before                       # the learner's file is untouched
    table = grade.format_report(result)
    assert "softmax             not attempted" in table and table.endswith("0/2 exercises passed")


@pytest.mark.timeout(120)
def test_wrong_answer_fails_and_a_hanging_cell_times_out(tmp_path):
    naive = "def softmax(x):\n    return x.exp() / x.exp().sum(-1, keepdim=True)"
    hang = "import os\nopen('kernel.pid', 'w').write(str(os.getpid()))\nwhile True: pass"
    nb = notebook(SETUP, naive, "check.softmax(softmax)", "undefined_name",
                  hang, FLOPS, "check.count_flops_matmul(count_flops_matmul)")
    lab = notebook(SETUP, SOFTMAX, "check.softmax(softmax)", "undefined_name",
                   "### BEGIN SOLUTION\n### END SOLUTION", FLOPS,
                   "check.count_flops_matmul(count_flops_matmul)")
    lab = official(tmp_path, lab)
    path = save(nb, tmp_path / "hangs.ipynb")
    start = time.monotonic()
    done = run_grade(path, "--lab", lab, "--timeout", 10, "--json", tmp_path / "r.json", timeout=100)
    elapsed = time.monotonic() - start
    assert done.returncode == 1, done.stdout + done.stderr
    assert elapsed < 50                          # 10 s for the cell, the rest is kernel start-up
    out = done.stdout
    assert ("softmax             failed — softmax(x) for x of shape (2, 6), torch.float32, "
            "large values has wrong values") in out
    assert "count_flops_matmul  not run — code cell 5 (`import os`) timed out after 10 s" in out
    assert "note: code cell 4 (`undefined_name`) raised NameError" in out
    assert out.splitlines()[-1] == "0/2 exercises passed"
    result = json.loads((tmp_path / "r.json").read_text())
    failed = result["exercises"][0]
    assert failed["status"] == "failed"
    assert "expected:" in failed["message"] and "hint:" in failed["message"]
    assert result["exercises"][1]["status"] == "not_run"
    # the kernel ran in the notebook's folder, and it is gone
    pid = int((tmp_path / "kernel.pid").read_text())
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), f"kernel {pid} left running"


def test_not_a_notebook_and_no_exercises(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not json")
    done = run_grade(text)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == f"grade: {text}: not a notebook (invalid JSON: " \
                                  "Expecting value: line 1 column 1 (char 0))"
    assert grade.main([str(tmp_path / "missing.ipynb")]) == 2
    assert capsys.readouterr().err == f"grade: {tmp_path / 'missing.ipynb'}: no such file\n"
    (tmp_path / "list.ipynb").write_text("[1, 2]")
    assert grade.main([str(tmp_path / "list.ipynb")]) == 2
    assert "not a notebook" in capsys.readouterr().err
    empty = save(notebook("x = 1"), tmp_path / "empty.ipynb")
    assert grade.main([str(empty)]) == 2
    assert "cannot tell which lab this is" in capsys.readouterr().err
    assert grade.main([str(empty), "--lab", str(empty)]) == 2
    assert "the official lab has no exercises" in capsys.readouterr().err


# ------------------------------------------------------------------------------ nbrun

@pytest.mark.timeout(120)
def test_nbrun_executes_in_place_with_counts_from_one(tmp_path, capsys):
    nb = notebook("open('data.txt', 'w').write('from the notebook folder')",
                  "print(open('data.txt').read())",
                  "",
                  "1 / 0",
                  "6 * 7")
    nb.cells[1].execution_count = 7
    nb.cells[2].outputs = [new_output("stream", name="stdout", text="stale\n")]
    nb.cells[2].metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
    nb.cells[4].metadata["tags"] = ["raises-exception"]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    path = save(nb, tmp_path / "01_chapter.ipynb")
    assert nbrun.main([str(path)]) == 0
    assert "01_chapter.ipynb: 4 code cells in" in capsys.readouterr().out
    ran = nbformat.read(path, as_version=4)
    code = [c for c in ran.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [1, 2, None, 3, 4]
    assert code[1].outputs[0].text == "from the notebook folder\n"
    assert code[3].outputs[0].ename == "ZeroDivisionError"           # expected, tagged
    assert code[4].outputs[0].data["text/plain"] == "42"
    assert all("execution" not in c.metadata for c in ran.cells)
    assert "widgets" not in ran.metadata and ran.metadata.language_info.name == "python"
    assert path.read_text().endswith("}\n")

    nb = notebook("x = 1", "x / 0", "print('never')")
    path = save(nb, tmp_path / "02_broken.ipynb")
    before = path.read_bytes()
    assert nbrun.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "code cell 2 (`x / 0`) raised ZeroDivisionError" in out
    assert path.read_bytes() == before                                  # left as it was
