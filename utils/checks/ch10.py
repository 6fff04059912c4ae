"""Checkers for lab 10, storage IO.

Oracles: chapter 11's memory formula (:mod:`utils.memory`) and the Llama 3 storage registry
(:data:`utils.storage.STORAGE`); the ``webdataset`` library (1.0.2, pinned) reading the same
tar shards, including its own split by rank and DataLoader worker; a real
``torch.utils.data.DataLoader`` with worker processes for the resumable stream; chapter 15's
atomic checkpoint reader (:func:`utils.reliability.load_checkpoint`) for checkpoints.
Timings are measurement warnings, never failures.
"""
from __future__ import annotations

import io
import math
import numbers
import os
import random
import tarfile
import tempfile
import time
import warnings

import torch

from .. import memory, reliability, storage
from . import describe, exercise, expect_close, expect_equal, expect_raises, fail, measurement_warning

_WDS_ENV = ("RANK", "WORLD_SIZE", "WORKER", "NUM_WORKERS")


def _number(x, what):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        fail(f"{what} is not a number", "a float", describe(x), "return a plain number")
    return float(x)


def _samples(n, start=0, fields=("txt", "cls")):
    rng = random.Random(start)
    out = []
    for i in range(start, start + n):
        s = {"__key__": f"{i:06d}"}
        for f in fields:
            s[f] = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        out.append(s)
    return out


def _wds(paths, rank=0, world_size=1, worker=0, num_workers=1):
    """What webdataset.WebDataset yields for (rank, worker), without shard shuffling."""
    import webdataset as wds
    env = dict(RANK=str(rank), WORLD_SIZE=str(world_size), WORKER=str(worker),
               NUM_WORKERS=str(num_workers))
    saved = {k: os.environ.get(k) for k in _WDS_ENV}
    os.environ.update(env)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = wds.WebDataset(list(paths), shardshuffle=False, nodesplitter=wds.split_by_node,
                                empty_check=False)
            return [{k: v for k, v in s.items() if k != "__local_path__"} for s in ds]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ref_shards(folder, n=47, per=6, start=0):
    return storage.write_shards(_samples(n, start), folder, per)


def _keys(samples):
    return [s["__key__"] for s in samples]


def _list(fn, what):
    out = fn()
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__iter__"):
        fail(f"{what}: the result", "an iterator (or list) of sample dicts", describe(out),
             "yield one dict per sample")
    out = list(out)
    for s in out:
        if not isinstance(s, dict):
            fail(f"{what}: a sample", "a dict", describe(s), "each sample is a dict")
    return out


# --------------------------------------------------------------------------- exercise 1

@exercise
def checkpoint_seconds(fn):
    """``fn(params, bandwidth, bytes_per_param=14.0) -> s`` against chapter 11's formula."""
    llama = storage.LLAMA3_405B.param_count()
    tect = storage.STORAGE["Llama 3 Tectonic"]
    want_bpp = (memory.weights_bytes(1, 2) + memory.optimizer_bytes(1, "adamw", True))
    for params, bw in ((7e9, 1e9), (1, 1.0), (0, 5e9), (llama, tect.sustained_bandwidth),
                       (llama, tect.peak_bandwidth)):
        call = f"checkpoint_seconds({params:g}, {bw:g})"
        got = _number(fn(params, bw), call)
        expect_close(got, params * want_bpp / bw, rtol=1e-9, what=call,
                     hint="bf16 weights (2 B) + fp32 master weights, AdamW's m and v (4 B each); "
                          "gradients are not saved")
    for bpp in (2, 12, 16.5):
        call = f"checkpoint_seconds(1e9, 1e9, bytes_per_param={bpp})"
        expect_close(_number(fn(1e9, 1e9, bytes_per_param=bpp), call), bpp, rtol=1e-9, what=call,
                     hint="bytes_per_param replaces the 14")
    good = {"params": 1e9, "bandwidth": 1e9, "bytes_per_param": 14.0}
    for arg in good:
        for bad, kind in ((-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                          ("8", TypeError), (True, TypeError)):
            kw = dict(good, **{arg: bad})
            err = expect_raises(lambda: fn(kw["params"], kw["bandwidth"],
                                           bytes_per_param=kw["bytes_per_param"]), kind,
                                f"checkpoint_seconds with {arg}={bad!r}",
                                f"a {kind.__name__} naming {arg}", f"check {arg} before using it")
            if arg not in str(err):
                fail(f"checkpoint_seconds with {arg}={bad!r}: the message", f"names {arg!r}",
                     repr(str(err)), "say which argument was wrong")
    for arg in ("bandwidth", "bytes_per_param"):
        kw = dict(good, **{arg: 0.0})
        expect_raises(lambda: fn(kw["params"], kw["bandwidth"], bytes_per_param=kw["bytes_per_param"]),
                      ValueError, f"checkpoint_seconds with {arg}=0", f"a ValueError naming {arg}",
                      f"{arg} must be > 0")
    t_s, t_p = fn(llama, tect.sustained_bandwidth), fn(llama, tect.peak_bandwidth)
    return (f"Llama 3 405B state {llama * want_bpp / 1e12:.2f} TB: {t_s:.2f} s at 2 TB/s "
            f"sustained, {t_p:.2f} s at 7 TB/s peak")


# --------------------------------------------------------------------------- exercise 2

def _leftovers(folder, expected):
    extra = sorted(set(os.listdir(folder)) - {os.path.basename(p) for p in expected})
    return extra


@exercise
def write_shards(fn):
    """``fn(samples, folder, samples_per_shard) -> [paths]`` read back by webdataset."""
    with tempfile.TemporaryDirectory() as d:
        for n, per in ((23, 5), (10, 10), (7, 100), (1, 1)):
            folder = os.path.join(d, f"{n}-{per}")
            os.mkdir(folder)
            samples = _samples(n, start=n)
            paths = fn([dict(s) for s in samples], folder, per)
            if not isinstance(paths, (list, tuple)) or not all(isinstance(p, (str, os.PathLike)) for p in paths):
                fail(f"write_shards({n} samples, per={per}): the result", "a list of paths",
                     describe(paths), "return the shard paths in order")
            paths = [os.fspath(p) for p in paths]
            expect_equal(len(paths), math.ceil(n / per),
                         what=f"write_shards({n} samples, samples_per_shard={per}): number of shards",
                         hint="samples_per_shard in each shard, the last may hold fewer")
            got = _wds(paths)
            want = [dict(s, __url__=p) for p, chunk in
                    zip(paths, (samples[i:i + per] for i in range(0, n, per))) for s in chunk]
            if got != want:
                bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                fail(f"write_shards({n} samples, per={per}): webdataset reads other samples back",
                     f"{len(want)} samples; sample {bad}: "
                     f"{describe(want[bad]) if bad < len(want) else 'none'}",
                     f"{len(got)} samples; sample {bad}: {describe(got[bad]) if bad < len(got) else 'none'}",
                     "one member '{key}.{ext}' per field, a sample's members consecutive, in order")
            extra = _leftovers(folder, paths)
            if extra:
                fail(f"write_shards({n} samples): files left in the folder", "only the shards",
                     f"also {extra}", "remove or rename every temporary file")
        # the same samples give the same bytes
        a, b = os.path.join(d, "a"), os.path.join(d, "b")
        os.mkdir(a), os.mkdir(b)
        pa, pb = fn(_samples(9), a, 4), fn(_samples(9), b, 4)
        for x, y in zip(pa, pb):
            if open(x, "rb").read() != open(y, "rb").read():
                fail("write_shards twice with the same samples", "identical shard bytes",
                     f"{os.path.basename(x)} differs", "fix each member's mtime, mode, uid/gid")
        # a failure in the middle leaves only complete shards
        c = os.path.join(d, "c")
        os.mkdir(c)

        def broken():
            for i, s in enumerate(_samples(30)):
                if i == 13:
                    raise RuntimeError("the sample source failed")
                yield s
        expect_raises(lambda: fn(broken(), c, 5), RuntimeError,
                      "write_shards when the samples' iterator raises at sample 13",
                      "the RuntimeError, passed on", "do not swallow errors")
        for name in sorted(os.listdir(c)):
            try:
                storage_samples = list(storage.read_shard(os.path.join(c, name)))
            except ValueError as err:
                fail("write_shards interrupted at sample 13: a file left behind is not a complete shard",
                     "only complete shards (here at most the first two, 10 samples)",
                     f"{name}: {err}", "write each shard under a temporary name, rename it when "
                     "complete, remove it on error")
            if len(storage_samples) != 5:
                fail("write_shards interrupted at sample 13: a partial shard was left",
                     "shards of 5 samples only", f"{name} with {len(storage_samples)}",
                     "write a shard only once it is complete")
        # bad input
        bad_cases = [
            ([{"__key__": "a.b", "txt": b"x"}], 1, ValueError, "a key with a dot"),
            ([{"__key__": "", "txt": b"x"}], 1, ValueError, "an empty key"),
            ([{"txt": b"x"}], 1, ValueError, "a sample without __key__"),
            ([{"__key__": "k"}], 1, ValueError, "a sample without fields"),
            ([{"__key__": "k", "txt": "text"}], 1, TypeError, "a str field (not bytes)"),
            ([{"__key__": "k", "TXT": b"x"}], 1, ValueError, "an upper-case field name"),
            ([{"__key__": "k", "txt": b"x"}, {"__key__": "k", "txt": b"y"}], 1, ValueError,
             "a duplicate key"),
            (_samples(3), 0, ValueError, "samples_per_shard=0"),
            (_samples(3), -2, ValueError, "samples_per_shard=-2"),
            (_samples(3), 2.0, TypeError, "samples_per_shard=2.0"),
        ]
        for k, (samples, per, kind, what) in enumerate(bad_cases):
            folder = os.path.join(d, f"bad{k}")
            os.mkdir(folder)
            expect_raises(lambda: fn(samples, folder, per), kind, f"write_shards with {what}",
                          f"a {kind.__name__}", "check every sample before writing it")
    return "shards read back by webdataset 1.0.2 sample for sample; bytes reproducible; " \
           "an interrupted write leaves only complete shards"


# --------------------------------------------------------------------------- exercise 3

def _tar(path, members, end=True):
    """A tar written by hand: members = [(name, bytes or None for a directory)]."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


@exercise
def read_shard(fn):
    """``fn(path) -> iterator of samples`` equal to webdataset's, errors naming the file."""
    with tempfile.TemporaryDirectory() as d:
        paths = _ref_shards(d, 31, 7)
        for p in paths:
            got = _list(lambda: fn(p), f"read_shard({os.path.basename(p)})")
            expect_equal(got, _wds([p]), what=f"read_shard({os.path.basename(p)}) against webdataset",
                         hint="group consecutive members by key; add __key__ and __url__ (the path as given)")
        odd = _tar(os.path.join(d, "odd.tar"), [
            ("dir", None), ("dir/a.TXT", b"1"), ("dir/a.seg.png", b"22"), ("__meta__", b"m"),
            ("noext", b"skipped"), ("b.txt", b"3"), ("c.json", b"{}"), ("c.txt", b"4"),
            ("b.cls", b"5")])
        got = _list(lambda: fn(odd), "read_shard(odd.tar)")
        expect_equal(got, _wds([odd]), what="read_shard of a hand-made tar (directories, upper-case "
                     "and multi-dot extensions, a metadata member, a name without extension, a "
                     "key that comes back later)",
                     hint="key = name up to the first dot of its last path component; ext = the rest, "
                          "lower-cased; skip non-files, names without a dot and __...__ members; a "
                          "new sample starts whenever the key changes")
        data = open(paths[0], "rb").read()
        cases = [("not_tar.tar", b"this is not a tar file " * 40, "a file that is not a tar"),
                 ("cut_member.tar", data[:512 + 5], "a shard cut inside a member"),
                 ("cut_boundary.tar", data[:2048], "a shard cut between members (no end marker)"),
                 ("empty.tar", b"", "an empty file")]
        for name, blob, what in cases:
            p = os.path.join(d, name)
            with open(p, "wb") as f:
                f.write(blob)
            err = expect_raises(lambda: list(fn(p)), ValueError, f"read_shard of {what}",
                                "a ValueError naming the file",
                                "catch tarfile.ReadError; after the last member, check that the "
                                "end-of-archive marker (two 512-byte zero blocks) is there")
            if name not in str(err):
                fail(f"read_shard of {what}: the message", f"names the file ({name})",
                     repr(str(err)), "put the path in the message")
        dup = _tar(os.path.join(d, "dup.tar"), [("k.txt", b"1"), ("k.TXT", b"2")])
        expect_raises(lambda: list(fn(dup)), ValueError, "read_shard of a sample with field 'txt' twice",
                      "a ValueError", "a field may appear once in a sample")
        expect_raises(lambda: list(fn(os.path.join(d, "missing.tar"))), (FileNotFoundError, ValueError),
                      "read_shard of a missing file", "FileNotFoundError")
    return "samples equal to webdataset's on written and hand-made shards; truncated and foreign files refused"


# --------------------------------------------------------------------------- exercise 4

def _stream(fn, paths, **kw):
    what = "shard_stream(" + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + ")"
    return _list(lambda: fn(paths, **kw), what), what


@exercise
def shard_stream(fn):
    """``fn(shards, *, rank, world_size, worker, num_workers, seed, epoch, shuffle, buffer_size, skip)``."""
    with tempfile.TemporaryDirectory() as d:
        paths = _ref_shards(d, 61, 5)                       # 13 shards
        everything = sorted(_keys(s for p in paths for s in storage.read_shard(p)))
        # without shuffling: exactly webdataset's split_by_node + split_by_worker
        for ws, nw in ((1, 1), (2, 1), (1, 3), (2, 3), (4, 4)):
            for r in range(ws):
                for w in range(nw):
                    kw = dict(rank=r, world_size=ws, worker=w, num_workers=nw, shuffle=False)
                    got, what = _stream(fn, paths, **kw)
                    expect_equal(got, _wds(paths, r, ws, w, nw), what=f"{what} against webdataset",
                                 hint="shards[rank::world_size], then [worker::num_workers]")
        # shuffled shards and buffer: a partition, deterministic, new each epoch
        orders = {}
        for seed, epoch, ws, nw, buf in ((0, 0, 2, 2, 0), (0, 1, 2, 2, 0), (5, 0, 3, 2, 7),
                                         (5, 2, 1, 1, 16), (9, 0, 2, 3, 4)):
            seen = []
            for r in range(ws):
                for w in range(nw):
                    kw = dict(rank=r, world_size=ws, worker=w, num_workers=nw, seed=seed,
                              epoch=epoch, shuffle=True, buffer_size=buf)
                    got, what = _stream(fn, paths, **kw)
                    again, _ = _stream(fn, paths, **kw)
                    if _keys(got) != _keys(again):
                        fail(f"{what} twice", "the same order (seeded)", "two different orders",
                             "seed every random choice from seed, epoch, rank and worker")
                    order = list(paths)
                    random.Random(f"{seed}-{epoch}").shuffle(order)
                    plain = [s for p in order[r::ws][w::nw] for s in storage.read_shard(p)]
                    if buf <= 1:
                        expect_equal(_keys(got), _keys(plain), what=f"{what}: the order",
                                     hint='shards permuted by random.Random(f"{seed}-{epoch}").shuffle, '
                                          'the same on every rank, then split')
                    else:
                        expect_equal(sorted(_keys(got)), sorted(_keys(plain)),
                                     what=f"{what}: the samples of this worker's shards",
                                     hint="the buffer reorders, it neither adds nor drops")
                        pos = {k: i for i, k in enumerate(_keys(got))}
                        for i, k in enumerate(_keys(plain)):
                            if pos[k] < i - buf:
                                fail(f"{what}: sample {k} comes out too early",
                                     f"no earlier than place {i - buf} (its place {i} minus the buffer {buf})",
                                     f"place {pos[k]}", "a sample can only leave the buffer after it entered")
                        if len(plain) > 2 * buf and _keys(got) == _keys(plain):
                            fail(f"{what}: the buffer does not mix", "an order other than the shards' order",
                                 "the unmixed order", "emit a random element of the buffer each time")
                    for s, t in zip(sorted(got, key=lambda s: s["__key__"]),
                                    sorted(plain, key=lambda s: s["__key__"])):
                        if s != t:
                            fail(f"{what}: a sample's contents", describe(t), describe(s),
                                 "yield the samples as read_shard gives them")
                    seen += _keys(got)
            if sorted(seen) != everything:
                dup = sorted({k for k in seen if seen.count(k) > 1})[:5]
                lost = sorted(set(everything) - set(seen))[:5]
                fail(f"seed {seed}, epoch {epoch}, {ws} rank(s) x {nw} worker(s): every sample once",
                     f"{len(everything)} samples, each once", f"{len(seen)} samples; duplicated "
                     f"{dup}, lost {lost}", "every rank must shuffle the shard list the same way, "
                     "then take its own part")
            orders[(seed, epoch)] = seen
        if orders[(0, 0)] == orders[(0, 1)]:
            fail("epochs 0 and 1 with seed 0", "different orders", "the same order",
                 "the shard permutation depends on the epoch")
        # skip
        for skip in (0, 3, 11, 500):
            kw = dict(rank=1, world_size=2, worker=0, num_workers=2, seed=4, epoch=1, buffer_size=6)
            full, _ = _stream(fn, paths, **kw)
            part, what = _stream(fn, paths, skip=skip, **kw)
            expect_equal(_keys(part), _keys(full)[skip:], what=f"{what}: the samples after skipping",
                         hint="the same stream, without its first `skip` samples")
        bad = [(dict(rank=2, world_size=2), ValueError, "rank=2 with world_size=2"),
               (dict(worker=1, num_workers=1), ValueError, "worker=1 with num_workers=1"),
               (dict(world_size=0), ValueError, "world_size=0"),
               (dict(buffer_size=-1), ValueError, "buffer_size=-1"),
               (dict(skip=-1), ValueError, "skip=-1"),
               (dict(rank=0.0), TypeError, "rank=0.0")]
        for kw, kind, what in bad:
            expect_raises(lambda: list(fn(paths, **kw)), kind, f"shard_stream with {what}",
                          f"a {kind.__name__}", "check the arguments before reading")
        expect_raises(lambda: list(fn([])), ValueError, "shard_stream([])", "a ValueError",
                      "no shards is an error")
        expect_raises(lambda: list(fn(paths[0])), TypeError, "shard_stream(one path as a str)",
                      "a TypeError", "shards is a list of paths")
    return "webdataset's split exactly; shuffled epochs partition the data over ranks and workers; skip resumes"


# --------------------------------------------------------------------------- exercise 5

def _loader(ds, workers):
    # Workers are forked where the platform can: a class defined in a notebook cannot be
    # pickled into a spawned worker (macOS and Windows spawn by default).
    import multiprocessing as mp
    ctx = "fork" if workers and "fork" in mp.get_all_start_methods() else None
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                       multiprocessing_context=ctx)


@exercise
def resumable_stream(cls):
    """``cls(shards, *, num_workers, seed, epoch, buffer_size, state=None)`` under a DataLoader."""
    with tempfile.TemporaryDirectory() as d:
        paths = _ref_shards(d, 40, 4)
        everything = sorted(_keys(s for p in paths for s in storage.read_shard(p)))
        kw = dict(seed=2, epoch=1, buffer_size=5)
        for workers in (0, 2):
            nw = max(1, workers)
            full = list(_loader(cls(paths, num_workers=nw, **kw), workers))
            keys = _keys(full)
            expect_equal(sorted(keys), everything, what=f"a full epoch with {workers} DataLoader workers",
                         hint="each worker takes its own part of the shards")
            tags = {s.get("__worker__") for s in full}
            tags = {int(t) if isinstance(t, torch.Tensor) else t for t in tags}
            if tags != set(range(nw)):
                fail(f"the '__worker__' tags with {workers} DataLoader workers", f"{set(range(nw))}",
                     f"{tags}", "tag every sample with the index of the worker that read it")
            for cut in ((1, 17) if workers == 0 else (0, 17, len(full))):
                ds = cls(paths, num_workers=nw, **kw)
                it = iter(_loader(ds, workers))
                first = []
                for _ in range(cut):
                    s = next(it)
                    ds.mark(s)
                    first.append(s)
                for _ in it:              # the job stops here: let the workers finish (a
                    pass                  # half-read DataLoader waits 5 s per worker to exit)
                state = ds.state_dict()
                rest = list(_loader(cls(paths, num_workers=nw, state=state, **kw), workers))
                what = f"resume after {cut} of {len(full)} samples with {workers} DataLoader workers"
                both = sorted(_keys(first) + _keys(rest))
                if both != everything:
                    seen = set(_keys(first))
                    fail(f"{what}: the samples that follow", f"the {len(full) - cut} samples not yet seen",
                         f"{len(rest)} samples, {len([k for k in _keys(rest) if k in seen])} of them "
                         f"seen before", "each worker skips the samples it had delivered")
                for w in range(nw):
                    a = [s["__key__"] for s in full if int(s["__worker__"]) == w]
                    b = [s["__key__"] for s in first + rest if int(s["__worker__"]) == w]
                    expect_equal(b, a, what=f"{what}: worker {w}'s order",
                                 hint="a resumed worker continues its own sequence")
        # refused states
        ds = cls(paths, num_workers=1, **kw)
        for s in list(_loader(ds, 0))[:3]:
            ds.mark(s)
        state = ds.state_dict()
        for change, what in ((dict(kw, seed=3), "another seed"), (dict(kw, epoch=2), "another epoch")):
            expect_raises(lambda: cls(paths, num_workers=1, state=state, **change), ValueError,
                          f"resuming with a state from {what}", "a ValueError naming the field",
                          "the state must belong to this stream")
        expect_raises(lambda: cls(paths[:-1], num_workers=1, state=state, **kw), ValueError,
                      "resuming with a state of other shards", "a ValueError", "compare the shard list")
        expect_raises(lambda: list(cls(paths, num_workers=2, **kw)), ValueError,
                      "num_workers=2, iterated without a DataLoader (one reader)", "a ValueError",
                      "compare with torch.utils.data.get_worker_info()")
    return "under DataLoaders with 0 and 2 workers, a resumed epoch yields exactly the samples not yet seen"


# --------------------------------------------------------------------------- exercise 6

class _Net(torch.nn.Module):
    def __init__(self, width=64, depth=2):
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])


def _state(n_bytes, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_bytes // 4 // 4
    return {f"t{i}": torch.randn(n, generator=g) for i in range(4)}


@exercise
def async_checkpoint(checkpointer_cls, restore_fn):
    """``checkpointer_cls().save(state, path)`` / ``.wait()``; ``restore_fn(model, path)``."""
    # One compute thread while timing: on a loaded machine a 2-thread tensor copy can take
    # 100x longer than a 1-thread one (threads waiting for each other at every barrier).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _async_checkpoint(checkpointer_cls, restore_fn)
    finally:
        torch.set_num_threads(threads)


def _async_checkpoint(checkpointer_cls, restore_fn):
    size = 4 << 20
    with tempfile.TemporaryDirectory() as d:
        state = _state(size)
        want = {k: v.clone() for k, v in state.items()}
        ck = checkpointer_cls()
        path = os.path.join(d, "a.ckpt")
        t0 = time.perf_counter()
        ck.save(state, path)
        stall = time.perf_counter() - t0
        for v in state.values():                  # the training step goes on at once
            v.add_(1.0)
        ck.wait()
        total = time.perf_counter() - t0
        try:
            got = reliability.load_checkpoint(path)
        except (ValueError, OSError) as err:
            fail("save then wait: the checkpoint", "a file reliability.load_checkpoint reads",
                 f"{type(err).__name__}: {err}", "write with utils.reliability.save_checkpoint")
        for k in want:
            if k not in got or not torch.equal(got[k], want[k]):
                fail(f"save, then the state changed in place, then wait: tensor {k!r}",
                     "the values at the time save() was called",
                     "the changed values" if k in got and torch.equal(got[k], state[k]) else describe(got.get(k)),
                     "copy (snapshot) every tensor before save() returns; write the copy")
        # back to back
        s1, s2 = _state(1 << 18, 1), _state(1 << 18, 2)
        ck.save(s1, os.path.join(d, "b.ckpt"))
        ck.save(s2, os.path.join(d, "c.ckpt"))
        ck.wait()
        for name, s in (("b.ckpt", s1), ("c.ckpt", s2)):
            g = reliability.load_checkpoint(os.path.join(d, name))
            if not all(torch.equal(g[k], s[k]) for k in s):
                fail(f"two saves back to back: {name}", "both checkpoints complete and correct",
                     "wrong contents", "a new save waits for the write in flight")
        # errors: in the background (surfaced by wait), up front, and no debris
        folder = os.path.join(d, "sub")
        os.mkdir(folder)
        target = os.path.join(folder, "is_a_dir")
        os.mkdir(target)

        def fails_in_background():
            ck.save(_state(1 << 16), target)
            ck.wait()
        expect_raises(fails_in_background, OSError,
                      "save() over a path that is a directory, then wait()", "an OSError from wait()",
                      "catch the writer thread's exception and raise it again in wait()")
        if sorted(os.listdir(folder)) != ["is_a_dir"]:
            fail("after a failed write: files left in the folder", "none", f"{sorted(os.listdir(folder))}",
                 "a failed write removes its temporary file (save_checkpoint does)")
        ck.wait()                                  # the error was handed over once
        expect_raises(lambda: ck.save(_state(1 << 12), os.path.join(d, "nowhere", "x.ckpt")), OSError,
                      "save() into a folder that does not exist", "a FileNotFoundError at once",
                      "check the folder before starting the thread")
        expect_raises(lambda: ck.save([torch.zeros(2)], path), TypeError, "save() of a list",
                      "a TypeError", "state is a dict name -> tensor")
        expect_raises(lambda: ck.save({"w": [1.0]}, path), TypeError, "save() of a dict holding a list",
                      "a TypeError", "every value must be a tensor")
        ck.wait()
        # restore
        torch.manual_seed(0)
        net, other, deeper = _Net(), _Net(width=32), _Net(depth=3)
        p = os.path.join(d, "net.ckpt")
        ck.save(net.state_dict(), p)
        ck.wait()
        fresh = _Net()
        restore_fn(fresh, p)
        for (k, a), b in zip(net.state_dict().items(), fresh.state_dict().values()):
            if not torch.equal(a, b):
                fail(f"restore: tensor {k!r}", "the saved values", "other values",
                     "load_state_dict after the checks")
        for model, what, names in ((other, "a model of another width", tuple(net.state_dict())),
                                   (deeper, "a model with a third layer", ("layers.2.weight", "layers.2.bias"))):
            before = {k: v.clone() for k, v in model.state_dict().items()}
            err = expect_raises(lambda: restore_fn(model, p), ValueError,
                                f"restore of the checkpoint into {what}",
                                "a ValueError naming the tensor that differs",
                                "compare names and shapes with model.state_dict() first")
            if not any(n in str(err) for n in names):
                fail(f"restore into {what}: the message", f"names a tensor that differs ({' or '.join(names)})",
                     repr(str(err)), "say which tensor is missing, extra or of another shape")
            if not all(torch.equal(before[k], v) for k, v in model.state_dict().items()):
                fail(f"restore into {what}", "the model unchanged after the refusal",
                     "changed weights", "check everything before loading anything")
        cut = os.path.join(d, "cut.ckpt")
        with open(p, "rb") as f, open(cut, "wb") as g:
            g.write(f.read()[:-100])
        expect_raises(lambda: restore_fn(_Net(), cut), ValueError, "restore of a truncated checkpoint",
                      "a ValueError (CheckpointError)", "read it with reliability.load_checkpoint")
    # the stall, measured against a synchronous save of the same state
    # steady state: the second and third saves of one checkpointer, against torch.save + fsync
    with tempfile.TemporaryDirectory() as d:
        sync = min(storage.checkpoint_stall("torch.save", _state(size), d)[0] for _ in range(2))
        again, fresh = checkpointer_cls(), _state(size)
        steady = math.inf
        for i in range(3):
            t0 = time.perf_counter()
            again.save(fresh, os.path.join(d, f"again{i}.ckpt"))
            if i:
                steady = min(steady, time.perf_counter() - t0)
            again.wait()
    if steady > 0.8 * sync:
        measurement_warning(f"stall of a later save() on {size >> 20} MiB",
                            f"well under a synchronous torch.save + fsync ({sync * 1e3:.1f} ms here)",
                            f"{steady * 1e3:.1f} ms (the first save: {stall * 1e3:.1f} ms)",
                            "fresh copies each time (a page fault per 4 KiB page: keep the staging "
                            "buffers between saves), the writer thread holding the GIL, or a busy "
                            "machine")
    stall = steady
    return (f"{size >> 20} MiB: loop blocked {stall * 1e3:.1f} ms, durable after {total * 1e3:.1f} ms; "
            f"snapshot kept; errors surfaced; another model's checkpoint refused")
