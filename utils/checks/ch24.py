"""Checkers for lab 24, TCO and FinOps.

The oracles: the TCO arithmetic the lab states, recomputed by :mod:`utils.economics` on the
worked DGX H100 configuration (Epoch AI's constants) and on variants of it; the spot-job
rules replayed by :func:`utils.economics.spot_job_time` on hand-made and random preemption
times; the best-fit rule by :func:`utils.scheduler.best_fit`; and, for the schedule
validator, schedules from :func:`utils.scheduler.simulate` (valid) and the same schedules
with one invariant broken on purpose (each must be refused).
"""
from __future__ import annotations

import math
import numbers
import random
from dataclasses import replace

from .. import economics as econ
from .. import scheduler as sch
from . import describe, exercise, expect_close, expect_equal, expect_raises, expect_type, fail


# ----------------------------------------------------------------------------- exercise 1
_TCO_KEYS = ("capex", "power", "ops", "total")


def _variants():
    w = econ.DGX_H100_WORKED
    return [("the worked DGX H100 (Epoch AI's constants)", w),
            ("a cheaper server, 4-year life, dearer power", replace(w, server_usd=200_000.0, lifetime_years=4.0,
                                                                      usd_per_kwh=0.15, pue=1.5)),
            ("no network share, with operations cost", replace(w, network_fraction=0.0,
                                                               ops_usd_per_gpu_year=3000.0)),
            ("a 4-GPU server", replace(w, gpus_per_server=4, server_usd=120_000.0, server_watts=3000.0))]


@exercise
def onprem_cost_per_gpu_hour(fn):
    """``fn(cfg)`` -> {"capex", "power", "ops", "total"} in $ per GPU-hour."""
    hints = {"capex": "server price / (1 - network_fraction) / GPUs per server / (lifetime in hours; "
                      "a year is 365.25 x 24 h)",
             "power": "server watts x power_fraction x PUE / GPUs per server, in kW, x $/kWh",
             "ops": "ops_usd_per_gpu_year / hours per year",
             "total": "the sum of the three"}
    for label, cfg in _variants():
        got = fn(cfg)
        expect_type(got, dict, f"onprem_cost_per_gpu_hour({label})", hint="return a dict")
        missing = [k for k in _TCO_KEYS if k not in got]
        if missing:
            fail(f"onprem_cost_per_gpu_hour({label}) is missing keys", f"keys {list(_TCO_KEYS)}",
                 f"no {missing}", "return capex, power, ops and total")
        want = econ.onprem_cost_per_gpu_hour(cfg)
        for k in _TCO_KEYS:
            expect_close(got[k], want[k], rtol=1e-9, atol=1e-15, what=f"onprem_cost_per_gpu_hour({label})[{k!r}]",
                         hint=hints[k])
    total = econ.onprem_cost_per_gpu_hour(econ.DGX_H100_WORKED)["total"]
    return f"4 configurations; the worked DGX H100 owns out at ${total:.3f} per GPU-hour"


# ----------------------------------------------------------------------------- exercise 2
@exercise
def break_even_utilization(fn):
    """``fn(cfg, cloud_usd_per_gpu_hour)`` -> the utilization above which owning is cheaper."""
    for label, cfg in _variants():
        for key in ("aws-p5-h100", "gcp-a3-h100-3y", "deepseek-h800"):
            p = econ.price(key).usd_per_hour
            expect_close(fn(cfg, p), econ.break_even_utilization(cfg, p), rtol=1e-9, atol=0.0,
                         what=f"break_even_utilization({label}, ${p}/h)",
                         hint="owning costs the same every hour; renting only the hours used: "
                              "u x cloud price = owned $/GPU-hour")
    # above 1 is a real answer (renting always wins), not an error
    cheap = 0.5
    expect_close(fn(econ.DGX_H100_WORKED, cheap), econ.break_even_utilization(econ.DGX_H100_WORKED, cheap),
                 rtol=1e-9, atol=0.0, what="break_even_utilization(worked DGX H100, $0.50/h)",
                 hint="return the ratio even when it is above 1: renting is then cheaper at any utilization")
    for bad, label in [(-3.0, "a negative price"), (0.0, "a zero price"), (float("nan"), "a NaN price")]:
        expect_raises(lambda: fn(econ.DGX_H100_WORKED, bad), (ValueError,), f"break_even_utilization with {label}",
                "a ValueError naming cloud_usd_per_gpu_hour", "the cloud price must be a finite number > 0")
    u = econ.break_even_utilization(econ.DGX_H100_WORKED, econ.price("aws-p5-h100").usd_per_hour)
    return f"13 cases; owning a DGX H100 beats AWS on-demand above {u:.1%} utilization"


# ----------------------------------------------------------------------------- exercise 3
@exercise
def spot_job_time(fn):
    """``fn(work, interval, checkpoint, restart, preemptions)`` -> (wall seconds, preemptions hit)."""
    hand = [("no preemption", (100.0, 30.0, 5.0, 10.0, [])),
            ("one preemption mid-piece, one during the restart, one after the end",
             (100.0, 30.0, 5.0, 10.0, [40.0, 45.0, 200.0])),
            ("a preemption during a checkpoint", (60.0, 30.0, 5.0, 10.0, [33.0])),
            ("a preemption exactly when a checkpoint completes", (60.0, 30.0, 5.0, 10.0, [35.0])),
            ("a preemption during the last piece (no checkpoint after it)", (60.0, 30.0, 5.0, 10.0, [50.0])),
            ("an interval longer than the job", (50.0, 80.0, 5.0, 10.0, [20.0])),
            ("two preemptions in a row in one piece", (90.0, 30.0, 3.0, 4.0, [10.0, 20.0, 100.0]))]
    rng = random.Random(24)
    for i in range(40):
        work = rng.uniform(100, 2000)
        times = sorted(rng.uniform(0, 3 * work) for _ in range(rng.randint(0, 8)))
        hand.append((f"random case {i}", (work, rng.uniform(20, 600), rng.uniform(0, 30), rng.uniform(0, 60), times)))
    hint = ("each piece is min(interval, work left) of compute, then a checkpoint unless it is the last; "
            "a preemption at p before the piece is committed loses the piece and resumes at p + restart; "
            "preemptions during a restart or after the end are ignored")
    for label, args in hand:
        got = fn(*args[:4], list(args[4]))
        what = f"spot_job_time({label}: work={args[0]:.4g}, interval={args[1]:.4g}, checkpoint={args[2]:.4g}, " \
               f"restart={args[3]:.4g}, preemptions={[round(t, 3) for t in args[4]]})"
        expect_type(got, tuple, what, hint="return a tuple (wall_seconds, preemptions_hit)")
        if len(got) != 2:
            fail(what, "a pair (wall_seconds, preemptions_hit)", describe(got), "return two values")
        want = econ.spot_job_time(*args)
        expect_close(got[0], want[0], rtol=1e-9, atol=1e-9, what=f"{what}: the wall time", hint=hint)
        expect_equal(int(got[1]) if isinstance(got[1], numbers.Integral) else got[1], want[1],
                     what=f"{what}: the preemptions hit", hint=hint)
    for args, label in [((0.0, 30.0, 5.0, 10.0, []), "work_seconds = 0"),
                        ((100.0, 0.0, 5.0, 10.0, []), "interval_seconds = 0"),
                        ((100.0, 30.0, -5.0, 10.0, []), "a negative checkpoint time"),
                        ((100.0, 30.0, 5.0, 10.0, [50.0, 40.0]), "preemptions out of order")]:
        expect_raises(lambda: fn(*args), (ValueError,), f"spot_job_time with {label}", "a ValueError",
                "check the arguments before simulating: positive work and interval, non-negative "
                "costs, increasing preemption times")
    return f"{len(hand)} jobs (7 by hand, 40 random); bad input refused"


# ----------------------------------------------------------------------------- exercise 4
@exercise
def best_fit(fn):
    """``fn(free, pod_sizes)`` -> [(node, gpus), ...] in placement order, or None."""
    cases = [("one pod, the fullest node that holds it", [8, 3, 5, 2], [2]),
             ("a tie goes to the lowest node index", [4, 8, 4], [4]),
             ("largest pod first", [8, 8, 2], [2, 8]),
             ("a gang of two whole nodes", [8, 8, 8], [8, 8]),
             ("8 GPUs free in total but no node has 8", [4, 4], [8]),
             ("the second pod no longer fits", [8, 6], [8, 8]),
             ("nothing to place", [8], []),
             ("pods filling the cluster exactly", [8, 4, 4], [4, 8, 4])]
    rng = random.Random(7)
    for i in range(40):
        free = [rng.randint(0, 8) for _ in range(rng.randint(1, 6))]
        pods = [rng.choice([1, 2, 4, 8]) for _ in range(rng.randint(1, 4))]
        cases.append((f"random case {i}", free, pods))
    for label, free, pods in cases:
        before = list(free)
        got = fn(free, list(pods))
        what = f"best_fit(free={before}, pod_sizes={pods}) ({label})"
        if free != before:
            fail(f"{what} changed its `free` argument", f"free still {before}", f"free is now {free}",
                 "work on a copy: the caller's list must not change (all or nothing)")
        want = sch.best_fit(before, pods)
        if want is None:
            if got is not None:
                fail(what, "None (some pod does not fit: place nothing)", describe(got),
                     "when any pod fails, return None: a gang is all or nothing")
            continue
        expect_type(got, list, what, hint="return a list of (node, gpus) pairs, or None")
        expect_equal([tuple(p) for p in got], [tuple(p) for p in want], what=what,
                     hint="place pods largest first; each on the node with the fewest free GPUs that "
                          "can hold it, ties to the lowest index; update your copy of `free` as you go")
    return f"{len(cases)} placements (8 by hand, 40 random), all-or-nothing included"


# ----------------------------------------------------------------------------- exercise 5
def _broken(schedule, jobs):
    """(label, schedule with one invariant broken) for a valid ``schedule``."""
    segs = schedule.segments
    first, multi = segs[0], next(s for s in segs if len(s.placement) > 1)
    small = next(s for s in segs if len(s.placement) == 1 and s.placement[0][1] < schedule.gpus_per_node)

    def with_segments(new):
        return sch.Schedule(segments=new, rejected=dict(schedule.rejected), policy=schedule.policy,
                            n_nodes=schedule.n_nodes, gpus_per_node=schedule.gpus_per_node)

    def swap(old, new):
        return [new if s is old else s for s in segs]

    last_end = max(s.end for s in segs)
    out = [
        ("a job that finishes twice", with_segments(segs + [replace(first, start=last_end, end=last_end +
                                                                    (first.end - first.start))])),
        ("a job that never finishes", with_segments([s for s in segs if s.jid != first.jid])),
        ("a gang started without one of its pods",
         with_segments(swap(multi, replace(multi, placement=multi.placement[:-1])))),
        ("a job that ran too short", with_segments(swap(first, replace(first, end=first.end - 1.0)))),
        ("a job that starts before it is submitted",
         with_segments(swap(first, replace(first, start=first.start - 1e4, end=first.end - 1e4)))),
        ("a node holding more GPUs than it has", None),
        ("a placement on a node that does not exist",
         with_segments(swap(small, replace(small, placement=((schedule.n_nodes, small.placement[0][1]),))))),
        ("a job that runs again after finishing", None),
        ("an accepted job reported as rejected", None),
        ("a too-large job that was not rejected", None),
    ]
    # over capacity: a gang's pods stacked on one node (the gang itself is still whole)
    stacked = tuple((multi.placement[0][0], g) for _, g in multi.placement)
    out[5] = (out[5][0], with_segments(swap(multi, replace(multi, placement=stacked))))
    fin = next(s for s in segs if s.finished)
    extra = replace(fin, start=last_end + 1.0, end=last_end + 2.0, finished=False)
    shorter = replace(fin, end=fin.end - 1.0)
    out[7] = (out[7][0], with_segments(swap(fin, shorter) + [extra]))
    rej = dict(schedule.rejected)
    rej[first.jid] = "made up"
    out[8] = (out[8][0], sch.Schedule(segments=list(segs), rejected=rej, policy=schedule.policy,
                                      n_nodes=schedule.n_nodes, gpus_per_node=schedule.gpus_per_node))
    out[9] = (out[9][0], sch.Schedule(segments=list(segs), rejected={}, policy=schedule.policy,
                                      n_nodes=schedule.n_nodes, gpus_per_node=schedule.gpus_per_node))
    return out


def _trace():
    jobs = sch.make_jobs(60, seed=11, mean_gap=400, median_duration=2400)
    return jobs + [sch.Job(1000, 30.0, 1000, 60.0)]          # asks for more than the cluster has


@exercise
def validate_schedule(fn):
    """``fn(schedule, jobs)`` -> None for a valid schedule; raises ValueError for a broken one."""
    jobs = _trace()
    for policy, preempt in (("fifo", False), ("backfill", False), ("priority", False), ("priority", True)):
        s = sch.simulate(jobs, 4, 8, policy, preempt)
        try:
            fn(s, jobs)
        except NotImplementedError:
            raise
        except Exception as err:
            fail(f"validate_schedule refused a valid {policy}{' + preemption' if preempt else ''} schedule",
                 "no error", f"{type(err).__name__}: {err}",
                 "sum the run lengths of a preempted job over all its runs; compare times with a small "
                 "tolerance; release GPUs before taking them at the same instant")
    s = sch.simulate(jobs, 4, 8, "priority", True)
    cases = _broken(s, jobs)
    for label, bad in cases:
        expect_raises(lambda: fn(bad, jobs), (ValueError,), f"validate_schedule on a schedule with {label}",
                "a ValueError", "check every invariant the exercise lists: capacity at every moment, "
                "whole gangs, one finish as the last run, total run time = duration, submission "
                "before start, rejections = exactly the jobs too large for the cluster")
    return f"4 valid schedules accepted, {len(cases)} broken ones refused"
