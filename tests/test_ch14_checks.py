"""The lab-14 checkers: they pass correct answers and fail wrong ones with a message.

The correct answers are written here independently of the solution notebook; each wrong
one is a mistake a learner is likely to make. The ZeRO checkers train on 4 processes,
so these tests launch a few short runs (about a second each).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from utils import zero
from utils.checks import ExerciseFailed, NotAttempted
from utils.checks import ch14 as check

# Logic tests hold the checkers to the library reference; refusal: tests/test_library_answers.py
pytestmark = pytest.mark.usefixtures("library_answers_allowed")


# -- exercises 1 and 2 ----------------------------------------------------------------------
def shard_range(numel, world_size, rank):
    if not 0 <= rank < world_size:
        raise ValueError("rank out of range")
    s = math.ceil(numel / world_size)
    return rank * s, (rank + 1) * s


def adamw_step(param, grad, m, v, step, lr, betas, eps, weight_decay):
    b1, b2 = betas
    param.mul_(1 - lr * weight_decay)
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).add_(grad * grad, alpha=1 - b2)
    m_hat, v_hat = m / (1 - b1 ** step), v / (1 - b2 ** step)
    param.sub_(lr * m_hat / (v_hat.sqrt() + eps))


def test_shard_range_passes_and_fails():
    check.shard_range(shard_range)
    with pytest.raises(ExerciseFailed, match="padding"):          # floor division, short last chunk
        check.shard_range(lambda n, w, r: (r * (n // w), n if r == w - 1 else (r + 1) * (n // w)))
    with pytest.raises(ExerciseFailed, match="ValueError"):       # no range check
        check.shard_range(lambda n, w, r: (r * -(-n // w), (r + 1) * -(-n // w)))


def test_adamw_step_passes_and_fails():
    check.adamw_step(adamw_step)

    def no_bias_correction(param, grad, m, v, step, lr, betas, eps, weight_decay):
        adamw_step(param, grad, m, v, 10**9, lr, betas, eps, weight_decay)

    def coupled_decay(param, grad, m, v, step, lr, betas, eps, weight_decay):   # Adam + L2
        adamw_step(param, grad + weight_decay * param, m, v, step, lr, betas, eps, 0.0)

    def not_in_place(param, grad, m, v, step, lr, betas, eps, weight_decay):
        param = param.clone()
        adamw_step(param, grad, m, v, step, lr, betas, eps, weight_decay)

    for wrong in (no_bias_correction, coupled_decay, not_in_place):
        with pytest.raises(ExerciseFailed):
            check.adamw_step(wrong)


# -- exercises 3-5: correct engines ---------------------------------------------------------
class Flat:
    def __init__(self, module, rank, world_size):
        self.module, self.params = module, list(module.parameters())
        self.numel = sum(p.numel() for p in self.params)
        self.lo, self.hi = shard_range(self.numel, world_size, rank)
        self.padded = (self.hi - self.lo) * world_size
        self.full = torch.zeros(self.padded, dtype=self.params[0].dtype)
        self.offsets, o = [], 0
        for p in self.params:
            self.offsets.append(o)
            self.full[o:o + p.numel()] = p.detach().reshape(-1)
            p.data = self.full[o:o + p.numel()].view_as(p)
            o += p.numel()

    def own(self, t):
        return t[self.lo:self.hi]

    def flat_grad(self):
        g = torch.zeros(self.padded, dtype=self.full.dtype)
        for o, p in zip(self.offsets, self.params):
            g[o:o + p.numel()] = p.grad.reshape(-1)
        return g

    def resize(self, on):
        self.full.untyped_storage().resize_(self.padded * 8 if on else 0)


class Engine:
    """ZeRO stage STAGE; the flags make the mistakes the wrong answers below make."""

    STAGE, AVERAGE, GATHER_PARAMS, HOOKS, FREE_AFTER_FORWARD = 1, True, True, True, True

    def __init__(self, model, rank, world_size, **hp):
        self.model, self.world_size, self.hp, self.t = model, world_size, hp, 0
        self.units = [Flat(u, rank, world_size) for u in zero.units(model)]
        shard = lambda u: torch.zeros(u.hi - u.lo, dtype=torch.float64)   # noqa: E731
        self.m = [shard(u) for u in self.units]
        self.v = [shard(u) for u in self.units]
        self.g = [shard(u) for u in self.units]
        self.count = [0] * len(self.units)
        if self.STAGE == 1:
            self.full_grads = [torch.zeros(u.padded, dtype=torch.float64) for u in self.units]
            for u, g in zip(self.units, self.full_grads):
                for o, p in zip(u.offsets, u.params):
                    p.grad = g[o:o + p.numel()].view_as(p)
        if self.STAGE == 3:
            self.p = [u.own(u.full).clone() for u in self.units]
            for i, u in enumerate(self.units):
                u.resize(False)
                u.module.register_forward_pre_hook(lambda mod, a, i=i: self.gather(i))
                u.module.register_forward_hook(lambda mod, a, out, i=i: self.after_forward(i, out))
        if self.STAGE >= 2 and self.HOOKS:
            for i, u in enumerate(self.units):
                for p in u.params:
                    p.register_post_accumulate_grad_hook(lambda p, i=i: self.landed(i))

    def gather(self, i):
        u = self.units[i]
        if u.full.untyped_storage().nbytes() == 0:
            u.resize(True)
            dist.all_gather_single(u.full, self.p[i])

    def after_forward(self, i, out):
        if self.FREE_AFTER_FORWARD:
            self.units[i].resize(False)
        out.register_hook(lambda grad, i=i: self.gather(i))

    def landed(self, i):
        u = self.units[i]
        self.count[i] += 1
        if self.count[i] == len(u.params):
            self.count[i] = 0
            self.reduce(i)

    def reduce(self, i):
        u = self.units[i]
        flat = u.flat_grad()
        for p in u.params:
            p.grad = None
        if self.STAGE == 3:
            u.resize(False)
        dist.reduce_scatter_single(self.g[i], flat)
        if self.AVERAGE:
            self.g[i].div_(self.world_size)

    def step(self, tokens, targets):
        if self.STAGE == 1:
            for g in self.full_grads:
                g.zero_()
        loss = zero.loss_fn(self.model, tokens, targets)
        loss.backward()
        if self.STAGE >= 2 and not self.HOOKS:
            for i in range(len(self.units)):
                self.reduce(i)
        self.t += 1
        with torch.no_grad():
            for i, u in enumerate(self.units):
                if self.STAGE == 1:
                    dist.all_reduce(self.full_grads[i])
                    if self.AVERAGE:
                        self.full_grads[i].div_(self.world_size)
                    self.g[i] = u.own(self.full_grads[i])
                param = self.p[i] if self.STAGE == 3 else u.own(u.full)
                adamw_step(param, self.g[i], self.m[i], self.v[i], self.t, **self.hp)
                if self.STAGE < 3 and self.GATHER_PARAMS:
                    dist.all_gather_single(u.full, u.own(u.full).clone())
        return loss.item()

    def held(self):
        params = [u.full for u in self.units] + (self.p if self.STAGE == 3 else [])
        grads = self.full_grads if self.STAGE == 1 else self.g
        return {"params": params, "grads": grads, "optimizer": self.m + self.v}

    def shards(self):
        return self.p if self.STAGE == 3 else [u.own(u.full) for u in self.units]

    def grad_shards(self):
        return self.g


class Good1(Engine):
    STAGE = 1


class Good2(Engine):
    STAGE = 2


class Good3(Engine):
    STAGE = 3


class SumsGradients(Engine):          # all-reduce without dividing by world_size
    STAGE, AVERAGE = 1, False


class ForgetsAllGather(Engine):        # each rank updates its shard, nobody shares it
    STAGE, GATHER_PARAMS = 1, False


class ReducesAfterBackward(Engine):    # stage 2 that waits for the whole backward pass
    STAGE, HOOKS = 2, False


class KeepsEverythingGathered(Engine):  # stage 3 that frees only after backward
    STAGE, FREE_AFTER_FORWARD = 3, False


class Stub:
    def __init__(self, model, rank, world_size, **hp):
        raise NotImplementedError("replace this line with your code")

    def step(self, tokens, targets):
        raise NotImplementedError

    def held(self):
        return {}

    def shards(self):
        return []

    def grad_shards(self):
        return []


def test_zero_checkers_pass_correct_engines(capsys):
    check.zero1(Good1)
    check.zero2(Good2)
    check.zero3(Good3)
    out = capsys.readouterr().out
    assert "sends 2,502,144 B a step = 3 Psi" in out           # stage 1 by all-reduce, stage 3
    assert "sends 1,668,096 B a step = 2 Psi" in out           # stage 2


@pytest.mark.parametrize("stage, wrong, message", [
    (1, SumsGradients, "you summed the gradients"),
    (1, ForgetsAllGather, "parameters after 3 steps"),
    (2, ReducesAfterBackward, "gradient bytes held during backward"),
    (3, KeepsEverythingGathered, "parameter bytes held during the forward"),
])
def test_zero_checkers_fail_wrong_engines(stage, wrong, message):
    checker = {1: check.zero1, 2: check.zero2, 3: check.zero3}[stage]
    with pytest.raises(ExerciseFailed, match=message):
        checker(wrong)


def test_zero_checker_reports_a_stub_as_not_attempted():
    with pytest.raises(NotAttempted):
        check.zero1(Stub)
