"""Run notebooks top to bottom in a fresh kernel, and read and write them reproducibly.

The maintainers' tool for the rule "every stored notebook is executed top to bottom in
a fresh kernel before it is committed"::

    python -m utils.nbrun chapters/03_roofline.ipynb solutions/03_roofline.ipynb
    python -m utils.nbrun --timeout 120 chapters/*.ipynb

Each notebook runs in its own folder with the ``python3`` kernel; its code cells get
execution counts 1, 2, 3… and it is saved in place. Volatile metadata (execution
timings, widget state) is dropped so that re-running a notebook changes only what its
outputs change. A cell that raises fails the run (exit status 1), naming the cell, and
that notebook is left as it was on disk; a cell expected to raise carries the tag
``raises-exception`` or the comment ``# NBVAL_RAISES_EXCEPTION``.

The functions here are shared by ``utils.labgen`` (reading and writing) and
``utils.grade`` (executing).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbformat.v4.nbjson import JSONReader

KERNEL_NAME = "python3"
VOLATILE_CELL_METADATA = ("execution", "ExecuteTime")
VOLATILE_NOTEBOOK_METADATA = ("widgets",)
BUDGET_S = 60  # COURSE_DESIGN.md: each notebook runs in under 60 s on 2 CPU cores

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class NotebookError(ValueError):
    """A file that cannot be read as a Jupyter notebook (version 4)."""


# --------------------------------------------------------------------------- files

def read_notebook(path: str | os.PathLike) -> nbformat.NotebookNode:
    """Read a version-4 notebook; cells without an id get one derived from their content.

    (``nbformat.read`` would add random ids, which makes generated files differ on every run.)
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotebookError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise NotebookError(f"{path}: is a folder, not a notebook") from None
    except UnicodeDecodeError:
        raise NotebookError(f"{path}: not a notebook (not UTF-8 text)") from None
    except ValueError as err:
        raise NotebookError(f"{path}: not a notebook (invalid JSON: {err})") from None
    except OSError as err:
        raise NotebookError(f"{path}: cannot be read ({err.strerror})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise NotebookError(f"{path}: not a notebook (JSON without a list of cells)")
    if data.get("nbformat") != 4:
        raise NotebookError(f"{path}: notebook format {data.get('nbformat')!r}, expected 4")
    for i, cell in enumerate(data["cells"], 1):
        if not isinstance(cell, dict) or "cell_type" not in cell or "source" not in cell:
            raise NotebookError(f"{path}: not a notebook (cell {i} has no cell_type or source)")
    nb = JSONReader().to_notebook(data)
    if nb.get("nbformat_minor", 0) >= 5:
        for i, cell in enumerate(nb.cells):
            if not cell.get("id"):
                digest = hashlib.sha256(f"{i}\0{cell.source}".encode()).hexdigest()
                cell["id"] = digest[:8]
    return nb


def notebook_text(nb: nbformat.NotebookNode) -> str:
    """The notebook as Jupyter writes it (sorted keys, indent 1), with a trailing newline."""
    text = nbformat.writes(nb, version=nbformat.NO_CONVERT)
    return text if text.endswith("\n") else text + "\n"


def write_notebook(nb: nbformat.NotebookNode, path: str | os.PathLike) -> bool:
    """Write ``nb`` to ``path`` unless the file already holds exactly that; True if written."""
    path = Path(path)
    data = notebook_text(nb).encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return True


def strip_volatile(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop metadata that changes on every run (timings, widget state), in place."""
    for key in VOLATILE_NOTEBOOK_METADATA:
        nb.metadata.pop(key, None)
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.get("metadata", {}).pop(key, None)
    return nb


def clear_outputs(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove outputs and execution counts from every code cell, in place."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


# --------------------------------------------------------------------------- cells

def code_cell_numbers(nb: nbformat.NotebookNode) -> dict[int, int]:
    """Position in ``nb.cells`` → number among code cells (1-based), as notebook_check counts."""
    positions = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    return {pos: n for n, pos in enumerate(positions, 1)}


def cell_label(nb: nbformat.NotebookNode, position: int) -> str:
    """'code cell 7 (`while True: pass`)': the number and the first line of code."""
    number = code_cell_numbers(nb).get(position)
    cell = nb.cells[position]
    lines = [line.strip() for line in cell.source.splitlines() if line.strip()]
    first = next((line for line in lines if not line.startswith("#")), lines[0] if lines else "")
    if len(first) > 40:
        first = first[:39] + "…"
    name = f"code cell {number}" if number else f"cell {position + 1}"
    return f"{name} (`{first}`)" if first else name


def allows_error(cell: nbformat.NotebookNode) -> bool:
    """A cell that is expected to raise: tag ``raises-exception`` or ``NBVAL_RAISES_EXCEPTION``."""
    return ("raises-exception" in cell.get("metadata", {}).get("tags", [])
            or "NBVAL_RAISES_EXCEPTION" in cell.source)


@dataclass
class CellError:
    position: int        # index in nb.cells
    label: str           # 'code cell 7 (`...`)'
    ename: str
    evalue: str
    traceback: str       # plain text, colours removed
    allowed: bool        # the cell is expected to raise


@dataclass
class RunResult:
    finished: set[int] = field(default_factory=set)   # positions of cells that ran to the end
    errors: list[CellError] = field(default_factory=list)
    stopped: str | None = None      # why the run ended early (timeout, dead kernel, …)
    stopped_at: int | None = None   # position of the cell it ended in
    wall_s: float = 0.0

    @property
    def unexpected_errors(self) -> list[CellError]:
        return [e for e in self.errors if not e.allowed]


class SilentError(RuntimeError):
    """Code run with :func:`execute_cells`' ``silent`` helper did not complete."""


def execute_cells(nb: nbformat.NotebookNode, cwd: str | os.PathLike, *, cell_timeout: float,
                  total_timeout: float | None = None, env: dict[str, str] | None = None,
                  stop_on_error: bool = False, kernel_name: str = KERNEL_NAME,
                  before_cell=None, after_cell=None) -> RunResult:
    """Execute ``nb``'s code cells in order in a fresh kernel started in ``cwd``, in place.

    Code cells get execution counts 1, 2, 3…; errors are recorded and the run goes on
    (unless ``stop_on_error`` and the cell is not expected to raise). A cell running past
    ``cell_timeout``, or past what is left of ``total_timeout``, or a dying kernel ends the
    run. The kernel (and its process group) is always killed at the end. ``env`` adds
    variables to the kernel's environment.

    ``before_cell(position, silent)`` and ``after_cell(position, silent)``, when given, are
    called around each code cell; ``silent(code, expressions)`` runs ``code`` in the kernel
    without output or history and returns the kernel's reply: the ``user_expressions``
    evaluated after it, read from the execution's own reply message (the grader's channel).
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    result = RunResult()
    start = time.monotonic()
    deadline = start + total_timeout if total_timeout else math.inf
    client = NotebookClient(
        nb, timeout=max(1, math.ceil(cell_timeout)), kernel_name=kernel_name,
        allow_errors=True, record_timing=False,
        shutdown_kernel="immediate", interrupt_on_timeout=False,
        startup_timeout=int(max(1, min(60, deadline - start))),
        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # no start-up chatter on stderr
        resources={"metadata": {"path": str(cwd)}})
    position = None

    def silent(code: str, expressions: dict[str, str] | None = None) -> dict:
        msg_id = client.kc.execute(code, silent=True, store_history=False, allow_stdin=False,
                                   user_expressions=expressions or {})
        reply = client.wait_for_reply(msg_id)
        if not reply:
            raise SilentError("no reply from the kernel")
        content = reply.get("content", {})
        if content.get("status") != "ok":
            raise SilentError(f"{content.get('ename', 'error')}: {content.get('evalue', '')}")
        return content.get("user_expressions", {})

    try:
        with client.setup_kernel(env={**os.environ, **(env or {})}):
            reply = client.wait_for_reply(client.kc.kernel_info())
            if reply and "language_info" in reply.get("content", {}):
                nb.metadata["language_info"] = reply["content"]["language_info"]
            for position, cell in enumerate(nb.cells):
                if cell.cell_type != "code" or not cell.source.strip():
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    result.stopped = f"the overall limit of {total_timeout:g} s ran out before " \
                                     f"{cell_label(nb, position)}"
                    result.stopped_at = position
                    break
                limit = min(cell_timeout, left)
                client.timeout = max(1, math.ceil(limit))
                try:
                    if before_cell is not None:
                        before_cell(position, silent)
                    client.execute_cell(cell, position,
                                        execution_count=client.code_cells_executed + 1)
                    if after_cell is not None:
                        client.timeout = max(1, math.ceil(min(60, max(1, deadline - time.monotonic()))))
                        after_cell(position, silent)
                except CellTimeoutError:
                    if limit < cell_timeout:
                        result.stopped = (f"the overall limit of {total_timeout:g} s ran out in "
                                          f"{cell_label(nb, position)}; kernel killed")
                    else:
                        result.stopped = (f"{cell_label(nb, position)} timed out after "
                                          f"{cell_timeout:g} s; kernel killed")
                    result.stopped_at = position
                    break
                except DeadKernelError:
                    result.stopped = f"the kernel died in {cell_label(nb, position)}"
                    result.stopped_at = position
                    break
                result.finished.add(position)
                error = next((o for o in cell.outputs if o.output_type == "error"), None)
                if error is not None:
                    result.errors.append(CellError(
                        position, cell_label(nb, position), error.get("ename", "Error"),
                        error.get("evalue", ""),
                        _ANSI.sub("", "\n".join(error.get("traceback", []))), allows_error(cell)))
                    if stop_on_error and not allows_error(cell):
                        result.stopped = f"{cell_label(nb, position)} raised {error.ename}"
                        result.stopped_at = position
                        break
    except Exception as err:  # the kernel could not start, or died between cells
        if result.stopped is None:
            where = f" in {cell_label(nb, position)}" if position is not None else ""
            text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
            result.stopped = f"the kernel failed{where}: {text}"
            result.stopped_at = position
    result.wall_s = time.monotonic() - start
    return result


# --------------------------------------------------------------------------- command line

def run_notebook(path: str | os.PathLike, cell_timeout: float) -> bool:
    """Execute one notebook in place; print one line (and the error, if any); True if it ran."""
    path = Path(path)
    if path.resolve().parent.name == "labs":
        print(f"FAILED {path}: labs ship without outputs; regenerate them with "
              "python -m utils.labgen instead")
        return False
    try:
        nb = read_notebook(path)
    except NotebookError as err:
        print(f"FAILED {err}")
        return False
    clear_outputs(strip_volatile(nb))
    result = execute_cells(nb, path.resolve().parent, cell_timeout=cell_timeout,
                           stop_on_error=True)
    failure = result.stopped if result.stopped else None
    if failure:
        print(f"FAILED {path}: {failure} (after {result.wall_s:.1f} s; file left unchanged)")
        errors = [e for e in result.errors if e.position == result.stopped_at]
        for error in errors:
            print("    " + "\n    ".join(error.traceback.strip().splitlines()[-15:]))
        return False
    write_notebook(strip_volatile(nb), path)
    count = len(result.finished)
    over = f"  (over the {BUDGET_S} s budget)" if result.wall_s > BUDGET_S else ""
    print(f"{path}: {count} code cells in {result.wall_s:.1f} s{over}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m utils.nbrun",
        description="Execute notebooks top to bottom in a fresh kernel and save them in place.")
    parser.add_argument("notebooks", nargs="+", metavar="NB", help="notebook files to run")
    parser.add_argument("--timeout", type=float, default=600, metavar="SECONDS",
                        help="limit for one cell (default: %(default)s)")
    args = parser.parse_args(argv)
    ok = [run_notebook(path, args.timeout) for path in args.notebooks]
    if len(ok) > 1:
        print(f"{sum(ok)}/{len(ok)} notebooks ran")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
