"""The host's memory: caches and DRAM latency, NUMA, page faults, data and model loading.

Chapter 04's library. Five concerns, each small:

Latency against working-set size
    :func:`build_chain` lays a random single-cycle permutation over cache lines (one
    8-byte index at the start of every 64-byte line), :func:`chase` follows it, one
    dependent load per step, and :func:`latency_sweep` measures seconds per step over
    working sets from L1 size to far beyond the last-level cache. A Python loop costs
    tens of nanoseconds per step whatever the memory does; the sweep measures that cost on
    a chain that stays in L1 and subtracts it, leaving the latency *above an L1 hit*.

NUMA
    :func:`parse_cpulist` and :func:`numa_topology` read the kernel's view of the
    machine from ``/sys/devices/system/node``; :func:`pinned` is ``os.sched_setaffinity``
    as a context manager; :func:`numa_latency` and :func:`numa_bandwidth` model a mix of
    local and remote accesses; :data:`PUBLISHED` holds the published figures with their
    sources; :func:`measure_numa` measures local against remote where there are two nodes.

Page faults and model loading
    :func:`count_faults` counts the minor and major page faults of a call with
    ``resource.getrusage``; :func:`first_use` loads one tensor of a safetensors file
    eagerly (read the whole file, then parse) or through ``safetensors.safe_open`` (an
    ``mmap``: only the pages the tensor lives on are faulted in), timing the first use;
    :func:`evict` asks the kernel to drop a file's pages from the page cache.

Data loading
    :class:`DecodeDataset` is a map-style dataset with a fixed CPU cost per sample (a
    stand-in for JPEG decoding); :func:`prefetch_loader` is a prefetching loader whose
    batches equal ``torch.utils.data.DataLoader``'s in content and order;
    :func:`loader_throughput` measures samples per second; :func:`loader_model` is the
    steady-state model the measurements are held to.

Units are SI: bytes, seconds, B/s.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import math
import multiprocessing
import numbers
import os
import resource
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .validate import check_callable, check_int, check_number, check_probability

__all__ = ["LINE_BYTES", "NODE_ROOT", "PUBLISHED", "build_chain", "chase", "latency_sweep",
           "parse_cpulist", "NumaNode", "numa_topology", "pinned", "numa_latency",
           "numa_bandwidth", "measure_numa", "count_faults", "first_use", "evict",
           "DecodeDataset", "prefetch_loader", "loader_throughput", "loader_model",
           "ddr_bandwidth"]

#: Bytes per cache line on x86-64 and most ARM server cores.
LINE_BYTES = 64
_SLOTS = LINE_BYTES // 8            # int64 slots per line

#: Where Linux describes NUMA nodes.
NODE_ROOT = "/sys/devices/system/node"

_LEVINTHAL = ("D. Levinthal, Performance Analysis Guide for Intel Core i7 Processor and Intel "
              "Xeon 5500 processors, Intel, 2009, table of load latencies (approximate)")
_TOPOLOGY_H = ("Linux include/linux/topology.h, LOCAL_DISTANCE and REMOTE_DISTANCE "
               "(\"Conform to ACPI 2.0 SLIT distance definitions\"); ACPI specification, "
               "System Locality Information Table (SLIT): the local distance is normalised to 10")

#: Published figures, each with its source. Latencies in s, sizes in bytes, rates in
#: transfers/s. Nothing here is measured on this machine.
PUBLISHED: dict[str, dict] = {
    "slit_local_distance": {"value": 10, "source": _TOPOLOGY_H},
    "slit_remote_distance_default": {
        "value": 20, "source": _TOPOLOGY_H + "; used when firmware gives no SLIT"},
    "xeon5500_local_dram_latency": {"value": 60e-9, "source": _LEVINTHAL + ": local DRAM ~60 ns"},
    "xeon5500_remote_dram_latency": {"value": 100e-9,
                                     "source": _LEVINTHAL + ": remote DRAM ~100 ns"},
    "xeon5500_l1_hit_cycles": {"value": 4, "source": _LEVINTHAL + ": L1 hit ~4 cycles"},
    "xeon5500_l2_hit_cycles": {"value": 10, "source": _LEVINTHAL + ": L2 hit ~10 cycles"},
    "xeon5500_l3_hit_cycles": {"value": 40, "source": _LEVINTHAL
                               + ": L3 hit, line unshared ~40 cycles"},
    "dgx_h100_cpu_sockets": {"value": 2, "source": "NVIDIA DGX H100 datasheet: dual Intel Xeon "
                                                   "Platinum 8480C processors, 112 cores total"},
    "dgx_h100_cpu_cores": {"value": 112, "source": "NVIDIA DGX H100 datasheet: 112 cores total"},
    "dgx_h100_system_memory": {"value": 2 * 2**40, "source": "NVIDIA DGX H100 datasheet: "
                                                             "system memory 2 TB"},
    "dgx_h100_gpus": {"value": 8, "source": "NVIDIA DGX H100 datasheet: 8x H100 Tensor Core GPUs"},
    "xeon8480_ddr5_channels": {"value": 8, "source": "Intel ARK, Xeon Platinum 8480+ "
                                                     "(Sapphire Rapids): 8 memory channels"},
    "xeon8480_ddr5_rate": {"value": 4800e6, "source": "Intel ARK, Xeon Platinum 8480+: DDR5-4800 "
                                                      "(4800 MT/s)"},
}


def _published(key: str) -> float:
    return PUBLISHED[key]["value"]


def ddr_bandwidth(channels: int, transfers_per_s: float, bus_bytes: int = 8) -> float:
    """Peak DRAM bandwidth in B/s: channels x transfers per second x bytes per transfer.

    A DDR4/DDR5 DIMM channel is 64 data bits (8 bytes) wide (DDR5 splits it into two
    32-bit subchannels, the same 8 bytes in total). ``ddr_bandwidth(8, 4800e6)`` is
    307.2 GB/s: one Sapphire Rapids socket with all eight channels populated.
    """
    channels = check_int("channels", channels, low=1)
    check_number("transfers_per_s", transfers_per_s, positive=True)
    bus_bytes = check_int("bus_bytes", bus_bytes, low=1)
    return channels * float(transfers_per_s) * bus_bytes


# --------------------------------------------------------------------------- latency

def build_chain(n_lines: int, seed: int = 0) -> torch.Tensor:
    """A random single cycle over ``n_lines`` cache lines, as an int64 tensor.

    The tensor has ``n_lines * 8`` elements (``n_lines * 64`` bytes): line ``i`` is
    elements ``8i .. 8i+7``; element ``8i`` holds ``8j``, the element index of the next
    line ``j`` on the cycle, and the other seven elements are 0. Following the chain from
    element 0 visits every line exactly once before coming back. The order is
    ``torch.randperm(n_lines)`` under ``seed``: random, so no hardware prefetcher can
    guess the next line.
    """
    n_lines = check_int("n_lines", n_lines, low=2)
    seed = check_int("seed", seed, low=0)
    order = torch.randperm(n_lines, generator=torch.Generator().manual_seed(seed))
    chain = torch.zeros(n_lines * _SLOTS, dtype=torch.int64)
    chain[order * _SLOTS] = torch.roll(order, -1) * _SLOTS
    return chain


def _check_chain(chain) -> torch.Tensor:
    if not isinstance(chain, torch.Tensor):
        raise TypeError(f"chain must be a torch.Tensor, got {type(chain).__name__}")
    if chain.dtype != torch.int64 or chain.ndim != 1 or chain.device.type != "cpu":
        raise TypeError(f"chain must be a 1-D int64 CPU tensor, got {chain.dtype} with shape "
                        f"{tuple(chain.shape)} on {chain.device}")
    if not chain.is_contiguous() or chain.numel() == 0:
        raise ValueError("chain must be contiguous and non-empty")
    return chain


def chase(chain: torch.Tensor, steps: int) -> tuple[float, int]:
    """Follow ``chain`` from element 0 for ``steps`` dependent loads: ``(seconds, end)``.

    Each load's address is the value the previous load returned, so the loads cannot
    overlap: the time per step is the latency of wherever the line lives, plus the
    interpreter's fixed cost per step. The loop is unrolled eight loads deep to shrink
    that cost; ``steps`` is rounded up to a multiple of 8 and ``end`` is the element
    reached after exactly ``steps`` loads.
    """
    chain = _check_chain(chain)
    steps = check_int("steps", steps, low=1)
    mv = memoryview(chain.numpy()).cast("B").cast("q")
    i = 0
    blocks, rest = divmod(steps, 8)
    t0 = time.perf_counter()
    for _ in range(blocks):
        i = mv[mv[mv[mv[mv[mv[mv[mv[i]]]]]]]]
    for _ in range(rest):
        i = mv[i]
    seconds = time.perf_counter() - t0
    return seconds, int(i)


def latency_sweep(sizes: Iterable[int], steps: int | None = None, repeats: int = 3,
                  seed: int = 0) -> list[dict]:
    """Seconds per dependent load against working-set size, the interpreter's cost removed.

    ``sizes`` are working sets in bytes (each a multiple of 64, at least 128); the
    smallest must fit in L1 (a few KiB): its time per step is taken as the interpreter's
    cost plus an L1 hit and subtracted from every size. Returns one dict per size, in
    the order given: ``bytes``, ``raw`` (s per step, best of ``repeats``) and ``latency``
    (``raw`` minus the smallest size's ``raw``, floored at 0: the latency above an L1 hit).
    """
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise TypeError(f"sizes must be an iterable of byte counts, got {type(sizes).__name__}")
    sizes = [check_int("sizes (each working set)", s, low=2 * LINE_BYTES) for s in sizes]
    if not sizes:
        raise ValueError("sizes must not be empty")
    for s in sizes:
        if s % LINE_BYTES:
            raise ValueError(f"sizes must be multiples of {LINE_BYTES} bytes, got {s}")
    if steps is None:
        from .bench import quick
        steps = 100_000 if quick() else 1_000_000
    steps = check_int("steps", steps, low=8)
    repeats = check_int("repeats", repeats, low=1)
    seed = check_int("seed", seed, low=0)
    raw = {}
    for s in sorted(set(sizes)):
        chain = build_chain(s // LINE_BYTES, seed)
        chase(chain, min(steps, 4 * s // LINE_BYTES + 8))        # warm: bring it into cache
        raw[s] = min(chase(chain, steps)[0] for _ in range(repeats)) / steps
    base = raw[min(raw)]
    return [{"bytes": s, "raw": raw[s], "latency": max(raw[s] - base, 0.0)} for s in sizes]


# --------------------------------------------------------------------------- NUMA

def parse_cpulist(text: str) -> list[int]:
    """The CPUs of a Linux cpulist (``"0-3,8,10-11"``) as a sorted list of ints.

    An empty string (a node without CPUs) gives ``[]``. Ranges are inclusive; a range
    may carry a stride (``"0-7:2"`` is 0, 2, 4, 6), as ``cpuset(7)`` allows.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return []
    for part in text.split(","):
        part = part.strip()
        stride = 1
        if ":" in part:
            part, _, step = part.partition(":")
            if not step.isdigit() or int(step) < 1:
                raise ValueError(f"bad stride in cpulist {text!r}: {step!r}")
            stride = int(step)
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"cannot read cpulist {text!r}: bad part {part!r}")
        lo_i, hi_i = int(lo), int(hi) if sep else int(lo)
        if hi_i < lo_i:
            raise ValueError(f"cannot read cpulist {text!r}: range {part!r} runs backwards")
        cpus.update(range(lo_i, hi_i + 1, stride))
    return sorted(cpus)


@dataclasses.dataclass(frozen=True)
class NumaNode:
    """One NUMA node as the kernel reports it: its CPUs, its memory, its distances."""

    id: int
    cpus: tuple[int, ...]
    memory: int                          # bytes (MemTotal)
    distances: tuple[int, ...]           # SLIT distance to every node, in node order


def numa_topology(root: str | os.PathLike = NODE_ROOT) -> list[NumaNode]:
    """The NUMA nodes under ``root`` (``/sys/devices/system/node``), sorted by id.

    Reads each ``node<N>/cpulist``, ``node<N>/meminfo`` (``MemTotal``, in kB = KiB) and
    ``node<N>/distance``. A missing ``root`` (not Linux, or a kernel without NUMA) gives
    ``[]``; a node folder without its files raises ``ValueError``.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path, got {type(root).__name__}")
    root = Path(root)
    if not root.is_dir():
        return []
    nodes = []
    for entry in root.iterdir():
        name = entry.name
        if not (name.startswith("node") and name[4:].isdigit() and entry.is_dir()):
            continue
        try:
            cpus = parse_cpulist((entry / "cpulist").read_text())
            distances = tuple(int(x) for x in (entry / "distance").read_text().split())
            memory = None
            for line in (entry / "meminfo").read_text().splitlines():
                fields = line.split()
                if len(fields) >= 4 and fields[2] == "MemTotal:":
                    memory = int(fields[3]) * 1024
            if memory is None:
                raise ValueError(f"{entry / 'meminfo'} has no MemTotal line")
        except FileNotFoundError as err:
            raise ValueError(f"{entry} is missing {Path(err.filename).name}") from None
        nodes.append(NumaNode(int(name[4:]), tuple(cpus), memory, distances))
    nodes.sort(key=lambda n: n.id)
    for n in nodes:
        if len(n.distances) != len(nodes):
            raise ValueError(f"node{n.id}/distance has {len(n.distances)} entries for "
                             f"{len(nodes)} nodes")
    return nodes


def pinned(cpus: Iterable[int]):
    """Run the block on ``cpus`` only (``os.sched_setaffinity``), then restore the mask.

    The scheduler will not run this process's threads anywhere else while inside; with
    Linux's default first-touch policy, pages first written here are placed on the node
    of these CPUs. The CPUs are checked when ``pinned`` is called, not when entered.
    """
    return _pinned(_check_cpus(cpus))


def _check_cpus(cpus) -> set:
    if not hasattr(os, "sched_setaffinity"):
        raise OSError("os.sched_setaffinity is not available on this system (Linux only)")
    if isinstance(cpus, (str, bytes)) or not isinstance(cpus, Iterable):
        raise TypeError(f"cpus must be an iterable of CPU numbers, got {type(cpus).__name__}")
    cpus = {check_int("cpus (each)", c, low=0) for c in cpus}
    if not cpus:
        raise ValueError("cpus must not be empty")
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise ValueError(f"cpus {sorted(cpus - allowed)} are not available to this process "
                         f"(allowed: {sorted(allowed)})")
    return cpus


@contextlib.contextmanager
def _pinned(cpus: set):
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield sorted(cpus)
    finally:
        os.sched_setaffinity(0, allowed)


def numa_latency(remote_fraction: float, local: float | None = None,
                 remote: float | None = None) -> float:
    """Mean load latency (s) when ``remote_fraction`` of the loads go to another node.

    ``(1 - f) * local + f * remote``; the defaults are the published Xeon 5500 figures
    (``PUBLISHED["xeon5500_local_dram_latency"]``, ``..._remote_...``).
    """
    f = check_probability("remote_fraction", remote_fraction)
    local = _published("xeon5500_local_dram_latency") if local is None else \
        check_number("local", local, positive=True)
    remote = _published("xeon5500_remote_dram_latency") if remote is None else \
        check_number("remote", remote, positive=True)
    return (1 - f) * local + f * remote


def numa_bandwidth(remote_fraction: float, local: float, remote: float) -> float:
    """Effective B/s of a stream whose bytes come ``remote_fraction`` from a remote node.

    Each byte takes ``1/local`` or ``1/remote`` seconds, so the rates mix harmonically:
    ``1 / ((1 - f) / local + f / remote)``. (Two streams that run *concurrently* from
    both nodes can instead add up: that is why interleaving pages helps bandwidth-bound
    code that all sockets run.)
    """
    f = check_probability("remote_fraction", remote_fraction)
    local = check_number("local", local, positive=True)
    remote = check_number("remote", remote, positive=True)
    return 1.0 / ((1 - f) / local + f / remote)


def measure_numa(nbytes: int = 64 << 20, root: str | os.PathLike = NODE_ROOT,
                 repeats: int = 3) -> dict | None:
    """Read bandwidth of a buffer from its own node and from another, or None.

    With at least two nodes that have CPUs: pin to node A's CPUs, first-touch an
    ``nbytes`` buffer there (its pages land on A), then time ``buffer.sum()`` pinned to
    A (local) and pinned to node B (remote), best of ``repeats``. Returns ``{"local":
    B/s, "remote": B/s, "nodes": (A, B)}``. With one node there is no remote memory to
    measure: None.
    """
    nbytes = check_int("nbytes", nbytes, low=1 << 20)
    repeats = check_int("repeats", repeats, low=1)
    nodes = [n for n in numa_topology(root) if n.cpus]
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    nodes = [n for n in nodes if set(n.cpus) & allowed]
    if len(nodes) < 2:
        return None
    a, b = nodes[0], nodes[1]
    cpus_a, cpus_b = set(a.cpus) & allowed, set(b.cpus) & allowed

    def best(buf):
        t = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            buf.sum()
            t = min(t, time.perf_counter() - t0)
        return nbytes / t

    with pinned(cpus_a):
        buf = torch.ones(nbytes // 4, dtype=torch.float32)       # first touch on node A
        local = best(buf)
    with pinned(cpus_b):
        remote = best(buf)
    return {"local": local, "remote": remote, "nodes": (a.id, b.id)}


# --------------------------------------------------------------------------- page faults

def count_faults(fn: Callable, *args, **kwargs) -> tuple[object, int, int]:
    """``(fn(*args, **kwargs), minor faults, major faults)`` of this process during the call.

    ``resource.getrusage(RUSAGE_SELF)`` before and after: ``ru_minflt`` counts faults the
    kernel served without I/O (a zeroed page, or a page already in the page cache),
    ``ru_majflt`` faults that had to read from storage. Other threads of this process
    count too.
    """
    check_callable("fn", fn)
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = fn(*args, **kwargs)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return result, after.ru_minflt - before.ru_minflt, after.ru_majflt - before.ru_majflt


def evict(path: str | os.PathLike) -> bool:
    """Ask the kernel to drop ``path``'s clean pages from the page cache.

    ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the whole file: the next read or ``mmap``
    touch comes from storage (major faults) instead of memory. Pages that some process
    still maps, or that are dirty, stay. Returns False where the call is not available.
    """
    path = _existing_file(path)
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def _existing_file(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {path} is not an existing file")
    return path


def first_use(path: str | os.PathLike, name: str, mode: str) -> dict:
    """Time and page faults until tensor ``name`` of a safetensors file is first used.

    ``mode="eager"``: read the whole file into memory and parse every tensor
    (``safetensors.torch.load`` of the bytes), then take ``name``. ``mode="mmap"``:
    ``safetensors.safe_open`` maps the file and ``get_tensor(name)`` touches only the
    header and that tensor's pages. "Use" is a float64 sum of the tensor. Returns
    ``{"seconds", "minor", "major", "tensor"}``.
    """
    path = _existing_file(path)
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if mode not in ("eager", "mmap"):
        raise ValueError(f"mode must be 'eager' or 'mmap', got {mode!r}")
    from safetensors import safe_open
    from safetensors.torch import load

    def eager():
        tensors = load(path.read_bytes())
        if name not in tensors:
            raise KeyError(f"{path.name} has no tensor {name!r}")
        t = tensors[name]
        t.double().sum()
        return t

    def lazy():
        with safe_open(str(path), framework="pt") as f:
            if name not in f.keys():
                raise KeyError(f"{path.name} has no tensor {name!r}")
            t = f.get_tensor(name)
        t.double().sum()
        return t

    t0 = time.perf_counter()
    tensor, minor, major = count_faults(eager if mode == "eager" else lazy)
    return {"seconds": time.perf_counter() - t0, "minor": minor, "major": major,
            "tensor": tensor}


# --------------------------------------------------------------------------- data loading

class DecodeDataset(torch.utils.data.Dataset):
    """``n`` samples ``(image, label)`` that each cost ``decode_seconds`` of CPU to make.

    ``image`` is a float32 tensor of ``shape`` drawn from a generator seeded with
    ``seed * 1_000_003 + index`` (the same index gives the same sample in any process);
    ``label`` is ``index % 10``. The decode cost is a busy loop until this thread has used
    ``decode_seconds`` of CPU time (``time.thread_time``), as a JPEG decoder would: it
    holds the interpreter, so threads do not overlap it and worker processes do, and on a
    busy machine it takes longer in wall-clock time, as real decoding does.
    """

    def __init__(self, n: int, shape: Sequence[int] = (3, 32, 32), decode_seconds: float = 1e-3,
                 seed: int = 0):
        self.n = check_int("n", n, low=1)
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or not shape:
            raise TypeError(f"shape must be a non-empty sequence of ints, got {shape!r}")
        self.shape = tuple(check_int("shape (each)", d, low=1) for d in shape)
        self.decode_seconds = check_number("decode_seconds", decode_seconds, nonnegative=True)
        self.seed = check_int("seed", seed, low=0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        index = int(index)
        end = time.thread_time() + self.decode_seconds
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.rand(self.shape, generator=g)
        while time.thread_time() < end:             # CPU time: a busy core, as decoding is
            pass
        return image, index % 10


_WORKER_DATASET = None
_WORKER_COLLATE = None


def _worker_init(dataset, collate):
    global _WORKER_DATASET, _WORKER_COLLATE
    _WORKER_DATASET, _WORKER_COLLATE = dataset, collate
    torch.set_num_threads(1)


def _worker_load(indices):
    return _WORKER_COLLATE([_WORKER_DATASET[i] for i in indices])


def _check_loader_args(dataset, indices, batch_size, num_workers, prefetch_factor, timeout):
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset must be a map-style dataset (__getitem__ and __len__), got "
                        f"{type(dataset).__name__}")
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise TypeError(f"indices must be an iterable of sample indices, got "
                        f"{type(indices).__name__}")
    check_int("batch_size", batch_size, low=1)
    check_int("num_workers", num_workers, low=0)
    check_int("prefetch_factor", prefetch_factor, low=1)
    check_number("timeout", timeout, positive=True)


def prefetch_loader(dataset, indices: Iterable[int], batch_size: int, num_workers: int = 0,
                    prefetch_factor: int = 2, collate_fn: Callable | None = None,
                    timeout: float = 120.0):
    """Batches of ``dataset`` in the order of ``indices``, loaded ahead by worker processes.

    Yields ``collate_fn([dataset[i] for i in chunk])`` for consecutive chunks of
    ``batch_size`` indices (the last may be shorter), exactly what
    ``DataLoader(dataset, batch_size, sampler=indices, num_workers=num_workers,
    prefetch_factor=prefetch_factor)`` yields. With ``num_workers=0`` the main process
    loads each batch when asked. With workers, a pool of forked processes keeps
    ``num_workers * prefetch_factor`` batches in flight, and batches are handed out in
    order whichever worker finishes first. ``collate_fn`` defaults to DataLoader's
    ``default_collate``. A batch not ready after ``timeout`` seconds raises TimeoutError;
    closing the generator early ends the workers.
    """
    _check_loader_args(dataset, indices, batch_size, num_workers, prefetch_factor, timeout)
    if collate_fn is None:
        from torch.utils.data import default_collate as collate_fn
    check_callable("collate_fn", collate_fn)
    indices = list(indices)
    for i, ix in enumerate(indices):
        check_int(f"indices[{i}]", ix, low=0, high=len(dataset) - 1)
    return _prefetch(dataset, indices, batch_size, num_workers, prefetch_factor,
                     collate_fn, timeout)


def _prefetch(dataset, indices, batch_size, num_workers, prefetch_factor, collate, timeout):
    chunks = (indices[i:i + batch_size] for i in range(0, len(indices), batch_size))
    if num_workers == 0:
        for chunk in chunks:
            yield collate([dataset[i] for i in chunk])
        return
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(num_workers, initializer=_worker_init, initargs=(dataset, collate))
    try:
        pending = collections.deque(pool.apply_async(_worker_load, (chunk,))
                                    for chunk in itertools.islice(chunks, num_workers
                                                                  * prefetch_factor))
        while pending:
            batch = pending.popleft().get(timeout)
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(pool.apply_async(_worker_load, (nxt,)))
            yield batch
        pool.close()
    finally:
        _stop_pool(pool)


def _stop_pool(pool) -> None:
    """Terminate ``pool`` and join it, whatever state its handler threads are in.

    CPython's ``Pool.terminate`` asserts when its result-handler thread has already
    exited while results are outstanding (seen on a loaded machine when the consumer
    stops early); the workers are then stopped or stopping, and are killed here so that
    none is left behind.
    """
    try:
        pool.terminate()
    except AssertionError:
        for proc in list(getattr(pool, "_pool", [])):
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        return
    pool.join()


def loader_throughput(make_batches: Callable[[], Iterable], epochs: int = 1) -> dict:
    """Samples per second of ``make_batches()`` consumed for ``epochs`` epochs.

    ``make_batches`` builds a fresh iterable of batches per epoch (a DataLoader, or a
    call of :func:`prefetch_loader`); a batch's size is the length of its first field.
    Returns ``{"samples_per_s", "steady_samples_per_s", "first_batch_s", "seconds",
    "samples"}``: ``samples_per_s`` over the whole run; ``first_batch_s`` the wait for
    the first batch (it includes starting the workers); ``steady_samples_per_s`` the
    rate after that first batch, the number the steady-state model predicts.
    """
    check_callable("make_batches", make_batches)
    epochs = check_int("epochs", epochs, low=1)
    samples = first_samples = 0
    first = None
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in make_batches():
            head = batch[0] if isinstance(batch, (list, tuple)) else batch
            samples += len(head)
            if first is None:
                first, first_samples = time.perf_counter() - t0, samples
    seconds = time.perf_counter() - t0
    if first is None:
        raise ValueError("make_batches() gave no batches")
    rest = seconds - first
    steady = (samples - first_samples) / rest if samples > first_samples and rest > 0 else math.nan
    return {"samples_per_s": samples / seconds, "steady_samples_per_s": steady,
            "first_batch_s": first, "seconds": seconds, "samples": samples}


def loader_model(decode_seconds: float, batch_size: int, num_workers: int, cores: int,
                 step_seconds: float = 0.0) -> float:
    """Steady-state samples/s of a loader feeding a training step (the model, not a timing).

    Loading a batch costs ``batch_size * decode_seconds`` of one core. With no workers
    the main process loads and then steps, one after the other. With workers the loading
    overlaps the step: ``min(num_workers, cores)`` batches are made at once (a worker
    process needs a core; in the worst case the step's own process takes one of them, the
    model ignores that), and the loader delivers whichever is slower, the workers or the
    step.
    """
    c = check_number("decode_seconds", decode_seconds, nonnegative=True)
    b = check_int("batch_size", batch_size, low=1)
    w = check_int("num_workers", num_workers, low=0)
    cores = check_int("cores", cores, low=1)
    step = check_number("step_seconds", step_seconds, nonnegative=True)
    load = b * c
    if w == 0:
        per_batch = load + step
    else:
        per_batch = max(load / min(w, cores), step)
    return math.inf if per_batch == 0 else b / per_batch
