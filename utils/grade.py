"""Grade a learner's lab notebook: run it and score its exercises.

::

    python -m utils.grade labs/03_roofline.ipynb
    python -m utils.grade submissions/alice.ipynb --timeout 120 --json alice.json

The notebook runs top to bottom in a fresh kernel, in its own folder, errors allowed
(every check cell counts on its own). The exercises are the ``check.<name>(`` calls in
its code cells, read from the source; each checker records its outcome in a file
named by ``COURSE_GRADE_REPORT`` (see ``utils.checks``), which this tool sets for the
kernel. It prints one row per exercise (passed, failed with the first line of the
checker's message, not attempted, or not run and why) and a score line, and exits 0
only when every exercise passed (1 otherwise, 2 when the file is not a notebook or
has no exercises). A cell that hangs ends the run: the kernel is killed and the
exercises after it are "not run". The learner's file is never modified.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat

from .checks import REPORT_ENV
from .nbrun import NotebookError, cell_label, execute_cells, read_notebook

STATUSES = ("passed", "failed", "not_attempted", "not_run")
_CALL = re.compile(r"\bcheck\s*\.\s*([A-Za-z_]\w*)\s*\(")


# --------------------------------------------------------------------------- exercises

def _calls_in_source(source: str) -> list[str]:
    """Names ``n`` of ``check.n(...)`` calls, in order of appearance (comments ignored)."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        python = TransformerManager().transform_cell(source)  # %magics → plain Python
        tree = ast.parse(python)
    except Exception:  # a learner's syntax error: fall back to reading the text
        lines = [line.split("#", 1)[0] for line in source.splitlines()]
        return _CALL.findall("\n".join(lines))
    found: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if isinstance(node.func.value, ast.Name) and node.func.value.id == "check":
            found.append((node.lineno, node.col_offset, node.func.attr))
        elif node.func.attr in ("run_line_magic", "run_cell_magic") and node.args and \
                isinstance(node.args[-1], ast.Constant) and isinstance(node.args[-1].value, str):
            # `%time check.x(f)` / `%%time` cells: the code is the magic's last argument
            for i, name in enumerate(_calls_in_source(node.args[-1].value)):
                found.append((node.lineno, node.col_offset + i, name))
    return [name for _, _, name in sorted(found)]


def find_exercises(nb: nbformat.NotebookNode) -> list[tuple[str, int]]:
    """``(name, position)`` of each exercise, by its first ``check.<name>(`` call."""
    found: dict[str, int] = {}
    for position, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            for name in _calls_in_source(cell.source):
                found.setdefault(name, position)
    return list(found.items())


def _read_records(path: Path) -> dict[str, dict]:
    """The last record of each exercise in a COURSE_GRADE_REPORT file."""
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("status") in STATUSES:
            records[str(record.get("exercise"))] = record
    return records


# --------------------------------------------------------------------------- grading

def grade(path: str | os.PathLike, timeout: float = 300, total_timeout: float = 1800) -> dict:
    """Run the notebook at ``path`` and score it.

    Returns ``{"notebook", "exercises": [{"exercise", "status", "message", "cell"}],
    "score": {"passed", "total"}, "errors": [...], "wall_s"}``; ``status`` is one of
    ``passed``, ``failed``, ``not_attempted``, ``not_run``. Raises ``NotebookError`` for a
    file that is not a notebook.
    """
    path = Path(path)
    nb = read_notebook(path)
    exercises = find_exercises(nb)
    report = {"notebook": str(path), "exercises": [], "score": {"passed": 0, "total": 0},
              "errors": [], "wall_s": 0.0}
    if not exercises:
        report["errors"].append("no exercises found: no code cell calls check.<name>(...)")
        return report
    with tempfile.TemporaryDirectory(prefix="course-grade-") as tmp:
        record_file = Path(tmp) / "outcomes.jsonl"
        run = execute_cells(nb, path.resolve().parent, cell_timeout=timeout,
                            total_timeout=total_timeout, env={REPORT_ENV: str(record_file)})
        records = _read_records(record_file)
    errors_at = {e.position: e for e in run.errors}
    check_cells = {position for _, position in exercises}
    for name, position in exercises:
        row = {"exercise": name, "cell": cell_label(nb, position)}
        if name in records:
            row["status"] = records[name]["status"]
            row["message"] = str(records[name].get("message", ""))
        elif position in run.finished:
            row["status"] = "not_run"
            error = errors_at.get(position)
            row["message"] = (f"{row['cell']} raised {error.ename}: {error.evalue}" if error
                              else f"{row['cell']} ran but did not reach the checker")
            stubs = [e for e in run.errors
                     if e.position < position and e.ename in ("NotImplementedError", "NotAttempted")]
            if error is not None and stubs:
                # the check needs results of earlier exercises that are still stubs
                row["status"] = "not_attempted"
                row["message"] = (f"{row['message']} (it needs earlier exercises: "
                                  f"{stubs[0].label} is still a stub)")
        else:
            row["status"] = "not_run"
            row["message"] = run.stopped or f"{row['cell']} did not run"
        report["exercises"].append(row)
    if run.stopped:
        report["errors"].append(run.stopped)
    for error in run.errors:
        if error.position not in check_cells and not error.allowed:
            report["errors"].append(f"{error.label} raised {error.ename}: {error.evalue}")
    report["score"] = {"passed": sum(r["status"] == "passed" for r in report["exercises"]),
                       "total": len(report["exercises"])}
    report["wall_s"] = round(run.wall_s, 3)
    return report


def _status_text(row: dict) -> str:
    message = row.get("message", "")
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    first = re.sub(rf"^exercise {re.escape(row['exercise'])}: ", "", first)
    if len(first) > 110:
        first = first[:109] + "…"
    return {"passed": "passed",
            "failed": f"failed — {first}",
            "not_attempted": "not attempted",
            "not_run": f"not run — {first}"}[row["status"]]


def format_report(report: dict) -> str:
    """The table, notes and score line that the command prints."""
    rows = report["exercises"]
    if not rows:
        return f"{report['notebook']}: {report['errors'][0]}"
    width = max(len("exercise"), *(len(r["exercise"]) for r in rows))
    lines = [f"{'exercise':<{width}}  status", f"{'-' * width}  {'-' * 6}"]
    lines += [f"{r['exercise']:<{width}}  {_status_text(r)}" for r in rows]
    if report["errors"]:
        lines.append("")
        lines += [f"note: {e}" for e in report["errors"]]
    score = report["score"]
    lines.append("")
    lines.append(f"{score['passed']}/{score['total']} exercises passed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m utils.grade",
        description="Run a lab notebook in a fresh kernel and score its exercises.")
    parser.add_argument("notebook", help="the learner's notebook (.ipynb); it is not modified")
    parser.add_argument("--timeout", type=float, default=300, metavar="SECONDS",
                        help="limit for one cell (default: %(default)s)")
    parser.add_argument("--total-timeout", type=float, default=1800, metavar="SECONDS",
                        help="limit for the whole notebook (default: %(default)s)")
    parser.add_argument("--json", metavar="OUT.json", help="also write the result as JSON")
    args = parser.parse_args(argv)
    try:
        report = grade(args.notebook, timeout=args.timeout, total_timeout=args.total_timeout)
    except NotebookError as err:
        print(f"grade: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
        except OSError as err:
            print(f"grade: cannot write {args.json}: {err.strerror}", file=sys.stderr)
            return 2
    if not report["exercises"]:
        return 2
    score = report["score"]
    return 0 if score["passed"] == score["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
