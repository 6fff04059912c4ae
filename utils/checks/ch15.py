"""Checkers for lab 15, fault tolerance.

The oracles: files cut off, flipped and forged here, for the checkpoint format; the learner's
own uninterrupted run, for kill-and-resume (losses must match bit for bit);
:func:`utils.economics.spot_job_time`, for the job timeline; step times simulated here with a
known slow rank and known noise, for the straggler detector; 100 * count / total recomputed
here, for the census.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import tempfile

import torch
import torch.distributed as dist

from .. import dist as udist
from .. import economics as econ
from .. import reliability as rel
from . import exercise, expect_close, expect_equal, expect_raises, expect_type, fail


# ----------------------------------------------------------------------------- exercise 1
def _flip_bit(data: bytes, tensor: torch.Tensor) -> bytes:
    """``data`` with one bit flipped inside the stored bytes of ``tensor`` (silent corruption:
    the file still unpickles, one weight is wrong)."""
    i = data.find(tensor.numpy().tobytes())
    if i < 0:
        fail("the saved file", "the tensors' bytes stored as they are (torch.save)",
             "a file in which the model's weights cannot be found",
             "save the state with torch.save, after a header line")
    i += 5
    return data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]


@exercise
def checkpoint_io(save, load):
    """``save(path, state)`` writes atomically; ``load(path)`` returns the state or raises
    ValueError for a truncated, corrupted or foreign file."""
    d = tempfile.mkdtemp(prefix="lab15-")
    try:
        g = torch.Generator().manual_seed(0)
        state = {"model": {"w": torch.randn(4, 3, generator=g), "b": torch.zeros(3)},
                 "step": 7, "losses": [0.5, 0.25], "rng": torch.get_rng_state()}
        path = os.path.join(d, "ckpt")
        save(path, state)
        expect_equal(sorted(os.listdir(d)), ["ckpt"], "files in the folder after save",
                     hint="write to a temporary name in the same folder, then os.replace it over "
                          "the final name: no temporary file may be left behind")
        got = load(path)
        expect_type(got, dict, "load(path)")
        expect_equal(sorted(got), sorted(state), "keys of the loaded state")
        if not (torch.equal(got["model"]["w"], state["model"]["w"])
                and torch.equal(got["rng"], state["rng"]) and got["step"] == 7
                and got["losses"] == [0.5, 0.25]):
            fail("load(path)", "the state that was saved, bit for bit", "a different state")
        # overwrite: the new state replaces the old one whole
        save(path, {**state, "step": 8})
        expect_equal(load(path)["step"], 8, "step after saving over an existing checkpoint")
        data = open(path, "rb").read()
        cases = [("cut off at half its length", data[: len(data) // 2]),
                 ("cut off 1 byte short", data[:-1]),
                 ("with one bit of a weight flipped (torch.load alone reads it without error)",
                  _flip_bit(data, state["model"]["w"])),
                 ("empty", b"")]
        buf = os.path.join(d, "plain.pt")
        torch.save({"step": 3}, buf)
        cases.append(("written by plain torch.save (a foreign file)", open(buf, "rb").read()))
        cases.append(("a text file", b"hello, not a checkpoint\n"))
        for label, blob in cases:
            bad = os.path.join(d, "bad")
            with open(bad, "wb") as f:
                f.write(blob)
            expect_raises(lambda: load(bad), ValueError, f"load of a checkpoint {label}",
                          "a ValueError naming the file",
                          "store a header and a checksum of the payload (hashlib.sha256) and "
                          "verify both before unpickling anything")
        expect_raises(lambda: save(os.path.join(d, "x"), [1, 2]), (TypeError, ValueError),
                      "save(path, [1, 2])", "a TypeError: state must be a dict")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return "round trip bit-identical, atomic overwrite, 6 damaged or foreign files refused"


# ----------------------------------------------------------------------------- exercise 2
def _losses_of(result, what):
    expect_type(result, list, what)
    if len(result) != 2 or not all(isinstance(r, dict) for r in result):
        fail(what, "one dict per rank (2 ranks)", repr(result)[:200])
    for r in result:
        for k in ("losses", "resumed_from"):
            if k not in r:
                fail(what, "dicts with keys 'losses' and 'resumed_from'", f"keys {sorted(r)}")
    return result


def _dry_run(worker):
    """Run the worker once in this process on a one-rank gloo group (2 steps, a checkpoint
    after each, then a resume), so that an unfinished stub -- the worker's, or the
    save/load functions it calls -- is reported as "not attempted" with its name, before
    anything is launched. The notebook's RNG states are put back afterwards."""
    saved = rel.rng_state()
    own_group = not (dist.is_available() and dist.is_initialized())
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    d = tempfile.mkdtemp(prefix="lab15-dry-")
    try:
        worker(0, 1, d, 2, 1, -1)
        worker(0, 1, d, 2, 1, -1)
    finally:
        shutil.rmtree(d, ignore_errors=True)
        if own_group:
            dist.destroy_process_group()
        rel.set_rng_state(saved)


@exercise
def kill_and_resume(worker, n_steps=24, every=5, kill_at=13):
    """``worker(rank, world_size, ckpt_dir, n_steps, every, kill_at)`` run with
    :func:`utils.dist.launch`: killed by SIGKILL at ``kill_at``, resumed, losses bit-identical."""
    _dry_run(worker)
    d = tempfile.mkdtemp(prefix="lab15-")
    try:
        clean_dir, kill_dir = os.path.join(d, "clean"), os.path.join(d, "killed")
        os.makedirs(clean_dir)
        os.makedirs(kill_dir)
        clean = _losses_of(udist.launch(worker, 2, clean_dir, n_steps, every, -1, timeout=120),
                           "launch(worker, 2, ..., kill_at=-1)")
        ref = clean[0]["losses"]
        expect_equal(len(ref), n_steps, "number of losses of an uninterrupted run")
        expect_equal(clean[0]["resumed_from"], 0, "resumed_from of a run with no checkpoint")
        if clean[1]["losses"] != ref:
            fail("losses of rank 1 vs rank 0", "the same (all-reduced) losses on every rank",
                 "different losses", "all-reduce the loss before recording it")
        try:
            udist.launch(worker, 2, kill_dir, n_steps, every, kill_at, timeout=120)
        except udist.RankError as err:
            killed = err
        else:
            fail(f"the run with kill_at={kill_at}", "a rank killed by SIGKILL (launch raises "
                 "RankError)", "the run finished",
                 "at step kill_at, rank 1 calls os.kill(os.getpid(), signal.SIGKILL)")
        if killed.cause != 1 or "-9" not in killed.tracebacks.get(1, ""):
            fail(f"the run with kill_at={kill_at}", "rank 1 killed by SIGKILL (exit code -9), "
                 "the launcher naming it as the cause",
                 f"rank {killed.cause} failed first: {killed.tracebacks.get(killed.cause, '')[-160:]}",
                 "at step kill_at, rank 1 (only) calls os.kill(os.getpid(), signal.SIGKILL)")
        # a checkpoint write cut off by the crash: a stray temporary file must be ignored
        with open(os.path.join(kill_dir, ".tmp-cut-off"), "wb") as f:
            f.write(b"COURSE-CKPT-1\n" + b"0" * 10)
        resumed = _losses_of(udist.launch(worker, 2, kill_dir, n_steps, every, -1, timeout=120),
                             "launch(worker, 2, ..., kill_at=-1) after the kill")
        start = resumed[0]["resumed_from"]
        last_ckpt = (kill_at // every) * every
        expect_equal(start, last_ckpt, "resumed_from after a kill at step "
                     f"{kill_at} with a checkpoint every {every} steps",
                     hint="resume from the last complete checkpoint (saved after step s means "
                          "steps 0..s-1 are done and resumed_from = s)")
        got = resumed[0]["losses"]
        expect_equal(len(got), n_steps, "number of losses after the resume (the history "
                     "travels in the checkpoint)")
        for i, (a, b) in enumerate(zip(got, ref)):
            if a != b:
                fail(f"loss at step {i} after the resume", f"{b!r} (the uninterrupted run, "
                     "bit for bit)", repr(a),
                     "restore the model, the optimizer, every RNG (torch, Python, NumPy) and "
                     "the data position from the checkpoint")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return (f"killed at step {kill_at}, resumed from step {last_ckpt}: {n_steps} losses "
            "bit-identical to the uninterrupted run")


# ----------------------------------------------------------------------------- exercise 3
@exercise
def job_time(fn):
    """``fn(work_s, interval_s, checkpoint_s, restart_s, failures)`` -> wall seconds."""
    rng = random.Random(15)
    cases = [(100.0, 30.0, 5.0, 10.0, []), (100.0, 30.0, 5.0, 10.0, [40.0]),
             (100.0, 30.0, 5.0, 10.0, [35.0]), (100.0, 30.0, 5.0, 10.0, [34.9, 50.0]),
             (100.0, 200.0, 5.0, 10.0, [99.0]), (10.0, 3.0, 1.0, 2.0, [4.0, 5.0, 300.0])]
    for _ in range(30):
        w, tau, dl, r = rng.uniform(50, 500), rng.uniform(5, 80), rng.uniform(0, 10), rng.uniform(0, 20)
        t, fails = 0.0, []
        for _ in range(rng.randint(0, 8)):
            t += rng.expovariate(1 / 60)
            fails.append(round(t, 3))
        cases.append((w, tau, dl, r, fails))
    for c in cases:
        want, _ = econ.spot_job_time(*c)
        got = fn(*c)
        expect_close(got, want, rtol=1e-9, atol=1e-9,
                     what=f"wall time for work {c[0]:.4g} s, interval {c[1]:.4g} s, checkpoint "
                          f"{c[2]:.4g} s, restart {c[3]:.4g} s, failures at {c[4]}",
                     hint="a failure during work or a checkpoint loses everything since the "
                          "last complete checkpoint; the job resumes at failure + restart; "
                          "failures during a restart, or after the end, do not count; the last "
                          "piece of work needs no checkpoint")
    for label, args in [("negative checkpoint cost", (100.0, 30.0, -1.0, 10.0, [])),
                        ("zero interval", (100.0, 0.0, 5.0, 10.0, [])),
                        ("NaN work", (math.nan, 30.0, 5.0, 10.0, [])),
                        ("negative restart cost", (100.0, 30.0, 5.0, -2.0, []))]:
        expect_raises(lambda: fn(*args), (ValueError, TypeError), f"job time with {label}",
                      "a ValueError naming the argument")
    return f"{len(cases)} timelines match; bad costs refused"


# ----------------------------------------------------------------------------- exercise 4
def _noisy(steps, ranks, slow, factor, seed):
    g = random.Random(seed)
    rows = []
    for _ in range(steps):
        row = []
        for r in range(ranks):
            t = 0.1 * math.exp(g.gauss(0, 0.08))
            if g.random() < 0.05:       # an occasional hiccup: another process, a page fault
                t *= g.uniform(2, 5)
            if r in slow:
                t *= factor
            row.append(t)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


@exercise
def find_stragglers(fn):
    """``fn(step_times)`` -> sorted list of slow ranks; no false alarm on noise."""
    cases = []
    for seed in range(12):
        cases.append((f"noise only, 8 ranks, seed {seed}", _noisy(40, 8, (), 1.0, seed), []))
    for seed, slow, factor in [(1, (3,), 1.6), (2, (0,), 2.0), (3, (7,), 1.5), (4, (2, 5), 1.7)]:
        cases.append((f"rank(s) {list(slow)} slowed {factor}x, seed {seed}",
                      _noisy(40, 8, slow, factor, seed), list(slow)))
    spiky = _noisy(40, 4, (), 1.0, 99)
    spiky[5, 1] *= 50.0           # one rank's single very slow step
    cases.append(("one rank with one 50x step", spiky, []))
    bursty = _noisy(40, 4, (), 1.0, 98)
    bursty[10:14, 2] *= 10.0      # one rank stalls for 4 steps of 40 (a checkpoint, a GC pause)
    cases.append(("one rank with a 4-step stall of 10x", bursty, []))
    for label, t, want in cases:
        got = fn(t)
        expect_type(got, list, f"find_stragglers({label})")
        expect_equal(got, want, f"find_stragglers({label})",
                     hint="compare each rank's typical (median) step time with the median "
                          "across ranks; a single slow step or noise must not flag a rank")
    for label, bad in [("a 1-D tensor", torch.ones(5)), ("a NaN", torch.tensor([[0.1, math.nan]])),
                       ("a negative time", torch.tensor([[0.1, -0.1]]))]:
        expect_raises(lambda: fn(bad), (ValueError, TypeError), f"find_stragglers({label})",
                      "a ValueError naming step_times")
    return f"{len(cases)} simulated runs: slowed ranks flagged, no false alarm on noise"


# ----------------------------------------------------------------------------- exercise 5
@exercise
def census_check(fn):
    """``fn(rows, total)`` -> names whose printed share does not match count / total."""
    def truth(rows, total):
        return [r[0] for r in rows if abs(100.0 * r[2] / total - r[3]) > 0.05 + 1e-9]

    table = list(rel.LLAMA3_CENSUS)
    total = rel.LLAMA3_RUN["unexpected"]
    cases = [("Table 5 of the Llama 3 paper", table, total)]
    fixed = [(n, c, k, round(100.0 * k / total, 1)) for n, c, k, _ in table]
    cases.append(("a consistent table", fixed, total))
    planted = list(fixed)
    planted[7] = planted[7][:3] + (1.6,)          # 7/419 = 1.67 % printed as 1.6
    cases.append(("a table with NIC printed 1.6 %", planted, total))
    cases.append(("three rows", [("a", "x", 1, 33.3), ("b", "x", 1, 33.3), ("c", "x", 1, 33.4)], 3))
    for label, rows, tot in cases:
        expect_equal(fn(rows, tot), truth(rows, tot), f"census_check({label}, total={tot})",
                     hint="a printed share with one decimal matches when it is within 0.05 "
                          "percentage points of 100 * count / total")
    expect_raises(lambda: fn(table, 0), (ValueError, TypeError), "census_check(rows, total=0)",
                  "a ValueError: total must be >= 1")
    return "finds the row whose share does not match its count; silent on consistent tables"
