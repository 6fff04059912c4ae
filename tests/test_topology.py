"""utils.topology: transfer times, server graphs and max-min fair shares against networkx."""
import math
import re

import networkx as nx
import pytest
import torch

from utils import hardware, topology


def test_transfer_time_formula_by_hand():
    # 1 GB at 25 GB/s is 40 ms; with 10 us latency and 80% efficiency: 10e-6 + 1e9 / 20e9
    assert topology.transfer_time(1e9, 25e9) == pytest.approx(0.04, rel=1e-12)
    assert topology.transfer_time(1e9, 25e9, 10e-6, 0.8) == pytest.approx(0.05001, rel=1e-12)
    assert topology.transfer_time(0, 25e9, 3e-6) == 3e-6


def test_pcie_registry_generations():
    # x16 per direction: Gen1 2.5 GT/s 8b/10b = 4 GB/s; Gen2 8 GB/s; Gen3 ~15.75 GB/s
    assert hardware.link("PCIe Gen1 x16").bandwidth == pytest.approx(4e9, rel=1e-12)
    assert hardware.link("PCIe Gen2 x16").bandwidth == pytest.approx(8e9, rel=1e-12)
    assert hardware.link("PCIe Gen6 x16").bandwidth == pytest.approx(128e9 * 242 / 256, rel=1e-12)


def test_pcie_server_shape():
    g = topology.pcie_server(switches=2, gpus_per_switch=4, nics_per_switch=1)
    kinds = sorted(k for _, k in g.nodes(data="kind"))
    assert kinds.count("gpu") == 8 and kinds.count("nic") == 2 and kinds.count("pcie_switch") == 2
    assert g.number_of_edges() == 2 * (2 + 8 + 2)
    assert all(c == hardware.link("PCIe Gen4 x16").bandwidth for *_, c in g.edges(data="capacity"))


def test_same_switch_vs_across_root():
    g = topology.pcie_server()
    assert [e[1] for e in topology.route(g, "GPU0", "GPU1")] == ["SW0", "GPU1"]
    assert [e[1] for e in topology.route(g, "GPU0", "GPU4")] == ["SW0", "CPU", "SW1", "GPU4"]


def test_two_transfers_share_an_uplink_by_hand():
    g = topology.pcie_server()
    bw = hardware.link("PCIe Gen4 x16").bandwidth
    rates, necks = topology.concurrent_rates(g, [("GPU0", "GPU4"), ("GPU1", "GPU5"), ("GPU2", "GPU3")])
    assert rates == pytest.approx([bw / 2, bw / 2, bw], rel=1e-12)
    assert necks[0] == necks[1] == ("SW0", "CPU")
    assert necks[2] == ("GPU2", "SW0")


def test_redistribution_by_hand():
    # a=10 shared by 3; b=4 shared by transfers 0,1 -> 2 each; then a has 6 left for transfer 2
    rates = topology.max_min_fair({"a": 10.0, "b": 4.0}, [["a", "b"], ["a", "b"], ["a"]])
    assert rates == pytest.approx([2.0, 2.0, 6.0])


@pytest.mark.parametrize("seed", range(5))
def test_single_transfer_equals_networkx_max_flow(seed):
    g = topology.pcie_server(switches=3, gpus_per_switch=2, uplink="PCIe Gen3 x16")
    nodes = sorted(n for n, k in g.nodes(data="kind") if k in ("gpu", "nic"))
    gen = torch.Generator().manual_seed(seed)
    i, j = torch.randperm(len(nodes), generator=gen)[:2].tolist()
    rates, _ = topology.concurrent_rates(g, [(nodes[i], nodes[j])])
    assert rates[0] == pytest.approx(nx.maximum_flow_value(g, nodes[i], nodes[j]), rel=1e-12)


def test_total_never_exceeds_super_source_max_flow():
    g = topology.pcie_server()
    transfers = [("GPU0", "GPU4"), ("GPU1", "GPU5"), ("GPU6", "GPU2"), ("NIC0", "GPU7")]
    rates, _ = topology.concurrent_rates(g, transfers)
    h = g.copy()
    for s, d in transfers:
        h.add_edge("S", s, capacity=math.inf)
        h.add_edge(d, "T", capacity=math.inf)
    assert sum(rates) <= nx.maximum_flow_value(h, "S", "T") * (1 + 1e-12)


def test_nvswitch_is_nonblocking():
    g = topology.nvswitch_server(8, "NVLink 4")
    rates, _ = topology.concurrent_rates(g, [(f"GPU{i}", f"GPU{(i + 1) % 8}") for i in range(8)])
    assert rates == pytest.approx([450e9] * 8)


@pytest.mark.parametrize("call, kind, needle", [
    (lambda: topology.transfer_time(-1, 1e9), ValueError, "nbytes"),
    (lambda: topology.transfer_time(1, 0), ValueError, "bandwidth"),
    (lambda: topology.transfer_time(1, float("nan")), ValueError, "bandwidth"),
    (lambda: topology.transfer_time("1", 1e9), TypeError, "nbytes"),
    (lambda: topology.transfer_time(1, 1e9, efficiency=1.5), ValueError, "efficiency"),
    (lambda: topology.transfer_time(1, 1e9, latency=-1e-6), ValueError, "latency"),
    (lambda: topology.pcie_server(link="PCIe Gen9 x16"), ValueError, "PCIe Gen9"),
    (lambda: topology.pcie_server(switches=0), ValueError, "switches"),
    (lambda: topology.pcie_server(gpus_per_switch=2.5), TypeError, "gpus_per_switch"),
    (lambda: topology.pcie_server(link=16), TypeError, "link"),
    (lambda: topology.nvswitch_server(1), ValueError, "gpus"),
    (lambda: topology.route(topology.pcie_server(), "GPU0", "GPU99"), ValueError, "GPU99"),
    (lambda: topology.route(topology.pcie_server(), "GPU0", "GPU0"), ValueError, "differ"),
    (lambda: topology.route({"a": 1}, "a", "b"), TypeError, "graph"),
    (lambda: topology.max_min_fair({"a": -1.0}, [["a"]]), ValueError, "capacities"),
    (lambda: topology.max_min_fair({"a": 1.0}, [["b"]]), ValueError, "'b'"),
    (lambda: topology.max_min_fair({"a": 1.0}, [[]]), ValueError, "paths[0]"),
    (lambda: topology.max_min_fair([1.0], [["a"]]), TypeError, "capacities"),
    (lambda: topology.max_min_fair({"a": 1.0}, "a"), TypeError, "paths"),
    (lambda: topology.concurrent_rates(topology.pcie_server(), []), ValueError, "transfers"),
    (lambda: topology.concurrent_rates(topology.pcie_server(), [("GPU0",)]), ValueError, "transfers[0]"),
    (lambda: topology.max_flow(topology.pcie_server(), "X", "GPU0"), ValueError, "src"),
])
def test_bad_inputs(call, kind, needle):
    with pytest.raises(kind, match=None) as err:
        call()
    assert needle in str(err.value)


@pytest.mark.gpu
def test_pinned_beats_pageable_and_d2d_beats_both():
    n = 256 << 20
    pageable = torch.ones(n, dtype=torch.uint8)
    pinned = torch.ones(n, dtype=torch.uint8).pin_memory()
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty_like(dev)

    def bw(dst, src):
        best = math.inf
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return n / best

    dev.copy_(pinned)
    torch.cuda.synchronize()
    b_pinned, b_pageable, b_d2d = bw(dev, pinned), bw(dev, pageable), bw(dev2, dev)
    print(f"H2D pinned {b_pinned / 1e9:.1f} GB/s, pageable {b_pageable / 1e9:.1f} GB/s, "
          f"D2D {b_d2d / 1e9:.1f} GB/s")
    assert torch.equal(dev2[:16].cpu(), pageable[:16])
    assert b_pinned > b_pageable
    assert b_d2d > b_pinned
    # pinned H2D stays under its link's per-direction bandwidth (Gen5 x16 on H100 SXM)
    assert b_pinned < hardware.link("PCIe Gen5 x16").bandwidth * 1.05


# --------------------------------------------------------------------------- chapter 08 fabrics

@pytest.mark.parametrize("k", [2, 4, 6, 8, 10, 12])
def test_fat_tree_counts_are_al_fares(k):
    # Al-Fares et al. 2008, Section 3.2: k^3/4 hosts, k pods of k/2 + k/2 switches, (k/2)^2 cores
    f = topology.fat_tree(k)
    kinds = [kind for _, kind in f.graph.nodes(data="kind")]
    assert f.hosts == kinds.count("host") == k ** 3 // 4
    assert f.switches == 5 * k * k // 4
    assert kinds.count("core") == (k // 2) ** 2
    assert kinds.count("edge") == kinds.count("agg") == k * k // 2
    und = f.graph.to_undirected()
    assert all(und.degree(n) == k for n, kind in f.graph.nodes(data="kind") if kind != "host")
    assert len(f.host_names) == f.hosts


def test_fat_tree_of_48_port_switches_is_the_papers_27648_hosts():
    # the paper's example: 48-port switches, 27,648 hosts; checked on the formula the builder
    # reproduces above, without building 30,000 nodes
    assert 48 ** 3 // 4 == 27648 and 5 * 48 ** 2 // 4 == 2880


def test_fat_tree_equal_cost_paths():
    f = topology.fat_tree(6)
    h = f.host_names
    # same edge switch, same pod, other pod: 1, k/2 and (k/2)^2 shortest paths
    assert len(list(nx.all_shortest_paths(f.graph, h[0], h[1]))) == 1
    assert len(list(nx.all_shortest_paths(f.graph, h[0], h[3]))) == 3
    assert len(list(nx.all_shortest_paths(f.graph, h[0], h[-1]))) == 9


@pytest.mark.parametrize("k,ratio", [(4, 1), (4, 7), (6, 1), (6, 3)])
def test_fat_tree_bisection_by_hand(k, ratio):
    bw = hardware.link("InfiniBand NDR").bandwidth
    f = topology.fat_tree(k, oversubscription=ratio)
    # half the hosts send to the other half: full bisection at 1:1 (Al-Fares), 1/ratio above it
    assert topology.bisection_bandwidth(f) == pytest.approx(k ** 3 / 8 * bw / ratio, rel=1e-12)


def test_oversubscription_only_above_the_pods():
    bw = hardware.link("InfiniBand NDR").bandwidth
    g = topology.fat_tree(4, oversubscription=7).graph
    for u, v, c in g.edges(data="capacity"):
        up = {g.nodes[u]["kind"], g.nodes[v]["kind"]} == {"agg", "core"}
        assert c == pytest.approx(bw / 7 if up else bw)


def test_rail_optimized_shape_and_routes():
    r = topology.rail_optimized(nodes=4, gpus_per_node=8, spines=2)
    kinds = [kind for _, kind in r.graph.nodes(data="kind")]
    assert r.hosts == 32 and kinds.count("leaf") == 8 and kinds.count("spine") == 2
    assert r.switches == 10 and kinds.count("nvswitch") == 4
    # same rail: through one switch; the leaf's uplinks carry what its 4 GPUs send
    assert [v for _, v in topology.route(r.graph, "g0.3", "g2.3")] == ["rail3", "g2.3"]
    bw = hardware.link("InfiniBand NDR").bandwidth
    assert r.graph.edges["rail0", "spine0"]["capacity"] == pytest.approx(4 * bw / 2)


def test_rail_only_has_no_spine_and_crosses_rails_over_nvlink():
    r = topology.rail_only(nodes=2, gpus_per_node=4)
    assert "spine0" not in r.graph and r.switches == 4
    hops = [v for _, v in topology.route(r.graph, "g0.0", "g1.3")]
    assert any(v.startswith("nvs") for v in hops) and len(hops) == 4


def test_fabric_by_name_and_unknown_names():
    assert topology.fabric("fat_tree", k=4).hosts == 16
    assert topology.fabric("rail_only", nodes=2, gpus_per_node=2).hosts == 4
    with pytest.raises(ValueError, match="unknown topology name 'torus'; known: fat_tree"):
        topology.fabric("torus")
    with pytest.raises(KeyError):
        topology.fabric("dragonfly")
    with pytest.raises(TypeError, match="name"):
        topology.fabric(3)


@pytest.mark.parametrize("call, exc, words", [
    (lambda: topology.fat_tree(5), ValueError, "k (the switch radix) must be even"),
    (lambda: topology.fat_tree(0), ValueError, "k must be >= 2"),
    (lambda: topology.fat_tree(4.0), TypeError, "k must be an integer"),
    (lambda: topology.fat_tree(4, oversubscription=-1), ValueError, "oversubscription"),
    (lambda: topology.fat_tree(4, link="InfiniBand QDR+"), ValueError, "unknown link name"),
    (lambda: topology.rail_optimized(nodes=-1), ValueError, "nodes"),
    (lambda: topology.rail_optimized(spines=0), ValueError, "spines"),
    (lambda: topology.bisection_bandwidth(topology.fat_tree(4).graph), TypeError, "fabric"),
])
def test_fabric_bad_input(call, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        call()


def test_new_builders_pass_the_bad_input_sweep(monkeypatch):
    """The library-wide sweep (tests/test_bad_inputs.py), run on chapter 08's functions."""
    import test_bad_inputs as tb

    entries = {
        "topology.fat_tree": tb.E(tb.kw(k=4, link="InfiniBand NDR", oversubscription=7.0)),
        "topology.rail_optimized": tb.E(tb.kw(nodes=2, gpus_per_node=4, link="InfiniBand NDR",
                                              nvlink="NVLink 4", spines=2, oversubscription=1.0)),
        "topology.rail_only": tb.E(tb.kw(nodes=2, gpus_per_node=4, link="InfiniBand NDR",
                                         nvlink="NVLink 4")),
        "topology.fabric": tb.E(tb.kw(name="fat_tree", k=4)),
        "topology.bisection_bandwidth": tb.E(lambda: dict(fabric=topology.fat_tree(4))),
    }
    for name, entry in entries.items():
        monkeypatch.setitem(tb.SWEEP, name, entry)
        assert tb.sweep_one(name) == [], name
