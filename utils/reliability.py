"""Fault tolerance: how often a large job fails, how often to checkpoint, what survives a crash.

* :func:`job_mtbf` -- a synchronous job of ``n`` parts, each failing independently with mean
  time between failures ``device_mtbf``, stops whenever any part fails: its MTBF is
  ``device_mtbf / n`` (exponential failures: the minimum of n exponentials).
* :func:`young_daly_interval` (Young's first-order optimum), :func:`young_interval`,
  :func:`daly_interval` -- compute time between checkpoints.
* :func:`goodput` (first-order model) and :func:`simulate_goodput` (Monte Carlo with
  exponential failures) -- the fraction of wall time spent on work that is kept.
* :func:`save_checkpoint` / :func:`load_checkpoint` -- an atomic, checksummed checkpoint file
  (temporary name, fsync, rename): a file cut off mid-write is never loaded, and a file that
  is not a course checkpoint is refused with a clear error. :func:`rng_state` /
  :func:`set_rng_state` capture and restore every RNG (Python, NumPy, torch CPU, CUDA).
* :func:`find_stragglers` -- ranks whose typical step time is well above the others'.
* :data:`LLAMA3_CENSUS` -- Table 5 of the Llama 3 paper, and :func:`census_mismatches`.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import random
import tempfile
from typing import Sequence

import numpy as np
import torch

from .validate import check_int, check_nonnegative, check_number, check_positive

__all__ = ["job_mtbf", "young_daly_interval", "young_interval", "daly_interval", "goodput",
           "simulate_goodput", "save_checkpoint", "load_checkpoint", "CheckpointError",
           "rng_state", "set_rng_state", "find_stragglers", "census_mismatches",
           "LLAMA3_CENSUS", "LLAMA3_RUN", "LLAMA3_SOURCE"]

# ------------------------------------------------------------------------------ published data
LLAMA3_SOURCE = ("A. Grattafiori et al. (Llama Team, AI @ Meta), 'The Llama 3 Herd of Models', "
                 "arXiv:2407.21783, 2024, Section 3.3.4 (Reliability and Operational Challenges) "
                 "and Table 5 (root-cause categorization of unexpected interruptions during a "
                 "54-day period of Llama 3 405B pre-training).")

#: The run the census covers (Section 3.3.4). Durations in seconds.
LLAMA3_RUN = {
    "days": 54,
    "duration_s": 54 * 86400.0,
    "gpus": 16384,                      # "16K H100 GPUs" (Section 3.3.1); 16K read as 16,384
    "interruptions": 466,
    "planned": 47,
    "unexpected": 419,
    "hardware_share_stated": 0.78,      # "approximately 78%" attributed to confirmed or
                                        # suspected hardware issues (Section 3.3.4)
    "effective_training_time_stated": 0.90,  # "higher than 90% effective training time"
    "source": LLAMA3_SOURCE,
}

#: Table 5, row by row, as printed: (component, category, interruption count, printed % of the
#: 419 unexpected interruptions). Stored as printed, including a share that does not match its
#: count (chapter 15 and lab 15 find it): do not "fix" it here.
LLAMA3_CENSUS = (
    ("Faulty GPU", "GPU", 148, 30.1),
    ("GPU HBM3 Memory", "GPU", 72, 17.2),
    ("Software Bug", "Dependency", 54, 12.9),
    ("Network Switch/Cable", "Network", 35, 8.4),
    ("Host Maintenance", "Unplanned Maintenance", 32, 7.6),
    ("GPU SRAM Memory", "GPU", 19, 4.5),
    ("GPU System Processor", "GPU", 17, 4.1),
    ("NIC", "Host", 7, 1.7),
    ("NCCL Watchdog Timeouts", "Unknown", 7, 1.7),
    ("Silent Data Corruption", "GPU", 6, 1.4),
    ("GPU Thermal Interface + Sensor", "GPU", 6, 1.4),
    ("SSD", "Host", 3, 0.7),
    ("Power Supply", "Host", 3, 0.7),
    ("Server Chassis", "Host", 2, 0.5),
    ("IO Expansion Board", "Host", 2, 0.5),
    ("Dependency", "Dependency", 2, 0.5),
    ("CPU", "Host", 2, 0.5),
    ("System Memory", "Host", 2, 0.5),
)


def census_mismatches(rows: Sequence, total: int, decimals: int = 1) -> list[str]:
    """Components whose printed share is not their count / ``total`` rounded to ``decimals``.

    ``rows``: (component, category, count, percent) tuples. A share matches when it is within
    half a unit of the last printed digit (plus a hair for float error) of 100 * count / total.
    Returns the component names in table order ([] for a consistent table).
    """
    total = check_int("total", total, low=1)
    decimals = check_int("decimals", decimals, low=0)
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise TypeError(f"rows must be a sequence of (component, category, count, percent), "
                        f"got {type(rows).__name__}")
    half = 0.5 * 10.0 ** (-decimals) + 1e-9
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, (tuple, list)) or len(row) != 4:
            raise ValueError(f"rows[{i}] must be (component, category, count, percent), got {row!r}")
        name, _, count, pct = row
        count = check_int(f"rows[{i}] count", count, low=0)
        pct = check_number(f"rows[{i}] percent", pct, low=0, high=100)
        if abs(100.0 * count / total - pct) > half:
            out.append(name)
    return out


# ------------------------------------------------------------------------------- MTBF, interval
def job_mtbf(device_mtbf: float, n: int) -> float:
    """Mean time between failures (s) of a job that stops when any of ``n`` parts fails."""
    m = check_positive("device_mtbf", device_mtbf)
    n = check_int("n", n, low=1)
    return m / n


def young_interval(checkpoint_seconds: float, mtbf_seconds: float) -> float:
    """Young's first-order optimum compute time between checkpoints, sqrt(2 delta M) (s).

    J. W. Young, 'A first order approximation to the optimum checkpoint interval',
    Communications of the ACM 17(9):530-531, 1974.
    """
    d = check_positive("checkpoint_seconds", checkpoint_seconds)
    m = check_positive("mtbf_seconds", mtbf_seconds)
    return math.sqrt(2 * d * m)


def young_daly_interval(checkpoint_seconds: float, mtbf_seconds: float) -> float:
    """The Young/Daly first-order interval sqrt(2 delta M) (s); see :func:`daly_interval`
    for Daly's higher-order correction."""
    return young_interval(checkpoint_seconds, mtbf_seconds)


def daly_interval(checkpoint_seconds: float, mtbf_seconds: float) -> float:
    """Daly's higher-order optimum compute time between checkpoints.

    For delta < 2M: sqrt(2 delta M) [1 + (1/3) sqrt(delta / 2M) + (1/9) (delta / 2M)] - delta;
    otherwise M. J. T. Daly, 'A higher order estimate of the optimum checkpoint interval
    for restart dumps', Future Generation Computer Systems 22(3):303-312, 2006.
    """
    d = check_positive("checkpoint_seconds", checkpoint_seconds)
    m = check_positive("mtbf_seconds", mtbf_seconds)
    if d >= 2 * m:
        return m
    x = d / (2 * m)
    return math.sqrt(2 * d * m) * (1 + math.sqrt(x) / 3 + x / 9) - d


def goodput(interval_seconds: float, checkpoint_seconds: float, restart_seconds: float,
            mtbf_seconds: float) -> float:
    """First-order goodput: tau / (tau + delta) * (1 - ((tau + delta)/2 + R) / M), >= 0.

    Each segment of wall time tau + delta (work, then checkpoint) keeps tau of work; each
    failure (one per M seconds of wall time) loses on average half a segment plus the
    restart R. Valid when tau + delta and R are small next to M.
    """
    tau = check_positive("interval_seconds", interval_seconds)
    d = check_nonnegative("checkpoint_seconds", checkpoint_seconds)
    r = check_nonnegative("restart_seconds", restart_seconds)
    m = check_positive("mtbf_seconds", mtbf_seconds)
    return max(0.0, tau / (tau + d) * (1.0 - ((tau + d) / 2 + r) / m))


def simulate_goodput(interval_seconds: float, checkpoint_seconds: float, restart_seconds: float,
                     mtbf_seconds: float, work_seconds: float, seed: int = 0) -> float:
    """Monte Carlo: work / wall time of one job with exponential failures (mean
    ``mtbf_seconds``), using :func:`utils.economics.spot_job_time` for the timeline."""
    from .economics import spot_job_time
    tau = check_positive("interval_seconds", interval_seconds)
    d = check_nonnegative("checkpoint_seconds", checkpoint_seconds)
    r = check_nonnegative("restart_seconds", restart_seconds)
    m = check_positive("mtbf_seconds", mtbf_seconds)
    w = check_positive("work_seconds", work_seconds)
    seed = check_int("seed", seed)
    rng = np.random.default_rng(seed)
    horizon = 1.0
    while True:  # draw failures until they cover the job's end (grow the horizon if needed)
        horizon *= 4
        n = max(16, int(horizon * (w + d * w / tau) / m) + 16)
        if n > 200_000:
            raise ValueError(f"the job does not finish within 200000 failures: restart_seconds "
                             f"({r:g}) or interval + checkpoint ({tau + d:g}) too long next to "
                             f"mtbf_seconds ({m:g})")
        times = np.cumsum(rng.exponential(m, size=n))
        wall, _ = spot_job_time(w, tau, d, r, times.tolist())
        if wall < times[-1]:
            return w / wall


# ------------------------------------------------------------------------------- checkpoints
_MAGIC = b"COURSE-CKPT-1\n"


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupted, or not a course checkpoint."""


@contextlib.contextmanager
def _atomic_file(path: str):
    """Open a temporary file beside ``path``; on success fsync it and rename it to ``path``;
    on any error remove it. A reader never sees a half-written ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: temporary file in the same folder, fsync,
    rename over ``path``, fsync the folder. The file holds a magic line, the payload's
    SHA-256 and the payload (``torch.save`` of ``state``)."""
    path = os.fspath(path)
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    with _atomic_file(path) as f:
        f.write(_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; raise :class:`CheckpointError`
    (a ValueError) naming the file if it is not one, or is truncated or corrupted."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(_MAGIC):
        raise CheckpointError(f"{path} is not a course checkpoint (no {_MAGIC[:-1].decode()} header)")
    rest = data[len(_MAGIC):]
    digest, sep, payload = rest.partition(b"\n")
    if not sep or len(digest) != 64:
        raise CheckpointError(f"{path} is truncated (header cut off)")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"{path} is truncated or corrupted (SHA-256 of the payload does "
                              f"not match the header)")
    return torch.load(io.BytesIO(payload), weights_only=True)


def rng_state() -> dict:
    """Every RNG's state, as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(gauss)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        raise ValueError("state must be a dict from rng_state() with keys python, numpy, torch")
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------- stragglers
def find_stragglers(step_times, threshold: float = 1.25) -> list[int]:
    """Ranks whose median step time exceeds ``threshold`` x the median of all ranks' medians.

    ``step_times``: a 2-D tensor or nested list, shape (steps, ranks), seconds, finite, > 0.
    Medians make one slow step (a noisy machine) harmless; a rank slowed on most steps is
    flagged. Returns the flagged ranks in increasing order.
    """
    t = torch.as_tensor(step_times, dtype=torch.float64) if not isinstance(step_times, torch.Tensor) \
        else step_times.to(torch.float64)
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 2:
        raise ValueError(f"step_times must have shape (steps >= 1, ranks >= 2), got {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise ValueError("step_times must be finite and > 0")
    thr = check_number("threshold", threshold, low=1.0)
    med = t.median(dim=0).values
    typical = med.median()
    return [r for r in range(t.shape[1]) if med[r] > thr * typical]
