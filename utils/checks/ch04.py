"""Checkers for lab 04, the CPU memory hierarchy and NUMA.

Oracles: the cycle structure of the chain itself (every line once, one cycle); a plain
Python walk of the chain for the chase's end point; ``torch.utils.data.DataLoader`` with
the same sampler order and collate function for the loader, batch for batch; the page
faults of an anonymous mapping whose pages are written once each (the kernel zero-fills
one page per fault) for the fault counter; fake ``/sys/devices/system/node`` trees written
by the checker for the NUMA reader. Timings are compared as measurement warnings only.
"""
from __future__ import annotations

import contextlib
import math
import mmap
import numbers
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

from .. import hostmem
from . import (describe, exercise, expect_equal, expect_raises, expect_type, fail,
               measurement_warning)

KiB, MiB = 1 << 10, 1 << 20


def _published_latency() -> str:
    p = hostmem.PUBLISHED
    return (f"published: local DRAM ~{p['xeon5500_local_dram_latency']['value'] * 1e9:.0f} ns, "
            f"remote ~{p['xeon5500_remote_dram_latency']['value'] * 1e9:.0f} ns on a Xeon 5500 "
            f"(Levinthal, Intel 2009)")


# --------------------------------------------------------------------------- exercise 1

def _walk(chain: torch.Tensor, n_lines: int, what: str) -> list[int]:
    """The lines visited from element 0 until the walk returns to 0 (or runs too long)."""
    values = chain.tolist()
    seen, at = [], 0
    for _ in range(n_lines + 1):
        if at % 8:
            fail(f"{what}: a pointer leads into the middle of a line",
                 "every stored index is 8 x (a line number): the first element of a line",
                 f"element {seen[-1] * 8 if seen else 0} holds {at}",
                 "store 8 * j, the element index of line j, not j itself")
        if not 0 <= at < len(values):
            fail(f"{what}: a pointer leads outside the chain", f"indices in [0, {len(values)})",
                 f"{at}", "store element indices 8 * j for lines j in range(n_lines)")
        seen.append(at // 8)
        at = values[at]
        if at == 0:
            return seen
    fail(f"{what}: the walk from element 0 never comes back to it",
         "a single cycle through every line, back to line 0",
         f"after {n_lines} steps it is still going (a cycle that does not contain line 0, "
         "or a repeated line)", "link the lines in one random order, the last back to the first")


@exercise
def build_chain(fn):
    """``fn(n_lines, seed) -> int64 tensor of n_lines*8``: one random cycle over the lines."""
    for n, seed in [(2, 0), (7, 1), (64, 2), (4096, 3)]:
        what = f"build_chain({n}, {seed})"
        chain = fn(n, seed)
        expect_type(chain, torch.Tensor, what)
        expect_equal(tuple(chain.shape), (n * 8,), f"{what}.shape",
                     "one 64-byte line = 8 int64 elements per line")
        if chain.dtype != torch.int64:
            fail(f"{what} has the wrong dtype", "torch.int64 (8-byte indices)", str(chain.dtype))
        rest = chain.view(n, 8)[:, 1:]
        if rest.any():
            fail(f"{what}: the 7 slots after each line's first element are not all 0",
                 "0 in elements 8i+1 .. 8i+7", f"{int((rest != 0).sum())} non-zero",
                 "only the first element of a line holds a pointer")
        visited = _walk(chain, n, what)
        if len(visited) != n or len(set(visited)) != n:
            fail(f"{what}: the cycle through element 0 does not visit every line once",
                 f"{n} distinct lines before returning to line 0",
                 f"{len(set(visited))} distinct lines in a cycle of {len(visited)}",
                 "a permutation with several cycles leaves lines out: link one random order "
                 "of all lines into a single ring (or use Sattolo's algorithm)")
        again = fn(n, seed)
        expect_equal(again, chain, f"{what} called twice",
                     "the same seed must give the same chain: seed a torch.Generator")
    a, b = fn(4096, 5), fn(4096, 6)
    heads = a.view(4096, 8)[:, 0]
    sequential = int((heads == (torch.arange(4096) * 8 + 8) % (4096 * 8)).sum())
    if sequential > 4096 // 8:
        fail("build_chain(4096, 5): most lines point to the next line",
             "a random order (about 1 in 4096 successors is the next line)",
             f"{sequential} of 4096 successors are the next line",
             "a sequential chain is what hardware prefetchers predict: you would measure "
             "the prefetcher, not the latency")
    if torch.equal(a, b):
        fail("build_chain(4096, 5) and build_chain(4096, 6) are equal",
             "different seeds give different orders", "the same chain",
             "pass the seed to the generator that draws the order")
    for args, kind, arg in [((1, 0), ValueError, "n_lines"), ((0, 0), ValueError, "n_lines"),
                            ((4.0, 0), TypeError, "n_lines"), (("4", 0), TypeError, "n_lines"),
                            ((4, -1), ValueError, "seed"), ((4, 1.5), TypeError, "seed")]:
        expect_raises(lambda: fn(*args), kind, f"build_chain{args!r}",
                      f"a {kind.__name__} naming {arg}",
                      "n_lines is an int >= 2 and seed an int >= 0")
    return "one random cycle through every line, 8 int64 per 64-byte line, repeatable per seed"


# --------------------------------------------------------------------------- exercise 2

def _end(chain: torch.Tensor, steps: int) -> int:
    values, at = chain.tolist(), 0
    for _ in range(steps):
        at = values[at]
    return at


@exercise
def chase(fn):
    """``fn(chain, steps) -> (seconds, end)``: ``steps`` dependent loads from element 0."""
    small = hostmem.build_chain(32, 11)
    for steps in (1, 2, 7, 8, 9, 31, 32, 33, 100, 1000):
        what = f"chase(chain of 32 lines, {steps})"
        got = fn(small, steps)
        expect_type(got, tuple, what, "return (seconds, end)")
        if len(got) != 2:
            fail(what, "a tuple (seconds, end)", describe(got))
        seconds, end = got
        if isinstance(end, bool) or not isinstance(end, numbers.Integral):
            fail(f"{what}: end is not an int", "the element index reached, a Python int",
                 describe(end), "convert with int(...)")
        expect_equal(int(end), _end(small, steps), f"{what}: the element reached",
                     "exactly `steps` loads: each load's value is the next load's index, "
                     "starting at element 0")
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) \
                or not (math.isfinite(seconds) and seconds > 0):
            fail(f"{what}: seconds", "a positive finite float", describe(seconds),
                 "time the loop with time.perf_counter()")
    expect_raises(lambda: fn(small.tolist(), 8), TypeError, "chase of a list",
                  "a TypeError naming chain", "chain must be a torch.Tensor")
    expect_raises(lambda: fn(small.to(torch.int32), 8), TypeError, "chase of an int32 tensor",
                  "a TypeError naming chain", "chain must be an int64 tensor")
    for bad, kind in [(0, ValueError), (-5, ValueError), (8.0, TypeError)]:
        expect_raises(lambda: fn(small, bad), kind, f"chase(chain, {bad!r})",
                      f"a {kind.__name__} naming steps", "steps is an int >= 1")
    # Measurement: an L1-sized chain against one far beyond the last-level cache.
    steps = 20_000
    near = hostmem.build_chain(2 * KiB // 64, 1)
    far = hostmem.build_chain((64 * MiB) // 64, 1)
    fn(far, 2 * steps)                                      # touch the far chain's pages
    t_near = min(fn(near, steps)[0] for _ in range(3)) / steps
    t_far = min(fn(far, steps)[0] for _ in range(3)) / steps
    if t_far < 1.5 * t_near:
        measurement_warning("a 64 MiB chain against a 2 KiB one",
                            "the far chain's steps clearly slower (DRAM against L1)",
                            f"{t_far * 1e9:.0f} ns against {t_near * 1e9:.0f} ns per step",
                            "the loop does more than one load per step (overhead hides the "
                            "latency), or the machine is very busy")
    return (f"2 KiB chain {t_near * 1e9:.0f} ns/step (the interpreter), 64 MiB chain "
            f"{t_far * 1e9:.0f} ns/step: ~{max(t_far - t_near, 0) * 1e9:.0f} ns above an L1 "
            f"hit; {_published_latency()}")


# --------------------------------------------------------------------------- exercise 3

class _DictData(torch.utils.data.Dataset):
    """Samples as dicts, to hold the loader to default_collate's structure."""

    def __len__(self):
        return 23

    def __getitem__(self, i):
        return {"x": torch.full((2,), float(i)), "id": i, "name": f"s{i}"}


class _PidData(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return os.getpid()


@contextlib.contextmanager
def _deadline(seconds: float, what: str):
    """Raise TimeoutError in the main thread after ``seconds`` (no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def ring(signum, frame):
        raise TimeoutError(f"{what} took longer than {seconds:g} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


#: Seconds a loader may take for one configuration before the check gives up on it.
LOADER_TIMEOUT = 60.0


def _run_loader(fn, what, *args):
    try:
        with _deadline(LOADER_TIMEOUT, what):
            return list(fn(*args))
    except TimeoutError:
        fail(f"{what} did not finish", f"every batch within {LOADER_TIMEOUT:g} s",
             f"still waiting after {LOADER_TIMEOUT:g} s",
             "a worker may have died or a batch was never submitted; keep num_workers * "
             "prefetch_factor batches in flight and take them back in order")


def _loader_cases():
    g = torch.Generator().manual_seed(4)
    decode = hostmem.DecodeDataset(29, shape=(3, 4, 4), decode_seconds=0.0, seed=7)
    shuffled = torch.randperm(29, generator=g).tolist()
    return [(decode, shuffled, 4, 0, 2), (decode, shuffled, 4, 1, 1), (decode, shuffled, 5, 2, 2),
            (decode, list(range(29)), 29, 2, 3), (decode, shuffled[:10], 3, 2, 4),
            (_DictData(), torch.randperm(23, generator=g).tolist(), 6, 2, 2)]


@exercise
def prefetch_loader(fn):
    """``fn(dataset, indices, batch_size, num_workers, prefetch_factor)``: DataLoader's batches."""
    for ds, indices, bs, workers, pf in _loader_cases():
        what = (f"prefetch_loader({type(ds).__name__}, {len(indices)} indices, batch_size={bs}, "
                f"num_workers={workers}, prefetch_factor={pf})")
        ref = list(DataLoader(ds, batch_size=bs, sampler=indices, num_workers=workers,
                              prefetch_factor=pf if workers else None))
        got = _run_loader(fn, what, ds, list(indices), bs, workers, pf)
        expect_equal(len(got), len(ref), f"{what}: the number of batches",
                     "one batch per batch_size indices, the last one shorter")
        for k, (g_batch, r_batch) in enumerate(zip(got, ref)):
            expect_equal(g_batch, r_batch, f"{what}: batch {k}",
                         "batches in the order of indices, each collated with "
                         "torch.utils.data.default_collate, whichever worker finishes first")
    main = os.getpid()
    for workers in (0, 2):
        what = f"prefetch_loader(samples that return the loading process's pid, num_workers={workers})"
        batches = _run_loader(fn, what, _PidData(), list(range(12)), 3, workers, 2)
        pids = {int(p) for b in batches for p in b}
        if workers == 0 and pids != {main}:
            fail(what, "every sample loaded by the main process", f"pids {sorted(pids)}",
                 "with num_workers=0 there are no worker processes")
        if workers and main in pids:
            fail(what, "every sample loaded by a worker process",
                 "some samples were loaded in the main process",
                 "submit each batch to a pool of num_workers forked processes")
    ds = hostmem.DecodeDataset(8, shape=(2,), decode_seconds=0.0)
    for (bs, workers, pf), kind, arg, bad in [((0, 0, 2), ValueError, "batch_size", 0),
                                              ((2.0, 0, 2), TypeError, "batch_size", 2.0),
                                              ((2, -1, 2), ValueError, "num_workers", -1),
                                              ((2, 1, 0), ValueError, "prefetch_factor", 0)]:
        expect_raises(lambda: _run_loader(fn, "a bad call", ds, list(range(8)), bs, workers, pf),
                      kind, f"prefetch_loader with {arg}={bad!r}",
                      f"a {kind.__name__} naming {arg}",
                      "batch_size and prefetch_factor are ints >= 1, num_workers an int >= 0")
    # Measurement: both loaders over the same data with a decode cost per sample.
    cost = 2e-3
    timed = hostmem.DecodeDataset(48, shape=(3, 16, 16), decode_seconds=cost)
    order = torch.randperm(48, generator=torch.Generator().manual_seed(0)).tolist()
    ref = hostmem.loader_throughput(lambda: DataLoader(timed, batch_size=4, sampler=order,
                                                       num_workers=2, prefetch_factor=2))
    mine = hostmem.loader_throughput(lambda: fn(timed, order, 4, 2, 2))
    if mine["samples_per_s"] < 0.6 * ref["samples_per_s"]:
        measurement_warning("samples/s with 2 workers, 2 ms decode per sample",
                            f"about DataLoader's {ref['samples_per_s']:.0f} samples/s",
                            f"{mine['samples_per_s']:.0f} samples/s",
                            "batches loaded one at a time instead of num_workers at once, or "
                            "a busy machine")
    model = hostmem.loader_model(cost, 4, 2, len(os.sched_getaffinity(0))
                                 if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return (f"{len(_loader_cases())} configurations equal to DataLoader batch for batch; 2 ms "
            f"decode, 2 workers, after the first batch: yours {mine['steady_samples_per_s']:.0f} "
            f"samples/s, DataLoader {ref['steady_samples_per_s']:.0f}, model {model:.0f} "
            f"(first batch after {mine['first_batch_s'] * 1e3:.0f} ms against "
            f"{ref['first_batch_s'] * 1e3:.0f} ms: starting the workers)")


# --------------------------------------------------------------------------- exercise 4

def _touch_fresh(pages: int, twice: bool = False) -> int:
    """Write one byte per page of a fresh anonymous mapping (twice: write it again)."""
    page = mmap.PAGESIZE
    m = mmap.mmap(-1, pages * page)
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
        m.madvise(mmap.MADV_NOHUGEPAGE)             # one fault per 4 KiB page, not per 2 MiB
    try:
        for rounds in range(2 if twice else 1):
            for i in range(0, pages * page, page):
                m[i] = 1
        return pages
    finally:
        m.close()


@exercise
def count_faults(fn):
    """``fn(f, *args, **kwargs) -> (f's result, minor faults, major faults)`` during the call."""
    got = fn(lambda a, b=0: a + b, 2, b=3)
    expect_type(got, tuple, "count_faults(lambda a, b=0: a + b, 2, b=3)",
                "return (result, minor, major)")
    if len(got) != 3:
        fail("count_faults(...)", "a tuple (result, minor, major)", describe(got))
    expect_equal(got[0], 5, "count_faults(lambda a, b=0: a + b, 2, b=3): the result",
                 "call fn(*args, **kwargs) and return what it returns first")
    for x, name in zip(got[1:], ("minor", "major")):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            fail(f"count_faults: the {name} count", "an int >= 0", describe(x),
                 "the difference of two getrusage readings, taken around the call")
    pages = 2048
    result, minor, major = fn(_touch_fresh, pages)
    expect_equal(result, pages, "count_faults(touch 2048 fresh pages): the result")
    if not pages <= minor <= pages + 256:
        fail("count_faults(write one byte to each of 2048 fresh anonymous pages): the minor faults",
             f"about {pages} (one per page, a few more for the interpreter)", f"{minor}",
             "ru_minflt of RUSAGE_SELF after the call minus before it; not RUSAGE_CHILDREN, "
             "not the totals, not ru_majflt")
    if major > 16:
        fail("count_faults(touch fresh anonymous pages): the major faults",
             "0 (anonymous pages are zero-filled, nothing is read from storage)", f"{major}",
             "minor is ru_minflt, major ru_majflt")
    _, minor2, _ = fn(lambda: sum(range(1000)))
    if minor2 > 64:
        fail("count_faults(a call that touches no new memory): the minor faults",
             "close to 0", f"{minor2}", "count only during the call: read getrusage just "
             "before and just after fn runs")
    expect_raises(lambda: fn(42), TypeError, "count_faults(42)", "a TypeError naming fn",
                  "fn must be callable")
    return (f"{minor} minor faults for {pages} fresh pages (one per 4 KiB page), "
            f"{minor2} for a call that allocates nothing")


# --------------------------------------------------------------------------- exercise 5

def _fake_node(root: Path, node: int, cpulist: str, mem_kib: int, distances: list[int],
               meminfo_extra: bool = True) -> None:
    d = root / f"node{node}"
    d.mkdir(parents=True)
    (d / "cpulist").write_text(cpulist + "\n")
    (d / "distance").write_text(" ".join(map(str, distances)) + "\n")
    lines = [f"Node {node} MemTotal:       {mem_kib} kB", f"Node {node} MemFree:        {mem_kib // 2} kB"]
    if meminfo_extra:
        lines.append(f"Node {node} MemUsed:        {mem_kib - mem_kib // 2} kB")
    (d / "meminfo").write_text("\n".join(lines) + "\n")
    (d / "cpu0").mkdir()                                      # folders that are not nodes
    (d / "memory0").mkdir()


_TREES = {
    "one node (this machine's kind)": [(0, "0-1", 24683784, [10])],
    "two sockets, hyperthreads listed as a second range": [
        (0, "0-55,112-167", 1056562000, [10, 21]), (1, "56-111,168-223", 1056999000, [21, 10])],
    "four nodes with a single CPU and a gap": [
        (0, "0-3", 1 << 20, [10, 12, 20, 22]), (1, "4-7", 1 << 20, [12, 10, 22, 20]),
        (2, "8", 1 << 21, [20, 22, 10, 12]), (3, "10-11", 1 << 21, [22, 20, 12, 10])],
    "a memory-only node (CXL or HBM): no CPUs": [
        (0, "0-7", 1 << 24, [10, 14]), (1, "", 1 << 22, [14, 10])],
    "node ids out of order, 10 and 2": [
        (10, "2-3", 4096, [10, 20]), (2, "0-1", 8192, [20, 10])],
}


def _expected(spec):
    out = []
    for node, cpulist, mem, dist in sorted(spec):
        out.append({"id": node, "cpus": hostmem.parse_cpulist(cpulist), "memory": mem * 1024,
                    "distances": list(dist)})
    return out


@exercise
def numa_topology(fn):
    """``fn(root) -> [{"id", "cpus", "memory", "distances"}, ...]`` from a sysfs node folder."""
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, spec) in enumerate(_TREES.items()):
            root = Path(tmp) / f"tree{k}"
            root.mkdir()
            for node, cpulist, mem, dist in spec:
                _fake_node(root, node, cpulist, mem, dist)
            (root / "possible").write_text("0-1\n")
            (root / "power").mkdir()
            got = fn(str(root))
            what = f"numa_topology on {name}"
            expect_type(got, list, what, "a list of dicts, one per node, sorted by id")
            expect_equal(got, _expected(spec), what,
                         "cpus from cpulist ('a-b' ranges inclusive, ',' separated, empty for "
                         "no CPUs); memory = MemTotal in kB x 1024; distances from the distance "
                         "file; only folders named node<N>; sorted by id")
        missing = Path(tmp) / "absent"
        expect_equal(fn(str(missing)), [], "numa_topology of a folder that does not exist",
                     "no node folder (not Linux): return []")
        broken = Path(tmp) / "broken"
        _fake_node(broken, 0, "0-1", 1024, [10])
        (broken / "node0" / "distance").unlink()
        expect_raises(lambda: fn(str(broken)), ValueError, "numa_topology of a node without "
                      "its distance file", "a ValueError naming the missing file",
                      "catch FileNotFoundError and raise ValueError with the path")
        expect_raises(lambda: fn(42), TypeError, "numa_topology(42)", "a TypeError naming root",
                      "root must be a str or a path")
    here = fn(hostmem.NODE_ROOT)
    expect_type(here, list, "numa_topology of this machine")
    n = len(here)
    cpus = sum(len(node["cpus"]) for node in here)
    return (f"{len(_TREES)} fake trees read exactly; this machine: {n} node{'s' if n != 1 else ''}, "
            f"{cpus} CPUs, distances {[node['distances'] for node in here]}")
