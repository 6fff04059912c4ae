"""Checkers for lab 09, NCCL internals and collectives.

Every collective the learner builds runs where it would run for real: on 4 processes (and on
a second world size) started by :func:`utils.dist.launch`, each with a gloo process group.
On the same ranks and the same inputs the checker calls ``torch.distributed`` itself, and the
learner's result must match it on every rank:

* reduce-scatter: ``dist.reduce_scatter`` when the size divides by the world size; otherwise
  ``dist.all_reduce`` followed by ``tensor_split`` (the chunking the lab uses);
* all-gather: ``dist.all_gather``, or for uneven pieces ``dist.all_reduce`` of each rank's
  piece placed at its offset in zeros;
* all-reduce (ring and recursive doubling): ``dist.all_reduce``.

While the learner's function runs, :class:`utils.collectives.CommCounter` counts the bytes
each rank sends, which must equal the algorithm's count exactly (``2(n-1)/n * S`` per rank for
the ring all-reduce). The alpha-beta fit is held to a weighted least-squares oracle on the
same data; the hang diagnosis to the structured stacks that :class:`utils.dist.LaunchTimeout`
carries.
"""
from __future__ import annotations

import math
import os
import re
import traceback

import numpy as np
import torch
import torch.distributed as dist

from .. import collectives as coll
from ..dist import HINT_SEND_CYCLE, HINT_UNEVEN, LaunchTimeout, RankError, launch
from . import (exercise, expect_close, expect_dtype, expect_equal, expect_shape, expect_type, fail,
               measurement_warning)

TIMEOUT_S = 30.0  # per launch; a correct solution finishes in well under a second once warm
DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}

# (numel or shape, dtype): sizes that divide by the world size, sizes that do not, and sizes
# smaller than the world size (some ranks own an empty chunk).
CASES = {
    4: [(16, "float32"), (1001, "int64"), (3, "float64")],
    3: [(7, "float32")],
}
ALL_REDUCE_EXTRA = {4: [((3, 5), "float32")], 3: []}


# --------------------------------------------------------------------------- rank side

def _input(case, rank, shape, dtype):
    g = torch.Generator().manual_seed(1000 * case + rank)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=dtype)
    return torch.randint(-100, 100, shape, generator=g, dtype=dtype)


def _oracle_reduce_scatter(x, rank, n):
    flat = x.reshape(-1).clone()
    if flat.numel() % n == 0:
        out = torch.empty(flat.numel() // n, dtype=flat.dtype)
        dist.reduce_scatter(out, list(flat.chunk(n)))
        return out
    dist.all_reduce(flat)
    return flat.tensor_split(n)[rank].clone()


def _oracle_all_gather(chunk, rank, n, numel):
    if numel % n == 0:
        parts = [torch.empty_like(chunk) for _ in range(n)]
        dist.all_gather(parts, chunk.clone())
        return torch.cat(parts)
    placed = torch.zeros(numel, dtype=chunk.dtype)
    sizes = [len(p) for p in torch.empty(numel).tensor_split(n)]
    start = sum(sizes[:rank])
    placed[start:start + sizes[rank]] = chunk
    dist.all_reduce(placed)
    return placed


def _oracle_all_reduce(x):
    out = x.clone()
    dist.all_reduce(out)
    return out


def _rank_cases(rank, n, fn, kind, cases):
    """Run the learner's ``fn`` and the torch.distributed oracle on each case, on this rank."""
    results = []
    for i, (shape, dtype_name) in enumerate(cases):
        dtype = DTYPES[dtype_name]
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        numel = math.prod(shape)
        x = _input(i, rank, shape, dtype)
        if kind == "reduce_scatter":
            expected = _oracle_reduce_scatter(x, rank, n)
            args = (x.clone(), rank, n)
        elif kind == "all_gather":
            x = _input(i, rank, (len(torch.empty(numel).tensor_split(n)[rank]),), dtype)
            expected = _oracle_all_gather(x, rank, n, numel)
            args = (x.clone(), rank, n, numel)
        else:  # all_reduce, recursive_doubling
            expected = _oracle_all_reduce(x)
            args = (x.clone(), rank, n)
        dist.barrier()  # the oracle's traffic is done before the learner's is counted
        with coll.CommCounter() as sent:
            got = fn(*args)
        results.append({"got": got, "expected": expected, "bytes": sent.sent,
                        "messages": sent.messages, "peers": dict(sent.peers),
                        "numel": numel, "itemsize": x.element_size()})
    return results


# --------------------------------------------------------------------------- parent side

def _probe_stub(fn, *args):
    """Call ``fn`` once on one rank without a process group: a stub raises
    NotImplementedError here, which the exercise decorator reports as 'not attempted'. Any
    other error is left for the real run to report with its rank."""
    try:
        fn(*args)
    except NotImplementedError:
        raise
    except Exception:
        pass


def _learner_lines(text, keep=14):
    lines = text.rstrip().splitlines()
    cut = max((i for i, line in enumerate(lines) if "utils/checks/ch09.py" in line), default=-1)
    tail = [line for line in lines[cut + 2:] if line.strip()] if cut >= 0 else lines
    return "\n".join(tail[-keep:])


def _launch(fn_name, kind, fn, n, cases):
    try:
        return launch(_rank_cases, n, fn, kind, cases, timeout=TIMEOUT_S)
    except RankError as err:
        r = err.cause
        text = err.tracebacks[r]
        if "NotImplementedError" in text:
            fail(f"{fn_name} on {n} ranks: a stub is still in your code",
                 "every function your answer calls to be implemented",
                 _learner_lines(text), "fill in the remaining stub(s)")
        hint = ("the lines above are the end of that rank's traceback; try your function on "
                "one case by hand with utils.dist.launch to reproduce it")
        if HINT_UNEVEN in str(err):
            hint = HINT_UNEVEN[len("Hint: "):]
        fail(f"{fn_name} raised on rank {r} of {n}", "your function to run on every rank",
             _learner_lines(text), hint)
    except LaunchTimeout as err:
        where = "; ".join(f"rank {r} in {_innermost(err.stacks[r])}" for r in err.ranks)
        hint = ("a rank waits for a message that no one sends: check the peers (in a ring, "
                "rank r sends to r+1 and receives from r-1) and that both sides use tensors "
                "of the same size (chunk sizes differ when the size does not divide by the "
                "world size)")
        if HINT_SEND_CYCLE in str(err):
            hint = HINT_SEND_CYCLE[len("Hint: "):]
        fail(f"{fn_name} on {n} ranks did not finish within {TIMEOUT_S:g} s",
             "every send matched by a recv on the peer, so every rank finishes",
             f"stuck: {where}", hint)


VALUE_HINTS = {
    "ring_reduce_scatter": "compare your chunk indices with the schedule in the exercise: at "
                           "step s rank r sends chunk (r - s - 1) % n and adds the chunk "
                           "(r - s - 2) % n it receives",
    "ring_all_gather": "at step s rank r sends piece (r - s) % n and receives piece "
                       "(r - s - 1) % n into its place in the output",
    "ring_all_reduce": "check ring_reduce_scatter and ring_all_gather first; then reshape the "
                       "result to x's shape",
    "recursive_doubling_all_reduce": "at step k exchange the whole running sum with rank ^ "
                                     "(1 << k) and add what arrives",
}


def _compare(fn_name, results, n, cases):
    for r, per_rank in enumerate(results):
        for (shape, dtype_name), res in zip(cases, per_rank):
            what = f"{fn_name} on rank {r} of {n}, input {shape} {dtype_name}"
            got, expected = res["got"], res["expected"]
            expect_type(got, torch.Tensor, what, hint="return a tensor")
            expect_shape(got, tuple(expected.shape), what,
                         hint="the chunks follow x.tensor_split(world_size): rank r owns "
                              "piece r, and the first numel % world_size pieces are one longer")
            expect_dtype(got, expected.dtype, what,
                         hint="keep the input's dtype: allocate buffers with torch.empty_like "
                              "or dtype=x.dtype")
            if expected.dtype.is_floating_point:
                expect_close(got, expected, rtol=1e-5, atol=1e-5, what=what,
                             hint=VALUE_HINTS[fn_name])
            else:
                expect_equal(got, expected, what=what, hint=VALUE_HINTS[fn_name])


def _ring_traffic(fn_name, results, n, cases, phases):
    """Total bytes over all ranks = phases*(n-1)*S; every rank sends to one neighbour only."""
    for i, (shape, dtype_name) in enumerate(cases):
        per_rank = [res[i] for res in results]
        s = per_rank[0]["numel"] * per_rank[0]["itemsize"]
        total = sum(res["bytes"] for res in per_rank)
        want = phases * (n - 1) * s
        if total != want:
            fail(f"{fn_name} on {n} ranks, input {shape} {dtype_name}: bytes sent",
                 f"{want} bytes in all ({phases}·(n-1)·S with S = {s} bytes), "
                 f"{phases * (n - 1)}/{n} of S per rank on average",
                 f"{total} bytes (per rank: {[res['bytes'] for res in per_rank]})",
                 "each step sends one chunk of size ~S/n to the next rank; 0 bytes means the "
                 "answer did not go through dist.send / dist.isend (build it from point-to-"
                 "point calls), more means whole tensors are being sent")
        for r, res in enumerate(per_rank):
            peers = sorted(res["peers"], key=lambda p: (p is None, p or 0))
            if len(peers) > 1 or any(p not in ((r + 1) % n, (r - 1) % n) for p in peers):
                fail(f"{fn_name} on {n} ranks: rank {r} sent to ranks {peers}",
                     f"a ring: rank {r} sends only to its neighbour {(r + 1) % n}",
                     f"sends to {peers}", "send to (rank + 1) % world_size, receive from "
                                          "(rank - 1) % world_size")
        if per_rank[0]["numel"] % n == 0 and n > 1:
            for r, res in enumerate(per_rank):
                if res["bytes"] != want // n:
                    fail(f"{fn_name} on {n} ranks, input {shape}: rank {r} bytes sent",
                         f"{want // n} bytes (({phases}·(n-1)/n)·S)", f"{res['bytes']} bytes",
                         "every rank sends the same amount when the size divides by n")


def _check_ring(fn_name, kind, fn, phases, extra=None):
    for n, cases in CASES.items():
        cases = cases + (extra or {}).get(n, [])
        results = _launch(fn_name, kind, fn, n, cases)
        _compare(fn_name, results, n, cases)
        _ring_traffic(fn_name, results, n, cases, phases)


@exercise
def ring_reduce_scatter(fn):
    """``fn(x, rank, world_size)`` -> this rank's piece of the sum, ``x.tensor_split(n)[rank]``."""
    _probe_stub(fn, torch.zeros(4), 0, 1)
    _check_ring("ring_reduce_scatter", "reduce_scatter", fn, phases=1)
    return ("equals dist.reduce_scatter / all_reduce+split on 4 and 3 ranks, uneven sizes "
            "included; (n-1)/n·S bytes per rank, to one neighbour")


@exercise
def ring_all_gather(fn):
    """``fn(chunk, rank, world_size, numel)`` -> the ``numel`` elements of all ranks' pieces."""
    _probe_stub(fn, torch.zeros(4), 0, 1, 4)
    _check_ring("ring_all_gather", "all_gather", fn, phases=1)
    return ("equals dist.all_gather on 4 and 3 ranks, uneven pieces included; (n-1)/n·S bytes "
            "per rank, to one neighbour")


@exercise
def ring_all_reduce(fn):
    """``fn(x, rank, world_size)`` -> the sum over ranks, same shape and dtype as ``x``."""
    _probe_stub(fn, torch.zeros(4), 0, 1)
    _check_ring("ring_all_reduce", "all_reduce", fn, phases=2, extra=ALL_REDUCE_EXTRA)
    return ("equals dist.all_reduce on 4 and 3 ranks (1-D and 2-D, uneven sizes); "
            "2(n-1)/n·S bytes per rank, the bandwidth-optimal count")


NOT_POWERS_OF_TWO = (3, 6, 12)
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _power_of_two_error(fn):
    """``fn(x, 0, n)`` must raise ValueError for a world size n that is not a power of two.

    Called here, in the checker's process, where no process group exists: the learner's
    check of ``world_size`` comes before any communication, so it raises first. A ValueError
    raised inside ``torch`` (``torch.distributed`` without a process group, or with a
    partner rank that does not exist) is not the learner's check.
    """
    for n in NOT_POWERS_OF_TWO:
        what = f"recursive_doubling_all_reduce(x, rank=0, world_size={n})"
        expected = f"ValueError: {n} is not a power of two, raised before any communication"
        hint = ("check world_size first, before any send or receive, and raise ValueError "
                "when it is not 1, 2, 4, 8, ... (recursive doubling pairs rank r with "
                "r ^ 2^k, which exists only when the world size is a power of two)")
        try:
            fn(torch.arange(8.0), 0, n)
        except NotImplementedError:
            raise
        except ValueError as err:
            frames = traceback.extract_tb(err.__traceback__)
            if frames and frames[-1].filename.startswith(_TORCH_DIR):
                fail(what, expected,
                     f"a ValueError from inside torch ({frames[-1].filename.split(os.sep)[-1]}: "
                     f"{str(err)[:100]}), not from your check", hint)
            continue
        except Exception as err:
            fail(what, expected, f"{type(err).__name__}: {str(err)[:120]}", hint)
        fail(what, expected, "no exception: it returned", hint)


@exercise
def recursive_doubling_all_reduce(fn):
    """``fn(x, rank, world_size)`` -> the sum over ranks by log2(n) pairwise exchanges;
    ValueError when ``world_size`` is not a power of two."""
    _probe_stub(fn, torch.zeros(4), 0, 1)
    _power_of_two_error(fn)
    for n in (4, 2):
        cases = CASES[4] + ALL_REDUCE_EXTRA[4] if n == 4 else CASES[3]
        results = _launch("recursive_doubling_all_reduce", "all_reduce", fn, n, cases)
        _compare("recursive_doubling_all_reduce", results, n, cases)
        steps = int(math.log2(n))
        for i, (shape, dtype_name) in enumerate(cases):
            for r, res in enumerate(results):
                s = res[i]["numel"] * res[i]["itemsize"]
                partners = sorted(r ^ (1 << k) for k in range(steps))
                peers = sorted(res[i]["peers"], key=lambda p: (p is None, p or 0))
                if res[i]["bytes"] != steps * s or peers != partners:
                    fail(f"recursive_doubling_all_reduce on {n} ranks, input {shape}: rank {r}",
                         f"log2(n) = {steps} exchanges of the whole array ({steps * s} bytes) "
                         f"with ranks {partners}",
                         f"{res[i]['bytes']} bytes sent to ranks {peers}",
                         "at step k exchange the running sum with rank ^ (1 << k) and add; "
                         "build it from point-to-point calls, not dist.all_reduce")
    return "equals dist.all_reduce on 4 and 2 ranks; log2(n)·S bytes per rank, partners rank^2^k"


# --------------------------------------------------------------------------- alpha-beta

def _design(sizes, n):
    steps, nbytes, algos = [], [], []
    for algo in ("ring", "recursive_doubling"):
        for s in sizes:
            c = coll.all_reduce_cost(algo, n, s)
            steps.append(c.steps)
            nbytes.append(c.bytes_per_rank)
            algos.append(algo)
    return np.array(steps, float), np.array(nbytes, float), algos


def _pair(got, what):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        fail(what, "a tuple (alpha, beta) of two floats", repr(got)[:120],
             "return alpha, beta")
    for v in got:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            fail(what, "two numbers", repr(got)[:120], "return float(alpha), float(beta)")
    return float(got[0]), float(got[1])


def measured_crossover(sizes, t_small, t_large):
    """Smallest swept size from which ``t_large < t_small`` holds up to the largest size.

    Returns (size, kind): kind "within" (geometric midpoint of the two sizes around the last
    sign change), "below" (large already faster at the smallest size) or "above" (not yet
    faster at the largest size).
    """
    faster = [tl < ts for ts, tl in zip(t_small, t_large)]
    if not faster[-1]:
        return float(sizes[-1]), "above"
    i = len(faster) - 1
    while i > 0 and faster[i - 1]:
        i -= 1
    if i == 0:
        return float(sizes[0]), "below"
    return math.sqrt(sizes[i - 1] * sizes[i]), "within"


def _check_sweep(sweep):
    expect_type(sweep, dict, "sweep", hint="pass the dict the measurement cell made")
    for key in ("sizes", "n", "ring", "recursive_doubling"):
        if key not in sweep:
            fail("sweep", f"a dict with keys sizes, n, ring, recursive_doubling",
                 f"keys {sorted(sweep)}", "pass the dict the measurement cell made")
    sizes = [float(s) for s in sweep["sizes"]]
    if len(sizes) < 3 or len(sweep["ring"]) != len(sizes) \
            or len(sweep["recursive_doubling"]) != len(sizes):
        fail("sweep", "at least 3 sizes, one ring and one recursive-doubling time each",
             f"{len(sizes)} sizes, {len(sweep['ring'])} and {len(sweep['recursive_doubling'])} "
             f"times", "rerun the measurement cell")
    return sizes, int(sweep["n"])


@exercise
def alpha_beta(fit_fn, crossover_fn, sweep):
    """``fit_fn(steps, nbytes, times)`` -> (alpha, beta); ``crossover_fn(alpha, beta, n)`` ->
    bytes above which the ring all-reduce beats recursive doubling; ``sweep`` the measurement."""
    rng = np.random.default_rng(9)
    sizes = [2.0 ** k for k in range(10, 27, 2)]
    for n, alpha, beta in ((4, 20e-6, 1 / 2e9), (8, 5e-6, 1 / 50e9)):
        steps, nbytes, _ = _design(sizes, n)
        exact = alpha * steps + beta * nbytes
        got = _pair(fit_fn(steps, nbytes, exact), f"fit_alpha_beta on exact data, n={n}")
        expect_close(got, [alpha, beta], rtol=1e-6, atol=0.0,
                     what=f"fit_alpha_beta on exact times (alpha={alpha:g}, beta={beta:g})",
                     hint="solve the least-squares problem [steps, nbytes] @ [alpha, beta] = "
                          "times, e.g. with np.linalg.lstsq")
        noisy = exact * np.exp(rng.normal(0.0, 0.3, size=exact.shape))
        want = coll.fit_alpha_beta(steps, nbytes, noisy)
        got = _pair(fit_fn(steps, nbytes, noisy), f"fit_alpha_beta on noisy data, n={n}")
        expect_close(got, list(want), rtol=1e-4, atol=0.0,
                     what=f"fit_alpha_beta on noisy times, n={n}",
                     hint="weight each measurement by 1/time (divide its row and its time by "
                          "the time) so that small messages count as much as large ones")
    for alpha, beta, n in ((20e-6, 1 / 2e9, 4), (5e-6, 1 / 50e9, 8), (1e-4, 1e-9, 16),
                           (1e-5, 1e-9, 2)):
        want = coll.crossover_size(alpha, beta, n)
        got = crossover_fn(alpha, beta, n)
        what = f"crossover_size(alpha={alpha:g}, beta={beta:g}, n={n})"
        if math.isinf(want):
            if not (isinstance(got, (int, float)) and math.isinf(got) and got > 0):
                fail(what, "math.inf: with 2 ranks both algorithms send S bytes and the ring "
                           "takes more steps, so it never wins", repr(got),
                     "return math.inf when the ring's bytes term is not smaller")
            continue
        expect_close(float(got), want, rtol=1e-9, atol=0.0, what=what,
                     hint="set alpha*s_rd + beta*c_rd*S equal to alpha*s_ring + "
                          "beta*c_ring*S and solve for S (s: steps, c: bytes per byte of array)")

    from ..plots import si  # here, not at the top: ranks import this module and need no plotting

    sizes, n = _check_sweep(sweep)
    steps, nbytes, _ = _design(sizes, n)
    times = np.concatenate([np.asarray(sweep["ring"], float),
                            np.asarray(sweep["recursive_doubling"], float)])
    want = coll.fit_alpha_beta(steps, nbytes, times)
    got = _pair(fit_fn(steps, nbytes, times), "fit_alpha_beta on your sweep")
    expect_close(got, list(want), rtol=1e-4, atol=0.0, what="fit_alpha_beta on your sweep",
                 hint="the same weighted fit as above, on the measured times")
    predicted = float(crossover_fn(got[0], got[1], n))
    redo = ("your fit equals the least-squares oracle, so the measurement is what is off: rerun "
            "the sweep when the machine is quieter (other programs make the times noisy)")
    warned = False
    if not (got[0] > 0 and got[1] > 0):
        measurement_warning("the fit to your sweep", "alpha > 0 and beta > 0 (every message "
                            "costs time, and more bytes cost more)",
                            f"alpha = {got[0]:.3g} s, beta = {got[1]:.3g} s/B", redo)
        warned = True
    # The latency-bound end is where the measurement is unambiguous: 2 messages against 6.
    # There the fitted model must pick the same winner as the sweep whenever the sweep's
    # margin is clear (1.5x). The bandwidth-bound end is reported, not enforced: on a machine
    # whose ranks share cores, large messages can cost more per step than one alpha.
    t_ring, t_rd = float(sweep["ring"][0]), float(sweep["recursive_doubling"][0])
    model_ring_wins = sizes[0] > predicted
    if not warned and max(t_ring, t_rd) >= 1.5 * min(t_ring, t_rd) \
            and model_ring_wins != (t_ring < t_rd):
        measurement_warning(
            f"the fitted model at the smallest size of your sweep ({si(sizes[0], 'B')})",
            f"the winner your sweep measured: {'ring' if t_ring < t_rd else 'recursive doubling'}"
            f" ({si(t_ring, 's')} against {si(t_rd, 's')})",
            f"the model predicts {'ring' if model_ring_wins else 'recursive doubling'} "
            f"(crossover at {si(predicted, 'B')})", redo)
    seen, kind = measured_crossover(sizes, sweep["recursive_doubling"], sweep["ring"])
    note = {"within": f"the sweep crosses near {si(seen, 'B')}",
            "above": f"the sweep has not crossed by {si(seen, 'B')}",
            "below": f"the ring already wins at {si(seen, 'B')}"}[kind]
    return (f"alpha = {si(got[0], 's')}, 1/beta = {si(1 / got[1], 'B/s')}; "
            f"predicted crossover {si(predicted, 'B')}, {note}")


# --------------------------------------------------------------------------- hang diagnosis

_FRAME = re.compile(r'^\s*File "[^"]*", line \d+,? in (\S+)')
_HEADER = re.compile(r"^--- rank (\d+)\b")


def _innermost(stack):
    for line in stack.splitlines():
        m = _FRAME.match(line)
        if m:
            return m.group(1)
    return None


def _canned(ranks, finished, frames, n):
    head = (f"launch timed out after 8 s: rank(s) {ranks} of {n} had not finished (finished: "
            f"{finished}). A rank usually hangs in a collective or a recv that the other ranks "
            f"never matched.")
    parts = [head]
    for r in ranks:
        parts.append(f"--- rank {r}, most recent call first ---")
        for path, line, fn, src in frames[r]:
            parts += [f'  File "{path}", line {line} in {fn}', f"    {src}"]
    return "\n".join(parts)


_TORCH = "/opt/conda/lib/python3.10/site-packages/torch/distributed/distributed_c10d.py"
_LOGGER = "/opt/conda/lib/python3.10/site-packages/torch/distributed/c10d_logger.py"
_CANNED = [
    ({1: "recv", 3: "barrier"},
     _canned([1, 3], [0, 2], {
         1: [(_TORCH, 2581, "recv", "pg.recv([tensor], group_src_rank, tag).wait()"),
             (_LOGGER, 79, "wrapper", "return func(*args, **kwargs)"),
             ("/home/ana/train.py", 41, "stage", "dist.recv(act, src=rank - 1)")],
         3: [(_TORCH, 4702, "barrier", "work.wait()"),
             (_LOGGER, 79, "wrapper", "return func(*args, **kwargs)"),
             ("/home/ana/train.py", 57, "step", "dist.barrier()")]}, 4)),
    ({0: "wait_for_grads", 1: "all_gather", 5: "all_gather"},
     _canned([0, 1, 5], [2, 3, 4, 6, 7], {
         0: [("/srv/job/ddp.py", 120, "wait_for_grads", "handle.wait()"),
             ("/srv/job/ddp.py", 200, "train", "wait_for_grads(handles)")],
         1: [(_TORCH, 3701, "all_gather", "work.wait()"),
             ("/srv/job/ddp.py", 88, "gather_metrics", "dist.all_gather(out, t)")],
         5: [(_TORCH, 3701, "all_gather", "work.wait()"),
             ("/srv/job/ddp.py", 88, "gather_metrics", "dist.all_gather(out, t)")]}, 8)),
]


@exercise
def diagnose_hang(fn, err):
    """``fn(message)`` -> {stuck rank: name of the innermost function in its stack}."""
    expect_type(err, LaunchTimeout, "err",
                hint="pass the LaunchTimeout caught from the buggy launch (except LaunchTimeout "
                     "as err)")
    cases = [(f"the LaunchTimeout from your launch", str(err),
              {r: _innermost(err.stacks[r]) for r in err.ranks})]
    cases += [(f"a LaunchTimeout from another job (ranks {sorted(want)})", text, want)
              for want, text in _CANNED]
    for what, text, want in cases:
        got = fn(text)
        expect_type(got, dict, f"diagnose_hang({what})",
                    hint="return a dict {rank (int): function name (str)}")
        expect_equal(got, want, what=f"diagnose_hang({what})",
                     hint="split the message at the '--- rank R' headers; the first 'File ... "
                          "in NAME' line under each header is the innermost frame")
    stuck = ", ".join(f"{r}: {name}" for r, name in sorted(cases[0][2].items()))
    return f"your launch's stuck ranks read correctly ({stuck}), and 2 other jobs'"
