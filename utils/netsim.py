"""Flow-level simulation of a cluster network, ECMP hashing, and a throttled rank.

Chapter 08 asks what a fabric does to a collective. This module answers at the level of
*flows*, not packets: every flow follows a path of directed links (``(u, v)`` edges of a
:mod:`utils.topology` graph, ``capacity`` in B/s); the flows alive at a moment share links
**max-min fairly** (:func:`utils.topology.max_min_fair`, here vectorised); a flow ends when
its bytes are through, and the others speed up. That is how long flows behave under fair
per-link arbitration, and how the simulators used to design fabrics model them.

Functions
    ``simulate_flows(capacities, paths, sizes)`` -- finish time of each flow.
    ``ecmp_paths(graph, src, dst)`` -- every shortest path, in a fixed order.
    ``ecmp_hash(src, dst, flow, seed)`` -- a switch's hash of a flow's header fields.
    ``pair_bandwidths(graph, pairs, nbytes, flows_per_pair, seed)`` -- each pair's
    effective B/s when its bytes are split over ECMP-hashed flows.
    ``ring_allreduce_time(graph, ring, nbytes, alpha, flows_per_pair, seed)`` -- a ring
    all-reduce over the fabric, step by step.
    ``PacedLink`` / ``ring_all_reduce`` -- real ``torch.distributed`` sends with one rank's
    traffic paced to a low rate, and a ring all-reduce built on them (the slow-link hunt).

ECMP (equal-cost multi-path): a switch with several equal next hops picks one per flow by
hashing header fields (for RoCEv2, the UDP/IP five-tuple), so a flow never reorders but
two fat flows can land on one link while another idles. Meta's Llama 3 cluster opens 16
flows between two GPUs and hashes on more RoCE header fields to spread them ("The Llama 3
Herd of Models", 2024, Section 3.3.1, Load balancing).
"""
from __future__ import annotations

import math
import time
import hashlib
from collections.abc import Mapping, Sequence

import networkx as nx
import numpy as np

from . import topology
from .validate import check_int, check_nonnegative, check_number, check_positive

__all__ = ["simulate_flows", "ecmp_paths", "ecmp_hash", "pair_bandwidths",
           "ring_allreduce_time", "PacedLink", "ring_all_reduce", "LLAMA3_NETWORK"]

#: Meta's RoCE cluster for Llama 3 as the paper states it (Section 3.3.1, "Network topology"
#: and "Load balancing"), with the link rate of Section 3.3.1 ("Network": 400 Gbps between GPUs).
LLAMA3_NETWORK = {
    "gpus_per_rack": 16,           # two servers of 8 GPUs under one Minipack2 ToR switch
    "racks_per_pod": 192,          # joined by Cluster Switches, full bisection bandwidth
    "gpus_per_pod": 3072,
    "pods": 8,                     # joined by Aggregation Switches
    "cluster_gpus": "24K",         # the paper's figure; 8 x 3,072 = 24,576
    "oversubscription": 7,         # "an oversubscription ratio of 1:7" at the aggregation layer
    "flows_per_gpu_pair": 16,      # the collective library's flows between two GPUs
    "link_bps": 400e9,             # "400 Gbps interconnects between GPUs"
    "pretraining_gpus": "16K",     # "only up to 16K of these 24K GPUs" (footnote)
    "source": "A. Grattafiori et al. (Llama Team, AI @ Meta), 'The Llama 3 Herd of Models', "
              "arXiv:2407.21783 (2024), Section 3.3.1, Network; Network topology; Load "
              "balancing; Congestion control",
}


# --------------------------------------------------------------------------- validation

def _check_links(capacities, paths):
    if isinstance(capacities, Mapping) and not capacities:
        raise TypeError("capacities must be a non-empty mapping link -> B/s, got an empty one")
    topology._check_links(capacities, paths, what="flow")


def _check_graph(graph):
    if not isinstance(graph, nx.DiGraph):
        raise TypeError(f"graph must be a networkx.DiGraph, got {type(graph).__name__}")
    return graph


def _check_host(graph, name, node):
    if node not in graph:
        raise ValueError(f"{name} {node!r} is not a node of the graph")


# --------------------------------------------------------------------------- max-min, vectorised

def _fair(cap: np.ndarray, use: np.ndarray) -> np.ndarray:
    """Max-min fair rates: ``cap`` (links,), ``use`` (flows, links) bool incidence."""
    rates = np.zeros(use.shape[0])
    active = np.ones(use.shape[0], dtype=bool)
    left = cap.astype(float).copy()
    while active.any():
        users = use[active].sum(axis=0)
        busy = users > 0
        share = np.min(left[busy] / users[busy])
        rates[active] += share
        left -= share * users
        full = busy & (left <= 1e-9 * cap)
        active &= ~use[:, full].any(axis=1)
    return rates


def simulate_flows(capacities, paths, sizes) -> list[float]:
    """Finish time (s) of each flow, all starting at 0, sharing links max-min fairly.

    ``capacities``: link -> B/s; ``paths``: one non-empty sequence of links per flow;
    ``sizes``: bytes per flow (finite, >= 0; a 0-byte flow finishes at 0). Event by
    event: the fair rates of the flows still running hold until the next one finishes;
    then the rates are computed again for the rest.
    """
    _check_links(capacities, paths)
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"sizes must be a sequence of byte counts, got {type(sizes).__name__}")
    if len(sizes) != len(paths):
        raise ValueError(f"sizes has {len(sizes)} entries but paths has {len(paths)}: one size "
                         "per flow")
    left = np.array([check_nonnegative(f"sizes[{i}]", s) for i, s in enumerate(sizes)],
                    dtype=float)
    links = list(capacities)
    index = {e: j for j, e in enumerate(links)}
    cap = np.array([float(capacities[e]) for e in links])
    use = np.zeros((len(paths), len(links)), dtype=bool)
    for i, p in enumerate(paths):
        use[i, [index[e] for e in p]] = True
    finish = np.zeros(len(paths))
    running = left > 0
    now = 0.0
    tol = 1e-12 * np.maximum(left, 1.0)
    while running.any():
        rates = np.zeros(len(paths))
        rates[running] = _fair(cap, use[running])
        dt = np.min(left[running] / rates[running])
        now += dt
        left[running] -= rates[running] * dt
        done = running & (left <= tol + 1e-9 * rates * dt)
        finish[done] = now
        left[done] = 0.0
        running &= ~done
    return finish.tolist()


# --------------------------------------------------------------------------- ECMP

def ecmp_paths(graph, src, dst) -> list[list[tuple]]:
    """Every shortest path from ``src`` to ``dst`` as a list of directed edges, sorted.

    The sorted order stands for the switches' port numbering: :func:`ecmp_hash` picks an
    index into it. On a k-ary fat tree, hosts in different pods have ``(k/2)^2`` of them.
    """
    graph = _check_graph(graph)
    _check_host(graph, "src", src)
    _check_host(graph, "dst", dst)
    if src == dst:
        raise ValueError(f"src and dst must differ, both are {src!r}")
    try:
        nodes = sorted(nx.all_shortest_paths(graph, src, dst), key=lambda p: [str(n) for n in p])
    except nx.NetworkXNoPath:
        raise ValueError(f"no path from {src!r} to {dst!r}") from None
    return [list(zip(p[:-1], p[1:])) for p in nodes]


def ecmp_hash(src, dst, flow: int, seed: int = 0) -> int:
    """A 32-bit hash of a flow's header fields (``src``, ``dst``, ``flow`` id) and a ``seed``.

    Switches hash the five-tuple (CRC-based functions with per-switch seeds); ``flow``
    plays the part of the source port or queue pair number that differs between the flows
    of one GPU pair, ``seed`` the hash seed. Here the hash is BLAKE2b, well mixed in every
    bit, so a flow's path is as good as uniformly random and independent of the others'
    (a plain CRC-32 of such similar keys is linear in their bits: its low bits repeat in
    patterns). Deterministic across runs and machines.
    """
    flow = check_int("flow", flow, low=0)
    seed = check_int("seed", seed, low=0)
    key = f"{src}|{dst}|{flow}|{seed}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


def _flows(graph, pairs, flows_per_pair, seed):
    paths, owner = [], []
    for i, (s, d) in enumerate(pairs):
        options = ecmp_paths(graph, s, d)
        for f in range(flows_per_pair):
            paths.append(options[ecmp_hash(s, d, f, seed) % len(options)])
            owner.append(i)
    return paths, owner


def _check_pairs(graph, pairs, name="pairs"):
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(f"{name} must be a non-empty sequence of (src, dst) host pairs")
    for i, t in enumerate(pairs):
        if not (isinstance(t, (tuple, list)) and len(t) == 2):
            raise ValueError(f"{name}[{i}] must be a (src, dst) pair, got {t!r}")
        for node in t:
            _check_host(graph, f"{name}[{i}]", node)
        if t[0] == t[1]:
            raise ValueError(f"{name}[{i}] sends from {t[0]!r} to itself")
    return [tuple(t) for t in pairs]


def pair_bandwidths(graph, pairs, nbytes: float, flows_per_pair: int = 1,
                    seed: int = 0) -> list[float]:
    """Effective B/s of each pair when all pairs send ``nbytes`` at once.

    Each pair's bytes are split evenly over ``flows_per_pair`` flows; each flow takes the
    ECMP path :func:`ecmp_hash` picks; all flows run together (:func:`simulate_flows`).
    A pair is done when its last flow is: its effective bandwidth is ``nbytes`` over that
    time. The minimum over pairs is what a collective waiting for everyone sees.
    """
    graph = _check_graph(graph)
    pairs = _check_pairs(graph, pairs)
    nbytes = check_positive("nbytes", nbytes)
    flows_per_pair = check_int("flows_per_pair", flows_per_pair, low=1)
    seed = check_int("seed", seed, low=0)
    paths, owner = _flows(graph, pairs, flows_per_pair, seed)
    caps = {e: graph.edges[e]["capacity"] for e in sorted({e for p in paths for e in p}, key=str)}
    finish = simulate_flows(caps, paths, [nbytes / flows_per_pair] * len(paths))
    done = [0.0] * len(pairs)
    for i, t in zip(owner, finish):
        done[i] = max(done[i], t)
    return [nbytes / t for t in done]


def ring_allreduce_time(graph, ring, nbytes: float, alpha: float = 0.0,
                        flows_per_pair: int = 1, seed: int = 0) -> float:
    """Seconds for a ring all-reduce of ``nbytes`` over the hosts ``ring`` (in ring order).

    ``2(n-1)`` steps (reduce-scatter, then all-gather); in each, every host sends a chunk
    of ``nbytes/n`` to the next host, all at once, split over ``flows_per_pair`` ECMP flows.
    A step costs ``alpha`` (the per-message latency of the alpha-beta model) plus the time
    its slowest chunk takes; the flows are the same in every step, so all steps cost the
    same. On a fabric where every chunk gets a full link of ``B`` B/s this is the model of
    chapter 09, ``2(n-1) alpha + 2(n-1)/n * nbytes / B``; a shared link makes it slower.
    """
    graph = _check_graph(graph)
    if isinstance(ring, (str, bytes)) or not isinstance(ring, Sequence) or len(ring) < 1:
        raise ValueError("ring must be a non-empty sequence of host names")
    if len(set(ring)) != len(ring):
        raise ValueError(f"ring must not repeat a host: {list(ring)}")
    for node in ring:
        _check_host(graph, "ring", node)
    nbytes = check_nonnegative("nbytes", nbytes)
    alpha = check_nonnegative("alpha", alpha)
    flows_per_pair = check_int("flows_per_pair", flows_per_pair, low=1)
    seed = check_int("seed", seed, low=0)
    n = len(ring)
    if n == 1:
        return 0.0
    pairs = [(ring[i], ring[(i + 1) % n]) for i in range(n)]
    chunk = nbytes / n
    if chunk == 0:
        return 2 * (n - 1) * alpha
    step = max(nbytes / n / b for b in pair_bandwidths(graph, pairs, chunk, flows_per_pair, seed))
    return 2 * (n - 1) * (alpha + step)


# --------------------------------------------------------------------------- a throttled rank

class PacedLink:
    """This rank's point-to-point sends, paced when the rank is a slow one.

    ``rates`` maps a rank to the B/s its sends are held to (ranks not in it are not
    paced). After each send of ``m`` bytes a paced rank waits until ``m / rate`` seconds
    have passed since the send began, as a token-bucket shaper on its NIC (Linux
    ``tc tbf``) would hold it: the bytes still cross the real transport, at the real
    speed, but the rank cannot start its next send before the budget allows. Picklable,
    so it travels to the ranks of :func:`utils.dist.launch`.
    """

    def __init__(self, rates: Mapping | None = None):
        rates = {} if rates is None else rates
        if not isinstance(rates, Mapping):
            raise TypeError(f"rates must be a mapping rank -> B/s, got {type(rates).__name__}")
        self.rates = {check_int("rates key (a rank)", r, low=0):
                      check_positive(f"rates[{r}]", v) for r, v in rates.items()}

    def _pace(self, start: float, nbytes: int) -> None:
        import torch.distributed as dist

        rate = self.rates.get(dist.get_rank())
        if rate is not None:
            wait = start + nbytes / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)

    def send(self, tensor, dst: int) -> None:
        """``dist.send(tensor, dst)``, then the pacing wait."""
        import torch.distributed as dist

        start = time.perf_counter()
        dist.send(tensor, dst)
        self._pace(start, tensor.numel() * tensor.element_size())

    def exchange(self, send_tensor, dst: int, recv_tensor, src: int) -> None:
        """Send ``send_tensor`` to ``dst`` while receiving ``recv_tensor`` from ``src``."""
        import torch.distributed as dist

        start = time.perf_counter()
        req = dist.isend(send_tensor, dst)
        dist.recv(recv_tensor, src)
        req.wait()
        self._pace(start, send_tensor.numel() * send_tensor.element_size())


def ring_all_reduce(tensor, link: PacedLink | None = None):
    """Sum ``tensor`` (1-D, in place) over all ranks with a ring of ``link`` exchanges.

    Reduce-scatter then all-gather, ``2(n-1)`` steps of ``numel/n`` elements (``numel``
    must be a multiple of the world size). Call it inside a ``utils.dist.launch`` worker;
    every rank's sends go through ``link`` (unpaced if None). Returns ``tensor``.
    """
    import torch
    import torch.distributed as dist

    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1:
        raise TypeError("tensor must be a 1-D torch.Tensor")
    link = PacedLink() if link is None else link
    if not isinstance(link, PacedLink):
        raise TypeError(f"link must be a netsim.PacedLink, got {type(link).__name__}")
    rank, n = dist.get_rank(), dist.get_world_size()
    if tensor.numel() % n:
        raise ValueError(f"tensor has {tensor.numel()} elements, not a multiple of the world "
                         f"size {n}: pad it")
    if n == 1:
        return tensor
    chunks = list(tensor.chunk(n))
    buf = torch.empty_like(chunks[0])
    nxt, prv = (rank + 1) % n, (rank - 1) % n
    for step in range(n - 1):                         # reduce-scatter
        s, r = (rank - step) % n, (rank - step - 1) % n
        link.exchange(chunks[s].clone(), nxt, buf, prv)
        chunks[r] += buf
    for step in range(n - 1):                         # all-gather
        s, r = (rank + 1 - step) % n, (rank - step) % n
        link.exchange(chunks[s].clone(), nxt, buf, prv)
        chunks[r].copy_(buf)
    return tensor
