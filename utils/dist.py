"""Run a function on several processes with ``torch.distributed`` set up: the course's launcher.

Every multi-device chapter and lab writes its worker as ``fn(rank, world_size, *args)`` and runs
it with :func:`launch`, from a notebook cell or a script::

    def worker(rank, world_size):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t)                  # the process group is already initialised
        return t.item()

    utils.dist.launch(worker, 4)            # -> [6.0, 6.0, 6.0, 6.0], one value per rank

The same worker runs unchanged under ``torchrun`` with NCCL on a GPU cluster: put
``rank, ws = init_from_env(); worker(rank, ws)`` under ``if __name__ == "__main__":`` in a
script and start it with the command :func:`torchrun_command` prints.

How it works, and why:

* **Ranks are forked from a fork server.** Plain ``fork`` of a Jupyter kernel copies a process
  with live threads (ZeroMQ, heartbeat, PyTorch's pools) and any locks they hold, so a child
  can deadlock. ``spawn`` is safe but imports PyTorch afresh in every rank (seconds each).
  ``forkserver`` starts one clean single-threaded helper once, has it import PyTorch, and
  forks each rank from it: safe like spawn, fast like fork (~0.1 s a launch once warm).
  Where there is no fork server (Windows), spawn is used. In a script, call ``launch`` under
  ``if __name__ == "__main__":``, as with any multiprocessing.
* **The function travels by value with cloudpickle.** A function defined in a notebook lives
  in ``__main__``, which a child cannot import; cloudpickle sends its code and the globals it
  uses. Importable functions still travel by reference.
* **Rendezvous on a port the OS picked.** The parent holds a ``TCPStore`` bound to port 0 of
  127.0.0.1 for the whole run, so launches in one process or in several never clash.
* **Each rank reports over its own pipe**: its return value or its traceback. A rank that is
  done waits until all are, so an early exit never breaks a rank still talking to it.
* **Output comes back in order.** What a rank prints (stdout or stderr, Python or C++) goes to
  a file; at the end the parent prints it rank by rank, each line prefixed ``[rank r]``, so a
  notebook cell shows it, the same way on every run.
* **Hangs are diagnosed, not just killed.** At the timeout the parent sends ``SIGUSR1`` to the
  unfinished ranks; :mod:`faulthandler` in each writes the Python stack it is stuck in, and the
  stacks go into the error, with the source line of each frame.
* **The error that caused the others comes first.** When one rank fails, its peers often fail
  too, with gloo's "Connection reset/closed by peer". The report names the rank whose error
  is the cause, shows its traceback (or, for a rank that crashed in C++, the last lines it
  printed), lists the peers' errors as consequences, and adds a hint for the common
  mistakes: pieces of unequal size ("Received data size doesn't match"), and a ring of
  blocking sends that wait for receives nobody has posted.
* **Nothing is left behind.** Whatever happens, Ctrl-C included, the parent terminates and
  reaps every rank. If the parent itself is killed (SIGTERM, SIGKILL, a kernel restart),
  each rank notices at once (a pipe from the parent reads end-of-file; on Linux the kernel
  also kills a rank when its fork server exits, ``PR_SET_PDEATHSIG``), deletes the launch's
  temporary folder and exits; the fork server then exits too. A folder whose launcher died
  before anyone could delete it is removed by the next launch.
* **Ranks start fast.** The fork server imports, once, what ranks would otherwise each
  import at their first optimizer step or DDP wrapper: ``torch._dynamo`` (which
  ``torch.optim`` and DDP load), FSDP and ``ZeroRedundancyOptimizer``. Measured on a 2-core
  machine: a launch of 2 ranks that take one AdamW step went from 1.1 s to 0.06 s idle
  (6-7 s to 0.2-0.3 s under load); the server's one-time start from 1.1 s to 2.2 s.
"""
from __future__ import annotations

import ctypes
import faulthandler
import glob
import linecache
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

try:
    import cloudpickle as _pickler  # sends a function defined in a notebook by value
except ImportError:  # plain pickle sends importable functions only
    _pickler = pickle

__all__ = ["launch", "RankError", "LaunchTimeout", "root_cause", "init_from_env", "torchrun_command",
           "HINT_UNEVEN", "HINT_SEND_CYCLE"]

MASTER_ADDR = "127.0.0.1"
_GRACE_S = 0.5  # after a first failure, how long to wait for other ranks' errors
_PREFIX = "utils-dist-"  # temporary folders: utils-dist-<launcher pid>-<random>
# Imported once by the fork server, so that ranks do not each import them (measured: a rank's
# first optimizer step or DDP wrapper imports torch._dynamo, ~1 s idle, 3-7 s under load).
_PRELOAD = [__name__, "torch._dynamo", "torch.distributed.fsdp", "torch.distributed.optim"]
# Errors a rank raises because a peer went away first, not because of its own code.
_CONSEQUENCE = re.compile(r"by peer|Connection reset|Connection closed|Broken pipe|"
                          r"Connection refused|Socket closed|connection was closed", re.I)
_SIZE_MISMATCH = re.compile(r"Received data size doesn't match|invalid tensor size|"
                            r"size doesn't match")
HINT_UNEVEN = (
    "Hint: the ranks disagree on a message's size: one rank sent more (or fewer) bytes than "
    "its peer's buffer holds, or gave a collective a piece of another size than the others. "
    "Pieces of unequal size are the usual cause (tensor.chunk or tensor_split of a length "
    "that the world size does not divide). Give every rank pieces of one size (pad to a "
    "multiple of the world size), or size each receive buffer for the piece that arrives.")
HINT_SEND_CYCLE = (
    "Hint: every unfinished rank is blocked in send. A blocking send returns only once its "
    "peer receives, and every peer is itself blocked sending, so no one receives. Post the "
    "receive together with the send: req = dist.isend(...); dist.recv(...); req.wait(), or "
    "dist.batch_isend_irecv([P2POp(dist.isend, ...), P2POp(dist.irecv, ...)]).")


class RankError(RuntimeError):
    """One or more ranks raised. ``.ranks``: failing ranks; ``.tracebacks``: rank -> text;
    ``.cause``: the rank whose error caused the others (the first failure that is not a
    "connection reset/closed by peer" consequence)."""

    def __init__(self, message, ranks, tracebacks, cause=None):
        super().__init__(message)
        self.ranks, self.tracebacks = ranks, tracebacks
        self.cause = ranks[0] if cause is None and ranks else cause


class LaunchTimeout(TimeoutError):
    """The run passed its timeout. ``.ranks``: unfinished ranks; ``.stacks``: rank -> stack."""

    def __init__(self, message, ranks, stacks):
        super().__init__(message)
        self.ranks, self.stacks = ranks, stacks


def launch(fn, world_size, *args, timeout=60.0, backend="gloo"):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results.

    Each process has a process group initialised (``backend`` "gloo" on CPU, or "nccl" with
    one GPU per rank, ``cuda:rank``) and the environment torchrun would give it (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). PyTorch in each rank
    uses ``cpus // world_size`` threads (at least 1) so the ranks do not fight over cores.

    Returns the ranks' return values in rank order; tensors come back on the CPU. Raises
    :class:`RankError` if any rank raises, and :class:`LaunchTimeout` if the ranks have not all
    finished ``timeout`` seconds after the call (start-up included).
    """
    _validate(fn, world_size, timeout, backend)
    payload = _dumps((fn, args), "fn and args")
    ctx = _context()
    _remove_stale_folders()
    store = dist.TCPStore(MASTER_ADDR, 0, world_size, is_master=True, wait_for_workers=False)
    workdir = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    procs, conns, finished = [], [], False
    try:
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe()
            spec = (rank, world_size, backend, store.port, timeout, workdir)
            proc = ctx.Process(target=_worker, args=(spec, payload, child_end),
                               name=f"utils.dist rank {rank}", daemon=True)
            proc.start()
            child_end.close()  # keep only the child's copy, so a dead child reads as EOF
            procs.append(proc)
            conns.append(parent_end)
        results, errors, order, pending = _collect(procs, conns, time.monotonic() + timeout,
                                                   workdir)
        if errors:
            raise _rank_error(errors, order, world_size)
        if pending:
            stacks = _dump_stacks(procs, pending, workdir)
            done = [r for r in range(world_size) if r not in pending]
            text = "\n".join(f"--- rank {r}, most recent call first ---\n{stacks[r]}"
                             for r in pending)
            if all(_innermost_call(stacks[r]) == "send" for r in pending):
                text += "\n" + HINT_SEND_CYCLE
            raise LaunchTimeout(
                f"launch timed out after {timeout:g} s: rank(s) {pending} of {world_size} had "
                f"not finished (finished: {done}). A rank usually hangs in a collective or a "
                f"recv that the other ranks never matched.\n{text}", pending, stacks)
        for conn in conns:  # all ranks are done: let them tear the group down and exit
            try:
                conn.send("exit")
            except OSError:
                pass  # that rank is already gone
        finished = True
        return [results[r] for r in range(world_size)]
    finally:
        _reap(procs, patience=5.0 if finished else 0.0)
        _relay_output(workdir, len(procs))
        for conn in conns:
            conn.close()
        shutil.rmtree(workdir, ignore_errors=True)
        del store


def _validate(fn, world_size, timeout, backend):
    if not callable(fn):
        raise TypeError(f"fn must be callable, as fn(rank, world_size, *args); got {fn!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(f"world_size must be an int >= 1, got {world_size!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend 'nccl' needs one GPU per rank: world_size={world_size}, "
                         f"GPUs visible: {torch.cuda.device_count()}; use backend='gloo'")


def _dumps(obj, what):
    try:
        return _pickler.dumps(obj)
    except Exception as exc:
        raise TypeError(f"{what} must be picklable ({type(exc).__name__}: {exc})") from exc


def _context():
    """The fork-server context, with PyTorch preloaded in the server (spawn where unsupported)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server first starts
    return ctx


def _owner_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_stale_folders():
    """Delete the temporary folders of launchers that died before they could (SIGKILL)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{_PREFIX}*-*")):
        match = re.fullmatch(rf"{_PREFIX}(\d+)-\w+", os.path.basename(path))
        if match and int(match.group(1)) != os.getpid() and not _owner_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _collect(procs, conns, deadline, workdir):
    """Wait for every rank's report, a failure (plus a short grace for others), or the deadline.

    Returns (results, errors, order, pending): rank -> value, rank -> error text (for a rank
    that died without a report, the exit code and the last lines it printed), the failed
    ranks in the order their failures arrived, and the unfinished ranks.
    """
    results, errors, order, pending = {}, {}, [], set(range(len(procs)))
    give_up = deadline
    while pending and time.monotonic() < give_up:
        waitables = [conns[r] for r in pending] + [procs[r].sentinel for r in pending]
        mp.connection.wait(waitables, timeout=max(0.0, give_up - time.monotonic()))
        for r in sorted(pending):
            try:
                report = conns[r].recv() if conns[r].poll() else None
            except EOFError:  # the pipe closed without a report: the process is dying
                procs[r].join(timeout=1.0)
                report = _died(procs[r], workdir, r)
            if report is None and procs[r].exitcode is not None:
                report = _died(procs[r], workdir, r)
            if report is not None:
                status, data = report
                if status == "ok":
                    results[r] = pickle.loads(data)
                else:
                    errors[r] = data
                    order.append(r)
                pending.discard(r)
        if errors:
            give_up = min(give_up, time.monotonic() + _GRACE_S)
    return results, errors, order, sorted(pending)


def _is_consequence(text):
    """True when a rank's error says only that a peer went away (the peer is the cause)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return bool(lines) and bool(_CONSEQUENCE.search(lines[-1])) \
        and not _SIZE_MISMATCH.search(text)


def root_cause(errors, order=None):
    """The rank whose error caused the others, from ``errors`` (rank -> error text).

    The first failure in ``order`` (arrival order; rank order if not given) that is not a
    consequence of a peer's failure ("Connection reset/closed by peer", "Broken pipe"); if
    every error is such a consequence, the first of them.
    """
    if not isinstance(errors, dict) or not all(isinstance(t, str) for t in errors.values()):
        raise TypeError(f"errors must be a dict of rank -> error text, got {errors!r:.80}")
    if not errors:
        raise ValueError("errors must name at least one failed rank, got none")
    if order is not None and not isinstance(order, (list, tuple)):
        raise TypeError(f"order must be a list of ranks or None, got {order!r:.80}")
    order = [r for r in (order or sorted(errors)) if r in errors]
    order += [r for r in sorted(errors) if r not in order]
    causes = [r for r in order if not _is_consequence(errors[r])]
    return (causes or order)[0]


def _rank_error(errors, order, world_size):
    """The RankError of a launch: the root cause's error in full, then the consequences."""
    ranks = sorted(errors)
    cause = root_cause(errors, order)
    others = [r for r in ranks if r != cause]
    consequences = [r for r in others if _is_consequence(errors[r])]
    head = f"rank(s) {ranks} of {world_size} failed"
    if others:
        head += f"; rank {cause} failed first"
        if len(consequences) == len(others):
            head += ", the others as a consequence"
    label = " (the cause)" if consequences else " (first to fail)" if others else ""
    text = f"{head}:\n--- rank {cause}{label} ---\n"
    text += _add_source(errors[cause])
    if _SIZE_MISMATCH.search(errors[cause]):
        text += "\n" + HINT_UNEVEN
    for r in others:
        kind = ("lost its connection to a failed peer" if _is_consequence(errors[r])
                else "failed too")
        last = [line for line in errors[r].strip().splitlines() if line.strip()][-1:]
        text += f"\n--- rank {r} ({kind}) ---\n" + "\n".join(last)
    if consequences:
        text += ("\n(An error like 'Connection closed/reset by peer' is the consequence of "
                 "another rank failing first: look at the cause above.)")
    return RankError(text, ranks, errors, cause)


def _innermost_call(stack):
    """The function a rank's stack dump (most recent call first) is stuck in, or ''."""
    names = re.findall(r'^\s*File ".*", line \d+,? in (\S+)', stack, re.M)
    skip = {"wrapper", "counted", "wait"}  # decorators and counting wrappers around the call
    return next((n for n in names if n not in skip), "")


def _relay_output(workdir, world_size):
    """Print what each rank printed, rank by rank, so a notebook shows it in a stable order."""
    for rank in range(world_size):
        path = os.path.join(workdir, f"rank{rank}.out")
        text = open(path, errors="replace").read() if os.path.exists(path) else ""
        for line in text.splitlines():
            print(f"[rank {rank}] {line}")


def _died(proc, workdir, rank, lines=6):
    """The report of a rank that exited without one: its exit code and what it printed last
    (a crash in C++, such as gloo's "Received data size doesn't match", prints only there)."""
    text = (f"process exited with code {proc.exitcode} before reporting a result "
            f"(killed, out of memory, os._exit or a crash)")
    path = os.path.join(workdir, f"rank{rank}.out")
    if os.path.exists(path):
        tail = [line for line in open(path, errors="replace").read().splitlines()
                if line.strip()][-lines:]
        if tail:
            text += "; its last output:\n" + "\n".join(f"    {line}" for line in tail)
    return ("error", text)


def _dump_stacks(procs, ranks, workdir):
    """Ask each stuck rank for its Python stack (faulthandler on SIGUSR1) and read it back."""
    paths = {r: os.path.join(workdir, f"rank{r}.stack") for r in ranks}
    if hasattr(signal, "SIGUSR1"):
        for r in ranks:
            if procs[r].is_alive():
                os.kill(procs[r].pid, signal.SIGUSR1)
        end = time.monotonic() + 1.0
        while time.monotonic() < end and not all(_size(p) for p in paths.values()):
            time.sleep(0.02)
    stacks = {}
    for r, path in paths.items():
        text = open(path).read() if _size(path) else ""
        stacks[r] = _clean_stack(text) or "(no stack: the rank did not answer)"
    return stacks


def _size(path):
    return os.path.getsize(path) if os.path.exists(path) else 0


def _clean_stack(text):
    """Keep the threads that matter and the frames from ``_worker`` down; add source lines."""
    threads = [t for t in text.strip().split("\n\n") if t and "in _watch_launcher" not in t]
    kept = []
    for thread in threads:
        lines = thread.splitlines()
        cut = next((i for i, line in enumerate(lines) if line.endswith(" in _worker")), None)
        kept.append("\n".join(lines[: cut + 1] if cut is not None else lines))
    if len(kept) == 1 and kept[0].startswith("Current thread"):
        kept[0] = kept[0].split("\n", 1)[-1]  # one thread: its header says nothing new
    return _add_source("\n\n".join(kept))


_FRAME = re.compile(r'^\s*File "(.+)", line (\d+),? in ')


def _add_source(text):
    """Put each frame's source line under it when missing (faulthandler never prints them;
    a traceback from a notebook-defined function cannot, as only this process knows the cell)."""
    lines, out = text.splitlines(), []
    for i, line in enumerate(lines):
        out.append(line)
        match = _FRAME.match(line)
        has_source = i + 1 < len(lines) and lines[i + 1].startswith("    ") \
            and not _FRAME.match(lines[i + 1])
        if match and not has_source:
            source = linecache.getline(match.group(1), int(match.group(2))).strip()
            if source:
                out.append(f"    {source}")
    return "\n".join(out)


def _reap(procs, patience):
    """Make sure every rank is gone: wait ``patience`` s for it to exit, then SIGTERM, SIGKILL."""
    end = time.monotonic() + patience
    for proc in procs:
        proc.join(timeout=max(0.0, end - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _worker(spec, payload, conn):
    """Body of one rank: set up, run fn, report, then wait for the parent's go-ahead."""
    rank, world_size, backend, port, timeout, workdir = spec
    _die_with_launcher(workdir)
    output = open(os.path.join(workdir, f"rank{rank}.out"), "w")
    os.dup2(output.fileno(), 1)  # print() and C++ log lines go to a file the parent relays
    os.dup2(output.fileno(), 2)
    if sys.stdout is not None:
        sys.stdout.reconfigure(line_buffering=True)  # keep lines printed before a hang
    stack_file = open(os.path.join(workdir, f"rank{rank}.stack"), "w")
    if hasattr(faulthandler, "register"):
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    os.environ.update(MASTER_ADDR=MASTER_ADDR, MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cpus or 1) // world_size))
    try:
        fn, args = pickle.loads(payload)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.TCPStore(MASTER_ADDR, port, world_size, is_master=False,
                              timeout=timedelta(seconds=timeout))
        # The group's own timeout is longer than the launcher's, so the launcher reports a
        # hang first; it still bounds the life of a rank that somehow outlives its parent.
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout + 60))
        report = ("ok", _dumps(_to_cpu(fn(rank, world_size, *args)), "fn's return value"))
    except BaseException:
        report = ("error", traceback.format_exc())
    conn.send(report)
    try:
        conn.recv()  # "exit" once every rank has finished; EOF if the parent went away
    except (EOFError, OSError):
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


def _to_cpu(value):
    """Move tensors (also inside lists, tuples and dicts) to the CPU so the parent can load them."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if type(value) in (list, tuple):
        return type(value)(_to_cpu(v) for v in value)
    if type(value) is dict:
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _die_with_launcher(workdir):
    """Make sure this rank ends when the process that called launch() dies, however it dies.

    * A thread waits on the parent sentinel of multiprocessing (a pipe whose other end only
      the launcher holds: it reads end-of-file the moment the launcher is gone), then deletes
      the launch's folder and exits.
    * Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` has the kernel kill this rank when its
      parent, the fork server, exits, even if this process cannot run Python any more.
    * The rank closes its copy of the fork server's "alive" pipe: the server exits when the
      last holder of that pipe does, so a rank holding it would keep the server (and itself,
      through the death signal) alive after the launcher died.
    """
    parent = mp.parent_process()
    if parent is not None and parent.sentinel is not None:
        threading.Thread(target=_watch_launcher, args=(parent.sentinel, workdir),
                         name="utils.dist watchdog", daemon=True).start()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # no prctl here: the watchdog thread still covers it
    try:
        from multiprocessing import forkserver
        server = forkserver._forkserver
        fd = getattr(server, "_forkserver_alive_fd", None)
        if fd is not None:  # set only in a child of the fork server
            os.close(fd)
            server._forkserver_alive_fd = None
    except (ImportError, AttributeError, OSError):
        pass


def _watch_launcher(sentinel, workdir):
    """Exit (cleaning the launch's folder) as soon as the launcher's end of ``sentinel`` closes."""
    mp.connection.wait([sentinel])
    shutil.rmtree(workdir, ignore_errors=True)
    os._exit(1)


def init_from_env():
    """Initialise the process group from torchrun's environment; return ``(rank, world_size)``.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``. With CUDA the backend is NCCL and this process uses GPU ``LOCAL_RANK``;
    otherwise gloo. A script's entry point is then::

        if __name__ == "__main__":
            rank, world_size = utils.dist.init_from_env()
            worker(rank, world_size)
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in os.environ]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: start this script with torchrun "
                           f"(see torchrun_command), or call launch() from Python")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world_size


def torchrun_command(script, nproc_per_node, nnodes=1):
    """The torchrun command that runs ``script`` on ``nnodes`` machines x ``nproc_per_node``.

    One machine: ``torchrun --standalone --nnodes=1 --nproc_per_node=4 script.py``. Several:
    the same command on every machine, meeting at ``$MASTER_ADDR:29500`` (set it to the first
    machine's address) under a shared ``$JOB_ID``.
    """
    for name, value in (("nproc_per_node", nproc_per_node), ("nnodes", nnodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(script, (str, os.PathLike)) or not str(script):
        raise TypeError(f"script must be a path to a Python file, got {script!r}")
    if nnodes == 1:
        where = "--standalone --nnodes=1"
    else:
        where = (f"--nnodes={nnodes} --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 "
                 f"--rdzv_id=$JOB_ID")
    return f"torchrun {where} --nproc_per_node={nproc_per_node} {shlex.quote(str(script))}"
