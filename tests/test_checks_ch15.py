"""Lab 15's checkers pass right answers, fail planted bugs, and refuse the library's own code.

The right answers below are written the way the lab asks; each wrong one carries one bug.
"""
import hashlib
import importlib
import io
import math
import os
import random
import signal
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist

from utils import economics as econ
from utils import reliability as rel
from utils.checks import ExerciseFailed, LibraryAnswer, NotAttempted
from utils.checks import ch15 as check

# ----------------------------------------------------------------------------- exercise 1
MAGIC = b"LAB15\n"


def save_checkpoint(path, state, bug=None):
    if not isinstance(state, dict):
        raise TypeError("state must be a dict")
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    blob = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
    if bug == "in_place":
        with open(path, "wb") as f:
            f.write(blob)
        return
    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    if bug == "no_rename":
        with open(path, "wb") as f:
            f.write(blob)
        return
    os.replace(tmp, path)


def load_checkpoint(path, bug=None):
    data = open(path, "rb").read()
    if bug == "no_checks":
        return torch.load(io.BytesIO(data.split(b"\n", 2)[2]), weights_only=True)
    if not data.startswith(MAGIC):
        raise ValueError(f"{path}: not a checkpoint")
    digest, _, payload = data[len(MAGIC):].partition(b"\n")
    if bug != "no_checksum" and hashlib.sha256(payload).hexdigest().encode() != digest:
        raise ValueError(f"{path}: truncated or corrupted")
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot be read ({err})") from None


def test_checkpoint_io_passes():
    check.checkpoint_io(save_checkpoint, load_checkpoint)


@pytest.mark.parametrize("bug", ["no_rename"])
def test_checkpoint_io_save_bugs(bug):
    with pytest.raises(ExerciseFailed):
        check.checkpoint_io(lambda p, s: save_checkpoint(p, s, bug), load_checkpoint)


@pytest.mark.parametrize("bug", ["no_checks", "no_checksum"])
def test_checkpoint_io_load_bugs(bug):
    with pytest.raises(ExerciseFailed):
        check.checkpoint_io(save_checkpoint, lambda p: load_checkpoint(p, bug))


def test_checkpoint_io_refuses_library():
    with pytest.raises(LibraryAnswer):
        check.checkpoint_io(rel.save_checkpoint, rel.load_checkpoint)


# ----------------------------------------------------------------------------- exercise 2
def make_model():
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(16, 1))


def _rng():
    k, keys, pos, hg, gs = np.random.get_state()
    return {"py": random.getstate(), "np": (k, torch.from_numpy(keys.astype(np.int64)), pos, hg, gs),
            "torch": torch.get_rng_state()}


def _set_rng(s, bug=None):
    if bug != "no_python_rng":
        random.setstate(s["py"])
    k, keys, pos, hg, gs = s["np"]
    np.random.set_state((k, keys.numpy().astype(np.uint32), pos, hg, gs))
    if bug != "no_torch_rng":
        torch.set_rng_state(s["torch"])


def make_worker(bug=None, save=None, load=None):
    """The worker of exercise 2; ``save``/``load`` replace the test's own checkpoint functions."""
    def worker(rank, world_size, ckpt_dir, n_steps, every, kill_at):
        torch.manual_seed(0)
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(100 + rank)
        random.seed(rank)
        np.random.seed(rank)
        g = torch.Generator().manual_seed(rank)
        X, Y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
        path = os.path.join(ckpt_dir, f"rank{rank}.ckpt")
        step, losses = 0, []
        if os.path.exists(path) and bug != "restart_from_scratch":
            s = (load or load_checkpoint)(path)
            model.load_state_dict(s["model"])
            if bug != "no_optimizer":
                opt.load_state_dict(s["optimizer"])
            _set_rng(s["rng"], bug)
            step, losses = s["step"], s["losses"]
        resumed_from = step
        while step < n_steps:
            if step == kill_at and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            i = (step * 8) % 64
            x = X[i:i + 8] * (1 + 0.1 * float(np.random.rand()))
            y = Y[i:i + 8] + random.gauss(0, 0.01)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world_size
            opt.step()
            t = loss.detach().clone()
            dist.all_reduce(t)
            losses.append((t / world_size).item())
            step += 1
            if step % every == 0:
                (save or save_checkpoint)(path, {"model": model.state_dict(),
                                                 "optimizer": opt.state_dict(), "rng": _rng(),
                                                 "step": step, "losses": list(losses)})
        return {"losses": losses, "resumed_from": resumed_from}
    return worker


def test_kill_and_resume_passes():
    check.kill_and_resume(make_worker())


@pytest.mark.parametrize("bug", ["no_optimizer", "no_torch_rng", "no_python_rng",
                                 "restart_from_scratch"])
def test_kill_and_resume_bugs(bug):
    with pytest.raises(ExerciseFailed):
        check.kill_and_resume(make_worker(bug))


def test_kill_and_resume_refuses_a_worker_that_uses_the_library():
    with pytest.raises(LibraryAnswer, match="utils.reliability"):
        check.kill_and_resume(make_worker(save=rel.save_checkpoint, load=rel.load_checkpoint))


def test_kill_and_resume_refuses_a_worker_that_imports_the_library():
    base = make_worker()

    def worker(rank, world_size, ckpt_dir, n_steps, every, kill_at):
        from utils.reliability import rng_state   # noqa: F401  (the reference's RNG capture)
        return base(rank, world_size, ckpt_dir, n_steps, every, kill_at)

    with pytest.raises(LibraryAnswer, match="utils.reliability"):
        check.kill_and_resume(worker)


def test_kill_and_resume_takes_the_library_when_allowed(library_answers_allowed):
    check.kill_and_resume(make_worker(save=rel.save_checkpoint, load=rel.load_checkpoint))


# ----------------------------------------------------------------------------- exercise 3
# Each run below starts the real torchrun (several seconds): the bugs are the entry's own
# (crash on every attempt, never crash) and one of the worker's, seen only after a restart.
def make_entry(bug=None, worker=None):
    worker = worker or make_worker()

    def torchrun_entry(ckpt_dir, n_steps, every, crash_at):
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              world_size, is_master=False)
        dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt{attempt}", store),
                                rank=rank, world_size=world_size)
        kill_at = crash_at if attempt == 0 or bug == "crash_every_attempt" else -1
        if bug == "never_crash":
            kill_at = -1
        try:
            result = worker(rank, world_size, ckpt_dir, n_steps, every, kill_at)
        finally:
            dist.destroy_process_group()
        return None if bug == "no_return" else result
    return torchrun_entry


TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")


@pytest.fixture
def torchrun_folders(monkeypatch):
    """The folders the checker's torchrun runs use (each process's command line names one)."""
    made, mkdtemp = [], tempfile.mkdtemp

    def recording(*args, **kwargs):
        made.append(mkdtemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(check.tempfile, "mkdtemp", recording)
    return made


def _left_behind(folders):
    return [pid for d in folders for pid in check._pids_running(d)]


def test_torchrun_restart_passes(capsys, torchrun_folders):
    env = {k: os.environ.get(k) for k in TORCHRUN_ENV}
    check.torchrun_restart(make_entry(), make_worker())
    assert "restarted both ranks once" in capsys.readouterr().out
    assert {k: os.environ.get(k) for k in TORCHRUN_ENV} == env    # the dry run put them back
    assert not dist.is_initialized()
    assert any("lab15-torchrun-" in d for d in torchrun_folders)
    assert _left_behind(torchrun_folders) == []
    assert not any(os.path.exists(d) for d in torchrun_folders if "lab15-" in d)


@pytest.mark.parametrize("bug, message", [("crash_every_attempt", "exit status"),
                                          ("never_crash", "restarts"),
                                          ("no_torch_rng", "loss at step 10")])
def test_torchrun_restart_bugs(bug, message, torchrun_folders):
    worker = make_worker("no_torch_rng" if bug == "no_torch_rng" else None)
    with pytest.raises(ExerciseFailed, match=message):
        check.torchrun_restart(make_entry(bug, worker), worker)
    assert _left_behind(torchrun_folders) == []


def test_torchrun_restart_entry_must_return_the_result():
    # caught by the dry run in this process, before torchrun starts
    with pytest.raises(ExerciseFailed, match="train_worker"):
        check.torchrun_restart(make_entry("no_return"), make_worker())


def test_torchrun_restart_names_an_unfinished_stub():
    def torchrun_entry(ckpt_dir, n_steps, every, crash_at):
        raise NotImplementedError("exercise torchrun_restart: replace this line with your code")

    def train_worker(rank, world_size, ckpt_dir, n_steps, every, kill_at):
        raise NotImplementedError("exercise kill_and_resume: replace this line with your code")

    with pytest.raises(NotAttempted, match="torchrun_entry"):
        check.torchrun_restart(torchrun_entry, make_worker())
    with pytest.raises(NotAttempted, match="kill_and_resume"):
        check.torchrun_restart(make_entry(worker=train_worker), train_worker)
    assert "RANK" not in os.environ and not dist.is_initialized()


def test_torchrun_restart_refuses_the_library_inside_the_entry():
    worker = make_worker(save=rel.save_checkpoint, load=rel.load_checkpoint)
    with pytest.raises(LibraryAnswer, match="utils.reliability"):
        check.torchrun_restart(make_entry(worker=worker), make_worker())
    with pytest.raises(LibraryAnswer, match="utils.reliability"):
        check.torchrun_restart(make_entry(), worker)


def test_torchrun_restart_refuses_the_library_imported_in_the_torchrun_processes():
    # a name the static scan cannot read: the torchrun processes report what they imported
    base = make_worker()

    def worker(rank, world_size, ckpt_dir, n_steps, every, kill_at):
        importlib.import_module(".".join(["utils", "reliability"]))
        return base(rank, world_size, ckpt_dir, n_steps, every, kill_at)

    with pytest.raises(LibraryAnswer, match="imported utils.reliability"):
        check.torchrun_restart(make_entry(worker=worker), make_worker())


# ----------------------------------------------------------------------------- exercise 4
def job_time(work_s, interval_s, checkpoint_s, restart_s, failures, bug=None):
    for name, v in [("work_s", work_s), ("interval_s", interval_s)]:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be finite and > 0")
    for name, v in [("checkpoint_s", checkpoint_s), ("restart_s", restart_s)]:
        if not (math.isfinite(v) and v >= 0) and bug != "no_cost_check":
            raise ValueError(f"{name} must be finite and >= 0")
    t, done, k = 0.0, 0.0, 0
    fails = list(failures)
    while True:
        piece = min(interval_s, work_s - done)
        last = done + piece >= work_s
        # the last piece needs no checkpoint (the "checkpoint_last" bug writes one anyway)
        seg = piece + (0.0 if last and bug != "checkpoint_last" else checkpoint_s)
        while k < len(fails) and fails[k] < t:
            k += 1
        if k < len(fails) and fails[k] < t + seg:
            t = fails[k] + (0.0 if bug == "free_restart" else restart_s)
            k += 1
            continue
        t += seg
        done += piece
        if last:
            return t


def test_job_time_passes():
    check.job_time(job_time)


@pytest.mark.parametrize("bug", ["checkpoint_last", "free_restart", "no_cost_check"])
def test_job_time_bugs(bug):
    with pytest.raises(ExerciseFailed):
        check.job_time(lambda *a: job_time(*a, bug=bug))


def test_job_time_refuses_library():
    with pytest.raises(LibraryAnswer):
        check.job_time(econ.spot_job_time)


# ----------------------------------------------------------------------------- exercise 5
def find_stragglers(step_times, bug=None):
    t = torch.as_tensor(step_times, dtype=torch.float64)
    if t.ndim != 2:
        raise ValueError("step_times must be 2-D (steps, ranks)")
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise ValueError("step_times must be finite and > 0")
    per_rank = t.mean(0) if bug == "mean" else t.median(0).values
    if bug == "max":
        per_rank = t.max(0).values
    thr = 1.02 if bug == "tight" else 1.25
    return [r for r in range(t.shape[1]) if per_rank[r] > thr * per_rank.median()]


def test_find_stragglers_passes():
    check.find_stragglers(find_stragglers)


@pytest.mark.parametrize("bug", ["max", "mean", "tight"])
def test_find_stragglers_bugs(bug):
    with pytest.raises(ExerciseFailed):
        check.find_stragglers(lambda t: find_stragglers(t, bug))


def test_find_stragglers_refuses_library():
    with pytest.raises(LibraryAnswer):
        check.find_stragglers(rel.find_stragglers)


# ----------------------------------------------------------------------------- exercise 6
def census_check(rows, total, bug=None):
    if not isinstance(total, int) or total < 1:
        raise ValueError("total must be an int >= 1")
    tol = 0.5 if bug == "loose" else 0.05 + 1e-9
    if bug == "truncate":
        return [r[0] for r in rows if math.floor(1000.0 * r[2] / total) / 10 != r[3]]
    return [r[0] for r in rows if abs(100.0 * r[2] / total - r[3]) > tol]


def test_census_check_passes():
    check.census_check(census_check)


@pytest.mark.parametrize("bug", ["loose", "truncate"])
def test_census_check_bugs(bug):
    with pytest.raises(ExerciseFailed):
        check.census_check(lambda rows, total: census_check(rows, total, bug))


def test_census_check_refuses_library():
    with pytest.raises(LibraryAnswer):
        check.census_check(rel.census_mismatches)


def test_census_has_one_printed_share_off():
    # Table 5: 148 of 419 is 35.3 %, printed 30.1 %; every other row rounds right.
    assert rel.census_mismatches(rel.LLAMA3_CENSUS, 419) == ["Faulty GPU"]
    assert sum(r[2] for r in rel.LLAMA3_CENSUS) == 419


def test_kill_and_resume_names_an_unfinished_save_stub():
    # the worker is written, but the save_checkpoint of exercise 1 is still the stub
    def save_stub(path, state):
        raise NotImplementedError("exercise checkpoint_io: replace this line with your code")

    saved = globals()["save_checkpoint"]
    globals()["save_checkpoint"] = save_stub
    try:
        with pytest.raises(NotAttempted, match="checkpoint_io"):
            check.kill_and_resume(make_worker())
    finally:
        globals()["save_checkpoint"] = saved


def test_kill_and_resume_dry_run_leaves_rng_alone():
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    with pytest.raises(ExerciseFailed):
        check.kill_and_resume(make_worker("no_optimizer"))
    assert torch.equal(torch.rand(3), want)


def test_kill_and_resume_wants_rank_1_killed_by_sigkill():
    base = make_worker()

    def raising_worker(rank, world_size, ckpt_dir, n_steps, every, kill_at):
        if rank == 1 and kill_at >= 0:     # an exception instead of a kill
            raise RuntimeError("pretend crash")
        return base(rank, world_size, ckpt_dir, n_steps, every, kill_at)

    with pytest.raises(ExerciseFailed, match="SIGKILL"):
        check.kill_and_resume(raising_worker)
