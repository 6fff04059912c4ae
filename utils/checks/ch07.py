"""Checkers for lab 07, DGX H100 / HGX.

Oracles: the system registry (``utils.hardware.system``: NVIDIA's DGX user guides,
datasheets and BasePOD reference architecture) and ``networkx``'s max-flow on the box;
nccl-tests' bus-bandwidth definition (``doc/PERFORMANCE.md``: for a ring all-reduce the
bus bandwidth is the bottleneck link's rate); the reference calculations of
``utils.dgx``; and the compute-fabric component counts NVIDIA publishes for the DGX
SuperPOD with DGX H100 and DGX B200 systems.
"""
from __future__ import annotations

import math
import numbers

import networkx as nx

from .. import dgx, hardware, topology
from . import describe, exercise, expect_close, expect_equal, expect_raises, fail

GPUS = [f"GPU{i}" for i in range(8)]
INTERLEAVED = ["GPU0", "GPU4", "GPU1", "GPU5", "GPU2", "GPU6", "GPU3", "GPU7"]


def _number(x, what):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        fail(f"{what} is not a number", "a float", describe(x), "return a plain number")
    return float(x)


def _gbs(x):
    return f"{x / 1e9:.1f} GB/s"


# --------------------------------------------------------------------------- exercise 1

@exercise
def dgx_graph(fn):
    """``fn(system) -> nx.DiGraph``: the box, node for node and edge for edge."""
    rows = []
    for name in hardware.systems():
        spec = hardware.system(name)
        want = dgx.dgx_graph(spec)
        got = fn(spec)
        if not isinstance(got, nx.DiGraph):
            fail(f"dgx_graph({name})", "a networkx.DiGraph", describe(got),
                 "build an nx.DiGraph and add two directed edges per link")
        expect_equal(sorted(map(str, got.nodes)), sorted(want.nodes),
                     what=f"dgx_graph({name}): the nodes",
                     hint="GPU0..7, NIC0..7, PCIe0..3, CPU0, CPU1, NVSwitch, Network")
        for n in want.nodes:
            expect_equal(got.nodes[n].get("kind"), want.nodes[n]["kind"],
                         what=f"dgx_graph({name}): kind of node {n}")
        expect_equal(got.nodes["NVSwitch"].get("chips"), spec.nvswitches,
                     what=f"dgx_graph({name}): NVSwitch chips", hint="spec.nvswitches")
        expect_equal(sorted(got.edges), sorted(want.edges), what=f"dgx_graph({name}): the edges",
                     hint="every link is two directed edges; GPUs i and i+1 (i even) share "
                          "PCIe switch i//2 with their NICs; switches 0-1 under CPU0, 2-3 under "
                          "CPU1; no CPU-CPU edge")
        for e in sorted(want.edges):
            expect_close(_number(got.edges[e].get("capacity"), f"capacity of {e}"),
                         want.edges[e]["capacity"], rtol=1e-12,
                         what=f"dgx_graph({name}): capacity of edge {e}",
                         hint="NVLink: the GPU's link_bandwidth; PCIe: spec.pcie_link; "
                              "NIC to Network: spec.nic_bandwidth (all B/s per direction)")
        flow = nx.maximum_flow_value(got, "GPU0", "GPU1", capacity="capacity")
        if flow < spec.nvlink_bandwidth * (1 - 1e-12):
            fail(f"dgx_graph({name}): networkx max-flow GPU0 -> GPU1",
                 f"at least the NVLink bandwidth {_gbs(spec.nvlink_bandwidth)}", _gbs(flow))
        rows.append(f"{name} {got.number_of_nodes()} nodes, {got.number_of_edges()} edges")
    expect_raises(lambda: fn("DGX-Z"), (KeyError, ValueError), "dgx_graph('DGX-Z')",
                  "the registry's error for an unknown system name",
                  "look the name up with hardware.system(...) when a string is given")
    return "; ".join(rows)


# --------------------------------------------------------------------------- exercise 2

def _ring_cases():
    h100, b200, a100 = (dgx.dgx_graph(n) for n in ("DGX-H100", "DGX-B200", "DGX-A100"))
    pcie5 = topology.pcie_server(2, 4, 0, "PCIe Gen5 x16")
    pcie4 = topology.pcie_server(2, 4, 1, "PCIe Gen4 x16")
    return [("DGX H100, ring 0..7", h100, [GPUS]),
            ("DGX H100, two rings", h100, [GPUS, INTERLEAVED]),
            ("DGX B200, ring 0..7", b200, [GPUS]),
            ("DGX A100, 4 GPUs", a100, [["GPU0", "GPU2", "GPU4", "GPU6"]]),
            ("PCIe Gen5 server, ring 0..7", pcie5, [GPUS]),
            ("PCIe Gen5 server, interleaved ring", pcie5, [INTERLEAVED]),
            ("PCIe Gen5 server, both rings", pcie5, [GPUS, INTERLEAVED]),
            ("PCIe Gen4 server, GPUs and a NIC", pcie4, [["GPU0", "NIC1", "GPU1", "GPU5"]])]


@exercise
def ring_busbw(fn):
    """``fn(graph, rings) -> B/s``: ring all-reduce bus bandwidth from the topology."""
    for what, g, rings in _ring_cases():
        want = dgx.ring_busbw(g, rings)
        got = _number(fn(g, [list(r) for r in rings]), what)
        expect_close(got, want, rtol=1e-9, what=f"{what}: bus bandwidth",
                     hint="each rank sends 2(n-1)/n of S/len(rings) to its successor; route it "
                          "with dgx.fast_route; t = max over edges of load / capacity; busbw = "
                          "S/t x 2(n-1)/n")
    for name in hardware.systems():          # nccl-tests: a ring's busbw is its bottleneck link
        spec = hardware.system(name)
        got = _number(fn(dgx.dgx_graph(spec), [GPUS]), f"{name} ring")
        expect_close(got, spec.nvlink_bandwidth, rtol=1e-9,
                     what=f"{name}: ring busbw against the NVLink bandwidth (nccl-tests)",
                     hint="on a non-blocking NVSwitch every GPU's link carries 2(n-1)/n x S: "
                          "busbw is exactly the link's bandwidth")
    g = dgx.dgx_graph("DGX-H100")
    for bad, why in (([["GPU0", "GPU1", "GPU0"]], "a ring visiting GPU0 twice"),
                     ([GPUS, GPUS[:4]], "two rings over different GPUs"),
                     ([["GPU0"]], "a ring of one GPU"), ([], "no rings"),
                     ([["GPU0", "GPU9"]], "a ring through a node not in the graph")):
        expect_raises(lambda: fn(g, bad), ValueError, f"ring_busbw with {why}",
                      "a ValueError", "check the rings before routing them")
    pcie = topology.pcie_server(2, 4, 0, "PCIe Gen5 x16")
    return (f"DGX H100 {_gbs(fn(g, [GPUS]))}; PCIe-only in order {_gbs(fn(pcie, [GPUS]))}, "
            f"interleaved {_gbs(fn(pcie, [INTERLEAVED]))}")


# --------------------------------------------------------------------------- exercise 3

def _depth(parents, r, n):
    d = 0
    while parents[r] is not None:
        r, d = parents[r], d + 1
        if d > n:
            return None
    return d


@exercise
def double_binary_tree(fn):
    """``fn(n) -> (parents_a, parents_b)``: two binary trees, no rank forwarding to more
    than two children over both."""
    for n in list(range(1, 34)) + [64, 100, 128]:
        got = fn(n)
        if not (isinstance(got, tuple) and len(got) == 2):
            fail(f"double_binary_tree({n})", "a tuple of two parent lists", describe(got))
        children = [0] * n
        for name, parents in zip(("tree A", "tree B"), got):
            where = f"double_binary_tree({n}), {name}"
            if not isinstance(parents, list) or len(parents) != n:
                fail(where, f"a list of {n} parents", describe(parents))
            for r, p in enumerate(parents):
                if p is not None and (isinstance(p, bool) or not isinstance(p, int)
                                      or not 0 <= p < n or p == r):
                    fail(f"{where}: parent of rank {r}", "another rank in 0..n-1 or None",
                         repr(p))
            roots = [r for r, p in enumerate(parents) if p is None]
            if len(roots) != 1:
                fail(f"{where}: roots", "exactly one rank with parent None", f"{roots}")
            kids = [0] * n
            for r, p in enumerate(parents):
                if p is not None:
                    kids[p] += 1
                    children[p] += 1
            if max(kids) > 2:
                fail(f"{where}: a binary tree", "at most 2 children per rank",
                     f"rank {kids.index(max(kids))} has {max(kids)}")
            depths = [_depth(parents, r, n) for r in range(n)]
            if None in depths:
                fail(f"{where}: a tree", "every rank reaches the root",
                     f"rank {depths.index(None)} is on a cycle")
            bound = math.ceil(math.log2(n)) + 1 if n > 1 else 0
            if max(depths) > bound:
                fail(f"{where}: depth", f"at most ceil(log2 n) + 1 = {bound}", f"{max(depths)}",
                     "a balanced binary tree: rank r with lowest set bit b hangs under (r - b) | 2b")
        if max(children) > 2:
            r = children.index(max(children))
            fail(f"double_binary_tree({n}): both trees together",
                 "no rank forwarding to more than 2 children over the two trees",
                 f"rank {r} has {children[r]} children in all",
                 "make the leaves of one tree the interior ranks of the other: mirror "
                 "r -> n-1-r when n is even, shift r -> r+1 when odd")
    expect_raises(lambda: fn(0), ValueError, "double_binary_tree(0)", "a ValueError naming n")
    expect_raises(lambda: fn(8.0), TypeError, "double_binary_tree(8.0)", "a TypeError naming n")
    a, b = fn(8)
    return f"n=8: tree A {a}, tree B {b}"


# --------------------------------------------------------------------------- exercise 4

@exercise
def tree_busbw(fn):
    """``fn(graph, trees, gpus) -> B/s``: tree all-reduce bus bandwidth from the topology."""
    h100, b200 = dgx.dgx_graph("DGX-H100"), dgx.dgx_graph("DGX-B200")
    pcie5 = topology.pcie_server(2, 4, 0, "PCIe Gen5 x16")
    a, b = dgx.double_binary_tree(8)
    a4, b4 = dgx.double_binary_tree(4)
    chain = [None] + list(range(7))
    star = [None] + [0] * 7
    cases = [("DGX H100, double binary tree", h100, [a, b], GPUS),
             ("DGX H100, one binary tree", h100, [a], GPUS),
             ("DGX H100, a chain", h100, [chain], GPUS),
             ("DGX H100, a star", h100, [star], GPUS),
             ("DGX B200, double binary tree", b200, [a, b], GPUS),
             ("DGX H100, 4 GPUs", h100, [a4, b4], ["GPU1", "GPU3", "GPU5", "GPU7"]),
             ("PCIe Gen5 server, double binary tree", pcie5, [a, b], GPUS),
             ("PCIe Gen5 server, interleaved ranks", pcie5, [a, b], INTERLEAVED)]
    for what, g, trees, gpus in cases:
        want = dgx.tree_busbw(g, trees, gpus)
        got = _number(fn(g, [list(t) for t in trees], list(gpus)), what)
        expect_close(got, want, rtol=1e-9, what=f"{what}: bus bandwidth",
                     hint="every tree edge carries S/len(trees) up (reduce) and down "
                          "(broadcast); t = max over edges of load / capacity; busbw = "
                          "S/t x 2(n-1)/n")
    nv = hardware.system("DGX-H100").nvlink_bandwidth
    got = _number(fn(h100, [a, b], GPUS), "double binary tree")
    expect_close(got, 7 / 8 * nv, rtol=1e-9,
                 what="DGX H100 double binary tree against the hand calculation",
                 hint="the busiest GPU sends 2S in all: algbw = B/2, busbw = (n-1)/n x B")
    for bad, why in (([[None, None] + [0] * 6], "a tree with two roots"),
                     ([[None, 2, 1] + [0] * 5], "a tree with a cycle"),
                     ([[None, 0]], "a tree over 2 ranks for 8 GPUs")):
        expect_raises(lambda: fn(h100, bad, GPUS), ValueError, f"tree_busbw with {why}",
                      "a ValueError", "check each parent list: one root, no cycles, n entries")
    return (f"DGX H100 double binary tree {_gbs(got)} (ring: {_gbs(nv)}); "
            f"PCIe-only {_gbs(fn(pcie5, [a, b], GPUS))}")


# --------------------------------------------------------------------------- exercise 5

_PLAN_KEYS = ("nodes_per_rack", "racks", "pdus", "it_power_w", "facility_power_w", "energy_j")


@exercise
def power_plan(fn):
    """``fn(system, nodes, rack_power_w, pdu_w, pue, hours, load=1.0) -> dict``."""
    cases = [("DGX-H100", 127, 41_000, 17_300, 1.25, 720.0, 0.75),
             ("DGX-H100", 32, 21_000, 8_600, 1.1, 24.0, 1.0),
             ("DGX-B200", 5, 30_000, 17_300, 1.4, 1.5, 0.6),
             ("DGX-A100", 140, 42_000, 14_400, 1.58, 2000.0, 0.8),
             ("DGX-H100", 1, 10_200, 11_000, 1.0, 0.0, 1.0)]
    for name, nodes, rack, pdu, pue, hours, load in cases:
        call = f"power_plan({name!r}, {nodes}, {rack}, {pdu}, {pue}, {hours}, load={load})"
        want = dgx.power_plan(name, nodes, rack, pdu, pue, hours, load=load)
        got = fn(name, nodes, rack, pdu, pue, hours, load=load)
        if not isinstance(got, dict):
            fail(call, f"a dict with keys {', '.join(_PLAN_KEYS)}", describe(got))
        for key in _PLAN_KEYS:
            if key not in got:
                fail(call, f"a key {key!r}", f"keys {sorted(got)}")
            if key in ("nodes_per_rack", "racks", "pdus"):
                expect_equal(got[key], want[key], what=f"{call}[{key!r}]",
                             hint="floor(rack budget / system max power) per rack; racks and "
                                  "PDUs rounded up; two feeds, each able to carry the rack")
            else:
                expect_close(_number(got[key], f"{call}[{key!r}]"), want[key], rtol=1e-9,
                             what=f"{call}[{key!r}]",
                             hint="IT power = nodes x max power x load; facility = IT x PUE; "
                                  "energy in joules = facility W x hours x 3600")
    good = dict(nodes=4, rack_power_w=41_000, pdu_w=17_300, pue=1.2, hours=1.0)
    for arg, bad, why in (("nodes", -1, "a negative size"), ("nodes", 0, "no systems"),
                          ("rack_power_w", 5_000, "a rack that cannot hold one system"),
                          ("pue", 0.9, "a PUE below 1"), ("hours", -1.0, "negative hours"),
                          ("pdu_w", 0, "a PDU of 0 W")):
        kw = dict(good, **{arg: bad})
        expect_raises(lambda: fn("DGX-H100", kw["nodes"], kw["rack_power_w"], kw["pdu_w"],
                                 kw["pue"], kw["hours"]), ValueError,
                      f"power_plan with {arg}={bad!r} ({why})", f"a ValueError naming {arg}")
    expect_raises(lambda: fn("DGX-Z", 4, 41_000, 17_300, 1.2, 1.0), (KeyError, ValueError),
                  "power_plan('DGX-Z', ...)", "the registry's error for an unknown system name")
    p = fn("DGX-H100", 127, 41_000, 17_300, 1.25, 720.0, load=0.75)
    return (f"127 DGX H100 at 41 kW racks: {p['racks']} racks, {p['pdus']} PDUs, "
            f"{p['facility_power_w'] / 1e6:.2f} MW facility, "
            f"{p['energy_j'] / 3.6e9:.0f} MWh in 30 days")


# --------------------------------------------------------------------------- exercise 6

@exercise
def fabric_size(fn):
    """``fn(gpus, radix=64, gpus_per_node=8, su_nodes=32, ports_per_transceiver=2) -> dict``."""
    keys = ("nodes", "sus", "endpoints", "tiers", "leaves", "spines", "cores", "switches",
            "total_cables", "transceivers")
    for name, table in dgx.PUBLISHED_FABRIC.items():
        for su, nodes, gpus, leaves, spines, cores, nl, ls, sc in table["rows"]:
            got = fn(gpus)
            if not isinstance(got, dict):
                fail(f"fabric_size({gpus})", "a dict", describe(got))
            for key, want in (("sus", su), ("leaves", leaves), ("spines", spines),
                              ("cores", cores)):
                expect_equal(got.get(key), want,
                             what=f"fabric_size({gpus}) [{key!r}] against {table['source']}",
                             hint="leaves: one per rail per SU; spines: ceil(uplinks / radix), "
                                  "rounded up to a divisor of a leaf's k/2 uplinks; a third tier "
                                  "when more than k leaves")
            cables = got.get("cables", {})
            expect_equal((cables.get("leaf_spine"), cables.get("spine_core")), (ls, sc),
                         what=f"fabric_size({gpus}) leaf-spine and spine-core cables "
                              f"against {table['source']}")
    for args in [(256,), (1016,), (2000, 64, 8, 32, 2), (4096, 64, 8, 32, 1), (64, 8, 8, 4, 2),
                 (10_000, 128, 8, 64, 2), (3000, 40, 8, 20, 2), (24, 64, 4, 16, 2)]:
        want = dgx.fabric_size(*args)
        got = fn(*args)
        for key in keys:
            expect_equal(got.get(key), want[key], what=f"fabric_size{args} [{key!r}]")
        expect_equal(got.get("cables"), want["cables"], what=f"fabric_size{args} ['cables']",
                     hint="node_leaf, leaf_spine, spine_core")
    for args, kind, why in (((256, 63), ValueError, "an odd radix"),
                            ((-8,), ValueError, "a negative size"),
                            ((0,), ValueError, "no GPUs"),
                            ((256.0,), TypeError, "a float GPU count"),
                            ((200_000, 64), ValueError, "more than three tiers hold")):
        expect_raises(lambda: fn(*args), kind, f"fabric_size{args} ({why})",
                      f"a {kind.__name__}")
    f = fn(1016)
    return (f"4 SUs (1016 GPUs): {f['leaves']} leaves, {f['spines']} spines, "
            f"{f['total_cables']} cables, {f['transceivers']} transceivers, as NVIDIA's Table 4")
