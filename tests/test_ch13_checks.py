"""The lab-13 checkers pass correct answers and fail wrong ones with a message.

The correct answers are written out here (as a learner would); each wrong one is a
mistake a learner is likely to make. Most wrong answers are caught by the checkers'
first, in-process run at world size 1; the ones that only show with several ranks
(a missing all-reduce, no averaging) cost one launch each.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from utils import collectives as coll
from utils.checks import ExerciseFailed, LibraryAnswer, NotAttempted
from utils.checks import ch13 as check

# Logic tests hold the checkers to the library reference; refusal: tests/test_library_answers.py
pytestmark = pytest.mark.usefixtures("library_answers_allowed")


# ---------------------------------------------------------------------- exercise 1
class Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CopyNoReduce(Copy):                      # wrong: f's backward forgets the all-reduce
    @staticmethod
    def backward(ctx, grad):
        return grad


class Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad


class Column(nn.Module):
    copy_fn = Copy

    def __init__(self, linear, rank, world_size):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().chunk(world_size, 0)[rank].clone())
        self.bias = nn.Parameter(linear.bias.detach().chunk(world_size, 0)[rank].clone())

    def forward(self, x):
        return F.linear(self.copy_fn.apply(x), self.weight, self.bias)


class ColumnNoReduce(Column):
    copy_fn = CopyNoReduce


class Row(nn.Module):
    def __init__(self, linear, rank, world_size):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().chunk(world_size, 1)[rank].clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return Reduce.apply(F.linear(x, self.weight)) + self.bias


class RowBiasInside(Row):                      # wrong: bias added on every rank, then summed
    def forward(self, x):
        return Reduce.apply(F.linear(x, self.weight, self.bias))


class MLP(nn.Module):
    def __init__(self, fc1, fc2, rank, world_size):
        super().__init__()
        self.fc1, self.fc2 = Column(fc1, rank, world_size), Row(fc2, rank, world_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class MLPRelu(MLP):                            # wrong: the activation
    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class Stub(nn.Module):
    def __init__(self, *args):
        super().__init__()
        raise NotImplementedError("replace this line with your code")


def test_tp_linear_layers():
    check.tp_linear_layers(Column, Row)
    with pytest.raises(ExerciseFailed, match="gradient of the input"):
        check.tp_linear_layers(ColumnNoReduce, Row)
    with pytest.raises(ExerciseFailed, match="RowParallelLinear.*output"):
        check.tp_linear_layers(Column, RowBiasInside)
    with pytest.raises(NotAttempted):
        check.tp_linear_layers(Stub, Row)


def test_tp_mlp():
    check.tp_mlp(MLP)
    with pytest.raises(ExerciseFailed, match="output"):
        check.tp_mlp(MLPRelu)
    with pytest.raises(NotAttempted):
        check.tp_mlp(Stub)


# ---------------------------------------------------------------------- exercise 2
def make_buckets(nbytes, cap_bytes):
    if cap_bytes < 1:
        raise ValueError("cap_bytes must be >= 1")
    out, cur, size = [], [], 0
    for i, n in enumerate(nbytes):
        cur.append(i)
        size += n
        if size >= cap_bytes:
            out.append(cur)
            cur, size = [], 0
    return out + ([cur] if cur else [])


def make_buckets_strict(nbytes, cap_bytes):    # wrong: never lets a bucket reach the cap
    out, cur, size = [], [], 0
    for i, n in enumerate(nbytes):
        if cur and size + n > cap_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cap_bytes < 1:
        raise ValueError
    return out + ([cur] if cur else [])


def test_make_buckets():
    check.make_buckets(make_buckets)
    with pytest.raises(ExerciseFailed, match="make_buckets"):
        check.make_buckets(make_buckets_strict)
    with pytest.raises(ExerciseFailed, match="ValueError"):
        check.make_buckets(lambda nbytes, cap: make_buckets(nbytes, max(cap, 1)))


def allreduce_gradients(params, cap_bytes, reverse=True, average=True):
    world = dist.get_world_size()
    ready = [p for p in (reversed(params) if reverse else params) if p.grad is not None]
    for bucket in make_buckets([p.grad.numel() * 4 for p in ready], cap_bytes):
        grads = [ready[i].grad for i in bucket]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        if average:
            flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def allreduce_forward_order(params, cap_bytes):      # wrong: buckets in forward order
    allreduce_gradients(params, cap_bytes, reverse=False)


def allreduce_no_average(params, cap_bytes):         # wrong: sums instead of averaging
    allreduce_gradients(params, cap_bytes, average=False)


def allreduce_stub(params, cap_bytes):
    raise NotImplementedError("replace this line with your code")


def test_allreduce_gradients():
    check.allreduce_gradients(allreduce_gradients)
    with pytest.raises(ExerciseFailed, match="bytes of each all-reduce"):
        check.allreduce_gradients(allreduce_forward_order)
    with pytest.raises(ExerciseFailed, match="gradient of"):
        check.allreduce_gradients(allreduce_no_average)
    with pytest.raises(NotAttempted):
        check.allreduce_gradients(allreduce_stub)


# ---------------------------------------------------------------------- exercise 3
def pipeline_orders(kind, p, m, warmup=lambda p, s: p - s - 1):
    if kind not in ("gpipe", "1f1b"):
        raise ValueError(kind)
    out = []
    for s in range(p):
        if kind == "gpipe":
            out.append([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
            continue
        w = min(warmup(p, s), m)
        order = [("F", i) for i in range(w)]
        for k in range(m - w):
            order += [("F", w + k), ("B", k)]
        out.append(order + [("B", i) for i in range(m - w, m)])
    return out


def test_pipeline_orders():
    check.pipeline_orders(pipeline_orders)
    with pytest.raises(ExerciseFailed, match="1f1b"):
        check.pipeline_orders(lambda kind, p, m: pipeline_orders(kind, p, m, lambda p, s: p - s))


def assign_slots(orders, respect_deps=True):
    p = len(orders)
    finish, free, nxt = {}, [0] * p, [0] * p
    out = [[] for _ in range(p)]
    left = sum(map(len, orders))
    while left:
        moved = False
        for s in range(p):
            while nxt[s] < len(orders[s]):
                op, i = orders[s][nxt[s]]
                deps = ([("F", s - 1, i)] if s else []) if op == "F" else \
                    ([("B", s + 1, i)] if s < p - 1 else [("F", s, i)])
                if not respect_deps:
                    deps = [d for d in deps if d[1] == s]
                if any(d not in finish for d in deps):
                    break
                start = max([free[s]] + [finish[d] for d in deps])
                finish[(op, s, i)] = free[s] = start + 1
                out[s].append((start, op, i))
                nxt[s] += 1
                left -= 1
                moved = True
        if not moved:
            raise ValueError("deadlock")
    return out


def test_assign_slots():
    check.assign_slots(assign_slots)
    with pytest.raises(ExerciseFailed, match="assign_slots"):
        check.assign_slots(lambda orders: assign_slots(orders, respect_deps=False))


def test_bubble_fraction():
    def measured(schedule):
        end = max(s + 1 for row in schedule for s, _, _ in row)
        return 1 - sum(map(len, schedule)) / (len(schedule) * end)

    def megatron_convention(schedule):               # wrong: idle over busy time
        f = measured(schedule)
        return f / (1 - f)

    check.bubble_fraction(measured)
    with pytest.raises(ExerciseFailed, match="bubble_fraction"):
        check.bubble_fraction(megatron_convention)


# ---------------------------------------------------------------------- exercise 4
def pipeline_step(stage, rank, world_size, x, y, order, act_shape, scale=True):
    m = sum(op == "F" for op, _ in order)
    first, last = rank == 0, rank == world_size - 1
    xs, ys = x.chunk(m), y.chunk(m)
    saved, sends, total = {}, [], 0.0
    for op, i in order:
        if op == "F":
            if first:
                inp = xs[i]
            else:
                inp = torch.empty(act_shape)
                dist.recv(inp, src=rank - 1)
                inp.requires_grad_(True)
            out = stage(inp)
            if last:
                out = F.mse_loss(out, ys[i]) / (m if scale else 1)
                total += out.item()
            else:
                msg = out.detach()
                sends.append((dist.isend(msg, dst=rank + 1), msg))
            saved[i] = (inp, out)
        else:
            inp, out = saved.pop(i)
            if last:
                out.backward()
            else:
                grad = torch.empty_like(out)
                dist.recv(grad, src=rank + 1)
                out.backward(grad)
            if not first:
                sends.append((dist.isend(inp.grad, dst=rank - 1), inp.grad))
    for work, _ in sends:
        work.wait()
    return total / (1 if scale else m) if last else None


def _stub_step(stage, rank, world_size, x, y, order, act_shape):
    raise NotImplementedError("replace this line with your code")


def test_pipeline_step():
    check.pipeline_step(pipeline_step)
    with pytest.raises(ExerciseFailed, match="gradient"):
        check.pipeline_step(lambda *a: pipeline_step(*a, scale=False))
    with pytest.raises(NotAttempted):
        check.pipeline_step(_stub_step)


# ---------------------------------------------------------------------- exercise 5
class Counter:
    NAMES = {"all_reduce": "all_reduce", "send": "send", "isend": "send", "recv": "recv",
             "irecv": "recv"}

    def __init__(self):
        self.calls, self.payload, self._saved = {}, {}, {}

    def __enter__(self):
        for name, kind in self.NAMES.items():
            self._saved[name] = original = getattr(dist, name)
            setattr(dist, name, self._wrap(original, self.kind(name, kind)))
        return self

    def kind(self, name, kind):
        return kind

    def _wrap(self, original, kind):
        def counted(tensor, *args, **kwargs):
            self.calls[kind] = self.calls.get(kind, 0) + 1
            self.payload[kind] = self.payload.get(kind, 0) + tensor.numel() * tensor.element_size()
            return original(tensor, *args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)
        return False


class CounterByFunction(Counter):                  # wrong: isend counted apart from send
    def kind(self, name, kind):
        return name


class CounterLeaks(Counter):                       # wrong: never restores torch.distributed
    def __exit__(self, *exc):
        return False


def test_comm_counter():
    check.comm_counter(Counter)
    with pytest.raises(ExerciseFailed, match="calls"):
        check.comm_counter(CounterByFunction)
    originals = {n: getattr(dist, n) for n in Counter.NAMES}
    try:
        with pytest.raises(ExerciseFailed):
            check.comm_counter(CounterLeaks)
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)


def test_comm_counter_refuses_the_course_counter(monkeypatch):
    import utils.checks
    monkeypatch.setattr(utils.checks, "_ALLOW_LIBRARY", False)   # this module allows it
    with pytest.raises(LibraryAnswer, match="utils.collectives.CommCounter"):
        check.comm_counter(coll.CommCounter)


def test_comm_formulas():
    ring = lambda payload, n: 2 * (n - 1) / n * payload
    tp = lambda tokens, h, t, b: 2 * ring(tokens * h * b, t)
    dp = lambda psi, n, b: ring(psi * b, n)
    pp = lambda tokens, h, m, b: m * tokens * h * b
    check.comm_formulas(ring, tp, dp, pp)
    half = lambda payload, n: (n - 1) / n * payload                     # reduce-scatter only
    with pytest.raises(ExerciseFailed, match="ring_all_reduce_bytes"):
        check.comm_formulas(half, tp, dp, pp)
    with pytest.raises(ExerciseFailed, match="pp_bytes"):
        check.comm_formulas(ring, tp, dp, lambda tokens, h, m, b: 2 * m * tokens * h * b)
