"""Checkers for lab 06, PCIe, NVLink, NVSwitch.

Oracles: the link registry in ``utils.hardware`` (PCIe generations from the PCI-SIG base
specifications, NVLink from NVIDIA's architecture whitepapers); the max-min fair
allocation of ``utils.topology`` and ``networkx``'s max-flow on the same graph; for the
measurement, the copy into an already-touched buffer, timed interleaved with the
learner's (disagreements are warnings, never failures).
"""
from __future__ import annotations

import math
import numbers
import time

import torch

from .. import bench, hardware, topology
from . import (describe, exercise, expect_close, expect_equal, expect_raises, fail,
               measurement_warning)

_BAD = [(-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
        ("8", TypeError)]


def _number(x, what):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        fail(f"{what} is not a number", "a float", describe(x), "return a plain number")
    return float(x)


# --------------------------------------------------------------------------- exercise 1

@exercise
def transfer_time(fn):
    """``fn(nbytes, bandwidth, latency=0.0, efficiency=1.0) -> s`` against the model and registry."""
    cases = [(1e9, 25e9, 0.0, 1.0), (0, 25e9, 5e-6, 1.0), (4096, 50e9, 2e-6, 0.9),
             (1 << 30, hardware.link("PCIe Gen4 x16").bandwidth, 1e-5, 0.8)]
    for nbytes, bw, lat, eff in cases:
        call = f"transfer_time({nbytes:g}, {bw:g}, latency={lat:g}, efficiency={eff:g})"
        got = _number(fn(nbytes, bw, latency=lat, efficiency=eff), call)
        expect_close(got, lat + nbytes / (bw * eff), rtol=1e-12, what=call,
                     hint="latency once, then the bytes at the payload rate bandwidth x efficiency")
    got = _number(fn(1e9, 25e9), "transfer_time(1e9, 25e9) with defaults")
    expect_close(got, 0.04, rtol=1e-12, what="transfer_time(1e9, 25e9) with defaults",
                 hint="latency defaults to 0 and efficiency to 1")
    rows = []
    for name in ("PCIe Gen4 x16", "PCIe Gen5 x16", "NVLink 4"):
        bw = hardware.link(name).bandwidth
        got = fn(1 << 30, bw)
        expect_close(got, (1 << 30) / bw, rtol=1e-12, what=f"1 GiB over {name}")
        rows.append(f"1 GiB over {name}: {got * 1e3:.1f} ms")
    good = {"nbytes": 1e6, "bandwidth": 1e9, "latency": 1e-6, "efficiency": 0.9}
    for arg in good:
        for bad, kind in _BAD:
            kw = dict(good, **{arg: bad})
            expect_raises(lambda: fn(kw["nbytes"], kw["bandwidth"], latency=kw["latency"],
                                     efficiency=kw["efficiency"]), kind,
                          f"transfer_time with {arg}={bad!r}", f"a {kind.__name__} naming {arg}",
                          f"check {arg} before using it")
    for arg, bad in (("bandwidth", 0), ("efficiency", 0), ("efficiency", 1.5)):
        kw = dict(good, **{arg: bad})
        expect_raises(lambda: fn(kw["nbytes"], kw["bandwidth"], latency=kw["latency"],
                                 efficiency=kw["efficiency"]), ValueError,
                      f"transfer_time with {arg}={bad!r}", f"a ValueError naming {arg}",
                      "bandwidth must be > 0 and efficiency in (0, 1]")
    return "; ".join(rows)


# --------------------------------------------------------------------------- exercise 2

_GT_S = {1: 2.5e9, 2: 5e9, 3: 8e9, 4: 16e9, 5: 32e9, 6: 64e9}


@exercise
def pcie_bandwidth(fn):
    """``fn(gen, lanes) -> B/s per direction``, x16 held to the registry, scaling with lanes."""
    rows = []
    for gen in range(1, 7):
        x16 = hardware.link(f"PCIe Gen{gen} x16").bandwidth
        for lanes in (1, 2, 4, 8, 16):
            got = _number(fn(gen, lanes), f"pcie_bandwidth({gen}, {lanes})")
            expect_close(got, x16 * lanes / 16, rtol=1e-9, what=f"pcie_bandwidth({gen}, {lanes})",
                         hint="lanes x GT/s x encoding efficiency / 8 bits per byte; Gen1-2 use "
                              "8b/10b, Gen3-5 128b/130b, Gen6 FLIT mode (242 of 256 bytes)")
        raw = _GT_S[gen] * 16 / 8
        rows.append(f"Gen{gen} x16 {got / 1e9:.2f} GB/s ({got / raw:.1%} of the raw bits)")
    for args, kind, what in [((7, 16), ValueError, "gen 7"), ((0, 16), ValueError, "gen 0"),
                             ((4, 3), ValueError, "3 lanes"), ((4, 0), ValueError, "0 lanes"),
                             ((4, 32), ValueError, "32 lanes"), ((4.0, 16), TypeError, "gen 4.0"),
                             (("4", 16), TypeError, "gen '4'"), ((4, 16.0), TypeError, "16.0 lanes")]:
        expect_raises(lambda: fn(*args), kind, f"pcie_bandwidth{args!r}",
                      f"a {kind.__name__} for {what}",
                      "gen is an int 1-6; lanes an int among 1, 2, 4, 8, 16")
    return "; ".join(rows)


# --------------------------------------------------------------------------- exercise 3

def _cases():
    """(name, capacities, paths) cases for max-min fairness, from graphs and by hand."""
    out = []
    g = topology.pcie_server()
    for transfers in ([("GPU0", "GPU4")], [("GPU0", "GPU4"), ("GPU1", "GPU5"), ("GPU2", "GPU3")],
                      [("GPU0", "GPU1"), ("GPU2", "GPU1"), ("GPU3", "GPU1"), ("GPU4", "NIC0")],
                      [("GPU0", "GPU4"), ("GPU5", "GPU1"), ("NIC1", "GPU2")]):
        paths = [topology.route(g, *t) for t in transfers]
        caps = {e: g.edges[e]["capacity"] for e in sorted({e for p in paths for e in p})}
        out.append((f"PCIe server, transfers {transfers}", caps, paths))
    caps = {"a": 10.0, "b": 4.0, "c": 6.0}
    out.append(("links a=10, b=4, c=6; paths [a,b], [a,c], [a]", caps, [["a", "b"], ["a", "c"], ["a"]]))
    out.append(("links a=10, b=4, c=6; paths [b], [b,c], [c], [a]", caps,
                [["b"], ["b", "c"], ["c"], ["a"]]))
    return out


@exercise
def max_min_fair(fn):
    """``fn(capacities, paths) -> [B/s per transfer]``: the max-min fair allocation."""
    for name, caps, paths in _cases():
        want = topology.max_min_fair(caps, paths)
        got = fn(dict(caps), [list(p) for p in paths])
        if not isinstance(got, (list, tuple)) or len(got) != len(paths):
            fail(f"{name}: the rates", f"a list of {len(paths)} rates", describe(got),
                 "one rate per path, in the order of paths")
        expect_close([_number(r, f"{name}: a rate") for r in got], want, rtol=1e-9,
                     what=f"{name}: the max-min fair rates",
                     hint="raise every unfrozen rate together until a link fills; freeze the "
                          "transfers crossing it; repeat with what is left")
        for e, c in caps.items():
            load = sum(r for r, p in zip(got, paths) if e in p)
            if load > c * (1 + 1e-9):
                fail(f"{name}: link {e!r} overloaded", f"at most {c:g}", f"{load:g}")
    g = topology.pcie_server()
    for src, dst in (("GPU0", "GPU4"), ("GPU0", "GPU1"), ("GPU3", "NIC1")):
        path = topology.route(g, src, dst)
        caps = {e: g.edges[e]["capacity"] for e in path}
        got = fn(caps, [path])
        expect_close(got[0], topology.max_flow(g, src, dst), rtol=1e-9,
                     what=f"one transfer {src}->{dst} against networkx max-flow",
                     hint="alone, a transfer gets its path's narrowest link")
    expect_raises(lambda: fn({"a": 1.0}, [[]]), ValueError, "an empty path",
                  "a ValueError naming the empty path", "a transfer crosses at least one link")
    expect_raises(lambda: fn({"a": 1.0}, [["b"]]), ValueError, "a path over an unknown link",
                  "a ValueError naming the link", "every link of a path needs a capacity")
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        expect_raises(lambda: fn({"a": bad}, [["a"]]), ValueError, f"a capacity of {bad!r}",
                      "a ValueError naming the capacity", "capacities are finite and positive")
    return f"{len(_cases())} allocations equal to the reference; single transfers equal networkx max-flow"


# --------------------------------------------------------------------------- exercise 4

def _best(f, repeats):
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


@exercise
def copy_seconds(fn):
    """``fn(src, fresh) -> s``: one copy of ``src`` into a touched or a fresh buffer."""
    src = torch.arange(1000, dtype=torch.float32)
    for fresh in (False, True):
        got = _number(fn(src, fresh), f"copy_seconds(src, fresh={fresh})")
        if not (math.isfinite(got) and got > 0):
            fail(f"copy_seconds(src, fresh={fresh})", "a positive finite time", f"{got!r}")
    expect_raises(lambda: fn([1, 2, 3], False), TypeError, "copy_seconds of a list",
                  "a TypeError naming src", "src must be a torch.Tensor")
    expect_raises(lambda: fn(src, 1), TypeError, "copy_seconds(src, 1)",
                  "a TypeError naming fresh", "fresh must be True or False")
    n = 64 << 20                     # above glibc's largest mmap threshold (32 MiB), even when quick
    big = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty_like(big)
    dst.fill_(0)
    warm = fresh = ref = math.inf
    for _ in range(3 if bench.quick() else 5):       # interleaved: load hits both alike
        ref = min(ref, _best(lambda: dst.copy_(big), 1))
        warm = min(warm, fn(big, False))
        fresh = min(fresh, fn(big, True))
    if warm > 3 * ref:
        measurement_warning(f"copy of {n >> 20} MiB into a touched buffer",
                            f"about {n / ref / 1e9:.1f} GB/s (dst.copy_(src) here)",
                            f"{n / warm / 1e9:.1f} GB/s",
                            "the timed region includes more than the copy, or the machine is busy")
    if fresh < 1.2 * warm:
        measurement_warning(f"first-touch copy of {n >> 20} MiB",
                            "slower than into a touched buffer (a page fault per 4 KiB page)",
                            f"{fresh / warm:.2f}x the touched copy",
                            "huge pages, a caching allocator reusing touched memory, or noise")
    return (f"{n >> 20} MiB: touched {n / warm / 1e9:.1f} GB/s, fresh {n / fresh / 1e9:.1f} GB/s "
            f"({fresh / warm:.1f}x slower)")
