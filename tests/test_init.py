"""The package's top-level helpers."""
import random

import numpy as np
import pytest
import torch

import utils


def test_seed_everything_repeats_all_three_generators():
    utils.seed_everything(7)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    utils.seed_everything(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    with pytest.raises(ValueError, match="non-negative"):
        utils.seed_everything(-1)


def test_device_is_cuda_exactly_when_available():
    assert utils.device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_modules_are_reachable_from_the_package():
    for name in ("hardware", "models", "memory", "roofline"):
        assert hasattr(utils, name)
