"""Tests of utils.dist, the multi-process launcher: results, errors, hangs, cleanup, ports."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from utils import dist as udist
from utils.dist import HINT_SEND_CYCLE, HINT_UNEVEN, LaunchTimeout, RankError, launch

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


def _uneven_all_gather(rank, world_size):
    # Each rank sizes every piece like its own; the last rank's piece is one element longer.
    # Rank 0 receives the long piece into a short buffer: gloo aborts that process ("Received
    # data size doesn't match"), and its peers lose their connection to it.
    n = 2 + (rank == world_size - 1)
    pieces = [torch.empty(n) for _ in range(world_size)]
    dist.all_gather(pieces, torch.ones(n))


def _blocking_ring(rank, world_size, folder):
    _note_pid(folder, rank)
    x, y = torch.ones(1024), torch.empty(1024)
    dist.send(x, (rank + 1) % world_size)  # every rank sends first: no one is receiving
    dist.recv(y, (rank - 1) % world_size)


def _modules_at_start(rank, world_size):
    return sorted(m for m in ("torch._dynamo", "torch.distributed.fsdp") if m in sys.modules)


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
    assert HINT_SEND_CYCLE not in message  # a mismatch, not a ring of blocking sends
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
    assert HINT_SEND_CYCLE not in str(err)  # stuck in recv, not in send
    pids = _pids(tmp_path)
    assert len(pids) == 2 and all(_gone(pid) for pid in pids)


@pytest.mark.timeout(60)
def test_ring_of_blocking_sends_gets_the_post_the_receive_hint(tmp_path):
    with pytest.raises(LaunchTimeout) as info:
        launch(_blocking_ring, 3, str(tmp_path), timeout=HANG_TIMEOUT)
    err = info.value
    assert err.ranks == [0, 1, 2]
    assert all("dist.send(x, (rank + 1) % world_size)" in err.stacks[r] for r in err.ranks)
    assert HINT_SEND_CYCLE in str(err) and "isend" in HINT_SEND_CYCLE
    pids = _pids(tmp_path)
    assert len(pids) == 3 and all(_gone(pid) for pid in pids)


@pytest.mark.timeout(60)
def test_uneven_all_gather_names_the_rank_that_caused_it():
    with pytest.raises(RankError) as info:
        launch(_uneven_all_gather, 3, timeout=30)
    err = info.value
    message = str(err)
    assert err.cause == 0, message
    assert "Received data size doesn't match" in err.tracebacks[0]
    assert "rank 0 failed first" in message
    # the cause comes first and in full, with the hint; the peers' resets come after it
    cause_at = message.index("--- rank 0 (the cause) ---")
    assert cause_at < message.index(HINT_UNEVEN)
    assert message.index("Received data size doesn't match") < message.index(HINT_UNEVEN)
    for r in err.ranks:
        if r != 0:
            assert "by peer" in err.tracebacks[r]
            assert message.index(f"--- rank {r} (lost its connection") > cause_at


def test_root_cause_skips_errors_that_blame_a_peer():
    reset = "Traceback ...\nRuntimeError: Read error [127.0.0.1]:1: Connection reset by peer."
    closed = "Traceback ...\nRuntimeError: Connection closed by peer [127.0.0.1]:2."
    crash = "process exited with code -6; its last output:\n    terminate called\n    boom"
    raised = "Traceback ...\nValueError: bad shape"
    # the consequence arrived first; the cause is the first error that is not one
    assert udist.root_cause({0: reset, 1: crash, 2: closed}, order=[0, 2, 1]) == 1
    assert udist.root_cause({0: reset, 3: raised}, order=[0, 3]) == 3
    assert udist.root_cause({2: raised, 3: crash}, order=[3, 2]) == 3  # arrival order decides
    assert udist.root_cause({4: reset, 1: closed}, order=[4, 1]) == 4  # all consequences: first
    assert udist.root_cause({5: raised, 1: reset}) == 5  # no order: rank order, causes first
    mismatch = "RuntimeError: Received data size doesn't match expected size. Connection reset"
    assert udist.root_cause({0: reset, 1: mismatch}, order=[0, 1]) == 1
    with pytest.raises(ValueError, match="errors must name"):
        udist.root_cause({})
    with pytest.raises(TypeError, match="errors must be a dict"):
        udist.root_cause(["boom"])
    with pytest.raises(TypeError, match="order must be"):
        udist.root_cause({0: raised}, order=0)


def test_rank_error_message_puts_the_cause_first():
    errors = {0: "Traceback ...\nRuntimeError: Connection reset by peer",
              1: "Traceback ...\nRuntimeError: Received data size doesn't match expected size"}
    err = udist._rank_error(errors, [0, 1], 2)
    assert err.cause == 1 and err.ranks == [0, 1]
    text = str(err)
    assert text.startswith("rank(s) [0, 1] of 2 failed; rank 1 failed first")
    assert text.index("--- rank 1 (the cause) ---") < text.index(HINT_UNEVEN) \
        < text.index("--- rank 0 (lost its connection to a failed peer) ---")
    both = udist._rank_error({0: "Traceback ...\nValueError: x", 1: "Traceback ...\nValueError: y"},
                             [1, 0], 2)
    assert both.cause == 1 and str(both).startswith("rank(s) [0, 1] of 2 failed; rank 1 failed "
                                                    "first:\n--- rank 1 (first to fail) ---")
    assert "--- rank 0 (failed too) ---\nValueError: x" in str(both)
    assert "consequence" not in str(both)
    alone = udist._rank_error({2: "Traceback ...\nValueError: x"}, [2], 3)
    assert alone.cause == 2 and HINT_UNEVEN not in str(alone) and "(the cause)" not in str(alone)


@pytest.mark.timeout(60)
def test_fork_server_preloads_what_ranks_would_import():
    if "forkserver" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("no fork server on this platform")
    assert launch(_modules_at_start, 2) == [["torch._dynamo", "torch.distributed.fsdp"]] * 2


def _session_alive(sid):
    """Processes of session ``sid`` that are still running (zombies wait for a reaper that
    this test does not control, and use nothing: they do not count)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
        if int(session) == sid and state != "Z":
            alive.append(int(entry))
    return alive


_SPINNING_LAUNCHER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from utils.dist import launch
    def spin(rank, world_size, folder):
        Path(folder, f"rank{rank}.pid").write_text(str(os.getpid()))
        while True:
            pass
    launch(spin, 2, sys.argv[1], timeout=300)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(240)
def test_killed_launcher_leaves_no_process_and_no_folder(tmp_path):
    # Three launchers, each in its own session, each running two spinning ranks; once the ranks
    # are up, one launcher gets SIGTERM (a scheduler), one SIGKILL (the OOM killer, a forced
    # kernel restart) and one SIGINT (Ctrl-C).
    env = dict(os.environ, PYTHONPATH=str(REPO))
    runs = {}
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT):
        folder = tmp_path / sig.name
        folder.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", _SPINNING_LAUNCHER, str(folder)],
                                cwd=REPO, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs[sig] = (proc, folder)
    try:
        start = time.monotonic()
        for sig, (proc, folder) in runs.items():
            while len(_pids(folder)) < 2:
                assert proc.poll() is None, f"the {sig.name} launcher exited early"
                assert time.monotonic() - start < 150, "the ranks did not start"
                time.sleep(0.1)
            folders = glob.glob(os.path.join(tempfile.gettempdir(), f"utils-dist-{proc.pid}-*"))
            assert len(folders) == 1, folders  # the launch's folder, named by its launcher
            assert all(not _gone(pid) for pid in _pids(folder))
            os.kill(proc.pid, sig)
        for sig, (proc, folder) in runs.items():
            proc.wait(timeout=30)
            end = time.monotonic() + 15
            while _session_alive(proc.pid) and time.monotonic() < end:
                time.sleep(0.1)
            assert _session_alive(proc.pid) == [], f"{sig.name}: processes left running"
            left = glob.glob(os.path.join(tempfile.gettempdir(), f"utils-dist-{proc.pid}-*"))
            assert left == [], f"{sig.name}: temporary folder left: {left}"
    finally:
        for proc, _ in runs.values():  # never leave a spinning session behind a failed test
            for pid in _session_alive(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_a_dead_launchers_folder_is_removed_by_the_next_launch():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tempfile.mkdtemp(prefix=f"utils-dist-{dead.pid}-")
        Path(stale, "rank0.out").write_text("left by a killed launcher")
        busy = tempfile.mkdtemp(prefix=f"utils-dist-{live.pid}-")
        other = tempfile.mkdtemp(prefix="utils-dist-notapid-")
        launch(_noop, 1)
        assert not os.path.exists(stale), "a dead launcher's folder survived the next launch"
        assert os.path.isdir(busy), "a live launcher's folder was removed"
        assert os.path.isdir(other), "a folder not named by a pid was removed"
    finally:
        live.kill()
        live.wait()
        for path in (busy, other):
            shutil.rmtree(path, ignore_errors=True)


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
