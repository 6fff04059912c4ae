"""Checkers for lab 13, parallelism: tensor, data and pipeline parallel training by hand.

The oracles are the real things: the single-process ``nn.Linear``/MLP/model for tensor
parallelism and pipelines (outputs, losses and gradients), PyTorch's
``DistributedDataParallel`` for data parallelism (parameters after an SGD step, and the
buckets it all-reduces once it has rebuilt them in gradient-ready order), and
``utils.parallelism`` for bucket assignment, pipeline schedules (an event simulation),
bubbles and communication volumes. Distributed checks run the learner's code in real
processes with :func:`utils.dist.launch` (gloo on CPU) and count what each rank hands
to ``torch.distributed`` with :class:`utils.collectives.CommCounter`.

Before launching, each distributed check runs the learner's code once in this process
at world size 1 (a one-rank gloo group): an unfinished stub then shows up as "not
attempted", and the degenerate case (t = 1, a single replica, a one-stage pipeline) is
checked on the way.
"""
from __future__ import annotations

import contextlib
import copy
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .. import collectives as coll
from .. import parallelism as par
from ..dist import LaunchTimeout, RankError, launch
from . import exercise, expect_close, expect_equal, expect_shape, expect_type, fail

_STUB = "replace this line with your code"
_TIMEOUT = 40.0


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _solo_group():
    """A one-rank gloo process group in this process, for a world-size-1 run."""
    if dist.is_available() and dist.is_initialized():
        yield False
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield True
    finally:
        dist.destroy_process_group()


def _ranks(fn, world_size, *args, what):
    """Run ``fn`` on ``world_size`` processes; a learner's exception becomes a clear failure."""
    try:
        return launch(fn, world_size, *args, timeout=_TIMEOUT)
    except RankError as err:
        rank = err.cause
        text = err.tracebacks[rank].strip()
        if _STUB in text:
            fail(f"{what}: a stub is still unfinished", "your code to run on every rank",
                 f"rank {rank} raised NotImplementedError('{_STUB}')",
                 "a stub that only runs with several ranks is still there: fill it in")
        lines = text.splitlines()
        fail(f"{what}: rank {rank} of {world_size} raised {lines[-1][:100]}",
             "every rank to finish without an error",
             _learner_frames(text),
             "the lines above are your code on that rank, innermost last; an error on one rank "
             "often makes the others fail with 'Connection closed by peer'")
    except LaunchTimeout as err:
        stack = err.stacks.get(err.ranks[0], "")
        fail(f"{what}: the ranks hung", f"all {world_size} ranks to finish within {_TIMEOUT:g} s",
             f"rank(s) {err.ranks} never finished; rank {err.ranks[0]} was waiting in "
             f"(innermost first):\n" + _learner_frames("\n" + stack + "\n", keep=4, last=False),
             "a rank waits in a recv or a collective that another rank never calls: every "
             "rank must call all_reduce the same number of times, every recv needs a send")


def _learner_frames(text, keep=6, last=True):
    """The frames of a rank's traceback (or stack dump, innermost first: ``last=False``)
    that are the learner's, not PyTorch's or the course library's, with their source
    lines; a traceback's exception line comes last."""
    lines = text.strip("\n").splitlines()
    frames, current = [], None
    for line in lines[1:-1] if last else lines:
        if line.startswith("  File "):
            current = [line]
            frames.append(current)
        elif current is not None and not set(line.strip()) <= set("^~ "):
            current.append(line)
    library = ("site-packages", "/utils/dist.py", "/utils/checks/", "/utils/parallelism.py",
               "<frozen ")
    mine = [f for f in frames if not any(part in f[0] for part in library)] or frames
    if not last:
        return "\n".join(line for f in mine[:keep] for line in f)
    return "\n".join([line for f in mine[-keep:] for line in f] + [lines[-1]])


def _close(got, want, what, hint, rtol=1e-5, atol=1e-6):
    expect_type(got, torch.Tensor, what)
    expect_shape(got, tuple(want.shape), what)
    expect_close(got.detach().to(want.dtype), want, rtol=rtol, atol=atol, what=what, hint=hint)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _linear(n_in, n_out, seed):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def _backward(y, grad):
    """``y.backward(grad)`` without the ~2 s import of sympy that an explicit gradient
    triggers in a fresh process (autograd's shape check): the gradient of sum(y * grad)
    with respect to y is exactly ``grad``."""
    (y * grad).sum().backward()


def _counts(counter):
    return dict(calls=counter.counts(), payload=counter.payload())


# ----------------------------------------------------------------------------- exercise 1
def _tp_layers_run(rank, world_size, Column, Row, fc, x, grad_out):
    """Column- and row-parallel versions of ``fc`` on this rank: outputs and gradients."""
    n_out, n_in = fc.weight.shape
    out = {}
    col = Column(copy.deepcopy(fc), rank, world_size)
    out["col_shapes"] = {"weight": tuple(col.weight.shape), "bias": tuple(col.bias.shape),
                         "numel": sum(p.numel() for p in col.parameters())}
    xc = x.clone().requires_grad_(True)
    yc = col(xc)
    out["col_y"] = yc.detach()
    _backward(yc, grad_out.chunk(world_size, dim=-1)[rank])
    out["col_grads"] = (xc.grad, col.weight.grad, col.bias.grad)

    row = Row(copy.deepcopy(fc), rank, world_size)
    out["row_shapes"] = {"weight": tuple(row.weight.shape), "bias": tuple(row.bias.shape),
                         "numel": sum(p.numel() for p in row.parameters())}
    xr = x.chunk(world_size, dim=-1)[rank].clone().requires_grad_(True)
    with coll.CommCounter() as fwd:
        yr = row(xr)
    out["row_y"] = yr.detach()
    with coll.CommCounter() as bwd:
        _backward(yr, grad_out)
    out["row_grads"] = (xr.grad, row.weight.grad, row.bias.grad)
    out["row_counts"] = (_counts(fwd), _counts(bwd))
    return out


def _tp_layers_compare(results, fc, x, grad_out, world_size):
    ref_x = x.clone().requires_grad_(True)
    ref = copy.deepcopy(fc)
    y = ref(ref_x)
    _backward(y, grad_out)
    t = world_size
    n_out, n_in = fc.weight.shape
    for rank, r in enumerate(results):
        where = f"t={t}, rank {rank}"
        expect_type(r["col_grads"][1], torch.Tensor, f"ColumnParallelLinear ({where}): weight.grad",
                    hint="the shard must be an nn.Parameter named `weight` that the output "
                         "depends on, so backward fills its .grad")
        expect_equal(r["col_shapes"], {"weight": (n_out // t, n_in), "bias": (n_out // t,),
                                       "numel": (n_out * n_in + n_out) // t},
                     what=f"ColumnParallelLinear ({where}): parameter shapes",
                     hint="keep only this rank's rows of the weight (out_features // t of "
                          "them) and the matching slice of the bias: "
                          "weight.chunk(world_size, dim=0)[rank]")
        sl = slice(rank * (n_out // t), (rank + 1) * (n_out // t))
        _close(r["col_y"], y.detach()[..., sl], f"ColumnParallelLinear ({where}): output",
               "rank r computes the r-th slice of the output features: F.linear(x, W_r, b_r), "
               "with no communication in the forward")
        gx, gw, gb = r["col_grads"]
        _close(gx, ref_x.grad, f"ColumnParallelLinear ({where}): gradient of the input",
               "every rank used all of x, so dL/dx is the sum of the ranks' partial "
               "gradients: f's backward must all-reduce (sum) the incoming gradient")
        _close(gw, ref.weight.grad[sl], f"ColumnParallelLinear ({where}): weight gradient",
               "the shard's gradient is the matching rows of the full weight's gradient")
        _close(gb, ref.bias.grad[sl], f"ColumnParallelLinear ({where}): bias gradient",
               "the bias shard's gradient is the matching slice of the full bias gradient")

        expect_type(r["row_grads"][1], torch.Tensor, f"RowParallelLinear ({where}): weight.grad",
                    hint="the shard must be an nn.Parameter named `weight`")
        expect_equal(r["row_shapes"], {"weight": (n_out, n_in // t), "bias": (n_out,),
                                       "numel": n_out * n_in // t + n_out},
                     what=f"RowParallelLinear ({where}): parameter shapes",
                     hint="keep this rank's columns of the weight (in_features // t: the "
                          "inputs this rank holds) and the whole bias")
        cs = slice(rank * (n_in // t), (rank + 1) * (n_in // t))
        _close(r["row_y"], y.detach(), f"RowParallelLinear ({where}): output",
               "each rank's x_r @ W_r^T is a partial sum of the output: g's forward must "
               "all-reduce it, and the bias is added once, after the all-reduce")
        gx, gw, gb = r["row_grads"]
        _close(gx, ref_x.grad[..., cs], f"RowParallelLinear ({where}): gradient of the input shard",
               "after g every rank holds the same full output, so g's backward passes the "
               "gradient through unchanged (an all-reduce there would multiply it by t)")
        _close(gw, ref.weight.grad[:, cs], f"RowParallelLinear ({where}): weight gradient",
               "the shard's gradient is the matching columns of the full weight's gradient")
        _close(gb, ref.bias.grad, f"RowParallelLinear ({where}): bias gradient",
               "the bias is replicated: each rank's bias gradient is the full bias gradient")
        if t > 1:
            fwd, bwd = r["row_counts"]
            payload = y.numel() * y.element_size()
            expect_equal(fwd["calls"], {"all_reduce": 1},
                         what=f"RowParallelLinear ({where}): collectives in the forward",
                         hint="exactly one dist.all_reduce of the output, called as "
                              "dist.all_reduce(...) so it can be counted")
            expect_equal(fwd["payload"], {"all_reduce": payload},
                         what=f"RowParallelLinear ({where}): all-reduced bytes in the forward",
                         hint="all-reduce the (batch, ..., out_features) output once, in fp32")
            expect_equal(bwd["calls"], {}, what=f"RowParallelLinear ({where}): collectives "
                                               f"in the backward",
                         hint="g's backward is the identity: no communication")


@exercise
def tp_linear_layers(Column, Row):
    """``Column(linear, rank, world_size)`` and ``Row(linear, rank, world_size)``."""
    fc = _linear(8, 16, seed=1)
    x = torch.randn(3, 5, 8, generator=_gen(2))
    grad_out = torch.randn(3, 5, 16, generator=_gen(3))
    with _solo_group():
        _tp_layers_compare([_tp_layers_run(0, 1, Column, Row, fc, x, grad_out)], fc, x, grad_out, 1)
    for world in (2, 4):
        results = _ranks(_tp_layers_run, world, Column, Row, fc, x, grad_out,
                         what=f"tensor-parallel layers on {world} ranks")
        _tp_layers_compare(results, fc, x, grad_out, world)
    return ("column- and row-parallel outputs and input/weight/bias gradients equal nn.Linear's "
            "for t = 1, 2, 4; one all-reduce in the row-parallel forward, none in its backward")


def _tp_mlp_run(rank, world_size, MLP, fc1, fc2, x, grad_out):
    mlp = MLP(copy.deepcopy(fc1), copy.deepcopy(fc2), rank, world_size)
    xr = x.clone().requires_grad_(True)
    with coll.CommCounter() as fwd:
        y = mlp(xr)
    with coll.CommCounter() as bwd:
        _backward(y, grad_out)
    grads = {name: p.grad for name, p in mlp.named_parameters()}
    return {"y": y.detach(), "x_grad": xr.grad, "grads": grads,
            "numel": sum(p.numel() for p in mlp.parameters()),
            "counts": (_counts(fwd), _counts(bwd))}


def _tp_mlp_compare(results, fc1, fc2, x, grad_out, t):
    f1, f2 = copy.deepcopy(fc1), copy.deepcopy(fc2)
    xr = x.clone().requires_grad_(True)
    y = f2(F.gelu(f1(xr)))
    _backward(y, grad_out)
    h4 = fc1.out_features
    total = sum(p.numel() for p in (*fc1.parameters(), *fc2.parameters()))
    for rank, r in enumerate(results):
        where = f"t={t}, rank {rank}"
        _close(r["y"], y.detach(), f"TensorParallelMLP ({where}): output",
               "fc2(gelu(fc1(x))) with fc1 column-parallel and fc2 row-parallel: the GeLU "
               "applies to this rank's slice of the hidden features")
        _close(r["x_grad"], xr.grad, f"TensorParallelMLP ({where}): gradient of the input",
               "f in the column-parallel layer all-reduces the input gradient; g in the "
               "row-parallel layer passes the output gradient through")
        want = {"fc1.weight": f1.weight.grad, "fc1.bias": f1.bias.grad,
                "fc2.weight": f2.weight.grad, "fc2.bias": f2.bias.grad}
        expect_equal(sorted(r["grads"]), sorted(want),
                     what=f"TensorParallelMLP ({where}): parameter names",
                     hint="store the layers as self.fc1 (a ColumnParallelLinear) and self.fc2 "
                          "(a RowParallelLinear), each with `weight` and `bias`")
        shard = slice(rank * (h4 // t), (rank + 1) * (h4 // t))
        for name, full in want.items():
            if name == "fc2.weight":
                part = full[:, shard]             # the columns that meet this rank's hidden slice
            elif name == "fc2.bias":
                part = full                       # replicated
            else:
                part = full[shard]                # fc1: this rank's rows
            _close(r["grads"][name], part, f"TensorParallelMLP ({where}): gradient of {name}",
                   "each shard's gradient is the matching slice of the full layer's gradient")
        expect_equal(r["numel"], (total - fc2.out_features) // t + fc2.out_features,
                     what=f"TensorParallelMLP ({where}): parameters held by the rank",
                     hint="1/t of both weight matrices and of fc1's bias, plus fc2's whole bias")
        if t > 1:
            payload = y.numel() * y.element_size()
            fwd, bwd = r["counts"]
            expect_equal((fwd["calls"], bwd["calls"]), ({"all_reduce": 1}, {"all_reduce": 1}),
                         what=f"TensorParallelMLP ({where}): all-reduces (forward, backward)",
                         hint="Megatron's MLP needs one all-reduce forward (g) and one backward "
                              "(f): Shoeybi et al. 2019, Section 3")
            expect_equal((fwd["payload"], bwd["payload"]),
                         ({"all_reduce": payload}, {"all_reduce": payload}),
                         what=f"TensorParallelMLP ({where}): all-reduced bytes (forward, backward)",
                         hint="both all-reduces carry a tensor of the activation's size, b·s·h")


@exercise
def tp_mlp(MLP):
    """``MLP(fc1, fc2, rank, world_size)``: Megatron's tensor-parallel MLP, fc2(gelu(fc1(x)))."""
    fc1, fc2 = _linear(8, 32, seed=4), _linear(32, 8, seed=5)
    x = torch.randn(2, 6, 8, generator=_gen(6))
    grad_out = torch.randn(2, 6, 8, generator=_gen(7))
    with _solo_group():
        _tp_mlp_compare([_tp_mlp_run(0, 1, MLP, fc1, fc2, x, grad_out)], fc1, fc2, x, grad_out, 1)
    for world in (2, 4):
        results = _ranks(_tp_mlp_run, world, MLP, fc1, fc2, x, grad_out,
                         what=f"the tensor-parallel MLP on {world} ranks")
        _tp_mlp_compare(results, fc1, fc2, x, grad_out, world)
    return ("output, input gradient and every shard's gradients equal the single-process MLP "
            "for t = 1, 2, 4; one all-reduce of b·s·h forward and one backward")


# ----------------------------------------------------------------------------- exercise 2
@exercise
def make_buckets(fn):
    """``fn(nbytes, cap_bytes)`` -> lists of indices, DDP's rule (close at >= cap)."""
    cases = [([100, 200, 300], 250), ([100, 200, 300], 300), ([100, 200, 300], 10**9),
             ([100, 200, 300], 1), ([400, 16, 16, 16, 400], 32), ([], 100), ([7], 7),
             ([4, 4, 4, 4, 4, 4, 4], 8), ([16, 384, 96, 2304, 96, 3072, 128, 2048], 500)]
    for nbytes, cap in cases:
        got = fn(list(nbytes), cap)
        what = f"make_buckets({nbytes}, cap_bytes={cap})"
        expect_type(got, (list, tuple), what, hint="return a list of lists of indices")
        expect_equal([list(b) for b in got], par.bucket_assignment(nbytes, cap), what=what,
                     hint="walk the tensors in the given order, add each to the open bucket, "
                          "and close the bucket as soon as it holds cap_bytes or more; a "
                          "last, partly filled bucket is kept; no empty buckets")
    for bad in (0, -5):
        try:
            fn([1, 2], bad)
        except ValueError:
            continue
        fail(f"make_buckets([1, 2], cap_bytes={bad})", "ValueError for a cap below 1 byte",
             "no error", "raise ValueError('cap_bytes must be >= 1')")
    return "9 cases (cap smaller, equal and larger than the tensors, empty) and a bad cap"


def _ddp_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(),
                         nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 4))


def _ddp_run(rank, world_size, allreduce_gradients, model, x, y, cap, with_ddp):
    n = x.shape[0] // world_size
    xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    mine = copy.deepcopy(model)
    F.mse_loss(mine(xs), ys).backward()
    with coll.CommCounter() as counter:
        allreduce_gradients(list(mine.parameters()), cap)
    out = {"grads": [p.grad.clone() if p.grad is not None else None for p in mine.parameters()],
           "log": [(c.kind, c.nbytes) for c in counter.calls]}
    torch.optim.SGD(mine.parameters(), lr=0.1).step()
    out["params"] = [p.detach().clone() for p in mine.parameters()]
    if with_ddp:
        theirs = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(theirs, bucket_cap_mb=cap / 2**20)
        sizes = []

        def record(state, bucket):       # see what DDP all-reduces, then do it as DDP would
            sizes.append(bucket.buffer().numel() * bucket.buffer().element_size())
            work = dist.all_reduce(bucket.buffer().div_(world_size), async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])

        ddp.register_comm_hook(None, record)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        F.mse_loss(ddp(xs), ys).backward()
        opt.step()
        out["ddp_params"] = [p.detach().clone() for p in theirs.parameters()]
        opt.zero_grad()
        sizes.clear()                    # DDP rebuilds its buckets after the first step
        F.mse_loss(ddp(xs), ys).backward()
        out["ddp_buckets"] = list(sizes)
    return out


def _ddp_compare(results, model, x, y, cap, world_size):
    ref = copy.deepcopy(model)
    F.mse_loss(ref(x), y).backward()
    ref_grads = [p.grad for p in ref.parameters()]
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    sizes = [p.numel() * p.element_size() for p in model.parameters()][::-1]
    buckets = [sum(sizes[i] for i in b) for b in par.bucket_assignment(sizes, cap)]
    names = [n for n, _ in model.named_parameters()]
    for rank, r in enumerate(results):
        where = f"{world_size} ranks, cap {cap} B, rank {rank}"
        log = r["log"]
        kinds = sorted({k for k, _ in log})
        if kinds and kinds != ["all_reduce"]:
            fail(f"allreduce_gradients ({where}): collectives used", "only dist.all_reduce",
                 f"{kinds}", "average the gradients with all-reduce (sum), then divide")
        if world_size > 1 or log:
            expect_equal([b for _, b in log], buckets,
                         what=f"allreduce_gradients ({where}): bytes of each all-reduce, in order",
                         hint="one dist.all_reduce per bucket of make_buckets over the "
                              "gradients in reverse parameter order (the order the backward "
                              "pass produces them); flatten each bucket into one tensor")
        for name, got, want in zip(names, r["grads"], ref_grads):
            if got is None:
                fail(f"allreduce_gradients ({where}): gradient of {name}", "a gradient",
                     "None", "write the averaged values back into each parameter's .grad")
            _close(got, want, f"allreduce_gradients ({where}): gradient of {name}",
                   "each rank's gradient must become the average over the ranks (sum with "
                   "all_reduce, divide by the world size), which equals the gradient of the "
                   "whole batch; copy each slice of the flat bucket back into its .grad")
        if "ddp_params" in r:
            for name, got, want in zip(names, r["params"], r["ddp_params"]):
                _close(got, want, f"after one SGD step ({where}): parameter {name} vs "
                                  f"DistributedDataParallel",
                       "the same data shards and the same step must give DDP's parameters")
            expect_equal(buckets, r["ddp_buckets"],
                         what=f"bucket sizes ({where}) vs DDP's rebuilt buckets",
                         hint="the library rule and DDP disagree; report this")
    return bool(results and all("ddp_params" in r for r in results))


@exercise
def allreduce_gradients(fn):
    """``fn(params, cap_bytes)``: average .grad over the ranks, one all-reduce per bucket."""
    model = _ddp_model()
    x = torch.randn(12, 16, generator=_gen(8))
    y = torch.randn(12, 4, generator=_gen(9))
    with _solo_group():
        results = [_ddp_run(0, 1, fn, model, x, y, 2000, False)]
    _ddp_compare(results, model, x, y, 2000, 1)
    results = _ranks(_ddp_run, 3, fn, model, x, y, 500, False,
                     what="data parallelism by hand on 3 ranks")
    _ddp_compare(results, model, x, y, 500, 3)
    results = _ranks(_ddp_run, 2, fn, model, x, y, 2000, True,      # with DDP alongside
                     what="data parallelism by hand on 2 ranks (with DDP alongside)")
    _ddp_compare(results, model, x, y, 2000, 2)
    return ("gradients equal the whole-batch gradient on 1, 2 and 3 ranks; parameters after an "
            "SGD step equal DistributedDataParallel's; one all-reduce per bucket, the same "
            "buckets DDP uses")


# ----------------------------------------------------------------------------- exercise 3
_SHAPES = [(1, 1), (1, 4), (2, 1), (2, 4), (3, 2), (4, 8), (4, 2), (8, 3), (4, 1)]


def _orders_as_lists(got, what, p):
    expect_type(got, (list, tuple), what, hint="return a list with one list per stage")
    if len(got) != p:
        fail(what, f"{p} lists, one per stage", f"{len(got)} lists",
             "stage 0 holds the first layers; return one list of operations per stage")
    return [[tuple(op) for op in row] for row in got]


@exercise
def pipeline_orders(fn):
    """``fn(kind, p, m)`` -> per-stage lists of ("F"|"B", microbatch)."""
    for kind in ("gpipe", "1f1b"):
        for p, m in _SHAPES:
            what = f"pipeline_orders({kind!r}, p={p}, m={m})"
            got = _orders_as_lists(fn(kind, p, m), what, p)
            want = par.pipeline_orders(kind, p, m)
            hint = ("GPipe: F0..F(m-1) then B0..B(m-1) on every stage" if kind == "gpipe" else
                    "1F1B: stage s runs min(p-s-1, m) warm-up forwards, then alternates one "
                    "forward and one backward (F of the next micro-batch first), then the "
                    "remaining backwards, all in micro-batch order")
            for s in range(p):
                expect_equal(got[s], want[s], what=f"{what}, stage {s}", hint=hint)
    try:
        fn("zigzag", 2, 2)
    except ValueError:
        pass
    else:
        fail("pipeline_orders('zigzag', 2, 2)", "ValueError for an unknown schedule",
             "no error", "raise ValueError for a kind other than 'gpipe' or '1f1b'")
    return f"GPipe and 1F1B for {len(_SHAPES)} (p, m) pairs, m < p included, and a bad kind"


def _slots_as_lists(got, what, p):
    expect_type(got, (list, tuple), what, hint="return a list with one list per stage")
    if len(got) != p:
        fail(what, f"{p} lists, one per stage", f"{len(got)} lists", "one list per stage")
    rows = []
    for row in got:
        rows.append([(int(o[0]), o[1], int(o[2])) for o in row])
    return rows


@exercise
def assign_slots(fn):
    """``fn(orders)`` -> per-stage lists of (slot, op, microbatch), each op as early as possible."""
    cases = []
    for kind in ("gpipe", "1f1b"):
        for p, m in _SHAPES:
            cases.append((f"{kind} orders, p={p}, m={m}", par.pipeline_orders(kind, p, m)))
    # orders no formula knows: GPipe with the backwards in reverse, and a lopsided one
    cases.append(("GPipe with backwards in reverse order, p=3, m=4",
                  [[("F", i) for i in range(4)] + [("B", i) for i in reversed(range(4))]
                   for _ in range(3)]))
    cases.append(("stage 0 runs all forwards first, stage 1 alternates, p=2, m=3",
                  [[("F", 0), ("F", 1), ("F", 2), ("B", 0), ("B", 1), ("B", 2)],
                   [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]]))
    for what, orders in cases:
        call = f"assign_slots({what})"
        got = _slots_as_lists(fn(copy.deepcopy(orders)), call, len(orders))
        want = par.assign_slots(orders)
        for s, (g, w) in enumerate(zip(got, want)):
            expect_equal(g, [tuple(o) for o in w], what=f"{call}, stage {s}",
                         hint="keep each stage's order; an op starts when its stage is free "
                              "and its input is done: F(s, i) after F(s-1, i) ends, B(s, i) "
                              "after B(s+1, i) ends (on the last stage after its own F(s, i)); "
                              "every op takes one slot")
    deadlock = [[("B", 0), ("F", 0)], [("F", 0), ("B", 0)]]
    try:
        fn(copy.deepcopy(deadlock))
    except ValueError:
        pass
    else:
        fail("assign_slots([[('B', 0), ('F', 0)], [('F', 0), ('B', 0)]])",
             "ValueError: stage 0 waits for B(1, 0), which needs F(0, 0), which stage 0 "
             "would only run after B(0, 0)", "no error (or a hang)",
             "when no stage can start its next op, the orders deadlock: raise ValueError")
    return f"{len(cases)} orders (formula-free ones included) timed like the simulator; deadlock detected"


@exercise
def bubble_fraction(fn):
    """``fn(schedule)`` -> idle share of p x makespan device-slots; = (p-1)/(m+p-1)."""
    for kind in ("gpipe", "1f1b"):
        for p, m in _SHAPES:
            sched = par.schedule(kind, p, m)
            got = fn(sched)
            what = f"bubble_fraction of the {kind} schedule, p={p}, m={m}"
            expect_type(got, float, what)
            want = Fraction(p - 1, m + p - 1)
            expect_close(float(got), float(want), rtol=1e-12, atol=1e-12, what=what,
                         hint="idle slots / (p x makespan), makespan = the last op's end; "
                              "for a flushed schedule it is (p-1)/(m+p-1): divide by the "
                              "whole step, not by the busy time (that would be (p-1)/m)")
    odd = [[(0, "F", 0), (3, "B", 0)], [(1, "F", 0), (2, "B", 0)]]
    expect_close(float(fn(odd)), 0.5, rtol=1e-12, atol=1e-12,
                 what="bubble_fraction([[(0,'F',0), (3,'B',0)], [(1,'F',0), (2,'B',0)]])",
                 hint="count from the schedule: 4 busy slots out of 2 stages x 4 slots")
    return "measured idle share = (p-1)/(m+p-1) for GPipe and 1F1B; a hand-made schedule"


# ----------------------------------------------------------------------------- exercise 4
def _pipe_model(p, width=8, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(2 * p):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


def _pipe_stage(model, rank, p):
    per = len(model) // p
    return model[rank * per:(rank + 1) * per]


def _pipe_run(rank, world_size, step, model, x, y, order, act_shape):
    stage = copy.deepcopy(_pipe_stage(model, rank, world_size))
    with coll.CommCounter() as counter:
        loss = step(stage, rank, world_size, x.clone(), y.clone(), list(order), act_shape)
    if isinstance(loss, torch.Tensor):
        loss = loss.detach()
    return {"loss": loss, "grads": [p.grad for p in stage.parameters()],
            "counts": _counts(counter)}


def _pipe_compare(results, model, x, y, m, what):
    ref = copy.deepcopy(model)
    loss = F.mse_loss(ref(x), y)
    loss.backward()
    p = len(results)
    act = (x.shape[0] // m) * x.shape[1] * x.element_size()
    for rank, r in enumerate(results):
        where = f"{what}, rank {rank}"
        if rank == p - 1:
            if r["loss"] is None:
                fail(f"pipeline_step ({where}): loss", "the step's loss on the last stage",
                     "None", "the last stage returns the mean of the micro-batch losses")
            got = r["loss"]
            got = got if isinstance(got, torch.Tensor) else torch.tensor(float(got))
            _close(got.reshape(()).double(), loss.detach().double(), f"pipeline_step ({where}): loss",
                   "return the mean over micro-batches of F.mse_loss(out, y_i), which equals "
                   "the loss of the whole batch")
        elif r["loss"] is not None:
            fail(f"pipeline_step ({where}): return value", "None on every stage but the last",
                 f"{r['loss']!r}", "only the last stage computes the loss")
        ref_stage = _pipe_stage(ref, rank, p)
        for i, (got, want) in enumerate(zip(r["grads"], (q.grad for q in ref_stage.parameters()))):
            if got is None:
                fail(f"pipeline_step ({where}): gradient of parameter {i}", "a gradient",
                     "None", "run the backward of every micro-batch through the stage")
            _close(got, want, f"pipeline_step ({where}): gradient of parameter {i}",
                   "scale each micro-batch's loss by 1/m, backpropagate it on the last stage, "
                   "send the gradient of each stage's input back with the activation's "
                   "shape, and call out.backward(grad) on the earlier stages; gradients "
                   "accumulate over the micro-batches")
        if p > 1:
            sends = (rank < p - 1) + (rank > 0)
            expect_equal(r["counts"]["calls"].get("send", 0), sends * m,
                         what=f"pipeline_step ({where}): sends (send or isend)",
                         hint="one send of each micro-batch's activation to the next stage and "
                              "one of its input gradient to the previous stage, nothing else")
            expect_equal(r["counts"]["payload"].get("send", 0), sends * m * act,
                         what=f"pipeline_step ({where}): bytes sent",
                         hint="each message is one micro-batch's activation (or its gradient): "
                              "micro-batch x width x 4 bytes")


@exercise
def pipeline_step(fn):
    """``fn(stage, rank, world_size, x, y, order, act_shape)``: one step, loss on the last stage."""
    x = torch.randn(8, 8, generator=_gen(10))
    y = torch.randn(8, 8, generator=_gen(11))
    one = _pipe_model(1)
    r = _pipe_run(0, 1, fn, one, x, y, par.pipeline_orders("1f1b", 1, 4)[0], (2, 8))
    _pipe_compare([r], one, x, y, 4, "p=1, m=4")
    # One launch per pipeline depth runs several schedules in the same processes: a fresh
    # process pays ~2 s the first time autograd is given an explicit gradient.
    for p, runs in ((2, [("gpipe", 4), ("1f1b", 4), ("1f1b", 1)]), (3, [("1f1b", 4), ("gpipe", 2)])):
        model = _pipe_model(p)
        jobs = [(par.pipeline_orders(kind, p, m), (8 // m, 8)) for kind, m in runs]
        results = _ranks(_pipe_worker, p, fn, model, x, y, jobs,
                         what=f"pipelines of {p} stages ({', '.join(f'{k}, m={m}' for k, m in runs)})")
        for j, (kind, m) in enumerate(runs):
            _pipe_compare([r[j] for r in results], model, x, y, m, f"{kind}, p={p}, m={m}")
    return ("loss and every stage's gradients equal the single-process model for GPipe and "
            "1F1B orders on 1, 2 and 3 stages; m activations and m gradients sent per boundary")


def _pipe_worker(rank, world_size, fn, model, x, y, jobs):
    return [_pipe_run(rank, world_size, fn, model, x, y, orders[rank], act_shape)
            for orders, act_shape in jobs]


# ----------------------------------------------------------------------------- exercise 5
def _counter_run(rank, world_size, Counter):
    out = {}
    originals = {n: getattr(dist, n) for n in ("all_reduce", "send", "isend", "recv", "irecv")}
    a = torch.arange(10, dtype=torch.float32)
    b = torch.ones(3, dtype=torch.bfloat16)
    with Counter() as c:
        dist.all_reduce(a)
        dist.all_reduce(b)
        dist.all_reduce(b)
        if rank == 0:
            dist.send(torch.ones(5), dst=1)
            dist.isend(torch.ones(2, 3, dtype=torch.float64), dst=1).wait()
        else:
            buf = torch.empty(5)
            dist.recv(buf, src=0)
            dist.irecv(torch.empty(2, 3, dtype=torch.float64), src=0).wait()
            out["received"] = buf
    out["calls"], out["payload"] = dict(c.calls), dict(c.payload)
    out["a"], out["b"] = a, b
    out["restored"] = all(getattr(dist, n) is f for n, f in originals.items())
    try:
        with Counter():
            raise KeyError("boom")
    except KeyError:
        pass
    out["restored_after_error"] = all(getattr(dist, n) is f for n, f in originals.items())
    return out


@exercise
def comm_counter(Counter):
    """``Counter()``: a context manager counting dist calls (``.calls``) and bytes (``.payload``)."""
    with _solo_group():
        with Counter() as c:
            dist.all_reduce(torch.ones(4))
        expect_equal((dict(c.calls), dict(c.payload)), ({"all_reduce": 1}, {"all_reduce": 16}),
                     what="one dist.all_reduce of 4 fp32 values (world size 1): (calls, payload)",
                     hint="count calls and bytes (numel x element_size) per operation name")
    results = _ranks(_counter_run, 2, Counter, what="the counter on 2 ranks")
    for rank, r in enumerate(results):
        where = f"rank {rank}"
        want_calls = {"all_reduce": 3, ("send" if rank == 0 else "recv"): 2}
        want_bytes = {"all_reduce": 40 + 2 * 6, ("send" if rank == 0 else "recv"): 20 + 48}
        expect_equal(r["calls"], want_calls, what=f"{where}: calls",
                     hint="3 all_reduce; send and isend both count as 'send', recv and irecv "
                          "as 'recv'; operations that were not called have no key")
        expect_equal(r["payload"], want_bytes, what=f"{where}: payload bytes",
                     hint="bytes = numel() x element_size(): 10 fp32 + 2 x 3 bf16 all-reduced, "
                          "5 fp32 + 2x3 fp64 sent or received")
        _close(r["a"], torch.arange(10, dtype=torch.float32) * 2, f"{where}: all_reduce result "
               "under the counter", "the wrapper must call the real function and return its result")
        if rank == 1:
            _close(r["received"], torch.ones(5), f"{where}: received tensor",
                   "pass every argument through to the real recv")
        expect_equal(r["restored"], True, what=f"{where}: torch.distributed after the with block",
                     hint="__exit__ must put the original functions back")
        expect_equal(r["restored_after_error"], True,
                     what=f"{where}: torch.distributed after an exception inside the with block",
                     hint="restore in __exit__ whatever happened, and return False (or None) so "
                          "the exception propagates")
    return "all_reduce, send/isend, recv/irecv counted in calls and bytes; originals restored"


@exercise
def comm_formulas(ring_all_reduce_bytes, tp_mlp_bytes, dp_bytes, pp_bytes):
    """The per-rank byte formulas, against ``utils.parallelism``."""
    for payload, n in ((1000, 1), (1000, 2), (1000, 3), (4096, 8), (10**9, 1024)):
        expect_close(float(ring_all_reduce_bytes(payload, n)),
                     par.collective_bytes("all_reduce", payload, n), rtol=1e-12, atol=0,
                     what=f"ring_all_reduce_bytes({payload}, {n})",
                     hint="a ring all-reduce is a reduce-scatter plus an all-gather: each rank "
                          "sends 2 (n-1)/n of the payload; nothing when n = 1")
    for tokens, h, t, b in ((10, 8, 2, 4), (4096, 8192, 8, 2), (7, 5, 1, 2), (12, 8, 4, 4)):
        want = 2 * par.collective_bytes("all_reduce", tokens * h * b, t)
        expect_close(float(tp_mlp_bytes(tokens, h, t, b)), want, rtol=1e-12, atol=0,
                     what=f"tp_mlp_bytes(tokens={tokens}, hidden={h}, t={t}, bytes={b})",
                     hint="one MLP block, forward and backward: two all-reduces of "
                          "tokens x hidden elements")
    for psi, n, b in ((1000, 2, 4), (6_738_415_616, 64, 2), (10, 1, 4), (1234, 3, 4)):
        expect_close(float(dp_bytes(psi, n, b)), par.dp_bytes_per_step(psi, n, b), rtol=1e-12,
                     atol=0, what=f"dp_bytes({psi}, {n}, {b})",
                     hint="one ring all-reduce of all the gradients")
    for tokens, h, m, b in ((4, 8, 4, 4), (4096, 8192, 16, 2), (1, 1, 1, 4)):
        expect_close(float(pp_bytes(tokens, h, m, b)),
                     m * par.pp_bytes_per_microbatch(tokens, h, b), rtol=1e-12, atol=0,
                     what=f"pp_bytes(tokens={tokens}, hidden={h}, m={m}, bytes={b})",
                     hint="a stage of a two-stage pipeline sends one activation (or one "
                          "gradient) of tokens x hidden elements per micro-batch")
    return "ring all-reduce, TP MLP, DP and PP bytes equal utils.parallelism's"
