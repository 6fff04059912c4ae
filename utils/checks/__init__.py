"""Exercise checkers: the framework every lab's check cells are built on.

A lab's check cell reads::

    from utils.checks import ch03 as check
    check.count_flops_add(count_flops_add)

and prints one line, ``✔ count_flops_add: passed — …``, or stops with an
:class:`ExerciseFailed` whose message says what was expected, what came back and
what to try. A chapter's checker module (``utils/checks/chNN.py``) is a list of
plain functions decorated with :func:`exercise`; each runs the learner's function
on a few inputs, holds the results to an oracle with the ``expect_*`` helpers and
returns a short detail for the pass line. ``utils/checks/_example.py`` is a
complete small module to copy from.

The decorator takes care of everything around the check:

* the learner's stub still raises ``NotImplementedError`` → "not attempted yet";
* a helper finds a wrong answer → :class:`ExerciseFailed` (three-part message);
* the learner's code raises anything else → :class:`ExerciseFailed` that names the
  exception and shows the learner's own lines of the traceback, never the
  checker's internals;
* the answer is the course library's own code (a function or class defined in
  ``utils/``, a class that inherits a concrete ``utils`` class, or a function that
  just calls the ``utils`` function of the same name) → :class:`LibraryAnswer`: the
  exercise asks for the learner's own;
* a measurement of this machine disagrees with the model → the checker calls
  :func:`measurement_warning`; the exercise still passes on its logic, and the
  warning is printed (⚠) and reported apart from the score;
* success → exactly one printed line (plus one ⚠ block per measurement warning).

Every outcome is recorded: when the environment variable ``COURSE_GRADE_REPORT``
names a file, one JSON line ``{"exercise", "status", "message"}`` is appended to it
(``status`` is one of :data:`STATUSES`), for a learner's own bookkeeping. The grader
(``python -m utils.grade``) does not trust that file: it runs the official check
cells itself and reads each outcome through :data:`_GRADER` (see ``utils.grade``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import linecache
import math
import numbers
import os
import re
import reprlib
import sys
import sysconfig
import traceback
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "ExerciseFailed",
    "LibraryAnswer",
    "NotAttempted",
    "measurement_warning",
    "library_origin",
    "allow_library_answers",
    "STATUSES",
    "exercise",
    "fail",
    "expect_close",
    "expect_equal",
    "expect_shape",
    "expect_dtype",
    "expect_type",
    "describe",
    "expect_flops_bytes",
    "expect_raises",
    "REPORT_ENV",
]

#: Environment variable naming the file that outcomes are appended to (JSON lines).
REPORT_ENV = "COURSE_GRADE_REPORT"

#: What a check can end as. ``measurement_warning``: the logic passed, a measurement of
#: this machine disagreed with the model (it counts as passed in a score).
STATUSES = ("passed", "measurement_warning", "failed", "library_answer", "not_attempted")

#: Set by the grader in the kernel it runs: called with each outcome dict, in addition to
#: the report file. A plain module attribute, replaced by a fresh copy of this module in
#: the grader's own cells (see utils.grade), so a learner's rebinding does not reach it.
_GRADER: Callable[[dict], None] | None = None

_CHECKS_DIR = Path(__file__).resolve().parent
_UTILS_DIR = _CHECKS_DIR.parent
# Code that is neither the learner's nor a checker's; the longest (most specific) first.
_LIBRARY_DIRS = tuple(sorted(
    {str(Path(p).resolve()) for key, p in sysconfig.get_paths().items()
     if key in ("stdlib", "platstdlib", "purelib", "platlib")} | {str(_UTILS_DIR)},
    key=len, reverse=True))


# --------------------------------------------------------------------------- failures

class ExerciseFailed(AssertionError):
    """A learner's answer is wrong.

    The message has a headline (``what`` was checked and found wrong) and three parts:
    ``expected``, ``got`` (what came back) and ``hint``. :func:`exercise` adds the
    exercise's name when the failure leaves the checker.
    """

    def __init__(self, what: str, expected: str, got: str, hint: str = ""):
        self.what = what
        self.expected = expected
        self.got = got
        self.hint = hint
        self.exercise: str | None = None
        super().__init__(what)

    def __str__(self) -> str:
        head = f"exercise {self.exercise}: {self.what}" if self.exercise else self.what
        lines = [head, _part("expected", self.expected), _part("got", self.got)]
        if self.hint:
            lines.append(_part("hint", self.hint))
        return "\n".join(lines)

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback: the message is the whole story.
        return [f"\x1b[1;31m{type(self).__name__}\x1b[0m: {self}"]


class LibraryAnswer(ExerciseFailed):
    """The answer is the course library's reference implementation, not the learner's."""


class NotAttempted(NotImplementedError):
    """The learner's function is still the stub (it raised ``NotImplementedError``)."""

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[1;33m{type(self).__name__}\x1b[0m: {self}"]


def _part(label: str, text: str) -> str:
    pad = " " * 12
    body = str(text).replace("\n", "\n" + pad)
    return f"  {label + ':':<10}{body}"


def fail(what: str, expected: str, got: str, hint: str = "") -> None:
    """Raise :class:`ExerciseFailed` from a checker (for checks the helpers don't cover).

    ``what`` is the headline, the first line a grader's table shows: what was checked and
    how it is wrong, e.g. ``"matmul_cost(64, 32, 16, 4): the byte count is wrong"``.
    """
    __tracebackhide__ = True
    raise ExerciseFailed(what, expected, got, hint)


# --------------------------------------------------------------------------- recording

def _record(exercise_name: str, status: str, message: str, warnings: list | None = None) -> None:
    outcome = {"exercise": exercise_name, "status": status, "message": message,
               "warnings": list(warnings or [])}
    if _GRADER is not None:
        _GRADER(outcome)
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    line = json.dumps(outcome, ensure_ascii=False)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as err:
        print(f"(could not record the outcome in {REPORT_ENV}={path}: {err})", file=sys.stderr)


# --------------------------------------------------------------------------- decorator

def exercise(name_or_checker: str | Callable | None = None):
    """Decorate a checker: ``@exercise`` or ``@exercise("name")``.

    The checker takes the learner's answer (usually a function), raises
    :class:`ExerciseFailed` through the ``expect_*`` helpers when it is wrong, and
    returns a short detail for the pass line (or None). The name must be the
    checker's own function name: the grader finds exercises by the ``check.<name>(``
    calls in a notebook.
    """
    if callable(name_or_checker):
        return _wrap(name_or_checker, name_or_checker.__name__)

    def decorate(checker: Callable) -> Callable:
        name = name_or_checker or checker.__name__
        if name != checker.__name__:
            raise ValueError(f"@exercise({name!r}) on checker {checker.__name__!r}: the names must "
                             "match, because the grader finds exercises by `check.<name>(` calls")
        return _wrap(checker, name)

    return decorate


def _wrap(checker: Callable, name: str) -> Callable:
    @functools.wraps(checker)
    def run_check(*args: Any, **kwargs: Any) -> None:
        __tracebackhide__ = True
        global _current_warnings
        for value in list(args) + list(kwargs.values()):
            origin = None if _ALLOW_LIBRARY else library_origin(value)
            if origin is not None:
                failure = LibraryAnswer(
                    f"this is {origin}, the course's reference",
                    "your own implementation, written in this notebook",
                    f"{origin} (defined in the course library `utils`)",
                    "the exercise asks for your own code: the library's version is there for "
                    "the chapters, and the checker compares yours against an oracle")
                failure.exercise = name
                _record(name, "library_answer", str(failure))
                raise failure
        outer, _current_warnings = _current_warnings, []
        try:
            detail = checker(*args, **kwargs)
        except ExerciseFailed as err:
            err.exercise = name
            # a checker that finds the library deeper inside the answer (a worker that
            # imports it, a helper that calls it) raises LibraryAnswer itself
            _record(name, "library_answer" if isinstance(err, LibraryAnswer) else "failed", str(err))
            raise err.with_traceback(None) from None
        except NotImplementedError as err:
            if _origin(err.__traceback__) == "learner":
                message = f"exercise {name}: not attempted yet — {_stub_text(err)}"
                _record(name, "not_attempted", message)
                raise NotAttempted(message) from None
            failure = _from_exception(name, err)
            _record(name, "failed", str(failure))
            raise failure from None
        except Exception as err:  # the learner's code (or its result) broke the check
            failure = _from_exception(name, err)
            _record(name, "failed", str(failure))
            raise failure from None
        finally:
            warnings, _current_warnings = _current_warnings, outer
        line = f"✔ {name}: passed" + (f" — {detail}" if detail else "")
        status = "measurement_warning" if warnings else "passed"
        _record(name, status, line, warnings)
        print(line)
        for warning in warnings:
            print(warning)

    run_check.exercise_name = name
    return run_check


# --------------------------------------------------------------------------- not attempted

_STUB_EXERCISE = re.compile(r"exercise (\w+)")


def _stub_text(err: NotImplementedError) -> str:
    """Which stub raised: 'BlockAllocator.allocate (exercise block_allocator) is still a stub'.

    The stub is the innermost learner frame; the exercise it belongs to is named in the
    stub's message when ``utils.labgen`` made it (``exercise <name>: …``).
    """
    frames = [frame for frame, _ in traceback.walk_tb(err.__traceback__)
              if _kind(frame.f_code.co_filename) == "learner"]
    if not frames:
        return "fill in the stub above"
    code = frames[-1].f_code
    where = getattr(code, "co_qualname", code.co_name).split("<locals>.")[-1]
    found = _STUB_EXERCISE.search(str(err))
    cell = _display_name(code.co_filename)
    where_from = [f"exercise {found.group(1)}"] if found else []
    where_from += [cell] if cell.startswith("Cell") else []
    owner = f" ({', '.join(where_from)})" if where_from else ""
    if where == "<module>":
        return f"the stub{owner} still raises NotImplementedError: fill it in"
    return f"`{where}`{owner} is still a stub: fill it in"


# --------------------------------------------------------------------------- library answers

def _in_library(code_file: str | None) -> bool:
    if not code_file:
        return False
    try:
        path = str(Path(code_file).resolve())
    except (OSError, ValueError):
        return False
    return path.startswith(str(_UTILS_DIR) + os.sep)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _function_of(obj: Any):
    """The plain Python function behind a function, method, partial or static/class method."""
    for _ in range(8):
        if isinstance(obj, functools.partial):
            obj = obj.func
        elif isinstance(obj, (staticmethod, classmethod)) or inspect.ismethod(obj):
            obj = obj.__func__
        elif hasattr(obj, "__wrapped__") and not inspect.isclass(obj):
            obj = obj.__wrapped__
        else:
            break
    return obj if inspect.isfunction(obj) else None


def _is_scaffold(cls: type) -> bool:
    """A library base class meant to be subclassed (abstract, or marked so)."""
    return inspect.isabstract(cls) or bool(cls.__dict__.get("__course_scaffold__", False))


def _calls_own_name_in_library(fn) -> str | None:
    """'utils.x.f' when ``fn`` (learner code) refers to a library callable named like itself."""
    names: set[str] = set()
    stack = [fn.__code__]
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(c for c in code.co_consts if inspect.iscode(c))
    own = fn.__name__
    if own not in names:
        return None
    candidates = []
    for value in list(fn.__globals__.values()) + [c.cell_contents for c in (fn.__closure__ or ())
                                                  if _cell_filled(c)]:
        if inspect.ismodule(value) and _in_library(getattr(value, "__file__", None)):
            candidates.append(getattr(value, own, None))
        elif getattr(value, "__name__", None) == own:
            candidates.append(value)
    for candidate in candidates:
        inner = _function_of(candidate)
        if inner is not None and _in_library(inner.__code__.co_filename):
            return _qualname(inner)
        if inspect.isclass(candidate) and _in_library(getattr(sys.modules.get(candidate.__module__),
                                                              "__file__", None)):
            return _qualname(candidate)
    return None


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def library_origin(answer: Any) -> str | None:
    """Where ``answer`` comes from when it is the course library's code, else None.

    A function (or method, partial, decorated function) defined in ``utils/``; a class
    defined there; a learner's class that inherits a concrete ``utils`` class (abstract
    bases such as ``utils.tiny.KVCache`` are meant to be subclassed and are fine); a
    learner's function or method that calls the ``utils`` callable of its own name.
    Data (tensors, numbers, model instances) is never a library answer.
    """
    if inspect.isclass(answer):
        for cls in inspect.getmro(answer):
            module = sys.modules.get(cls.__module__)
            if _in_library(getattr(module, "__file__", None)) and not _is_scaffold(cls):
                if cls is answer:
                    return _qualname(cls)
                return f"{_qualname(cls)} (your class {answer.__qualname__} inherits it)"
        for attr in vars(answer).values():
            method = _function_of(attr)
            if method is not None and not _in_library(method.__code__.co_filename):
                inner = _calls_own_name_in_library(method)
                if inner:
                    return f"{inner} (called by {answer.__qualname__}.{method.__name__})"
        return None
    fn = _function_of(answer)
    if fn is None:
        return None
    if _in_library(fn.__code__.co_filename):
        return _qualname(fn)
    inner = _calls_own_name_in_library(fn)
    return f"{inner} (called by your {fn.__name__})" if inner else None


_ALLOW_LIBRARY = False


@contextlib.contextmanager
def allow_library_answers():
    """Within this block the checkers accept the library's reference as an answer.

    For the course's own tests, which hold a checker's logic to the reference (and plant
    bugs in subclasses of it). The grader never honours it: it checks with a fresh copy
    of this module.
    """
    global _ALLOW_LIBRARY
    before, _ALLOW_LIBRARY = _ALLOW_LIBRARY, True
    try:
        yield
    finally:
        _ALLOW_LIBRARY = before


# --------------------------------------------------------------------------- measurements

_current_warnings: list[str] | None = None


def measurement_warning(what: str, expected: str, got: str, cause: str = "") -> None:
    """Report a measurement of this machine that disagrees with the model.

    Never fails the exercise: timings depend on the machine and its load. Inside a
    checker the warning is attached to the exercise (status ``measurement_warning``,
    printed after the pass line, reported by the grader apart from the score);
    outside one it is printed at once. ``cause`` names the likely reason (another
    process busy, turbo, caches larger than the working set…).
    """
    lines = [f"⚠ measurement: {what}", _part("expected", expected), _part("measured", got)]
    if cause:
        lines.append(_part("likely", cause))
    text = "\n".join(lines)
    if _current_warnings is None:
        print(text)
    else:
        _current_warnings.append(text)


def _kind(filename: str) -> str:
    """'checks' (this package), 'library' (stdlib, site-packages, utils) or 'learner'."""
    if filename.startswith("<frozen") or filename.startswith("<built-in"):
        return "library"
    try:
        path = str(Path(filename).resolve())
    except (OSError, ValueError):
        return "learner"
    if path.startswith(str(_CHECKS_DIR) + os.sep):
        return "checks"
    if any(path.startswith(d + os.sep) for d in _LIBRARY_DIRS):
        return "library"
    return "learner"


def _origin(tb) -> str:
    """Who raised: the kind of the innermost frame of a traceback."""
    frames = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(tb)]
    kinds = [_kind(f) for f in frames]
    return kinds[-1] if kinds else "checks"


def _display_name(filename: str) -> str:
    """'Cell In[5]' for notebook cells, a short path otherwise (no machine paths)."""
    try:
        shell = get_ipython()  # type: ignore[name-defined]  # noqa: F821
        label = shell.compile.format_code_name(filename)
        if label:
            return " ".join(label)
    except Exception:
        pass
    path = Path(filename)
    for base in _LIBRARY_DIRS:
        try:
            return str(path.resolve().relative_to(base))
        except (ValueError, OSError):
            continue
    return path.name


def _from_exception(name: str, err: BaseException) -> ExerciseFailed:
    """An ExerciseFailed that explains an exception raised while checking."""
    summary = f"{type(err).__name__}: {err}".strip().rstrip(":")
    headline = _clip(summary.splitlines()[0], 120)
    entries = [(frame, lineno) for frame, lineno in traceback.walk_tb(err.__traceback__)]
    outside = [(f, n) for f, n in entries if _kind(f.f_code.co_filename) != "checks"]
    # The learner's code was running if any frame outside the checker is theirs, even
    # when a library wrapper (a decorator such as @torch.no_grad()) sits in between.
    if any(_kind(f.f_code.co_filename) == "learner" for f, _ in outside):
        lines = []
        for frame, lineno in outside[-6:]:
            code = frame.f_code
            lines.append(f"{_display_name(code.co_filename)}, line {lineno}, in {code.co_name}")
            text = linecache.getline(code.co_filename, lineno, frame.f_globals).strip()
            if text:
                lines.append(f"    {text}")
        failure = ExerciseFailed(
            f"your code raised {headline}",
            "your function to run and return a result",
            f"{summary}\n" + "\n".join(lines),
            "the lines above are where it happened, innermost last; call your function "
            "yourself on a small input to reproduce it",
        )
    else:
        failure = ExerciseFailed(
            f"checking your answer raised {headline}",
            "a result the checker can work with",
            summary,
            "this usually means your function returned something of an unexpected kind; "
            "compare what you return with what the exercise asks for",
        )
    failure.exercise = name
    return failure


# --------------------------------------------------------------------------- describing values

_short = reprlib.Repr()
_short.maxlist = _short.maxtuple = 6
_short.maxstring = 60
_short.maxother = 60
_short.maxlevel = 2


def _count(n: int, noun: str) -> str:
    return f"{int(n)} {noun}{'s' * (int(n) != 1)}"


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_ndarray(x: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(x, np.ndarray)


def _shape(x: Any) -> tuple:
    return tuple(int(d) for d in x.shape)


def describe(value: Any) -> str:
    """A short human description of a value: kind, shape, dtype, and the value when small."""
    if value is None:
        return "None"
    if _is_tensor(value):
        text = f"a tensor of shape {_shape(value)}, dtype {value.dtype}"
        if value.device.type != "cpu":
            text += f", on {value.device}"
        if value.numel() <= 8:
            text += f": {value.detach().cpu().tolist()!r}"
        return text
    if _is_ndarray(value):
        text = f"a NumPy array of shape {_shape(value)}, dtype {value.dtype}"
        if value.size <= 8:
            text += f": {value.tolist()!r}"
        return text
    if isinstance(value, (bool, int, float, complex, str)):
        return f"{_short.repr(value)} ({type(value).__name__})"
    if isinstance(value, (list, tuple, dict, set)):
        n = len(value)
        return _clip(f"a {type(value).__name__} of {n} item{'s' * (n != 1)}: {_short.repr(value)}")
    return _clip(f"{_short.repr(value)} ({_type_name(type(value))})")


def _type_name(t: type) -> str:
    if t.__module__ == "builtins":
        return t.__qualname__
    if t.__module__.startswith("torch") and t.__name__ == "Tensor":
        return "torch.Tensor"
    if t.__module__ == "numpy" and t.__name__ == "ndarray":
        return "numpy.ndarray"
    return f"{t.__module__}.{t.__qualname__}"


def _article(name: str) -> str:
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


# --------------------------------------------------------------------------- type checks

def _matches_type(got: Any, t: type) -> bool:
    if t is bool:
        np = sys.modules.get("numpy")
        return isinstance(got, bool) or (np is not None and isinstance(got, np.bool_))
    if t is int:
        return isinstance(got, numbers.Integral) and not isinstance(got, bool)
    if t is float:  # an int is an acceptable float; a bool is not
        return isinstance(got, numbers.Real) and not isinstance(got, bool) \
            and not _is_tensor(got) and not _is_ndarray(got)
    return isinstance(got, t)


def _type_hint(got: Any, wanted: tuple[type, ...]) -> str:
    names = {_type_name(t) for t in wanted}
    if got is None:
        return "your function returned None: is a `return` statement missing?"
    if _is_tensor(got) and ({"int", "float", "bool"} & names):
        return "return a plain Python number: call .item() on a one-element tensor"
    if "torch.Tensor" in names and isinstance(got, (list, tuple)):
        return "build the result as a tensor (torch.stack, torch.tensor or tensor operations)"
    if "torch.Tensor" in names and _is_ndarray(got):
        return "stay in PyTorch (torch.from_numpy converts), so dtype and device are kept"
    if "int" in names and isinstance(got, float):
        return "the answer is a whole number: use integer arithmetic (// instead of /, or int(...))"
    if isinstance(got, tuple) and len(got) == 1:
        return "a trailing comma after the return value turns it into a tuple"
    return f"return {' or '.join(_article(n) for n in sorted(names))}"


def expect_type(got: Any, expected_type: type | tuple[type, ...], what: str = "the result",
                hint: str | None = None) -> Any:
    """Fail unless ``got`` is an instance of ``expected_type`` (a type or a tuple of types).

    ``int`` rejects bools and floats (3.0 is not a count); ``float`` accepts ints.
    Returns ``got`` so checks can be chained.
    """
    __tracebackhide__ = True
    wanted = expected_type if isinstance(expected_type, tuple) else (expected_type,)
    if any(_matches_type(got, t) for t in wanted):
        return got
    names = " or ".join(_article(_type_name(t)) for t in wanted)
    raise ExerciseFailed(f"{what} has the wrong type", names, describe(got),
                         hint if hint is not None else _type_hint(got, wanted))


def _array_kind(expected: Any) -> type | None:
    if _is_tensor(expected):
        return sys.modules["torch"].Tensor
    if _is_ndarray(expected):
        return sys.modules["numpy"].ndarray
    return None


def expect_shape(got: Any, shape: Any, what: str = "the result", hint: str | None = None) -> Any:
    """Fail unless ``got`` (a tensor or array) has ``shape``; ``None`` in ``shape`` matches any size."""
    __tracebackhide__ = True
    if not (_is_tensor(got) or _is_ndarray(got)):
        if hint is None:
            hint = (_type_hint(got, (sys.modules["torch"].Tensor,)) if "torch" in sys.modules
                    else "return an array: the checker looks at its shape")
        raise ExerciseFailed(f"{what} has the wrong type", "a tensor or array with a shape",
                             describe(got), hint)
    want = tuple(shape)
    have = _shape(got)
    ok = len(want) == len(have) and all(w is None or w == h for w, h in zip(want, have))
    if not ok:
        shown = "(" + ", ".join("any" if w is None else str(w) for w in want) + \
            ("," if len(want) == 1 else "") + ")"
        if hint is None:
            if sorted(x for x in want if x is not None) == sorted(have) and len(want) == len(have):
                hint = "the same sizes in a different order: check the order of dimensions (a transpose?)"
            elif len(want) != len(have):
                hint = ("a different number of dimensions: check which dimensions you reduce "
                        "(keepdim?) or add (unsqueeze, broadcasting)")
            else:
                hint = "print the shape after each step of your function to see where it changes"
        raise ExerciseFailed(f"{what} has the wrong shape", f"shape {shown}",
                             f"shape {have}", hint)
    return got


def expect_dtype(got: Any, dtype: Any, what: str = "the result", hint: str | None = None) -> Any:
    """Fail unless ``got`` (a tensor or array) has ``dtype``."""
    __tracebackhide__ = True
    if _is_tensor(got):
        ok = got.dtype == dtype
    elif _is_ndarray(got):
        np = sys.modules["numpy"]
        try:
            ok = got.dtype == np.dtype(dtype)
        except TypeError:
            ok = False
    else:
        raise ExerciseFailed(f"{what} has the wrong type", "a tensor or array with a dtype",
                             describe(got), hint if hint is not None else
                             "return a tensor: the checker looks at its dtype")
    if not ok:
        raise ExerciseFailed(
            f"{what} has the wrong dtype", f"dtype {dtype}", f"dtype {got.dtype}",
            hint if hint is not None else
            "make new tensors with dtype=x.dtype (or call .to(dtype)) so the result keeps "
            "the precision it is supposed to have")
    return got


# --------------------------------------------------------------------------- value checks

def _index(flat: int, shape: tuple) -> tuple:
    index = []
    for size in reversed(shape):
        index.append(flat % size if size else 0)
        flat //= size if size else 1
    return tuple(reversed(index))


def _check_array_container(got: Any, expected: Any, what: str, hint: str | None) -> None:
    __tracebackhide__ = True
    expect_type(got, _array_kind(expected), what, hint)
    expect_shape(got, _shape(expected), what, hint)


def _to_float64(x: Any):
    import numpy as np

    if _is_tensor(x):
        x = x.detach().cpu()
        if x.is_complex():
            return x.resolve_conj().numpy().astype(np.complex128)
        return x.to(dtype=__import__("torch").float64).numpy()
    return np.asarray(x, dtype=np.complex128 if np.iscomplexobj(x) else np.float64)


def expect_close(got: Any, expected: Any, rtol: float = 1e-5, atol: float = 1e-8,
                 what: str = "the result", hint: str = "") -> Any:
    """Fail unless ``got`` is close to ``expected``: ``|got - expected| <= atol + rtol·|expected|``.

    ``expected`` may be a number, a tensor, a NumPy array, or a list/tuple of those.
    The kind and shape of ``got`` are checked first (dtype is not: use
    :func:`expect_dtype`). NaN never matches a number.
    """
    __tracebackhide__ = True
    tol = f"within rtol={rtol:g}, atol={atol:g}"
    if _array_kind(expected) is not None:
        _check_array_container(got, expected, what, None)
        import numpy as np

        g, e = _to_float64(got), _to_float64(expected)
        with np.errstate(invalid="ignore", over="ignore"):
            bad = ~np.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
        if bad.any():
            count, total = int(bad.sum()), int(bad.size)
            diff = np.where(bad, np.abs(g - e), -np.inf)
            diff = np.where(np.isnan(diff), np.inf, diff)
            worst = int(np.argmax(diff))
            where = _index(worst, g.shape) if g.ndim else ()
            gw, ew = g.reshape(-1)[worst], e.reshape(-1)[worst]
            at = f" at index {where}" if where else ""
            nan_note = ""
            if np.isnan(g).any() and not np.isnan(e).any():
                nan_note = f"; the result contains NaN ({_count(np.isnan(g).sum(), 'element')})"
            elif np.isinf(g).any() and not np.isinf(e).any():
                nan_note = f"; the result contains inf ({_count(np.isinf(g).sum(), 'element')})"
            raise ExerciseFailed(
                f"{what} has wrong values",
                f"values {tol} of the reference",
                f"{count} of {total} elements differ{nan_note}; the worst{at}: got {gw:.6g}, "
                f"expected {ew:.6g}",
                hint or ("NaN or inf usually comes from overflow (exp of large numbers) or a "
                         "division by zero" if nan_note else ""))
        return got
    if isinstance(expected, (list, tuple)):
        expect_type(got, (list, tuple), what)
        if len(got) != len(expected):
            raise ExerciseFailed(f"{what} has the wrong length", f"{len(expected)} items",
                                 f"{len(got)} items: {_short.repr(got)}", hint)
        for i, (g, e) in enumerate(zip(got, expected)):
            expect_close(g, e, rtol, atol, f"{what}[{i}]", hint)
        return got
    if isinstance(expected, numbers.Number) and not isinstance(expected, bool):
        expect_type(got, numbers.Number if isinstance(expected, complex) else float, what)
        if not isinstance(got, numbers.Integral) and not math.isfinite(abs(got)) \
                and got != expected:
            raise ExerciseFailed(f"{what} is not a finite number", f"{expected!r} ({tol})",
                                 describe(got), hint or "NaN or inf usually comes from overflow "
                                 "or a division by zero")
        if not abs(got - expected) <= atol + rtol * abs(expected):
            rel = abs(got - expected) / abs(expected) if expected else math.inf
            raise ExerciseFailed(f"{what} is wrong", f"{expected!r} ({tol})",
                                 f"{got!r} (relative error {rel:.3g})" if math.isfinite(rel)
                                 else f"{got!r}", hint)
        return got
    raise TypeError(f"expect_close: cannot compare against {describe(expected)}; use expect_equal")


def _first_difference(got: Any, expected: Any, where: str = "") -> tuple | None:
    """The first difference as (kind, where, got item, expected item, expected text,
    got text), or None when equal. kind: type, shape, dtype, length, keys or value."""

    def differ(kind: str, want: str, have: str, at: str = where) -> tuple:
        return kind, at, got, expected, want, have

    array_kind = _array_kind(expected)
    if array_kind is not None:
        if not isinstance(got, array_kind):
            return differ("type", _article(_type_name(array_kind)), describe(got))
        if _shape(got) != _shape(expected):
            return differ("shape", f"shape {_shape(expected)}", f"shape {_shape(got)}")
        if got.dtype != expected.dtype:
            return differ("dtype", f"dtype {expected.dtype}", f"dtype {got.dtype}")
        if _is_tensor(expected):
            g, e = got.detach().cpu(), expected.detach().cpu()
            unequal = (g != e) & ~(g.isnan() & e.isnan()) if g.is_floating_point() else g != e
            unequal = unequal.reshape(-1).numpy()
        else:
            import numpy as np

            unequal = (got != expected).reshape(-1)
            if np.issubdtype(expected.dtype, np.inexact):
                unequal &= ~(np.isnan(got) & np.isnan(expected)).reshape(-1)
        if unequal.any():
            i = int(unequal.argmax())
            index = _index(i, _shape(expected))
            at = f"{where}[{', '.join(map(str, index))}]" if index else where
            return differ("value", repr(expected.reshape(-1)[i].item()),
                          f"{got.reshape(-1)[i].item()!r} ({int(unequal.sum())} of "
                          f"{unequal.size} elements differ)", at)
        return None
    if isinstance(expected, (bool, int, float)):
        kind = bool if isinstance(expected, bool) else int if isinstance(expected, int) else float
        if not _matches_type(got, kind):
            return differ("type", describe(expected), describe(got))
        return None if got == expected else differ("value", describe(expected), describe(got))
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)):
            return differ("type", describe(expected), describe(got))
        if len(got) != len(expected):
            return differ("length", f"{len(expected)} items", describe(got))
        for i, (g, e) in enumerate(zip(got, expected)):
            found = _first_difference(g, e, f"{where}[{i}]")
            if found:
                return found
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return differ("type", describe(expected), describe(got))
        missing = [k for k in expected if k not in got]
        extra = [k for k in got if k not in expected]
        if missing or extra:
            parts = (["missing " + ", ".join(map(repr, missing))] if missing else []) + \
                    (["unexpected " + ", ".join(map(repr, extra))] if extra else [])
            return differ("keys", "keys " + ", ".join(map(repr, expected)), "; ".join(parts))
        for k in expected:
            found = _first_difference(got[k], expected[k], f"{where}[{k!r}]")
            if found:
                return found
        return None
    if not isinstance(got, type(expected)):
        return differ("type", _article(_type_name(type(expected))), describe(got))
    try:
        same = bool(got == expected)
    except Exception:
        same = False
    return None if same else differ("value", describe(expected), describe(got))


_HEADLINES = {"type": "has the wrong type", "shape": "has the wrong shape",
              "dtype": "has the wrong dtype", "length": "has the wrong length",
              "keys": "has the wrong keys", "value": "is wrong"}


def expect_equal(got: Any, expected: Any, what: str = "the result", hint: str = "") -> Any:
    """Fail unless ``got`` equals ``expected`` exactly, kinds included.

    Numbers: an ``int`` answer must be an integer (3.0 is not 3), bools are not ints.
    Tensors and arrays: same kind, shape, dtype and elements (NaN equals NaN).
    Lists/tuples (interchangeable) and dicts are compared item by item.
    """
    __tracebackhide__ = True
    found = _first_difference(got, expected)
    if found is None:
        return got
    kind, where, got_item, expected_item, want, have = found
    # The checker's hint is about values; for kind, shape and dtype the defaults say more.
    if kind == "type":
        wanted = (list, tuple) if isinstance(expected_item, (list, tuple)) else \
            _array_kind(expected_item) or type(expected_item)
        expect_type(got_item, wanted, f"{what}{where}")
    elif kind == "shape":
        expect_shape(got_item, _shape(expected_item), f"{what}{where}")
    elif kind == "dtype":
        expect_dtype(got_item, expected_item.dtype, f"{what}{where}")
    raise ExerciseFailed(f"{what}{where} {_HEADLINES[kind]}", want, have, hint)


def expect_flops_bytes(got: Any, what: str = "the result") -> tuple:
    """Check that ``got`` is a ``(flops, bytes)`` pair of plain numbers; return it."""
    __tracebackhide__ = True
    expect_type(got, tuple, what, hint="return a tuple (flops, bytes)")
    if len(got) != 2:
        fail(what, "a tuple of two numbers (flops, bytes)", f"a tuple of length {len(got)}",
             "return (flops, bytes)")
    for part, name in zip(got, ("flops", "bytes")):
        if isinstance(part, bool) or not isinstance(part, numbers.Real):
            fail(what, f"{name} as a number", f"{type(part).__name__}: {part!r}",
                 "return plain Python numbers, e.g. int(...)")
    return got


def expect_raises(call: Callable[[], Any], kinds: type | tuple[type, ...], what: str,
                  expected: str, hint: str = "") -> BaseException:
    """Run ``call()``; it must raise one of ``kinds``. Returns the exception.

    A stub's ``NotImplementedError`` passes through (the exercise is not attempted yet);
    another kind of error, or none, fails with ``what``/``expected``/``hint``.
    """
    __tracebackhide__ = True
    try:
        call()
    except NotImplementedError:
        raise
    except kinds as err:
        return err
    except Exception as err:  # the wrong kind of error
        fail(what, expected, f"{type(err).__name__}: {err}", hint)
    fail(what, expected, "no error", hint)
