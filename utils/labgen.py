"""Generate the learners' labs from the solved notebooks.

``labs/NN_slug.ipynb`` is made from ``solutions/NN_slug.ipynb``::

    python -m utils.labgen            # write every lab
    python -m utils.labgen --check    # exit 1 when a lab is stale, missing or orphaned

The rules (nbgrader's markers, so the solutions can be fed to nbgrader or otter-grader
unchanged):

* In code cells, each region from a line ``### BEGIN SOLUTION`` to a line
  ``### END SOLUTION`` (any indentation) becomes one line
  ``raise NotImplementedError("exercise <name>: replace this line with your code")`` at
  the indentation of the ``BEGIN`` marker, where ``<name>`` is the exercise whose check
  (``check.<name>(``) comes next in the notebook, so a later check that runs into this
  stub can say which exercise it belongs to.
* In markdown cells, each region from ``### BEGIN ANSWER`` to ``### END ANSWER`` (the
  short answers to "questions to think about") becomes ``*Your answer here.*``.
* Every output and execution count is cleared; execution timings and widget state are
  dropped; all other metadata (cell ids, tags, the notebook's kernelspec) is kept. The
  notebook's metadata gains ``course.lab`` (the lab's name, e.g. ``17_paged_attention``),
  which the grader uses to find the official lab a renamed submission belongs to.

A marker without its partner, a nested marker, a marker in the wrong kind of cell, or
a line that looks like a marker but is not exactly one is an error naming the cell: a
solution must never leak into a lab. The output is deterministic, so ``--check``
compares files byte for byte.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from pathlib import Path

import nbformat

from .nbrun import NotebookError, clear_outputs, notebook_text, read_notebook, strip_volatile

SOLUTION = ("### BEGIN SOLUTION", "### END SOLUTION")
ANSWER = ("### BEGIN ANSWER", "### END ANSWER")
CODE_STUB = 'raise NotImplementedError("replace this line with your code")'
ANSWER_STUB = "*Your answer here.*"
PATTERN = "[0-9][0-9]_*.ipynb"

_LOOKS_LIKE_MARKER = re.compile(r"#+\s*(BEGIN|END)\s*(SOLUTION|ANSWER)\b", re.IGNORECASE)


class LabgenError(ValueError):
    """A solution notebook that cannot be turned into a lab (e.g. unbalanced markers)."""


def _replace_regions(source: str, markers: tuple[str, str], stub: str, where: str) -> str:
    """``source`` with each marked region replaced by ``stub`` at the marker's indentation."""
    begin, end = markers
    out: list[str] = []
    opened_at = None
    for number, line in enumerate(source.splitlines(keepends=True), 1):
        text = line.strip()
        if text == begin:
            if opened_at is not None:
                raise LabgenError(f"{where}: line {number}: '{begin}' inside the region opened "
                                  f"at line {opened_at} (regions cannot nest)")
            opened_at = number
            indent = line[: len(line) - len(line.lstrip())]
        elif text == end:
            if opened_at is None:
                raise LabgenError(f"{where}: line {number}: '{end}' without a '{begin}' before it")
            newline = "\n" if line.endswith("\n") else ""
            out.append(indent + stub + newline)
            opened_at = None
        elif opened_at is None:
            if _LOOKS_LIKE_MARKER.search(line):
                raise LabgenError(f"{where}: line {number} looks like a marker but is not exactly "
                                  f"'{begin}' or '{end}': {text!r}")
            out.append(line)
    if opened_at is not None:
        raise LabgenError(f"{where}: line {opened_at}: '{begin}' without an '{end}'")
    return "".join(out)


def _cell_name(i: int, cell: nbformat.NotebookNode) -> str:
    cell_id = f", id {cell['id']}" if cell.get("id") else ""
    return f"cell {i} ({cell.cell_type}{cell_id})"


def code_stub(exercise: str | None) -> str:
    """The line a solution region becomes, naming its exercise when there is one."""
    if not exercise:
        return CODE_STUB
    return f'raise NotImplementedError("exercise {exercise}: replace this line with your code")'


_CHECK_CALL = re.compile(r"\bcheck\s*\.\s*([A-Za-z_]\w*)\s*\(")


def _next_exercises(cells) -> list[str | None]:
    """For each cell, the exercise of the first ``check.<name>(`` in it or after it."""
    following: list[str | None] = [None] * len(cells)
    upcoming = None
    for i in range(len(cells) - 1, -1, -1):
        cell = cells[i]
        if cell.cell_type == "code":
            source = cell.source if isinstance(cell.source, str) else "".join(cell.source)
            code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
            found = _CHECK_CALL.findall(code)
            if found:
                upcoming = found[0]
        following[i] = upcoming
    return following


def make_lab(solution_nb: nbformat.NotebookNode, name: str = "solution",
             lab_name: str | None = None) -> nbformat.NotebookNode:
    """The lab for a solved notebook (a new notebook; the solution is not modified).

    ``name`` prefixes error messages (e.g. the solution's path); ``lab_name`` (e.g.
    ``17_paged_attention``) is stored in the lab's metadata as ``course.lab``.
    """
    lab = copy.deepcopy(solution_nb)
    if lab_name:
        lab.metadata["course"] = {"lab": lab_name}
    exercises = _next_exercises(lab.cells)
    rules = {"code": (SOLUTION, CODE_STUB, ANSWER), "markdown": (ANSWER, ANSWER_STUB, SOLUTION)}
    for i, cell in enumerate(lab.cells, 1):
        where = f"{name}: {_cell_name(i, cell)}"
        source = cell.source if isinstance(cell.source, str) else "".join(cell.source)
        if cell.cell_type not in rules:
            if _LOOKS_LIKE_MARKER.search(source):
                raise LabgenError(f"{where}: markers belong in code or markdown cells")
            continue
        markers, stub, wrong = rules[cell.cell_type]
        if cell.cell_type == "code":
            stub = code_stub(exercises[i - 1])
        for marker in wrong:
            if any(line.strip() == marker for line in source.splitlines()):
                raise LabgenError(f"{where}: '{marker}' does not belong in a {cell.cell_type} "
                                  f"cell (solutions are code cells, answers markdown cells)")
        cell.source = _replace_regions(source, markers, stub, where)
    return strip_volatile(clear_outputs(lab))


def lab_text(solution_path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """The text of the lab generated from the solution notebook at ``solution_path``."""
    solution_path = Path(solution_path)
    shown = solution_path.relative_to(root) if root else solution_path
    return notebook_text(make_lab(read_notebook(solution_path), name=str(shown),
                                  lab_name=solution_path.stem))


def _pairs(root: Path) -> tuple[list[Path], list[Path]]:
    return (sorted((root / "solutions").glob(PATTERN)), sorted((root / "labs").glob(PATTERN)))


def generate(root: str | os.PathLike) -> list[Path]:
    """Write every lab under ``root``; returns the labs written (unchanged ones are not).

    Raises :class:`LabgenError` listing every solution that cannot be converted (after
    writing the others).
    """
    root = Path(root)
    written, problems = [], []
    for solution in _pairs(root)[0]:
        lab = root / "labs" / solution.name
        try:
            text = lab_text(solution, root)
        except (LabgenError, NotebookError) as err:
            problems.append(str(err))
            continue
        if not lab.is_file() or lab.read_bytes() != text.encode("utf-8"):
            lab.parent.mkdir(parents=True, exist_ok=True)
            lab.write_bytes(text.encode("utf-8"))
            written.append(lab)
    if problems:
        raise LabgenError("\n".join(problems))
    return written


def check(root: str | os.PathLike) -> list[str]:
    """Problems with the labs under ``root``: stale, missing, orphaned, or a bad solution."""
    root = Path(root)
    solutions, labs = _pairs(root)
    problems = []
    for solution in solutions:
        lab = root / "labs" / solution.name
        rel = lab.relative_to(root)
        try:
            text = lab_text(solution, root)
        except (LabgenError, NotebookError) as err:
            problems.append(str(err))
            continue
        if not lab.is_file():
            problems.append(f"{rel} is missing (run python -m utils.labgen)")
        elif lab.read_bytes() != text.encode("utf-8"):
            problems.append(f"{rel} is out of date with {solution.relative_to(root)} "
                            "(run python -m utils.labgen)")
    names = {s.name for s in solutions}
    for lab in labs:
        if lab.name not in names:
            problems.append(f"{lab.relative_to(root)} has no solutions/{lab.name} "
                            "(orphan: delete it or add its solution)")
    return problems


def default_root() -> Path:
    """The current folder when it has ``solutions/``, else the repository this package is in."""
    cwd = Path.cwd()
    return cwd if (cwd / "solutions").is_dir() else Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.labgen",
                                     description="Generate labs/ from solutions/.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a lab is stale, missing or orphaned")
    parser.add_argument("--root", type=Path, default=None,
                        help="the course repository (default: the current folder if it has "
                             "solutions/, else the repository of this package)")
    args = parser.parse_args(argv)
    root = args.root or default_root()
    if not (root / "solutions").is_dir():
        print(f"labgen: {root} has no solutions/ folder")
        return 2
    if args.check:
        problems = check(root)
        for line in problems:
            print(line)
        count = len(_pairs(root)[0])
        print(f"labgen --check: {count} solutions, "
              + (f"{len(problems)} problems" if problems else "all labs up to date"))
        return 1 if problems else 0
    try:
        written = generate(root)
    except LabgenError as err:
        print(err)
        return 1
    for lab in written:
        print(f"wrote {lab.relative_to(root)}")
    for line in check(root):  # only orphans can remain
        print(f"warning: {line}")
    print(f"labgen: {len(_pairs(root)[0])} solutions, {len(written)} labs written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
