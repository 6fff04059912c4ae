"""Instruments and the reference run for chapter 14 (ZeRO): what sharded data parallelism sends and holds.

The lab builds ZeRO stages 1, 2 and 3 by hand; this module holds what measures them and
what they are held to, so the lab notebook and its checkers share one copy:

* Traffic is counted with the course's one counter, :class:`utils.collectives.CommCounter`,
  which sees every collective called through ``torch.distributed`` (``dist.all_reduce``,
  ``dist.reduce_scatter_single``, ``dist.all_gather_single``, ``dist.broadcast`` and the
  older names), by the calling code, PyTorch's FSDP and ``ZeroRedundancyOptimizer`` alike.
  DDP's gradient all-reduce runs in C++ and is counted through a communication hook,
  :func:`counting_allreduce_hook`.
* :func:`storage_bytes` — the bytes a set of tensors actually occupies: each distinct
  storage once, so views of one flat buffer are not counted twice and a storage resized to
  zero counts zero.
* The lab's model, data and single-process reference: :func:`lab_model` (the course's tiny
  transformer from :mod:`utils.tiny`, 2 layers, d_model 64, random init), :func:`units` (the
  modules ZeRO-3 gathers one at a time), :func:`micro_batch`, :func:`global_batch`,
  :func:`loss_fn`, and :func:`reference_run` — ``torch.optim.AdamW`` on the whole model
  and the whole data-parallel batch in one process, the oracle every sharded run must match.
* :func:`train_worker` — the harness each rank runs: build the model, hand it to an engine
  (a learner's ZeRO class or a PyTorch wrapper), train, and report what came out, what was
  held and what was sent.

Counting conventions (ZeRO, Rajbhandari et al. 2020, Section 7, and
:func:`utils.memory.zero_comm_bytes_per_step`): a reduce-scatter of ``n`` bytes and an
all-gather producing ``n`` bytes each move ``n`` bytes per rank in the paper's units (the
large-``N_d`` limit of a ring, where a rank sends ``(N_d - 1)/N_d * n``); an all-reduce is a
reduce-scatter followed by an all-gather, ``2n``; a broadcast of ``n`` bytes, ``n``.
"""
from __future__ import annotations

import time
from types import MappingProxyType
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .collectives import CommCounter
from .tiny import TinyConfig, TinyTransformer
from .validate import check_callable, check_int, check_tensor

__all__ = ["counting_allreduce_hook", "storage_bytes",
           "LAB_CONFIG", "HP", "DTYPE", "MICRO_BATCH", "lab_model", "units", "micro_batch",
           "global_batch", "loss_fn", "flat_params", "reference_run", "train_worker",
           "PYTORCH_VARIANTS", "PyTorchEngine", "PUBLISHED"]

# ---------------------------------------------------------------------------------------
# Counting collectives: utils.collectives.CommCounter, plus a hook for DDP's C++ reducer
# ---------------------------------------------------------------------------------------
def counting_allreduce_hook(counter: CommCounter | None = None):
    """A DDP communication hook that records each gradient bucket and then all-reduces it
    (averaged), which is what DDP's default hook does.

    ``ddp_model.register_comm_hook(None, counting_allreduce_hook(counter))``: DDP's reducer
    calls the process group from C++, out of reach of :class:`CommCounter`'s wrappers.
    With ``counter=None`` the bucket goes to whichever counter's ``with`` block is running
    (none: not recorded).
    """
    if counter is not None and not isinstance(counter, CommCounter):
        raise TypeError(f"counter must be a CommCounter or None, got {type(counter).__name__}")

    def hook(state, bucket):
        buf = bucket.buffer()
        target = counter if counter is not None else CommCounter.innermost()
        if target is not None:
            target.record("all_reduce", buf.numel() * buf.element_size(), "DDP bucket")
        buf.div_(dist.get_world_size())
        fut = dist.distributed_c10d.all_reduce(buf, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    return hook


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes occupied by ``tensors``: each distinct storage once, ``None`` skipped.

    Views of one buffer share a storage and count once; a storage resized to zero (a
    freed ZeRO-3 parameter buffer) counts zero. DTensors count their local shard.
    """
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Iterable):
        raise TypeError(f"tensors must be an iterable of tensors, got {type(tensors).__name__}")
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"storage_bytes takes tensors, got {type(t).__name__}")
        local = getattr(t, "_local_tensor", None)
        if local is not None:        # a DTensor (FSDP2): what this rank holds is its shard
            t = local
        storage = t.untyped_storage()
        if storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# ---------------------------------------------------------------------------------------
# The lab's model, data and reference
# ---------------------------------------------------------------------------------------
# Every parameter tensor has a dimension divisible by 4, so each unit (and the whole model)
# splits over 4 ranks with no padding and the measured shards equal Psi / N exactly.
LAB_CONFIG = TinyConfig(vocab=44, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=192,
                        max_seq_len=16)
HP = MappingProxyType(dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1))
# float64: a sharded run adds the ranks' gradients in a different order than one process
# adding one big batch, and Adam magnifies that rounding in gradients that nearly cancel
# (to ~1e-5 after a few fp32 steps). In float64 the same difference is ~1e-13, so the
# lab's parity check can be tight. Bytes per element are then 8 (see the lab).
DTYPE = torch.float64
MICRO_BATCH = 4     # sequences per rank per step; the data-parallel batch is MICRO_BATCH * N


def lab_model(config: TinyConfig = LAB_CONFIG, dtype: torch.dtype = DTYPE) -> TinyTransformer:
    """The lab's model: the course's tiny transformer, initialised from a fixed seed (so
    every rank and the reference start from the same weights), in ``dtype``."""
    return TinyTransformer(config).to(dtype)


def units(model: TinyTransformer) -> list[nn.Module]:
    """The modules ZeRO-3 gathers one at a time, in forward order: the embedding, each
    block, the final norm, the LM head. Together they own every parameter, once."""
    if not all(hasattr(model, a) for a in ("embed", "blocks", "norm", "lm_head")):
        raise TypeError(f"model must be a TinyTransformer, got {type(model).__name__}")
    out = [model.embed, *model.blocks, model.norm, model.lm_head]
    owned = [id(p) for u in out for p in u.parameters()]
    if sorted(owned) != sorted(id(p) for p in model.parameters()):
        raise ValueError("the units do not cover the model's parameters exactly once")
    return out


def _check_batch_config(batch, config) -> None:
    check_int("batch", batch, low=1)
    if not isinstance(config, TinyConfig):
        raise TypeError(f"config must be a TinyConfig, got {type(config).__name__}")


def micro_batch(step: int, rank: int, batch: int = MICRO_BATCH,
                config: TinyConfig = LAB_CONFIG) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s micro-batch at ``step``: ``(tokens, targets)``, each ``[batch, T]``,
    random tokens from a generator seeded by (step, rank), targets the next token."""
    for name, v in (("step", step), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    _check_batch_config(batch, config)
    g = torch.Generator().manual_seed(10_000 * step + rank)
    seq = torch.randint(0, config.vocab, (batch, config.max_seq_len + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def global_batch(step: int, world_size: int, batch: int = MICRO_BATCH,
                 config: TinyConfig = LAB_CONFIG) -> tuple[torch.Tensor, torch.Tensor]:
    """The data-parallel batch at ``step``: the ranks' micro-batches concatenated in rank order."""
    check_int("step", step, low=0)
    check_int("world_size", world_size, low=1)
    _check_batch_config(batch, config)
    parts = [micro_batch(step, r, batch, config) for r in range(world_size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def loss_fn(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of the batch."""
    check_callable("model", model)
    check_tensor("tokens", tokens, ndim=2, floating=False)
    check_tensor("targets", targets, shape=tuple(tokens.shape), floating=False)
    logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def flat_params(module: nn.Module) -> torch.Tensor:
    """``module``'s parameters flattened and concatenated, in ``parameters()`` order."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def reference_run(steps: int, world_size: int, hp=HP, config: TinyConfig = LAB_CONFIG,
                  dtype: torch.dtype = DTYPE) -> dict:
    """Train the whole model in one process on the whole data-parallel batch with
    ``torch.optim.AdamW``: the result every sharded run must reproduce.

    Returns ``{"units": [flat parameters of each unit after the last step],
    "grads": [flat gradients of each unit at the last step], "losses": [loss per step]}``.
    """
    check_int("steps", steps, low=0)
    check_int("world_size", world_size, low=1)
    model = lab_model(config, dtype)
    opt = torch.optim.AdamW(model.parameters(), **hp)
    losses, grads = [], None
    for step in range(steps):
        tokens, targets = global_batch(step, world_size, config=config)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, tokens, targets)
        loss.backward()
        grads = [torch.cat([p.grad.reshape(-1) for p in u.parameters()]) for u in units(model)]
        opt.step()
        losses.append(loss.item())
    return {"units": [flat_params(u) for u in units(model)], "grads": grads, "losses": losses}


# ---------------------------------------------------------------------------------------
# The harness each rank runs
# ---------------------------------------------------------------------------------------
def _device() -> torch.device:
    """The device of this rank: its GPU under NCCL (launch(..., backend="nccl") or torchrun
    with CUDA), else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _grad(p):
    """``p.grad``, quietly None for a non-leaf (FSDP1 can leave views in place of parameters)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
        return p.grad


def _as_list(x, what):
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return list(x)
    raise TypeError(f"{what} must be a tensor or a list of tensors, got {type(x).__name__}")


def train_worker(rank: int, world_size: int, engine_factory: Callable, steps: int,
                 hp=HP, config: TinyConfig = LAB_CONFIG, dtype: torch.dtype = DTYPE) -> dict:
    """One rank of a data-parallel run: ``engine = engine_factory(model, rank, world_size,
    **hp)``, then ``engine.step(tokens, targets)`` for ``steps`` micro-batches, each inside
    a :class:`utils.collectives.CommCounter`.

    An engine may also define ``held()`` -> ``{"params": [...], "grads": [...],
    "optimizer": [...]}``, the tensors it keeps between steps, and ``shards()`` /
    ``grad_shards()`` -> this rank's slice of each unit's flat parameters / averaged
    gradients. Returned, per rank: ``losses``; ``traffic`` (per step, a dict of bytes by
    kind, and ``volume``); ``held`` (bytes between steps: parameters and gradients are the
    distinct storages of the model's parameters and ``.grad`` plus those the engine names;
    optimizer, those it names); ``peak_params`` (parameter bytes held at the most loaded
    moment of the forward pass, looked at as each unit starts); ``full`` (each unit's flat
    parameters when this rank holds them all, else None); ``peak_grads`` (gradient bytes
    held at the most loaded moment of the backward pass, looked at as each parameter's
    gradient lands); ``shards``, ``grad_shards``; ``seconds`` (wall time of the steps).
    An engine that shards the parameters away may define ``full_params()``, a collective
    called once after training that returns each unit's full flat parameters.
    """
    world_size = check_int("world_size", world_size, low=1)
    check_int("rank", rank, low=0, high=world_size - 1)
    check_callable("engine_factory", engine_factory)
    check_int("steps", steps, low=0)
    device = _device()
    model = lab_model(config, dtype).to(device)
    engine = engine_factory(model, rank, world_size, **hp)
    peak = {"params": 0, "grads": 0}

    def declared_now():
        if not hasattr(engine, "held"):
            return {"params": [], "grads": [], "optimizer": []}
        d = engine.held()
        if not isinstance(d, dict):
            raise TypeError(f"held() must return a dict, got {type(d).__name__}")
        return {k: _as_list(d.get(k), f"held()[{k!r}]") for k in ("params", "grads", "optimizer")}

    def look_params(module, args):
        now = storage_bytes(list(model.parameters()) + declared_now()["params"])
        peak["params"] = max(peak["params"], now)

    def look_grads(param):
        now = storage_bytes([_grad(p) for p in model.parameters()] + declared_now()["grads"])
        peak["grads"] = max(peak["grads"], now)

    # Registered after the engine's own hooks, so they see the state the engine leaves.
    handles = []
    if getattr(engine, "watch", True):
        handles += [u.register_forward_pre_hook(look_params) for u in units(model)]
        handles += [p.register_post_accumulate_grad_hook(look_grads) for p in model.parameters()]
    losses, traffic = [], []
    start = time.perf_counter()
    for step in range(steps):
        tokens, targets = (t.to(device) for t in micro_batch(step, rank, config=config))
        with CommCounter() as counter:
            loss = engine.step(tokens, targets)
        losses.append(float(loss))
        traffic.append({**counter.by_kind(), "volume": counter.volume(),
                        "calls": len(counter.calls)})
    seconds = time.perf_counter() - start
    for h in handles:
        h.remove()
    declared = declared_now()
    params = list(model.parameters())
    held = {"params": storage_bytes(params + declared["params"]),
            "grads": storage_bytes([_grad(p) for p in params] + declared["grads"]),
            "optimizer": storage_bytes(declared["optimizer"])}
    full = None
    if hasattr(engine, "full_params"):      # a wrapper that shards: it gathers them itself
        full = [t.detach().clone() for t in engine.full_params()]
    elif all(p.untyped_storage().nbytes() >= p.numel() * p.element_size() for p in params):
        full = [flat_params(u).clone() for u in units(model)]
    out = {"losses": losses, "traffic": traffic, "held": held, "peak_params": peak["params"],
           "peak_grads": peak["grads"], "full": full, "seconds": seconds}
    for name in ("shards", "grad_shards"):
        fn = getattr(engine, name, None)
        out[name] = [t.detach().clone() for t in _as_list(fn(), f"{name}()")] if fn else None
    return out


# ---------------------------------------------------------------------------------------
# Published figures the lab prints next to its measurements
# ---------------------------------------------------------------------------------------
PUBLISHED = MappingProxyType({
    # Communication per step in units of Psi (one rank, large N_d): plain data parallelism
    # 2 Psi (Section 7.1); P_os+g 2 Psi, "the same as" data parallelism (Section 7.2.1);
    # P_os+g+p 3 Psi, 1.5x (Section 7.2.2).
    "zero_volume_psi": MappingProxyType({0: 2, 1: 2, 2: 2, 3: 3}),
    "zero_volume_source": "Rajbhandari et al. 2020 (ZeRO), Sections 7.1, 7.2.1 and 7.2.2",
    # DeepSpeed's first ZeRO stage 1 all-reduced the gradients: 1.5x the volume of data
    # parallelism; a partition-aware reduce brought it to 1x.
    "deepspeed_stage1_allreduce_ratio": 1.5,
    "deepspeed_stage1_partitioned_ratio": 1.0,
    "deepspeed_stage1_source": ("DeepSpeed blog, 'ZeRO stage 1 with reduced communication', "
                                "17 March 2020, https://www.deepspeed.ai/2020/03/17/reduce-scatter.html"),
})


# ---------------------------------------------------------------------------------------
# PyTorch's own sharded data parallelism, as engines for train_worker: the oracle
# ---------------------------------------------------------------------------------------
PYTORCH_VARIANTS = MappingProxyType({
    # name: (what it is, the ZeRO stage it corresponds to)
    "DDP": ("DistributedDataParallel + torch.optim.AdamW", 0),
    "ZeroRedundancyOptimizer": ("DDP + torch.distributed.optim.ZeroRedundancyOptimizer(AdamW)", 1),
    "FSDP NO_SHARD": ("FullyShardedDataParallel, ShardingStrategy.NO_SHARD", 0),
    "FSDP SHARD_GRAD_OP": ("FullyShardedDataParallel, ShardingStrategy.SHARD_GRAD_OP", 2),
    "FSDP FULL_SHARD": ("FullyShardedDataParallel, ShardingStrategy.FULL_SHARD", 3),
    "fully_shard(reshard_after_forward=False)": ("FSDP2 fully_shard per unit, keep after forward", 2),
    "fully_shard(reshard_after_forward=True)": ("FSDP2 fully_shard per unit, reshard after forward", 3),
})


class PyTorchEngine:
    """One of :data:`PYTORCH_VARIANTS` wrapped around the lab's model, as an engine for
    :func:`train_worker`. Every variant wraps the same units (:func:`units`) one FSDP unit
    each, with the root wrapping nothing of its own, so the counts compare with the lab's.
    """

    watch = False   # train_worker's peak probes would look at FSDP's internals; skip them

    def __init__(self, model, rank, world_size, variant="DDP", **hp):
        import warnings

        if variant not in PYTORCH_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {list(PYTORCH_VARIANTS)}")
        self.variant, self.model = variant, model
        self.unit_modules = units(model)
        if variant in ("DDP", "ZeroRedundancyOptimizer"):
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [model.embed.weight.device] if model.embed.weight.is_cuda else None
            self.wrapped = DDP(model, device_ids=ids, gradient_as_bucket_view=True)
            self.wrapped.register_comm_hook(None, counting_allreduce_hook())
            if variant == "DDP":
                self.opt = torch.optim.AdamW(model.parameters(), **hp)
            else:
                with warnings.catch_warnings():   # its functional optimizers use torch.jit
                    warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated")
                    from torch.distributed.optim import ZeroRedundancyOptimizer

                self.opt = ZeroRedundancyOptimizer(model.parameters(),
                                                   optimizer_class=torch.optim.AdamW, **hp)
        elif variant.startswith("FSDP "):
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

            strategy = getattr(ShardingStrategy, variant.split()[1])
            with warnings.catch_warnings():   # NO_SHARD is deprecated in favour of DDP
                warnings.filterwarnings("ignore", message=".*NO_SHARD.*deprecated")
                kw = dict(sharding_strategy=strategy, device_id=model.embed.weight.device,
                          use_orig_params=True)
                model.embed = FSDP(model.embed, **kw)
                for i in range(len(model.blocks)):
                    model.blocks[i] = FSDP(model.blocks[i], **kw)
                model.norm = FSDP(model.norm, **kw)
                model.lm_head = FSDP(model.lm_head, **kw)
                self.wrapped = FSDP(model, **kw)
            self.unit_modules = units(model)
            self.opt = torch.optim.AdamW(self.wrapped.parameters(), **hp)
        else:
            from torch.distributed.fsdp import fully_shard

            keep = variant.endswith("False)")
            for u in self.unit_modules:
                fully_shard(u, reshard_after_forward=not keep)
            self.wrapped = fully_shard(model, reshard_after_forward=not keep)
            self.opt = torch.optim.AdamW(model.parameters(), **hp)

    def step(self, tokens, targets):
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn(self.wrapped, tokens, targets)
        loss.backward()
        self.opt.step()
        return loss.item()

    def held(self):
        if self.variant.startswith("FSDP "):   # FSDP1 keeps each unit as one FlatParameter
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            params = [m._handle.flat_param for m in FSDP.fsdp_modules(self.wrapped)
                      if m._handle is not None]
        else:
            params = list(self.model.parameters())
        state = self.opt.optim.state if self.variant == "ZeroRedundancyOptimizer" else self.opt.state
        return {"params": params, "grads": [_grad(p) for p in params],
                "optimizer": [t for s in state.values() for k, t in s.items()
                              if k != "step" and isinstance(t, torch.Tensor)]}

    def full_params(self):
        if self.variant.startswith("FSDP "):
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.summon_full_params(self.wrapped):
                return [flat_params(u).clone() for u in self.unit_modules]
        if self.variant.startswith("fully_shard"):
            return [torch.cat([p.full_tensor().detach().reshape(-1) for p in u.parameters()])
                    for u in self.unit_modules]
        return [flat_params(u).clone() for u in self.unit_modules]
