"""The lab-10 checkers pass right answers, catch planted bugs and refuse the library's own."""
import io
import math
import numbers
import os
import random
import re
import tarfile
import tempfile
import threading

import pytest
import torch

from utils import reliability, storage
from utils.checks import ExerciseFailed, LibraryAnswer
from utils.checks import ch10 as check

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ right answers, written here
def _real(name, x, positive=False):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {x!r}")
    return float(x)


def checkpoint_seconds(params, bandwidth, bytes_per_param=14.0):
    params = _real("params", params)
    bandwidth = _real("bandwidth", bandwidth, positive=True)
    bytes_per_param = _real("bytes_per_param", bytes_per_param, positive=True)
    return params * bytes_per_param / bandwidth


def write_shards(samples, folder, samples_per_shard):
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int):
        raise TypeError("samples_per_shard must be an int")
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    paths, batch, keys = [], [], set()

    def flush():
        path = os.path.join(folder, f"part-{len(paths):05d}.tar")
        fd, tmp = tempfile.mkstemp(dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                with tarfile.open(fileobj=f, mode="w") as tar:
                    for key, fields in batch:
                        for ext, data in fields.items():
                            info = tarfile.TarInfo(f"{key}.{ext}")
                            info.size = len(data)
                            tar.addfile(info, io.BytesIO(data))
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        paths.append(path)
        batch.clear()

    for s in samples:
        key = s.get("__key__")
        if not isinstance(key, str) or not key or "." in key or key in keys:
            raise ValueError(f"bad or duplicate key {key!r}")
        fields = {k: v for k, v in s.items() if k != "__key__"}
        if not fields:
            raise ValueError(f"sample {key!r} has no fields")
        for ext, v in fields.items():
            if ext != ext.lower():
                raise ValueError(f"field {ext!r} must be lower-case")
            if not isinstance(v, bytes):
                raise TypeError(f"field {ext!r} must be bytes")
        keys.add(key)
        batch.append((key, fields))
        if len(batch) == samples_per_shard:
            flush()
    if batch:
        flush()
    return paths


def read_shard(path):
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise
    with f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError:
            raise ValueError(f"{path} is not a tar file") from None
        sample = None
        try:
            for info in tar:
                if not info.isreg() or re.match(r"__[^/]*__($|/)", info.name):
                    continue
                m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", info.name)
                if not m:
                    continue
                key, ext = m.group(1), m.group(2).lower()
                data = tar.extractfile(info).read()
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": path}
                if ext in sample:
                    raise ValueError(f"{path}: {ext} twice in {key}")
                sample[ext] = data
        except tarfile.ReadError:
            raise ValueError(f"{path} is truncated") from None
        f.seek(tar.offset)
        end = f.read(1024)
        if len(end) < 1024 or any(end):
            raise ValueError(f"{path} is truncated: no end-of-archive marker")
        if sample is not None:
            yield sample


def shard_stream(shards, *, rank=0, world_size=1, worker=0, num_workers=1, seed=0, epoch=0,
                 shuffle=True, buffer_size=0, skip=0):
    if not isinstance(shards, (list, tuple)):
        raise TypeError("shards must be a list")
    if not shards:
        raise ValueError("no shards")
    for name, x in (("rank", rank), ("world_size", world_size), ("worker", worker),
                    ("num_workers", num_workers), ("buffer_size", buffer_size), ("skip", skip)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must be an int")
        if x < 0:
            raise ValueError(f"{name} must be >= 0")
    if world_size < 1 or num_workers < 1 or rank >= world_size or worker >= num_workers:
        raise ValueError("rank/worker out of range")

    def gen():
        order = list(shards)
        if shuffle:
            random.Random(f"{seed}-{epoch}").shuffle(order)
        samples = (s for p in order[rank::world_size][worker::num_workers] for s in read_shard(p))
        if buffer_size > 1:
            rng, buf = random.Random(f"b{seed}-{epoch}-{rank}-{worker}"), []
            def mixed(source):
                for s in source:
                    buf.append(s)
                    if len(buf) >= buffer_size:
                        yield buf.pop(rng.randrange(len(buf)))
                rng.shuffle(buf)
                yield from buf
            samples = mixed(samples)
        for i, s in enumerate(samples):
            if i >= skip:
                yield s
    return gen()


class ResumableStream(torch.utils.data.IterableDataset):
    def __init__(self, shards, *, num_workers=1, seed=0, epoch=0, buffer_size=0, state=None):
        self.args = dict(shards=list(shards), num_workers=num_workers, seed=seed, epoch=epoch,
                         buffer_size=buffer_size)
        self.consumed = [0] * num_workers
        if state is not None:
            for k, v in self.args.items():
                if state[k] != v:
                    raise ValueError(f"state {k} differs")
            self.consumed = list(state["consumed"])

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (0, 1) if info is None else (info.id, info.num_workers)
        if nw != self.args["num_workers"]:
            raise ValueError("num_workers differs from the DataLoader's")
        a = self.args
        for s in shard_stream(a["shards"], worker=w, num_workers=nw, seed=a["seed"], epoch=a["epoch"],
                              buffer_size=a["buffer_size"], skip=self.consumed[w]):
            yield dict(s, __worker__=w)

    def mark(self, sample):
        self.consumed[int(sample["__worker__"])] += 1

    def state_dict(self):
        return dict(self.args, consumed=list(self.consumed))


class Checkpointer:
    def __init__(self):
        self.thread, self.error = None, None

    def save(self, state, path):
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TypeError("state must be a dict of tensors")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise FileNotFoundError(path)
        self.wait()
        snap = {k: v.detach().clone() for k, v in state.items()}

        def run():
            try:
                reliability.save_checkpoint(path, snap)
            except Exception as e:
                self.error = e
        self.thread = threading.Thread(target=run)
        self.thread.start()

    def wait(self):
        if self.thread:
            self.thread.join()
            self.thread = None
        if self.error:
            e, self.error = self.error, None
            raise e


def restore(model, path):
    state = reliability.load_checkpoint(path)
    own = model.state_dict()
    for k in set(own) | set(state):
        if k not in own or k not in state or own[k].shape != state[k].shape:
            raise ValueError(f"tensor {k} differs from this model's")
    model.load_state_dict(state)


# ------------------------------------------------------------------ passing and refusing
def test_right_answers_pass(capsys):
    check.checkpoint_seconds(checkpoint_seconds)
    check.write_shards(write_shards)
    check.read_shard(read_shard)
    check.shard_stream(shard_stream)
    check.resumable_stream(ResumableStream)
    check.async_checkpoint(Checkpointer, restore)
    assert capsys.readouterr().out.count("passed") == 6


def test_library_passes_where_signatures_match(capsys, library_answers_allowed):
    check.read_shard(storage.read_shard)
    check.shard_stream(storage.shard_stream)
    check.async_checkpoint(storage.AsyncCheckpointer, storage.restore)
    check.write_shards(storage.write_shards)
    check.resumable_stream(storage.ShardStream)
    assert capsys.readouterr().out.count("passed") == 5


@pytest.mark.parametrize("name, args", [
    ("checkpoint_seconds", (storage.write_seconds,)),
    ("write_shards", (storage.write_shards,)),
    ("read_shard", (storage.read_shard,)),
    ("shard_stream", (storage.shard_stream,)),
    ("resumable_stream", (storage.ShardStream,)),
    ("async_checkpoint", (storage.AsyncCheckpointer, restore)),
    ("async_checkpoint", (Checkpointer, storage.restore)),
])
def test_library_reference_refused(name, args):
    with pytest.raises(LibraryAnswer):
        getattr(check, name)(*args)


def test_library_writer_and_stream_pass_with_prefix_and_workers(library_answers_allowed, capsys):
    check.write_shards(lambda s, f, n: storage.write_shards(s, f, n, prefix="data"))
    check.resumable_stream(lambda shards, **kw: storage.ShardStream(shards, **kw))
    assert capsys.readouterr().out.count("passed") == 2


def _fails(checker, needle, *answer):
    with pytest.raises(ExerciseFailed) as err:
        checker(*answer)
    assert needle in str(err.value), str(err.value)


# ------------------------------------------------------------------ planted bugs: exercise 1
def test_checkpoint_counts_gradients():
    _fails(check.checkpoint_seconds, "checkpoint_seconds(7e+09",
           lambda p, b, bytes_per_param=14.0: checkpoint_seconds(p, b, bytes_per_param + 2))


def test_checkpoint_bits_per_second():
    _fails(check.checkpoint_seconds, "checkpoint_seconds(7e+09",
           lambda p, b, bytes_per_param=14.0: checkpoint_seconds(p, b, bytes_per_param) * 8)


def test_checkpoint_accepts_negative_bandwidth():
    def bug(p, b, bytes_per_param=14.0):
        return checkpoint_seconds(p, abs(b) if isinstance(b, float) and b < 0 else b, bytes_per_param)
    _fails(check.checkpoint_seconds, "bandwidth=-1.0", bug)


def test_checkpoint_message_without_name():
    def bug(p, b, bytes_per_param=14.0):
        try:
            return checkpoint_seconds(p, b, bytes_per_param)
        except ValueError:
            raise ValueError("bad value") from None
    _fails(check.checkpoint_seconds, "names", bug)


# ------------------------------------------------------------------ planted bugs: exercise 2
def test_writer_one_shard_too_many():
    def bug(samples, folder, per):
        paths = write_shards(samples, folder, per)
        if len(samples) % per == 0 if isinstance(samples, list) else False:
            extra = os.path.join(folder, "part-99999.tar")
            tarfile.open(extra, "w").close()
            paths.append(extra)
        return paths
    _fails(check.write_shards, "number of shards", bug)


def test_writer_field_order_key_with_ext():
    def bug(samples, folder, per):              # key written as "key.ext" twice over: wrong key
        samples = [{"__key__": s["__key__"], **{f"x{e}": v for e, v in s.items() if e != "__key__"}}
                   if isinstance(s, dict) and "__key__" in s else s for s in samples]
        return write_shards(samples, folder, per)
    _fails(check.write_shards, "webdataset reads other samples", bug)


def test_writer_in_place_leaves_partial_shard():
    def bug(samples, folder, per):
        paths, tar, n = [], None, 0
        for s in samples:
            if tar is None:
                paths.append(os.path.join(folder, f"p{len(paths)}.tar"))
                tar = tarfile.open(paths[-1], "w")
                tar.fileobj.flush()
            for ext, v in s.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(v)
                    tar.addfile(info, io.BytesIO(v))
            n += 1
            if n % per == 0:
                tar.close()
                tar = None
        if tar is not None:
            tar.close()
        return paths
    _fails(check.write_shards, "interrupted", bug)


def test_writer_nondeterministic_mtime():
    import time

    def bug(samples, folder, per):
        samples = list(samples)
        paths = write_shards(samples, folder, per)
        for p in paths:                         # rewrite with the wall clock as mtime
            data = list(read_shard(p))
            with tarfile.open(p, "w") as tar:
                for s in data:
                    for ext, v in s.items():
                        if not ext.startswith("__"):
                            info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                            info.size, info.mtime = len(v), time.time() + random.random() * 1e6
                            tar.addfile(info, io.BytesIO(v))
        return paths
    _fails(check.write_shards, "identical shard bytes", bug)


def test_writer_accepts_dotted_key():
    def bug(samples, folder, per):
        if isinstance(samples, list):
            samples = [dict(s, __key__=s.get("__key__", "").replace(".", "_")) for s in samples]
        return write_shards(samples, folder, per)
    _fails(check.write_shards, "a key with a dot", bug)


# ------------------------------------------------------------------ planted bugs: exercise 3
def test_reader_keeps_case():
    def bug(path):
        for s in read_shard(path):
            yield s
    def upper_bug(path):                        # the extension's case kept
        with tarfile.open(path) as tar:
            out = {}
            for info in tar:
                if info.isreg() and "." in os.path.basename(info.name) and not info.name.startswith("__"):
                    key, ext = info.name.split(".", 1)
                    out.setdefault(key, {"__key__": key, "__url__": path})[ext] = tar.extractfile(info).read()
            yield from out.values()
    check.read_shard(bug)
    _fails(check.read_shard, "hand-made tar", upper_bug)


def test_reader_tolerates_missing_end_marker():
    def bug(path):
        try:
            with tarfile.open(path, "r:") as tar:
                members = [(i.name, tar.extractfile(i).read()) for i in tar if i.isreg()]
        except tarfile.ReadError:
            raise ValueError(f"{path} is not a tar") from None
        with tempfile.TemporaryDirectory() as d:
            fixed = os.path.join(d, "x.tar")
            with tarfile.open(fixed, "w") as tar:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            for s in list(read_shard(fixed)):
                yield dict(s, __url__=path)
    _fails(check.read_shard, "cut between members", bug)


def test_reader_error_without_path():
    def bug(path):
        try:
            yield from read_shard(path)
        except ValueError:
            raise ValueError("bad shard") from None
    _fails(check.read_shard, "names the file", bug)


def test_reader_drops_url():
    def bug(path):
        for s in read_shard(path):
            s.pop("__url__")
            yield s
    _fails(check.read_shard, "against webdataset", bug)


# ------------------------------------------------------------------ planted bugs: exercise 4
def test_stream_worker_before_rank():
    def bug(shards, *, rank=0, world_size=1, worker=0, num_workers=1, **kw):
        order = shards
        part = [p for i, p in enumerate(order) if i % num_workers == worker][rank::world_size]
        return (s for p in part for s in read_shard(p)) if not kw.get("shuffle", True) else \
            shard_stream(shards, rank=rank, world_size=world_size, worker=worker,
                         num_workers=num_workers, **kw)
    _fails(check.shard_stream, "against webdataset", bug)


def test_stream_shuffle_seeded_by_rank():
    def bug(shards, *, rank=0, world_size=1, worker=0, num_workers=1, seed=0, epoch=0, **kw):
        return shard_stream(shards, rank=rank, world_size=world_size, worker=worker,
                            num_workers=num_workers, seed=seed + rank, epoch=epoch, **kw)
    _fails(check.shard_stream, "order", bug)


def test_stream_buffer_that_does_not_mix():
    def bug(shards, *, buffer_size=0, **kw):
        return shard_stream(shards, buffer_size=0, **kw)
    _fails(check.shard_stream, "does not mix", bug)


def test_stream_epoch_ignored():
    def bug(shards, *, epoch=0, **kw):
        return shard_stream(shards, epoch=0, **kw)
    _fails(check.shard_stream, "order", bug)


def test_stream_skip_counts_shards():
    def bug(shards, *, skip=0, **kw):
        return shard_stream(shards, skip=0, **kw) if skip == 0 else \
            shard_stream(shards, skip=skip + 1, **kw)
    _fails(check.shard_stream, "after skipping", bug)


def test_stream_rank_unchecked():
    def bug(shards, *, rank=0, world_size=1, **kw):
        if isinstance(rank, int) and rank >= world_size:
            return iter([])
        return shard_stream(shards, rank=rank, world_size=world_size, **kw)
    _fails(check.shard_stream, "rank=2 with world_size=2", bug)


# ------------------------------------------------------------------ planted bugs: exercise 5
def test_resume_restarts_from_zero():
    class Bug(ResumableStream):
        def __init__(self, shards, state=None, **kw):
            super().__init__(shards, **kw)
    _fails(check.resumable_stream, "not yet seen", Bug)


def test_resume_counts_total_not_per_worker():
    class Bug(ResumableStream):
        def __init__(self, shards, state=None, **kw):
            super().__init__(shards, state=state, **kw)
            if state is not None:
                n = sum(state["consumed"])
                self.consumed = [n // len(self.consumed)] * len(self.consumed)
    _fails(check.resumable_stream, "with 2 DataLoader workers: the samples that follow", Bug)


def test_resume_accepts_any_state():
    class Bug(ResumableStream):
        def __init__(self, shards, state=None, **kw):
            super().__init__(shards, **kw)
            if state is not None:
                self.consumed = list(state["consumed"])
    _fails(check.resumable_stream, "another seed", Bug)


def test_resume_untagged():
    class Bug(ResumableStream):
        def __iter__(self):
            for s in super().__iter__():
                s["__worker__"] = 0
                yield s
        def mark(self, sample):
            self.consumed[0] += 1
    _fails(check.resumable_stream, "'__worker__' tags with 2", Bug)


# ------------------------------------------------------------------ planted bugs: exercise 6
def test_checkpointer_without_snapshot():
    class Bug(Checkpointer):
        def save(self, state, path):
            self.wait()
            import time
            def run():
                time.sleep(0.05)
                reliability.save_checkpoint(path, state)
            self.thread = threading.Thread(target=run)
            self.thread.start()
    _fails(check.async_checkpoint, "values at the time save() was called", Bug, restore)


def test_checkpointer_swallows_errors():
    class Bug(Checkpointer):
        def wait(self):
            if self.thread:
                self.thread.join()
                self.thread = None
            self.error = None
    _fails(check.async_checkpoint, "OSError from wait", Bug, restore)


def test_checkpointer_plain_torch_save():
    class Bug(Checkpointer):
        def save(self, state, path):
            torch.save({k: v.clone() for k, v in state.items()}, path)
    _fails(check.async_checkpoint, "reliability.load_checkpoint reads", Bug, restore)


def test_restore_with_strict_false():
    def bug(model, path):
        state = reliability.load_checkpoint(path)
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape},
                              strict=False)
    _fails(check.async_checkpoint, "a model of another width", Checkpointer, bug)


def test_restore_loads_before_checking():
    def bug(model, path):
        state = reliability.load_checkpoint(path)
        own = model.state_dict()
        for k, v in state.items():
            if k in own and own[k].shape == v.shape:
                own[k].copy_(v)
        restore(model, path)
    _fails(check.async_checkpoint, "unchanged", Checkpointer, bug)
