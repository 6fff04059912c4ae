"""utils.scheduler: policies on hand-made traces, invariants, rejection, bad input."""
from dataclasses import replace

import pytest

from utils import scheduler as S
from utils.scheduler import Job, Schedule, Segment


def starts(schedule):
    out = {}
    for s in schedule.segments:
        out.setdefault(s.jid, s.start)
    return out


HOL = [Job(0, 0.0, 6, 100.0), Job(1, 1.0, 4, 100.0), Job(2, 2.0, 2, 50.0)]


def test_fifo_blocks_behind_the_head():
    s = S.simulate(HOL, n_nodes=1, policy="fifo")
    S.validate_schedule(s, HOL)
    assert starts(s) == {0: 0.0, 1: 100.0, 2: 100.0}


def test_backfill_fills_the_hole_without_delaying_the_head():
    s = S.simulate(HOL, n_nodes=1, policy="backfill")
    S.validate_schedule(s, HOL)
    assert starts(s) == {0: 0.0, 1: 100.0, 2: 2.0}


def test_backfill_does_not_start_a_job_that_would_delay_the_head():
    jobs = HOL[:2] + [Job(2, 2.0, 2, 500.0)]
    s = S.simulate(jobs, n_nodes=1, policy="backfill")
    assert starts(s)[1] == 100.0 and starts(s)[2] >= 100.0


def test_gangs_are_all_or_nothing_and_fragmentation_blocks_them():
    # two nodes with 4 GPUs busy on each: 8 GPUs are free, but no node has 8
    jobs = [Job(0, 0.0, 4, 100.0), Job(1, 0.0, 4, 100.0), Job(2, 1.0, 8, 10.0)]
    # best fit puts both 4-GPU jobs on node 0, leaving node 1 whole
    s = S.simulate(jobs, n_nodes=2, policy="fifo")
    S.validate_schedule(s, jobs)
    assert starts(s)[2] == 1.0
    # spreading them (one per node) leaves 4 + 4 free: the 8-GPU gang waits
    def spread(free, pod_sizes):
        out, left = [], list(free)
        for size in pod_sizes:
            node = max(range(len(left)), key=lambda i: (left[i], -i))
            if left[node] < size:
                return None
            left[node] -= size
            out.append((node, size))
        return out
    s2 = S.simulate(jobs, n_nodes=2, policy="fifo", placement=spread)
    S.validate_schedule(s2, jobs)
    assert starts(s2)[2] == 100.0


def test_multi_node_gang_is_split_into_whole_node_pods():
    jobs = [Job(0, 0.0, 20, 10.0)]
    s = S.simulate(jobs, n_nodes=3)
    assert sorted(g for _, g in s.segments[0].placement) == [4, 8, 8]
    assert S.pods(20, 8) == [8, 8, 4]


def test_priority_preemption_keeps_progress():
    jobs = [Job(0, 0.0, 8, 100.0, priority=0), Job(1, 10.0, 8, 30.0, priority=1)]
    s = S.simulate(jobs, n_nodes=1, policy="priority", preempt=True)
    S.validate_schedule(s, jobs)
    runs = [(x.jid, x.start, x.end, x.finished) for x in s.segments]
    assert runs == [(0, 0.0, 10.0, False), (1, 10.0, 40.0, True), (0, 40.0, 130.0, True)]
    assert S.metrics(s, jobs)["preemptions"] == 1
    # without preemption the urgent job waits
    s2 = S.simulate(jobs, n_nodes=1, policy="priority")
    assert starts(s2)[1] == 100.0


def test_too_big_a_job_is_rejected_and_reported():
    jobs = [Job(0, 0.0, 8, 10.0), Job(1, 1.0, 17, 10.0)]
    s = S.simulate(jobs, n_nodes=2)
    assert list(s.rejected) == [1] and "17 GPUs" in s.rejected[1]
    S.validate_schedule(s, jobs)
    assert S.metrics(s, jobs)["rejected"] == 1


@pytest.mark.parametrize("policy, preempt", [("fifo", False), ("backfill", False),
                                             ("priority", False), ("priority", True)])
def test_every_policy_keeps_the_invariants_on_a_trace(policy, preempt):
    jobs = S.make_jobs(150, seed=2, mean_gap=900) + [Job(10_000, 50.0, 1000, 10.0)]
    s = S.simulate(jobs, 8, 8, policy, preempt)
    S.validate_schedule(s, jobs)
    m = S.metrics(s, jobs)
    assert 0 < m["utilization"] <= 1 and m["rejected"] == 1


def test_backfill_waits_less_than_fifo_on_a_busy_trace():
    jobs = S.make_jobs(200, seed=4, mean_gap=600)
    f = S.metrics(S.simulate(jobs, 8, 8, "fifo"), jobs)
    b = S.metrics(S.simulate(jobs, 8, 8, "backfill"), jobs)
    assert b["wait_mean"] < f["wait_mean"] and b["utilization"] > f["utilization"]


def _good():
    jobs = [Job(0, 0.0, 8, 10.0), Job(1, 0.0, 4, 10.0), Job(2, 0.0, 12, 5.0)]
    return S.simulate(jobs, 2), jobs


@pytest.mark.parametrize("corrupt, match", [
    (lambda s: s.segments.append(replace(s.segments[0], start=100.0, end=110.0)), "finishes 2 times"),
    (lambda s: s.segments.__setitem__(0, replace(s.segments[0], placement=((0, 4),))), "all or nothing"),
    (lambda s: s.segments.__setitem__(0, replace(s.segments[0], end=s.segments[0].end - 1)), "needs"),
    (lambda s: s.segments.__setitem__(1, replace(s.segments[1], placement=((0, 4),))), "node 0 holds"),
    (lambda s: s.rejected.__setitem__(1, "made up"), "rejected"),
    (lambda s: s.segments.__setitem__(0, replace(s.segments[0], placement=((5, 8),))), "does not exist"),
])
def test_validate_catches_broken_schedules(corrupt, match):
    s, jobs = _good()
    S.validate_schedule(s, jobs)
    corrupt(s)
    with pytest.raises(ValueError, match=match):
        S.validate_schedule(s, jobs)


@pytest.mark.parametrize("call, err, match", [
    (lambda: S.simulate([], 0), ValueError, "n_nodes"),
    (lambda: S.simulate([], 2, policy="lifo"), ValueError, "policy"),
    (lambda: S.simulate([], 2, policy="fifo", preempt=True), ValueError, "preempt"),
    (lambda: S.simulate([Job(0, 0, 1, 1), Job(0, 1, 1, 1)], 2), ValueError, "twice"),
    (lambda: Job(0, 0.0, 0, 1.0), ValueError, "gpus"),
    (lambda: Job(0, 0.0, 1, -1.0), ValueError, "duration"),
    (lambda: Job(0, float("nan"), 1, 1.0), ValueError, "submit"),
    (lambda: S.best_fit([8, -1], [1]), ValueError, "free"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()
