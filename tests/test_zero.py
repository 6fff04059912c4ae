"""Tests of utils.zero: the collective counter, storage counting, the lab's data and
reference run, and the training harness (with a hand-written data-parallel engine and two
of PyTorch's). Expected values are written out here from sizes and formulas."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from utils import zero
from utils.collectives import COLLECTIVE_KINDS
from utils.dist import launch

CFG = zero.LAB_CONFIG
# Parameters of the lab model, counted from its configuration: embedding, per layer two
# RMSNorm weights, q, k, v, o and the three SwiGLU matrices, the final norm, the LM head.
D, V, KV, FF, L = CFG.d_model, CFG.vocab, CFG.n_kv_heads * CFG.head_dim, CFG.d_ff, CFG.n_layers
LAYER = 2 * D + D * D + 2 * D * KV + D * D + 3 * D * FF
PSI = V * D + L * LAYER + D + V * D


# -- storage_bytes ------------------------------------------------------------------------
def test_storage_bytes_counts_each_storage_once():
    buf = torch.zeros(100, dtype=torch.float64)
    views = [buf[:10], buf[10:60], buf[60:].view(8, 5)]
    assert zero.storage_bytes(views) == 800
    assert zero.storage_bytes(views + [buf, None]) == 800
    other = torch.zeros(3, dtype=torch.float32)
    assert zero.storage_bytes(views + [other]) == 812
    buf.untyped_storage().resize_(0)
    assert zero.storage_bytes(views + [other]) == 12
    with pytest.raises(TypeError):
        zero.storage_bytes([buf, "not a tensor"])


# -- model, units, data --------------------------------------------------------------------
def test_lab_model_units_and_size():
    model = zero.lab_model()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    sizes = [sum(p.numel() for p in u.parameters()) for u in zero.units(model)]
    assert sizes == [V * D] + [LAYER] * L + [D, V * D]
    assert sum(sizes) == PSI == 104_256
    assert all(n % 4 == 0 for n in sizes)            # no padding on 4 ranks
    same = zero.lab_model()                          # fixed seed: identical on every rank
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))


def test_micro_batches():
    tokens, targets = zero.micro_batch(2, 1)
    assert tokens.shape == targets.shape == (zero.MICRO_BATCH, CFG.max_seq_len)
    assert torch.equal(tokens[:, 1:], targets[:, :-1])           # targets: the next token
    assert torch.equal(zero.micro_batch(2, 1)[0], tokens)        # deterministic
    assert not torch.equal(zero.micro_batch(2, 0)[0], tokens)    # ranks differ
    assert not torch.equal(zero.micro_batch(3, 1)[0], tokens)    # steps differ
    big_t, big_y = zero.global_batch(2, 3)
    assert torch.equal(big_t[4:8], tokens) and torch.equal(big_y[4:8], targets)
    with pytest.raises(ValueError):
        zero.micro_batch(-1, 0)


def test_reference_first_step_is_sign_descent_with_weight_decay():
    # After one AdamW step, m_hat = g and v_hat = g^2, so each parameter moves by
    # -lr * g / (|g| + eps) after the decoupled decay p * (1 - lr * wd).
    hp = dict(zero.HP)
    model = zero.lab_model()
    tokens, targets = zero.global_batch(0, 2)
    logits = model(tokens)
    F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)).backward()
    ref = zero.reference_run(1, 2)
    for u, got, grad in zip(zero.units(model), ref["units"], ref["grads"]):
        p0 = torch.cat([p.detach().reshape(-1) for p in u.parameters()])
        g = torch.cat([p.grad.reshape(-1) for p in u.parameters()])
        want = p0 * (1 - hp["lr"] * hp["weight_decay"]) - hp["lr"] * g / (g.abs() + hp["eps"])
        torch.testing.assert_close(grad, g, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


# (The counter itself, utils.collectives.CommCounter, is tested in test_collectives.py.)


# -- the harness ---------------------------------------------------------------------------
class PlainDP:
    """Data parallelism by hand: all-reduce each gradient, average, torch AdamW."""

    def __init__(self, model, rank, world_size, **hp):
        self.model, self.world_size = model, world_size
        self.opt = torch.optim.AdamW(model.parameters(), foreach=False, **hp)

    def step(self, tokens, targets):
        self.opt.zero_grad(set_to_none=False)
        loss = zero.loss_fn(self.model, tokens, targets)
        loss.backward()
        for p in self.model.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(self.world_size)
        self.opt.step()
        return loss.item()

    def held(self):
        return {"optimizer": [t for s in self.opt.state.values() for k, t in s.items()
                              if k != "step"]}


def _with_pytorch(rank, world_size, steps):
    return [zero.train_worker(rank, world_size, functools.partial(zero.PyTorchEngine, variant=v),
                              steps)
            for v in ("ZeroRedundancyOptimizer", "FSDP FULL_SHARD")]


def test_train_worker_with_a_hand_written_engine():
    steps, world = 2, 2
    ref = zero.reference_run(steps, world)
    results = launch(zero.train_worker, world, PlainDP, steps)
    for r in results:
        for got, want in zip(r["full"], ref["units"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert r["held"] == {"params": 8 * PSI, "grads": 8 * PSI, "optimizer": 16 * PSI}
        assert r["peak_params"] == 8 * PSI and r["peak_grads"] == 8 * PSI
        assert [t["all_reduce"] for t in r["traffic"]] == [8 * PSI] * steps
        assert [t["volume"] for t in r["traffic"]] == [16 * PSI] * steps
        assert r["shards"] is None and r["grad_shards"] is None
    # the mean of the ranks' losses is the reference loss of the whole batch
    for s in range(steps):
        assert sum(r["losses"][s] for r in results) / world == pytest.approx(ref["losses"][s], rel=1e-12)


def test_pytorch_engines_match_the_reference_and_the_formulas():
    steps, world = 2, 2
    ref = zero.reference_run(steps, world)
    results = launch(_with_pytorch, world, steps, timeout=240)
    for ranks, sent, held in [
        (0, {"all_reduce": 8 * PSI, "broadcast": 8 * PSI}, None),                 # ZeroRedundancyOptimizer
        (1, {"reduce_scatter": 8 * PSI, "all_gather": 16 * PSI},                  # FULL_SHARD
         {"params": 4 * PSI, "grads": 4 * PSI, "optimizer": 8 * PSI}),
    ]:
        per_rank = [r[ranks] for r in results]
        for r in per_rank:
            for got, want in zip(r["full"], ref["units"]):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            for k in COLLECTIVE_KINDS:
                assert r["traffic"][-1][k] == sent.get(k, 0), (ranks, k)
            if held:
                assert r["held"] == held
        if ranks == 0:   # whole parameters per rank: uneven, but all of the state once
            assert sum(r["held"]["optimizer"] for r in per_rank) == 16 * PSI
            assert all(r["held"]["params"] == 8 * PSI for r in per_rank)
