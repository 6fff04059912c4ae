"""Collective communication: what each collective moves, what it costs, how it is measured.

* **Bus bandwidth** as nccl-tests defines it (NVIDIA nccl-tests, ``doc/PERFORMANCE.md``):
  ``algbw = S / t`` and ``busbw = algbw x factor``, with factor ``2(n-1)/n`` for all-reduce,
  ``(n-1)/n`` for all-gather, reduce-scatter and all-to-all, and 1 for broadcast and reduce.
  ``S`` is the size of the whole array (for all-gather and reduce-scatter: all ranks' pieces).
* **The alpha-beta model** (Hockney 1994): a message of ``m`` bytes costs ``alpha + beta*m``;
  an algorithm that sends ``steps`` messages one after another, ``bytes_per_rank`` bytes in all
  from each rank, takes ``T = alpha*steps + beta*bytes_per_rank``. :func:`ring_cost` and
  :func:`all_reduce_cost` give ``steps`` and ``bytes_per_rank`` for the algorithms the course
  builds (Thakur, Rabenseifner and Gropp 2005; Patarasuk and Yuan 2009).
* **Fitting** ``alpha`` and ``beta`` to measured times (:func:`fit_alpha_beta`), and the
  message size at which two algorithms cost the same (:func:`crossover_size`).
* :func:`count_sends` counts the bytes this process sends through ``torch.distributed``'s
  point-to-point calls, to hold a hand-written collective to its byte count.

Sizes are bytes, times seconds, bandwidths B/s, ``beta`` s/B.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

__all__ = ["COLLECTIVES", "ALL_REDUCE_ALGORITHMS", "busbw_factor", "algbw", "busbw", "Cost",
           "ring_cost", "all_reduce_cost", "fit_alpha_beta", "crossover_size", "SendCount",
           "count_sends"]

#: The collectives nccl-tests reports bus bandwidth for, in the order of PERFORMANCE.md.
COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all")

#: All-reduce algorithms of :func:`all_reduce_cost`.
ALL_REDUCE_ALGORITHMS = ("ring", "recursive_doubling", "halving_doubling", "double_binary_tree")

SOURCES = {
    "busbw": "NVIDIA nccl-tests, doc/PERFORMANCE.md, section 'Bus bandwidth' and its summary",
    "ring": "P. Patarasuk, X. Yuan, 'Bandwidth optimal all-reduce algorithms for clusters of "
            "workstations', J. Parallel Distrib. Comput. 69(2), 2009",
    "recursive": "R. Thakur, R. Rabenseifner, W. Gropp, 'Optimization of Collective "
                 "Communication Operations in MPICH', IJHPCA 19(1), 2005, Section 4",
    "two_trees": "P. Sanders, J. Speck, J. L. Traeff, 'Two-tree algorithms for full bandwidth "
                 "broadcast, reduction and scan', Parallel Computing 35(12), 2009",
    "alpha_beta": "R. W. Hockney, 'The communication challenge for MPP: Intel Paragon and "
                  "Meiko CS-2', Parallel Computing 20(3), 1994",
}


def _check_n(n, what="n"):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{what} (the number of ranks) must be an int >= 1, got {n!r}")
    return int(n)


def _check_nonneg(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_collective(collective):
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}; known: {', '.join(COLLECTIVES)}")


# --------------------------------------------------------------------------- bandwidths

def busbw_factor(collective: str, n: int) -> float:
    """nccl-tests' correction from algorithm to bus bandwidth for ``collective`` on ``n`` ranks."""
    _check_collective(collective)
    n = _check_n(n)
    if collective == "all_reduce":
        return 2 * (n - 1) / n
    if collective in ("reduce_scatter", "all_gather", "all_to_all"):
        return (n - 1) / n
    return 1.0  # broadcast, reduce: all data leaves (or enters) the root


def algbw(nbytes: float, seconds: float) -> float:
    """Algorithm bandwidth S / t in B/s."""
    nbytes = _check_nonneg(nbytes, "nbytes")
    seconds = _check_nonneg(seconds, "seconds")
    if seconds == 0:
        raise ValueError("seconds must be > 0 to compute a bandwidth")
    return nbytes / seconds


def busbw(collective: str, nbytes: float, seconds: float, n: int) -> float:
    """Bus bandwidth in B/s: ``algbw x busbw_factor``, comparable with a link's bandwidth."""
    return algbw(nbytes, seconds) * busbw_factor(collective, n)


# --------------------------------------------------------------------------- alpha-beta model

@dataclass(frozen=True)
class Cost:
    """What an algorithm does on one rank: messages in sequence, and bytes sent in all."""

    steps: float
    bytes_per_rank: float

    def time(self, alpha: float, beta: float) -> float:
        """``alpha*steps + beta*bytes_per_rank`` seconds (``beta`` in s/B)."""
        return alpha * self.steps + beta * self.bytes_per_rank


def ring_cost(collective: str, n: int, nbytes: float) -> Cost:
    """Ring reduce-scatter, all-gather or all-reduce of an ``nbytes`` array on ``n`` ranks.

    Reduce-scatter and all-gather: ``n-1`` steps of ``S/n`` bytes. All-reduce is the two in a
    row: ``2(n-1)`` steps, ``2(n-1)/n * S`` bytes per rank.
    """
    if collective not in ("reduce_scatter", "all_gather", "all_reduce"):
        raise ValueError(f"collective must be reduce_scatter, all_gather or all_reduce "
                         f"(what ring_cost covers); got {collective!r}")
    n, nbytes = _check_n(n), _check_nonneg(nbytes, "nbytes")
    phases = 2 if collective == "all_reduce" else 1
    return Cost(phases * (n - 1), phases * (n - 1) / n * nbytes)


def all_reduce_cost(algorithm: str, n: int, nbytes: float) -> Cost:
    """Steps and bytes sent per rank of an all-reduce of ``nbytes`` on ``n`` ranks.

    * ``ring``: ``2(n-1)`` steps, ``2(n-1)/n * S`` bytes (bandwidth-optimal);
    * ``recursive_doubling``: ``log2 n`` steps, each exchanging the whole array: ``log2(n)*S``;
    * ``halving_doubling`` (Rabenseifner): recursive-halving reduce-scatter then
      recursive-doubling all-gather: ``2 log2 n`` steps and the ring's bytes;
    * ``double_binary_tree``: two pipelined binary trees, each carrying half the data, every
      rank interior in at most one; idealised (perfect pipelining): ``2 ceil(log2 n)`` steps
      and ``2S`` bytes from the busiest rank (``S`` when ``n = 2``).

    The recursive algorithms need ``n`` to be a power of two.
    """
    if algorithm not in ALL_REDUCE_ALGORITHMS:
        raise ValueError(f"unknown all-reduce algorithm {algorithm!r}; known: "
                         f"{', '.join(ALL_REDUCE_ALGORITHMS)}")
    n, nbytes = _check_n(n), _check_nonneg(nbytes, "nbytes")
    if algorithm == "ring":
        return ring_cost("all_reduce", n, nbytes)
    if n == 1:
        return Cost(0, 0.0)
    log_n = math.log2(n)
    if algorithm == "double_binary_tree":
        return Cost(2 * math.ceil(log_n), nbytes if n == 2 else 2 * nbytes)
    if n & (n - 1):
        raise ValueError(f"{algorithm} needs a power-of-two number of ranks, got n={n}")
    if algorithm == "recursive_doubling":
        return Cost(log_n, log_n * nbytes)
    return Cost(2 * log_n, 2 * (n - 1) / n * nbytes)  # halving_doubling


def _array(name, v) -> np.ndarray:
    if isinstance(v, (str, bytes)) or np.ndim(v) == 0:
        raise TypeError(f"{name} must be a sequence of numbers, got {type(v).__name__}")
    try:
        return np.asarray(v, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers, got {v!r}") from None


def fit_alpha_beta(steps, nbytes, times) -> tuple[float, float]:
    """Least-squares ``(alpha, beta)`` of ``times ~ alpha*steps + beta*nbytes``.

    The fit minimises the *relative* error, ``sum(((alpha*s + beta*b) - t) / t)^2``, so a
    1 KB point weighs as much as a 64 MB one (a plain fit would let the largest sizes decide
    alpha too). ``steps`` and ``nbytes`` are per measurement: the messages in sequence and the
    bytes sent per rank of the algorithm that was timed.
    """
    s, b, t = (_array(name, v) for name, v in (("steps", steps), ("nbytes", nbytes),
                                                 ("times", times)))
    for name, v in (("steps", s), ("nbytes", b)):
        if not np.all(np.isfinite(v)) or np.any(v < 0):
            raise ValueError(f"{name} must be finite and >= 0, got {v.tolist()}")
    if not (len(s) == len(b) == len(t)):
        raise ValueError(f"steps, nbytes and times must have the same length; got "
                         f"{len(s)}, {len(b)}, {len(t)}")
    if len(t) < 2:
        raise ValueError("need at least 2 measurements to fit alpha and beta")
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise ValueError("times must be finite and > 0 seconds")
    design = np.stack([s, b], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    return float(alpha), float(beta)


def crossover_size(alpha: float, beta: float, n: int, small: str = "recursive_doubling",
                   large: str = "ring") -> float:
    """The all-reduce size (bytes) above which ``large`` is faster than ``small``.

    From ``alpha*s_small + beta*c_small*S = alpha*s_large + beta*c_large*S`` (``c``: bytes per
    rank per byte of array): ``S* = alpha (s_large - s_small) / (beta (c_small - c_large))``.
    Returns ``inf`` when ``large`` never wins, ``0.0`` when it always does.
    """
    _check_nonneg(alpha, "alpha")
    _check_nonneg(beta, "beta")
    a, b = all_reduce_cost(small, n, 1.0), all_reduce_cost(large, n, 1.0)
    d_steps, d_bytes = b.steps - a.steps, a.bytes_per_rank - b.bytes_per_rank
    if beta * d_bytes <= 0:  # large sends no fewer bytes (or beta <= 0): it never catches up
        return 0.0 if alpha * d_steps < 0 else math.inf
    return max(0.0, alpha * d_steps / (beta * d_bytes))


# --------------------------------------------------------------------------- counting sends

@dataclass
class SendCount:
    """Bytes and messages this process sent, and to whom (``peers``: rank -> bytes)."""

    bytes: int = 0
    messages: int = 0
    peers: Counter = field(default_factory=Counter)

    def add(self, tensor, peer) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.bytes += nbytes
        self.messages += 1
        self.peers[peer] += nbytes


def _peer(args, kwargs):
    for key in ("dst", "group_dst"):
        if kwargs.get(key) is not None:
            return int(kwargs[key])
    return int(args[0]) if args and args[0] is not None else None


@contextlib.contextmanager
def count_sends():
    """Count what ``torch.distributed.send`` and ``isend`` send in this process (ranks only).

    ``with count_sends() as sent: ...`` then ``sent.bytes``, ``sent.messages``, ``sent.peers``.
    Sends made through ``P2POp(dist.isend, ...)`` and ``batch_isend_irecv`` are counted too:
    both ``torch.distributed`` and ``torch.distributed.distributed_c10d`` are patched for the
    duration of the block, so ``P2POp``'s own check still recognises ``isend``.
    """
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    sent = SendCount()
    originals = {name: getattr(c10d, name) for name in ("send", "isend")}
    depth = threading.local()  # send() calls isend() inside: count the outermost call only

    def wrap(fn):
        @functools.wraps(fn)
        def counted(tensor, *args, **kwargs):
            level = getattr(depth, "level", 0)
            if level == 0:
                sent.add(tensor, _peer(args, kwargs))
            depth.level = level + 1
            try:
                return fn(tensor, *args, **kwargs)
            finally:
                depth.level = level
        return counted

    wrapped = {name: wrap(fn) for name, fn in originals.items()}
    try:
        for name, fn in wrapped.items():
            setattr(c10d, name, fn)
            setattr(dist, name, fn)
        yield sent
    finally:
        for name, fn in originals.items():
            setattr(c10d, name, fn)
            setattr(dist, name, fn)
