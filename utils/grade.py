"""Grade a learner's lab notebook: run it against the official lab and score its exercises.

::

    python -m utils.grade labs/03_roofline.ipynb
    python -m utils.grade submissions/alice.ipynb --timeout 120 --json alice.json
    python -m utils.grade alice.ipynb --lab labs/17_paged_attention.ipynb

What is graded comes from the course, never from the submission (nbgrader's autograder
works the same way):

* **The official lab** is found by the submission's metadata (``course.lab``, written by
  ``utils.labgen``), else by its file name, in the course's ``labs/`` folder; ``--lab``
  names it explicitly. The exercise list is the official lab's ``check.<name>(`` calls.
* **Cells** are matched by cell id. The learner's *answer cells* (the cells that hold a
  stub in the official lab) and any code cells the learner added are run as submitted;
  every other code cell (setup, measurements, checks) is run as the official lab has
  it, whatever the submission did to it. A check cell deleted or edited in the
  submission is reported (``check_changed``) and scores zero; the official one is still
  run, and its verdict is shown for the instructor.
* **Outcomes** do not come from the submission's output or any file it could write.
  Before each check cell the grader loads a fresh copy of the checker modules from the
  course's files and binds it to ``check``; after the cell it reads the outcomes that
  this copy recorded, through the kernel's reply to its own request, tagged with a
  nonce made after every learner cell before it has run. A forged report, a printed
  "✔ passed", a rebound ``check`` or a patched checker does not count.

It prints one row per exercise (passed; passed with a measurement warning; failed with
the first line of the checker's message; library answer; not attempted; check changed;
not run and why) and a score line. Measurement warnings are listed apart and do not
affect the score. Exit status: 0 when every exercise passed, 1 otherwise, 2 for bad
usage (not a notebook, no official lab, bad options). The learner's file is never
modified. Code that rewrites Python itself (builtins, the standard library) is beyond
what any grader running in the learner's kernel can rule out: the report flags
submissions whose code reaches for grading internals, for the instructor to read.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import secrets
import sys
from pathlib import Path

import nbformat

from .nbrun import NotebookError, cell_label, execute_cells, read_notebook

#: Row statuses. ``measurement_warning`` counts as passed; the others after it do not.
STATUSES = ("passed", "measurement_warning", "failed", "library_answer", "not_attempted",
            "check_changed", "not_run")
PASSING = ("passed", "measurement_warning")

COURSE_ROOT = Path(__file__).resolve().parent.parent
_CALL = re.compile(r"\bcheck\s*\.\s*([A-Za-z_]\w*)\s*\(")
_STUB = re.compile(r'raise NotImplementedError\("(exercise \w+: )?replace this line with your code"\)')
_CHECK_MODULE = re.compile(r"^\s*from\s+utils\.checks\s+import\s+(\w+)\s+as\s+check\b", re.M)
_SUSPICIOUS = re.compile(r"\b(builtins|sys\.modules|_GRADER|__course_grade|COURSE_GRADE_REPORT|"
                         r"_getframe|gc\.get_objects|_ALLOW_LIBRARY|allow_library_answers|"
                         r"user_expressions|importlib\.reload)\b")


class GradeError(ValueError):
    """The grading cannot start: no official lab, or it does not fit the submission."""


# --------------------------------------------------------------------------- exercises

def _calls_in_source(source: str) -> list[str]:
    """Names ``n`` of ``check.n(...)`` calls, in order of appearance (comments ignored)."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        python = TransformerManager().transform_cell(source)  # %magics → plain Python
        tree = ast.parse(python)
    except Exception:  # a syntax error: fall back to reading the text
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


def is_answer_cell(cell: nbformat.NotebookNode) -> bool:
    """A code cell of the official lab that holds a stub for the learner to replace."""
    return cell.cell_type == "code" and bool(_STUB.search(cell.source))


# --------------------------------------------------------------------------- the official lab

def find_official_lab(path: Path, nb: nbformat.NotebookNode, lab: str | os.PathLike | None = None,
                      labs_dir: Path | None = None) -> Path:
    """The official lab a submission belongs to (see the module docstring)."""
    if lab is not None:
        lab = Path(lab)
        if not lab.is_file():
            raise GradeError(f"--lab {lab}: no such file")
        return lab
    labs_dir = labs_dir or COURSE_ROOT / "labs"
    named = nb.metadata.get("course", {}).get("lab") if isinstance(nb.metadata.get("course"), dict) \
        else None
    candidates = []
    if isinstance(named, str) and re.fullmatch(r"[\w.-]+", named):
        candidates.append(labs_dir / f"{named}.ipynb")
    candidates.append(labs_dir / path.name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise GradeError(f"{path}: cannot tell which lab this is (no course.lab in its metadata and no "
                     f"{labs_dir / path.name}); name it with --lab labs/NN_slug.ipynb")


def _same(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def compose(official: nbformat.NotebookNode, submission: nbformat.NotebookNode) -> tuple:
    """The notebook to run, and what was replaced.

    Returns ``(nb, check_cells, notes, changed_checks, suspicious)``: ``check_cells`` maps a
    position in ``nb`` to the exercise names its official check cell calls;
    ``changed_checks`` names the exercises whose check cell the submission deleted or
    edited; ``suspicious`` labels the learner's cells that touch grading internals.
    """
    mine = {c.get("id"): c for c in submission.cells if c.get("id")}
    official_ids = {c.get("id") for c in official.cells}
    # learner-added code cells, attached to the official cell they follow
    extras: dict[str | None, list] = {}
    anchor = None
    for cell in submission.cells:
        if cell.get("id") in official_ids:
            anchor = cell.get("id")
        elif cell.cell_type == "code" and cell.source.strip():
            extras.setdefault(anchor, []).append(cell)
    nb = nbformat.v4.new_notebook(metadata=official.metadata)
    check_cells: dict[int, list[str]] = {}
    notes, changed, replaced, suspicious = [], [], [], []

    def add(cell, learners: bool):
        nb.cells.append(nbformat.from_dict({"cell_type": cell.cell_type, "id": cell.get("id"),
                                            "metadata": {}, "source": cell.source,
                                            **({"outputs": [], "execution_count": None}
                                               if cell.cell_type == "code" else {})}))
        if learners and _SUSPICIOUS.search(cell.source):
            suspicious.append(len(nb.cells) - 1)

    for index, cell in [(None, None)] + list(enumerate(official.cells)):
        if cell is not None:
            theirs = mine.get(cell.get("id"))
            if is_answer_cell(cell):
                if theirs is None:
                    notes.append(f"the answer cell {cell_label(official, index)} "
                                 "is missing from the submission; the stub was run")
                    add(cell, False)
                else:
                    add(theirs, True)
            else:
                add(cell, False)
                names = _calls_in_source(cell.source) if cell.cell_type == "code" else []
                if names:
                    check_cells[len(nb.cells) - 1] = names
                    if theirs is None or not _same(theirs.source, cell.source):
                        changed += [n for n in names if n not in changed]
                elif cell.cell_type == "code" and (theirs is None or
                                                   not _same(theirs.source, cell.source)):
                    replaced.append(cell_label(official, index))
        for extra in extras.get(cell.get("id") if cell is not None else None, []):
            add(extra, True)
    if replaced:
        notes.append("cells deleted or edited in the submission were run as the official lab has "
                     "them: " + ", ".join(replaced))
    return nb, check_cells, notes, changed, suspicious


# --------------------------------------------------------------------------- the channel

_FRESH = '''
def __course_fresh_checks(module, nonce):
    import importlib, sys
    prefix = "utils.checks"
    ours = lambda name: name == prefix or name.startswith(prefix + ".")
    package = sys.modules.get("utils")
    saved = {name: sys.modules.pop(name) for name in [n for n in sys.modules if ours(n)]}
    saved_attribute = getattr(package, "checks", None)
    try:
        fresh = importlib.import_module(prefix + "." + module)
        base = sys.modules[prefix]
    finally:
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
        if package is not None and saved_attribute is not None:
            package.checks = saved_attribute
    outcomes = []
    base._GRADER = outcomes.append
    return {"nonce": nonce, "module": fresh, "outcomes": outcomes}
__course_grade_%(nonce)s = __course_fresh_checks(%(module)r, %(nonce)r)
del __course_fresh_checks
check = __course_grade_%(nonce)s["module"]
'''

_READ = ('__import__("json").dumps({"nonce": __course_grade_%(nonce)s["nonce"], '
         '"outcomes": [{k: str(v) if k != "warnings" else [str(w) for w in v] '
         'for k, v in o.items()} for o in __course_grade_%(nonce)s["outcomes"]]})')


class _Channel:
    """Sets up a fresh checker before each check cell and reads its outcomes after it."""

    def __init__(self, module: str, check_cells: dict[int, list[str]]):
        self.module = module
        self.check_cells = check_cells
        self.nonce: str | None = None
        self.outcomes: dict[str, dict] = {}
        self.problems: list[str] = []

    def before(self, position: int, silent) -> None:
        self.nonce = None
        if position not in self.check_cells:
            return
        nonce = secrets.token_hex(8)
        try:
            silent(_FRESH % {"nonce": nonce, "module": self.module})
            self.nonce = nonce
        except Exception as err:
            self.problems.append(f"could not load the checkers before cell {position + 1}: {err}")

    def after(self, position: int, silent) -> None:
        nonce, self.nonce = self.nonce, None
        if nonce is None:
            return
        try:
            reply = silent("", {"r": _READ % {"nonce": nonce}})["r"]
            if reply.get("status") != "ok":
                raise ValueError(f"{reply.get('ename')}: {reply.get('evalue')}")
            data = json.loads(ast.literal_eval(reply["data"]["text/plain"]))
            if data.get("nonce") != nonce:
                raise ValueError("the reply does not carry this check's nonce")
        except Exception as err:
            self.problems.append(f"could not read the outcomes of cell {position + 1}: {err}")
            return
        for outcome in data["outcomes"]:
            if outcome.get("exercise") in self.check_cells[position] \
                    and outcome.get("status") in STATUSES:
                self.outcomes[outcome["exercise"]] = outcome


# --------------------------------------------------------------------------- grading

def _positive_seconds(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return value


def grade(path: str | os.PathLike, timeout: float = 300, total_timeout: float = 1800,
          lab: str | os.PathLike | None = None) -> dict:
    """Run the submission at ``path`` against its official lab and score it.

    Returns ``{"notebook", "lab", "exercises": [{"exercise", "status", "message",
    "warnings", "cell"}], "score": {"passed", "total"}, "warnings", "errors", "wall_s"}``.
    Raises ``NotebookError`` for a file that is not a notebook, ``GradeError`` when its
    official lab cannot be found, ``ValueError`` for a bad time limit.
    """
    timeout = _positive_seconds(timeout, "timeout")
    total_timeout = _positive_seconds(total_timeout, "total_timeout")
    path = Path(path)
    submission = read_notebook(path)
    official_path = find_official_lab(path, submission, lab)
    official = read_notebook(official_path)
    exercises = find_exercises(official)
    report = {"notebook": str(path), "lab": str(official_path), "exercises": [],
              "score": {"passed": 0, "total": 0}, "warnings": [], "errors": [], "wall_s": 0.0}
    if not exercises:
        raise GradeError(f"{official_path}: the official lab has no exercises (no check.<name>( calls)")
    found = _CHECK_MODULE.search("\n".join(c.source for c in official.cells if c.cell_type == "code"))
    if not found:
        raise GradeError(f"{official_path}: no `from utils.checks import <module> as check` line")
    nb, check_cells, notes, changed, suspicious = compose(official, submission)
    channel = _Channel(found.group(1), check_cells)
    run = execute_cells(nb, path.resolve().parent, cell_timeout=timeout,
                        total_timeout=total_timeout, before_cell=channel.before,
                        after_cell=channel.after)
    errors_at = {e.position: e for e in run.errors}
    positions = {name: min(p for p, names in check_cells.items() if name in names)
                 for name, _ in exercises}
    for name, _ in exercises:
        position = positions[name]
        row = {"exercise": name, "cell": cell_label(nb, position), "warnings": []}
        outcome = channel.outcomes.get(name)
        if outcome is not None:
            row["status"] = outcome["status"]
            row["message"] = outcome.get("message", "")
            row["warnings"] = list(outcome.get("warnings", []))
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
        if name in changed:
            row["message"] = (f"the check cell was deleted or edited in the submission, so it scores "
                              f"zero; the official check, run instead, says: {row['status']} — "
                              f"{_first_line(row['message'])}")
            row["status"] = "check_changed"
        report["exercises"].append(row)
        report["warnings"] += [f"{name}: {w}" for w in row["warnings"]]
    if run.stopped:
        report["errors"].append(run.stopped)
    report["errors"] += notes + channel.problems
    for error in run.errors:
        if error.position not in check_cells and not error.allowed:
            report["errors"].append(f"{error.label} raised {error.ename}: {error.evalue}")
    if suspicious:
        report["errors"].append("review by hand: the learner's code reaches for grading internals "
                                "in " + ", ".join(cell_label(nb, p) for p in suspicious))
    report["score"] = {"passed": sum(r["status"] in PASSING for r in report["exercises"]),
                       "total": len(report["exercises"])}
    report["wall_s"] = round(run.wall_s, 3)
    return report


def _first_line(message: str) -> str:
    return next((line.strip() for line in message.splitlines() if line.strip()), "")


def _status_text(row: dict) -> str:
    first = re.sub(rf"^exercise {re.escape(row['exercise'])}: ", "", _first_line(row.get("message", "")))
    if len(first) > 110:
        first = first[:109] + "…"
    return {"passed": "passed",
            "measurement_warning": "passed, measurement warning (see below)",
            "failed": f"failed — {first}",
            "library_answer": f"library answer — {first}",
            "not_attempted": "not attempted",
            "check_changed": f"check changed — {first}",
            "not_run": f"not run — {first}"}[row["status"]]


def format_report(report: dict) -> str:
    """The table, notes and score line that the command prints."""
    rows = report["exercises"]
    width = max(len("exercise"), *(len(r["exercise"]) for r in rows))
    lines = [f"{'exercise':<{width}}  status", f"{'-' * width}  {'-' * 6}"]
    lines += [f"{r['exercise']:<{width}}  {_status_text(r)}" for r in rows]
    if report["warnings"]:
        lines.append("")
        lines.append("measurement warnings (this machine disagreed with the model; not scored):")
        lines += ["  " + w.replace("\n", "\n  ") for w in report["warnings"]]
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
        description="Run a lab notebook against the official lab in a fresh kernel and score it.")
    parser.add_argument("notebook", help="the learner's notebook (.ipynb); it is not modified")
    parser.add_argument("--lab", metavar="LAB.ipynb",
                        help="the official lab (default: from the notebook's metadata or name, "
                             "in the course's labs/)")
    parser.add_argument("--timeout", default="300", metavar="SECONDS",
                        help="limit for one cell (default: %(default)s)")
    parser.add_argument("--total-timeout", default="1800", metavar="SECONDS",
                        help="limit for the whole notebook (default: %(default)s)")
    parser.add_argument("--json", metavar="OUT.json", help="also write the result as JSON")
    args = parser.parse_args(argv)
    try:
        timeout = _positive_seconds(args.timeout, "--timeout")
        total = _positive_seconds(args.total_timeout, "--total-timeout")
    except ValueError as err:
        print(f"grade: {err}", file=sys.stderr)
        return 2
    if args.json:
        folder = Path(args.json).resolve().parent
        if not folder.is_dir():
            print(f"grade: --json {args.json}: the folder {folder} does not exist", file=sys.stderr)
            return 2
    try:
        report = grade(args.notebook, timeout=timeout, total_timeout=total, lab=args.lab)
    except (NotebookError, GradeError) as err:
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
    score = report["score"]
    return 0 if score["passed"] == score["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
