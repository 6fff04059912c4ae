"""utils.netsim: the flow-level simulator, ECMP, ring all-reduce on fabrics, the paced rank."""
import math
import time

import networkx as nx
import pytest
import torch
import torch.distributed as dist

from utils import collectives, netsim, topology
from utils import dist as udist

BW = 50e9                               # InfiniBand NDR per direction (400 Gb/s)


def test_fabric_link_is_ndr():
    assert topology.fat_tree(4).graph.edges["h0.0.0", "e0.0"]["capacity"] == BW


# ---- simulate_flows, by hand
def test_two_equal_flows_share_a_link():
    assert netsim.simulate_flows({"a": 10.0}, [["a"], ["a"]], [10.0, 10.0]) == pytest.approx([2.0, 2.0])


def test_short_flow_leaves_the_long_one_the_link():
    # both at 5 B/s until t=2 (10 B sent each); the long one has 20 B left at 10 B/s: t=4
    assert netsim.simulate_flows({"a": 10.0}, [["a"], ["a"]], [10.0, 30.0]) == pytest.approx([2.0, 4.0])


def test_redistribution_over_time_by_hand():
    # a=10, b=4: flows 0,1 cross a and b (2 B/s each), flow 2 only a (6 B/s), 8 B each.
    # flow 2 ends at 8/6 s; flows 0,1 stay bound by b: 8/2 = 4 s
    got = netsim.simulate_flows({"a": 10.0, "b": 4.0}, [["a", "b"], ["a", "b"], ["a"]], [8, 8, 8])
    assert got == pytest.approx([4.0, 4.0, 4 / 3])


def test_zero_byte_flow_finishes_at_zero():
    assert netsim.simulate_flows({"a": 1.0}, [["a"], ["a"]], [0.0, 3.0]) == pytest.approx([0.0, 3.0])


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_max_min_equals_chapter_06(seed):
    gen = torch.Generator().manual_seed(seed)
    links = [f"l{i}" for i in range(6)]
    caps = {e: float(c) for e, c in zip(links, (torch.rand(6, generator=gen) * 9 + 1).tolist())}
    paths = []
    for _ in range(8):
        mask = torch.rand(6, generator=gen) < 0.4
        paths.append([e for e, m in zip(links, mask.tolist()) if m] or [links[0]])
    import numpy as np
    use = np.array([[e in p for e in links] for p in paths])
    got = netsim._fair(np.array([caps[e] for e in links]), use)
    assert got.tolist() == pytest.approx(topology.max_min_fair(caps, paths), rel=1e-9)


def test_single_flow_is_networkx_max_flow():
    f = topology.fat_tree(4, oversubscription=3)
    src, dst = f.host_names[0], f.host_names[-1]
    path = netsim.ecmp_paths(f.graph, src, dst)[0]
    caps = {e: f.graph.edges[e]["capacity"] for e in path}
    t = netsim.simulate_flows(caps, [path], [1e9])[0]
    # networkx on the path alone (the flow is pinned to it): its narrowest link
    h = nx.DiGraph()
    for e in path:
        h.add_edge(*e, capacity=caps[e])
    assert 1e9 / t == pytest.approx(nx.maximum_flow_value(h, src, dst), rel=1e-12)
    assert 1e9 / t == pytest.approx(BW / 3, rel=1e-12)


def test_no_link_ever_over_capacity():
    f = topology.fat_tree(4)
    h = f.host_names
    paths = [netsim.ecmp_paths(f.graph, h[i], h[(i * 5 + 3) % 16])[0] for i in range(16)
             if i != (i * 5 + 3) % 16]
    caps = {e: f.graph.edges[e]["capacity"] for p in paths for e in p}
    sizes = [1e9 * (1 + i % 4) for i in range(len(paths))]
    t = netsim.simulate_flows(caps, paths, sizes)
    # every link's bytes fit in capacity x the time it was busy (up to the last flow on it)
    for e, c in caps.items():
        on = [i for i, p in enumerate(paths) if e in p]
        assert sum(sizes[i] for i in on) <= c * max(t[i] for i in on) * (1 + 1e-9)


# ---- ECMP
def test_ecmp_path_counts_on_a_fat_tree():
    f = topology.fat_tree(4)
    h = f.host_names
    assert len(netsim.ecmp_paths(f.graph, h[0], h[1])) == 1
    assert len(netsim.ecmp_paths(f.graph, h[0], h[2])) == 2
    assert len(netsim.ecmp_paths(f.graph, h[0], h[15])) == 4
    assert netsim.ecmp_paths(f.graph, h[0], h[15]) == netsim.ecmp_paths(f.graph, h[0], h[15])


def test_ecmp_hash_is_deterministic_and_spreads_evenly():
    assert netsim.ecmp_hash("a", "b", 3, 1) == netsim.ecmp_hash("a", "b", 3, 1)
    counts = [0] * 4
    for s in range(40):
        for f in range(100):
            counts[netsim.ecmp_hash(f"h{s}", "x", f) % 4] += 1
    # 4000 draws, 1000 expected per path, standard deviation ~27: 5 sigma
    assert all(abs(c - 1000) < 140 for c in counts), counts


def test_one_pair_alone_gets_its_link_however_many_flows():
    f = topology.fat_tree(4)
    for m in (1, 3, 16):
        assert netsim.pair_bandwidths(f.graph, [(f.host_names[0], f.host_names[9])], 1e9, m) == \
            pytest.approx([BW])


def test_more_flows_per_pair_help_the_slowest_pair():
    f = topology.fat_tree(4)
    h = f.host_names
    pairs = [(h[i], h[(i + 8) % 16]) for i in range(16)]

    def worst(m):
        return sum(min(netsim.pair_bandwidths(f.graph, pairs, 1e9, m, s)) for s in range(8)) / 8
    one, sixteen = worst(1), worst(16)
    assert one <= BW / 2 + 1          # 16 single flows on 4 paths: some link carries two
    assert sixteen > 1.4 * one


# ---- ring all-reduce on a fabric
@pytest.mark.parametrize("n", [2, 3, 8, 16])
def test_ring_on_a_nonblocking_tree_is_the_alpha_beta_model(n):
    f = topology.fat_tree(4)
    t = netsim.ring_allreduce_time(f.graph, f.host_names[:n], 1e8, alpha=5e-6)
    # 2(n-1) steps of alpha + (S/n)/B, written out
    assert t == pytest.approx(2 * (n - 1) * (5e-6 + 1e8 / n / BW), rel=1e-12)
    assert t == pytest.approx(collectives.ring_cost("all_reduce", n, 1e8).time(5e-6, 1 / BW), rel=1e-12)


def test_ring_across_oversubscribed_pods_by_hand():
    f = topology.fat_tree(4, oversubscription=7)
    # one flow per pair: each pod's one outgoing ring flow crosses an aggregation-core link at B/7
    t = netsim.ring_allreduce_time(f.graph, f.host_names, 1.6e8, alpha=0.0, flows_per_pair=1)
    assert t == pytest.approx(2 * 15 * (1e7 / (BW / 7)), rel=1e-12)
    # 16 flows spread over the pod's 4 uplinks (B/7 each): at best 4B/7 for the crossing pair
    t16 = netsim.ring_allreduce_time(f.graph, f.host_names, 1.6e8, alpha=0.0, flows_per_pair=16)
    assert 2 * 15 * 1e7 / (4 * BW / 7) * (1 - 1e-12) <= t16 < t


def test_ring_edge_cases():
    g = topology.fat_tree(2).graph
    assert netsim.ring_allreduce_time(g, ["h0.0.0"], 1e6) == 0.0
    assert netsim.ring_allreduce_time(g, ["h0.0.0", "h1.0.0"], 0.0, alpha=1e-6) == 2e-6


def test_llama3_registry_is_consistent():
    net = netsim.LLAMA3_NETWORK
    assert net["gpus_per_rack"] * net["racks_per_pod"] == net["gpus_per_pod"] == 3072
    assert net["gpus_per_pod"] * net["pods"] == 24576          # the paper's "24K"
    assert net["link_bps"] / 8 == BW and "Section 3.3.1" in net["source"]


# ---- bad input
@pytest.mark.parametrize("call, exc, words", [
    (lambda: netsim.simulate_flows({"a": 1.0}, [["a"]], [-1.0]), ValueError, "sizes[0]"),
    (lambda: netsim.simulate_flows({"a": 1.0}, [["a"]], [1.0, 2.0]), ValueError, "sizes has 2"),
    (lambda: netsim.simulate_flows({"a": -1.0}, [["a"]], [1.0]), ValueError, "capacities['a']"),
    (lambda: netsim.simulate_flows({"a": 1.0}, [["b"]], [1.0]), ValueError, "crosses link 'b'"),
    (lambda: netsim.simulate_flows({"a": 1.0}, [[]], [1.0]), ValueError, "paths[0] is empty"),
    (lambda: netsim.ecmp_paths(topology.fat_tree(2).graph, "h0.0.0", "nowhere"), ValueError, "dst"),
    (lambda: netsim.ecmp_hash("a", "b", -1), ValueError, "flow"),
    (lambda: netsim.pair_bandwidths(topology.fat_tree(2).graph, [("h0.0.0", "h1.0.0")], -5.0),
     ValueError, "nbytes"),
    (lambda: netsim.pair_bandwidths(topology.fat_tree(2).graph, [("h0.0.0", "h1.0.0")], 5.0, 0),
     ValueError, "flows_per_pair"),
    (lambda: netsim.ring_allreduce_time(topology.fat_tree(2).graph, ["h0.0.0", "h0.0.0"], 1.0),
     ValueError, "ring must not repeat"),
    (lambda: netsim.ring_allreduce_time(topology.fat_tree(2).graph, ["h0.0.0"], 1.0, alpha=-1),
     ValueError, "alpha"),
    (lambda: netsim.PacedLink({0: -5.0}), ValueError, "rates[0]"),
    (lambda: netsim.PacedLink([1, 2]), TypeError, "rates"),
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc) as err:
        call()
    assert words in str(err.value)


# ---- real processes: the ring over paced sends
def _ring_worker(rank, world_size, link):
    x = torch.arange(12, dtype=torch.float64) * (rank + 1)
    ref = x.clone()
    dist.all_reduce(ref)
    t0 = time.perf_counter()
    netsim.ring_all_reduce(x, link)
    return torch.equal(x, ref), time.perf_counter() - t0


def test_ring_all_reduce_equals_dist_all_reduce_and_pacing_slows_it():
    out = udist.launch(_ring_worker, 3, netsim.PacedLink(), timeout=60)
    assert all(ok for ok, _ in out)
    # rank 1 paced to 2 KB/s: its 4 sends of 4 elements x 8 B = 32 B take >= 16 ms each;
    # every other rank waits for the data of at least 3 of them (the last one it need not)
    out = udist.launch(_ring_worker, 3, netsim.PacedLink({1: 2e3}), timeout=60)
    assert all(ok for ok, _ in out)
    assert out[1][1] >= 4 * 32 / 2e3 * 0.99
    assert min(t for _, t in out) >= 3 * 32 / 2e3 * 0.99
