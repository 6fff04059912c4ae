"""Parallel training: what data, tensor and pipeline parallelism send, and when they wait.

Three calculators and one simulator, shared by chapter 13, its lab and its checkers:

* **communication volume** per GPU per step: :func:`collective_bytes` (what one rank of a
  ring collective sends), :func:`dp_bytes_per_step`, :func:`tp_bytes_per_layer`,
  :func:`pp_bytes_per_microbatch` and the sum over a tp x pp x dp job,
  :func:`comm_per_step`;
* **pipeline bubbles**: :func:`bubble_fraction` in both conventions the literature uses;
* **pipeline schedules**: :func:`pipeline_orders` (GPipe, 1F1B, interleaved 1F1B) and
  :func:`assign_slots`, which runs each stage's list of operations as early as its
  dependencies allow; :func:`schedule` does both, :func:`idle_fraction` measures the
  bubble of the result and :func:`plot_timeline` draws it;
* **DDP buckets**: :func:`bucket_assignment`, the rule ``DistributedDataParallel`` uses;
* **counting** what a rank hands to ``torch.distributed`` is
  :class:`utils.collectives.CommCounter`'s job (calls and payload bytes per operation).

Every quantity is in bytes (SI base unit); a *payload* is the size of the whole tensor a
collective works on (the input of an all-reduce or reduce-scatter, the output of an
all-gather), the same on every rank. What a rank actually sends depends on the algorithm;
:func:`collective_bytes` gives the bandwidth-optimal ring's figure, the one the papers use.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from typing import Sequence

from . import hardware as _hardware
from . import memory as _memory
from .validate import check_choice, check_int, check_number, resolve_model
from . import models as _models

__all__ = [
    "SOURCES", "DDP_BUCKET_CAP_MB", "DDP_FIRST_BUCKET_BYTES", "NodeSpec", "DGX_H100",
    "COLLECTIVES", "collective_bytes", "dp_bytes_per_step", "tp_collectives_per_layer",
    "tp_bytes_per_layer", "pp_bytes_per_microbatch", "CommPerStep", "comm_per_step",
    "bubble_fraction", "SCHEDULES", "pipeline_orders", "assign_slots", "schedule",
    "idle_fraction", "plot_timeline", "bucket_assignment",
]

SOURCES = {
    "megatron_tp": ("Shoeybi et al. 2019, 'Megatron-LM: Training Multi-Billion Parameter "
                    "Language Models Using Model Parallelism', arXiv:1909.08053, Section 3 and "
                    "Figures 3-4: column- then row-parallel GEMMs, the conjugate operators f "
                    "and g, two all-reduces in the forward and two in the backward of a layer"),
    "sequence_parallel": ("Korthikanti et al. 2022, 'Reducing Activation Recomputation in "
                          "Large Transformer Models', arXiv:2205.05198, Section 4.2.2 and "
                          "Figure 5: each all-reduce becomes a reduce-scatter plus an "
                          "all-gather, with the same communication volume"),
    "megatron_pp": ("Narayanan et al. 2021, 'Efficient Large-Scale Language Model Training on "
                    "GPU Clusters Using Megatron-LM', SC21, arXiv:2104.04473, Section 2.2 "
                    "(bubble (p-1)/m for GPipe and 1F1B, (1/v)(p-1)/m interleaved), Section "
                    "3.3-3.4 (tensor parallelism inside a node, pipeline across nodes), "
                    "Section 4.1 (scatter/gather of the activations sent between stages)"),
    "gpipe": ("Huang et al. 2019, 'GPipe: Efficient Training of Giant Neural Networks using "
              "Pipeline Parallelism', NeurIPS 2019, Section 2.2 and Figure 2: bubble "
              "O((K-1)/(M+K-1)), negligible when M >= 4K"),
    "pipedream_flush": ("Narayanan et al. 2021, 'Memory-Efficient Pipeline-Parallel DNN "
                        "Training', ICML 2021 (PipeDream-2BW and PipeDream-Flush, the 1F1B "
                        "schedule with a flush)"),
    "ddp": ("Li et al. 2020, 'PyTorch Distributed: Experiences on Accelerating Data Parallel "
            "Training', PVLDB 13(12), Section 3.2 (gradient bucketing, overlap with the "
            "backward pass, buckets in reverse parameter order); PyTorch "
            "DistributedDataParallel documentation: bucket_cap_mb defaults to 25 (MiB)"),
    "fsdp": ("Zhao et al. 2023, 'PyTorch FSDP: Experiences on Scaling Fully Sharded Data "
             "Parallel', PVLDB 16(12), Sections 3-4: all-gather parameters before forward "
             "and backward, reduce-scatter gradients"),
    "dgx_h100": ("NVIDIA DGX H100 datasheet (2023) and DGX BasePOD reference architecture: "
                 "8 H100 SXM GPUs on NVLink 4 via four NVSwitch chips; four OSFP ports "
                 "serving eight single-port ConnectX-7 adapters, up to 400 Gb/s InfiniBand, "
                 "for the compute fabric"),
}

#: ``DistributedDataParallel(bucket_cap_mb=...)`` default, in MiB (PyTorch documentation).
DDP_BUCKET_CAP_MB = 25
#: The smaller first bucket DDP uses with the default cap (``dist._DEFAULT_FIRST_BUCKET_BYTES``).
DDP_FIRST_BUCKET_BYTES = 2**20

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "send")


@dataclass(frozen=True)
class NodeSpec:
    """A multi-GPU server: its GPUs, the link inside it and the network ports out of it."""

    name: str
    gpu: str                     # utils.hardware GPU name
    gpus_per_node: int
    intra_link: str              # utils.hardware link name, per GPU
    inter_link: str              # utils.hardware link name, per network port
    nics_per_node: int           # network ports for the compute fabric
    source: str

    @property
    def intra_bandwidth(self) -> float:
        """B/s per direction, per GPU, to the other GPUs of the node."""
        return _hardware.link(self.intra_link).bandwidth

    @property
    def inter_bandwidth(self) -> float:
        """B/s per direction, per GPU, out of the node (ports shared evenly by the GPUs)."""
        return _hardware.link(self.inter_link).bandwidth * self.nics_per_node / self.gpus_per_node


DGX_H100 = NodeSpec("DGX H100", "H100-SXM", 8, "NVLink 4", "InfiniBand NDR", 8,
                    SOURCES["dgx_h100"])


# ---------------------------------------------------------------------------------------
# Input checking
# ---------------------------------------------------------------------------------------
def _count(name, value, minimum=1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value \
            or value in (float("inf"), float("-inf")) or value != int(value):
        raise TypeError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _positive(name, value) -> float:
    return check_number(name, value, positive=True)


# ---------------------------------------------------------------------------------------
# Communication volume
# ---------------------------------------------------------------------------------------
def collective_bytes(collective: str, payload: float, n: int) -> float:
    """Bytes one of ``n`` ranks sends in a bandwidth-optimal (ring) collective.

    ``payload`` is the whole tensor's size in bytes: the input of an all-reduce or a
    reduce-scatter, the output of an all-gather, the tensor of a broadcast or a send.

    ========================  =================================
    ``"all_reduce"``          2 (n-1)/n x payload
    ``"reduce_scatter"``      (n-1)/n x payload
    ``"all_gather"``          (n-1)/n x payload
    ``"broadcast"``           payload (pipelined along a chain)
    ``"send"``                payload (point to point)
    ========================  =================================

    A ring all-reduce is a reduce-scatter followed by an all-gather, hence the 2. With
    ``n == 1`` a collective sends nothing; a send still sends its payload.
    """
    n = _count("n", n)
    check_number("payload", payload, nonnegative=True)
    if collective == "send":
        return payload
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}; choose one of {COLLECTIVES}")
    if n == 1:
        return 0
    if collective == "all_reduce":
        return 2 * (n - 1) * payload / n
    if collective == "broadcast":
        return payload
    return (n - 1) * payload / n


def dp_bytes_per_step(params, dp: int, bytes_per_grad: float = 2) -> float:
    """Bytes each of ``dp`` data-parallel ranks sends to all-reduce the gradients once.

    2 (dp-1)/dp x Psi x ``bytes_per_grad``: a ring all-reduce of every gradient. It does
    not depend on the batch size, which is why data parallelism likes large batches.
    ``params`` is a count, a ModelSpec or a registry name.
    """
    psi = _memory._param_count(params, "params")
    dp = _count("dp", dp)
    return collective_bytes("all_reduce", psi * _positive("bytes_per_grad", bytes_per_grad), dp)


def tp_collectives_per_layer(sequence_parallel: bool = False) -> dict[str, int]:
    """Collectives one transformer layer runs per micro-batch, forward and backward.

    Megatron tensor parallelism (Shoeybi et al. 2019, Section 3): ``g`` after the
    row-parallel output projection of attention and after the row-parallel second MLP GEMM
    (2 all-reduces in the forward); ``f`` before the column-parallel QKV and first MLP GEMM
    all-reduce the input gradient (2 in the backward). With sequence parallelism each
    all-reduce becomes a reduce-scatter plus an all-gather (Korthikanti et al. 2022, 4.2.2).
    Recomputation would add the forward's collectives again; not counted here.
    """
    if not isinstance(sequence_parallel, bool):
        raise TypeError(f"sequence_parallel must be True or False, got {sequence_parallel!r}")
    return {"reduce_scatter": 4, "all_gather": 4} if sequence_parallel else {"all_reduce": 4}


def tp_bytes_per_layer(tokens: int, hidden: int, tp: int, bytes_per_element: float = 2,
                       sequence_parallel: bool = False) -> float:
    """Bytes one of ``tp`` tensor-parallel ranks sends for one layer and one micro-batch.

    Each collective works on the layer's activation, ``tokens`` x ``hidden`` elements
    (tokens = micro-batch x sequence length, b·s), so the layer sends
    4 x 2 (tp-1)/tp x b·s·h x bytes, forward and backward together. Sequence parallelism
    sends exactly as much (a reduce-scatter plus an all-gather is an all-reduce).
    """
    payload = _count("tokens", tokens) * _count("hidden", hidden) * \
        _positive("bytes_per_element", bytes_per_element)
    tp = _count("tp", tp)
    return sum(k * collective_bytes(c, payload, tp)
               for c, k in tp_collectives_per_layer(sequence_parallel).items())


def pp_bytes_per_microbatch(tokens: int, hidden: int, bytes_per_element: float = 2,
                            tp: int = 1, scatter_gather: bool = False) -> float:
    """Bytes crossing one pipeline-stage boundary, one way, for one micro-batch.

    The forward sends the activation b·s·h to the next stage, the backward sends its
    gradient (the same size) back. With tensor parallelism every one of the ``tp`` ranks of
    a stage holds the whole activation; Megatron's scatter/gather optimisation sends a
    1/tp slice from each and all-gathers it over NVLink on the other side (Narayanan et al.
    2021, Section 4.1), so each rank sends b·s·h/tp.
    """
    payload = _count("tokens", tokens) * _count("hidden", hidden) * \
        _positive("bytes_per_element", bytes_per_element)
    tp = _count("tp", tp)
    if not isinstance(scatter_gather, bool):
        raise TypeError(f"scatter_gather must be True or False, got {scatter_gather!r}")
    return payload / tp if scatter_gather else payload


@dataclass(frozen=True)
class CommPerStep:
    """Bytes one GPU sends in one training step, by kind of parallelism."""

    dp: float
    tp: float
    pp: float

    @property
    def total(self) -> float:
        return self.dp + self.tp + self.pp

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["total"] = self.total
        return out


def comm_per_step(model, seq_len: int, micro_batch: int, n_micro: int, tp: int = 1,
                  pp: int = 1, dp: int = 1, *, bytes_per_element: float = 2,
                  bytes_per_grad: float = 2, zero_stage: int = 0,
                  sequence_parallel: bool = False, scatter_gather: bool = True) -> CommPerStep:
    """Bytes the busiest GPU of a tp x pp x dp job sends in one step of ``n_micro`` micro-batches.

    * tp: :func:`tp_bytes_per_layer` for the ceil(L/pp) layers of a stage, per micro-batch;
    * pp: a middle stage sends each micro-batch's activation forward and its gradient
      backward (:func:`pp_bytes_per_microbatch`); with pp == 2 each stage sends one of
      the two; with pp == 1 nothing;
    * dp: the gradients of the GPU's 1/(tp·pp) share of the parameters, all-reduced over
      ``dp`` ranks (:func:`dp_bytes_per_step`); with ZeRO/FSDP the traffic of
      :func:`utils.memory.zero_comm_bytes_per_step` (stage 3 sends 1.5x as much).

    ``model`` is a ModelSpec or a registry name. Embedding and LM-head collectives and the
    all-reduce of replicated layer-norm gradients are left out.
    """
    m = resolve_model(model)
    s, b, n_micro = _count("seq_len", seq_len), _count("micro_batch", micro_batch), \
        _count("n_micro", n_micro)
    tp, pp, dp = _count("tp", tp), _count("pp", pp), _count("dp", dp)
    check_choice("zero_stage", zero_stage, (0, 1, 2, 3))
    if pp > m.n_layers:
        raise ValueError(f"pp={pp} is larger than the {m.n_layers} layers of {m.name}")
    if m.n_heads % tp:      # as utils.memory.training_bytes_per_device refuses it
        raise ValueError(f"tp={tp} does not divide the {m.n_heads} attention heads of "
                         f"{m.name}: tensor parallelism gives each rank an equal share")
    layers = -(-m.n_layers // pp)
    tp_bytes = n_micro * layers * tp_bytes_per_layer(s * b, m.hidden, tp, bytes_per_element,
                                                     sequence_parallel)
    directions = 0 if pp == 1 else (1 if pp == 2 else 2)
    pp_bytes = n_micro * directions * pp_bytes_per_microbatch(
        s * b, m.hidden, bytes_per_element, tp, scatter_gather and tp > 1)
    share = -(-m.param_count() // (tp * pp))
    if zero_stage == 0:
        dp_bytes = dp_bytes_per_step(share, dp, bytes_per_grad)
    else:
        dp_bytes = _memory.zero_comm_bytes_per_step(share, zero_stage, dp, bytes_per_grad,
                                                    exact=True).total
    return CommPerStep(dp=dp_bytes, tp=tp_bytes, pp=pp_bytes)


# ---------------------------------------------------------------------------------------
# Pipeline bubbles and schedules
# ---------------------------------------------------------------------------------------
def bubble_fraction(p: int, m: int, v: int = 1, relative_to: str = "step") -> float:
    """The pipeline bubble of a flushed schedule (GPipe, 1F1B, interleaved 1F1B).

    With p stages, m micro-batches and v model chunks per device, each device idles for
    (p-1)/v forward-plus-backward times per step and computes for m of them. Two
    conventions are in use:

    * ``relative_to="step"``: idle time over the whole step, (p-1) / (v·m + p - 1)
      (GPipe, Huang et al. 2019, Section 2.2: O((K-1)/(M+K-1)));
    * ``relative_to="compute"``: idle time over the ideal (compute) time, (p-1) / (v·m)
      (Narayanan et al. 2021, Section 2.2, "bubble time fraction"). It can exceed 1.

    They agree when m >> p; at p = 8, m = 8 they read 47% and 88%.
    """
    p, m, v = _count("p", p), _count("m", m), _count("v", v)
    if relative_to == "step":
        return (p - 1) / (v * m + p - 1)
    if relative_to == "compute":
        return (p - 1) / (v * m)
    raise ValueError(f"relative_to must be 'step' or 'compute', got {relative_to!r}")


SCHEDULES = ("gpipe", "1f1b", "interleaved")


def pipeline_orders(kind: str, p: int, m: int, v: int = 1) -> list[list[tuple]]:
    """The order in which each of the ``p`` pipeline devices runs its operations.

    Returns one list per device (device 0 holds the first layers). An operation is
    ``("F", mb)`` or ``("B", mb)``: the forward or backward of micro-batch ``mb`` through
    that device's stage. With ``kind="interleaved"`` each device holds ``v`` chunks
    (virtual stages ``c·p + d`` for chunk c of device d) and operations are
    ``(op, mb, chunk)``.

    * ``"gpipe"``: all m forwards, then all m backwards, micro-batch 0 first.
    * ``"1f1b"`` (PipeDream-Flush): device d runs min(p-d-1, m) warm-up forwards, then
      alternates one forward and one backward, then drains the remaining backwards; at
      most p-d micro-batches are in flight on device d instead of m.
    * ``"interleaved"``: Megatron's interleaved 1F1B (Narayanan et al. 2021, Section 2.2.2);
      forwards go through the chunks in groups of p micro-batches, backwards through the
      chunks in reverse; (p-d-1)·2 + (v-1)·p warm-up forwards. Needs m divisible by p.
    """
    p, m, v = _count("p", p), _count("m", m), _count("v", v)
    if kind == "gpipe" or kind == "1f1b":
        if v != 1:
            raise ValueError(f"{kind!r} has one chunk per device; use kind='interleaved' for v={v}")
        orders = []
        for d in range(p):
            if kind == "gpipe":
                orders.append([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
                continue
            warm = min(p - d - 1, m)
            order = [("F", i) for i in range(warm)]
            for i in range(m - warm):
                order += [("F", warm + i), ("B", i)]
            order += [("B", i) for i in range(m - warm, m)]
            orders.append(order)
        return orders
    if kind != "interleaved":
        raise ValueError(f"kind must be one of {SCHEDULES}; got unknown schedule {kind!r}")
    if m % p:
        raise ValueError(f"the interleaved schedule needs the micro-batches (m={m}) to be a "
                         f"multiple of the pipeline stages (p={p})")
    total = m * v

    def op(kind_, k):
        group, within = divmod(k, p * v)
        chunk = (k // p) % v
        if kind_ == "B":
            chunk = v - 1 - chunk
        return (kind_, group * p + within % p, chunk)

    orders = []
    for d in range(p):
        warm = min((p - d - 1) * 2 + (v - 1) * p, total)
        order = [op("F", k) for k in range(warm)]
        for k in range(total - warm):
            order += [op("F", warm + k), op("B", k)]
        order += [op("B", k) for k in range(total - warm, total)]
        orders.append(order)
    return orders


def _normalise(orders):
    """Each op as (op, mb, chunk); returns (orders, p, v)."""
    if not isinstance(orders, (list, tuple)) or not orders:
        raise ValueError("orders must be a non-empty list with one list of operations per device")
    norm = []
    for d, ops in enumerate(orders):
        row = []
        for o in ops:
            o = tuple(o)
            if len(o) not in (2, 3) or o[0] not in ("F", "B"):
                raise ValueError(f"device {d}: operation {o!r} is not ('F'|'B', mb[, chunk])")
            row.append((o[0], int(o[1]), int(o[2]) if len(o) == 3 else 0))
        norm.append(row)
    p = len(norm)
    v = 1 + max((c for row in norm for _, _, c in row), default=0)
    for d, row in enumerate(norm):
        if len(set(row)) != len(row):
            raise ValueError(f"device {d} runs an operation twice: {row}")
    return norm, p, v


def assign_slots(orders, forward_slots: int = 1, backward_slots: int = 1) -> list[list[tuple]]:
    """Run each device's operations in its order, each as early as its inputs allow.

    ``orders`` is what :func:`pipeline_orders` returns. The forward of micro-batch i on
    virtual stage k needs the forward of i on stage k-1; its backward needs the backward of
    i on stage k+1 (on the last stage: its own forward). A device runs one operation at a
    time; a forward takes ``forward_slots`` time slots, a backward ``backward_slots``;
    sending between devices is free.

    Returns one list per device of ``(slot, op, mb)`` (``(slot, op, mb, chunk)`` when the
    orders have chunks), ``slot`` being the start time. Raises ValueError if the orders
    deadlock (a device waits for an operation that can never run before it).
    """
    norm, p, v = _normalise(orders)
    with_chunks = any(len(tuple(o)) == 3 for ops in orders for o in ops)
    dur = {"F": _count("forward_slots", forward_slots), "B": _count("backward_slots", backward_slots)}
    last = p * v - 1
    finish: dict[tuple, int] = {}
    free, nxt = [0] * p, [0] * p
    out: list[list[tuple]] = [[] for _ in range(p)]
    remaining = sum(len(r) for r in norm)
    while remaining:
        progressed = False
        for d in range(p):
            while nxt[d] < len(norm[d]):
                op, mb, chunk = norm[d][nxt[d]]
                stage = chunk * p + d
                if op == "F":
                    deps = [("F", stage - 1, mb)] if stage > 0 else []
                else:
                    deps = [("F", stage, mb)] + ([("B", stage + 1, mb)] if stage < last else [])
                if any(dep not in finish for dep in deps):
                    break
                start = max([free[d]] + [finish[dep] for dep in deps])
                finish[(op, stage, mb)] = free[d] = start + dur[op]
                out[d].append((start, op, mb, chunk) if with_chunks else (start, op, mb))
                nxt[d] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {d: norm[d][nxt[d]] for d in range(p) if nxt[d] < len(norm[d])}
            raise ValueError(f"the orders deadlock: every device waits (next operation per "
                             f"device: {stuck}); an operation's input is scheduled after it")
    return out


def schedule(kind: str, p: int, m: int, v: int = 1, forward_slots: int = 1,
             backward_slots: int = 1) -> list[list[tuple]]:
    """:func:`assign_slots` of :func:`pipeline_orders`: a timed schedule per device."""
    return assign_slots(pipeline_orders(kind, p, m, v), forward_slots, backward_slots)


def _durations(sched, forward_slots, backward_slots):
    if not isinstance(sched, (list, tuple)) or not sched or \
            not all(isinstance(row, (list, tuple)) for row in sched):
        raise TypeError(f"sched must be a timed schedule (one list of (slot, op, mb) per "
                        f"device, as assign_slots returns), got {type(sched).__name__}")
    forward_slots = _count("forward_slots", forward_slots)
    backward_slots = _count("backward_slots", backward_slots)
    dur = {"F": forward_slots, "B": backward_slots}
    return [[(o[0], o[0] + dur[o[1]]) for o in row] for row in sched]


def idle_fraction(sched, forward_slots: int = 1, backward_slots: int = 1) -> float:
    """Measured bubble: the share of device-time (p devices x the makespan) spent idle."""
    spans = _durations(sched, forward_slots, backward_slots)
    end = max(e for row in spans for _, e in row)
    busy = sum(e - s for row in spans for s, e in row)
    return 1 - busy / (len(spans) * end)


def plot_timeline(sched, ax=None, title: str | None = None, forward_slots: int = 1,
                  backward_slots: int = 1, label_microbatches: bool = True):
    """Draw a timed schedule: one row per device, forwards blue, backwards orange.

    Interleaved schedules (ops with a chunk) are drawn with time in units of a whole
    stage's forward (a chunk takes 1/v of it); chunks are told apart by shade.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    _durations(sched, forward_slots, backward_slots)      # checks the arguments
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.45 * len(sched) + 1.2))
    v = 1 + max((o[3] for row in sched for o in row if len(o) == 4), default=0)
    colors = {"F": to_rgb("#0072B2"), "B": to_rgb("#D55E00")}
    dur = {"F": forward_slots, "B": backward_slots}
    end = 0.0
    for d, row in enumerate(sched):
        for o in row:
            start, op, mb = o[0], o[1], o[2]
            chunk = o[3] if len(o) == 4 else 0
            shade = 0.45 * chunk / max(v - 1, 1)
            color = tuple(c + (1 - c) * shade for c in colors[op])
            x, w = start / v, dur[op] / v
            ax.broken_barh([(x, w)], (d - 0.4, 0.8), facecolors=color, edgecolors="white",
                           linewidth=0.6)
            if label_microbatches:
                ax.text(x + w / 2, d, str(mb), ha="center", va="center", fontsize=7,
                        color="white")
            end = max(end, x + w)
    ax.set_ylim(len(sched) - 0.5, -0.5)
    ax.set_yticks(range(len(sched)))
    ax.set_yticklabels([f"stage {d}" for d in range(len(sched))])
    ax.set_xlim(0, end)
    ax.set_xlabel("time (forward passes of one stage)" if v > 1 else "time slot")
    ax.grid(False)
    if title:
        ax.set_title(title)
    return ax


# ---------------------------------------------------------------------------------------
# DDP buckets
# ---------------------------------------------------------------------------------------
def bucket_assignment(nbytes: Sequence[int], cap_bytes: int) -> list[list[int]]:
    """Group tensors into buckets the way DistributedDataParallel does.

    Walk the tensors in the given order (DDP: the order gradients become ready, roughly
    the reverse of the parameters' order), adding each to the open bucket; close the
    bucket as soon as it holds ``cap_bytes`` or more. A tensor larger than the cap gets a
    bucket of its own. Returns lists of indices into ``nbytes``. (PyTorch's
    ``_compute_bucket_assignment_by_size`` for tensors of one dtype and device.)
    """
    cap = _count("cap_bytes", cap_bytes)
    if isinstance(nbytes, (str, bytes)) or not isinstance(nbytes, Sequence):
        raise TypeError(f"nbytes must be a sequence of tensor sizes, got {type(nbytes).__name__}")
    buckets, current, size = [], [], 0
    for i, n in enumerate(nbytes):
        current.append(i)
        size += _count(f"nbytes[{i}]", n, minimum=0)
        if size >= cap:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets
