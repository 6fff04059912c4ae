"""The lab-04 checkers pass right answers, catch planted bugs and refuse the library's own."""
from __future__ import annotations

import collections
import itertools
import multiprocessing
import numbers
import os
import resource
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from utils import hostmem
from utils.checks import ExerciseFailed, LibraryAnswer
from utils.checks import ch04 as check

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- right answers

def build_chain(n_lines, seed):
    for name, x in (("n_lines", n_lines), ("seed", seed)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if n_lines < 2:
        raise ValueError(f"n_lines must be >= 2, got {n_lines}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    # Sattolo's algorithm: a uniformly random single cycle
    g = torch.Generator().manual_seed(seed)
    succ = list(range(n_lines))
    for i in range(n_lines - 1, 0, -1):
        j = int(torch.randint(0, i, (1,), generator=g))
        succ[i], succ[j] = succ[j], succ[i]
    chain = torch.zeros(n_lines * 8, dtype=torch.int64)
    chain[torch.arange(n_lines) * 8] = torch.tensor(succ) * 8
    return chain


def chase(chain, steps):
    if not isinstance(chain, torch.Tensor) or chain.dtype != torch.int64:
        raise TypeError("chain must be an int64 torch.Tensor")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError("steps must be an int")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    mv = memoryview(chain.numpy()).cast("B").cast("q")
    i = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        i = mv[i]
    return time.perf_counter() - t0, i


_DS = None


def _init(ds):
    global _DS
    _DS = ds


def _load(chunk):
    return default_collate([_DS[i] for i in chunk])


def prefetch_loader(dataset, indices, batch_size, num_workers, prefetch_factor):
    for name, x, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                         ("prefetch_factor", prefetch_factor, 1)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must be an int")
        if x < low:
            raise ValueError(f"{name} must be >= {low}")
    indices = list(indices)
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]

    def gen():
        if num_workers == 0:
            for c in chunks:
                yield default_collate([dataset[i] for i in c])
            return
        with multiprocessing.get_context("fork").Pool(num_workers, _init, (dataset,)) as pool:
            it = iter(chunks)
            pending = collections.deque(pool.apply_async(_load, (c,))
                                        for c in itertools.islice(it, num_workers * prefetch_factor))
            while pending:
                batch = pending.popleft().get(30)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.apply_async(_load, (nxt,)))
                yield batch
    return gen()


def count_faults(fn, *args, **kwargs):
    if not callable(fn):
        raise TypeError("fn must be callable")
    a = resource.getrusage(resource.RUSAGE_SELF)
    out = fn(*args, **kwargs)
    b = resource.getrusage(resource.RUSAGE_SELF)
    return out, b.ru_minflt - a.ru_minflt, b.ru_majflt - a.ru_majflt


def numa_topology(root):
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError("root must be a path")
    root = Path(root)
    if not root.is_dir():
        return []

    def cpus(text):
        out = []
        for part in filter(None, text.strip().split(",")):
            lo, _, hi = part.partition("-")
            out += range(int(lo), int(hi or lo) + 1)
        return sorted(out)

    nodes = []
    for d in root.glob("node*"):
        if not d.name[4:].isdigit():
            continue
        try:
            mem = next(int(line.split()[3]) * 1024 for line in (d / "meminfo").read_text().splitlines()
                       if line.split()[2] == "MemTotal:")
            nodes.append({"id": int(d.name[4:]), "cpus": cpus((d / "cpulist").read_text()),
                          "memory": mem,
                          "distances": [int(x) for x in (d / "distance").read_text().split()]})
        except FileNotFoundError as err:
            raise ValueError(f"missing {err.filename}") from None
    return sorted(nodes, key=lambda n: n["id"])


def test_right_answers_pass(capsys):
    check.build_chain(build_chain)
    check.chase(chase)
    check.prefetch_loader(prefetch_loader)
    check.count_faults(count_faults)
    check.numa_topology(numa_topology)
    assert capsys.readouterr().out.count("passed") == 5
    assert multiprocessing.active_children() == []


@pytest.mark.usefixtures("library_answers_allowed")
def test_library_reference_passes_where_signatures_match(capsys):
    for name in ("build_chain", "chase", "prefetch_loader", "count_faults"):
        getattr(check, name)(getattr(hostmem, name))
    assert capsys.readouterr().out.count("passed") == 4


@pytest.mark.parametrize("name", ["build_chain", "chase", "prefetch_loader", "count_faults",
                                  "numa_topology"])
def test_library_reference_refused(name):
    with pytest.raises(LibraryAnswer):
        getattr(check, name)(getattr(hostmem, name))


def _fails(checker, fn, needle):
    with pytest.raises(ExerciseFailed) as err:
        checker(fn)
    assert needle in str(err.value), str(err.value)


# ---- planted bugs: build_chain
def test_chain_several_cycles():
    def bug(n, seed):                                  # a random permutation, not one cycle
        build_chain(n, seed)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        chain = torch.zeros(n * 8, dtype=torch.int64)
        chain[torch.arange(n) * 8] = perm * 8
        return chain
    with pytest.raises(ExerciseFailed):
        check.build_chain(bug)


def test_chain_line_numbers_not_element_indices():
    def bug(n, seed):
        c = build_chain(n, seed)
        c[::8] //= 8
        return c
    _fails(check.build_chain, bug, "middle of a line")


def test_chain_sequential():
    def bug(n, seed):
        build_chain(n, seed)
        c = torch.zeros(n * 8, dtype=torch.int64)
        c[::8] = (torch.arange(n) + 1) % n * 8
        return c
    _fails(check.build_chain, bug, "next line")


def test_chain_ignores_seed():
    _fails(check.build_chain, lambda n, seed: build_chain(n, 0) if seed >= 0 and isinstance(seed, int)
           and not isinstance(seed, bool) else build_chain(n, seed), "different seeds")


def test_chain_int32_and_no_validation():
    _fails(check.build_chain, lambda n, seed: build_chain(n, seed).to(torch.int32), "dtype")

    def lax(n, seed):
        return build_chain(max(int(n), 2), abs(int(seed)))
    _fails(check.build_chain, lax, "build_chain(")


def test_chain_one_per_element_not_per_line():
    def bug(n, seed):
        c = build_chain(n, seed)
        c[1::8] = 7
        return c
    _fails(check.build_chain, bug, "not all 0")


# ---- planted bugs: chase
def test_chase_one_step_short():
    def bug(chain, steps):
        t, _ = chase(chain, steps)
        return t, chase(chain, steps - 1)[1] if steps > 1 else 0
    _fails(check.chase, bug, "the element reached")


def test_chase_returns_line_not_element():
    _fails(check.chase, lambda c, s: (chase(c, s)[0], chase(c, s)[1] // 8), "the element reached")


def test_chase_time_per_step_not_positive():
    _fails(check.chase, lambda c, s: (0.0, chase(c, s)[1]), "seconds")


def test_chase_no_validation():
    def bug(chain, steps):
        if isinstance(chain, list):
            chain = torch.tensor(chain)
        return chase(chain.long(), int(steps)) if steps >= 1 else (1e-9, 0)
    _fails(check.chase, bug, "TypeError")


# ---- planted bugs: prefetch_loader
def test_loader_out_of_order():
    def bug(ds, indices, bs, workers, pf):
        batches = list(prefetch_loader(ds, indices, bs, workers, pf))
        return batches[::-1]
    _fails(check.prefetch_loader, bug, "batch 0")


def test_loader_drops_last():
    def bug(ds, indices, bs, workers, pf):
        batches = list(prefetch_loader(ds, indices, bs, workers, pf))
        n = len(list(indices))
        return batches if n % bs == 0 else batches[:-1]
    _fails(check.prefetch_loader, bug, "number of batches")


def test_loader_sorted_indices():
    _fails(check.prefetch_loader, lambda ds, idx, bs, w, pf: prefetch_loader(ds, sorted(idx), bs, w, pf),
           "batch 0")


def test_loader_stacks_without_collate():
    def bug(ds, indices, bs, workers, pf):
        prefetch_loader(ds, indices, bs, workers, pf)
        idx = list(indices)
        return [[ds[i] for i in idx[k:k + bs]] for k in range(0, len(idx), bs)]
    with pytest.raises(ExerciseFailed):
        check.prefetch_loader(bug)


def test_loader_never_uses_workers():
    _fails(check.prefetch_loader, lambda ds, idx, bs, w, pf: prefetch_loader(ds, idx, bs, 0, pf),
           "worker process")


def test_loader_accepts_bad_arguments():
    def bug(ds, indices, bs, workers, pf):
        return prefetch_loader(ds, indices, max(int(bs), 1), max(workers, 0), max(pf, 1))
    _fails(check.prefetch_loader, bug, "naming")


def test_loader_hang_is_a_failure_not_a_hang(monkeypatch):
    monkeypatch.setattr(check, "LOADER_TIMEOUT", 1.0)

    def bug(ds, indices, bs, workers, pf):
        if workers:
            def forever():
                while True:
                    time.sleep(0.05)
                yield
            return forever()
        return prefetch_loader(ds, indices, bs, workers, pf)
    _fails(check.prefetch_loader, bug, "did not finish")


# ---- planted bugs: count_faults
def test_faults_totals_not_differences():
    def bug(fn, *a, **k):
        out = fn(*a, **k)
        r = resource.getrusage(resource.RUSAGE_SELF)
        return out, r.ru_minflt, r.ru_majflt
    _fails(check.count_faults, bug, "minor faults")


def test_faults_children():
    def bug(fn, *a, **k):
        x = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = fn(*a, **k)
        y = resource.getrusage(resource.RUSAGE_CHILDREN)
        return out, y.ru_minflt - x.ru_minflt, y.ru_majflt - x.ru_majflt
    _fails(check.count_faults, bug, "minor faults")


def test_faults_swapped():
    def bug(fn, *a, **k):
        out, minor, major = count_faults(fn, *a, **k)
        return out, major, minor
    _fails(check.count_faults, bug, "minor faults")


def test_faults_drops_kwargs():
    _fails(check.count_faults, lambda fn, *a, **k: count_faults(fn, *a), "the result")


def test_faults_counted_after_the_call_only():
    def bug(fn, *a, **k):
        out = fn(*a, **k)
        _, minor, major = count_faults(lambda: None)
        return out, minor, major
    _fails(check.count_faults, bug, "minor faults")


# ---- planted bugs: numa_topology
def test_numa_kib_not_bytes():
    def bug(root):
        return [dict(n, memory=n["memory"] // 1024) for n in numa_topology(root)]
    _fails(check.numa_topology, bug, "numa_topology on")


def test_numa_range_exclusive():
    def bug(root):
        out = numa_topology(root)
        return [dict(n, cpus=[c for c in n["cpus"] if c + 1 in n["cpus"] or len(n["cpus"]) == 1])
                for n in out]
    _fails(check.numa_topology, bug, "numa_topology on")


def test_numa_sorted_by_name_not_id():
    def bug(root):
        out = numa_topology(root)
        return sorted(out, key=lambda n: f"node{n['id']}")
    _fails(check.numa_topology, bug, "ids out of order")


def test_numa_cpuless_node_dropped():
    _fails(check.numa_topology, lambda root: [n for n in numa_topology(root) if n["cpus"]],
           "memory-only")


def test_numa_absent_root_raises():
    def bug(root):
        if isinstance(root, str) and not Path(root).exists():
            raise FileNotFoundError(root)
        return numa_topology(root)
    _fails(check.numa_topology, bug, "FileNotFoundError")


def test_numa_missing_file_passes_through():
    def bug(root):
        try:
            return numa_topology(root)
        except ValueError:
            return []
    _fails(check.numa_topology, bug, "ValueError")
