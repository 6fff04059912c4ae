"""Server topologies as graphs, and how concurrent transfers share their links.

A server is a directed graph (``networkx.DiGraph``): nodes are GPUs, PCIe switches, CPU
root complexes, NICs and NVSwitch fabrics; every physical link is two directed edges, one
per direction, each with ``capacity`` = the link's bandwidth per direction in B/s (from
:mod:`utils.hardware`). A transfer ``(src, dst)`` follows the shortest path (in a tree, the
only path).

When several transfers run at once they share the links they cross. The rates they get
are the **max-min fair** allocation (Bertsekas & Gallager, *Data Networks*, 2nd ed.,
section 6.5.2): raise every rate together until some link is full; the transfers crossing
it are frozen at that rate (that link is their *bottleneck*); continue with the rest.
This is what long flows under per-link fair arbitration converge to, and no transfer can
be made faster without slowing one that is already slower.

The oracle for a single transfer is the max-flow of the graph between its ends
(``networkx.maximum_flow_value``): on a tree, the narrowest link of the path.

Functions
    ``transfer_time(nbytes, bandwidth, latency=0, efficiency=1)`` -- seconds for one copy.
    ``pcie_server(...)`` / ``nvswitch_server(...)`` -- example server graphs.
    ``route(graph, src, dst)`` -- the path's edges.
    ``max_min_fair(capacities, paths)`` -- the fair rates.
    ``concurrent_rates(graph, transfers)`` -- rates and the bottleneck edge of each transfer.
    ``max_flow(graph, src, dst)`` -- networkx's max-flow, for comparison.

Cluster fabrics (chapter 08) are graphs of the same kind, returned as a :class:`Fabric`
(the graph, its host and switch counts, and the hosts in order):

    ``fat_tree(k, link, oversubscription)`` -- Al-Fares et al.'s k-ary fat tree.
    ``rail_optimized(nodes, gpus_per_node, link, nvlink, spines, oversubscription)`` and
    ``rail_only(nodes, gpus_per_node, link, nvlink)`` -- GPU servers wired by rails.
    ``fabric(name, **params)`` -- one of those by name (:data:`TOPOLOGIES`).
    ``bisection_bandwidth(fabric)`` -- the max-flow across the cut between its two halves.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx

from . import hardware
from .validate import UnknownName, check_int, check_nonnegative, check_number, check_positive

__all__ = ["transfer_time", "pcie_server", "nvswitch_server", "route", "max_min_fair",
           "concurrent_rates", "max_flow", "Fabric", "TOPOLOGIES", "fat_tree", "rail_optimized",
           "rail_only", "fabric", "bisection_bandwidth", "FAT_TREE_SOURCE", "RAIL_SOURCES"]


def transfer_time(nbytes, bandwidth, latency=0.0, efficiency=1.0) -> float:
    """Seconds to move ``nbytes`` over a link of ``bandwidth`` B/s (per direction).

    ``latency`` (s) is paid once; ``efficiency`` in (0, 1] is the fraction of the link's
    bandwidth left for payload after protocol overhead (packet headers, flow control).
    """
    nbytes = check_nonnegative("nbytes", nbytes)
    bandwidth = check_positive("bandwidth", bandwidth)
    latency = check_nonnegative("latency", latency)
    efficiency = check_number("efficiency", efficiency, positive=True, high=1.0)
    return latency + nbytes / (bandwidth * efficiency)


def _link_capacity(link) -> float:
    if isinstance(link, hardware.LinkSpec):
        return link.bandwidth
    if isinstance(link, str):
        return hardware.link(link).bandwidth
    raise TypeError(f"link must be a registry link name or a LinkSpec, got {type(link).__name__}")


def _connect(g: nx.DiGraph, a: str, b: str, capacity: float, name: str) -> None:
    g.add_edge(a, b, capacity=capacity, link=name)
    g.add_edge(b, a, capacity=capacity, link=name)


def pcie_server(switches: int = 2, gpus_per_switch: int = 4, nics_per_switch: int = 1,
                link="PCIe Gen4 x16", uplink=None) -> nx.DiGraph:
    """One CPU root complex, ``switches`` PCIe switches under it, GPUs and NICs under each.

    Every GPU and NIC hangs off its switch by ``link``; each switch reaches the CPU by
    ``uplink`` (default: the same as ``link``). Nodes: ``"CPU"``, ``"SW0"``..,
    ``"GPU0"``.., ``"NIC0"``.. (GPUs numbered across switches). ``kind`` on every node.
    """
    switches = check_int("switches", switches, low=1)
    gpus_per_switch = check_int("gpus_per_switch", gpus_per_switch, low=1)
    nics_per_switch = check_int("nics_per_switch", nics_per_switch, low=0)
    down = _link_capacity(link)
    up = down if uplink is None else _link_capacity(uplink)
    name_down = link if isinstance(link, str) else link.name
    name_up = name_down if uplink is None else (uplink if isinstance(uplink, str) else uplink.name)
    g = nx.DiGraph(name=f"PCIe server: {switches} switches x {gpus_per_switch} GPUs")
    g.add_node("CPU", kind="cpu")
    gpu = nic = 0
    for s in range(switches):
        sw = f"SW{s}"
        g.add_node(sw, kind="pcie_switch")
        _connect(g, sw, "CPU", up, name_up)
        for _ in range(gpus_per_switch):
            g.add_node(f"GPU{gpu}", kind="gpu")
            _connect(g, f"GPU{gpu}", sw, down, name_down)
            gpu += 1
        for _ in range(nics_per_switch):
            g.add_node(f"NIC{nic}", kind="nic")
            _connect(g, f"NIC{nic}", sw, down, name_down)
            nic += 1
    return g


def nvswitch_server(gpus: int = 8, link="NVLink 4") -> nx.DiGraph:
    """``gpus`` GPUs on one non-blocking NVSwitch fabric (node ``"NVSwitch"``).

    Each GPU's edge carries its total NVLink bandwidth per direction (``link``): the
    fabric itself is modelled as never the bottleneck, as NVIDIA specifies for the HGX
    boards (every GPU can talk to any other at its full NVLink rate).
    """
    gpus = check_int("gpus", gpus, low=2)
    cap = _link_capacity(link)
    name = link if isinstance(link, str) else link.name
    g = nx.DiGraph(name=f"NVSwitch server: {gpus} GPUs")
    g.add_node("NVSwitch", kind="nvswitch")
    for i in range(gpus):
        g.add_node(f"GPU{i}", kind="gpu")
        _connect(g, f"GPU{i}", "NVSwitch", cap, name)
    return g


def _check_graph(graph) -> nx.DiGraph:
    if not isinstance(graph, nx.DiGraph):
        raise TypeError(f"graph must be a networkx.DiGraph, got {type(graph).__name__}")
    return graph


def _check_node(graph, name, node):
    if node not in graph:
        raise ValueError(f"{name} {node!r} is not a node of the graph; nodes: "
                         f"{', '.join(map(str, sorted(graph.nodes, key=str)))}")


def route(graph, src, dst) -> list[tuple]:
    """The directed edges of the shortest path from ``src`` to ``dst`` (fewest hops)."""
    graph = _check_graph(graph)
    _check_node(graph, "src", src)
    _check_node(graph, "dst", dst)
    if src == dst:
        raise ValueError(f"src and dst must differ, both are {src!r}")
    try:
        nodes = nx.shortest_path(graph, src, dst)
    except nx.NetworkXNoPath:
        raise ValueError(f"no path from {src!r} to {dst!r}") from None
    return list(zip(nodes[:-1], nodes[1:]))


def _check_links(capacities, paths, what: str = "transfer") -> None:
    """Links with positive capacities, and one non-empty path of known links per ``what``."""
    if not isinstance(capacities, Mapping):
        raise TypeError(f"capacities must be a mapping link -> B/s, got {type(capacities).__name__}")
    for e, c in capacities.items():
        check_positive(f"capacities[{e!r}]", c)
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        raise TypeError(f"paths must be a sequence of paths, got {type(paths).__name__}")
    for i, p in enumerate(paths):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise TypeError(f"paths[{i}] must be a sequence of links, got {type(p).__name__}")
        if len(p) == 0:
            raise ValueError(f"paths[{i}] is empty: a {what} must cross at least one link")
        for e in p:
            if e not in capacities:
                raise ValueError(f"paths[{i}] crosses link {e!r}, which has no capacity")


def max_min_fair(capacities: Mapping, paths: Sequence[Sequence]) -> list[float]:
    """Max-min fair rates (B/s) of transfers following ``paths`` over links of ``capacities``.

    ``capacities`` maps a link (any hashable, e.g. an edge ``(u, v)``) to its capacity in
    B/s; ``paths`` is one sequence of links per transfer. Returns one rate per transfer,
    in order. Progressive filling: all unfrozen transfers rise together; the link whose
    remaining capacity per unfrozen crossing transfer is smallest fills first and freezes
    them.
    """
    _check_links(capacities, paths)
    rates = [0.0] * len(paths)
    remaining = {e: float(c) for e, c in capacities.items()}
    active = set(range(len(paths)))
    crossing = {e: [i for i, p in enumerate(paths) if e in p] for e in capacities}
    while active:
        # the fair increment each link allows to the active transfers crossing it
        best, share = None, float("inf")
        for e in capacities:                       # capacities' order: deterministic
            users = [i for i in crossing[e] if i in active]
            if users and remaining[e] / len(users) < share:
                best, share = e, remaining[e] / len(users)
        for i in active:
            rates[i] += share
        for e in capacities:
            n = sum(1 for i in crossing[e] if i in active)
            remaining[e] -= share * n
        frozen = {i for e in capacities if remaining[e] <= 1e-9 * capacities[e]
                  for i in crossing[e] if i in active}
        active -= frozen
    return rates


def concurrent_rates(graph, transfers) -> tuple[list[float], list[tuple]]:
    """Rates of concurrent ``transfers`` [(src, dst), ...] over ``graph``, and each one's bottleneck.

    The bottleneck of a transfer is the first link on its path that is full and carries
    no faster transfer (max-min fairness guarantees every transfer has one).
    """
    graph = _check_graph(graph)
    if isinstance(transfers, (str, bytes)) or not isinstance(transfers, Sequence) or not transfers:
        raise ValueError("transfers must be a non-empty sequence of (src, dst) pairs")
    paths = []
    for i, t in enumerate(transfers):
        if not (isinstance(t, (tuple, list)) and len(t) == 2):
            raise ValueError(f"transfers[{i}] must be a (src, dst) pair, got {t!r}")
        paths.append(route(graph, *t))
    caps = {e: graph.edges[e]["capacity"] for e in sorted({e for p in paths for e in p})}
    rates = max_min_fair(caps, paths)
    load = {e: sum(r for r, p in zip(rates, paths) if e in p) for e in caps}
    top = {e: max(r for r, p in zip(rates, paths) if e in p) for e in caps}
    necks = []
    for r, p in zip(rates, paths):
        # full, and no transfer on it is faster than this one: its rate is set here
        full = [e for e in p if load[e] >= caps[e] * (1 - 1e-9) and r >= top[e] * (1 - 1e-9)]
        necks.append(full[0])
    return rates, necks


def max_flow(graph, src, dst) -> float:
    """networkx's maximum flow value (B/s) from ``src`` to ``dst`` over edge capacities."""
    graph = _check_graph(graph)
    _check_node(graph, "src", src)
    _check_node(graph, "dst", dst)
    if src == dst:
        raise ValueError(f"src and dst must differ, both are {src!r}")
    return float(nx.maximum_flow_value(graph, src, dst, capacity="capacity"))


# --------------------------------------------------------------------------- cluster fabrics

FAT_TREE_SOURCE = ("M. Al-Fares, A. Loukissas, A. Vahdat, 'A Scalable, Commodity Data Center "
                   "Network Architecture', SIGCOMM 2008, Section 3.2: k pods of k/2 edge and "
                   "k/2 aggregation switches, (k/2)^2 core switches, k^3/4 hosts, all switches "
                   "with k ports")
RAIL_SOURCES = {
    "rail_optimized": "NVIDIA DGX SuperPOD reference architecture (DGX H100): the i-th NIC of "
                      "every server on leaf switch i (a 'rail'), leaves joined by spines",
    "rail_only": "W. Wang, M. Ghobadi, K. Shakeri, Y. Zhang, N. Hasani, 'Rail-only: A Low-Cost "
                 "High-Performance Network for Training LLMs with Trillion Parameters', "
                 "arXiv:2307.12169v5 (2023): rails without spines, cross-rail traffic over NVLink; "
                 "abstract: network cost 38% to 77% lower than a full-bisection GPU cluster, "
                 "8.2% to 11.2% longer all-to-all completion",
}

#: The fabric builders :func:`fabric` knows by name.
TOPOLOGIES = ("fat_tree", "rail_optimized", "rail_only")


@dataclass(frozen=True)
class Fabric:
    """A cluster network: ``graph`` (a ``networkx.DiGraph`` as everywhere in this module),
    ``hosts`` and ``switches`` (counts), ``host_names`` (the hosts in build order: pod by
    pod, or server by server) and ``name``. Network switches have ``kind`` ``edge``,
    ``agg``, ``core``, ``leaf`` or ``spine``; an in-server NVSwitch (``kind`` ``nvswitch``)
    is part of the server, not counted as a switch."""

    graph: nx.DiGraph
    hosts: int
    switches: int
    host_names: tuple
    name: str


def _link_name(link) -> str:
    return link if isinstance(link, str) else link.name


def _capacity_of(arg: str, link) -> float:
    """``_link_capacity`` with errors that name the argument ``arg``."""
    try:
        return _link_capacity(link)
    except UnknownName as err:
        raise UnknownName(f"{arg}: {err}") from None
    except TypeError as err:
        raise TypeError(f"{arg}: {err}") from None


def fat_tree(k: int = 4, link="InfiniBand NDR", oversubscription: float = 1.0) -> Fabric:
    """Al-Fares et al.'s k-ary fat tree of k-port switches (:data:`FAT_TREE_SOURCE`).

    ``k`` pods; each has ``k/2`` edge switches (``e{pod}.{i}``), each with ``k/2`` hosts
    (``h{pod}.{i}.{j}``), and ``k/2`` aggregation switches (``a{pod}.{i}``), every edge
    switch linked to every aggregation switch of its pod. ``(k/2)^2`` core switches
    (``c{i}.{j}``): aggregation switch ``i`` of every pod links to cores ``c{i}.0 ..
    c{i}.{k/2-1}``. Every link carries ``link`` (a registry name or LinkSpec) per
    direction, except the aggregation-core links, which carry ``link / oversubscription``:
    ``oversubscription = 7`` is the 1:7 ratio between what a pod's hosts can send and what
    leaves the pod. ``k`` must be an even int >= 2.
    """
    k = check_int("k", k, low=2)
    if k % 2:
        raise ValueError(f"k (the switch radix) must be even, got {k}: each switch splits its "
                         "k ports half down, half up")
    bw = _capacity_of("link", link)
    oversubscription = check_positive("oversubscription", oversubscription)
    name = _link_name(link)
    half = k // 2
    g = nx.DiGraph(name=f"{k}-ary fat tree ({name}, 1:{oversubscription:g} above the pods)")
    hosts = []
    for i in range(half):
        for j in range(half):
            g.add_node(f"c{i}.{j}", kind="core", pod=None)
    for p in range(k):
        for i in range(half):
            g.add_node(f"a{p}.{i}", kind="agg", pod=p)
            for j in range(half):
                _connect(g, f"a{p}.{i}", f"c{i}.{j}", bw / oversubscription, name)
        for i in range(half):
            edge = f"e{p}.{i}"
            g.add_node(edge, kind="edge", pod=p)
            for a in range(half):
                _connect(g, edge, f"a{p}.{a}", bw, name)
            for j in range(half):
                host = f"h{p}.{i}.{j}"
                g.add_node(host, kind="host", pod=p)
                _connect(g, host, edge, bw, name)
                hosts.append(host)
    return Fabric(g, len(hosts), g.number_of_nodes() - len(hosts), tuple(hosts), g.graph["name"])


def _rails(nodes, gpus_per_node, link, nvlink, spines, oversubscription, kind):
    nodes = check_int("nodes", nodes, low=1)
    gpus_per_node = check_int("gpus_per_node", gpus_per_node, low=1)
    bw, nv = _capacity_of("link", link), _capacity_of("nvlink", nvlink)
    name, nv_name = _link_name(link), _link_name(nvlink)
    g = nx.DiGraph(name=f"{kind.replace('_', '-')}: {nodes} servers x {gpus_per_node} GPUs "
                        f"({name})" + (f", {spines} spines, 1:{oversubscription:g}" if spines else ""))
    hosts = []
    for r in range(gpus_per_node):
        g.add_node(f"rail{r}", kind="leaf", pod=None)
    for s in range(spines):
        g.add_node(f"spine{s}", kind="spine", pod=None)
        for r in range(gpus_per_node):
            # each leaf's uplinks carry what its servers can send, over the oversubscription
            _connect(g, f"rail{r}", f"spine{s}", nodes * bw / (spines * oversubscription), name)
    for n in range(nodes):
        nvs = f"nvs{n}"
        g.add_node(nvs, kind="nvswitch", pod=n)
        for r in range(gpus_per_node):
            gpu = f"g{n}.{r}"
            g.add_node(gpu, kind="host", pod=n)
            _connect(g, gpu, nvs, nv, nv_name)
            _connect(g, gpu, f"rail{r}", bw, name)
            hosts.append(gpu)
    return Fabric(g, len(hosts), gpus_per_node + spines, tuple(hosts), g.graph["name"])


def rail_optimized(nodes: int = 4, gpus_per_node: int = 8, link="InfiniBand NDR",
                   nvlink="NVLink 4", spines: int = 2, oversubscription: float = 1.0) -> Fabric:
    """Servers of ``gpus_per_node`` GPUs wired by rails (:data:`RAIL_SOURCES`).

    GPU ``r`` of server ``n`` (``g{n}.{r}``) has its own NIC (``link``) to leaf switch
    ``rail{r}``, and its NVLink (``nvlink``, per direction) to its server's NVSwitch
    ``nvs{n}``. Every leaf links to each of ``spines`` spine switches (``spine{s}``); each
    such link carries ``nodes * link / (spines * oversubscription)``, so with
    ``oversubscription = 1`` a leaf can forward upward all that its GPUs send. Same-rail
    traffic crosses one switch; cross-rail traffic goes up to a spine, or over NVLink to
    the GPU on the right rail first (both are 4 hops: shortest-path routing picks one).
    """
    spines = check_int("spines", spines, low=1)
    oversubscription = check_positive("oversubscription", oversubscription)
    return _rails(nodes, gpus_per_node, link, nvlink, spines, oversubscription, "rail_optimized")


def rail_only(nodes: int = 4, gpus_per_node: int = 8, link="InfiniBand NDR",
              nvlink="NVLink 4") -> Fabric:
    """:func:`rail_optimized` without spines: a GPU reaches another rail only through its
    server's NVSwitch (Wang et al. 2023, :data:`RAIL_SOURCES`)."""
    return _rails(nodes, gpus_per_node, link, nvlink, 0, 1.0, "rail_only")


_BUILDERS = {"fat_tree": fat_tree, "rail_optimized": rail_optimized, "rail_only": rail_only}


def fabric(name: str, **params) -> Fabric:
    """The fabric :data:`TOPOLOGIES` calls ``name``, built with ``params``.

    ``fabric("fat_tree", k=8)`` is ``fat_tree(k=8)``. An unknown name raises
    :class:`~utils.validate.UnknownName` (a ValueError and a KeyError) listing the known ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"name (a topology name) must be a string, got {type(name).__name__} "
                        f"{name!r}")
    if name not in _BUILDERS:
        raise UnknownName(f"unknown topology name {name!r}; known: {', '.join(TOPOLOGIES)}")
    return _BUILDERS[name](**params)


def bisection_bandwidth(fabric: Fabric) -> float:
    """B/s that the first half of ``fabric.host_names`` can send to the second half at once.

    The max-flow from a super-source feeding the first half to a super-sink draining the
    second (networkx), i.e. the capacity of the narrowest cut between the halves. For a fat
    tree the halves are the first and last ``k/2`` pods, the cut Al-Fares et al. use; a
    non-blocking fabric gives ``hosts/2`` times a host's link.
    """
    if not isinstance(fabric, Fabric):
        raise TypeError(f"fabric must be a topology.Fabric (from fat_tree, rail_optimized, ...), "
                        f"got {type(fabric).__name__}")
    names = fabric.host_names
    if len(names) < 2:
        raise ValueError(f"fabric must have at least 2 hosts to cut in half, has {len(names)}")
    h = fabric.graph.copy()
    half = len(names) // 2
    for host in names[:half]:
        h.add_edge("__source__", host, capacity=math.inf)
    for host in names[half:2 * half]:
        h.add_edge(host, "__sink__", capacity=math.inf)
    return float(nx.maximum_flow_value(h, "__source__", "__sink__", capacity="capacity"))
