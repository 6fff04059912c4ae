"""Checkers for lab 08, cluster networking.

Oracles: Al-Fares et al.'s counts for the k-ary fat tree (SIGCOMM 2008, Section 3.2) and
``networkx`` (isomorphism with the reference graph, shortest-path counts, max-flow); the
flow-level simulator of ``utils.netsim`` built on the max-min fair allocation of
``utils.topology``; the alpha-beta model of ``utils.collectives`` (chapter 09); and, for
the slow-link hunt, real ``torch.distributed`` processes in which one rank's sends are
paced by ``utils.netsim.PacedLink``: the checker knows which rank it slowed.
"""
from __future__ import annotations

import math
import numbers

import networkx as nx

from .. import bench, collectives, dist, netsim, topology
from . import (describe, exercise, expect_close, expect_equal, expect_raises, fail,
               measurement_warning)

BW = 50e9                          # a 400 Gb/s port, per direction, in B/s


def _number(x, what):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        fail(f"{what} is not a number", "a float", describe(x), "return a plain number")
    return float(x)


def _numbers(xs, n, what):
    if not isinstance(xs, (list, tuple)) or len(xs) != n:
        fail(f"{what}: the result", f"a list of {n} numbers", describe(xs),
             "one number per flow (or pair), in the order given")
    return [_number(x, f"{what}[{i}]") for i, x in enumerate(xs)]


# --------------------------------------------------------------------------- exercise 1

def _kinds(g):
    out = {}
    for node, kind in g.nodes(data="kind"):
        out.setdefault(kind, []).append(node)
    return out


@exercise
def fat_tree(fn):
    """``fn(k, bandwidth, oversubscription=1.0) -> nx.DiGraph``: Al-Fares et al.'s k-ary fat tree."""
    rows = []
    for k in (2, 4, 6, 8):
        g = fn(k, BW)
        if not isinstance(g, nx.DiGraph):
            fail(f"fat_tree({k}, 50e9) returned the wrong type", "a networkx.DiGraph", describe(g),
                 "build nx.DiGraph() and add both directions of every link")
        kinds = _kinds(g)
        counts = {kind: len(kinds.get(kind, [])) for kind in ("host", "edge", "agg", "core")}
        want = {"host": k ** 3 // 4, "edge": k * k // 2, "agg": k * k // 2, "core": k * k // 4}
        expect_equal(counts, want, f"fat_tree({k}): nodes of each kind",
                     "k pods of k/2 edge and k/2 aggregation switches, (k/2)^2 cores, "
                     "k/2 hosts under each edge switch (Al-Fares et al., Section 3.2)")
        if set(kinds) - set(want):
            fail(f"fat_tree({k}): unknown node kinds", "kind in host, edge, agg, core",
                 f"{sorted(map(str, set(kinds) - set(want)))}", "set kind= on every node")
        for u, v, c in g.edges(data="capacity"):
            if not g.has_edge(v, u) or g.edges[v, u].get("capacity") != c:
                fail(f"fat_tree({k}): link {u!r}-{v!r} is not the same both ways",
                     "two directed edges per link, equal capacity",
                     f"{u!r}->{v!r} capacity {c!r}, reverse "
                     f"{g.edges[v, u].get('capacity') if g.has_edge(v, u) else 'missing'}",
                     "add (u, v) and (v, u) with the same capacity")
        und = g.to_undirected()
        for kind in ("edge", "agg", "core"):
            bad = [n for n in kinds[kind] if und.degree(n) != k]
            if bad:
                fail(f"fat_tree({k}): a {kind} switch without k ports in use",
                     f"every switch linked to k = {k} neighbours",
                     f"{bad[0]!r} has {und.degree(bad[0])}", "edge: k/2 hosts + k/2 aggregation; "
                     "aggregation: k/2 edge + k/2 core; core: one aggregation switch per pod")
        host = sorted(kinds["host"], key=str)[0]
        dist_count = {}
        for other in kinds["host"]:
            if other == host:
                continue
            paths = list(nx.all_shortest_paths(g, host, other))
            key = (len(paths[0]) - 1, len(paths))
            dist_count[key] = dist_count.get(key, 0) + 1
        h = k // 2
        want_paths = {(2, 1): h - 1, (4, h): h * h - h, (6, h * h): k ** 3 // 4 - h * h}
        want_paths = {key: n for key, n in want_paths.items() if n}
        expect_equal(dict(sorted(dist_count.items())), dict(sorted(want_paths.items())),
                     f"fat_tree({k}): (hops, equal-cost paths) -> hosts, seen from one host",
                     "same edge switch: 1 path of 2 hops; same pod: k/2 paths of 4 hops; other "
                     "pods: (k/2)^2 paths of 6 hops. Aggregation switch i of every pod must link "
                     "to the same group of cores")
        rows.append(f"k={k}: {counts['host']} hosts, {sum(counts.values()) - counts['host']} switches")
    ref = topology.fat_tree(4, link=topology.hardware.link("InfiniBand NDR"), oversubscription=7).graph
    g = fn(4, BW, oversubscription=7)
    ok = nx.is_isomorphic(g, ref, node_match=lambda a, b: a.get("kind") == b.get("kind"),
                          edge_match=lambda a, b: math.isclose(a.get("capacity", -1), b["capacity"],
                                                               rel_tol=1e-9))
    if not ok:
        caps = sorted({round(c / BW, 6) for *_, c in g.edges(data="capacity")})
        fail("fat_tree(4, 50e9, oversubscription=7) differs from the reference",
             "the same graph as Al-Fares et al.'s, aggregation-core links at bandwidth/7",
             f"link capacities (in units of bandwidth): {caps}",
             "only the links between aggregation and core switches are divided by "
             "oversubscription")
    for args, kind, what in [((3, BW), ValueError, "k=3 (odd)"), ((0, BW), ValueError, "k=0"),
                             ((4.0, BW), TypeError, "k=4.0"), (("4", BW), TypeError, "k='4'"),
                             ((4, -1.0), ValueError, "bandwidth=-1"),
                             ((4, 0.0), ValueError, "bandwidth=0"),
                             ((4, float("nan")), ValueError, "bandwidth=nan"),
                             ((4, BW, 0.0), ValueError, "oversubscription=0"),
                             ((4, BW, -7.0), ValueError, "oversubscription=-7")]:
        expect_raises(lambda: fn(*args), kind, f"fat_tree with {what}",
                      f"a {kind.__name__} naming the argument",
                      "k: an even int >= 2; bandwidth and oversubscription: finite and > 0")
    return "; ".join(rows) + "; k=4 at 1:7 identical to the reference"


# --------------------------------------------------------------------------- exercise 2

def _fabrics():
    return [("fat_tree(4)", topology.fat_tree(4)),
            ("fat_tree(6)", topology.fat_tree(6)),
            ("fat_tree(4), 1:3", topology.fat_tree(4, oversubscription=3)),
            ("fat_tree(4), 1:7", topology.fat_tree(4, oversubscription=7)),
            ("rail_optimized(4 x 4, 1 spine, 1:2)",
             topology.rail_optimized(4, 4, spines=1, oversubscription=2)),
            ("rail_only(4 x 4)", topology.rail_only(4, 4))]


@exercise
def bisection_bandwidth(fn):
    """``fn(graph, left, right) -> B/s``: the max-flow from the hosts ``left`` to the hosts ``right``."""
    rows = []
    for name, fab in _fabrics():
        hosts = fab.host_names
        half = len(hosts) // 2
        before = (fab.graph.number_of_nodes(), fab.graph.number_of_edges())
        got = _number(fn(fab.graph, list(hosts[:half]), list(hosts[half:])),
                      f"bisection_bandwidth({name})")
        if (fab.graph.number_of_nodes(), fab.graph.number_of_edges()) != before:
            fail(f"bisection_bandwidth({name}) changed the graph",
                 f"{before[0]} nodes and {before[1]} edges left as they were",
                 f"{fab.graph.number_of_nodes()} nodes, {fab.graph.number_of_edges()} edges",
                 "add the super-source and super-sink to a copy (graph.copy())")
        expect_close(got, topology.bisection_bandwidth(fab), rtol=1e-9,
                     what=f"bisection_bandwidth of {name}, first half of the hosts to the second",
                     hint="a super-source linked to every left host and every right host linked "
                          "to a super-sink, with unlimited capacity; then the max-flow")
        rows.append(f"{name}: {got / BW:g} links")
    fab = topology.fat_tree(4, oversubscription=7)
    expect_close(_number(fn(fab.graph, list(fab.host_names[:8]), list(fab.host_names[8:])), "1:7"),
                 8 * BW / 7, rtol=1e-9, what="fat_tree(4) at 1:7: 8 hosts to the other 8",
                 hint="the 8 aggregation-core links out of two pods carry bandwidth/7 each")
    one = topology.fat_tree(4)
    expect_close(_number(fn(one.graph, [one.host_names[0]], [one.host_names[15]]), "one pair"),
                 BW, rtol=1e-9, what="one host to one host", hint="its own link limits it")
    g, h = one.graph, one.host_names
    for args, what in [((g, [], list(h[8:])), "an empty left"),
                       ((g, list(h[:8]), []), "an empty right"),
                       ((g, list(h[:9]), list(h[8:])), "a host on both sides"),
                       ((g, ["nowhere"], list(h[8:])), "an unknown host")]:
        expect_raises(lambda: fn(*args), ValueError, f"bisection_bandwidth with {what}",
                      "a ValueError naming left or right",
                      "two non-empty, disjoint sets of nodes of the graph")
    return "; ".join(rows)


# --------------------------------------------------------------------------- exercise 3

def _flow_cases():
    out = [("one flow of 10 B on a link of 5 B/s", {"a": 5.0}, [["a"]], [10.0]),
           ("two equal flows share a link", {"a": 10.0}, [["a"], ["a"]], [10.0, 10.0]),
           ("a short and a long flow: the long one speeds up", {"a": 10.0}, [["a"], ["a"]],
            [10.0, 30.0]),
           ("links a=10, b=4; paths [a,b], [a,b], [a]", {"a": 10.0, "b": 4.0},
            [["a", "b"], ["a", "b"], ["a"]], [8.0, 8.0, 8.0]),
           ("a zero-byte flow", {"a": 10.0, "b": 4.0}, [["a"], ["b"], ["a", "b"]],
            [0.0, 4.0, 6.0]),
           ("four flows, three links, mixed sizes", {"x": 6.0, "y": 3.0, "z": 9.0},
            [["x", "y"], ["y", "z"], ["x", "z"], ["z"]], [3.0, 6.0, 9.0, 1.0])]
    fab = topology.fat_tree(4)
    h = fab.host_names
    paths = [p[i % len(p)] for i, p in enumerate(netsim.ecmp_paths(fab.graph, h[i], h[(i + 5) % 16])
                                                  for i in range(16))]
    caps = {e: fab.graph.edges[e]["capacity"] for e in sorted({e for p in paths for e in p}, key=str)}
    out.append(("16 flows on fat_tree(4)", caps, paths, [1e9 * (1 + i % 3) for i in range(16)]))
    return out


@exercise
def simulate_flows(fn):
    """``fn(capacities, paths, sizes) -> [s]``: finish times with max-min fair sharing, event by event."""
    for name, caps, paths, sizes in _flow_cases():
        got = _numbers(fn(dict(caps), [list(p) for p in paths], list(sizes)), len(paths), name)
        expect_close(got, netsim.simulate_flows(caps, paths, sizes), rtol=1e-9, atol=1e-15,
                     what=f"{name}: finish times",
                     hint="fair rates of the flows still running; advance to the first finish; "
                          "take the bytes sent off every running flow; repeat without it")
    expect_raises(lambda: fn({"a": 1.0}, [["a"]], [-1.0]), ValueError, "a negative size",
                  "a ValueError naming sizes", "sizes are bytes: finite and >= 0")
    expect_raises(lambda: fn({"a": 1.0}, [["a"]], [float("nan")]), ValueError, "a NaN size",
                  "a ValueError naming sizes", "sizes are bytes: finite and >= 0")
    expect_raises(lambda: fn({"a": 1.0}, [["a"], ["a"]], [1.0]), ValueError,
                  "two paths and one size", "a ValueError: one size per flow", "")
    expect_raises(lambda: fn({"a": -1.0}, [["a"]], [1.0]), ValueError, "a negative capacity",
                  "a ValueError naming the capacity", "capacities are finite and > 0")
    expect_raises(lambda: fn({"a": 1.0}, [[]], [1.0]), ValueError, "an empty path",
                  "a ValueError naming the path", "a flow crosses at least one link")
    return f"{len(_flow_cases())} cases equal the reference simulation"


# --------------------------------------------------------------------------- exercise 4

@exercise
def pair_bandwidths(fn):
    """``fn(graph, pairs, nbytes, flows_per_pair=1, seed=0) -> [B/s]``: ECMP-hashed flows per pair."""
    fab = topology.fat_tree(4)
    g, h = fab.graph, fab.host_names
    perm = [(h[i], h[(i + 8) % 16]) for i in range(16)]
    rows = []
    for m in (1, 2, 16):
        worst = []
        for seed in (0, 1, 2):
            got = _numbers(fn(g, perm, 1e9, m, seed), len(perm),
                           f"pair_bandwidths(fat_tree(4), 16 pairs, flows_per_pair={m}, seed={seed})")
            want = netsim.pair_bandwidths(g, perm, 1e9, m, seed)
            expect_close(got, want, rtol=1e-9,
                         what=f"16 pairs across pods, flows_per_pair={m}, seed={seed}",
                         hint="flow f of pair (s, d) takes ecmp_paths(graph, s, d)[ecmp_hash(s, d, "
                              "f, seed) % len(paths)] and carries nbytes / flows_per_pair; a pair "
                              "is done when its last flow is")
            worst.append(min(got))
        rows.append(f"{m} flow{'s' * (m > 1)}/pair: slowest {sum(worst) / 3 / BW:.2f} of a link")
    alone = _numbers(fn(g, [(h[0], h[15])], 1e9, 4, 0), 1, "one pair alone")
    expect_close(alone[0], BW, rtol=1e-9, what="one pair alone, 4 flows",
                 hint="alone, a pair's flows together fill its host link")
    for kw, what in [(dict(flows_per_pair=0), "flows_per_pair=0"),
                     (dict(nbytes=-1.0), "nbytes=-1"),
                     (dict(pairs=[(h[0], h[0])]), "a pair from a host to itself")]:
        args = {**dict(graph=g, pairs=perm[:2], nbytes=1e6, flows_per_pair=1, seed=0), **kw}
        expect_raises(lambda: fn(args["graph"], args["pairs"], args["nbytes"],
                                 args["flows_per_pair"], args["seed"]), ValueError,
                      f"pair_bandwidths with {what}", "a ValueError naming the argument",
                      "flows_per_pair >= 1, nbytes > 0, src != dst")
    return "; ".join(rows)


# --------------------------------------------------------------------------- exercise 5

@exercise
def ring_allreduce_time(fn):
    """``fn(graph, ring, nbytes, alpha=0.0, flows_per_pair=1, seed=0) -> s``, held to the alpha-beta model."""
    fab = topology.fat_tree(4)
    g, h = fab.graph, fab.host_names
    alpha, beta = 5e-6, 1 / BW
    for n in (2, 4, 8, 16):
        for nbytes in (1e6, 1e8):
            got = _number(fn(g, list(h[:n]), nbytes, alpha), f"ring of {n}, {nbytes:g} B")
            model = collectives.ring_cost("all_reduce", n, nbytes).time(alpha, beta)
            expect_close(got, model, rtol=1e-9,
                         what=f"non-blocking fat_tree(4), ring of {n} hosts, {nbytes:g} B, "
                              "alpha 5 us: the alpha-beta model",
                         hint="2(n-1) steps; each costs alpha plus nbytes/n over the slowest "
                              "pair's bandwidth (every pair gets a full link here)")
    sizes = [2.0 ** p for p in range(12, 28, 3)]
    times = [fn(g, list(h), s, alpha) for s in sizes]
    cost = [collectives.ring_cost("all_reduce", 16, s) for s in sizes]
    a, b = collectives.fit_alpha_beta([c.steps for c in cost], [c.bytes_per_rank for c in cost], times)
    expect_close([a, 1 / b], [alpha, BW], rtol=1e-6,
                 what="alpha and link bandwidth fitted (chapter 09's fit_alpha_beta) to your times",
                 hint="the simulation should reproduce the model it generalises")
    for os_, m in ((7.0, 1), (7.0, 16), (3.0, 4)):
        f = topology.fat_tree(4, oversubscription=os_)
        for seed in (0, 1):
            got = _number(fn(f.graph, list(f.host_names), 1e8, alpha, m, seed), "oversubscribed")
            expect_close(got, netsim.ring_allreduce_time(f.graph, list(f.host_names), 1e8, alpha,
                                                         m, seed), rtol=1e-9,
                         what=f"fat_tree(4) at 1:{os_:g}, ring of 16, {m} flows/pair, seed {seed}",
                         hint="use your pair_bandwidths for the ring's n pairs (i -> i+1, the last "
                              "back to the first) with nbytes/n each")
    expect_close(_number(fn(g, [h[0]], 1e8, alpha), "one host"), 0.0, atol=0.0,
                 what="a ring of one host", hint="nothing to exchange: 0 s")
    for args, what in [((g, list(h[:4]), -1.0, alpha), "nbytes=-1"),
                       ((g, list(h[:4]), 1e6, -1e-6), "alpha=-1e-6"),
                       ((g, [h[0], h[1], h[0]], 1e6, alpha), "a host twice in the ring")]:
        expect_raises(lambda: fn(*args), ValueError, f"ring_allreduce_time with {what}",
                      "a ValueError naming the argument", "nbytes, alpha >= 0; hosts distinct")
    busbw = collectives.busbw("all_reduce", 1e8, fn(g, list(h), 1e8, alpha), 16)
    return (f"equal to 2(n-1)(alpha + S/(nB)) on the non-blocking tree (busbw {busbw / 1e9:.1f} GB/s "
            f"at 16 hosts, 100 MB); fit recovers alpha and B; oversubscribed cases match")


# --------------------------------------------------------------------------- exercise 6

def _matrix(rows):
    return [[float(x) for x in r] for r in rows]


def _synthetic():
    """(name, matrix, answer): rows are senders, columns receivers, in B/s."""
    base = [[0.0, 2e9, 2.2e9, 1.9e9], [2.1e9, 0.0, 2e9, 1.8e9], [2e9, 1.9e9, 0.0, 2.1e9],
            [1.7e9, 2.2e9, 2e9, 0.0]]
    slow2 = [r[:] for r in base]
    slow2[2] = [5e6, 4.9e6, 0.0, 5.1e6]
    noisy = [r[:] for r in base]
    noisy[1][3] = 1e8                      # one bad measurement, not a slow rank
    noisy[3] = [5e6, 4.8e6, 5.2e6, 0.0]
    one_noisy_pair = [r[:] for r in base]
    one_noisy_pair[0][1] = 2e8
    slow0_eight = [[0.0 if i == j else (6e6 if i == 0 else 1.5e9 + 1e7 * ((i * 7 + j) % 5))
                    for j in range(8)] for i in range(8)]
    return [("rank 2's sends at 5 MB/s", slow2, 2), ("rank 3 slow, one noisy pair elsewhere", noisy, 3),
            ("no slow rank", base, None), ("no slow rank, one noisy pair", one_noisy_pair, None),
            ("8 ranks, rank 0 slow", slow0_eight, 0)]


def _launch_hunt(worker, find, slow, world, nbytes, reps):
    rows = dist.launch(worker, world, netsim.PacedLink({slow: 5e6}), nbytes, reps, timeout=90)
    for r, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != world:
            fail(f"bandwidth_test on rank {r} returned the wrong thing",
                 f"a list of {world} numbers (B/s from rank {r} to each rank)", describe(row),
                 "return one entry per destination rank; the own entry is 0.0")
        for j, x in enumerate(row):
            if j != r:
                x = _number(x, f"rank {r}'s bandwidth to rank {j}")
                if not (math.isfinite(x) and x > 0):
                    fail(f"rank {r}'s bandwidth to rank {j}", "a positive finite B/s", repr(x))
    matrix = _matrix(rows)
    return matrix, find(matrix)


def _dry_run(worker):
    """The worker once, in this process, on a one-rank gloo group: an unfinished stub is
    reported as "not attempted" (with its name) before four processes are launched."""
    import torch.distributed as tdist

    own_group = not (tdist.is_available() and tdist.is_initialized())
    if own_group:
        tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        row = worker(0, 1, netsim.PacedLink(), 1024, 1)
    finally:
        if own_group:
            tdist.destroy_process_group()
    if not isinstance(row, (list, tuple)) or len(row) != 1:
        fail("bandwidth_test(0, 1, link, 1024, 1) on a group of one rank", "a list of 1 number "
             "(its own entry, 0.0)", describe(row), "return one entry per rank of the group")


@exercise
def slow_rank_hunt(worker, find):
    """``worker(rank, world_size, link, nbytes, reps) -> [B/s]`` and ``find(matrix) -> rank | None``."""
    for name, matrix, want in _synthetic():
        got = find(_matrix(matrix))
        if not (got is None or (isinstance(got, int) and not isinstance(got, bool))):
            fail(f"find_slow_rank on '{name}' returned the wrong type", "an int rank or None",
                 describe(got))
        expect_equal(got, want, f"find_slow_rank on '{name}'",
                     "a rank is slow when the median of its row (its sends) is under a quarter "
                     "of the median of all off-diagonal entries; one low entry is noise")
    expect_raises(lambda: find([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]), ValueError,
                  "find_slow_rank of a 3x2 matrix", "a ValueError: the matrix must be square", "")
    expect_raises(lambda: find([[0.0]]), ValueError, "find_slow_rank of a 1x1 matrix",
                  "a ValueError: two ranks at least", "")
    _dry_run(worker)
    world, nbytes, reps = 4, 256 << 10, 3
    found, ratios = [], []
    for slow in (3,) if bench.quick() else (1, 3):
        for attempt in range(2):              # a second run rules out a burst of load
            matrix, got = _launch_hunt(worker, find, slow, world, nbytes, reps)
            if got == slow:
                break
        if got != slow:
            rowmed = [sorted(x for j, x in enumerate(r) if j != i)[1] for i, r in enumerate(matrix)]
            fail(f"the hunt with rank {slow}'s sends paced to 5 MB/s (two runs)",
                 f"find_slow_rank(matrix) == {slow}", f"{got!r}; median B/s of each rank's sends: "
                 + ", ".join(f"{x:.3g}" for x in rowmed),
                 "send through link.send (the pacing lives there), time from the first send to "
                 "the receiver's acknowledgement, and let only one pair talk at a time (barrier)")
        others = [x for i, r in enumerate(matrix) for j, x in enumerate(r) if i != j and i != slow]
        own = [x for j, x in enumerate(matrix[slow]) if j != slow]
        ratios.append(sorted(others)[len(others) // 2] / max(own))
        found.append(slow)
    if min(ratios) < 8:
        measurement_warning("pacing contrast", "the paced rank's sends at least 8x slower than "
                            "the others'", f"{min(ratios):.1f}x",
                            "a heavily loaded machine slows every transfer; the hunt still works")
    return (f"found rank {' and rank '.join(map(str, found))} (paced to 5 MB/s) on {world} "
            f"processes; {'its' if len(found) == 1 else 'their'} sends ran {min(ratios):.0f}x "
            "slower than the rest")
