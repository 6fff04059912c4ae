"""Checkers for lab 14, ZeRO stages 1, 2 and 3 built by hand.

The oracles: ``torch.optim.AdamW`` for the update rule (element by element, and on the
whole model in one process for training, :func:`utils.zero.reference_run`); the padded,
equal chunks that ``reduce_scatter``/``all_gather`` work on for the shard layout;
:func:`utils.memory.zero_bytes_per_device` and :func:`utils.memory.zero_comm_bytes_per_step`
(ZeRO, Sections 5 and 7) for the bytes each rank holds and sends, with the lab's one
precision (float64: 8-byte parameters and gradients, 16 bytes of Adam moments, K = 16).

A stage is checked by training the lab's model for :data:`STEPS` AdamW steps on
:data:`WORLD` processes (gloo) with :func:`utils.zero.train_worker`, which measures what
each rank holds (distinct storages) and sends (every ``dist.*`` collective), after a
one-process run of the same class that catches errors with the learner's own traceback.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import memory, zero
from ..dist import RankError, launch
from . import exercise, expect_close, expect_equal, expect_type, fail

WORLD = 4           # ranks in every check
STEPS = 3           # AdamW steps per check: the second and third see all-gathered parameters
RTOL, ATOL = 1e-9, 1e-11   # float64: a correct sharded run agrees to ~1e-14
_REFERENCE: dict = {}


def _ints(got, n, what, hint):
    expect_type(got, (tuple, list), what, hint=hint)
    if len(got) != n:
        fail(what, f"a tuple of {n} ints", f"{len(got)} items: {got!r}", hint)
    for x in got:
        if isinstance(x, bool) or not isinstance(x, int):
            fail(what, f"a tuple of {n} Python ints", f"{got!r}", "return plain ints, e.g. int(...)")
    return tuple(got)


# ----------------------------------------------------------------------------- exercise 1
@exercise
def shard_range(fn):
    """``fn(numel, world_size, rank)`` -> ``(start, stop)`` of rank's equal chunk of the flat
    buffer padded to a multiple of world_size."""
    cases = [(8, 4), (10, 4), (1, 4), (3, 8), (7, 1), (104_256, 4), (49_280, 8), (4_097, 64)]
    for numel, world in cases:
        padded = math.ceil(numel / world) * world
        chunks = torch.arange(padded).chunk(world)     # what reduce_scatter/all_gather split
        for rank in range(world):
            what = f"shard_range({numel}, {world}, {rank})"
            got = _ints(fn(numel, world, rank), 2, what, "return (start, stop)")
            want = (int(chunks[rank][0]), int(chunks[rank][-1]) + 1)
            expect_equal(got, want, what=what,
                         hint="every rank gets the same size, ceil(numel / world_size); the "
                              "last chunk runs into the zero padding instead of being shorter")
    for bad in ((10, 4, 4), (10, 4, -1)):
        try:
            fn(*bad)
        except ValueError:
            continue
        fail(f"shard_range{bad}", "ValueError: a rank outside [0, world_size)", "no error",
             "check 0 <= rank < world_size and raise ValueError with what was wrong")
    return "equal padded chunks for 8 layouts, ValueError for a rank out of range"


# ----------------------------------------------------------------------------- exercise 2
def _adamw_case(fn, n, dtype, hp, steps, seed, as_view):
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n, generator=g, dtype=dtype)
    grads = [torch.randn(n, generator=g, dtype=dtype) * 10.0 ** -k for k in range(steps)]
    grads[0][: n // 4] = 0.0                                # some gradients exactly zero
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], foreach=False, **hp)
    big = torch.randn(3 * n, generator=g, dtype=dtype)
    before = big.clone()
    if as_view:                                             # the shard is a slice of a buffer
        big[n:2 * n] = p0
        param = big[n:2 * n]
    else:
        param = p0.clone()
    m, v = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)
    tol = dict(rtol=1e-10, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-7)
    for t, grad in enumerate(grads, 1):
        ref.grad = grad.clone()
        opt.step()
        fn(param, grad.clone(), m, v, t, **hp)
        what = (f"adamw_step at step {t} ({n} {str(dtype).replace('torch.', '')} elements, "
                f"weight_decay={hp['weight_decay']}{', param a slice of a bigger buffer' if as_view else ''})")
        state = opt.state[ref]
        expect_close(m, state["exp_avg"], **tol, what=f"{what}: exp_avg",
                     hint="m = beta1 * m + (1 - beta1) * g, in place (m.mul_(...).add_(...) "
                          "or m.lerp_(g, 1 - beta1))")
        expect_close(v, state["exp_avg_sq"], **tol, what=f"{what}: exp_avg_sq",
                     hint="v = beta2 * v + (1 - beta2) * g * g, in place")
        expect_close(param, ref.detach(), **tol, what=f"{what}: the parameter",
                     hint="decoupled weight decay first: p *= 1 - lr * weight_decay; then "
                          "p -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps); "
                          "update param in place (param.mul_, param.addcdiv_)")
    if as_view:
        outside = torch.cat([big[:n], big[2 * n:]])
        expect_equal(outside, torch.cat([before[:n], before[2 * n:]]),
                     what="the buffer around the slice you were given",
                     hint="update only the elements of `param`, in place")


@exercise
def adamw_step(fn):
    """``fn(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)``: one
    in-place AdamW update, as ``torch.optim.AdamW`` does it."""
    hp = dict(zero.HP)
    _adamw_case(fn, 64, torch.float64, hp, steps=4, seed=0, as_view=False)
    _adamw_case(fn, 64, torch.float64, dict(hp, weight_decay=0.0, betas=(0.8, 0.99)), steps=3,
                seed=1, as_view=False)
    _adamw_case(fn, 40, torch.float64, dict(hp, lr=0.1, eps=1e-6), steps=5, seed=2, as_view=True)
    _adamw_case(fn, 32, torch.float32, hp, steps=3, seed=3, as_view=True)
    return "matches torch.optim.AdamW (moments and parameters) over 15 steps, in place on slices"


# ----------------------------------------------------------------------------- exercises 3-5
def _reference():
    if not _REFERENCE:
        _REFERENCE.update(zero.reference_run(STEPS, WORLD))
    return _REFERENCE


def _one_process(cls):
    """Run the class for one step as a world of one, in this process, so that a stub or an
    error shows the learner's own traceback. Skipped if a process group already exists."""
    if dist.is_initialized():
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        zero.train_worker(0, 1, cls, 1)
    finally:
        dist.destroy_process_group()


def _tail(text, lines=14):
    rows = [r for r in text.strip().splitlines() if r.strip()]
    return "\n".join(rows[-lines:])


def _train(cls, stage):
    for method in ("step", "held", "shards", "grad_shards"):
        if not callable(getattr(cls, method, None)):
            fail(f"ZeRO-{stage}: the class has no method {method}()",
                 f"a class with __init__(model, rank, world_size, **hp), step(tokens, targets), "
                 f"held(), shards() and grad_shards()", f"{cls!r}",
                 "keep the methods the lab gives you; write the parts marked for you")
    _one_process(cls)
    try:
        return launch(zero.train_worker, WORLD, cls, STEPS, timeout=180)
    except RankError as err:
        rank = err.cause
        fail(f"ZeRO-{stage}: training on {WORLD} ranks raised on rank(s) {err.ranks}",
             f"{STEPS} steps on each of {WORLD} ranks without an error",
             f"rank {rank}:\n{_tail(err.tracebacks[rank])}",
             "every rank must call the same collectives, in the same order, with tensors of "
             "the same size; the one-process run passed, so look at what depends on the rank")


def _unit_sizes():
    model = zero.lab_model()
    return [sum(p.numel() for p in u.parameters()) for u in zero.units(model)]


def _check_training(results, stage):
    ref = _reference()
    sizes = _unit_sizes()
    got = torch.cat([torch.cat([r["grad_shards"][i].reshape(-1) for r in results])[:n]
                     for i, n in enumerate(sizes)])
    want = torch.cat(list(ref["grads"]))
    ratio = (got.norm() / want.norm()).item()
    if abs(ratio - WORLD) < 0.01 * WORLD:          # Adam hides it in the parameters: say it
        fail(f"ZeRO-{stage}: the averaged gradient (grad_shards()) at the last step",
             "the average of the ranks' gradients", f"{ratio:.2f} times the average",
             "you summed the gradients: divide what the collective returns by world_size")
    for i, (n, want) in enumerate(zip(sizes, ref["units"])):
        got = torch.cat([r["shards"][i].reshape(-1) for r in results])
        if got.numel() < n:
            fail(f"ZeRO-{stage}: shards() of unit {i}", f"{WORLD} shards covering {n} elements",
                 f"{got.numel()} elements in all", "each rank's shard is its padded chunk")
        expect_close(got[:n], want, rtol=RTOL, atol=ATOL,
                     what=f"ZeRO-{stage}: unit {i}'s parameters after {STEPS} steps (the ranks' "
                          f"shards, concatenated)",
                     hint="they must equal torch.optim.AdamW on the whole batch in one process: "
                          "average (not sum) the gradients, update only your own shard with the "
                          "same step count on every rank, and gather the updated shards")
    for i, (n, want) in enumerate(zip(sizes, ref["grads"])):
        got = torch.cat([r["grad_shards"][i].reshape(-1) for r in results])[:n]
        hint = ("each rank's shard of the gradient must be the average of all ranks' "
                "gradients for its slice")
        expect_close(got, want, rtol=RTOL, atol=ATOL,
                     what=f"ZeRO-{stage}: unit {i}'s averaged gradient at the last step "
                          f"(grad_shards(), concatenated)", hint=hint)


def _check_bytes(results, stage, psi, elem):
    want = memory.zero_bytes_per_device(psi, stage, WORLD, optimizer_bytes_per_param=2 * elem,
                                        param_bytes=elem, grad_bytes=elem)
    hints = {"params": "stages 1 and 2 keep every parameter on every rank; stage 3 keeps only "
                       "this rank's shard between steps (free the gathered buffer)",
             "grads": "stage 1 keeps the full gradient buffer; stages 2 and 3 keep only the "
                      "averaged shard and drop every p.grad once it has been reduce-scattered",
             "optimizer": "exp_avg and exp_avg_sq for this rank's shard only: 2 x Psi / N "
                          "elements"}
    for r, res in enumerate(results):
        for part in ("params", "grads", "optimizer"):
            expect_equal(res["held"][part], getattr(want, part),
                         what=f"ZeRO-{stage}: {part} bytes held by rank {r} between steps",
                         hint=hints[part] + f" (the formula: utils.memory.zero_bytes_per_device"
                                            f"(Psi={psi}, stage={stage}, dp={WORLD}, K={2 * elem}, "
                                            f"{elem}-byte params and grads))")
    return want


def _check_traffic(results, stage, psi, elem):
    full = psi * elem
    want = {"all_reduce": 0, "reduce_scatter": 0, "all_gather": 0, "broadcast": 0}
    if stage == 1:
        # As the lab asks: all-reduce the gradients (3 Psi in all). A reduce-scatter instead,
        # the fix question 1 is about, is accepted too (2 Psi).
        rs = results[0]["traffic"][0]["reduce_scatter"] > 0
        want.update(reduce_scatter=full, all_gather=full) if rs else \
            want.update(all_reduce=full, all_gather=full)
        hint = ("stage 1 here: one all-reduce of every gradient (dist.all_reduce) and one "
                "all-gather of every parameter (dist.all_gather_single), once each per step")
    elif stage == 2:
        want.update(reduce_scatter=full, all_gather=full)
        hint = ("one reduce-scatter of every gradient (dist.reduce_scatter_single) and one "
                "all-gather of every updated parameter (dist.all_gather_single) per step")
    else:
        want.update(reduce_scatter=full, all_gather=2 * full)
        hint = ("each unit's parameters all-gathered twice (before its forward and before its "
                "backward) and its gradient reduce-scattered once, per step")
    for r, res in enumerate(results):
        for s, traffic in enumerate(res["traffic"]):
            got = {k: traffic[k] for k in want}
            expect_equal(got, want, what=f"ZeRO-{stage}: bytes of collectives on rank {r} at step {s}",
                         hint=hint + "; call collectives as dist.<name>(...) so they are counted")
    comm = memory.zero_comm_bytes_per_step(psi, stage, WORLD, elem)
    volume = results[0]["traffic"][-1]["volume"]
    if stage == 1 and want["all_reduce"]:   # plain data parallelism's 2 Psi, then Psi more
        expect_equal(volume, memory.zero_comm_bytes_per_step(psi, 0, WORLD, elem).total + full,
                     what="ZeRO-1 volume per step", hint=hint)
    else:
        expect_equal(volume, comm.total, what=f"ZeRO-{stage} volume per step "
                                              f"(utils.memory.zero_comm_bytes_per_step)", hint=hint)
    return volume


def _stage(cls, stage):
    results = _train(cls, stage)
    _check_training(results, stage)
    sizes = _unit_sizes()
    psi, elem = sum(sizes), torch.finfo(zero.DTYPE).bits // 8
    held = _check_bytes(results, stage, psi, elem)
    full = [r["full"] for r in results]
    shard_bytes = sum(math.ceil(n / WORLD) for n in sizes) * elem
    largest = max(sizes) * elem
    if stage in (1, 2):
        for r, f in enumerate(full):
            if f is None:
                fail(f"ZeRO-{stage}: rank {r}'s model parameters", "every parameter of the model "
                     "materialised on every rank after the step", "some parameter storages are "
                     "empty", "stages 1 and 2 shard only optimizer state (and gradients)")
            expect_close(f, _reference()["units"], rtol=RTOL, atol=ATOL,
                         what=f"ZeRO-{stage}: rank {r}'s full copy of the parameters",
                         hint="after updating your shard, all-gather every rank's shard into "
                              "the full flat buffer, so every replica is identical")
    if stage == 2:
        peak = results[0]["peak_grads"]
        if peak >= psi * elem:
            fail("ZeRO-2: gradient bytes held during backward",
                 f"less than a full gradient ({psi * elem:,} B): at most your shards plus one "
                 f"unit's gradients ({shard_bytes + largest:,} B)", f"{peak:,} B",
                 "reduce-scatter each unit as soon as its last gradient lands "
                 "(p.register_post_accumulate_grad_hook) and set its p.grad to None, instead "
                 "of waiting for the whole backward pass")
    if stage == 3:
        if any(f is not None for f in full):
            fail("ZeRO-3: parameters held between steps", "only this rank's shard: the gathered "
                 "buffers freed (storage resized to 0)", "every parameter still materialised",
                 "call unit.free() after each unit's forward and after its backward")
        peak = results[0]["peak_params"]
        if peak > shard_bytes + largest:
            fail("ZeRO-3: parameter bytes held during the forward pass",
                 f"at most your shards plus one unit ({shard_bytes + largest:,} B)", f"{peak:,} B",
                 "gather a unit just before its forward (register_forward_pre_hook) and free "
                 "it right after (register_forward_hook), one unit at a time")
    volume = _check_traffic(results, stage, psi, elem)
    return (f"{STEPS} AdamW steps on {WORLD} ranks match single-process AdamW; each rank holds "
            f"{held.total:,} B (params {held.params:,}, grads {held.grads:,}, optimizer "
            f"{held.optimizer:,}) and sends {volume:,} B a step = {volume / (psi * elem):g} Psi")


@exercise
def zero1(cls):
    """ZeRO-1: optimizer state sharded; all-reduce, own-shard AdamW, all-gather."""
    return _stage(cls, 1)


@exercise
def zero2(cls):
    """ZeRO-2: also gradients sharded, reduce-scattered unit by unit during backward."""
    return _stage(cls, 2)


@exercise
def zero3(cls):
    """ZeRO-3: also parameters sharded, gathered one unit at a time."""
    return _stage(cls, 3)
