"""A GPU cluster scheduler as a discrete-event simulation (chapter 24).

A cluster of ``n_nodes`` nodes with ``gpus_per_node`` GPUs each receives a trace of
:class:`Job` s. A job asks for ``gpus`` GPUs for ``duration`` seconds of work. It is a
*gang*: it is split into pods of at most ``gpus_per_node`` GPUs (``gpus // gpus_per_node``
whole-node pods and one pod of the remainder), each pod must sit on one node, and all
pods start together or none does (as Kubernetes gang schedulers such as Volcano and
Kueue admit a job). A job asking for more GPUs than the cluster has is *rejected* at
submission and reported, never queued.

Policies (:func:`simulate`):

* ``"fifo"``: jobs start in submission order; the first job that does not fit blocks all
  behind it (head-of-line blocking).
* ``"backfill"``: EASY backfilling. The first waiting job gets a reservation at the
  earliest time it would fit as running jobs end (their end times are known: the trace's
  durations are exact estimates); a later job may jump ahead if it fits now and ends by
  that time, so it cannot delay the reservation.
* ``"priority"``: the waiting queue is ordered by priority (higher first), then
  submission; FIFO within that order. With ``preempt=True`` a waiting job that does not
  fit may evict running jobs of *lower* priority (the most recently started first) when
  that frees enough room; an evicted job keeps its progress (it checkpointed) and waits
  again for its remaining work.

Placement (bin-packing) is best-fit: each pod, largest first, goes to the node with the
fewest free GPUs that can hold it (ties: lowest node index), which keeps whole nodes free
for large gangs. :func:`best_fit` is the rule; :func:`simulate` takes another as
``placement``.

Every decision is deterministic: events at the same time are handled completions first,
then arrivals, and ties are broken by job id. :func:`validate_schedule` checks a schedule's
invariants: no node over capacity at any moment, every gang all-or-nothing and started
at one instant, every accepted job finishing exactly once with exactly its work done.
"""
from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import validate as _v

__all__ = ["Job", "Segment", "Schedule", "pods", "best_fit", "make_jobs", "simulate",
           "validate_schedule", "metrics", "POLICIES"]

POLICIES = ("fifo", "backfill", "priority")


def _int(name, value, minimum=1):
    return _v.check_int(name, value, low=minimum)


def _time(name, value, positive=False):
    return float(_v.check_positive(name, value) if positive else _v.check_nonnegative(name, value))


def _seq(name, value) -> list:
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple, range)):
        raise TypeError(f"{name} must be a list or tuple, got {type(value).__name__} {value!r}")
    return list(value)


def _jobs(jobs) -> list:
    out = _seq("jobs", jobs)
    for j in out:
        if not isinstance(j, Job):
            raise TypeError(f"jobs must hold Job objects, got {type(j).__name__}")
    return out


@dataclass(frozen=True)
class Job:
    """``gpus`` GPUs for ``duration`` seconds, submitted at ``submit`` (s)."""

    jid: int
    submit: float
    gpus: int
    duration: float
    priority: int = 0

    def __post_init__(self):
        _int("Job.jid", self.jid, 0)
        _time(f"job {self.jid}: submit", self.submit)
        _int(f"job {self.jid}: gpus", self.gpus)
        _time(f"job {self.jid}: duration", self.duration, positive=True)
        if isinstance(self.priority, bool) or not isinstance(self.priority, numbers.Integral):
            raise TypeError(f"job {self.jid}: priority must be an integer, got {self.priority!r}")


@dataclass(frozen=True)
class Segment:
    """One uninterrupted run of a job: ``placement`` is a tuple of (node, GPUs) pods.
    ``finished`` is True for the run that completed the job, False for one cut short by
    preemption."""

    jid: int
    start: float
    end: float
    placement: tuple
    finished: bool


@dataclass
class Schedule:
    """What :func:`simulate` returns: the runs, the rejected jobs and the policy used."""

    segments: list = field(default_factory=list)
    rejected: dict = field(default_factory=dict)       # jid -> reason
    policy: str = ""
    n_nodes: int = 0
    gpus_per_node: int = 0


def pods(gpus: int, gpus_per_node: int) -> list[int]:
    """The pod sizes of a gang of ``gpus``: whole nodes, then the remainder."""
    g = _int("gpus", gpus)
    n = _int("gpus_per_node", gpus_per_node)
    return [n] * (g // n) + ([g % n] if g % n else [])


def best_fit(free: Sequence[int], pod_sizes: Sequence[int]):
    """Best-fit placement of ``pod_sizes`` (any order) on nodes with ``free`` GPUs.

    Pods are placed largest first, each on the node with the fewest free GPUs that can hold
    it (ties: lowest index). Returns a list of (node, GPUs) in placement order, or None when
    some pod does not fit (nothing is placed: all or nothing). ``free`` is not modified.
    """
    left = [_int(f"free[{i}]", f, 0) for i, f in enumerate(_seq("free", free))]
    out = []
    for size in sorted((_int("pod_sizes element", s) for s in _seq("pod_sizes", pod_sizes)), reverse=True):
        fits = [i for i, f in enumerate(left) if f >= size]
        if not fits:
            return None
        node = min(fits, key=lambda i: (left[i], i))
        left[node] -= size
        out.append((node, size))
    return out


def make_jobs(n: int, seed: int = 0, mean_gap: float = 600.0,
              sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
              weights: Sequence[float] = (0.3, 0.2, 0.2, 0.15, 0.1, 0.05),
              median_duration: float = 3600.0, sigma: float = 1.0,
              high_priority_share: float = 0.2) -> list[Job]:
    """A synthetic trace: Poisson arrivals (mean gap ``mean_gap`` s), GPU counts drawn from
    ``sizes`` with ``weights``, lognormal durations (median ``median_duration`` s, shape
    ``sigma``), priority 1 with probability ``high_priority_share`` else 0. Times rounded
    to the second. Seeded: the same arguments give the same jobs."""
    n = _int("n", n, 0)
    rng = random.Random(_int("seed", seed, 0))
    _time("mean_gap", mean_gap, positive=True)
    _time("median_duration", median_duration, positive=True)
    sizes = [_int("sizes element", g) for g in _seq("sizes", sizes)]
    weights = [float(_v.check_nonnegative("weights element", x)) for x in _seq("weights", weights)]
    if len(sizes) != len(weights) or not sizes or not sum(weights) > 0:
        raise ValueError("sizes and weights must have the same, non-zero length, and some weight > 0")
    _v.check_positive("sigma", sigma)
    _v.check_probability("high_priority_share", high_priority_share)
    jobs, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(1.0 / mean_gap)
        g = rng.choices(list(sizes), weights=list(weights))[0]
        d = max(60.0, round(rng.lognormvariate(math.log(median_duration), sigma)))
        pr = 1 if rng.random() < high_priority_share else 0
        jobs.append(Job(i, float(round(t)), int(g), float(d), pr))
    return jobs


def simulate(jobs: Sequence[Job], n_nodes: int, gpus_per_node: int = 8, policy: str = "fifo",
             preempt: bool = False,
             placement: Callable[[Sequence[int], Sequence[int]], list | None] = best_fit) -> Schedule:
    """Run the trace through the cluster under ``policy`` (see the module docstring)."""
    nn = _int("n_nodes", n_nodes)
    gpn = _int("gpus_per_node", gpus_per_node)
    _v.check_choice("policy", policy, POLICIES)
    _v.check_bool("preempt", preempt)
    _v.check_callable("placement", placement)
    jobs = _jobs(jobs)
    if preempt and policy != "priority":
        raise ValueError("preempt=True needs policy='priority'")
    seen = set()
    for j in jobs:
        if j.jid in seen:
            raise ValueError(f"job id {j.jid} appears twice")
        seen.add(j.jid)
    sched = Schedule(policy=policy, n_nodes=nn, gpus_per_node=gpn)
    capacity = nn * gpn
    arrivals = sorted(jobs, key=lambda j: (j.submit, j.jid))
    free = [gpn] * nn
    remaining = {j.jid: j.duration for j in jobs}
    by_id = {j.jid: j for j in jobs}
    waiting: list[int] = []
    running: dict[int, tuple[float, list]] = {}          # jid -> (start, placement)
    t, a = 0.0, 0

    def order(jid):
        j = by_id[jid]
        return (-j.priority, j.submit, jid) if policy == "priority" else (j.submit, jid)

    def start(jid):
        where = placement(list(free), pods(by_id[jid].gpus, gpn))
        if where is None:
            return False
        for node, g in where:
            free[node] -= g
        running[jid] = (t, [tuple(p) for p in where])
        waiting.remove(jid)
        return True

    def stop(jid, finished):
        s, where = running.pop(jid)
        for node, g in where:
            free[node] += g
        sched.segments.append(Segment(jid, s, t, tuple(where), finished))
        if finished:
            remaining[jid] = 0.0
        else:
            remaining[jid] -= t - s

    def shadow_time(head):
        """Earliest time the head job fits, releasing running jobs in end-time order."""
        trial = list(free)
        need = pods(by_id[head].gpus, gpn)
        if placement(trial, need) is not None:
            return t
        for jid in sorted(running, key=lambda r: (running[r][0] + remaining[r], r)):
            for node, g in running[jid][1]:
                trial[node] += g
            if placement(trial, need) is not None:
                return running[jid][0] + remaining[jid]
        return math.inf

    def schedule_pass():
        waiting.sort(key=order)
        if policy in ("fifo", "priority"):
            while waiting:
                head = waiting[0]
                if start(head):
                    continue
                if preempt and try_preempt(head):
                    continue
                break
            return
        # EASY backfilling
        while waiting and start(waiting[0]):
            pass
        if not waiting:
            return
        reserve = shadow_time(waiting[0])
        for jid in list(waiting[1:]):
            if t + remaining[jid] <= reserve:
                start(jid)

    def try_preempt(head):
        pr = by_id[head].priority
        victims = sorted((r for r in running if by_id[r].priority < pr),
                         key=lambda r: (-running[r][0], -r))
        trial = list(free)
        chosen = []
        need = pods(by_id[head].gpus, gpn)
        for v in victims:
            chosen.append(v)
            for node, g in running[v][1]:
                trial[node] += g
            if placement(trial, need) is not None:
                for c in chosen:
                    stop(c, finished=False)
                    waiting.append(c)
                waiting.sort(key=order)
                return start(head)
        return False

    while a < len(arrivals) or running or waiting:
        next_end = min((s + remaining[j] for j, (s, _) in running.items()), default=math.inf)
        next_arrival = arrivals[a].submit if a < len(arrivals) else math.inf
        if next_end == math.inf and next_arrival == math.inf:
            # nothing can ever start: cannot happen for accepted jobs (they fit an empty cluster)
            raise RuntimeError(f"jobs {sorted(waiting)} can never be placed")
        t = min(next_end, next_arrival)
        for jid in sorted(j for j, (s, _) in running.items() if s + remaining[j] <= t):
            stop(jid, finished=True)
        while a < len(arrivals) and arrivals[a].submit <= t:
            j = arrivals[a]
            a += 1
            if j.gpus > capacity:
                sched.rejected[j.jid] = (f"asks for {j.gpus} GPUs; the cluster has {capacity} "
                                         f"({nn} nodes x {gpn})")
            else:
                waiting.append(j.jid)
        schedule_pass()
    sched.segments.sort(key=lambda s: (s.start, s.jid, s.end))
    return sched


def validate_schedule(schedule: Schedule, jobs: Sequence[Job]) -> None:
    """Raise ValueError naming the first broken invariant of ``schedule`` for ``jobs``:

    1. rejected jobs are exactly those asking for more GPUs than the cluster has, and
       they never run;
    2. no run starts before its job's submission, and every run's placement is the job's
       gang: its pods (sizes and count) on valid nodes, all starting at one instant;
    3. every accepted job has exactly one finished run, its last, and the lengths of its
       runs add up to its duration;
    4. at no moment does any node hold more GPUs than it has.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    jobs = _jobs(jobs)
    nn, gpn = schedule.n_nodes, schedule.gpus_per_node
    capacity = nn * gpn
    by_id = {j.jid: j for j in jobs}
    too_big = {j.jid for j in jobs if j.gpus > capacity}
    if set(schedule.rejected) != too_big:
        raise ValueError(f"rejected jobs {sorted(schedule.rejected)} should be exactly those asking "
                         f"for more than {capacity} GPUs: {sorted(too_big)}")
    runs: dict[int, list[Segment]] = {}
    for s in schedule.segments:
        if s.jid not in by_id:
            raise ValueError(f"a run of unknown job {s.jid}")
        if s.jid in too_big:
            raise ValueError(f"rejected job {s.jid} runs")
        j = by_id[s.jid]
        if s.start < j.submit - 1e-9:
            raise ValueError(f"job {s.jid} starts at {s.start:g} s, before its submission at {j.submit:g} s")
        if s.end < s.start:
            raise ValueError(f"job {s.jid} ends before it starts")
        sizes = sorted(g for _, g in s.placement)
        if sizes != sorted(pods(j.gpus, gpn)):
            raise ValueError(f"job {s.jid} (gang of {j.gpus} GPUs: pods {pods(j.gpus, gpn)}) "
                             f"was placed as {list(s.placement)}: not all or nothing")
        if any(not (isinstance(n, numbers.Integral) and 0 <= n < nn) for n, _ in s.placement):
            raise ValueError(f"job {s.jid} placed on a node that does not exist: {list(s.placement)}")
        runs.setdefault(s.jid, []).append(s)
    for jid, j in by_id.items():
        if jid in too_big:
            continue
        rs = sorted(runs.get(jid, []), key=lambda s: s.start)
        done = [s for s in rs if s.finished]
        if len(done) != 1:
            raise ValueError(f"job {jid} finishes {len(done)} times; every job must finish exactly once")
        if rs[-1] is not done[0]:
            raise ValueError(f"job {jid} runs again after it finished")
        worked = sum(s.end - s.start for s in rs)
        if not math.isclose(worked, j.duration, rel_tol=1e-9, abs_tol=1e-6):
            raise ValueError(f"job {jid} ran {worked:g} s in all, but needs {j.duration:g} s")
    events = []
    for s in schedule.segments:
        for node, g in s.placement:
            events.append((s.end, 0, node, -g))      # releases first at equal times
            events.append((s.start, 1, node, g))
    used = [0] * nn
    for t, _, node, g in sorted(events):
        used[node] += g
        if used[node] > gpn:
            raise ValueError(f"node {node} holds {used[node]} GPUs at t = {t:g} s; it has {gpn}")


def metrics(schedule: Schedule, jobs: Sequence[Job]) -> dict:
    """Utilization, queueing delay and job completion time of the accepted jobs.

    * ``utilization``: GPU-seconds of runs / (all GPUs x the makespan, first submission to
      last end);
    * ``wait_mean``, ``wait_p50``, ``wait_p95``: first start - submission (s);
    * ``jct_mean``, ``jct_p50``, ``jct_p95``: finish - submission (s);
    * ``preemptions``: runs cut short; ``rejected``: jobs rejected.
    Percentiles are numpy's (linear interpolation).
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    by_id = {j.jid: j for j in _jobs(jobs)}
    first, last = {}, {}
    busy = 0.0
    for s in schedule.segments:
        busy += (s.end - s.start) * sum(g for _, g in s.placement)
        first[s.jid] = min(first.get(s.jid, math.inf), s.start)
        if s.finished:
            last[s.jid] = s.end
    if not last:
        raise ValueError("the schedule has no finished job")
    t0 = min(by_id[j].submit for j in last)
    span = max(last.values()) - t0
    waits = np.array([first[j] - by_id[j].submit for j in sorted(last)])
    jcts = np.array([last[j] - by_id[j].submit for j in sorted(last)])
    return {"utilization": busy / (schedule.n_nodes * schedule.gpus_per_node * span),
            "wait_mean": float(waits.mean()), "wait_p50": float(np.percentile(waits, 50)),
            "wait_p95": float(np.percentile(waits, 95)), "jct_mean": float(jcts.mean()),
            "jct_p50": float(np.percentile(jcts, 50)), "jct_p95": float(np.percentile(jcts, 95)),
            "preemptions": sum(not s.finished for s in schedule.segments),
            "rejected": len(schedule.rejected)}
