"""The lab-08 checkers pass right answers, catch planted bugs and refuse the library's own."""
import math
import numbers
import statistics
import time

import networkx as nx
import pytest
import torch
import torch.distributed as dist

from utils import netsim, topology
from utils.checks import ExerciseFailed, LibraryAnswer
from utils.checks import ch08 as check
from utils.topology import max_min_fair

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- right answers, written here (not copied from the library)
def _real(name, x, positive=False, nonnegative=False):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x!r}")
    if positive and x <= 0:
        raise ValueError(f"{name} must be > 0, got {x!r}")
    if nonnegative and x < 0:
        raise ValueError(f"{name} must be >= 0, got {x!r}")
    return float(x)


def fat_tree(k, bandwidth, oversubscription=1.0):
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    if k < 2 or k % 2:
        raise ValueError(f"k must be an even int >= 2, got {k}")
    bandwidth = _real("bandwidth", bandwidth, positive=True)
    oversubscription = _real("oversubscription", oversubscription, positive=True)
    g = nx.DiGraph()

    def link(a, b, capacity):
        g.add_edge(a, b, capacity=capacity)
        g.add_edge(b, a, capacity=capacity)

    half = k // 2
    for i in range(half):
        for j in range(half):
            g.add_node(("core", i, j), kind="core")
    for pod in range(k):
        for i in range(half):
            g.add_node(("agg", pod, i), kind="agg")
            g.add_node(("edge", pod, i), kind="edge")
            for j in range(half):
                link(("agg", pod, i), ("core", i, j), bandwidth / oversubscription)
        for i in range(half):
            for a in range(half):
                link(("edge", pod, i), ("agg", pod, a), bandwidth)
            for j in range(half):
                g.add_node(("host", pod, i, j), kind="host")
                link(("host", pod, i, j), ("edge", pod, i), bandwidth)
    return g


def bisection_bandwidth(graph, left, right):
    left, right = list(left), list(right)
    if not left or not right:
        raise ValueError("left and right must both be non-empty")
    if set(left) & set(right):
        raise ValueError(f"left and right share hosts: {sorted(set(left) & set(right), key=str)}")
    for node in left + right:
        if node not in graph:
            raise ValueError(f"left/right: {node!r} is not a node of the graph")
    h = graph.copy()
    for node in left:
        h.add_edge("SOURCE", node, capacity=math.inf)
    for node in right:
        h.add_edge(node, "SINK", capacity=math.inf)
    return float(nx.maximum_flow_value(h, "SOURCE", "SINK", capacity="capacity"))


def simulate_flows(capacities, paths, sizes):
    if len(sizes) != len(paths):
        raise ValueError(f"sizes has {len(sizes)} entries for {len(paths)} paths")
    left = [_real(f"sizes[{i}]", s, nonnegative=True) for i, s in enumerate(sizes)]
    max_min_fair(capacities, paths)            # checks capacities and paths, raises if bad
    finish = [0.0] * len(paths)
    running = [i for i, s in enumerate(left) if s > 0]
    now = 0.0
    while running:
        rates = max_min_fair(capacities, [paths[i] for i in running])
        dt = min(left[i] / r for i, r in zip(running, rates))
        now += dt
        still = []
        for i, r in zip(running, rates):
            left[i] -= r * dt
            if left[i] <= 1e-9 * r * dt + 1e-12 * max(sizes[i], 1.0):
                finish[i] = now
            else:
                still.append(i)
        running = still
    return finish


def pair_bandwidths(graph, pairs, nbytes, flows_per_pair=1, seed=0):
    nbytes = _real("nbytes", nbytes, positive=True)
    if isinstance(flows_per_pair, bool) or not isinstance(flows_per_pair, int):
        raise TypeError(f"flows_per_pair must be an int, got {flows_per_pair!r}")
    if flows_per_pair < 1:
        raise ValueError(f"flows_per_pair must be >= 1, got {flows_per_pair}")
    paths, owner = [], []
    for i, (s, d) in enumerate(pairs):
        if s == d:
            raise ValueError(f"pairs[{i}] sends from {s!r} to itself")
        options = netsim.ecmp_paths(graph, s, d)
        for f in range(flows_per_pair):
            paths.append(options[netsim.ecmp_hash(s, d, f, seed) % len(options)])
            owner.append(i)
    caps = {e: graph.edges[e]["capacity"] for p in paths for e in p}
    finish = simulate_flows(caps, paths, [nbytes / flows_per_pair] * len(paths))
    done = [0.0] * len(pairs)
    for i, t in zip(owner, finish):
        done[i] = max(done[i], t)
    return [nbytes / t for t in done]


def ring_allreduce_time(graph, ring, nbytes, alpha=0.0, flows_per_pair=1, seed=0):
    nbytes = _real("nbytes", nbytes, nonnegative=True)
    alpha = _real("alpha", alpha, nonnegative=True)
    if len(set(ring)) != len(ring):
        raise ValueError(f"ring repeats a host: {list(ring)}")
    n = len(ring)
    if n == 1:
        return 0.0
    if nbytes == 0:
        return 2 * (n - 1) * alpha
    pairs = [(ring[i], ring[(i + 1) % n]) for i in range(n)]
    chunk = nbytes / n
    slowest = min(pair_bandwidths(graph, pairs, chunk, flows_per_pair, seed))
    return 2 * (n - 1) * (alpha + chunk / slowest)


def bandwidth_test(rank, world_size, link, nbytes, reps):
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    ack = torch.zeros(1)
    row = [0.0] * world_size
    for src in range(world_size):
        for dst in range(world_size):
            if src == dst:
                continue
            dist.barrier()                       # one pair at a time
            if rank == src:
                t0 = time.perf_counter()
                for _ in range(reps):
                    link.send(buf, dst)
                dist.recv(ack, dst)              # the last byte has arrived
                row[dst] = reps * buf.numel() * 4 / (time.perf_counter() - t0)
            elif rank == dst:
                for _ in range(reps):
                    dist.recv(buf, src)
                dist.send(ack, src)
    return row


def find_slow_rank(matrix):
    n = len(matrix)
    if n < 2 or any(len(row) != n for row in matrix):
        raise ValueError(f"matrix must be square with at least 2 ranks, got {n} rows of "
                         f"{sorted({len(r) for r in matrix})} entries")
    off = [[x for j, x in enumerate(row) if j != i] for i, row in enumerate(matrix)]
    everyone = statistics.median(x for row in off for x in row)
    sends = [statistics.median(row) for row in off]
    slowest = min(range(n), key=lambda i: sends[i])
    return slowest if sends[slowest] < everyone / 4 else None


def test_right_answers_pass(capsys):
    check.fat_tree(fat_tree)
    check.bisection_bandwidth(bisection_bandwidth)
    check.simulate_flows(simulate_flows)
    check.pair_bandwidths(pair_bandwidths)
    check.ring_allreduce_time(ring_allreduce_time)
    check.slow_rank_hunt(bandwidth_test, find_slow_rank)
    assert capsys.readouterr().out.count("passed") == 6


def test_library_passes_where_signatures_match(capsys, library_answers_allowed):
    check.simulate_flows(netsim.simulate_flows)
    check.pair_bandwidths(netsim.pair_bandwidths)
    check.ring_allreduce_time(netsim.ring_allreduce_time)
    assert capsys.readouterr().out.count("passed") == 3


@pytest.mark.parametrize("name, reference", [
    ("fat_tree", topology.fat_tree),
    ("bisection_bandwidth", topology.bisection_bandwidth),
    ("simulate_flows", netsim.simulate_flows),
    ("pair_bandwidths", netsim.pair_bandwidths),
    ("ring_allreduce_time", netsim.ring_allreduce_time),
])
def test_library_reference_refused(name, reference):
    with pytest.raises(LibraryAnswer):
        getattr(check, name)(reference)


def test_library_hunt_pieces_refused():
    with pytest.raises(LibraryAnswer):
        check.slow_rank_hunt(bandwidth_test, netsim.simulate_flows)


def _fails(checker, needle, *fns):
    with pytest.raises(ExerciseFailed) as err:
        checker(*fns)
    assert needle in str(err.value), str(err.value)


# ---- planted bugs: fat_tree
def test_fat_tree_odd_k_accepted():
    def bug(k, bandwidth, oversubscription=1.0):
        if isinstance(k, int) and not isinstance(k, bool) and k % 2 and k > 2:
            return fat_tree(k + 1, bandwidth, oversubscription)
        return fat_tree(k, bandwidth, oversubscription)
    _fails(check.fat_tree, "k=3", bug)


def test_fat_tree_oversubscription_on_the_wrong_layer():
    def bug(k, bandwidth, oversubscription=1.0):
        g = fat_tree(k, bandwidth)
        for u, v in g.edges:
            if {g.nodes[u]["kind"], g.nodes[v]["kind"]} == {"edge", "agg"}:
                g.edges[u, v]["capacity"] = bandwidth / oversubscription
        return g
    _fails(check.fat_tree, "oversubscription=7", bug)


def test_fat_tree_k_hosts_per_edge():
    def bug(k, bandwidth, oversubscription=1.0):
        g = fat_tree(k, bandwidth, oversubscription)
        for node in [n for n, kind in g.nodes(data="kind") if kind == "edge"]:
            for j in range(k // 2):
                g.add_edge(("extra", node, j), node, capacity=bandwidth)
                g.add_edge(node, ("extra", node, j), capacity=bandwidth)
                g.nodes[("extra", node, j)]["kind"] = "host"
        return g
    _fails(check.fat_tree, "nodes of each kind", bug)


def test_fat_tree_every_agg_to_every_core():
    def bug(k, bandwidth, oversubscription=1.0):
        g = fat_tree(k, bandwidth, oversubscription)
        cores = [n for n, kind in g.nodes(data="kind") if kind == "core"]
        for a in [n for n, kind in g.nodes(data="kind") if kind == "agg"]:
            for c in cores:
                g.add_edge(a, c, capacity=bandwidth / oversubscription)
                g.add_edge(c, a, capacity=bandwidth / oversubscription)
        return g
    _fails(check.fat_tree, "switch without k ports", bug)


def test_fat_tree_one_direction():
    def bug(k, bandwidth, oversubscription=1.0):
        g = fat_tree(k, bandwidth, oversubscription)
        for u, v in list(g.edges):
            if g.nodes[u]["kind"] == "host" and g.has_edge(v, u):
                g.remove_edge(v, u)
        return g
    _fails(check.fat_tree, "not the same both ways", bug)


def test_fat_tree_cores_not_grouped():
    def bug(k, bandwidth, oversubscription=1.0):      # agg i of a pod on scattered cores
        g = nx.DiGraph()
        h = k // 2
        for pod in range(k):
            for i in range(h):
                g.add_node(("agg", pod, i), kind="agg")
                for j in range(h):
                    c = ("core", (i + j * (pod % 2)) % h, j)
                    g.add_node(c, kind="core")
                    g.add_edge(("agg", pod, i), c, capacity=bandwidth / oversubscription)
                    g.add_edge(c, ("agg", pod, i), capacity=bandwidth / oversubscription)
            for i in range(h):
                g.add_node(("edge", pod, i), kind="edge")
                for a in range(h):
                    g.add_edge(("edge", pod, i), ("agg", pod, a), capacity=bandwidth)
                    g.add_edge(("agg", pod, a), ("edge", pod, i), capacity=bandwidth)
                for j in range(h):
                    g.add_node(("host", pod, i, j), kind="host")
                    g.add_edge(("host", pod, i, j), ("edge", pod, i), capacity=bandwidth)
                    g.add_edge(("edge", pod, i), ("host", pod, i, j), capacity=bandwidth)
        fat_tree(k, bandwidth, oversubscription)       # the argument checks
        return g
    _fails(check.fat_tree, "differs from the reference", bug)


# ---- planted bugs: bisection_bandwidth
def test_bisection_sums_host_links():
    def bug(graph, left, right):
        bisection_bandwidth(graph, left, right)
        return min(len(left), len(right)) * check.BW
    _fails(check.bisection_bandwidth, "bisection_bandwidth of fat_tree(4), 1:3", bug)


def test_bisection_modifies_the_graph():
    def bug(graph, left, right):
        bisection_bandwidth(graph, left, right)
        for node in left:
            graph.add_edge("S", node, capacity=math.inf)
        for node in right:
            graph.add_edge(node, "T", capacity=math.inf)
        return float(nx.maximum_flow_value(graph, "S", "T"))
    _fails(check.bisection_bandwidth, "changed the graph", bug)


def test_bisection_one_pair_only():
    def bug(graph, left, right):
        bisection_bandwidth(graph, left, right)
        return float(nx.maximum_flow_value(graph, left[0], right[0]))
    _fails(check.bisection_bandwidth, "bisection_bandwidth of fat_tree(4)", bug)


def test_bisection_no_overlap_check():
    def bug(graph, left, right):
        left = [n for n in left if n not in set(right)] or left
        return bisection_bandwidth(graph, left, right)
    _fails(check.bisection_bandwidth, "a host on both sides", bug)


# ---- planted bugs: simulate_flows
def test_flows_never_reshared():
    def bug(capacities, paths, sizes):
        simulate_flows(capacities, paths, sizes)
        rates = max_min_fair(capacities, paths)
        return [s / r for s, r in zip(sizes, rates)]
    _fails(check.simulate_flows, "the long one speeds up", bug)


def test_flows_equal_split_of_each_link():
    def bug(capacities, paths, sizes):
        simulate_flows(capacities, paths, sizes)
        users = {e: sum(e in p for p in paths) for e in capacities}
        return [s / min(capacities[e] / users[e] for e in p) for s, p in zip(sizes, paths)]
    _fails(check.simulate_flows, "finish times", bug)


def test_flows_negative_size_accepted():
    def bug(capacities, paths, sizes):
        return simulate_flows(capacities, paths, [abs(s) if s == s else 0.0 for s in sizes])
    _fails(check.simulate_flows, "negative size", bug)


# ---- planted bugs: pair_bandwidths
def test_pairs_every_flow_carries_all_bytes():
    def bug(graph, pairs, nbytes, flows_per_pair=1, seed=0):
        return [b / flows_per_pair for b in pair_bandwidths(graph, pairs, nbytes, flows_per_pair, seed)]
    _fails(check.pair_bandwidths, "flows_per_pair=2", bug)


def test_pairs_first_path_always():
    def bug(graph, pairs, nbytes, flows_per_pair=1, seed=0):
        pair_bandwidths(graph, pairs, nbytes, flows_per_pair, seed)
        paths = [netsim.ecmp_paths(graph, s, d)[0] for s, d in pairs for _ in range(flows_per_pair)]
        caps = {e: graph.edges[e]["capacity"] for p in paths for e in p}
        t = simulate_flows(caps, paths, [nbytes / flows_per_pair] * len(paths))
        return [nbytes / max(t[i * flows_per_pair:(i + 1) * flows_per_pair]) for i in range(len(pairs))]
    _fails(check.pair_bandwidths, "flows_per_pair=1", bug)


def test_pairs_mean_not_last_flow():
    def bug(graph, pairs, nbytes, flows_per_pair=1, seed=0):
        pair_bandwidths(graph, pairs, nbytes, flows_per_pair, seed)
        paths = []
        for s, d in pairs:
            options = netsim.ecmp_paths(graph, s, d)
            paths += [options[netsim.ecmp_hash(s, d, f, seed) % len(options)] for f in range(flows_per_pair)]
        caps = {e: graph.edges[e]["capacity"] for p in paths for e in p}
        t = simulate_flows(caps, paths, [nbytes / flows_per_pair] * len(paths))
        m = flows_per_pair
        return [nbytes / statistics.mean(t[i * m:(i + 1) * m]) for i in range(len(pairs))]
    _fails(check.pair_bandwidths, "flows_per_pair=2", bug)


# ---- planted bugs: ring_allreduce_time
def test_ring_n_steps():
    def bug(graph, ring, nbytes, alpha=0.0, flows_per_pair=1, seed=0):
        n = len(ring)
        t = ring_allreduce_time(graph, ring, nbytes, alpha, flows_per_pair, seed)
        return t / (2 * (n - 1)) * n if n > 1 else t
    _fails(check.ring_allreduce_time, "alpha-beta model", bug)


def test_ring_no_alpha():
    def bug(graph, ring, nbytes, alpha=0.0, flows_per_pair=1, seed=0):
        ring_allreduce_time(graph, ring, nbytes, alpha, flows_per_pair, seed)
        return ring_allreduce_time(graph, ring, nbytes, 0.0, flows_per_pair, seed)
    _fails(check.ring_allreduce_time, "alpha-beta model", bug)


def test_ring_whole_array_per_step():
    def bug(graph, ring, nbytes, alpha=0.0, flows_per_pair=1, seed=0):
        n = len(ring)
        t = ring_allreduce_time(graph, ring, nbytes, alpha, flows_per_pair, seed)
        return t + 2 * (n - 1) * (nbytes - nbytes / n) / check.BW
    _fails(check.ring_allreduce_time, "alpha-beta model", bug)


def test_ring_average_pair_not_slowest():
    def bug(graph, ring, nbytes, alpha=0.0, flows_per_pair=1, seed=0):
        n = len(ring)
        if n == 1 or nbytes <= 0:
            return ring_allreduce_time(graph, ring, nbytes, alpha, flows_per_pair, seed)
        ring_allreduce_time(graph, ring, nbytes, alpha, flows_per_pair, seed)
        pairs = [(ring[i], ring[(i + 1) % n]) for i in range(n)]
        bws = pair_bandwidths(graph, pairs, nbytes / n, flows_per_pair, seed)
        return 2 * (n - 1) * (alpha + nbytes / n / statistics.mean(bws))
    _fails(check.ring_allreduce_time, "1:7", bug)


# ---- planted bugs: the slow-rank hunt
def test_hunt_single_lowest_entry():
    def bug(matrix):
        find_slow_rank(matrix)
        n = len(matrix)
        low = min((x, i) for i in range(n) for j, x in enumerate(matrix[i]) if i != j)
        return low[1]
    _fails(check.slow_rank_hunt, "no slow rank", bandwidth_test, bug)


def test_hunt_reads_columns():
    def bug(matrix):
        return find_slow_rank([list(col) for col in zip(*matrix)])
    _fails(check.slow_rank_hunt, "rank 2's sends", bandwidth_test, bug)


def test_hunt_never_none():
    def bug(matrix):
        r = find_slow_rank(matrix)
        if r is None:
            off = [statistics.median(x for j, x in enumerate(row) if j != i)
                   for i, row in enumerate(matrix)]
            return min(range(len(off)), key=off.__getitem__)
        return r
    _fails(check.slow_rank_hunt, "no slow rank", bandwidth_test, bug)


def test_hunt_worker_bypasses_the_link():
    def unpaced(rank, world_size, link, nbytes, reps):     # plain dist.send: no pacing
        class Plain:
            def send(self, tensor, dst):
                dist.send(tensor, dst)
        return bandwidth_test(rank, world_size, Plain(), nbytes, reps)
    _fails(check.slow_rank_hunt, "find_slow_rank(matrix) == 3", unpaced, find_slow_rank)


def test_hunt_worker_stub_is_not_attempted():
    from utils.checks import NotAttempted

    def stub(rank, world_size, link, nbytes, reps):
        raise NotImplementedError("exercise slow_rank_hunt: replace this line with your code")
    with pytest.raises(NotAttempted, match="stub"):
        check.slow_rank_hunt(stub, find_slow_rank)
