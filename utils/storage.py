"""Storage IO for training: sharded datasets, the page cache, and checkpoints that do not stall.

Sharded datasets in the WebDataset layout
    A *shard* is a plain POSIX tar file. A sample is a group of consecutive members that
    share a *key*: ``000017.jpg`` and ``000017.cls`` are the fields ``jpg`` and ``cls`` of
    the sample whose ``__key__`` is ``000017``. The key is the member name up to the first
    dot of its last path component, the field name (the *extension*) is the rest,
    lower-cased; that is the rule of the ``webdataset`` library (``base_plus_ext`` and
    ``group_by_keys`` in ``webdataset/tariterators.py``, version 1.0.2), which the tests use
    as the oracle.

    * :func:`write_shards` -- samples (dicts of bytes) into tar shards, each written under a
      temporary name and renamed when complete.
    * :func:`read_shard` -- the samples of one shard, with ``__key__`` and ``__url__`` as
      ``webdataset`` gives them; a file that is not a tar, or is cut off, is refused.
    * :func:`shard_stream` -- the sample stream of one (rank, DataLoader worker): shards
      shuffled per epoch with a seed shared by every rank, split by rank then by worker
      (``shards[rank::world_size][worker::num_workers]``, ``webdataset``'s
      ``split_by_node`` then ``split_by_worker``), samples mixed by a seeded shuffle buffer;
      ``skip`` drops the first samples (resuming).
    * :class:`ShardStream` -- the same as a ``torch.utils.data.IterableDataset`` that knows
      its DataLoader worker, tags each sample with it, and resumes mid-epoch from
      :meth:`ShardStream.state_dict` so that exactly the samples not yet consumed follow.

The page cache
    :func:`drop_cache` evicts a file's clean pages (``fsync`` then
    ``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)``); :func:`resident_fraction` asks the
    kernel which pages are cached (``mincore(2)``); :func:`read_seconds` reads files cold
    or warm and times it.

Checkpoints
    :func:`checkpoint_bytes` (chapter 11's formula: bf16 weights + fp32 master weights +
    AdamW's two moments = 14 bytes a parameter; gradients are not saved),
    :func:`write_seconds`; :class:`AsyncCheckpointer` (snapshot in the training loop, write
    in a background thread through chapter 15's atomic, checksummed
    :func:`utils.reliability.save_checkpoint`), :func:`restore` (refuses a checkpoint of
    another model), :func:`checkpoint_stall` (the time a training loop is blocked by
    ``torch.save``, ``torch.distributed.checkpoint.save`` and ``async_save``).

Registry: :data:`STORAGE` (Llama 3's training storage, with its source) and
:data:`LLAMA3_405B` (the architecture, for checkpoint sizes).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import io
import mmap
import os
import random
import re
import tarfile
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from . import hardware, memory, models, reliability
from .validate import check_bool, check_int, check_nonnegative, check_positive

__all__ = ["StorageSystem", "STORAGE", "LLAMA3_405B", "nvme_link_ceiling", "checkpoint_bytes",
           "write_seconds", "write_shards", "read_shard", "shard_stream", "ShardStream",
           "drop_cache", "resident_fraction", "read_seconds", "AsyncCheckpointer", "restore",
           "checkpoint_stall", "CHECKPOINT_METHODS"]

# ------------------------------------------------------------------------------ registry
LLAMA3_SOURCE = ("A. Grattafiori, A. Dubey et al. (Llama Team, AI @ Meta), 'The Llama 3 Herd "
                 "of Models', arXiv:2407.21783, 2024, Section 3.3.1 (Storage)")


@dataclass(frozen=True)
class StorageSystem:
    """A storage system as published (SI units: bytes, B/s)."""

    name: str
    capacity: float                 # bytes
    servers: int
    sustained_bandwidth: float      # B/s
    peak_bandwidth: float           # B/s
    checkpoint_per_gpu: tuple       # (smallest, largest) bytes of model state saved per GPU
    gpus: int                       # GPUs of the job it served
    source: str


#: Storage systems with published figures. Llama 3 (Section 3.3.1): Tectonic, Meta's
#: general-purpose distributed file system, "240 PB of storage out of 7,500 servers equipped
#: with SSDs", "a sustainable throughput of 2 TB/s and a peak throughput of 7 TB/s";
#: checkpoints save "each GPU's model state, ranging from 1 MB to 4 GB per GPU"; the 405B
#: model was trained on up to 16K H100 GPUs (read as 16,384, as chapter 15 does).
STORAGE = {
    "Llama 3 Tectonic": StorageSystem(
        name="Llama 3 Tectonic", capacity=240e15, servers=7500, sustained_bandwidth=2e12,
        peak_bandwidth=7e12, checkpoint_per_gpu=(1e6, 4e9), gpus=16384, source=LLAMA3_SOURCE),
}

#: Llama 3 405B, from the model registry (``models.get("llama3-405b")``; Table 3 of the paper).
LLAMA3_405B = models.get("llama3-405b")


def nvme_link_ceiling(gen: int) -> float:
    """B/s per direction of the PCIe x4 link an NVMe drive sits on: a drive of PCIe
    generation ``gen`` (3, 4 or 5) cannot move data faster (x16 figure from the registry / 4)."""
    gen = check_int("gen", gen, low=3, high=5)
    return hardware.link(f"PCIe Gen{gen} x16").bandwidth * 4 / 16


def checkpoint_bytes(model_or_params, *, weight_bytes: float = 2, master_weights: bool = True,
                     optimizer: str = "adamw") -> float:
    """Bytes of a full training checkpoint: weights (``weight_bytes`` each, 2 for bf16) plus
    the optimizer state of chapter 11 (:func:`utils.memory.optimizer_bytes`: AdamW's two fp32
    moments and the fp32 master copy). Gradients are not saved: the next step recomputes them.
    Mixed-precision AdamW: 2 + 12 = 14 bytes a parameter."""
    weight_bytes = check_positive("weight_bytes", weight_bytes)
    master_weights = check_bool("master_weights", master_weights)
    return (memory.weights_bytes(model_or_params, weight_bytes)
            + memory.optimizer_bytes(model_or_params, optimizer, master_weights))


def write_seconds(nbytes, bandwidth) -> float:
    """Seconds to write ``nbytes`` at ``bandwidth`` B/s (both finite; bytes >= 0, B/s > 0)."""
    nbytes = check_nonnegative("nbytes", nbytes)
    bandwidth = check_positive("bandwidth", bandwidth)
    return nbytes / bandwidth


# ------------------------------------------------------------------------------ shards
_KEY = re.compile(r"^[^.]+$")


def _path(name: str, x) -> str:
    """``x`` as a ``str`` path, or a TypeError naming the argument."""
    if isinstance(x, bool) or not isinstance(x, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path (str or os.PathLike), got {type(x).__name__} {x!r}")
    return os.fspath(x)


def _check_sample(i: int, sample) -> tuple[str, dict]:
    if not isinstance(sample, dict):
        raise TypeError(f"samples[{i}] must be a dict, got {type(sample).__name__}")
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or not _KEY.match(key) or key.endswith("/") \
            or os.path.basename(key).startswith("__"):
        raise ValueError(f"samples[{i}]['__key__'] must be a non-empty string without a dot "
                         f"(the key ends at the first dot of a member name), got {key!r}")
    fields = {k: v for k, v in sample.items() if not k.startswith("__")}
    if not fields:
        raise ValueError(f"samples[{i}] (key {key!r}) has no fields: a sample needs at least one")
    for ext, value in fields.items():
        if not isinstance(ext, str) or ext != ext.lower() or "/" in ext or not ext:
            raise ValueError(f"samples[{i}] field {ext!r}: a field name must be a non-empty "
                             f"lower-case string without '/' (readers lower-case it)")
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"samples[{i}][{ext!r}] must be bytes, got {type(value).__name__}")
    return key, fields


def write_shards(samples: Iterable[dict], folder, samples_per_shard: int,
                 prefix: str = "shard") -> list[str]:
    """Write ``samples`` into tar shards ``folder/{prefix}-000000.tar``, ... and return their paths.

    Each sample is a dict with ``"__key__"`` (a non-empty string without a dot) and one or
    more fields ``ext -> bytes`` (``ext`` lower-case, no ``/``); it becomes the members
    ``{key}.{ext}``, consecutive, in the dict's order. ``samples_per_shard`` samples go in
    each shard (the last may hold fewer). Keys must be unique. Members carry fixed metadata
    (mtime 0, mode 0o644, uid/gid 0) so the same samples give the same bytes. Every shard is
    written under a temporary name and renamed when complete.
    """
    folder = _path("folder", folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder {folder!r} does not exist")
    samples_per_shard = check_int("samples_per_shard", samples_per_shard, low=1)
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__} {prefix!r}")
    if not prefix or "/" in prefix:
        raise ValueError(f"prefix must be a non-empty file-name prefix, got {prefix!r}")
    paths: list[str] = []
    seen: set[str] = set()
    batch: list[tuple[str, dict]] = []

    def flush():
        path = os.path.join(folder, f"{prefix}-{len(paths):06d}.tar")
        with reliability._atomic_file(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, fields in batch:
                for ext, value in fields.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(value), 0, 0o644
                    tar.addfile(info, io.BytesIO(bytes(value)))
        paths.append(path)
        batch.clear()

    if isinstance(samples, (str, bytes, dict)) or not hasattr(samples, "__iter__"):
        raise TypeError(f"samples must be an iterable of dicts, got {type(samples).__name__}")
    for i, sample in enumerate(samples):
        key, fields = _check_sample(i, sample)
        if key in seen:
            raise ValueError(f"samples[{i}]: duplicate key {key!r} (keys must be unique)")
        seen.add(key)
        batch.append((key, fields))
        if len(batch) == samples_per_shard:
            flush()
    if batch:
        flush()
    return paths


def _split_name(name: str):
    """(key, ext) by webdataset's rule, or (None, None) for a name without an extension."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2)) if m else (None, None)


def read_shard(path) -> Iterator[dict]:
    """The samples of the tar shard ``path``, in file order.

    Each sample: ``{"__key__": key, "__url__": path, ext: bytes, ...}`` (``ext``
    lower-cased), as ``webdataset.WebDataset`` yields it. Members that are not regular
    files, names without an extension and ``__...__`` metadata members are skipped.
    Raises ``ValueError`` naming the file when it is not a tar, is cut off (inside a member,
    or before the end-of-archive marker), or repeats a field within a sample (while
    iterating); a path that is not a path (``TypeError``) or no file (``FileNotFoundError``)
    at once.
    """
    url = _path("path", path)
    if not os.path.isfile(url):
        raise FileNotFoundError(f"shard {url!r} does not exist")
    return _read_shard(url)


def _read_shard(url: str) -> Iterator[dict]:
    with open(url, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as err:
            raise ValueError(f"shard {url!r} is not a tar file ({err})") from None
        current = None
        try:
            for info in tar:
                if not info.isreg():
                    continue
                base = os.path.basename(info.name)
                if base.startswith("__") and base.endswith("__") and "/" not in info.name:
                    continue
                if re.match(r"__[^/]*__($|/)", info.name):
                    continue
                key, ext = _split_name(info.name)
                if key is None:
                    continue
                ext = ext.lower()
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise ValueError(f"shard {url!r} is truncated inside member {info.name!r}")
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                if ext in current:
                    raise ValueError(f"shard {url!r}: field {ext!r} appears twice in sample {key!r}")
                current[ext] = data
            end = tar.offset
        except tarfile.ReadError as err:
            raise ValueError(f"shard {url!r} is truncated or corrupt ({err})") from None
        f.seek(end)
        marker = f.read(2 * tarfile.BLOCKSIZE)
        if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
            raise ValueError(f"shard {url!r} is truncated: no end-of-archive marker after the "
                             f"last member (byte {end})")
        if current is not None:
            yield current


def _check_shards(shards) -> list[str]:
    if isinstance(shards, (str, bytes)) or not hasattr(shards, "__iter__"):
        raise TypeError(f"shards must be a list of paths, got {type(shards).__name__}")
    shards = [_path(f"shards[{i}]", s) for i, s in enumerate(shards)]
    if not shards:
        raise ValueError("shards is empty")
    if len(set(shards)) != len(shards):
        raise ValueError("shards lists a path twice (its samples would be read twice)")
    return shards


def _buffer_shuffle(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buf: list[dict] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = rng.randrange(size)
        out, buf[j] = buf[j], s
        yield out
    rng.shuffle(buf)
    yield from buf


def shard_stream(shards, *, rank: int = 0, world_size: int = 1, worker: int = 0,
                 num_workers: int = 1, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 buffer_size: int = 0, skip: int = 0) -> Iterator[dict]:
    """The samples one DataLoader ``worker`` of one ``rank`` reads in ``epoch``.

    1. Shard order: with ``shuffle``, ``shards`` permuted by ``random.Random(f"{seed}-{epoch}")``
       -- the same permutation on every rank and worker, a new one each epoch.
    2. Split: ``order[rank::world_size][worker::num_workers]``. Every shard goes to exactly
       one (rank, worker), so the union over all of them is every sample exactly once.
    3. Samples of those shards in order (:func:`read_shard`), mixed by a shuffle buffer of
       ``buffer_size`` samples (0 or 1: no mixing) seeded by (seed, epoch, rank, worker).
       A sample never leaves more than ``buffer_size`` places before its place in the
       unmixed stream.
    4. The first ``skip`` samples are dropped (to resume).
    """
    shards = _check_shards(shards)
    world_size = check_int("world_size", world_size, low=1)
    rank = check_int("rank", rank, low=0, high=world_size - 1)
    num_workers = check_int("num_workers", num_workers, low=1)
    worker = check_int("worker", worker, low=0, high=num_workers - 1)
    seed, epoch = check_int("seed", seed), check_int("epoch", epoch, low=0)
    shuffle = check_bool("shuffle", shuffle)
    buffer_size = check_int("buffer_size", buffer_size, low=0)
    skip = check_int("skip", skip, low=0)
    return _stream(shards, rank, world_size, worker, num_workers, seed, epoch, shuffle,
                   buffer_size, skip)


def _stream(shards, rank, world_size, worker, num_workers, seed, epoch, shuffle, buffer_size, skip):
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}-{epoch}").shuffle(order)
    mine = order[rank::world_size][worker::num_workers]
    samples = (s for path in mine for s in read_shard(path))
    if buffer_size > 1:
        rng = random.Random(f"{seed}-{epoch}-{rank}-{worker}")
        samples = _buffer_shuffle(samples, buffer_size, rng)
    for i, s in enumerate(samples):
        if i >= skip:
            yield s


class ShardStream(torch.utils.data.IterableDataset):
    """A resumable sharded stream for ``DataLoader(ds, batch_size=None, num_workers=W)``.

    ``num_workers`` must equal the DataLoader's (1 when it has none). In each worker,
    :func:`shard_stream` with that worker's index; every sample gets ``"__worker__"``.
    The training loop calls :meth:`mark` on each sample it has consumed;
    :meth:`state_dict` is then the position, and ``ShardStream(..., state=...)`` with the
    same arguments yields exactly the samples not yet consumed (each worker skips the ones
    it had delivered). A state from other shards, seed, epoch, rank or worker count is
    refused with a ``ValueError`` naming the field.
    """

    def __init__(self, shards, *, rank: int = 0, world_size: int = 1, num_workers: int = 1,
                 seed: int = 0, epoch: int = 0, shuffle: bool = True, buffer_size: int = 0,
                 state: dict | None = None):
        self.shards = _check_shards(shards)
        self.world_size = check_int("world_size", world_size, low=1)
        self.rank = check_int("rank", rank, low=0, high=self.world_size - 1)
        self.num_workers = check_int("num_workers", num_workers, low=1)
        self.seed, self.epoch = check_int("seed", seed), check_int("epoch", epoch, low=0)
        self.shuffle = check_bool("shuffle", shuffle)
        self.buffer_size = check_int("buffer_size", buffer_size, low=0)
        self.consumed = [0] * self.num_workers
        if state is not None:
            self.consumed = self._check_state(state)

    def _identity(self) -> dict:
        return {"shards": list(self.shards), "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_workers, "seed": self.seed, "epoch": self.epoch,
                "shuffle": self.shuffle, "buffer_size": self.buffer_size}

    def _check_state(self, state) -> list[int]:
        if not isinstance(state, dict) or "consumed" not in state:
            raise TypeError("state must be a dict from ShardStream.state_dict()")
        for field, mine in self._identity().items():
            if state.get(field) != mine:
                raise ValueError(f"state[{field!r}] is {state.get(field)!r} but this stream has "
                                 f"{mine!r}: the state belongs to another stream")
        consumed = state["consumed"]
        if not isinstance(consumed, (list, tuple)) or len(consumed) != self.num_workers:
            raise ValueError(f"state['consumed'] must list {self.num_workers} counts, got {consumed!r}")
        return [check_int(f"state['consumed'][{w}]", c, low=0) for w, c in enumerate(consumed)]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != self.num_workers:
            raise ValueError(f"num_workers is {self.num_workers} but the DataLoader runs "
                             f"{workers} worker(s): pass the DataLoader's num_workers (1 for none)")
        for s in _stream(self.shards, self.rank, self.world_size, worker, workers, self.seed,
                         self.epoch, self.shuffle, self.buffer_size, self.consumed[worker]):
            s["__worker__"] = worker
            yield s

    def mark(self, sample: dict) -> None:
        """Count ``sample`` (as the DataLoader delivered it) as consumed."""
        w = sample.get("__worker__") if isinstance(sample, dict) else None
        if isinstance(w, torch.Tensor):
            w = int(w)
        if not isinstance(w, int) or not 0 <= w < self.num_workers:
            raise ValueError(f"sample has no valid '__worker__' tag (got {w!r}): mark the "
                             f"samples this stream yielded")
        self.consumed[w] += 1

    def state_dict(self) -> dict:
        return dict(self._identity(), consumed=list(self.consumed))


# ------------------------------------------------------------------------------ page cache
def drop_cache(path, sync: bool = True) -> None:
    """Evict ``path``'s pages from the page cache: write back dirty pages (``fsync``), then
    ``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)``. The kernel drops only clean, unmapped
    pages; nothing else needs privileges. ``sync=False`` skips the ``fsync`` (a few ms a file
    on a journaling file system even when nothing is dirty) for files known to be clean,
    e.g. after one ``os.sync()``."""
    path = _path("path", path)
    sync = check_bool("sync", sync)
    fd = os.open(path, os.O_RDONLY)
    try:
        if sync:
            os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_LIBC = None


def resident_fraction(path) -> float:
    """Fraction of ``path``'s pages that are in the page cache now (``mincore(2)`` on a map
    of the file); 1.0 for an empty file."""
    global _LIBC
    path = _path("path", path)
    size = os.path.getsize(path)
    if size == 0:
        return 1.0
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ | mmap.PROT_WRITE, flags=mmap.MAP_PRIVATE)
        try:
            buf = (ctypes.c_char * size).from_buffer(mm)
            vec = (ctypes.c_ubyte * pages)()
            try:
                if _LIBC.mincore(ctypes.addressof(buf), size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore failed on {path!r}")
            finally:
                del buf
        finally:
            mm.close()
    return sum(v & 1 for v in vec) / pages


def read_seconds(paths, cold: bool, block: int = 1 << 20, sync: bool = True) -> float:
    """Seconds to read every byte of ``paths`` (in order, ``block`` bytes a call), after
    evicting them from the page cache first when ``cold`` (eviction is not timed;
    ``sync`` as in :func:`drop_cache`)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, (list, tuple)):
        raise TypeError(f"paths must be a path or a list of paths, got {type(paths).__name__}")
    paths = [_path(f"paths[{i}]", p) for i, p in enumerate(paths)]
    if not paths:
        raise ValueError("paths is empty")
    cold = check_bool("cold", cold)
    block = check_int("block", block, low=1)
    sync = check_bool("sync", sync)
    if cold:
        for p in paths:
            drop_cache(p, sync)
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(block):
                pass
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------ checkpoints
def _check_state(state) -> dict:
    if not isinstance(state, dict) or not state:
        raise TypeError(f"state must be a non-empty dict of tensors, got {type(state).__name__}")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise TypeError(f"state[{k!r}] must be a tensor under a string key, got "
                            f"{type(v).__name__}")
    return state


class AsyncCheckpointer:
    """Checkpoints that stall the training loop only for a snapshot.

    ``save(state, path)`` copies every tensor of ``state`` (a dict name -> tensor) into CPU
    staging buffers -- the part the loop waits for -- then writes the copy in a background
    thread with :func:`utils.reliability.save_checkpoint` (temporary name, fsync, rename: a
    crash leaves the previous checkpoint, never a half-written one) and returns. The staging
    buffers are kept for the next save when names, shapes and dtypes match: a fresh buffer
    pays a page fault per 4 KiB page on its first touch (chapter 06), often more than the
    copy itself. (Pinned, on a CUDA machine, for fast device-to-host copies.) One write is
    in flight at a time: a new ``save`` first waits for the previous one, which also makes
    reusing the buffers safe. ``wait()`` blocks until the write has finished and re-raises
    its error, if any.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._staging: dict | None = None

    def _stage(self, state: dict) -> dict:
        old = self._staging
        if old is None or list(old) != list(state) or any(
                old[k].shape != v.shape or old[k].dtype != v.dtype for k, v in state.items()):
            pin = torch.cuda.is_available()
            self._staging = {k: torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=pin)
                             for k, v in state.items()}
        for k, v in state.items():
            self._staging[k].copy_(v.detach())
        return self._staging

    def save(self, state: dict, path) -> None:
        state = _check_state(state)
        path = _path("path", path)
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"folder of path {path!r} does not exist")
        self.wait()
        snapshot = self._stage(state)

        def write():
            try:
                reliability.save_checkpoint(path, snapshot)
            except BaseException as err:          # handed to wait()
                self._error = err

        self._thread = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def restore(model: torch.nn.Module, path) -> None:
    """Load the checkpoint at ``path`` (written by :func:`utils.reliability.save_checkpoint`)
    into ``model``. A checkpoint of another model -- a missing or unexpected tensor name, or
    a shape that differs -- raises ``ValueError`` naming it, and ``model`` is left unchanged."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = _path("path", path)
    state = reliability.load_checkpoint(path)
    own = model.state_dict()
    for name in own:
        if name not in state:
            raise ValueError(f"checkpoint {os.fspath(path)!r} has no tensor {name!r}: it is not "
                             f"a checkpoint of this model")
    for name, t in state.items():
        if name not in own:
            raise ValueError(f"checkpoint {os.fspath(path)!r} has tensor {name!r}, which this "
                             f"model does not: it is not a checkpoint of this model")
        if not isinstance(t, torch.Tensor) or t.shape != own[name].shape:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"checkpoint {os.fspath(path)!r}: tensor {name!r} has shape {shape}, "
                             f"this model's has {tuple(own[name].shape)}")
    model.load_state_dict(state)


CHECKPOINT_METHODS = ("torch.save", "dcp.save", "dcp.async_save", "AsyncCheckpointer")


def checkpoint_stall(method: str, state: dict, folder) -> tuple[float, float]:
    """(stall, total) seconds of one checkpoint of ``state`` into ``folder`` by ``method``.

    ``stall`` is how long the caller -- the training loop -- is blocked; ``total`` is until
    the checkpoint is durable on disk. ``"torch.save"`` (to a temporary name, fsync, rename)
    and ``"dcp.save"`` block for all of it; ``"dcp.async_save"`` (``torch.distributed.
    checkpoint.async_save``, no process group needed on one process) and
    ``"AsyncCheckpointer"`` block only while they stage a copy of the tensors (the latter
    timed on its second save, when its staging buffers exist; ``async_save`` makes a new
    stager per call unless it is given one).
    """
    from .validate import check_choice
    method = check_choice("method", method, CHECKPOINT_METHODS)
    state = _check_state(state)
    folder = _path("folder", folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder {folder!r} does not exist")
    target = tempfile.mkdtemp(prefix="ckpt-", dir=folder)
    if method == "torch.save":
        t0 = time.perf_counter()
        with reliability._atomic_file(os.path.join(target, "state.pt")) as f:
            torch.save(state, f)
        stall = total = time.perf_counter() - t0
    elif method == "AsyncCheckpointer":
        ck = AsyncCheckpointer()             # in steady state: its staging buffers exist
        ck.save(state, os.path.join(target, "state.ckpt"))
        ck.wait()
        t0 = time.perf_counter()
        ck.save(state, os.path.join(target, "state.ckpt"))
        stall = time.perf_counter() - t0
        ck.wait()
        total = time.perf_counter() - t0
    else:
        import torch.distributed.checkpoint as dcp
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            if method == "dcp.save":
                dcp.save(state, checkpoint_id=target, no_dist=True)
                stall = time.perf_counter() - t0
            else:
                future = dcp.async_save(state, checkpoint_id=target, no_dist=True)
                stall = time.perf_counter() - t0
                future.result()
            total = time.perf_counter() - t0
    return stall, total
