"""utils.collectives: busbw factors, the alpha-beta costs, the fit, the crossover, CommCounter.

Expected values are worked out by hand here (nccl-tests' PERFORMANCE.md for the factors, the
algorithms' schedules for steps and bytes), never by calling the code under test twice.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from utils import collectives as coll
from utils.dist import launch


# --------------------------------------------------------------------------- bandwidths

@pytest.mark.parametrize("collective, n, factor", [
    ("all_reduce", 2, 1.0), ("all_reduce", 8, 1.75), ("all_reduce", 1, 0.0),
    ("reduce_scatter", 4, 0.75), ("all_gather", 8, 0.875), ("all_to_all", 2, 0.5),
    ("broadcast", 8, 1.0), ("reduce", 64, 1.0)])
def test_busbw_factors_are_nccl_tests(collective, n, factor):
    assert coll.busbw_factor(collective, n) == pytest.approx(factor, abs=1e-15)


def test_algbw_and_busbw():
    # 1 GB all-reduce in 10 ms on 8 ranks: algbw 100 GB/s, busbw 175 GB/s
    assert coll.algbw(1e9, 0.01) == pytest.approx(100e9)
    assert coll.busbw("all_reduce", 1e9, 0.01, 8) == pytest.approx(175e9)
    assert coll.busbw("broadcast", 1e9, 0.01, 8) == pytest.approx(100e9)


@pytest.mark.parametrize("call, words", [
    (lambda: coll.busbw_factor("allreduce", 4), "unknown collective"),
    (lambda: coll.busbw_factor("all_reduce", 0), "int >= 1"),
    (lambda: coll.busbw_factor("all_reduce", 2.0), "int >= 1"),
    (lambda: coll.algbw(1e6, 0), "> 0"),
    (lambda: coll.algbw(-1, 1.0), ">= 0"),
    (lambda: coll.ring_cost("broadcast", 4, 10), "reduce_scatter, all_gather"),
    (lambda: coll.all_reduce_cost("tree", 4, 10), "unknown all-reduce algorithm"),
    (lambda: coll.all_reduce_cost("recursive_doubling", 6, 10), "power-of-two"),
])
def test_bad_inputs_are_rejected_clearly(call, words):
    with pytest.raises(ValueError, match=words):
        call()


# --------------------------------------------------------------------------- costs

def test_ring_costs():
    rs = coll.ring_cost("reduce_scatter", 4, 1000)
    assert (rs.steps, rs.bytes_per_rank) == (3, 750)
    ag = coll.ring_cost("all_gather", 8, 800)
    assert (ag.steps, ag.bytes_per_rank) == (7, 700)
    ar = coll.ring_cost("all_reduce", 4, 1000)
    assert (ar.steps, ar.bytes_per_rank) == (6, 1500)
    assert coll.all_reduce_cost("ring", 4, 1000) == ar


@pytest.mark.parametrize("algorithm, n, steps, bytes_per_byte", [
    ("recursive_doubling", 8, 3, 3.0), ("recursive_doubling", 2, 1, 1.0),
    ("halving_doubling", 8, 6, 1.75), ("halving_doubling", 4, 4, 1.5),
    ("double_binary_tree", 8, 6, 2.0), ("double_binary_tree", 6, 6, 2.0),
    ("double_binary_tree", 2, 2, 1.0), ("ring", 16, 30, 1.875)])
def test_all_reduce_costs(algorithm, n, steps, bytes_per_byte):
    c = coll.all_reduce_cost(algorithm, n, 2**20)
    assert c.steps == steps
    assert c.bytes_per_rank == pytest.approx(bytes_per_byte * 2**20)


def test_cost_time_is_alpha_steps_plus_beta_bytes():
    # ring, 4 ranks, 1 MB: 6 steps of 10 us and 1.5 MB at 1 GB/s -> 60 us + 1.5 ms
    t = coll.all_reduce_cost("ring", 4, 1e6).time(10e-6, 1e-9)
    assert t == pytest.approx(1.56e-3)


def test_crossover_size():
    # n = 4: recursive doubling 2 steps / 2S bytes, ring 6 steps / 1.5S: S* = 8 alpha / beta
    assert coll.crossover_size(1e-5, 1e-9, 4) == pytest.approx(8e4)
    # n = 8: 3 steps / 3S vs 14 steps / 1.75S: S* = 11 alpha / (1.25 beta)
    assert coll.crossover_size(1e-5, 1e-9, 8) == pytest.approx(11 / 1.25 * 1e4)
    # n = 2: both send S, the ring takes 2 steps to 1: it never wins
    assert math.isinf(coll.crossover_size(1e-5, 1e-9, 2))
    # the ring against itself never differs; a faster-in-both algorithm always wins
    assert coll.crossover_size(1e-5, 1e-9, 8, small="ring", large="halving_doubling") == 0.0


def test_crossover_matches_the_times():
    alpha, beta, n = 7e-6, 1 / 25e9, 16
    s = coll.crossover_size(alpha, beta, n, small="double_binary_tree")
    tree = coll.all_reduce_cost("double_binary_tree", n, s).time(alpha, beta)
    ring = coll.all_reduce_cost("ring", n, s).time(alpha, beta)
    assert tree == pytest.approx(ring, rel=1e-12)


# --------------------------------------------------------------------------- fitting

def _design(n=4, sizes=(2**10, 2**14, 2**18, 2**22, 2**26)):
    steps = [6] * len(sizes) + [2] * len(sizes)        # ring, then recursive doubling (n = 4)
    nbytes = [1.5 * s for s in sizes] + [2.0 * s for s in sizes]
    return np.array(steps, float), np.array(nbytes, float)


def test_fit_recovers_exact_parameters():
    steps, nbytes = _design()
    alpha, beta = 30e-6, 1 / 3e9
    got = coll.fit_alpha_beta(steps, nbytes, alpha * steps + beta * nbytes)
    assert got == pytest.approx((alpha, beta), rel=1e-9)


def test_fit_minimises_relative_error():
    steps, nbytes = _design()
    rng = np.random.default_rng(1)
    t = (30e-6 * steps + nbytes / 3e9) * np.exp(rng.normal(0, 0.3, steps.shape))
    a, b = coll.fit_alpha_beta(steps, nbytes, t)

    def rel_error(a, b):
        return float(np.sum(((a * steps + b * nbytes - t) / t) ** 2))

    best = rel_error(a, b)
    for da, db in [(1.01, 1), (0.99, 1), (1, 1.01), (1, 0.99)]:
        assert rel_error(a * da, b * db) > best
    # an unweighted fit is a different answer on noisy data
    (ua, ub), *_ = np.linalg.lstsq(np.stack([steps, nbytes], 1), t, rcond=None)
    assert abs(ua - a) / a > 1e-3


@pytest.mark.parametrize("args, words", [
    (([1, 2], [1, 2, 3], [1, 2]), "same length"),
    (([1], [1], [1]), "at least 2"),
    (([1, 2], [1, 2], [1, 0]), "> 0"),
])
def test_fit_rejects_bad_data(args, words):
    with pytest.raises(ValueError, match=words):
        coll.fit_alpha_beta(*args)


# --------------------------------------------------------------------------- CommCounter
# Bytes below are worked out by hand from the tensors' sizes (float32: 4 bytes an element).

def _p2p_worker(rank, world_size):
    import torch.distributed.distributed_c10d as c10d
    originals = [(m, n, getattr(m, n)) for m in (dist, c10d) for n in ("send", "isend", "recv",
                                                                          "irecv")]
    right, left = (rank + 1) % world_size, (rank - 1) % world_size
    x = torch.ones(10)                                 # 40 bytes
    buf = torch.empty(10)
    with coll.CommCounter() as blocking:
        if rank == 0:
            dist.send(x, 1)                            # send() calls isend() inside: count once
        elif rank == 1:
            dist.recv(buf, 0)
    with coll.CommCounter() as batched:
        # P2POp made inside the block: its own check must still recognise the counted isend
        ops = [dist.P2POp(dist.isend, x[:5].contiguous(), right),
               dist.P2POp(dist.irecv, buf[:5], left)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        req = dist.isend(x, dst=right)
        dist.recv(buf, left)
        req.wait()
    restored = all(getattr(m, n) is f for m, n, f in originals)
    return (blocking.sent, blocking.messages, blocking.counts(), blocking.payload(),
            batched.sent, batched.messages, dict(batched.peers), batched.counts(),
            batched.payload(), [(c.kind, c.peer) for c in batched.calls],
            batched.ring_bytes(world_size), batched.volume(), restored)


def test_counter_counts_point_to_point_once_per_call():
    results = launch(_p2p_worker, 3, timeout=30)
    assert results[0][:4] == (40, 1, {"send": 1}, {"send": 40})
    assert results[1][:4] == (0, 0, {"recv": 1}, {"recv": 40})
    assert results[2][:4] == (0, 0, {}, {})
    for rank, r in enumerate(results):
        sent, messages, peers, counts, payload, calls, ring, volume, restored = r[4:]
        right, left = (rank + 1) % 3, (rank - 1) % 3
        assert (sent, messages) == (20 + 40, 2)
        assert peers == {right: 60}
        assert counts == {"send": 2, "recv": 2}
        assert payload == {"send": 60, "recv": 60}
        assert calls == [("send", right), ("recv", left), ("send", right), ("recv", left)]
        assert ring == 60 and volume == 60        # a send counts in full, a receive not at all
        assert restored


def _collectives_worker(rank, world_size):
    original = dist.all_reduce
    with coll.CommCounter() as outer:
        with coll.CommCounter() as inner:
            innermost = coll.CommCounter.innermost() is inner
            t = torch.ones(10, dtype=torch.float64)            # 80 bytes
            dist.all_reduce(t)
        back_to_outer = coll.CommCounter.innermost() is outer
        out = torch.empty(5, dtype=torch.float32)
        dist.reduce_scatter_single(out, torch.ones(10))        # 40-byte input
        full = torch.empty(12, dtype=torch.float32)
        dist.all_gather_single(full, torch.full((6,), float(rank)))   # 48-byte output
        old = torch.empty(12, dtype=torch.float32)
        dist.all_gather_into_tensor(old, torch.ones(6))        # runs all_gather_single: once
        b = torch.arange(4, dtype=torch.int64)
        dist.broadcast(b, src=0)                               # 32 bytes
        parts = [torch.empty(3) for _ in range(world_size)]
        dist.all_gather(parts, torch.ones(3))                  # list of 2 x 12 bytes
    restored = dist.all_reduce is original and coll.CommCounter.innermost() is None
    return (t.tolist(), out.tolist(), full.tolist(), inner.by_kind(), outer.by_kind(),
            outer.counts(), outer.volume(), outer.ring_bytes(world_size),
            [c.function for c in outer.calls], innermost and back_to_outer, restored)


def test_counter_counts_and_runs_the_collectives():
    results = launch(_collectives_worker, 2)
    for rank, r in enumerate(results):
        t, out, full, inner, outer, counts, volume, ring, functions, nested, restored = r
        assert t == [2.0] * 10 and out == [2.0] * 5
        assert full == [0.0] * 6 + [1.0] * 6
        assert inner == {"all_reduce": 80, "reduce_scatter": 0, "all_gather": 0, "broadcast": 0}
        assert outer == {"all_reduce": 80, "reduce_scatter": 40, "all_gather": 48 + 48 + 24,
                         "broadcast": 32}
        assert counts == {"all_reduce": 1, "reduce_scatter": 1, "all_gather": 3, "broadcast": 1}
        assert volume == 2 * 80 + 40 + 120 + 32
        assert ring == pytest.approx(volume / 2)   # (N - 1) / N of the volume, N = 2
        assert functions == ["all_reduce", "reduce_scatter_single", "all_gather_single",
                             "all_gather_into_tensor", "broadcast", "all_gather"]
        assert nested and restored


def test_counter_in_one_process_restores_even_after_an_error():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        original = dist.all_reduce
        with coll.CommCounter() as c:
            t = torch.ones(4)
            dist.all_reduce(t)
            dist.all_reduce(torch.ones(2, dtype=torch.bfloat16))
        assert dist.all_reduce is original
        assert c.counts() == {"all_reduce": 2} and c.payload() == {"all_reduce": 20}
        assert c.ring_bytes(4) == pytest.approx(2 * 3 / 4 * 20)
        assert c.ring_bytes(1) == 0
        assert torch.equal(t, torch.ones(4))
        with pytest.raises(RuntimeError, match="already active"):
            with c:
                with c:
                    pass
        assert dist.all_reduce is original
        with pytest.raises(ZeroDivisionError):
            with coll.CommCounter():
                1 / 0
        assert dist.all_reduce is original and coll.CommCounter.innermost() is None
        c.clear()
        assert c.calls == [] and c.by_kind() == dict.fromkeys(coll.COLLECTIVE_KINDS, 0)
    finally:
        dist.destroy_process_group()


def test_counter_record_by_hand_and_bad_input():
    c = coll.CommCounter()
    c.record("all_reduce", 100, "DDP bucket")
    c.record("send", 8, peer=3)
    assert c.calls == [coll.Call("all_reduce", "DDP bucket", 100),
                       coll.Call("send", "send", 8, 3)]
    assert c.by_kind() == {"all_reduce": 100, "reduce_scatter": 0, "all_gather": 0,
                           "broadcast": 0, "send": 8}
    assert c.volume() == 208 and c.ring_bytes(4) == 150 + 8
    assert (c.sent, c.messages, dict(c.peers)) == (8, 1, {3: 8})
    with pytest.raises(ValueError, match="kind must be one of"):
        c.record("all_to_all", 8)
    for bad in (-1, 2.5, True, None, float("nan")):
        with pytest.raises((ValueError, TypeError), match="nbytes"):
            c.record("send", bad)
    with pytest.raises((ValueError, TypeError), match="peer"):
        c.record("send", 8, peer=-1)
    with pytest.raises(TypeError, match="function"):
        c.record("send", 8, function=3)
    for bad in (0, -2, 2.0, True, float("inf")):
        with pytest.raises((ValueError, TypeError), match="world_size"):
            c.ring_bytes(bad)
    assert len(c.calls) == 2                      # nothing was recorded by the bad calls
