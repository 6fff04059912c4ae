"""utils.dgx: the box graph, busbw from a topology, power, fabric sizing -- values and bad input."""
import math

import networkx as nx
import pytest

from utils import dgx, hardware, topology

GPUS = [f"GPU{i}" for i in range(8)]
PCIE5 = 16 * 32e9 * 128 / 130 / 8            # PCIe Gen5 x16 per direction, by hand
INTERLEAVED = ["GPU0", "GPU4", "GPU1", "GPU5", "GPU2", "GPU6", "GPU3", "GPU7"]


# ---------------------------------------------------------------- the box

@pytest.mark.parametrize("name, nvlink, chips", [("DGX-A100", 300e9, 6), ("DGX-H100", 450e9, 4),
                                                 ("DGX-B200", 900e9, 2)])
def test_graph_structure_and_flows(name, nvlink, chips):
    g = dgx.dgx_graph(name)
    kinds = [g.nodes[n]["kind"] for n in g.nodes]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "gpu": 8, "nic": 8, "pcie_switch": 4, "cpu": 2, "nvswitch": 1, "network": 1}
    assert g.nodes["NVSwitch"]["chips"] == chips
    for u, v in g.edges:                                # every link both ways, same capacity
        assert g.edges[v, u]["capacity"] == g.edges[u, v]["capacity"]
    # any two GPUs: NVLink, plus a detour over PCIe switches only when they share one
    assert nx.maximum_flow_value(g, "GPU0", "GPU5", capacity="capacity") >= nvlink
    assert g.edges["GPU3", "NVSwitch"]["capacity"] == nvlink
    nic = 200e9 / 8 if name == "DGX-A100" else 400e9 / 8
    assert g.edges["NIC6", "Network"]["capacity"] == nic
    # GPU6 and its NIC alone (the NVSwitch and the other PCIe switches removed): the port
    h = g.subgraph(["GPU6", "PCIe3", "NIC6", "Network"])
    assert topology.max_flow(h, "GPU6", "Network") == nic
    assert dgx.fast_route(g, "GPU0", "GPU1") == [("GPU0", "NVSwitch"), ("NVSwitch", "GPU1")]
    assert dgx.fast_route(g, "GPU2", "Network") == [("GPU2", "PCIe1"), ("PCIe1", "NIC2"),
                                                     ("NIC2", "Network")]
    assert g.has_edge("PCIe1", "CPU0") and g.has_edge("PCIe2", "CPU1")


def test_graph_bad_input():
    with pytest.raises(KeyError):
        dgx.dgx_graph("DGX-Z")
    with pytest.raises(ValueError, match="gpus_per_pcie_switch"):
        dgx.dgx_graph("DGX-H100", gpus_per_pcie_switch=3)
    with pytest.raises(ValueError):
        dgx.dgx_graph("DGX-H100", gpus_per_pcie_switch=0)
    with pytest.raises(TypeError):
        dgx.dgx_graph(8)


# ---------------------------------------------------------------- busbw from the topology

def test_ring_on_nvswitch_is_the_nvlink_bandwidth():
    g = dgx.dgx_graph("DGX-H100")
    assert dgx.ring_busbw(g, [GPUS]) == pytest.approx(450e9)
    assert dgx.ring_busbw(g, [GPUS, INTERLEAVED]) == pytest.approx(450e9)  # order irrelevant
    assert dgx.ring_busbw(dgx.dgx_graph("DGX-B200"), [GPUS]) == pytest.approx(900e9)


def test_ring_on_pcie_depends_on_the_order():
    g = topology.pcie_server(2, 4, 0, "PCIe Gen5 x16")
    # in order: 6 hops stay under a switch, 2 cross the root in opposite directions
    assert dgx.ring_busbw(g, [GPUS]) == pytest.approx(PCIE5)
    # interleaved: all 8 hops cross, 4 per uplink direction
    assert dgx.ring_busbw(g, [INTERLEAVED]) == pytest.approx(PCIE5 / 4)


def test_ring_transfers_and_loads():
    t = dgx.ring_transfers(["a", "b", "c", "d"], 8.0)
    assert t == [("a", "b", 12.0), ("b", "c", 12.0), ("c", "d", 12.0), ("d", "a", 12.0)]
    g = dgx.dgx_graph("DGX-H100")
    loads = dgx.link_loads(g, [("GPU0", "GPU1", 5.0), ("GPU2", "GPU1", 7.0)])
    assert loads[("NVSwitch", "GPU1")] == 12.0 and loads[("GPU0", "NVSwitch")] == 5.0
    assert dgx.schedule_time(g, [("GPU0", "GPU1", 900e9)]) == pytest.approx(2.0)


def test_double_binary_tree_n8_by_hand():
    a, b = dgx.double_binary_tree(8)
    # NCCL's rule: r with lowest bit b under (r - b) | 2b (bitwise or); 4 under the root 0
    assert a == [None, 2, 4, 2, 0, 6, 4, 6]
    assert b == [1, 3, 1, 7, 5, 3, 5, None]          # the mirror image r -> 7 - r


@pytest.mark.parametrize("n", list(range(1, 40)) + [64, 100, 128])
def test_double_binary_tree_properties(n):
    trees = dgx.double_binary_tree(n)
    children = [0] * n
    for parents in trees:
        assert sum(p is None for p in parents) == 1
        kids = [0] * n
        for r, p in enumerate(parents):
            if p is not None:
                kids[p] += 1
                children[p] += 1
        assert max(kids) <= 2                                   # binary
        for r in range(n):                                      # reaches the root
            x, steps = r, 0
            while parents[x] is not None and steps <= n:
                x, steps = parents[x], steps + 1
            assert parents[x] is None and steps <= n
        depth = max(_depth(parents, r) for r in range(n))
        assert depth <= math.ceil(math.log2(n)) + 1 if n > 1 else depth == 0
    assert max(children) <= 2                  # no rank forwards to more than 2 over both


def _depth(parents, r):
    d = 0
    while parents[r] is not None:
        r, d = parents[r], d + 1
    return d


def test_tree_busbw_against_the_hand_calculation():
    g = dgx.dgx_graph("DGX-H100")
    a, b = dgx.double_binary_tree(8)
    # busiest GPU sends S/2 up + S/2 up + S/2 to each of 2 children = 2S; busbw = (n-1)/n B
    assert dgx.tree_busbw(g, [a, b], GPUS) == pytest.approx(7 / 8 * 450e9)
    # one binary tree: an interior GPU sends S up and S to each of 2 children = 3S
    assert dgx.tree_busbw(g, [a], GPUS) == pytest.approx(2 * 7 / 8 * 450e9 / 3)


def test_busbw_bad_input():
    g = dgx.dgx_graph("DGX-H100")
    with pytest.raises(ValueError, match="twice"):
        dgx.ring_busbw(g, [["GPU0", "GPU1", "GPU0"]])
    with pytest.raises(ValueError, match="same nodes"):
        dgx.ring_busbw(g, [GPUS, GPUS[:4]])
    with pytest.raises(ValueError, match="not a node"):
        dgx.ring_busbw(g, [["GPU0", "GPU9"]])
    with pytest.raises(ValueError):
        dgx.ring_busbw(g, [])
    with pytest.raises(TypeError):
        dgx.ring_busbw("graph", [GPUS])
    with pytest.raises(ValueError, match="one root"):
        dgx.tree_busbw(g, [[None, None]], ["GPU0", "GPU1"])
    with pytest.raises(ValueError, match="cycle"):
        dgx.tree_busbw(g, [[None, 2, 1]], ["GPU0", "GPU1", "GPU2"])
    with pytest.raises(ValueError, match="entries"):
        dgx.tree_busbw(g, [[None, 0]], GPUS)
    with pytest.raises(ValueError):
        dgx.double_binary_tree(0)
    with pytest.raises(TypeError):
        dgx.double_binary_tree(8.0)
    with pytest.raises(ValueError):
        dgx.link_loads(g, [("GPU0", "GPU1", -1.0)])
    with pytest.raises(ValueError):
        dgx.fast_route(g, "GPU0", "GPU0")


# ---------------------------------------------------------------- power

def test_power_plan_by_hand():
    p = dgx.power_plan("DGX-H100", nodes=127, rack_power_w=41_000, pdu_w=17_300, pue=1.25,
                       hours=720, load=0.75)
    assert p["nodes_per_rack"] == 4                         # 4 x 10.2 kW = 40.8 kW
    assert p["racks"] == 32                                 # ceil(127 / 4)
    assert p["pdus"] == 32 * 2 * 3                          # 40.8 / 17.3 -> 3 per feed
    assert p["it_power_w"] == pytest.approx(127 * 10_200 * 0.75)
    assert p["facility_power_w"] == pytest.approx(127 * 10_200 * 0.75 * 1.25)
    assert p["energy_j"] == pytest.approx(127 * 10_200 * 0.75 * 1.25 * 720 * 3600)
    b = dgx.power_plan("DGX-B200", 1, 30_000, 17_300, 1.0, 0.0)
    assert (b["nodes_per_rack"], b["racks"], b["pdus"], b["energy_j"]) == (2, 1, 4, 0.0)


@pytest.mark.parametrize("kw, err", [
    (dict(nodes=-1), ValueError), (dict(nodes=0), ValueError), (dict(nodes=2.5), TypeError),
    (dict(rack_power_w=5000), ValueError), (dict(pue=0.9), ValueError),
    (dict(hours=-1), ValueError), (dict(load=0), ValueError), (dict(load=1.5), ValueError),
    (dict(pdu_w=0), ValueError), (dict(system="DGX-Z"), KeyError)])
def test_power_plan_bad_input(kw, err):
    args = dict(system="DGX-H100", nodes=4, rack_power_w=41_000, pdu_w=17_300, pue=1.2,
                hours=1.0) | kw
    with pytest.raises(err):
        dgx.power_plan(**args)


# ---------------------------------------------------------------- fabric sizing

# NVIDIA's published compute-fabric counts, typed here from the reference architectures:
# (GPUs, leaves, spines, cores, leaf-spine cables, spine-core cables)
H100_TABLE4 = [(248, 8, 4, 0, 256, 0), (504, 16, 8, 0, 512, 0), (760, 24, 16, 0, 768, 0),
               (1016, 32, 16, 0, 1024, 0)]
B200_TABLE = [(512, 16, 8, 0, 512, 0), (1024, 32, 16, 0, 1024, 0), (2048, 64, 32, 0, 2048, 0),
              (4096, 128, 128, 64, 4096, 4096), (8192, 256, 256, 128, 8192, 8192),
              (16384, 512, 512, 256, 16384, 16384)]


@pytest.mark.parametrize("row", H100_TABLE4 + B200_TABLE)
def test_fabric_size_matches_nvidia_tables(row):
    gpus, leaves, spines, cores, ls, sc = row
    f = dgx.fabric_size(gpus, radix=64)
    assert (f["leaves"], f["spines"], f["cores"]) == (leaves, spines, cores)
    assert (f["cables"]["leaf_spine"], f["cables"]["spine_core"]) == (ls, sc)
    assert f["cables"]["node_leaf"] == f["sus"] * 32 * 8
    assert f["tiers"] == (3 if cores else 2)
    assert f["switches"] == leaves + spines + cores
    assert f["transceivers"] == f["total_cables"]           # twin-port: 2 ends / 2 links


def test_fabric_size_data_matches_the_module_table():
    for name, table in dgx.PUBLISHED_FABRIC.items():
        for su, nodes, gpus, leaves, spines, cores, nl, ls, sc in table["rows"]:
            f = dgx.fabric_size(gpus)
            assert (f["sus"], f["leaves"], f["spines"], f["cores"]) == (su, leaves, spines, cores)
            assert f["cables"]["node_leaf"] >= nl and f["cables"]["leaf_spine"] == ls


def test_fabric_size_small_and_other_radix():
    f = dgx.fabric_size(8)                   # one node still builds one full SU's rails
    assert (f["nodes"], f["sus"], f["leaves"], f["spines"]) == (1, 1, 8, 4)
    g = dgx.fabric_size(64, radix=8, gpus_per_node=8, su_nodes=4)
    # 8 nodes, 2 SUs of 4; leaves 2 x 8 = 16 > radix 8 -> three tiers
    assert (g["sus"], g["leaves"], g["tiers"], g["spines"], g["cores"]) == (2, 16, 3, 16, 8)
    with pytest.raises(ValueError, match="three-tier"):
        dgx.fabric_size(65536 * 2, radix=64)


@pytest.mark.parametrize("kw, err", [
    (dict(gpus=-8), ValueError), (dict(gpus=0), ValueError), (dict(gpus=8.0), TypeError),
    (dict(radix=63), ValueError), (dict(radix=0), ValueError), (dict(gpus_per_node=0), ValueError),
    (dict(su_nodes=-1), ValueError), (dict(ports_per_transceiver=0), ValueError)])
def test_fabric_size_bad_input(kw, err):
    with pytest.raises(err):
        dgx.fabric_size(**({"gpus": 256} | kw))


def test_switch_registry():
    s = dgx.switch("qm9700")
    assert (s.ports, s.cages, s.port_bandwidth) == (64, 32, 400e9 / 8)
    assert hardware.link(s.port_link).name == "InfiniBand NDR"
    with pytest.raises(KeyError):
        dgx.switch("QM8700")
