"""The lab-07 checkers pass right answers, catch planted bugs and refuse the library's own."""
import math

import networkx as nx
import pytest

from utils import dgx, hardware
from utils.checks import ExerciseFailed, LibraryAnswer
from utils.checks import ch07 as check


# ---------------------------------------------------------------- right answers, written here

def dgx_graph(system, pcie_per_switch=2, cpu_of=None, nic_link=None):
    spec = hardware.system(system) if isinstance(system, str) else system
    g = nx.DiGraph()

    def link(a, b, cap):
        g.add_edge(a, b, capacity=cap)
        g.add_edge(b, a, capacity=cap)

    g.add_node("NVSwitch", kind="nvswitch", chips=spec.nvswitches)
    g.add_node("Network", kind="network")
    for c in range(2):
        g.add_node(f"CPU{c}", kind="cpu")
    pcie = hardware.link(spec.pcie_link).bandwidth
    for s in range(spec.gpus // pcie_per_switch):
        g.add_node(f"PCIe{s}", kind="pcie_switch")
        link(f"PCIe{s}", (cpu_of or (lambda s: f"CPU{s // 2}"))(s), pcie)
    for i in range(spec.gpus):
        g.add_node(f"GPU{i}", kind="gpu")
        g.add_node(f"NIC{i}", kind="nic")
        link(f"GPU{i}", "NVSwitch", spec.gpu_spec.link_bandwidth)
        link(f"GPU{i}", f"PCIe{i // pcie_per_switch}", pcie)
        link(f"NIC{i}", f"PCIe{i // pcie_per_switch}", pcie)
        link(f"NIC{i}", "Network", nic_link or spec.nic_bandwidth)
    return g


def _route(g, s, d):
    return list(zip(*[iter(nx.shortest_path(g, s, d, weight=lambda u, v, e: 1 / e["capacity"]))] * 1))


def _time(g, transfers):
    loads = {}
    for s, d, b in transfers:
        if s not in g or d not in g:
            raise ValueError(f"{s} or {d} is not in the graph")
        nodes = nx.shortest_path(g, s, d, weight=lambda u, v, e: 1 / e["capacity"])
        for e in zip(nodes[:-1], nodes[1:]):
            loads[e] = loads.get(e, 0.0) + b
    return max(v / g.edges[e]["capacity"] for e, v in loads.items())


def ring_busbw(graph, rings, factor=None, split=True):
    if not rings:
        raise ValueError("no rings")
    members = sorted(rings[0])
    for r in rings:
        if len(r) < 2 or len(set(r)) != len(r) or sorted(r) != members:
            raise ValueError("bad ring")
    n, S = len(members), 1.0
    share = S / len(rings) if split else S
    transfers = [(r[i], r[(i + 1) % n], 2 * (n - 1) / n * share) for r in rings for i in range(n)]
    t = _time(graph, transfers)
    return S / t * (factor(n) if factor else 2 * (n - 1) / n)


def double_binary_tree(n):
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError("n must be an int")
    if n < 1:
        raise ValueError("n must be >= 1")

    def parent(r):
        if r == 0:
            return None
        low = r & -r
        up = (r - low) | (2 * low)
        return up if up < n else r - low

    a = [parent(r) for r in range(n)]
    if n % 2 == 0:
        b = [None if a[n - 1 - r] is None else n - 1 - a[n - 1 - r] for r in range(n)]
    else:
        b = [None if a[(r - 1) % n] is None else (a[(r - 1) % n] + 1) % n for r in range(n)]
    return a, b


def _check_tree(parents, n):
    if len(parents) != n or sum(p is None for p in parents) != 1:
        raise ValueError("bad tree")
    for r in range(n):
        x, k = r, 0
        while parents[x] is not None:
            x, k = parents[x], k + 1
            if k > n:
                raise ValueError("cycle")


def tree_busbw(graph, trees, gpus, up_only=False, validate=True):
    n, S = len(gpus), 1.0
    transfers = []
    for parents in trees:
        if validate:
            _check_tree(parents, n)
        for r, p in enumerate(parents):
            if p is not None:
                transfers.append((gpus[r], gpus[p], S / len(trees)))
                if not up_only:
                    transfers.append((gpus[p], gpus[r], S / len(trees)))
    return S / _time(graph, transfers) * 2 * (n - 1) / n


def power_plan(system, nodes, rack_power_w, pdu_w, pue, hours, load=1.0, feeds=2, pue_on=True):
    spec = hardware.system(system)
    if isinstance(nodes, bool) or not isinstance(nodes, int):
        raise TypeError("nodes must be an int")
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    if pue < 1 or hours < 0 or pdu_w <= 0 or not 0 < load <= 1:
        raise ValueError("pue >= 1, hours >= 0, pdu_w > 0, load in (0, 1]")
    p = spec.max_power_watts
    per = int(rack_power_w // p)
    if per < 1:
        raise ValueError("rack_power_w too small for one system")
    racks = math.ceil(nodes / per)
    it = nodes * p * load
    fac = it * pue if pue_on else it
    return {"nodes_per_rack": per, "racks": racks, "pdus": racks * feeds * math.ceil(per * p / pdu_w),
            "it_power_w": it, "facility_power_w": fac, "energy_j": fac * hours * 3600}


def fabric_size(gpus, radix=64, gpus_per_node=8, su_nodes=32, ports_per_transceiver=2,
                round_spines=True, full_su=True):
    for x in (gpus, radix, gpus_per_node, su_nodes, ports_per_transceiver):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError("integers only")
    if gpus < 1 or radix < 2 or radix % 2 or gpus_per_node < 1 or su_nodes < 1:
        raise ValueError("bad size")
    k, half = radix, radix // 2
    nodes = math.ceil(gpus / gpus_per_node)
    sus = math.ceil(nodes / su_nodes)
    endpoints = sus * su_nodes * gpus_per_node if full_su else nodes * gpus_per_node
    leaves = sus * gpus_per_node * math.ceil(su_nodes / half)
    up = leaves * half
    need = math.ceil(up / k)
    spines = need
    if round_spines:
        while spines <= half and half % spines:
            spines += 1
    if spines <= half and leaves <= k and leaves * (half // spines) <= k:
        tiers, cores, sc = 2, 0, 0
    else:
        if endpoints > k ** 3 // 4:
            raise ValueError("more than three tiers")
        tiers, spines = 3, math.ceil(up / half)
        sc = spines * half
        cores = math.ceil(sc / k)
    cables = {"node_leaf": endpoints, "leaf_spine": up, "spine_core": sc}
    total = sum(cables.values())
    return {"nodes": nodes, "sus": sus, "endpoints": endpoints, "tiers": tiers, "leaves": leaves,
            "spines": spines, "cores": cores, "switches": leaves + spines + cores,
            "cables": cables, "total_cables": total,
            "transceivers": math.ceil(2 * total / ports_per_transceiver)}


def test_right_answers_pass(capsys, library_answers_allowed):
    check.dgx_graph(dgx_graph)
    check.ring_busbw(ring_busbw)
    check.double_binary_tree(double_binary_tree)
    check.tree_busbw(tree_busbw)
    check.power_plan(power_plan)
    check.fabric_size(fabric_size)
    check.dgx_graph(dgx.dgx_graph)
    check.ring_busbw(dgx.ring_busbw)
    check.double_binary_tree(dgx.double_binary_tree)
    check.tree_busbw(dgx.tree_busbw)
    check.power_plan(dgx.power_plan)
    check.fabric_size(dgx.fabric_size)
    assert capsys.readouterr().out.count("passed") == 12


@pytest.mark.parametrize("name", ["dgx_graph", "ring_busbw", "double_binary_tree", "tree_busbw",
                                  "power_plan", "fabric_size"])
def test_library_reference_refused(name):
    with pytest.raises(LibraryAnswer):
        getattr(check, name)(getattr(dgx, name))


def _fails(checker, fn, needle=""):
    with pytest.raises(ExerciseFailed) as err:
        checker(fn)
    assert needle in str(err.value), str(err.value)


# ---- planted bugs
def test_graph_bugs():
    _fails(check.dgx_graph, lambda s: dgx_graph(s, pcie_per_switch=4), "nodes")
    _fails(check.dgx_graph, lambda s: dgx_graph(s, cpu_of=lambda s: "CPU0"), "edges")
    _fails(check.dgx_graph, lambda s: dgx_graph(s, nic_link=400e9), "capacity")  # Gb/s as B/s
    _fails(check.dgx_graph, lambda s: dgx_graph(s).to_undirected(), "DiGraph")


def test_ring_bugs():
    _fails(check.ring_busbw, lambda g, r: ring_busbw(g, r, factor=lambda n: 1.0), "bus bandwidth")
    _fails(check.ring_busbw, lambda g, r: ring_busbw(g, r, factor=lambda n: (n - 1) / n))
    _fails(check.ring_busbw, lambda g, r: ring_busbw(g, r, split=False), "two rings")

    def no_validation(g, rings):
        n = len(rings[0]) if rings else 0
        if n < 2:
            return 0.0
        return ring_busbw(g, [r for r in rings if len(set(r)) == len(r)] or rings[:1])
    _fails(check.ring_busbw, no_validation)


def test_tree_construction_bugs():
    _fails(check.double_binary_tree, lambda n: (double_binary_tree(n)[0],) * 2, "both trees")
    _fails(check.double_binary_tree, lambda n: ([None] + list(range(n - 1)),) * 2, "depth")
    _fails(check.double_binary_tree, lambda n: ([None] + [0] * (n - 1),) * 2, "binary")

    def mirror_always(n):                 # for odd n the mirror keeps even ranks interior
        a, _ = double_binary_tree(n)
        return a, [None if a[n - 1 - r] is None else n - 1 - a[n - 1 - r] for r in range(n)]
    _fails(check.double_binary_tree, mirror_always, "both trees")


def test_tree_busbw_bugs():
    _fails(check.tree_busbw, lambda g, t, gp: tree_busbw(g, t, gp, up_only=True), "bus bandwidth")
    _fails(check.tree_busbw, lambda g, t, gp: tree_busbw(g, t[:1], gp))
    _fails(check.tree_busbw, lambda g, t, gp: tree_busbw(g, t, gp, validate=False), "ValueError")


def test_power_bugs():
    _fails(check.power_plan, lambda *a, **k: power_plan(*a, **k, feeds=1), "pdus")
    _fails(check.power_plan, lambda *a, **k: power_plan(*a, **k, pue_on=False), "facility")

    def kwh(*a, **k):
        p = power_plan(*a, **k)
        return p | {"energy_j": p["energy_j"] / 3.6e6}
    _fails(check.power_plan, kwh, "energy_j")

    def no_checks(system, nodes, rack_power_w, pdu_w, pue, hours, load=1.0):
        return power_plan(system, max(nodes, 1), rack_power_w, pdu_w, max(pue, 1), hours, load)
    _fails(check.power_plan, no_checks, "ValueError")


def test_fabric_bugs():
    _fails(check.fabric_size, lambda *a, **k: fabric_size(*a, **k, round_spines=False), "spines")
    _fails(check.fabric_size, lambda *a, **k: fabric_size(*a, **k, full_su=False))

    def odd_ok(gpus, radix=64, *rest):
        return fabric_size(gpus, radix + (radix % 2), *rest)
    _fails(check.fabric_size, odd_ok, "odd radix")
