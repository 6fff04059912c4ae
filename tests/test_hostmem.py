"""utils.hostmem: the chain, the NUMA reader and models, fault counting, loading, the loader."""
from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from utils import hostmem, tiny


# --------------------------------------------------------------------------- the chain

@pytest.mark.parametrize("n", [2, 3, 16, 1000])
def test_chain_is_one_cycle_over_every_line(n):
    chain = hostmem.build_chain(n, seed=5)
    assert chain.dtype == torch.int64 and chain.shape == (8 * n,)
    lines = chain.view(n, 8)
    assert not lines[:, 1:].any()
    seen, at = set(), 0
    for _ in range(n):
        assert at % 8 == 0 and at // 8 not in seen
        seen.add(at // 8)
        at = int(chain[at])
    assert at == 0 and seen == set(range(n))


def test_chain_depends_on_seed_only():
    assert torch.equal(hostmem.build_chain(64, 1), hostmem.build_chain(64, 1))
    assert not torch.equal(hostmem.build_chain(64, 1), hostmem.build_chain(64, 2))


def test_chase_end_point_by_hand():
    # 4 lines, the ring 0 -> 2 -> 1 -> 3 -> 0 written out by hand
    chain = torch.zeros(32, dtype=torch.int64)
    chain[0], chain[16], chain[8], chain[24] = 16, 8, 24, 0
    ends = [hostmem.chase(chain, s)[1] for s in range(1, 10)]
    assert ends == [16, 8, 24, 0, 16, 8, 24, 0, 16]
    seconds, _ = hostmem.chase(chain, 1000)
    assert seconds > 0


def test_latency_sweep_subtracts_the_smallest():
    rows = hostmem.latency_sweep([1024, 4096], steps=800, repeats=1)
    assert [r["bytes"] for r in rows] == [1024, 4096]
    assert rows[0]["latency"] == 0.0
    assert rows[1]["latency"] == pytest.approx(max(rows[1]["raw"] - rows[0]["raw"], 0.0))


@pytest.mark.parametrize("call, exc", [
    (lambda: hostmem.build_chain(1), ValueError), (lambda: hostmem.build_chain(4.0), TypeError),
    (lambda: hostmem.build_chain(4, -1), ValueError),
    (lambda: hostmem.chase([0, 0], 3), TypeError),
    (lambda: hostmem.chase(torch.zeros(8, dtype=torch.int32), 3), TypeError),
    (lambda: hostmem.chase(hostmem.build_chain(4), 0), ValueError),
    (lambda: hostmem.latency_sweep([100]), ValueError),
    (lambda: hostmem.latency_sweep([]), ValueError),
    (lambda: hostmem.latency_sweep("1024"), TypeError),
    (lambda: hostmem.latency_sweep([1024], steps=0), ValueError),
])
def test_chain_bad_input(call, exc):
    with pytest.raises(exc):
        call()


# --------------------------------------------------------------------------- NUMA

@pytest.mark.parametrize("text, cpus", [
    ("0-3", [0, 1, 2, 3]), ("0-3,8,10-11", [0, 1, 2, 3, 8, 10, 11]), ("", []), ("\n", []),
    ("5", [5]), ("0-7:2", [0, 2, 4, 6]), ("56-57,168-169", [56, 57, 168, 169]),
])
def test_parse_cpulist(text, cpus):
    assert hostmem.parse_cpulist(text) == cpus


@pytest.mark.parametrize("text, exc", [
    ("3-1", ValueError), ("a", ValueError), ("0-", ValueError), ("1,,2", ValueError),
    ("0-7:0", ValueError), (3, TypeError),
])
def test_parse_cpulist_bad_input(text, exc):
    with pytest.raises(exc):
        hostmem.parse_cpulist(text)


def _node(root: Path, i: int, cpus: str, kib: int, dist: str):
    d = root / f"node{i}"
    d.mkdir()
    (d / "cpulist").write_text(cpus + "\n")
    (d / "distance").write_text(dist + "\n")
    (d / "meminfo").write_text(f"Node {i} MemTotal:  {kib} kB\nNode {i} MemFree:  1 kB\n")


def test_numa_topology_two_sockets(tmp_path):
    _node(tmp_path, 1, "4-7", 2048, "21 10")
    _node(tmp_path, 0, "0-3", 1024, "10 21")
    (tmp_path / "power").mkdir()
    (tmp_path / "online").write_text("0-1\n")
    nodes = hostmem.numa_topology(tmp_path)
    assert nodes == [hostmem.NumaNode(0, (0, 1, 2, 3), 1024 * 1024, (10, 21)),
                     hostmem.NumaNode(1, (4, 5, 6, 7), 2048 * 1024, (21, 10))]


def test_numa_topology_absent_and_broken(tmp_path):
    assert hostmem.numa_topology(tmp_path / "nothing") == []
    _node(tmp_path, 0, "0", 1, "10 20")                     # two distances for one node
    with pytest.raises(ValueError, match="entries"):
        hostmem.numa_topology(tmp_path)
    (tmp_path / "node0" / "cpulist").unlink()
    with pytest.raises(ValueError, match="cpulist"):
        hostmem.numa_topology(tmp_path)
    with pytest.raises(TypeError):
        hostmem.numa_topology(7)


def test_this_machine_has_at_least_one_node_on_linux():
    nodes = hostmem.numa_topology()
    if not Path(hostmem.NODE_ROOT).is_dir():
        pytest.skip("no sysfs NUMA folder here")
    assert nodes and all(n.memory > 0 for n in nodes)
    assert all(n.distances[k] == hostmem.PUBLISHED["slit_local_distance"]["value"]
               for k, n in enumerate(nodes))


def test_numa_models_by_hand():
    assert hostmem.numa_latency(0.0) == pytest.approx(60e-9)
    assert hostmem.numa_latency(1.0) == pytest.approx(100e-9)
    assert hostmem.numa_latency(0.25) == pytest.approx(70e-9)
    assert hostmem.numa_latency(0.5, local=1.0, remote=3.0) == pytest.approx(2.0)
    # half the bytes at 100 B/s, half at 50 B/s: 1 byte takes 0.5/100 + 0.5/50 = 0.015 s
    assert hostmem.numa_bandwidth(0.5, 100.0, 50.0) == pytest.approx(1 / 0.015)
    assert hostmem.numa_bandwidth(0.0, 100.0, 50.0) == pytest.approx(100.0)
    assert hostmem.ddr_bandwidth(8, 4800e6) == pytest.approx(307.2e9)


@pytest.mark.parametrize("call, exc", [
    (lambda: hostmem.numa_latency(1.5), ValueError), (lambda: hostmem.numa_latency(-0.1), ValueError),
    (lambda: hostmem.numa_latency(0.5, local=0), ValueError),
    (lambda: hostmem.numa_bandwidth(0.5, 0.0, 1.0), ValueError),
    (lambda: hostmem.numa_bandwidth("0.5", 1.0, 1.0), TypeError),
    (lambda: hostmem.ddr_bandwidth(0, 4800e6), ValueError),
    (lambda: hostmem.ddr_bandwidth(8, float("nan")), ValueError),
])
def test_numa_models_bad_input(call, exc):
    with pytest.raises(exc):
        call()


def test_published_figures_carry_sources():
    for key, entry in hostmem.PUBLISHED.items():
        assert set(entry) == {"value", "source"}, key
        assert entry["value"] > 0 and len(entry["source"]) > 20, key


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_pinned_restores_the_mask():
    before = os.sched_getaffinity(0)
    one = min(before)
    with hostmem.pinned([one]) as cpus:
        assert cpus == [one] and os.sched_getaffinity(0) == {one}
    assert os.sched_getaffinity(0) == before
    with pytest.raises(ValueError):
        with hostmem.pinned([]):
            pass
    with pytest.raises(ValueError):
        with hostmem.pinned([max(before) + 1000]):
            pass
    with pytest.raises(TypeError):
        with hostmem.pinned("0"):
            pass
    assert os.sched_getaffinity(0) == before


def test_measure_numa_explains_one_node(tmp_path):
    _node(tmp_path, 0, "0-1", 1024, "10")
    assert hostmem.measure_numa(1 << 20, root=tmp_path) is None


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs to stand for two nodes")
def test_measure_numa_runs_the_two_node_path(tmp_path):
    # A fake two-node tree whose nodes are two CPUs of this machine: the pinning, first
    # touch and timing path runs (the memory is not really remote), and the mask is restored.
    before = os.sched_getaffinity(0)
    a, b = sorted(before)[:2]
    _node(tmp_path, 0, str(a), 1024, "10 20")
    _node(tmp_path, 1, str(b), 1024, "20 10")
    out = hostmem.measure_numa(1 << 20, root=tmp_path, repeats=1)
    assert out["nodes"] == (0, 1) and out["local"] > 0 and out["remote"] > 0
    assert os.sched_getaffinity(0) == before


# --------------------------------------------------------------------------- faults, loading

def test_count_faults_one_per_fresh_page():
    pages = 1024

    def touch():
        m = mmap.mmap(-1, pages * mmap.PAGESIZE)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            m.madvise(mmap.MADV_NOHUGEPAGE)
        for i in range(0, pages * mmap.PAGESIZE, mmap.PAGESIZE):
            m[i] = 1
        m.close()
        return "done"

    result, minor, major = hostmem.count_faults(touch)
    assert result == "done" and pages <= minor <= pages + 256 and major == 0
    assert hostmem.count_faults(lambda a, b=1: a * b, 3, b=4)[0] == 12
    with pytest.raises(TypeError):
        hostmem.count_faults(None)


def test_first_use_both_modes_give_the_tensor():
    from safetensors.torch import load_file

    path = tiny.weights_path("tiny-draft")
    want = load_file(str(path))
    name = sorted(want)[0]
    for mode in ("eager", "mmap"):
        got = hostmem.first_use(path, name, mode)
        assert torch.equal(got["tensor"], want[name])
        assert got["seconds"] > 0 and got["minor"] >= 0 and got["major"] >= 0


@pytest.mark.parametrize("args, exc", [
    (("nowhere.safetensors", "x", "eager"), FileNotFoundError),
    ((None, "x", "eager"), TypeError), (("__W__", 3, "eager"), TypeError),
    (("__W__", "x", "lazy"), ValueError), (("__W__", "no such tensor", "mmap"), KeyError),
    (("__W__", "no such tensor", "eager"), KeyError),
])
def test_first_use_bad_input(args, exc):
    args = tuple(tiny.weights_path("tiny-draft") if a == "__W__" else a for a in args)
    with pytest.raises(exc):
        hostmem.first_use(*args)


def test_evict_keeps_the_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * 10000)
    assert hostmem.evict(p) in (True, False)
    assert p.read_bytes() == b"x" * 10000
    with pytest.raises(FileNotFoundError):
        hostmem.evict(tmp_path / "missing")


# --------------------------------------------------------------------------- data loading

def test_decode_dataset_is_deterministic_and_costs_time():
    ds = hostmem.DecodeDataset(5, shape=(2, 3), decode_seconds=0.002, seed=1)
    a, b = ds[3], hostmem.DecodeDataset(5, shape=(2, 3), decode_seconds=0.0, seed=1)[3]
    assert torch.equal(a[0], b[0]) and a[1] == b[1] == 3
    assert not torch.equal(ds[2][0], ds[3][0])
    import time
    t0 = time.perf_counter()
    ds[0]
    assert time.perf_counter() - t0 >= 0.002
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(TypeError):
        ds[1.0]


@pytest.mark.parametrize("kw, exc", [
    (dict(n=0), ValueError), (dict(n=3, shape=()), TypeError), (dict(n=3, shape=(0,)), ValueError),
    (dict(n=3, decode_seconds=-1.0), ValueError), (dict(n=3, seed=-1), ValueError),
])
def test_decode_dataset_bad_input(kw, exc):
    with pytest.raises(exc):
        hostmem.DecodeDataset(**kw)


@pytest.mark.parametrize("workers, prefetch", [(0, 2), (1, 1), (2, 3)])
def test_prefetch_loader_equals_dataloader(workers, prefetch):
    ds = hostmem.DecodeDataset(19, shape=(2, 2), decode_seconds=0.0, seed=3)
    order = torch.randperm(19, generator=torch.Generator().manual_seed(9)).tolist()
    ref = list(DataLoader(ds, batch_size=4, sampler=order, num_workers=workers,
                          prefetch_factor=prefetch if workers else None))
    got = list(hostmem.prefetch_loader(ds, order, 4, workers, prefetch))
    assert len(got) == len(ref) == 5
    for g, r in zip(got, ref):
        assert torch.equal(g[0], r[0]) and torch.equal(g[1], r[1])


def test_prefetch_loader_stops_early_without_leaking():
    import multiprocessing

    ds = hostmem.DecodeDataset(40, shape=(2,), decode_seconds=0.0)
    gen = hostmem.prefetch_loader(ds, range(40), 2, num_workers=2, prefetch_factor=2)
    next(gen)
    gen.close()
    assert multiprocessing.active_children() == []


def test_a_pool_whose_terminate_asserts_leaves_no_worker(monkeypatch):
    """CPython's Pool.terminate can assert ("Cannot have cache with result_hander not
    alive") when its handler threads are gone: the workers are killed all the same."""
    import multiprocessing
    import multiprocessing.pool

    pool = multiprocessing.get_context("fork").Pool(2)
    workers = list(pool._pool)

    def asserts(self):
        # what CI saw: the worker handler has stopped (so the pool is no longer kept
        # full), then terminate asserts
        self._worker_handler._state = multiprocessing.pool.TERMINATE
        self._change_notifier.put(None)
        self._worker_handler.join(10)
        self._terminate.cancel()      # the real terminate has used up the pool's finalizer
        raise AssertionError("Cannot have cache with result_hander not alive")

    monkeypatch.setattr(multiprocessing.pool.Pool, "terminate", asserts)
    hostmem._stop_pool(pool)
    assert workers and not any(w.is_alive() for w in workers)


@pytest.mark.parametrize("args, exc", [
    ((5, range(3), 2), TypeError), ((None, range(3), 2), TypeError),
    (("DS", "abc", 2), TypeError), (("DS", range(3), 0), ValueError),
    (("DS", range(3), 2, -1), ValueError), (("DS", range(3), 2, 1, 0), ValueError),
    (("DS", range(3), 2.5), TypeError),
])
def test_prefetch_loader_bad_input(args, exc):
    ds = hostmem.DecodeDataset(3, shape=(1,), decode_seconds=0.0)
    args = tuple(ds if a == "DS" else a for a in args)
    with pytest.raises(exc):
        hostmem.prefetch_loader(*args)


def test_loader_throughput_counts_samples():
    out = hostmem.loader_throughput(lambda: [[torch.zeros(4)], [torch.zeros(3)]], epochs=2)
    assert out["samples"] == 14 and out["samples_per_s"] > 0 and out["first_batch_s"] >= 0
    with pytest.raises(ValueError):
        hostmem.loader_throughput(lambda: [])
    with pytest.raises(TypeError):
        hostmem.loader_throughput([1, 2])


def test_loader_model_by_hand():
    # 10 ms of decode per sample, batch 8: 80 ms a batch on one core
    assert hostmem.loader_model(0.01, 8, 0, 4) == pytest.approx(8 / 0.08)
    assert hostmem.loader_model(0.01, 8, 0, 4, step_seconds=0.02) == pytest.approx(8 / 0.1)
    assert hostmem.loader_model(0.01, 8, 2, 4) == pytest.approx(8 / 0.04)
    assert hostmem.loader_model(0.01, 8, 8, 2) == pytest.approx(8 / 0.04)      # 2 cores cap it
    assert hostmem.loader_model(0.01, 8, 4, 4, step_seconds=0.05) == pytest.approx(8 / 0.05)
    assert math.isinf(hostmem.loader_model(0.0, 8, 0, 1))
    for bad in (dict(decode_seconds=-1.0), dict(batch_size=0), dict(num_workers=-1), dict(cores=0)):
        kw = dict(decode_seconds=0.01, batch_size=8, num_workers=1, cores=1, **{})
        kw.update(bad)
        with pytest.raises(ValueError):
            hostmem.loader_model(**kw)
