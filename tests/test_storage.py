"""utils.storage: shards held to webdataset, the stream's partition and resume, the page cache,
checkpoints, the registry -- values and bad input."""
import math
import os
import random
import tarfile
import warnings

import pytest
import torch

from utils import reliability, storage

pytestmark = pytest.mark.usefixtures("one_thread")


def samples(n, start=0):
    rng = random.Random(start)
    return [{"__key__": f"k{i:05d}", "txt": f"text {i}".encode(),
             "bin": bytes(rng.randrange(256) for _ in range(rng.randrange(50)))}
            for i in range(start, start + n)]


@pytest.fixture
def shards(tmp_path):
    return storage.write_shards(samples(53), tmp_path, 6)


def wds_read(paths, rank=0, world_size=1, worker=0, num_workers=1, monkeypatch=None):
    import webdataset as wds
    for k, v in dict(RANK=rank, WORLD_SIZE=world_size, WORKER=worker, NUM_WORKERS=num_workers).items():
        monkeypatch.setenv(k, str(v))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = wds.WebDataset(paths, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
        return [{k: v for k, v in s.items() if k != "__local_path__"} for s in ds]


# ------------------------------------------------------------------ registry and sizes
def test_registry_holds_the_papers_figures():
    t = storage.STORAGE["Llama 3 Tectonic"]
    assert (t.capacity, t.servers, t.sustained_bandwidth, t.peak_bandwidth) == (240e15, 7500, 2e12, 7e12)
    assert t.checkpoint_per_gpu == (1e6, 4e9)
    assert "Section 3.3.1" in t.source and "2407.21783" in t.source


def test_llama3_405b_has_405b_parameters():
    n = storage.LLAMA3_405B.param_count()
    assert 404e9 < n < 407e9                      # "405B"
    # 126 layers x (attention + SwiGLU MLP + 2 norms) + embeddings and head, by hand
    d, f, kv, L, V = 16384, 53248, 8 * 128, 126, 128256
    layer = d * d * 2 + 2 * d * kv + 3 * d * f + 2 * d
    assert n == L * layer + 2 * V * d + d


def test_checkpoint_bytes_is_14_bytes_a_parameter():
    assert storage.checkpoint_bytes(1000) == 14000
    assert storage.checkpoint_bytes(1000, weight_bytes=4) == 16000
    assert storage.checkpoint_bytes(1000, master_weights=False) == 10000
    big = storage.checkpoint_bytes(storage.LLAMA3_405B)
    assert big == pytest.approx(14 * storage.LLAMA3_405B.param_count())
    per_gpu = big / storage.STORAGE["Llama 3 Tectonic"].gpus
    lo, hi = storage.STORAGE["Llama 3 Tectonic"].checkpoint_per_gpu
    assert lo < per_gpu < hi                     # the paper's 1 MB - 4 GB per GPU


def test_write_seconds_and_its_bad_input():
    assert storage.write_seconds(7e12, 2e12) == 3.5
    assert storage.write_seconds(0, 1.0) == 0
    for nbytes, bw, kind, word in ((-1, 1e9, ValueError, "nbytes"), (1e9, 0, ValueError, "bandwidth"),
                                   (1e9, -5, ValueError, "bandwidth"), (math.nan, 1, ValueError, "nbytes"),
                                   ("1", 1, TypeError, "nbytes"), (1, math.inf, ValueError, "bandwidth")):
        with pytest.raises(kind, match=word):
            storage.write_seconds(nbytes, bw)


def test_nvme_link_ceiling():
    assert storage.nvme_link_ceiling(4) == pytest.approx(4 * 16e9 * 128 / 130 / 8)
    assert storage.nvme_link_ceiling(5) == pytest.approx(2 * storage.nvme_link_ceiling(4))
    with pytest.raises(ValueError, match="gen"):
        storage.nvme_link_ceiling(6)
    with pytest.raises(TypeError, match="gen"):
        storage.nvme_link_ceiling(4.0)


# ------------------------------------------------------------------ shards
def test_shards_read_back_by_webdataset(shards, monkeypatch):
    assert [os.path.basename(p) for p in shards] == [f"shard-{i:06d}.tar" for i in range(9)]
    mine = [s for p in shards for s in storage.read_shard(p)]
    assert mine == wds_read(shards, monkeypatch=monkeypatch)
    assert [s["__key__"] for s in mine] == [f"k{i:05d}" for i in range(53)]
    assert mine[7]["txt"] == b"text 7"


def test_shards_are_reproducible_and_leave_no_temporaries(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    pa, pb = storage.write_shards(samples(9), a, 4), storage.write_shards(samples(9), b, 4)
    assert [open(x, "rb").read() for x in pa] == [open(y, "rb").read() for y in pb]
    assert sorted(os.listdir(a)) == sorted(os.path.basename(p) for p in pa)


def test_interrupted_write_leaves_complete_shards_only(tmp_path):
    def source():
        for i, s in enumerate(samples(20)):
            if i == 7:
                raise RuntimeError("source failed")
            yield s
    with pytest.raises(RuntimeError):
        storage.write_shards(source(), tmp_path, 3)
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar", "shard-000001.tar"]
    assert len(list(storage.read_shard(tmp_path / "shard-000001.tar"))) == 3


@pytest.mark.parametrize("bad, kind, word", [
    ([{"__key__": "a.b", "x": b""}], ValueError, "__key__"),
    ([{"__key__": "", "x": b""}], ValueError, "__key__"),
    ([{"x": b"1"}], ValueError, "__key__"),
    ([{"__key__": "a"}], ValueError, "no fields"),
    ([{"__key__": "a", "x": "str"}], TypeError, "bytes"),
    ([{"__key__": "a", "X": b""}], ValueError, "lower-case"),
    ([{"__key__": "a", "x": b""}, {"__key__": "a", "x": b""}], ValueError, "duplicate"),
    ([["not", "a", "dict"]], TypeError, "dict"),
    ("a string", TypeError, "samples"),
])
def test_write_shards_refuses_bad_samples(tmp_path, bad, kind, word):
    with pytest.raises(kind, match=word):
        storage.write_shards(bad, tmp_path, 2)
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path))


def test_write_shards_bad_arguments(tmp_path):
    for per, kind in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(kind, match="samples_per_shard"):
            storage.write_shards(samples(2), tmp_path, per)
    with pytest.raises(FileNotFoundError, match="folder"):
        storage.write_shards(samples(2), tmp_path / "missing", 1)
    with pytest.raises(ValueError, match="prefix"):
        storage.write_shards(samples(2), tmp_path, 1, prefix="a/b")


def test_read_shard_refuses_foreign_and_truncated_files(shards, tmp_path):
    data = open(shards[0], "rb").read()
    for name, blob, needle in (("junk.tar", b"no tar here" * 99, "not a tar"),
                               ("empty.tar", b"", "not a tar"),
                               ("inside.tar", data[:600], "truncated"),
                               ("boundary.tar", data[:1024], "end-of-archive")):
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(ValueError, match=needle) as err:
            list(storage.read_shard(p))
        assert name in str(err.value)
    with pytest.raises(FileNotFoundError):
        list(storage.read_shard(tmp_path / "nope.tar"))
    with pytest.raises(TypeError, match="path"):
        list(storage.read_shard(3))


def test_read_shard_follows_webdataset_naming(tmp_path, monkeypatch):
    import io
    p = tmp_path / "odd.tar"
    with tarfile.open(p, "w") as tar:
        for name, data in (("d/a.TXT", b"1"), ("d/a.seg.png", b"2"), ("__meta__", b"m"),
                           ("plain", b"x"), ("b.txt", b"3"), ("a.txt", b"4")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = list(storage.read_shard(str(p)))
    assert got == wds_read([str(p)], monkeypatch=monkeypatch)
    assert got[0] == {"__key__": "d/a", "__url__": str(p), "txt": b"1", "seg.png": b"2"}


# ------------------------------------------------------------------ the stream
@pytest.mark.parametrize("ws, nw", [(1, 1), (2, 1), (2, 2), (3, 4)])
def test_stream_without_shuffle_is_webdatasets_split(shards, monkeypatch, ws, nw):
    for r in range(ws):
        for w in range(nw):
            mine = list(storage.shard_stream(shards, rank=r, world_size=ws, worker=w, num_workers=nw,
                                             shuffle=False))
            assert mine == wds_read(shards, r, ws, w, nw, monkeypatch=monkeypatch)


@pytest.mark.parametrize("seed, epoch, ws, nw, buf", [(0, 0, 2, 2, 0), (1, 3, 3, 2, 8), (2, 1, 1, 1, 100)])
def test_shuffled_epoch_is_a_partition(shards, seed, epoch, ws, nw, buf):
    keys = []
    for r in range(ws):
        for w in range(nw):
            kw = dict(rank=r, world_size=ws, worker=w, num_workers=nw, seed=seed, epoch=epoch,
                      buffer_size=buf)
            got = [s["__key__"] for s in storage.shard_stream(shards, **kw)]
            assert got == [s["__key__"] for s in storage.shard_stream(shards, **kw)]
            keys += got
    assert sorted(keys) == [f"k{i:05d}" for i in range(53)]


def test_buffer_mixes_within_its_reach(shards):
    plain = [s["__key__"] for s in storage.shard_stream(shards, seed=4)]
    for buf in (2, 5, 20):
        mixed = [s["__key__"] for s in storage.shard_stream(shards, seed=4, buffer_size=buf)]
        assert mixed != plain and sorted(mixed) == sorted(plain)
        where = {k: i for i, k in enumerate(mixed)}
        assert all(where[k] >= i - buf for i, k in enumerate(plain))


def test_epochs_differ_and_skip_resumes(shards):
    e0 = [s["__key__"] for s in storage.shard_stream(shards, epoch=0)]
    e1 = [s["__key__"] for s in storage.shard_stream(shards, epoch=1)]
    assert e0 != e1 and sorted(e0) == sorted(e1)
    full = [s["__key__"] for s in storage.shard_stream(shards, buffer_size=7, seed=1)]
    assert [s["__key__"] for s in storage.shard_stream(shards, buffer_size=7, seed=1, skip=20)] == full[20:]
    assert list(storage.shard_stream(shards, skip=10_000)) == []


@pytest.mark.parametrize("kw, kind, word", [
    (dict(rank=1), ValueError, "rank"), (dict(world_size=0), ValueError, "world_size"),
    (dict(worker=2, num_workers=2), ValueError, "worker"), (dict(buffer_size=-3), ValueError, "buffer_size"),
    (dict(skip=-1), ValueError, "skip"), (dict(epoch=-1), ValueError, "epoch"),
    (dict(shuffle=1), TypeError, "shuffle"), (dict(seed=1.5), TypeError, "seed"),
])
def test_stream_bad_arguments(shards, kw, kind, word):
    with pytest.raises(kind, match=word):
        storage.shard_stream(shards, **kw)


def test_stream_bad_shard_lists(shards):
    with pytest.raises(ValueError, match="empty"):
        storage.shard_stream([])
    with pytest.raises(TypeError, match="shards"):
        storage.shard_stream(shards[0])
    with pytest.raises(ValueError, match="twice"):
        storage.shard_stream([shards[0], shards[0]])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_unseen(shards, workers):
    nw = max(1, workers)
    make = lambda state=None: storage.ShardStream(shards, num_workers=nw, seed=5, epoch=2,
                                                  buffer_size=4, state=state)
    load = lambda ds: torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    full = [s["__key__"] for s in load(make())]
    assert sorted(full) == [f"k{i:05d}" for i in range(53)]
    ds = make()
    it, first = iter(load(ds)), []
    for _ in range(19):
        s = next(it)
        ds.mark(s)
        first.append(s["__key__"])
    for _ in it:                                  # drained: the workers exit at once
        pass
    rest = [s["__key__"] for s in load(make(ds.state_dict()))]
    assert sorted(first + rest) == sorted(full) and not set(first) & set(rest)


def test_resume_refuses_another_streams_state(shards):
    ds = storage.ShardStream(shards, seed=1)
    state = ds.state_dict()
    for kw, word in ((dict(seed=2), "seed"), (dict(epoch=1, seed=1), "epoch"),
                     (dict(num_workers=2, seed=1), "num_workers")):
        with pytest.raises(ValueError, match=word):
            storage.ShardStream(shards, state=state, **kw)
    with pytest.raises(ValueError, match="shards"):
        storage.ShardStream(shards[1:], seed=1, state=state)
    with pytest.raises(TypeError, match="state"):
        storage.ShardStream(shards, state=[0])
    with pytest.raises(ValueError, match="__worker__"):
        ds.mark({"__key__": "x"})
    with pytest.raises(ValueError, match="num_workers"):
        list(storage.ShardStream(shards, num_workers=2))       # iterated without a DataLoader


# ------------------------------------------------------------------ page cache
def _memory_backed(path) -> bool:
    """True when ``path`` lies on tmpfs/ramfs, whose pages are the storage itself."""
    path, best, kind = os.path.realpath(path), "", ""
    with open("/proc/mounts") as f:
        for line in f:
            mount, fstype = line.split()[1], line.split()[2]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, kind = mount, fstype
    return kind in ("tmpfs", "ramfs")


def test_drop_cache_and_residency(tmp_path):
    if _memory_backed(tmp_path):
        pytest.skip("the temporary folder is in memory (tmpfs): its pages cannot be dropped")
    p = tmp_path / "blob"
    p.write_bytes(os.urandom(1 << 20))
    storage.read_seconds([p], cold=False)
    assert storage.resident_fraction(p) == 1.0
    storage.drop_cache(p)
    assert storage.resident_fraction(p) < 0.5           # the kernel may keep a page it is using
    t = storage.read_seconds([p], cold=True)
    assert t > 0 and storage.resident_fraction(p) == 1.0
    storage.drop_cache(p, sync=False)                   # clean pages: no fsync needed
    assert storage.resident_fraction(p) < 0.5
    e = tmp_path / "empty"
    e.write_bytes(b"")
    assert storage.resident_fraction(e) == 1.0


def test_read_seconds_bad_input(tmp_path):
    with pytest.raises(ValueError, match="paths"):
        storage.read_seconds([], cold=True)
    with pytest.raises(TypeError, match="cold"):
        storage.read_seconds([tmp_path], cold="yes")
    with pytest.raises(FileNotFoundError):
        storage.drop_cache(tmp_path / "missing")
    with pytest.raises(TypeError, match="sync"):
        storage.drop_cache(tmp_path, sync=1)


# ------------------------------------------------------------------ checkpoints
def test_async_checkpointer_snapshots_and_is_atomic(tmp_path):
    state = {"w": torch.arange(1000.0), "b": torch.ones(3)}
    ck = storage.AsyncCheckpointer()
    ck.save(state, tmp_path / "a.ckpt")
    state["w"].add_(1)
    ck.wait()
    got = reliability.load_checkpoint(tmp_path / "a.ckpt")
    assert torch.equal(got["w"], torch.arange(1000.0)) and torch.equal(got["b"], torch.ones(3))
    (tmp_path / "dir").mkdir()
    ck.save(state, tmp_path / "dir")
    with pytest.raises(OSError):
        ck.wait()
    ck.wait()                                            # reported once
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt", "dir"]
    with pytest.raises(FileNotFoundError, match="folder"):
        ck.save(state, tmp_path / "no" / "x.ckpt")
    with pytest.raises(TypeError, match="state"):
        ck.save({"w": [1.0]}, tmp_path / "x.ckpt")
    with pytest.raises(TypeError, match="state"):
        ck.save({}, tmp_path / "x.ckpt")


def test_restore_refuses_another_models_checkpoint(tmp_path):
    torch.manual_seed(0)
    a, b, c = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), torch.nn.Linear(5, 3)
    reliability.save_checkpoint(tmp_path / "a.ckpt", a.state_dict())
    storage.restore(b, tmp_path / "a.ckpt")
    assert torch.equal(a.weight, b.weight)
    before = c.weight.clone()
    with pytest.raises(ValueError, match="weight"):
        storage.restore(c, tmp_path / "a.ckpt")
    assert torch.equal(c.weight, before)
    with pytest.raises(ValueError, match="bias"):
        storage.restore(torch.nn.Linear(4, 3, bias=False), tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="no tensor .0.weight"):
        storage.restore(torch.nn.Sequential(torch.nn.Linear(4, 3)), tmp_path / "a.ckpt")
    data = (tmp_path / "a.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:-50])
    with pytest.raises(ValueError, match="truncated"):
        storage.restore(b, tmp_path / "cut.ckpt")
    with pytest.raises(TypeError, match="model"):
        storage.restore({"w": 1}, tmp_path / "a.ckpt")


@pytest.mark.parametrize("method", storage.CHECKPOINT_METHODS)
def test_checkpoint_stall_every_method_writes(tmp_path, method):
    state = {"w": torch.randn(256, 256)}
    stall, total = storage.checkpoint_stall(method, state, tmp_path)
    assert 0 < stall <= total
    assert len(os.listdir(tmp_path)) == 1               # one checkpoint folder, no debris


def test_checkpoint_stall_bad_input(tmp_path):
    with pytest.raises(ValueError, match="method"):
        storage.checkpoint_stall("pickle", {"w": torch.ones(1)}, tmp_path)
    with pytest.raises(TypeError, match="state"):
        storage.checkpoint_stall("torch.save", {"w": 1}, tmp_path)
    with pytest.raises(FileNotFoundError, match="folder"):
        storage.checkpoint_stall("torch.save", {"w": torch.ones(1)}, tmp_path / "missing")


@pytest.mark.gpu
def test_async_checkpointer_stages_cuda_tensors_into_pinned_memory(tmp_path):
    """On a GPU the snapshot is a device-to-host copy into reused, pinned buffers."""
    state = {"w": torch.arange(1 << 20, dtype=torch.float32, device="cuda"),
             "b": torch.ones(7, device="cuda", dtype=torch.bfloat16)}
    ck = storage.AsyncCheckpointer()
    ck.save(state, tmp_path / "a.ckpt")
    state["w"].add_(1)                                   # the next step runs on the GPU at once
    ck.wait()
    staged = ck._staging
    assert all(t.device.type == "cpu" and t.is_pinned() for t in staged.values())
    got = reliability.load_checkpoint(tmp_path / "a.ckpt")
    assert torch.equal(got["w"], torch.arange(1 << 20, dtype=torch.float32))
    assert got["b"].dtype == torch.bfloat16
    ck.save(state, tmp_path / "b.ckpt")
    ck.wait()
    assert ck._staging is staged                         # reused: no new allocation
    assert torch.equal(reliability.load_checkpoint(tmp_path / "b.ckpt")["w"], state["w"].cpu())


# ------------------------------------------------------------------ the course's bad-input sweep
def _sweep_entries(tmp):
    """Entries in the format of tests/test_bad_inputs.py's SWEEP, for every public function."""
    import test_bad_inputs as bad
    E, kw = bad.E, bad.kw
    shard = storage.write_shards(samples(3), tmp, 3, prefix="sweep")[0]
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ckpt = os.path.join(tmp, "net.ckpt")
    reliability.save_checkpoint(ckpt, net.state_dict())
    path = {"path": "a file path: a missing file raises FileNotFoundError (tested above)"}
    zero_ok = {"zero"}
    return {
        "storage.nvme_link_ceiling": E(kw(gen=4)),
        "storage.checkpoint_bytes": E(kw(model_or_params=1000, weight_bytes=2, master_weights=True,
                                         optimizer="adamw")),
        "storage.write_seconds": E(kw(nbytes=1e9, bandwidth=1e9), allow={"nbytes": zero_ok}),
        "storage.write_shards": E(lambda: dict(samples=[{"__key__": "a", "txt": b"1"}], folder=tmp,
                                               samples_per_shard=1, prefix="shard"),
                                  allow={"prefix": {"name"}},
                                  skip={"folder": "a folder path: a missing one raises FileNotFoundError"}),
        "storage.read_shard": E(lambda: dict(path=shard), skip=path),
        "storage.shard_stream": E(lambda: dict(shards=[shard], rank=0, world_size=1, worker=0,
                                               num_workers=1, seed=0, epoch=0, shuffle=True,
                                               buffer_size=0, skip=0),
                                  allow={"rank": zero_ok, "worker": zero_ok, "epoch": zero_ok,
                                         "buffer_size": zero_ok, "skip": zero_ok}),
        "storage.drop_cache": E(lambda: dict(path=shard, sync=True), skip=path),
        "storage.resident_fraction": E(lambda: dict(path=shard), skip=path),
        "storage.read_seconds": E(lambda: dict(paths=[shard], cold=False, block=4096, sync=True)),
        "storage.restore": E(lambda: dict(model=torch.nn.Linear(3, 2), path=ckpt), skip=path),
        "storage.checkpoint_stall": E(lambda: dict(method="torch.save", state={"w": torch.ones(4)},
                                                   folder=tmp),
                                      skip={"folder": "a folder path: a missing one raises "
                                                      "FileNotFoundError"}),
    }


def test_every_public_function_passes_the_bad_input_sweep(tmp_path, monkeypatch):
    """The sweep of tests/test_bad_inputs.py, run over utils.storage (every public function)."""
    import inspect
    import test_bad_inputs as bad
    entries = _sweep_entries(str(tmp_path))
    public = {f"storage.{n}" for n, o in vars(storage).items()
              if not n.startswith("_") and inspect.isfunction(o) and o.__module__ == storage.__name__}
    assert public == set(entries)
    monkeypatch.setattr(bad, "SWEEP", dict(bad.SWEEP, **entries))
    problems = {q: bad.sweep_one(q) for q in sorted(entries)}
    assert not any(problems.values()), {q: p for q, p in problems.items() if p}
