"""Tests of utils.dist, the multi-process launcher: results, errors, hangs, cleanup, ports."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from utils import dist as udist
from utils.dist import LaunchTimeout, RankError, launch

REPO = Path(__file__).resolve().parents[1]
HANG_TIMEOUT = 4.0  # seconds a hang test waits; the ranks reach their collective in well under 1 s
SLACK = 6.0  # stack dump (<= 1 s) and reaping, on a busy 2-core machine


def _gone(pid):
    """True once the process is dead and reaped (a zombie counts as alive: it was not reaped)."""
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    try:
        return psutil.Process(pid).status() == psutil.STATUS_DEAD
    except psutil.NoSuchProcess:
        return True


def _pids(folder):
    return [int(p.read_text()) for p in sorted(Path(folder).glob("rank*.pid"))]


def _note_pid(folder, rank):
    Path(folder, f"rank{rank}.pid").write_text(str(os.getpid()))


# Workers live at module level, as a chapter's would live in a cell; see the notebook tests below.

def _noop(rank, world_size):
    return None


def _noop_with_arg(rank, world_size, arg):
    return None


def _return_lock(rank, world_size):
    return threading.Lock()


def _identity_and_sum(rank, world_size):
    t = torch.arange(3, dtype=torch.float32) * (rank + 1)
    dist.all_reduce(t)
    return rank, world_size, os.getpid(), t


def _port(rank, world_size, sleep_s):
    time.sleep(sleep_s)  # keeps the launch (and its store's port) alive while another runs
    return int(os.environ["MASTER_PORT"])


def _raise_on_rank_1(rank, world_size, folder):
    _note_pid(folder, rank)
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # the others would wait here for rank 1 forever


def _exit_on_rank_0(rank, world_size):
    if rank == 0:
        os._exit(3)
    dist.barrier()


def _mismatched_collective(rank, world_size, folder):
    _note_pid(folder, rank)
    t = torch.ones(4)
    if rank == 0:
        dist.all_reduce(t)
    else:
        dist.broadcast(t, src=0)


def _missing_send(rank, world_size, folder):
    _note_pid(folder, rank)
    if rank == 1:
        t = torch.zeros(2)
        dist.recv(t, src=0)  # rank 0 never sends
    return rank


def _chatty(rank, world_size):
    print(f"hello from {rank}")
    print(f"warning from {rank}", file=sys.stderr)
    return rank


def _env_view(rank, world_size):
    return udist.init_from_env(), os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"]


@pytest.fixture(scope="module", autouse=True)
def warm_fork_server():
    """Start the fork server (it imports torch once) so the timings below are of launch alone."""
    launch(_noop, 1)


@pytest.mark.timeout(60)
def test_results_in_rank_order_and_all_reduce_sum():
    out = launch(_identity_and_sum, 4)
    assert [r[0] for r in out] == [0, 1, 2, 3]
    assert all(r[1] == 4 for r in out)
    expected = torch.arange(3, dtype=torch.float32) * (1 + 2 + 3 + 4)
    for _, _, _, t in out:
        torch.testing.assert_close(t, expected)
    pids = [r[2] for r in out]
    assert len(set(pids)) == 4 and os.getpid() not in pids
    assert all(_gone(pid) for pid in pids), "a rank outlived a successful launch"


@pytest.mark.timeout(60)
def test_world_size_one():
    (rank, ws, _, t), = launch(_identity_and_sum, 1)
    assert (rank, ws) == (0, 1)
    torch.testing.assert_close(t, torch.arange(3, dtype=torch.float32))


@pytest.mark.timeout(60)
def test_ranks_see_the_environment_torchrun_would_give():
    out = launch(_env_view, 2)
    assert out == [((0, 2), "0", "127.0.0.1"), ((1, 2), "1", "127.0.0.1")]


@pytest.mark.timeout(60)
def test_worker_output_is_relayed_rank_by_rank(capsys):
    assert launch(_chatty, 2) == [0, 1]
    assert capsys.readouterr().out == ("[rank 0] hello from 0\n[rank 0] warning from 0\n"
                                       "[rank 1] hello from 1\n[rank 1] warning from 1\n")


@pytest.mark.timeout(60)
def test_function_defined_in_main_namespace_works():
    # What a notebook cell does: the function's module is __main__, which a child cannot import,
    # and it reads a global of the cell. exec() in a __main__ namespace reproduces both.
    cell = textwrap.dedent("""
        import torch
        import torch.distributed as dist
        SCALE = 10.0
        def cell_worker(rank, world_size):
            t = torch.tensor([SCALE * rank])
            dist.all_reduce(t)
            return t.item()
    """)
    namespace = {"__name__": "__main__"}
    exec(compile(cell, "<notebook cell>", "exec"), namespace)
    assert namespace["cell_worker"].__module__ == "__main__"
    assert launch(namespace["cell_worker"], 2) == [10.0, 10.0]
    assert launch(lambda rank, ws: rank * 2, 3) == [0, 2, 4]


@pytest.mark.timeout(120)
def test_real_main_module_and_two_processes_in_parallel():
    # `python -c` has a __main__ without a file, as a Jupyter kernel does. Two such processes
    # launch at the same time, so their rendezvous ports must not clash.
    script = textwrap.dedent("""
        import json, torch, torch.distributed as dist
        from utils.dist import launch
        def worker(rank, world_size):
            t = torch.tensor([rank + 1.0])
            dist.all_reduce(t)
            return t.item()
        print("RESULT", json.dumps(launch(worker, 2, timeout=60)))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=100)
        assert proc.returncode == 0, err
        line = next(l for l in out.splitlines() if l.startswith("RESULT "))
        assert json.loads(line[len("RESULT "):]) == [3.0, 3.0]


@pytest.mark.timeout(60)
def test_back_to_back_and_parallel_threads_use_distinct_ports():
    first, second = launch(_port, 2, 0.0), launch(_port, 2, 0.0)
    assert first[0] == first[1] and second[0] == second[1]
    ports, errors = {}, []

    def run(name):
        try:
            ports[name] = launch(_port, 2, 0.5)
        except Exception as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    assert not errors, errors
    assert ports["a"][0] == ports["a"][1] and ports["b"][0] == ports["b"][1]
    assert ports["a"][0] != ports["b"][0], "two concurrent launches shared a port"


@pytest.mark.timeout(60)
def test_raising_rank_gives_rank_error_and_no_leftovers(tmp_path):
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        launch(_raise_on_rank_1, 3, str(tmp_path), timeout=30)
    assert time.monotonic() - start < 15, "the error should end the launch, not the timeout"
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.ranks == [1]
    message = str(err)
    assert "rank(s) [1] of 3 failed" in message
    assert "ValueError: boom from rank 1" in message
    assert 'raise ValueError("boom from rank 1")' in message  # the remote traceback's source
    pids = _pids(tmp_path)
    assert len(pids) == 3 and all(_gone(pid) for pid in pids), "ranks left behind after an error"


@pytest.mark.timeout(60)
def test_rank_that_dies_without_reporting():
    # Rank 1 may also fail, as its peer vanished mid-barrier; rank 0 must be named either way.
    with pytest.raises(RankError) as info:
        launch(_exit_on_rank_0, 2, timeout=30)
    assert 0 in info.value.ranks
    assert "process exited with code 3" in info.value.tracebacks[0]


@pytest.mark.timeout(60)
def test_mismatched_collective_times_out_with_stacks(tmp_path):
    start = time.monotonic()
    with pytest.raises(LaunchTimeout) as info:
        launch(_mismatched_collective, 2, str(tmp_path), timeout=HANG_TIMEOUT)
    elapsed = time.monotonic() - start
    assert HANG_TIMEOUT <= elapsed < HANG_TIMEOUT + SLACK
    err = info.value
    assert isinstance(err, TimeoutError) and err.ranks == [0, 1]
    message = str(err)
    assert "rank(s) [0, 1] of 2 had not finished" in message
    assert "in all_reduce" in message and "in broadcast" in message  # each rank's stack
    assert "in _mismatched_collective" in message and "dist.all_reduce(t)" in message
    pids = _pids(tmp_path)
    assert len(pids) == 2 and all(_gone(pid) for pid in pids), "ranks left behind after a hang"


@pytest.mark.timeout(60)
def test_missing_send_times_out_naming_only_the_stuck_rank(tmp_path):
    start = time.monotonic()
    with pytest.raises(LaunchTimeout) as info:
        launch(_missing_send, 2, str(tmp_path), timeout=HANG_TIMEOUT)
    assert time.monotonic() - start < HANG_TIMEOUT + SLACK
    err = info.value
    assert err.ranks == [1] and list(err.stacks) == [1]
    assert "rank(s) [1] of 2 had not finished (finished: [0])" in str(err)
    assert "dist.recv(t, src=0)" in err.stacks[1] and "in _missing_send" in err.stacks[1]
    pids = _pids(tmp_path)
    assert len(pids) == 2 and all(_gone(pid) for pid in pids)


@pytest.mark.parametrize("fn, world_size, kwargs, error, words", [
    (None, 2, {}, TypeError, "fn must be callable"),
    (_noop, 0, {}, ValueError, "world_size must be an int >= 1"),
    (_noop, 2.0, {}, TypeError, "world_size must be an int >= 1"),
    (_noop, True, {}, TypeError, "world_size must be an int >= 1"),
    (_noop, 2, {"timeout": 0}, ValueError, "timeout must be"),
    (_noop, 2, {"timeout": -1.0}, ValueError, "timeout must be"),
    (_noop, 2, {"timeout": float("inf")}, ValueError, "timeout must be"),
    (_noop, 2, {"timeout": "5"}, TypeError, "timeout must be"),
    (_noop, 2, {"backend": "mpi"}, ValueError, "backend must be 'gloo' or 'nccl'"),
])
def test_bad_inputs_are_rejected_clearly(fn, world_size, kwargs, error, words):
    with pytest.raises(error, match=words):
        launch(fn, world_size, **kwargs)


@pytest.mark.timeout(60)
def test_unpicklable_args_and_results_are_reported():
    with pytest.raises(TypeError, match="fn and args must be picklable"):
        launch(_noop_with_arg, 2, threading.Lock())
    with pytest.raises(RankError, match="fn's return value must be picklable"):
        launch(_return_lock, 2)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs")
def test_nccl_without_gpus_is_rejected():
    with pytest.raises(ValueError, match="one GPU per rank"):
        launch(_noop, 2, backend="nccl")


def test_torchrun_command():
    assert udist.torchrun_command("train.py", 4) == \
        "torchrun --standalone --nnodes=1 --nproc_per_node=4 train.py"
    multi = udist.torchrun_command("labs/my script.py", 8, nnodes=2)
    assert multi.startswith("torchrun --nnodes=2 --rdzv_backend=c10d ")
    assert "--nproc_per_node=8 'labs/my script.py'" in multi
    with pytest.raises(ValueError, match="nproc_per_node"):
        udist.torchrun_command("train.py", 0)


def test_init_from_env_outside_torchrun_says_what_to_do(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        udist.init_from_env()


@pytest.mark.timeout(90)
def test_same_worker_runs_under_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from utils.dist import init_from_env
        def worker(rank, world_size):
            t = torch.tensor([rank + 1.0])
            dist.all_reduce(t)
            print(f"RANK {rank} {world_size} {t.item()}", flush=True)
        if __name__ == "__main__":
            rank, world_size = init_from_env()
            worker(rank, world_size)
            dist.destroy_process_group()
    """))
    command = udist.torchrun_command(script, 2).split()
    command[0] = str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=80)
    assert done.returncode == 0, done.stderr[-3000:]
    # both ranks share one stdout, so their lines may interleave: find the records
    records = sorted(re.findall(r"RANK \d+ \d+ [\d.]+?(?=RANK|\s|$)", done.stdout))
    assert records == ["RANK 0 2 3.0", "RANK 1 2 3.0"], done.stdout


@pytest.mark.timeout(120)
def test_in_a_real_jupyter_kernel():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    cells = [
        """
        import torch, torch.distributed as dist
        from utils.dist import launch, RankError
        SCALE = 10.0
        def worker(rank, world_size):
            t = torch.tensor([SCALE * (rank + 1)])
            dist.all_reduce(t)
            print("done", rank)
            return t.item()
        print(launch(worker, 2))
        """,
        """
        def broken(rank, world_size):
            if rank == 1:
                1 / 0
            dist.barrier()
        try:
            launch(broken, 2)
        except RankError as e:
            print(e)
        """,
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(c)) for c in cells]
    nbclient.NotebookClient(nb, timeout=90, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    first = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert first == "[rank 0] done 0\n[rank 1] done 1\n[30.0, 30.0]\n"
    second = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert "rank(s) [1] of 2 failed" in second and "ZeroDivisionError" in second
    assert "    1 / 0" in second  # the cell's source line, which only the kernel knows
