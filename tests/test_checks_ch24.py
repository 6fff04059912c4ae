"""Lab 24's checkers pass right answers, fail planted bugs, and refuse the library's own code."""
import math

import pytest

from utils import economics as econ
from utils import scheduler as sch
from utils.checks import ExerciseFailed, LibraryAnswer
from utils.checks import ch24 as check

HOURS = 365.25 * 24


def onprem_cost_per_gpu_hour(cfg, bug=None):
    life = cfg.lifetime_years * (8760 if bug == "365_days" else HOURS)
    net = 1.0 if bug == "no_network" else (1 - cfg.network_fraction)
    capex = cfg.server_usd / net / cfg.gpus_per_server / life
    pue = 1.0 if bug == "no_pue" else cfg.pue
    power = cfg.server_watts * cfg.power_fraction * pue / cfg.gpus_per_server / 1000 * cfg.usd_per_kwh
    ops = cfg.ops_usd_per_gpu_year / HOURS
    return {"capex": capex, "power": power, "ops": ops, "total": capex + power + ops}


def break_even_utilization(cfg, cloud_usd_per_gpu_hour, bug=None):
    if not (isinstance(cloud_usd_per_gpu_hour, (int, float)) and math.isfinite(cloud_usd_per_gpu_hour)
            and cloud_usd_per_gpu_hour > 0) and bug != "no_check":
        raise ValueError("cloud_usd_per_gpu_hour")
    u = onprem_cost_per_gpu_hour(cfg)["total"] / cloud_usd_per_gpu_hour
    return min(u, 1.0) if bug == "clip" else (1 / u if bug == "inverted" else u)


def spot_job_time(work, interval, checkpoint, restart, preemptions, bug=None):
    if work <= 0 or interval <= 0 or checkpoint < 0 or restart < 0:
        raise ValueError("bad argument")
    if any(b < a for a, b in zip(preemptions, preemptions[1:])):
        raise ValueError("preemptions must increase")
    t, done, hits, k = 0.0, 0.0, 0, 0
    while True:
        piece = min(interval, work - done)
        last = done + piece >= work - 1e-12 * work
        commit = t + piece + (0.0 if (last and bug != "checkpoint_at_end") else checkpoint)
        if bug != "restart_hits":
            while k < len(preemptions) and preemptions[k] < t:
                k += 1
        if k < len(preemptions) and preemptions[k] < commit:
            hits += 1
            if bug == "keep_progress":                  # wrong: work since the checkpoint is kept
                done += max(0.0, min(piece, preemptions[k] - t))
            t = preemptions[k] + restart
            k += 1
            continue
        t = commit
        done += piece
        if last:
            return t, hits


def best_fit(free, pod_sizes, bug=None):
    left = list(free) if bug != "mutate" else free
    out = []
    sizes = pod_sizes if bug == "given_order" else sorted(pod_sizes, reverse=True)
    for size in sizes:
        fits = [i for i, f in enumerate(left) if f >= size]
        if not fits:
            return out if bug == "partial" else None
        node = (max if bug == "worst_fit" else min)(fits, key=lambda i: (left[i], i if bug != "worst_fit" else -i))
        left[node] -= size
        out.append((node, size))
    return out


def validate_schedule(schedule, jobs, skip=None):
    n_nodes, gpn = schedule.n_nodes, schedule.gpus_per_node
    by_id = {j.jid: j for j in jobs}
    too_big = {j.jid for j in jobs if j.gpus > n_nodes * gpn}
    if skip != "rejected" and set(schedule.rejected) != too_big:
        raise ValueError("wrong rejections")
    runs = {}
    for s in schedule.segments:
        j = by_id[s.jid]
        if s.jid in too_big:
            raise ValueError("rejected job runs")
        if skip != "submit" and s.start < j.submit - 1e-9:
            raise ValueError("starts before submission")
        if skip != "gang" and sorted(g for _, g in s.placement) != sorted(sch.pods(j.gpus, gpn)):
            raise ValueError("not the whole gang")
        if any(not 0 <= n < n_nodes for n, _ in s.placement):
            raise ValueError("no such node")
        runs.setdefault(s.jid, []).append(s)
    for jid in by_id:
        if jid in too_big:
            continue
        rs = sorted(runs.get(jid, []), key=lambda s: s.start)
        if sum(s.finished for s in rs) != 1 or not rs[-1].finished:
            raise ValueError(f"job {jid} must finish exactly once, last")
        if skip != "work" and not math.isclose(sum(s.end - s.start for s in rs), by_id[jid].duration,
                                               rel_tol=1e-9, abs_tol=1e-6):
            raise ValueError("wrong amount of work")
    if skip == "capacity":
        return
    events = sorted([(s.end, 0, n, -g) for s in schedule.segments for n, g in s.placement] +
                    [(s.start, 1, n, g) for s in schedule.segments for n, g in s.placement])
    used = [0] * n_nodes
    for _, _, n, g in events:
        used[n] += g
        if used[n] > gpn:
            raise ValueError("over capacity")


def test_right_answers_pass(capsys):
    check.onprem_cost_per_gpu_hour(onprem_cost_per_gpu_hour)
    check.break_even_utilization(break_even_utilization)
    check.spot_job_time(spot_job_time)
    check.best_fit(best_fit)
    check.validate_schedule(validate_schedule)
    assert capsys.readouterr().out.count("passed") == 5


@pytest.mark.parametrize("name, module, checker", [
    ("onprem_cost_per_gpu_hour", econ, check.onprem_cost_per_gpu_hour),
    ("break_even_utilization", econ, check.break_even_utilization),
    ("spot_job_time", econ, check.spot_job_time),
    ("best_fit", sch, check.best_fit),
    ("validate_schedule", sch, check.validate_schedule)])
def test_library_reference_is_refused(name, module, checker):
    with pytest.raises(LibraryAnswer):
        checker(getattr(module, name))


def test_the_library_validator_accepts_and_refuses_what_the_checker_expects():
    """The checker's broken schedules really are broken (the reference refuses each)."""
    jobs = check._trace()
    s = sch.simulate(jobs, 4, 8, "priority", True)
    sch.validate_schedule(s, jobs)
    for label, bad in check._broken(s, jobs):
        with pytest.raises(ValueError):
            sch.validate_schedule(bad, jobs)


def _with(bug, fn, key="bug"):
    return lambda *a: fn(*a, **{key: bug})


@pytest.mark.parametrize("bug, match", [("365_days", "capex"), ("no_network", "capex"), ("no_pue", "power")])
def test_tco_bugs_fail(bug, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.onprem_cost_per_gpu_hour(_with(bug, onprem_cost_per_gpu_hour))


@pytest.mark.parametrize("bug", ["clip", "inverted", "no_check"])
def test_break_even_bugs_fail(bug):
    with pytest.raises(ExerciseFailed, match="break_even_utilization"):
        check.break_even_utilization(_with(bug, break_even_utilization))


@pytest.mark.parametrize("bug", ["checkpoint_at_end", "restart_hits", "keep_progress"])
def test_spot_bugs_fail(bug):
    with pytest.raises(ExerciseFailed, match="spot_job_time"):
        check.spot_job_time(_with(bug, spot_job_time))


@pytest.mark.parametrize("bug", ["mutate", "given_order", "partial", "worst_fit"])
def test_best_fit_bugs_fail(bug):
    with pytest.raises(ExerciseFailed, match="best_fit"):
        check.best_fit(_with(bug, best_fit))


@pytest.mark.parametrize("skip", ["rejected", "submit", "gang", "work", "capacity"])
def test_validator_that_skips_an_invariant_fails(skip):
    with pytest.raises(ExerciseFailed, match="validate_schedule"):
        check.validate_schedule(_with(skip, validate_schedule, "skip"))


def test_validator_that_refuses_everything_fails():
    def paranoid(schedule, jobs):
        raise ValueError("no")
    with pytest.raises(ExerciseFailed, match="refused a valid"):
        check.validate_schedule(paranoid)
