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
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import networkx as nx

from . import hardware
from .validate import check_int, check_nonnegative, check_number, check_positive

__all__ = ["transfer_time", "pcie_server", "nvswitch_server", "route", "max_min_fair",
           "concurrent_rates", "max_flow"]


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


def max_min_fair(capacities: Mapping, paths: Sequence[Sequence]) -> list[float]:
    """Max-min fair rates (B/s) of transfers following ``paths`` over links of ``capacities``.

    ``capacities`` maps a link (any hashable, e.g. an edge ``(u, v)``) to its capacity in
    B/s; ``paths`` is one sequence of links per transfer. Returns one rate per transfer,
    in order. Progressive filling: all unfrozen transfers rise together; the link whose
    remaining capacity per unfrozen crossing transfer is smallest fills first and freezes
    them.
    """
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
            raise ValueError(f"paths[{i}] is empty: a transfer must cross at least one link")
        for e in p:
            if e not in capacities:
                raise ValueError(f"paths[{i}] crosses link {e!r}, which has no capacity")
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
