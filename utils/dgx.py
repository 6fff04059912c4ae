"""A DGX/HGX box as a graph; all-reduce bus bandwidth from a topology; power; SuperPOD sizing.

**The box.** :func:`dgx_graph` draws an 8-GPU DGX from the system registry
(:func:`utils.hardware.system`) as a ``networkx.DiGraph`` in the conventions of
:mod:`utils.topology` (every link two directed edges, ``capacity`` in B/s per direction,
``kind`` on every node): GPUs on one non-blocking NVSwitch fabric (node ``"NVSwitch"``,
whose ``chips`` attribute is the registry's NVSwitch count) at their NVLink bandwidth;
each pair of GPUs and their two compute NICs under a PCIe switch (``"PCIe0"``..), two
switches under each CPU socket; every compute NIC's port into the node ``"Network"``.
The pairing of GPUs and NICs under PCIe switches is the layout NVIDIA documents for the
DGX A100 and the one GPUDirect RDMA wants (each GPU next to its own NIC); the link
between the two CPU sockets is not drawn, since these documents give no bandwidth for it
(GPU-to-GPU traffic takes NVLink).

**All-reduce from a topology.** A schedule is a list of transfers ``(src, dst, bytes)``
that run concurrently and pipelined. Each goes by its fastest path (the least sum of
1/capacity, :func:`fast_route`); a link's load is the bytes of every transfer crossing it;
the schedule lasts ``max over links of load / capacity`` (the pipelined limit: latency and
step overheads ignored, as in the large-message regime nccl-tests' bus bandwidth is meant
for). Then ``algbw = S / t`` and ``busbw = algbw x 2(n-1)/n`` (NVIDIA nccl-tests,
``doc/PERFORMANCE.md``, via :func:`utils.collectives.busbw`).

* A ring all-reduce on ``n`` ranks sends ``2(n-1)/n x S`` bytes from each rank to its
  successor (reduce-scatter then all-gather); with ``k`` rings (NCCL's channels) each
  carries ``S/k``.
* A tree all-reduce reduces up the tree and broadcasts down it, pipelined: ``S`` bytes over
  every tree edge in each direction; with two trees (NCCL's double binary tree, after
  Sanders, Speck and Traeff 2009) each carries ``S/2``. :func:`double_binary_tree` builds
  the pair as NCCL does: a binary tree whose leaves are the odd ranks, and its mirror image
  (``n`` even) or its shift by one (``n`` odd), so that no rank forwards to more than two
  children over both trees.

**Power** (:func:`power_plan`): systems per rack under a rack power budget, racks, PDUs on
two feeds that can each carry the rack alone, IT and facility power (x PUE), and the
energy of a run, from the registry's maximum system power.

**Sizing a cluster** (:func:`fabric_size`): scalable units of ``su_nodes`` systems; a
rail-optimized fat tree of switches of radix ``k`` (``k/2`` ports down, ``k/2`` up):
``rails x ceil(su_nodes / (k/2))`` leaves per SU; two tiers while the spines can take
every leaf uplink, else three; cables per tier and transceivers, held to the
component counts of NVIDIA's DGX SuperPOD reference architectures (:data:`PUBLISHED_FABRIC`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx

from . import collectives, hardware
from .validate import UnknownName, check_int, check_number, check_positive

__all__ = ["SwitchSpec", "SWITCHES", "switch", "SU_NODES", "PUBLISHED_FABRIC", "dgx_graph",
           "fast_route", "link_loads", "schedule_time", "ring_transfers", "ring_busbw",
           "double_binary_tree", "tree_transfers", "tree_busbw", "power_plan",
           "fabric_size"]

SECONDS_PER_HOUR = 3600.0


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class SwitchSpec:
    """A fabric switch: ``ports`` ports of ``port_link`` (a link registry name)."""

    name: str
    ports: int
    port_link: str
    cages: int                               # physical cages (a cage may hold 2 ports)
    source: str

    @property
    def port_bandwidth(self) -> float:
        return hardware.link(self.port_link).bandwidth


SWITCHES = {
    "QM9700": SwitchSpec(
        "QM9700", ports=64, port_link="InfiniBand NDR", cages=32,
        source=("NVIDIA Quantum-2 QM9700/QM9790 1U NDR 400Gb/s InfiniBand switch systems "
                "user manual, 'Specifications': 64 ports of 400 Gb/s in 32 OSFP cages "
                "(two NDR ports per cage); the compute-fabric switch of the DGX SuperPOD "
                "with DGX H100 and DGX B200 reference architectures")),
}

#: DGX systems per scalable unit (SU) of a DGX SuperPOD, by system.
SU_NODES = {
    "DGX-H100": 32,
    "DGX-B200": 32,
}
SU_SOURCE = ("NVIDIA DGX SuperPOD reference architecture featuring DGX H100 systems "
             "(RA-11333-001), 'Key components': 'a modular architecture based on SUs of 32 "
             "DGX H100 systems each'; the DGX B200 reference architecture's component "
             "table (2 SUs = 64 nodes)")

#: Compute-fabric component counts published by NVIDIA, for holding :func:`fabric_size`
#: to them: {system: {"source": ..., "rows": [(SUs, nodes, GPUs, leaves, spines, cores,
#: node-leaf cables, leaf-spine cables, spine-core cables), ...]}}. The DGX H100 rows list
#: 31 nodes per SU (the 32nd slot of each SU's rails goes to the fabric manager, UFM) and
#: count compute-plus-UFM cables; the fabric itself is built for the full 32-node SUs.
PUBLISHED_FABRIC = {
    "DGX-H100": {
        "source": ("NVIDIA DGX SuperPOD reference architecture featuring DGX H100 systems, "
                   "'Network Fabrics', Table 4 'Compute fabric component count'"),
        "rows": [(1, 31, 248, 8, 4, 0, 252, 256, 0),
                 (2, 63, 504, 16, 8, 0, 508, 512, 0),
                 (3, 95, 760, 24, 16, 0, 764, 768, 0),
                 (4, 127, 1016, 32, 16, 0, 1020, 1024, 0)],
    },
    "DGX-B200": {
        "source": ("NVIDIA DGX SuperPOD reference architecture featuring DGX B200 systems, "
                   "'DGX SuperPOD Architecture', table 'Larger DGX SuperPOD component "
                   "counts'"),
        "rows": [(2, 64, 512, 16, 8, 0, 512, 512, 0),
                 (4, 128, 1024, 32, 16, 0, 1024, 1024, 0),
                 (8, 256, 2048, 64, 32, 0, 2048, 2048, 0),
                 (16, 512, 4096, 128, 128, 64, 4096, 4096, 4096),
                 (32, 1024, 8192, 256, 256, 128, 8192, 8192, 8192),
                 (64, 2048, 16384, 512, 512, 256, 16384, 16384, 16384)],
    },
}


def switch(name: str) -> SwitchSpec:
    """The spec of switch ``name`` (e.g. ``"QM9700"``)."""
    if not isinstance(name, str):
        raise TypeError(f"switch name must be a string, got {type(name).__name__} {name!r}")
    for key, spec in SWITCHES.items():
        if key.lower() == name.strip().lower():
            return spec
    raise UnknownName(f"unknown switch name {name!r}; known: {', '.join(SWITCHES)}")


def _system(system) -> hardware.SystemSpec:
    if isinstance(system, hardware.SystemSpec):
        return system
    return hardware.system(system)


# --------------------------------------------------------------------------- the box

def _connect(g: nx.DiGraph, a: str, b: str, capacity: float, name: str) -> None:
    g.add_edge(a, b, capacity=capacity, link=name)
    g.add_edge(b, a, capacity=capacity, link=name)


def dgx_graph(system="DGX-H100", gpus_per_pcie_switch: int = 2) -> nx.DiGraph:
    """The DGX ``system`` (a registry name or a :class:`~utils.hardware.SystemSpec`) as a graph.

    Nodes (``kind``): ``GPU0``.. (gpu), ``NVSwitch`` (nvswitch; ``chips`` = NVSwitch
    count), ``PCIe0``.. (pcie_switch), ``NIC0``.. (nic; NIC *i* sits with GPU *i*),
    ``CPU0``, ``CPU1`` (cpu), ``Network`` (network). Edges, both directions: GPU-NVSwitch
    at the GPU's NVLink bandwidth; GPU-PCIe switch, NIC-PCIe switch and PCIe switch-CPU at
    the system's PCIe link; NIC-Network at the NIC's port bandwidth. The first half of the
    PCIe switches hang off ``CPU0``, the rest off ``CPU1``.
    """
    spec = _system(system)
    per = check_int("gpus_per_pcie_switch", gpus_per_pcie_switch, low=1)
    if spec.gpus % per:
        raise ValueError(f"gpus_per_pcie_switch must divide the {spec.gpus} GPUs of "
                         f"{spec.name}, got {per}")
    switches = spec.gpus // per
    if spec.compute_nics != spec.gpus:
        raise ValueError(f"{spec.name} has {spec.compute_nics} compute NICs for {spec.gpus} "
                         "GPUs; dgx_graph draws one NIC per GPU")
    gpu = spec.gpu_spec
    pcie = hardware.link(spec.pcie_link)
    g = nx.DiGraph(name=f"{spec.name}: {spec.gpus} GPUs, {spec.nvswitches} NVSwitch chips")
    g.add_node("NVSwitch", kind="nvswitch", chips=spec.nvswitches)
    g.add_node("Network", kind="network")
    for c in range(spec.cpus):
        g.add_node(f"CPU{c}", kind="cpu")
    for s in range(switches):
        g.add_node(f"PCIe{s}", kind="pcie_switch")
        _connect(g, f"PCIe{s}", f"CPU{s * spec.cpus // switches}", pcie.bandwidth, pcie.name)
    for i in range(spec.gpus):
        g.add_node(f"GPU{i}", kind="gpu")
        g.add_node(f"NIC{i}", kind="nic")
        _connect(g, f"GPU{i}", "NVSwitch", gpu.link_bandwidth, gpu.link_name)
        _connect(g, f"GPU{i}", f"PCIe{i // per}", pcie.bandwidth, pcie.name)
        _connect(g, f"NIC{i}", f"PCIe{i // per}", pcie.bandwidth, pcie.name)
        _connect(g, f"NIC{i}", "Network", spec.nic_bandwidth, spec.compute_nic_link)
    return g


def _check_graph(graph) -> nx.DiGraph:
    if not isinstance(graph, nx.DiGraph):
        raise TypeError(f"graph must be a networkx.DiGraph, got {type(graph).__name__}")
    return graph


def fast_route(graph, src, dst) -> list[tuple]:
    """The directed edges of the fastest path ``src`` -> ``dst``: least sum of 1/capacity.

    On a DGX graph two GPUs are two hops apart both through the NVSwitch and through a
    shared PCIe switch; the fastest path takes NVLink.
    """
    graph = _check_graph(graph)
    for what, node in (("src", src), ("dst", dst)):
        if node not in graph:
            raise ValueError(f"{what} {node!r} is not a node of the graph")
    if src == dst:
        raise ValueError(f"src and dst must differ, both are {src!r}")
    try:
        nodes = nx.shortest_path(graph, src, dst, weight=lambda u, v, d: 1.0 / d["capacity"])
    except nx.NetworkXNoPath:
        raise ValueError(f"no path from {src!r} to {dst!r}") from None
    return list(zip(nodes[:-1], nodes[1:]))


def link_loads(graph, transfers) -> dict[tuple, float]:
    """Bytes crossing each directed edge when ``transfers`` [(src, dst, bytes)] all run.

    Keys in sorted order; only edges that carry something appear.
    """
    graph = _check_graph(graph)
    if isinstance(transfers, (str, bytes)) or not isinstance(transfers, Sequence) or not transfers:
        raise ValueError("transfers must be a non-empty sequence of (src, dst, bytes)")
    loads: dict[tuple, float] = {}
    for i, t in enumerate(transfers):
        if not (isinstance(t, (tuple, list)) and len(t) == 3):
            raise ValueError(f"transfers[{i}] must be (src, dst, bytes), got {t!r}")
        src, dst, nbytes = t
        nbytes = check_number(f"transfers[{i}] bytes", nbytes, nonnegative=True)
        for e in fast_route(graph, src, dst):
            loads[e] = loads.get(e, 0.0) + float(nbytes)
    return dict(sorted(loads.items()))


def schedule_time(graph, transfers) -> float:
    """Seconds for concurrent, pipelined ``transfers``: max over edges of load / capacity."""
    loads = link_loads(graph, transfers)
    return max(load / graph.edges[e]["capacity"] for e, load in loads.items())


def _check_ranks(name, order) -> list:
    if isinstance(order, (str, bytes)) or not isinstance(order, Sequence):
        raise TypeError(f"{name} must be a sequence of node names, got {type(order).__name__}")
    if len(order) < 2:
        raise ValueError(f"{name} needs at least 2 ranks, got {len(order)}")
    if len(set(order)) != len(order):
        raise ValueError(f"{name} visits a node twice: {list(order)}")
    return list(order)


def ring_transfers(order, nbytes: float) -> list[tuple]:
    """A ring all-reduce of ``nbytes`` over ``order``: each rank to its successor,
    ``2(n-1)/n x nbytes`` bytes."""
    order = _check_ranks("order", order)
    nbytes = check_number("nbytes", nbytes, positive=True)
    n = len(order)
    return [(order[i], order[(i + 1) % n], 2 * (n - 1) / n * nbytes) for i in range(n)]


_PROBE = 1e9   # bytes: the bandwidth model is linear, any size gives the same busbw


def ring_busbw(graph, rings) -> float:
    """nccl-tests all-reduce bus bandwidth (B/s) of ``rings`` (orders of the same nodes)
    sharing the data equally, on ``graph``."""
    graph = _check_graph(graph)
    if isinstance(rings, (str, bytes)) or not isinstance(rings, Sequence) or not rings:
        raise ValueError("rings must be a non-empty list of rings (each a list of nodes)")
    rings = [_check_ranks(f"rings[{i}]", r) for i, r in enumerate(rings)]
    members = sorted(map(str, rings[0]))
    for i, r in enumerate(rings):
        if sorted(map(str, r)) != members:
            raise ValueError(f"rings[{i}] does not visit the same nodes as rings[0]")
    transfers = [t for r in rings for t in ring_transfers(r, _PROBE / len(rings))]
    t = schedule_time(graph, transfers)
    return collectives.busbw("all_reduce", _PROBE, t, len(members))


def double_binary_tree(n: int) -> tuple[list, list]:
    """NCCL's two binary trees over ranks ``0..n-1``: ``(parents_a, parents_b)``.

    ``parents[r]`` is the parent rank of ``r``, ``None`` for the root. Tree A: rank 0 is
    the root; rank ``r`` with lowest set bit ``b`` hangs under ``(r - b) | 2b`` (bitwise
    or; ``r - b`` when that is out of range), so every odd rank is a leaf. Tree B is A mirrored
    (``r -> n-1-r``) when ``n`` is even, shifted by one (``r -> r+1 mod n``) when odd.
    """
    n = check_int("n", n, low=1)

    def parent(r):
        if r == 0:
            return None
        low = r & -r
        up = (r ^ low) | (low << 1)
        return up if up < n else r ^ low

    a = [parent(r) for r in range(n)]
    if n % 2 == 0:
        b = [None if a[n - 1 - r] is None else n - 1 - a[n - 1 - r] for r in range(n)]
    else:
        b = [None if a[(r - 1) % n] is None else (a[(r - 1) % n] + 1) % n for r in range(n)]
    return a, b


def _check_tree(name, parents, n) -> list:
    if isinstance(parents, (str, bytes)) or not isinstance(parents, Sequence):
        raise TypeError(f"{name} must be a list of parent ranks, got {type(parents).__name__}")
    if len(parents) != n:
        raise ValueError(f"{name} has {len(parents)} entries for {n} ranks")
    roots = [r for r, p in enumerate(parents) if p is None]
    if len(roots) != 1:
        raise ValueError(f"{name} must have exactly one root (parent None), has {len(roots)}")
    for r, p in enumerate(parents):
        if p is not None and (isinstance(p, bool) or not isinstance(p, int)
                              or not 0 <= p < n or p == r):
            raise ValueError(f"{name}[{r}] = {p!r} is not another rank in 0..{n - 1}")
    for r in range(n):                       # every rank reaches the root: no cycles
        seen, x = set(), r
        while parents[x] is not None:
            if x in seen:
                raise ValueError(f"{name} has a cycle through rank {x}")
            seen.add(x)
            x = parents[x]
    return list(parents)


def tree_transfers(parents, gpus, nbytes: float) -> list[tuple]:
    """A pipelined tree all-reduce of ``nbytes``: up every edge (reduce) and down it
    (broadcast), ``nbytes`` each way. ``gpus[r]`` is rank ``r``'s node."""
    gpus = _check_ranks("gpus", gpus)
    parents = _check_tree("parents", parents, len(gpus))
    nbytes = check_number("nbytes", nbytes, positive=True)
    out = []
    for r, p in enumerate(parents):
        if p is not None:
            out.append((gpus[r], gpus[p], nbytes))
            out.append((gpus[p], gpus[r], nbytes))
    return out


def tree_busbw(graph, trees, gpus) -> float:
    """nccl-tests all-reduce bus bandwidth (B/s) of ``trees`` (parent lists over the ranks
    of ``gpus``) sharing the data equally, on ``graph``."""
    graph = _check_graph(graph)
    gpus = _check_ranks("gpus", gpus)
    if isinstance(trees, (str, bytes)) or not isinstance(trees, Sequence) or not trees:
        raise ValueError("trees must be a non-empty list of parent lists")
    transfers = [t for tree in trees for t in tree_transfers(tree, gpus, _PROBE / len(trees))]
    t = schedule_time(graph, transfers)
    return collectives.busbw("all_reduce", _PROBE, t, len(gpus))


# --------------------------------------------------------------------------- power

def power_plan(system, nodes: int, rack_power_w: float, pdu_w: float, pue: float,
               hours: float, load: float = 1.0) -> dict:
    """Racks, PDUs, power and energy for ``nodes`` systems running ``hours``.

    * ``nodes_per_rack`` = floor(``rack_power_w`` / the system's maximum power);
      ``racks`` = ceil(nodes / nodes_per_rack);
    * ``pdus`` = racks x 2 x ceil(nodes_per_rack x max power / ``pdu_w``): two feeds (A and
      B), each able to carry the full rack alone;
    * ``it_power_w`` = nodes x max power x ``load`` (the average fraction of maximum drawn);
      ``facility_power_w`` = IT x ``pue``; ``energy_j`` = facility x hours x 3600.

    ``pdu_w`` is one PDU's usable rating (e.g. a three-phase 208 V 60 A PDU derated to 80%
    for continuous load: 208 x 60 x sqrt(3) x 0.8 = 17.3 kW).
    """
    spec = _system(system)
    nodes = check_int("nodes", nodes, low=1)
    rack_power_w = check_positive("rack_power_w", rack_power_w)
    pue = check_number("pue", pue, low=1.0)
    hours = check_number("hours", hours, nonnegative=True)
    load = check_number("load", load, positive=True, high=1.0)
    pdu_w = check_positive("pdu_w", pdu_w)
    p = spec.max_power_watts
    per_rack = int(rack_power_w // p)
    if per_rack < 1:
        raise ValueError(f"rack_power_w = {rack_power_w:g} W cannot hold one {spec.name} "
                         f"({p:g} W maximum)")
    racks = -(-nodes // per_rack)
    it = nodes * p * load
    return {"nodes_per_rack": per_rack, "racks": racks,
            "pdus": racks * 2 * math.ceil(per_rack * p / pdu_w),
            "it_power_w": it, "facility_power_w": it * pue,
            "energy_j": it * pue * hours * SECONDS_PER_HOUR}


# --------------------------------------------------------------------------- cluster sizing

def fabric_size(gpus: int, radix: int = 64, gpus_per_node: int = 8, su_nodes: int = 32,
                ports_per_transceiver: int = 2) -> dict:
    """Switches, cables and transceivers of a rail-optimized, non-blocking fat tree.

    ``nodes`` = ceil(gpus / gpus_per_node); ``sus`` = ceil(nodes / su_nodes); the fabric
    is built for full SUs: ``endpoints`` = sus x su_nodes x gpus_per_node NIC ports, one
    rail per GPU position. A switch of ``radix`` k has k/2 ports down and k/2 up.

    * ``leaves`` = sus x gpus_per_node x ceil(su_nodes / (k/2));
      each leaf has ``u`` = k/2 uplinks.
    * Two tiers when ``leaves x u`` uplinks fit on spines whose ports each leaf's uplinks
      spread over evenly: ``spines`` = the smallest divisor of u that is at least
      ceil(leaves x u / k), and at most k leaves. Else three tiers: ``spines`` =
      leaves x u / (k/2) (k/2 down, k/2 up each), ``cores`` = spines x (k/2) / k.
    * Cables: node-leaf = endpoints; leaf-spine = leaves x u; spine-core = spines x k/2
      (three tiers). ``transceivers`` = 2 x cables / ports_per_transceiver (every cable
      optical, each end in a transceiver carrying ``ports_per_transceiver`` links).

    Beyond three tiers (more than k^3/4 endpoints) raises ``ValueError``.
    """
    gpus = check_int("gpus", gpus, low=1)
    k = check_int("radix", radix, low=2)
    if k % 2:
        raise ValueError(f"radix must be even (half the ports down, half up), got {k}")
    gpn = check_int("gpus_per_node", gpus_per_node, low=1)
    su = check_int("su_nodes", su_nodes, low=1)
    ppt = check_int("ports_per_transceiver", ports_per_transceiver, low=1)
    half = k // 2
    nodes = -(-gpus // gpn)
    sus = -(-nodes // su)
    endpoints = sus * su * gpn
    leaves = sus * gpn * -(-su // half)
    u = half
    uplinks = leaves * u
    need = -(-uplinks // k)
    spines = next((d for d in range(need, u + 1) if u % d == 0), None)
    if spines is not None and leaves <= k and leaves * (u // spines) <= k:
        tiers, cores, spine_core = 2, 0, 0
    else:
        if endpoints > k ** 3 // 4:
            raise ValueError(f"{gpus} GPUs need {endpoints} endpoints, more than a three-tier "
                             f"fat tree of radix {k} holds ({k ** 3 // 4})")
        tiers = 3
        spines = -(-uplinks // half)
        spine_core = spines * half
        cores = -(-spine_core // k)
    cables = {"node_leaf": endpoints, "leaf_spine": uplinks, "spine_core": spine_core}
    total = sum(cables.values())
    return {"nodes": nodes, "sus": sus, "endpoints": endpoints, "tiers": tiers,
            "leaves": leaves, "spines": spines, "cores": cores,
            "switches": leaves + spines + cores, "cables": cables, "total_cables": total,
            "transceivers": -(-2 * total // ppt)}
