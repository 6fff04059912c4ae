"""Unit tests of utils.validate: each validator accepts good values and refuses bad ones
with an error that names the argument."""
import math

import numpy as np
import pytest
import torch

from utils import hardware, models
from utils.validate import (UnknownName, check_bool, check_choice, check_int, check_number,
                            check_positive, check_probability, check_tensor, check_nonnegative,
                            check_finite_tensor, check_callable, resolve_gpu, resolve_model)


@pytest.mark.parametrize("x", [1, 2.5, np.float32(3.0), np.int64(7), 0, -4])
def test_number_accepts_reals(x):
    assert check_number("x", x) == x


@pytest.mark.parametrize("x,exc", [(math.nan, ValueError), (math.inf, ValueError),
                                   (-math.inf, ValueError), (True, TypeError),
                                   ("3", TypeError), (None, TypeError), ([1], TypeError),
                                   (np.float64("nan"), ValueError), (torch.tensor(1.0), TypeError)])
def test_number_refuses(x, exc):
    with pytest.raises(exc, match="speed"):
        check_number("speed", x)


def test_number_inf_allowed_only_when_asked_nan_never():
    assert check_number("t", math.inf, finite=False) == math.inf
    with pytest.raises(ValueError, match="t must be a number, got NaN"):
        check_number("t", math.nan, finite=False)


def test_bounds_and_signs():
    with pytest.raises(ValueError, match="n must be > 0, got 0"):
        check_positive("n", 0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        check_nonnegative("n", -1e-9)
    assert check_nonnegative("n", 0) == 0
    with pytest.raises(ValueError, match=r"p must be <= 1"):
        check_probability("p", 1.5)
    with pytest.raises(ValueError, match=r"p must be >= 0"):
        check_probability("p", -0.1)
    assert check_probability("p", 1) == 1
    with pytest.raises(ValueError, match="k must be >= 2"):
        check_int("k", 1, low=2)
    with pytest.raises(ValueError, match="k must be <= 3"):
        check_int("k", 4, high=3)


def test_int():
    assert check_int("n", np.int32(5)) == 5 and type(check_int("n", np.int32(5))) is int
    for bad in (4.0, True, "4", None):
        with pytest.raises(TypeError, match="n must be an integer"):
            check_int("n", bad)
    with pytest.raises(ValueError, match="n must be > 0"):
        check_positive("n", 0, integer=True)


def test_bool_choice_callable():
    assert check_bool("f", False) is False
    with pytest.raises(TypeError, match="f must be True or False"):
        check_bool("f", 1)
    assert check_choice("mode", "full", ("none", "full")) == "full"
    with pytest.raises(ValueError, match="mode must be one of 'none', 'full'; got 'half'"):
        check_choice("mode", "half", ("none", "full"))
    with pytest.raises(ValueError, match="stage"):
        check_choice("stage", True, (0, 1))          # True == 1 must not sneak through
    with pytest.raises(TypeError, match="fn must be callable"):
        check_callable("fn", 3)


def test_tensor():
    t = torch.zeros(2, 3)
    assert check_tensor("q", t, ndim=2, shape=(2, None), dtype=torch.float32, floating=True) is t
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        check_tensor("q", [[0.0]])
    with pytest.raises(ValueError, match=r"q must be 3-D, got shape \(2, 3\)"):
        check_tensor("q", t, ndim=3)
    with pytest.raises(ValueError, match=r"q must have shape \(2, 4\)"):
        check_tensor("q", t, shape=(2, 4))
    with pytest.raises(ValueError, match=r"q must have shape \(\*, 3, \*\)"):
        check_tensor("q", t, shape=(None, 3, None))
    with pytest.raises(TypeError, match="q must have dtype torch.int64"):
        check_tensor("q", t, dtype=torch.int64)
    with pytest.raises(TypeError, match="q must be an integer tensor"):
        check_tensor("q", t, floating=False)
    with pytest.raises(ValueError, match="q must be finite"):
        check_finite_tensor("q", torch.tensor([1.0, math.nan]))
    check_finite_tensor("q", t)


def test_registry_resolution():
    assert resolve_gpu("H100") is hardware.get("H100-SXM")
    spec = hardware.get("L4")
    assert resolve_gpu(spec) is spec
    assert resolve_model("llama2-7b") is models.get("llama2-7b")
    with pytest.raises(UnknownName, match=r"gpu: unknown GPU 'H900'; known: H100-SXM") as e:
        resolve_gpu("H900")
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    assert not str(e.value).startswith('"')
    with pytest.raises(UnknownName, match="target: unknown model 'gpt-9'; known: .*llama2-7b"):
        resolve_model("gpt-9", "target")
    with pytest.raises(TypeError, match="model must be a ModelSpec or a model name, got int"):
        resolve_model(7)
