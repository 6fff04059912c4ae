"""From Silicon to Serving: the course library.

Notebooks ``import utils`` and reach each concern through its own module:
``utils.hardware`` and ``utils.models`` (registries), ``utils.bench`` (measurement),
``utils.plots`` (plot style and roofline plots), ``utils.checks`` (exercise checkers),
``utils.labgen`` and ``utils.grade`` (instructor tools), and the chapter libraries.
"""
from __future__ import annotations

import os
import random

from . import hardware, memory, models, roofline

__all__ = ["hardware", "memory", "models", "roofline", "device", "seed_everything"]


def device():
    """``torch.device('cuda')`` when a GPU is present, else CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch so a notebook's numbers repeat."""
    import numpy as np
    import torch

    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
