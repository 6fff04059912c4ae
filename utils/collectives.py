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
* **Counting traffic**: :class:`CommCounter` counts, inside one rank, every collective and
  point-to-point call made through ``torch.distributed`` and the bytes each one carries, to
  hold a hand-written collective, a parallel layer or a ZeRO stage to its byte count. The
  course has this one counter; chapters 09, 13 and 14 and their checkers all use it.

Sizes are bytes, times seconds, bandwidths B/s, ``beta`` s/B.
"""
from __future__ import annotations

import functools
import math
import threading
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .validate import check_choice, check_int

__all__ = ["COLLECTIVES", "ALL_REDUCE_ALGORITHMS", "busbw_factor", "algbw", "busbw", "Cost",
           "ring_cost", "all_reduce_cost", "fit_alpha_beta", "crossover_size", "KINDS",
           "COLLECTIVE_KINDS", "Call", "CommCounter"]

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


# --------------------------------------------------------------------------- counting traffic

#: What :class:`CommCounter` records: the four collectives, then point-to-point sends and
#: receives (``isend`` counts as ``"send"``, ``irecv`` as ``"recv"``).
KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "send", "recv")
COLLECTIVE_KINDS = KINDS[:4]

# name in torch.distributed -> (kind, index and keyword of the argument that holds the bytes)
_COUNTED = {
    "all_reduce": ("all_reduce", 0, "tensor"),
    "reduce_scatter_single": ("reduce_scatter", 1, "input"),
    "reduce_scatter_tensor": ("reduce_scatter", 1, "input"),
    "reduce_scatter": ("reduce_scatter", 1, "input_list"),
    "all_gather_single": ("all_gather", 0, "output_tensor"),
    "all_gather_into_tensor": ("all_gather", 0, "output_tensor"),
    "all_gather": ("all_gather", 0, "tensor_list"),
    "broadcast": ("broadcast", 0, "tensor"),
    "send": ("send", 0, "tensor"),
    "isend": ("send", 0, "tensor"),
    "recv": ("recv", 0, "tensor"),
    "irecv": ("recv", 0, "tensor"),
}
# Also replaced in distributed_c10d, so that P2POp(dist.isend, ...) inside the block passes
# P2POp's own check (it compares the op with that module's isend and irecv).
_P2P = ("send", "isend", "recv", "irecv")
# Bytes a rank sends, in ZeRO's units (Rajbhandari et al. 2020, Section 7), per byte counted.
_VOLUME = {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1, "broadcast": 1, "send": 1,
           "recv": 0}
_ACTIVE: list = []   # the counters whose ``with`` block is running, innermost last


def _nbytes(x) -> int:
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return x.numel() * x.element_size()


def _peer(args, kwargs, kind):
    """The peer rank of a send (``dst``) or a receive (``src``); None for a collective."""
    if kind not in ("send", "recv"):
        return None
    keys = ("dst", "group_dst") if kind == "send" else ("src", "group_src")
    for key in keys:
        if kwargs.get(key) is not None:
            return int(kwargs[key])
    return int(args[1]) if len(args) > 1 and args[1] is not None else None


@dataclass(frozen=True)
class Call:
    """One call: its kind (one of :data:`KINDS`), the ``torch.distributed`` function called,
    the bytes of its full tensor (the all-reduced tensor, the reduce-scatter input, the
    all-gather output, the tensor sent or received) and, for a send or receive, the peer."""

    kind: str
    function: str
    nbytes: int
    peer: int | None = None


class CommCounter:
    """Count the communication a rank makes through ``torch.distributed`` in a ``with`` block.

    ::

        with CommCounter() as c:
            dist.all_reduce(t)
            dist.send(x, dst=1)
        c.counts()     # {'all_reduce': 1, 'send': 1}
        c.payload()    # {'all_reduce': t.numel() * t.element_size(), 'send': ...}
        c.sent, c.messages, c.peers   # point-to-point bytes sent, sends, bytes per peer

    While active it replaces ``dist.all_reduce``, ``dist.reduce_scatter_single``,
    ``dist.all_gather_single``, ``dist.broadcast`` (and the older ``reduce_scatter_tensor``,
    ``all_gather_into_tensor``, list-based ``all_gather`` and ``reduce_scatter``),
    ``dist.send``, ``dist.isend``, ``dist.recv`` and ``dist.irecv`` with wrappers that record
    the call and then run it; the originals come back on exit, also after an error. Code
    that calls ``dist.<name>(...)`` is counted, whether yours, FSDP's or
    ``ZeroRedundancyOptimizer``'s, and so are sends and receives made through
    ``P2POp``/``batch_isend_irecv``. A function imported by name before the block
    (``from torch.distributed import all_reduce``) is not, nor DDP's C++ reducer (count it
    with a communication hook that calls :meth:`record`). A call that runs another counted
    call inside it (``send`` runs ``isend``) counts once.

    ``calls`` lists every :class:`Call`. Summaries: :meth:`counts` and :meth:`payload` per
    kind called; :meth:`by_kind` with every collective listed; :meth:`volume` in ZeRO's units
    (all-reduce ``2n``, the other collectives and a send ``n``, a receive nothing);
    :meth:`ring_bytes` what a rank of ring collectives sends. :meth:`clear` starts again.
    """

    def __init__(self):
        self.calls: list[Call] = []
        self._saved: list = []
        self._depth = threading.local()

    # ------------------------------------------------------------------ recording
    def record(self, kind: str, nbytes: int, function: str = "", peer: int | None = None) -> None:
        """Add a call by hand (DDP's C++ all-reduce reaches here through a hook)."""
        check_choice("kind", kind, KINDS)
        nbytes = check_int("nbytes", nbytes, low=0)
        if not isinstance(function, str):
            raise TypeError(f"function must be a str, got {type(function).__name__}")
        if peer is not None:
            peer = check_int("peer", peer, low=0)
        self.calls.append(Call(kind, function or kind, nbytes, peer))

    def __enter__(self) -> "CommCounter":
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        if self._saved:
            raise RuntimeError("this CommCounter is already active")
        _ACTIVE.append(self)
        for name, (kind, index, key) in _COUNTED.items():
            original = getattr(dist, name, None)
            if original is None:
                continue
            counted = self._wrap(name, kind, index, key, original)
            modules = [dist]
            if name in _P2P and getattr(c10d, name, None) is original:
                modules.append(c10d)
            for module in modules:
                self._saved.append((module, name, original))
                setattr(module, name, counted)
        return self

    def __exit__(self, *exc) -> bool:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved = []
        return False

    def _wrap(self, name, kind, index, key, original):
        depth = self._depth

        @functools.wraps(original)
        def counted(*args, **kwargs):
            level = getattr(depth, "level", 0)
            if level == 0:
                tensor = args[index] if len(args) > index else kwargs[key]
                self.calls.append(Call(kind, name, _nbytes(tensor), _peer(args, kwargs, kind)))
            depth.level = level + 1
            try:
                return original(*args, **kwargs)
            finally:
                depth.level = level
        return counted

    def clear(self) -> None:
        self.calls.clear()

    # ------------------------------------------------------------------ summaries
    def counts(self) -> dict[str, int]:
        """Number of calls per kind, for the kinds called, in the order first called."""
        out: dict[str, int] = {}
        for call in self.calls:
            out[call.kind] = out.get(call.kind, 0) + 1
        return out

    def payload(self) -> dict[str, int]:
        """Bytes per kind (full tensors), for the kinds called, in the order first called."""
        out: dict[str, int] = {}
        for call in self.calls:
            out[call.kind] = out.get(call.kind, 0) + call.nbytes
        return out

    def by_kind(self) -> dict[str, int]:
        """Bytes of full tensors per kind: every collective (zeros included), then sends and
        receives if any were made."""
        out = dict.fromkeys(COLLECTIVE_KINDS, 0)
        for call in self.calls:
            out[call.kind] = out.get(call.kind, 0) + call.nbytes
        return out

    @property
    def sent(self) -> int:
        """Bytes this rank sent point to point (``send`` and ``isend``)."""
        return sum(c.nbytes for c in self.calls if c.kind == "send")

    @property
    def messages(self) -> int:
        """Number of point-to-point sends."""
        return sum(1 for c in self.calls if c.kind == "send")

    @property
    def peers(self) -> Counter:
        """Bytes sent point to point per destination rank."""
        out: Counter = Counter()
        for c in self.calls:
            if c.kind == "send":
                out[c.peer] += c.nbytes
        return out

    def volume(self) -> int:
        """Bytes this rank sends in ZeRO's units (Section 7): an all-reduce of ``n`` bytes
        ``2n``, a reduce-scatter, all-gather, broadcast or send ``n``, a receive nothing."""
        return sum(_VOLUME[c.kind] * c.nbytes for c in self.calls)

    def ring_bytes(self, world_size: int) -> float:
        """Bytes this rank sends when the collectives are rings over ``world_size`` ranks:
        each collective's volume times ``(N - 1) / N``, plus the point-to-point sends."""
        world_size = check_int("world_size", world_size, low=1)
        ring = sum(_VOLUME[c.kind] * c.nbytes for c in self.calls if c.kind in COLLECTIVE_KINDS)
        return ring * (world_size - 1) / world_size + self.sent

    @staticmethod
    def innermost() -> "CommCounter | None":
        """The innermost counter whose ``with`` block is running in this process, or None."""
        return _ACTIVE[-1] if _ACTIVE else None
