"""Argument validators shared by the whole course library.

Every public function of ``utils`` checks its arguments once, at entry, with these
helpers, so a bad argument gives one clear error that names the argument, says what was
wrong and what was expected, instead of a confident wrong answer, a hang, or an error
from deep inside NumPy or PyTorch.

Numbers
    ``check_number(name, x, *, finite=True, positive=False, nonnegative=False,
    integer=False, low=None, high=None)`` -- the general check; returns ``x``
    (as ``int`` when ``integer=True``). NaN and +-inf are refused unless ``finite=False``
    (NaN is refused always); ``bool`` is never a number; NumPy scalars are accepted,
    tensors are not.
    ``check_int(name, x, *, low=None, high=None)``, ``check_positive(name, x)``,
    ``check_nonnegative(name, x)``, ``check_probability(name, x)`` -- the common cases.
    ``check_bool(name, x)`` -- exactly ``True`` or ``False``.

Choices and callables
    ``check_choice(name, x, choices)`` -- one of a fixed set (the error lists them).
    ``check_callable(name, f)``.

Tensors
    ``check_tensor(name, t, *, ndim=None, shape=None, dtype=None, floating=None)`` --
    a ``torch.Tensor`` with the given rank, shape (``None`` entries are free), dtype
    (one dtype or a tuple of them) and floating-point-ness. Cheap: never reads the data.
    ``check_finite_tensor(name, t)`` -- no NaN or inf (reads the data: use off hot paths).

Registry entries
    ``resolve_gpu(x, name="gpu")`` -- a :class:`utils.hardware.GPUSpec` from a spec or a
    registry name; ``resolve_model(x, name="model")`` -- a
    :class:`utils.models.ModelSpec` from a spec or a registry name. Unknown names raise
    :class:`UnknownName`, which is both a ``KeyError`` (what a lookup raises) and a
    ``ValueError`` (what a bad argument raises), and lists the known names.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["UnknownName", "check_number", "check_int", "check_positive",
           "check_nonnegative", "check_probability", "check_bool", "check_choice",
           "check_callable", "check_tensor", "check_finite_tensor", "resolve_gpu",
           "resolve_model"]


class UnknownName(KeyError, ValueError):
    """A registry name that is not in the registry (a KeyError and a ValueError)."""

    def __str__(self) -> str:               # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------
def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and \
        type(x).__name__ != "bool_"


def check_number(name: str, x, *, finite: bool = True, positive: bool = False,
                 nonnegative: bool = False, integer: bool = False, low=None, high=None):
    """``x`` if it is a real number meeting every rule given, else TypeError/ValueError.

    ``integer=True`` accepts integers only (Python or NumPy; a float such as ``4.0`` is
    refused) and returns a Python ``int``. ``low``/``high`` are inclusive bounds.
    """
    if not _is_real(x):
        what = "an integer" if integer else "a real number"
        raise TypeError(f"{name} must be {what}, got {type(x).__name__} {x!r}")
    if integer:
        if not isinstance(x, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {type(x).__name__} {x!r}")
        x = int(x)
    elif x != x:
        raise ValueError(f"{name} must be a number, got NaN")
    elif finite and math.isinf(x):
        raise ValueError(f"{name} must be finite, got {x!r}")
    if positive and not x > 0:
        raise ValueError(f"{name} must be > 0, got {x!r}")
    if nonnegative and not x >= 0:
        raise ValueError(f"{name} must be >= 0, got {x!r}")
    if low is not None and not x >= low:
        raise ValueError(f"{name} must be >= {low}, got {x!r}")
    if high is not None and not x <= high:
        raise ValueError(f"{name} must be <= {high}, got {x!r}")
    return x


def check_int(name: str, x, *, low=None, high=None) -> int:
    """``x`` as an ``int`` if it is an integer (not a bool) within ``[low, high]``."""
    return check_number(name, x, integer=True, low=low, high=high)


def check_positive(name: str, x, *, integer: bool = False):
    """A finite number > 0 (an integer >= 1 with ``integer=True``)."""
    return check_number(name, x, positive=True, integer=integer)


def check_nonnegative(name: str, x, *, integer: bool = False):
    """A finite number >= 0 (an integer >= 0 with ``integer=True``)."""
    return check_number(name, x, nonnegative=True, integer=integer)


def check_probability(name: str, x) -> float:
    """A number in [0, 1]."""
    return check_number(name, x, low=0, high=1)


def check_bool(name: str, x) -> bool:
    """Exactly ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be True or False, got {type(x).__name__} {x!r}")
    return x


# ---------------------------------------------------------------------------------------
# Choices and callables
# ---------------------------------------------------------------------------------------
def check_choice(name: str, x, choices):
    """``x`` if it is one of ``choices`` (compared with ``==``; bools never match ints)."""
    choices = tuple(choices)
    for c in choices:
        if type(x) is bool and type(c) is not bool:
            continue
        try:
            if x == c:
                return x
        except Exception:                    # e.g. a tensor compared with a str
            continue
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {x!r}")


def check_callable(name: str, f):
    if not callable(f):
        raise TypeError(f"{name} must be callable, got {type(f).__name__} {f!r}")
    return f


# ---------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------
def check_tensor(name: str, t, *, ndim=None, shape=None, dtype=None, floating=None):
    """``t`` if it is a ``torch.Tensor`` with the given rank, shape, dtype, kind.

    ``ndim`` is an int or a tuple of allowed ranks; ``shape`` a tuple whose ``None``
    entries match any size; ``dtype`` a ``torch.dtype`` or a tuple of them;
    ``floating=True``/``False`` asks for a floating-point/integer-or-bool tensor.
    """
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(map(str, allowed))
            raise ValueError(f"{name} must be {want}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        shape = tuple(shape)
        ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise TypeError(f"{name} must have dtype {want}, got {t.dtype}")
    if floating is not None and t.is_floating_point() != floating:
        want = "a floating-point" if floating else "an integer"
        raise TypeError(f"{name} must be {want} tensor, got dtype {t.dtype}")
    return t


def check_finite_tensor(name: str, t):
    """``t`` if every element is finite (reads the data once)."""
    import torch

    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, but it holds NaN or inf")
    return t


# ---------------------------------------------------------------------------------------
# Registry entries: a spec object or a registry name, everywhere
# ---------------------------------------------------------------------------------------
def _resolve(x, name, spec_type, lookup, names, what):
    if isinstance(x, spec_type):
        return x
    if not isinstance(x, str):
        raise TypeError(f"{name} must be a {spec_type.__name__} or a {what} name, "
                        f"got {type(x).__name__} {x!r}")
    try:
        return lookup(x)
    except KeyError:
        raise UnknownName(f"{name}: unknown {what} {x!r}; known: {', '.join(names())}") \
            from None


def resolve_gpu(x, name: str = "gpu"):
    """A :class:`utils.hardware.GPUSpec` from a spec or a name (``"H100"``, ``"L4"``...)."""
    from . import hardware

    return _resolve(x, name, hardware.GPUSpec, hardware.get, hardware.names, "GPU")


def resolve_model(x, name: str = "model"):
    """A :class:`utils.models.ModelSpec` from a spec or a name (``"llama2-7b"``...)."""
    from . import models

    return _resolve(x, name, models.ModelSpec, models.get, models.names, "model")
