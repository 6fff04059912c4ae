"""A bad-input sweep over the public API of the course library.

For every public function of the library modules listed in ``MODULES`` there is an
entry in ``SWEEP``: a factory of valid arguments (each call gets fresh objects). The
sweep checks that the valid call answers, then replaces one argument at a time with a bad
value chosen by the kind of the good one:

* numbers: NaN, +inf, -1, 0, a string;
* names (strings): an unknown name, an int;
* tensors: a plain list, one extra leading dimension, the other kind of dtype;
* sequences of numbers: NaN or -1 as an element, an int instead of the sequence;
* registry specs, callables and other objects: an int.

Every such call must raise ``ValueError`` or ``TypeError`` whose message names the
argument (case-insensitive, as a word), within a time limit: a silent answer, a hang, or
an error that does not say which argument was wrong fails the test. Mutations that are
legitimately valid for an argument (``cached=0``, ``max_delay=inf``...) are listed in the
entry's ``allow``; arguments the sweep cannot mutate meaningfully are in ``skip`` with
the reason. ``test_every_public_function_is_covered`` fails when a module gains a public
function without a sweep entry. A few targeted cases from issue 12 are in ``SPECIFIC``.
"""
from __future__ import annotations

import importlib
import inspect
import math
import re
import signal
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch

from utils import hardware, models, roofline, serving, tiny
from utils import paged_kv as pk
from utils import speculative as sp

pytestmark = pytest.mark.usefixtures("one_thread")

#: Library modules swept. Not swept, and why:
#:   validate  -- the validators themselves (tests/test_validate.py);
#:   dist      -- launches processes (tests/test_dist.py; owned by the launcher work);
#:   grade, labgen, nbrun, checks -- the course framework, tested by their own suites.
MODULES = ("hardware", "models", "roofline", "bench", "memory", "collectives", "parallelism",
           "zero", "recompute", "inference_cost", "paged_kv", "serving", "speculative",
           "tiny", "tiny_corpus", "plots",
           # the chapter modules of Parts I, II, III and IV (01, 02, 05, 06, 15, 20, 22);
           # economics and scheduler (23, 24) have their own sweep, test_bad_inputs_economics.py
           "tiling", "memtech", "allocator", "topology", "reliability", "quant", "edge",
           # chapters 04, 07, 08 and 21 (chapter 10's storage is swept with these rules in
           # tests/test_storage.py, whose entries need shard files made in a temporary folder)
           "hostmem", "dgx", "netsim", "compilation")

#: Mutations valid for every argument of this name: any integer seeds a generator.
ALLOW_BY_NAME = {"seed": {"zero", "neg"}}

TIME_LIMIT = 3.0      # seconds per call: a bad argument must not make a function spin


# ----------------------------------------------------------------------------------------
# Shared valid objects (small, deterministic)
# ----------------------------------------------------------------------------------------
CFG = tiny.TinyConfig(vocab=44, n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                      max_seq_len=32)


def _tiny_model():
    torch.manual_seed(0)
    return tiny.TinyTransformer(CFG).eval()


_MODEL = None


def model():
    global _MODEL
    if _MODEL is None:
        _MODEL = _tiny_model()
    return _MODEL


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _pq():
    return (torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3]))


def _paged():
    g = _g(3)
    kp = torch.randn(6, 2, 2, 3, generator=g)
    vp = torch.randn(6, 2, 2, 3, generator=g)
    q = torch.randn(2, 4, 3, generator=g)
    return dict(q=q, k_pool=kp, v_pool=vp, block_tables=torch.tensor([[4, 1, 0], [2, 5, 5]]),
                lengths=torch.tensor([5, 3]))


UNIT = serving.CostModel(decode_base=1.0, decode_per_seq=0.0, prefill_base=1.0,
                         prefill_per_token=0.0)


def _reqs():
    return serving.make_trace(3, 10.0, seed=1, median_out=3, max_out=4)


def _completions():
    return serving.simulate_colocated(_reqs(), UNIT, 1, 2)


def _orders():
    from utils import parallelism
    return parallelism.pipeline_orders("1f1b", 2, 4)


def _schedule():
    from utils import parallelism
    return parallelism.schedule("1f1b", 2, 4)


def _markov():
    return sp.MarkovLM.random_pair(vocab=4, seed=1)


# ----------------------------------------------------------------------------------------
# Sweep entries
# ----------------------------------------------------------------------------------------
@dataclass
class E:
    base: Callable[[], dict]                # fresh valid keyword arguments
    allow: dict = field(default_factory=dict)   # arg -> mutation kinds that are valid input
    skip: dict = field(default_factory=dict)    # arg -> reason it is not mutated
    varargs: tuple = ()                     # names passed positionally (before *args)
    run_base: bool = True                   # False for measurements (slow on a busy box)
    make: Callable | None = None            # for "module.Class.method": a fresh object


def kw(**k):
    return lambda: dict(k)


SWEEP: dict[str, E] = {
    # -- hardware, models ---------------------------------------------------------------
    "hardware.names": E(kw()),
    "hardware.get": E(kw(name="H100")),
    "hardware.link": E(kw(name="NVLink 4")),
    "hardware.system": E(kw(name="DGX-H100")),
    "hardware.systems": E(kw()),
    "hardware.ridge_point": E(kw(spec="H100", dtype="bf16")),
    "hardware.attainable_flops": E(kw(intensity=10.0, peak_flops=1e15, bandwidth=1e12),
                                   allow={"intensity": {"zero"}}),
    "models.names": E(kw()),
    "models.get": E(kw(name="llama2-7b")),
    # -- roofline ------------------------------------------------------------------------
    "roofline.add": E(kw(n=1000, bytes_per_element=4)),
    "roofline.reduce_sum": E(kw(n=1000, bytes_per_element=4)),
    "roofline.softmax": E(kw(rows=8, cols=16, bytes_per_element=4)),
    "roofline.layer_norm": E(kw(rows=8, cols=16, bytes_per_element=4)),
    "roofline.gemv": E(kw(m=8, n=16, bytes_per_element=4)),
    "roofline.gemm": E(kw(m=8, n=16, k=32, bytes_per_element=4)),
    "roofline.attention_decode": E(kw(model="llama2-7b", context=128, batch=2,
                                      bytes_per_element=2)),
    "roofline.attainable": E(kw(intensity=10.0, peak_flops=1e15, bandwidth=1e12),
                             allow={"intensity": {"zero"}}),
    "roofline.bound": E(kw(intensity=10.0, peak_flops=1e15, bandwidth=1e12),
                        allow={"intensity": {"zero"}}),
    # -- bench (measurements: bad arguments must be refused before anything runs) --------
    "bench.quick": E(kw()),
    "bench.torch_dtype": E(kw(dtype="fp32")),
    "bench.time_fn": E(kw(fn=lambda: None, min_run_time=0.001)),
    "bench.matmul_flops": E(kw(n=16, dtype="fp32"), run_base=False),
    "bench.peak_flops": E(kw(dtype="fp32"), run_base=False),
    "bench.stream_bandwidth": E(kw(kind="triad", n_bytes=1 << 16), run_base=False),
    "bench.peak_bandwidth": E(kw(), run_base=False),
    "bench.cache_sweep": E(kw(sizes=[1 << 14, 1 << 15]), run_base=False),
    "bench.machine_name": E(kw()),
    "bench.clear_cache": E(kw()),
    # -- memory ----------------------------------------------------------------------------
    "memory.tensor_shapes": E(kw(model="llama2-7b")),
    "memory.param_count": E(kw(model_or_params="llama2-7b"),
                                  allow={"model_or_params": {"type"}}),
    "memory.weights_bytes": E(kw(model_or_params="llama2-7b", bytes_per_param=2),
                                  allow={"model_or_params": {"type"}}),
    "memory.gradient_bytes": E(kw(model_or_params="llama2-7b", bytes_per_grad=2),
                                  allow={"model_or_params": {"type"}}),
    "memory.optimizer_bytes": E(kw(model_or_params="llama2-7b", optimizer="adamw"),
                                  allow={"model_or_params": {"type"}}),
    "memory.optimizer_bytes_per_param": E(kw(optimizer="adamw")),
    "memory.zero_bytes_per_device": E(kw(params=7_000_000_000, stage=1, dp=8,
                                         optimizer_bytes_per_param=12),
                                      allow={"stage": {"zero"}}),
    "memory.zero_comm_bytes_per_step": E(kw(params=7_000_000_000, stage=1, dp=8),
                                         allow={"stage": {"zero"}}),
    "memory.activation_breakdown_per_layer": E(kw(seq_len=2048, batch=1, hidden=4096, heads=32)),
    "memory.activation_bytes_per_layer": E(kw(seq_len=2048, batch=1, hidden=4096, heads=32)),
    "memory.logits_bytes": E(kw(seq_len=2048, batch=1, vocab=32000)),
    "memory.kv_cache_bytes_per_token": E(kw(model="llama2-7b")),
    "memory.kv_cache_bytes": E(kw(model="llama2-7b", seq_len=2048, batch=1)),
    "memory.training_bytes_per_device": E(kw(model="llama2-7b", seq_len=2048, micro_batch=1,
                                             tp=2)),
    "memory.inference_bytes": E(kw(model="llama2-7b", seq_len=2048, batch=1),
                                allow={"seq_len": {"zero"}}),
    "memory.min_gpus": E(kw(model="llama2-7b", gpu="H100", workload="inference", seq_len=2048,
                            batch=1)),
    # -- collectives -----------------------------------------------------------------------
    "collectives.busbw_factor": E(kw(collective="all_reduce", n=8)),
    "collectives.algbw": E(kw(nbytes=1e6, seconds=1e-3), allow={"nbytes": {"zero"}}),
    "collectives.busbw": E(kw(collective="all_reduce", nbytes=1e6, seconds=1e-3, n=8),
                          allow={"nbytes": {"zero"}}),
    "collectives.ring_cost": E(kw(collective="all_reduce", n=8, nbytes=1e6),
                               allow={"nbytes": {"zero"}}),
    "collectives.all_reduce_cost": E(kw(algorithm="ring", n=8, nbytes=1e6),
                                     allow={"nbytes": {"zero"}}),
    "collectives.fit_alpha_beta": E(kw(steps=[2, 4, 8], nbytes=[1e3, 1e4, 1e5],
                                       times=[1e-5, 3e-5, 2e-4])),
    "collectives.crossover_size": E(kw(alpha=1e-6, beta=1e-9, n=8),
                                    allow={"alpha": {"zero"}, "beta": {"zero"}}),
    # -- parallelism -----------------------------------------------------------------------
    "parallelism.collective_bytes": E(kw(collective="all_reduce", payload=1e6, n=8),
                                      allow={"payload": {"zero"}}),
    "parallelism.dp_bytes_per_step": E(kw(params=7_000_000_000, dp=8, bytes_per_grad=2)),
    "parallelism.tp_collectives_per_layer": E(kw(sequence_parallel=False)),
    "parallelism.tp_bytes_per_layer": E(kw(tokens=4096, hidden=4096, tp=8)),
    "parallelism.pp_bytes_per_microbatch": E(kw(tokens=4096, hidden=4096, tp=2)),
    "parallelism.comm_per_step": E(kw(model="llama2-7b", seq_len=4096, micro_batch=1, n_micro=8,
                                      tp=2, pp=2, dp=2), allow={"zero_stage": {"zero"}}),
    "parallelism.bubble_fraction": E(kw(p=4, m=8, v=1)),
    "parallelism.pipeline_orders": E(kw(kind="1f1b", p=2, m=4)),
    "parallelism.assign_slots": E(lambda: dict(orders=_orders())),
    "parallelism.schedule": E(kw(kind="1f1b", p=2, m=4)),
    "parallelism.idle_fraction": E(lambda: dict(sched=_schedule())),
    "parallelism.plot_timeline": E(lambda: dict(sched=_schedule()),
                                   skip={"ax": "a matplotlib Axes or None"}),
    "parallelism.bucket_assignment": E(kw(nbytes=[100, 200, 300], cap_bytes=250)),
    # -- zero ------------------------------------------------------------------------------
    "zero.counting_allreduce_hook": E(kw()),
    "zero.storage_bytes": E(lambda: dict(tensors=[torch.zeros(3), torch.zeros(2)])),
    "zero.lab_model": E(kw()),
    "zero.units": E(lambda: dict(model=__import__("utils.zero").zero.lab_model())),
    "zero.micro_batch": E(kw(step=0, rank=0, batch=4), allow={"step": {"zero"}, "rank": {"zero"}}),
    "zero.global_batch": E(kw(step=0, world_size=2, batch=4), allow={"step": {"zero"}}),
    "zero.loss_fn": E(lambda: dict(zip(("model", "tokens", "targets"),
                                       (__import__("utils.zero").zero.lab_model(),
                                        *__import__("utils.zero").zero.micro_batch(0, 0))))),
    "zero.flat_params": E(lambda: dict(module=torch.nn.Linear(2, 2))),
    "zero.reference_run": E(kw(steps=1, world_size=1), allow={"steps": {"zero"}}),
    "zero.train_worker": E(kw(rank=0, world_size=1, engine_factory=lambda *a, **k: None, steps=1),
                           run_base=False,
                           skip={"engine_factory": "runs inside a launched process group",
                                 "hp": "a mapping of optimizer settings",
                                 "config": "a TinyConfig", "dtype": "a torch dtype"},
                           allow={"rank": {"zero"}, "steps": {"zero"}}),
    # -- recompute -------------------------------------------------------------------------
    "recompute.saved_bytes": E(lambda: dict(fn=lambda x: (x * 2).sum(),
                                            args=(torch.ones(3, requires_grad=True),)),
                               varargs=("fn", "*args"), skip={"ignore": "optional tensors"}),
    "recompute.measure_step": E(lambda: dict(fn=lambda x: (x * x).sum(),
                                             args=(torch.ones(3, requires_grad=True),)),
                                varargs=("fn", "*args"),
                                allow={"seed": {"zero"}}, skip={"ignore": "optional tensors"}),
    "recompute.mlp_stack": E(kw(n=2, width=8, ratio=2, seed=0), allow={"seed": {"zero"}}),
    "recompute.run_blocks": E(lambda: dict(blocks=[torch.nn.Linear(4, 4)], x=torch.ones(2, 4)),
                              allow={"x": {"shape"}}),
    "recompute.attention_core": E(lambda: dict(q=torch.ones(1, 2, 3, 4), k=torch.ones(1, 2, 3, 4),
                                               v=torch.ones(1, 2, 3, 4)),
                                  allow={a: {"shape"} for a in "qkv"}),
    "recompute.segment_sizes": E(kw(n=8, k=3)),
    "recompute.segment_memory": E(kw(sizes=[3, 3, 2], input_bytes=100, block_bytes=100),
                                  allow={"input_bytes": {"zero"}}),
    "recompute.best_segments": E(kw(n=8, input_bytes=100, block_bytes=100),
                                 allow={"input_bytes": {"zero"}}),
    "recompute.continuous_optimum": E(kw(n=8, input_bytes=100.0, block_bytes=100.0)),
    "recompute.checkpoint_segments": E(lambda: dict(blocks=[torch.nn.Linear(4, 4)] * 2,
                                                    x=torch.ones(2, 4, requires_grad=True), k=2),
                                       allow={"x": {"shape"}}),
    "recompute.layer_forward_flops": E(kw(seq_len=16, batch=2, hidden=8)),
    "recompute.recompute_overhead": E(kw(seq_len=2048, hidden=4096, recompute="full")),
    # -- inference_cost ----------------------------------------------------------------------
    "inference_cost.as_spec": E(kw(model="llama2-7b")),
    "inference_cost.step_cost": E(kw(model="llama2-7b", batch=2, new=4, cached=8),
                                  allow={"cached": {"zero"}}),
    "inference_cost.prefill_cost": E(kw(model="llama2-7b", batch=2, prompt_len=16)),
    "inference_cost.decode_cost": E(kw(model="llama2-7b", batch=2, context=16)),
    "inference_cost.decode_intensity_limit": E(kw(model="llama2-7b", context=16)),
    "inference_cost.decode_knee_batch": E(kw(model="llama2-7b", peak_flops=1e15, bandwidth=3e12,
                                             context=16)),
    "inference_cost.step_time": E(lambda: dict(cost=roofline.KernelCost(1e12, 1e9), gpu="H100")),
    "inference_cost.max_decode_batch": E(kw(model="llama2-7b", gpu="H100", context=1024)),
    "inference_cost.usd_per_million_tokens": E(kw(tokens_per_second=1000.0,
                                                  usd_per_gpu_hour=2.0),
                                               allow={"usd_per_gpu_hour": {"zero"}}),
    # -- paged_kv ----------------------------------------------------------------------------
    "paged_kv.blocks_needed": E(kw(n_tokens=10, block_size=4), allow={"n_tokens": {"zero"}}),
    "paged_kv.gather_kv": E(lambda: dict(pool=torch.arange(24.0).reshape(6, 1, 2, 2), table=[2, 0],
                                         n_tokens=3), allow={"n_tokens": {"zero"},
                                                             "pool": {"dtype"}}),
    "paged_kv.paged_attention": E(_paged, allow={"block_tables": {"type"}, "lengths": {"type"}}),
    "paged_kv.request_trace": E(kw(n=5), allow={"n": {"zero"}}),
    "paged_kv.kv_usage": E(kw(trace=[(3, 2), (5, 1)], scheme="paged", max_len=8, block_size=4)),
    "paged_kv.max_concurrent": E(lambda: dict(usage=pk.kv_usage([(3, 2)], "max", max_len=8),
                                              budget_slots=100), allow={"budget_slots": {"zero"}}),
    "paged_kv.run_batch": E(lambda: dict(model=model(), prompts=[[1, 2, 3]],
                                         make_cache=lambda i: tiny.ContiguousKVCache(CFG),
                                         held_slots=lambda caches: 0, max_new_tokens=2),
                            skip={"stop_token": "optional", "release": "optional callback"}),
    "paged_kv.draw_block_tables": E(lambda: _block_tables(), skip={"ax": "an Axes or None"}),
    # -- serving -----------------------------------------------------------------------------
    "serving.make_trace": E(kw(n=3, rate=10.0), allow={"n": {"zero"}, "seed": {"zero"}}),
    "serving.measure_step_times": E(lambda: dict(model=model(), batches=(1,), prompt_lens=(4,),
                                                 context=4, min_run_time=0.001), run_base=False),
    "serving.gpu_cost_model": E(kw(model_name="llama2-7b", gpu_name="H100")),
    "serving.next_batch": E(kw(arrivals=[0.1, 0.5], now=0.0, max_batch=4, max_delay=1.0),
                            allow={"now": {"zero"}, "max_delay": {"zero", "inf"}}),
    "serving.chunk_plan": E(kw(n_decode=1, remaining=[3], token_budget=4),
                            allow={"n_decode": {"zero"}}),
    "serving.serve_batched": E(lambda: dict(model=None, requests=_reqs(), max_batch=2,
                                            max_delay=0.1, clock=serving.VirtualClock(UNIT)),
                               allow={"max_delay": {"zero", "inf"}},
                               skip={"model": "None simulates"}),
    "serving.serve_continuous": E(lambda: dict(model=None, requests=_reqs(), max_batch=2,
                                               clock=serving.VirtualClock(UNIT)),
                                  skip={"model": "None simulates"}),
    "serving.ttft": E(lambda: dict(c=_completions()[0])),
    "serving.tpot": E(lambda: dict(c=_completions()[0])),
    "serving.summarize": E(lambda: dict(completions=_completions())),
    "serving.slo_attainment": E(lambda: dict(completions=_completions(), ttft_slo=5.0,
                                             tpot_slo=2.0), allow={"ttft_slo": {"inf"},
                                                                   "tpot_slo": {"inf"}}),
    "serving.goodput": E(lambda: dict(results_by_rate={1.0: _completions()}, ttft_slo=5.0,
                                      tpot_slo=2.0), allow={"ttft_slo": {"inf"},
                                                            "tpot_slo": {"inf"}}),
    "serving.simulate_colocated": E(lambda: dict(requests=_reqs(), cost=UNIT, n_instances=1,
                                                 max_batch=2)),
    "serving.simulate_disaggregated": E(lambda: dict(requests=_reqs(), cost=UNIT, n_prefill=1,
                                                     n_decode=1, max_batch=2,
                                                     kv_bytes_per_token=100.0,
                                                     link_bandwidth=100.0, link_latency=0.1),
                                        allow={"kv_bytes_per_token": {"zero"},
                                               "link_latency": {"zero"}}),
    "serving.saturate": E(lambda: dict(requests=_reqs())),
    "serving.simulate": E(lambda: dict(scheduler="chunked", requests=_reqs(), cost=UNIT,
                                       max_batch=2, max_delay=0.1, token_budget=4),
                          allow={"max_delay": {"zero", "inf", "neg", "nan", "type"}}),
    "serving.saturation_throughput": E(lambda: dict(scheduler="chunked", requests=_reqs(),
                                                    cost=UNIT, max_batch=2, max_delay=0.1,
                                                    token_budget=4),
                                       allow={"max_delay": {"zero", "inf", "neg", "nan",
                                                            "type"}}),
    "serving.plot_timeline": E(lambda: _serving_timeline(), skip={"ax": "an Axes or None"},
                               allow={"title": {"name"}}),
    # -- speculative -------------------------------------------------------------------------
    "speculative.expected_tokens": E(kw(alpha=0.8, gamma=4), allow={"alpha": {"zero"},
                                                                    "gamma": {"zero"}}),
    "speculative.speedup": E(kw(alpha=0.8, gamma=4, c=0.1),
                             allow={"alpha": {"zero"}, "c": {"zero"}, "gamma": {"zero"}}),
    "speculative.optimal_gamma": E(kw(alpha=0.8, c=0.1), allow={"alpha": {"zero"},
                                                                "c": {"zero"}}),
    "speculative.probs": E(lambda: dict(logits=torch.tensor([1.0, 2.0, 0.5]), temperature=1.0),
                           allow={"logits": {"shape"}, "temperature": {"zero"}}),
    "speculative.acceptance_probability": E(lambda: dict(zip("pq", _pq())),
                                            allow={"p": {"shape"}, "q": {"shape"}}),
    "speculative.residual": E(lambda: dict(zip("pq", _pq())),
                              allow={"p": {"shape"}, "q": {"shape"}}),
    "speculative.accept_or_resample": E(lambda: dict(**dict(zip("pq", _pq())), x=1,
                                                     generator=_g()),
                                        allow={"x": {"zero"}}),
    "speculative.always_accept": E(lambda: dict(**dict(zip("pq", _pq())), x=1),
                                   allow={"x": {"zero"}}),
    "speculative.acceptance_rate": E(lambda: dict(zip("pq", _pq())),
                                     allow={"p": {"shape"}, "q": {"shape"}}),
    "speculative.speculative_generate": E(lambda: dict(zip(("target", "draft"), _markov()),
                                                       prompt_tokens=[1, 2], max_new_tokens=3,
                                                       gamma=2, generator=_g()),
                                          allow={"max_new_tokens": {"zero"},
                                                 "temperature": {"zero"}},
                                          skip={"accept": "optional rule"}),
    "speculative.lookup_draft": E(kw(context=[1, 2, 3, 1, 2], gamma=2, max_ngram=2),
                                  allow={"context": {"elem_neg"}, "gamma": {"zero"}}),
    "speculative.prompt_lookup_generate": E(lambda: dict(target=_markov()[0],
                                                         prompt_tokens=[1, 2, 1], max_new_tokens=3,
                                                         gamma=2),
                                            allow={"max_new_tokens": {"zero"}}),
    "speculative.measure_alpha": E(lambda: dict(zip(("target", "draft"), _markov()),
                                                tokens=[1, 2, 3, 0, 1, 2], window=4)),
    "speculative.decode_step_times": E(lambda: dict(models=[model()], context_tokens=[1, 2, 3],
                                                    steps=2, repeats=1)),
    "speculative.measure_speedup": E(lambda: dict(zip(("target", "draft"), _markov()),
                                                  prompts=[[1, 2]], max_new_tokens=2, gammas=[2],
                                                  repeats=1), allow={"seed": {"zero"}},
                                     skip={"loops": "optional mapping of loops"}),
    "speculative.chi_square": E(kw(counts=[30, 20], expected_probs=[0.5, 0.5])),
    # -- tiny --------------------------------------------------------------------------------
    "tiny.causal_mask": E(lambda: dict(q_positions=torch.arange(3)[None], n_keys=3)),
    "tiny.attention": E(lambda: dict(q=torch.ones(1, 4, 3, 8), k=torch.ones(1, 2, 3, 8),
                                     v=torch.ones(1, 2, 3, 8),
                                     mask=tiny.causal_mask(torch.arange(3)[None], 3)),
                        allow={"mask": {"shape"}}),
    "tiny.rope_tables": E(kw(head_dim=8, max_seq_len=16, theta=10000.0)),
    "tiny.apply_rope": E(lambda: dict(x=torch.ones(1, 2, 3, 8),
                                      **dict(zip(("cos", "sin"), tiny.rope_tables(8, 3, 1e4)))),
                         allow={"x": {"shape"}}),
    "tiny.sample_next": E(lambda: dict(logits=torch.tensor([[1.0, 2.0, 0.5]]), temperature=0.7,
                                       generator=_g()),
                          allow={"temperature": {"zero"}, "logits": {"shape"}}),
    "tiny.generate": E(lambda: dict(model=model(), prompt_tokens=[1, 2, 3], max_new_tokens=2),
                       allow={"max_new_tokens": {"zero"}, "prompt_tokens": {"elem_nan"}},
                       skip={"cache_factory": "optional factory", "stop_token": "optional"}),
    "tiny.save": E(lambda: dict(model=model(), path=_tmp_path() / "m.safetensors"),
                   skip={"extra": "optional metadata"}),
    "tiny.weights_path": E(kw(name="tiny-draft")),
    "tiny.metadata": E(kw(name="tiny-draft")),
    "tiny.load": E(kw(name="tiny-draft")),
    # -- tiny_corpus ---------------------------------------------------------------------------
    "tiny_corpus.document": E(lambda: dict(rng=__import__("random").Random(0))),
    "tiny_corpus.generate_text": E(kw(n_chars=100, seed=0), allow={"seed": {"zero"}}),
    "tiny_corpus.train_text": E(kw(n_chars=100)),
    "tiny_corpus.heldout_text": E(kw(n_chars=100)),
    "tiny_corpus.prompts": E(kw(n=2, seed=1), allow={"seed": {"zero"}, "n": {"zero"}}),
    # -- plots ---------------------------------------------------------------------------------
    "plots.use_style": E(kw()),
    "plots.si": E(kw(value=1.5e9, unit="B/s", digits=3),
                  allow={"value": {"zero", "neg", "inf", "nan"}, "unit": {"name"}}),
    "plots.roof_from_spec": E(kw(spec="H100", dtype="bf16")),
    "plots.roofline": E(lambda: dict(roofs=[__import__("utils.plots").plots.Roof("x", 1e12, 1e11)]),
                        skip={"ax": "an Axes or None", "title": "free text"}),
}


# -- the chapter modules (01, 02, 05, 06, 15, 20, 22) -------------------------------------
def _w(rows=4, cols=8, seed=0):
    return torch.randn(rows, cols, generator=_g(seed))


def _fast_memory():
    from utils import tiling
    return tiling.FastMemory(1 << 16)


def _trace():
    return [("alloc", 0, 1024), ("alloc", 1, 2 << 20), ("free", 0, 1024), ("free", 1, 2 << 20)]


def _graph():
    from utils import topology
    return topology.pcie_server()


def _ckpt_path():
    return _tmp_path() / "ckpt.pt"


def _gguf_model():
    return __import__("utils.tiny").tiny.load("tiny-draft")


SWEEP.update({
    # -- tiling (chapter 01) -----------------------------------------------------------------
    "tiling.best_tile": E(kw(m=64, n=64, k=64, capacity=1 << 14, itemsize=4)),
    "tiling.cache_levels": E(kw(), skip={"root": "a sysfs folder; a missing one is tested"}),
    "tiling.fast_bytes_needed": E(kw(tm=8, tn=8, tk=8, itemsize=4)),
    "tiling.flash_attention": E(lambda: dict(q=torch.randn(1, 2, 8, 4, generator=_g()),
                                             k=torch.randn(1, 2, 8, 4, generator=_g(1)),
                                             v=torch.randn(1, 2, 8, 4, generator=_g(2)),
                                             block_q=4, block_k=4),
                                allow={"q": {"shape"}, "k": {"shape"}, "v": {"shape"}}),
    "tiling.flash_attention_hbm_accesses": E(kw(N=1024, d=64, M=100_000)),
    "tiling.io_lower_bound": E(kw(m=64, n=64, k=64, capacity=1 << 14, itemsize=4)),
    "tiling.matmul_traffic": E(kw(m=64, n=64, k=64, tm=8, tn=8, tk=8, itemsize=4)),
    "tiling.plateaus": E(kw(sweep=[(1 << 14, 1e11), (1 << 24, 1e10)],
                            levels={"L1": 1 << 15, "L2": 1 << 20})),
    "tiling.standard_attention_hbm_accesses": E(kw(N=1024, d=64)),
    "tiling.tiled_matmul": E(lambda: dict(A=_w(8, 8), B=_w(8, 8, 1), mem=_fast_memory(),
                                          tm=4, tn=4, tk=4)),
    # -- memtech (chapter 02) ----------------------------------------------------------------
    "memtech.decode_ceiling": E(kw(n_params=7e9, bytes_per_param=2, bandwidth=3.35e12)),
    "memtech.gpu_memory": E(kw(name="H100")),
    "memtech.implied_pin_rate": E(kw(bandwidth=3.35e12, bus_width=5120)),
    "memtech.interface_bandwidth": E(kw(pin_rate=6.4e9, bus_width=1024)),
    "memtech.tech": E(kw(name="HBM3")),
    # -- allocator (chapter 05) --------------------------------------------------------------
    "allocator.is_small": E(kw(nbytes=1024), allow={"nbytes": {"zero"}}),
    "allocator.load_trace": E(kw(), skip={"path": "a file; a missing one is tested"}),
    "allocator.replay": E(lambda: dict(trace=_trace(),
                                       allocator=__import__("utils.allocator").allocator
                                       .CachingAllocator())),
    "allocator.round_size": E(kw(nbytes=1000), allow={"nbytes": {"zero"}}),
    # the rules of the source applied to the rounded size: round_size(0) is 512, whose
    # segment is the 2 MiB small buffer (allocate(0) itself reserves nothing)
    "allocator.segment_size": E(kw(nbytes=1000), allow={"nbytes": {"zero"}}),
    "allocator.should_split": E(kw(block_size=4 << 20, size=1 << 20, small=False),
                                allow={"max_split_size": {"inf"}}),
    "allocator.trace_stats": E(lambda: dict(trace=_trace())),
    # -- topology (chapter 06) ---------------------------------------------------------------
    "topology.concurrent_rates": E(lambda: dict(graph=_graph(),
                                                transfers=[("GPU0", "GPU1"), ("GPU4", "GPU5")])),
    "topology.max_flow": E(lambda: dict(graph=_graph(), src="GPU0", dst="GPU4")),
    "topology.max_min_fair": E(kw(capacities={"a": 10.0, "b": 4.0}, paths=[["a"], ["a", "b"]])),
    "topology.nvswitch_server": E(kw(gpus=8, link="NVLink 4")),
    "topology.pcie_server": E(kw(switches=2, gpus_per_switch=4, nics_per_switch=1,
                                 link="PCIe Gen4 x16"),
                              allow={"nics_per_switch": {"zero"}}),
    "topology.route": E(lambda: dict(graph=_graph(), src="GPU0", dst="GPU4")),
    "topology.fat_tree": E(kw(k=4, link="InfiniBand NDR", oversubscription=7.0)),
    "topology.rail_optimized": E(kw(nodes=2, gpus_per_node=4, link="InfiniBand NDR",
                                    nvlink="NVLink 4", spines=2, oversubscription=1.0)),
    "topology.rail_only": E(kw(nodes=2, gpus_per_node=4, link="InfiniBand NDR", nvlink="NVLink 4")),
    "topology.fabric": E(kw(name="fat_tree", k=4)),
    "topology.bisection_bandwidth": E(lambda: dict(fabric=__import__("utils.topology").topology
                                                   .fat_tree(4))),
    "topology.transfer_time": E(kw(nbytes=1e6, bandwidth=1e9, latency=1e-6, efficiency=0.9),
                                allow={"nbytes": {"zero"}, "latency": {"zero"}}),
    # -- reliability (chapter 15) ------------------------------------------------------------
    "reliability.census_mismatches": E(lambda: dict(rows=[("GPU", "GPU", 148, 30.1)], total=419,
                                                    decimals=1),
                                       allow={"decimals": {"zero"}}),
    "reliability.daly_interval": E(kw(checkpoint_seconds=60.0, mtbf_seconds=3600.0)),
    "reliability.find_stragglers": E(lambda: dict(step_times=torch.tensor([[1.0, 1.0, 2.0, 1.0],
                                                                          [1.1, 1.0, 2.1, 0.9]]),
                                                  threshold=1.25),
                                       allow={"step_times": {"type"}}),   # nested lists are valid
    "reliability.goodput": E(kw(interval_seconds=600.0, checkpoint_seconds=60.0,
                                restart_seconds=120.0, mtbf_seconds=3600.0),
                             allow={"restart_seconds": {"zero"}, "checkpoint_seconds": {"zero"}}),
    "reliability.job_mtbf": E(kw(device_mtbf=1e6, n=8)),
    "reliability.load_checkpoint": E(lambda: (__import__("utils.reliability").reliability
                                              .save_checkpoint(_ckpt_path(), {"x": 1}),
                                              dict(path=_ckpt_path()))[1],
                                     skip={"path": "a file; missing and corrupt ones are tested"}),
    "reliability.rng_state": E(kw()),
    "reliability.save_checkpoint": E(lambda: dict(path=_ckpt_path(), state={"x": 1}),
                                     skip={"path": "a file path"}),
    "reliability.set_rng_state": E(lambda: dict(state=__import__("utils.reliability")
                                                .reliability.rng_state())),
    "reliability.simulate_goodput": E(kw(interval_seconds=600.0, checkpoint_seconds=60.0,
                                         restart_seconds=120.0, mtbf_seconds=3600.0,
                                         work_seconds=36000.0, seed=0),
                                      allow={"restart_seconds": {"zero"},
                                             "checkpoint_seconds": {"zero"}}),
    "reliability.young_daly_interval": E(kw(checkpoint_seconds=60.0, mtbf_seconds=3600.0)),
    "reliability.young_interval": E(kw(checkpoint_seconds=60.0, mtbf_seconds=3600.0)),
    # -- quant (chapter 20) ------------------------------------------------------------------
    "quant.awq_search": E(lambda: dict(w=_w(4, 8), x=_w(16, 8, 1), bits=4, group_size=4, grid=4)),
    "quant.bits_per_weight": E(kw(fmt="nf4", block_size=64)),
    "quant.bitsandbytes_functional": E(kw()),
    "quant.dynamic_int8_benchmark": E(kw(d_model=32, n_layers=1, batch=2, repeats=1, seed=0),
                                      run_base=False, allow={"seed": {"zero"}}),
    "quant.dynamic_int8_warnings": E(kw(result={"speedup": 1.5}, report=False),
                                     run_base=False),
    "quant.fake_quant_int8": E(lambda: dict(x=_w(), dim=0),
                               allow={"x": {"shape"}, "dim": {"zero", "neg"}}),   # dim -1 is valid
    "quant.format_info": E(kw(name="e4m3")),
    "quant.fp8_bits": E(lambda: dict(x=_w(), fmt="e4m3"), allow={"x": {"shape"}}),
    "quant.fp8_matmul_cuda": E(lambda: dict(a=_w(16, 16), b=_w(16, 16, 1)), run_base=False),
    "quant.fp8_round": E(lambda: dict(x=_w(), fmt="e4m3"), allow={"x": {"shape"}}),
    "quant.fp_grid": E(kw(fmt="e2m1")),
    "quant.gptq_quantize": E(lambda: dict(w=_w(4, 8), h=(lambda a: a.T @ a)(_w(16, 8, 1)),
                                          bits=4, damp=0.01), allow={"damp": {"zero"}}),
    "quant.int8_dequantize": E(lambda: dict(q=torch.tensor([[1, -2], [3, 4]], dtype=torch.int8),
                                            scale=torch.tensor(0.5),
                                            zero_point=torch.tensor(0, dtype=torch.int32)),
                             # a per-tensor scale broadcasts over any shape of q
                             allow={"q": {"shape"}, "scale": {"shape"}, "zero_point": {"shape"}}),
    "quant.int8_quantize": E(lambda: dict(x=_w(), dim=None, symmetric=True),
                             allow={"x": {"shape"}}),
    "quant.int_quantize_groups": E(lambda: dict(w=_w(4, 8), bits=4, group_size=4)),
    "quant.llm_int8_matmul": E(lambda: dict(x=_w(2, 8), w=_w(4, 8, 1), threshold=6.0),
                               allow={"threshold": {"zero"}}),   # every column an outlier: all 16-bit
    "quant.nf4_codebook": E(kw()),
    "quant.nf4_dequantize": E(lambda: (lambda c: dict(codes=c[0], absmax=c[1], block_size=64))(
        __import__("utils.quant").quant.nf4_quantize(_w(4, 32), 64)),
                              skip={"shape": "optional shape"}),
    "quant.nf4_pack": E(lambda: dict(codes=torch.tensor([1, 2, 3, 4], dtype=torch.uint8))),
    "quant.nf4_quantize": E(lambda: dict(x=_w(4, 32), block_size=64), allow={"x": {"shape"}}),
    "quant.perplexity": E(lambda: dict(model=model(), text="hello world, hello world", seq_len=8)),
    "quant.quantization_error": E(lambda: dict(w=_w(4, 8), w_hat=_w(4, 8, 1),
                                               h=(lambda a: a.T @ a)(_w(16, 8, 2)))),
    "quant.quantize_model_weights": E(lambda: dict(model=_tiny_model(), method="rtn", bits=4),
                                      skip={"quantize_fn": "optional callable",
                                            "calib_tokens": "optional tensor"}),
    "quant.rtn_quantize": E(lambda: dict(w=_w(4, 8), bits=4)),
    "quant.smoothquant_scales": E(lambda: dict(act_absmax=torch.rand(8, generator=_g()) + 0.1,
                                               w=_w(4, 8), alpha=0.5),
                                  allow={"alpha": {"zero"}}),
    # -- edge (chapter 22) -------------------------------------------------------------------
    "edge.bits_per_weight": E(kw(fmt="Q4_0")),
    "edge.decode_tokens_per_s": E(kw(bandwidth=1e11, bytes_per_token=1e9)),
    "edge.dequantize": E(lambda: dict(data=__import__("utils.edge").edge.quantize(
        np.linspace(-1, 1, 64, dtype=np.float32), "Q8_0"), fmt="Q8_0")),
    "edge.edge_device": E(kw(name="Jetson-AGX-Orin-64GB")),
    "edge.joules_per_token": E(kw(watts=15.0, tokens_per_s=20.0)),
    "edge.model_bytes": E(kw(n_params=1_000_000, fmt="Q4_0")),
    "edge.pack_q4_k": E(lambda: dict(d=0.01, dmin=0.002, scales=[1] * 8, mins=[0] * 8,
                                     q=[3] * 256),
                        allow={"d": {"zero", "neg"}, "dmin": {"zero", "neg"}}),
    "edge.quantize": E(lambda: dict(x=np.linspace(-1, 1, 64, dtype=np.float32), fmt="Q8_0")),
    "edge.read_gguf": E(lambda: dict(path=_tmp_path() / "missing.gguf"), run_base=False,
                        skip={"path": "a file; missing and corrupt ones are tested"}),
    "edge.speed_outliers": E(kw(rates={"F32": 10.0, "Q8_0": 11.0}, reference="F32", band=2.0)),
    "edge.write_gguf": E(lambda: dict(model=_gguf_model(), path=_tmp_path() / "m.gguf", fmt="Q8_0"),
                         skip={"path": "a file path"}),
})

# -- constructors and the methods a learner or a notebook calls with its own arguments --------
def _cfg():
    return CFG


SWEEP.update({
    "tiling.FastMemory": E(kw(capacity=1 << 16)),
    "tiling.FastMemory.alloc": E(kw(shape=(4, 4)), make=_fast_memory, skip={"dtype": "a dtype"},
                           allow={"shape": {"type"}}),   # an int is a 1-D shape
    "tiling.FastMemory.load": E(lambda: dict(view=_w(4, 4)), make=_fast_memory,
                                allow={"view": {"shape", "dtype"}}),
    "allocator.CachingAllocator": E(kw(capacity=1 << 30, max_split_size=float(1 << 28)),
                                    allow={"max_split_size": {"inf"}}),
    "allocator.CachingAllocator.malloc": E(kw(nbytes=4096), make=lambda: __import__(
        "utils.allocator").allocator.CachingAllocator(), allow={"nbytes": {"zero"}}),
    "allocator.CachingAllocator.free": E(kw(handle=12345), run_base=False,
                                         make=lambda: __import__("utils.allocator").allocator
                                         .CachingAllocator()),
    "paged_kv.BlockAllocator": E(kw(num_blocks=8)),
    "paged_kv.BlockAllocator.free": E(kw(block=0), run_base=False,
                                      make=lambda: pk.BlockAllocator(8)),
    "paged_kv.BlockAllocator.fork": E(kw(block=0), run_base=False,
                                      make=lambda: pk.BlockAllocator(8)),
    "paged_kv.BlockManager": E(kw(num_blocks=8, block_size=4)),
    "paged_kv.BlockManager.append_slots": E(kw(seq="a", n=3), make=lambda: pk.BlockManager(8, 4),
                                            allow={"seq": {"name", "type"}, "n": {"zero"}}),
    "paged_kv.BlockManager.allocate_prompt": E(kw(seq="a", token_ids=[1, 2, 3, 4, 5]),
                                               make=lambda: pk.BlockManager(8, 4, prefix_caching=True),
                                               allow={"seq": {"name", "type"}}),
    "tiny.TinyConfig": E(kw(vocab=44, n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                            max_seq_len=32)),
    "tiny.TinyTransformer": E(lambda: dict(config=_cfg())),
    "tiny.ContiguousKVCache": E(lambda: dict(config=_cfg(), batch_size=2, max_len=16),
                                skip={"dtype": "a dtype", "device": "a device"}),
    "tiny.CharTokenizer": E(kw(alphabet="abc ", eos=" "), allow={"alphabet": {"name"}}),
    "speculative.MarkovLM": E(lambda: dict(table=torch.full((3, 3, 3), 1 / 3),
                                           first=torch.full((3, 3), 1 / 3), max_seq_len=8),
                              allow={"table": {"type"}, "first": {"type"}}),   # nested lists convert
    "serving.CostModel": E(kw(decode_base=0.01, decode_per_seq=0.001, prefill_base=0.01,
                              prefill_per_token=1e-4),
                           allow={"decode_per_seq": {"zero"}, "prefill_per_token": {"zero"},
                                  "decode_base": {"zero"}, "prefill_base": {"zero"},
                                  "source": {"name"}}),
    # advance_to is "at least t": a time at or before now leaves the clock where it is
    "serving.VirtualClock.advance_to": E(kw(t=1.0), make=lambda: serving.VirtualClock(UNIT),
                                         allow={"t": {"zero", "neg"}}),
    "scheduler.Job": E(kw(jid=0, submit=0.0, gpus=8, duration=10.0),
                       allow={"jid": {"zero"}, "submit": {"zero"}, "priority": {"zero", "neg"}}),
    "plots.Roof": E(kw(label="cpu", peak_flops=1e12, bandwidth=1e11),
                    allow={"label": {"name"}}),
})

# -- chapters 04, 07, 08, 21 ----------------------------------------------------------------
_DGX_GPUS = [f"GPU{i}" for i in range(8)]


def _dgx_graph():
    return __import__("utils.dgx").dgx.dgx_graph()


def _fat4():
    return __import__("utils.topology").topology.fat_tree(4)


def _traced():
    from utils import compilation
    return compilation.trace_tiny(_tiny_model())


def _hist():
    from utils import compilation
    return compilation.abs_histogram(torch.randn(4096, generator=_g()), bins=2048)


def _weights_file():
    return __import__("utils.tiny").tiny.weights_path("tiny-draft")


SWEEP.update({
    # -- hostmem (chapter 04) ---------------------------------------------------------------
    "hostmem.build_chain": E(kw(n_lines=64, seed=0), allow={"seed": {"zero"}}),
    "hostmem.chase": E(lambda: dict(chain=__import__("utils.hostmem").hostmem.build_chain(64),
                                    steps=64)),
    "hostmem.count_faults": E(lambda: dict(fn=lambda: None)),
    "hostmem.ddr_bandwidth": E(kw(channels=8, transfers_per_s=4.8e9, bus_bytes=8)),
    "hostmem.evict": E(lambda: dict(path=_weights_file()),
                       skip={"path": "a file; a missing one is tested"}),
    "hostmem.first_use": E(lambda: dict(path=_weights_file(), name="embed.weight", mode="mmap"),
                           run_base=False, skip={"path": "a file", "name": "a tensor name in it"}),
    "hostmem.latency_sweep": E(kw(sizes=[1 << 12], steps=1000, repeats=1, seed=0),
                               run_base=False, allow={"seed": {"zero"}}),
    "hostmem.loader_model": E(kw(decode_seconds=1e-3, batch_size=8, num_workers=2, cores=2,
                                 step_seconds=0.01),
                              allow={"step_seconds": {"zero"}, "num_workers": {"zero"},
                                     "decode_seconds": {"zero"}}),
    "hostmem.loader_throughput": E(lambda: dict(make_batches=lambda: [torch.zeros(2)], epochs=1)),
    "hostmem.measure_numa": E(kw(nbytes=1 << 20, repeats=1), run_base=False,
                              skip={"root": "a sysfs folder"}),
    "hostmem.numa_bandwidth": E(kw(remote_fraction=0.5, local=1e11, remote=5e10),
                                allow={"remote_fraction": {"zero"}}),
    "hostmem.numa_latency": E(kw(remote_fraction=0.5, local=9e-8, remote=1.4e-7),
                              allow={"remote_fraction": {"zero"}}),
    "hostmem.numa_topology": E(kw(), skip={"root": "a sysfs folder; a missing one is tested"}),
    "hostmem.parse_cpulist": E(kw(text="0-3,8"), allow={"text": {"name"}}),
    "hostmem.pinned": E(kw(cpus=[0]), run_base=False, allow={"cpus": {"elem_neg"}}),
    "hostmem.prefetch_loader": E(lambda: dict(dataset=[torch.zeros(2)] * 4, indices=[0, 1, 2, 3],
                                              batch_size=2, num_workers=0, prefetch_factor=2),
                                 run_base=False, allow={"num_workers": {"zero"}},
                                 skip={"collate_fn": "optional callable", "timeout": "seconds"}),
    # -- dgx (chapter 07) ----------------------------------------------------------------------
    "dgx.switch": E(kw(name="QM9700")),
    "dgx.dgx_graph": E(kw(system="DGX-H100", gpus_per_pcie_switch=2)),
    "dgx.fast_route": E(lambda: dict(graph=_dgx_graph(), src="GPU0", dst="GPU1")),
    "dgx.link_loads": E(lambda: dict(graph=_dgx_graph(), transfers=[("GPU0", "GPU1", 1e6)])),
    "dgx.schedule_time": E(lambda: dict(graph=_dgx_graph(), transfers=[("GPU0", "GPU1", 1e6)])),
    "dgx.ring_transfers": E(kw(order=["GPU0", "GPU1"], nbytes=1e6)),
    "dgx.ring_busbw": E(lambda: dict(graph=_dgx_graph(), rings=[list(_DGX_GPUS)])),
    "dgx.double_binary_tree": E(kw(n=8)),
    "dgx.tree_transfers": E(kw(parents=[None, 0], gpus=["GPU0", "GPU1"], nbytes=1e6)),
    "dgx.tree_busbw": E(lambda: dict(graph=_dgx_graph(), trees=[[None, 0]], gpus=["GPU0", "GPU1"])),
    "dgx.power_plan": E(kw(system="DGX-H100", nodes=4, rack_power_w=41e3, pdu_w=17.3e3, pue=1.2,
                           hours=1.0, load=0.8), allow={"hours": {"zero"}}),
    "dgx.fabric_size": E(kw(gpus=256, radix=64, gpus_per_node=8, su_nodes=32,
                            ports_per_transceiver=2)),
    # -- netsim (chapter 08) -------------------------------------------------------------------
    "netsim.ecmp_hash": E(kw(src="h0.0.0", dst="h1.0.0", flow=0, seed=0),
                          allow={"flow": {"zero"}, "seed": {"zero"}, "src": {"name", "type"},
                                 "dst": {"name", "type"}}),   # a hash of any hashable key
    "netsim.ecmp_paths": E(lambda: dict(graph=_fat4().graph, src="h0.0.0", dst="h1.0.0")),
    "netsim.pair_bandwidths": E(lambda: dict(graph=_fat4().graph, pairs=[("h0.0.0", "h1.0.0")],
                                             nbytes=1e6, flows_per_pair=2, seed=0),
                                allow={"seed": {"zero"}}),
    # any dtype sums; outside a launched worker the valid call reports the missing group
    "netsim.ring_all_reduce": E(lambda: dict(tensor=torch.zeros(4)), run_base=False,
                                skip={"link": "optional PacedLink"}, allow={"tensor": {"dtype"}}),
    "netsim.ring_allreduce_time": E(lambda: dict(graph=_fat4().graph,
                                                 ring=["h0.0.0", "h0.1.0", "h1.0.0", "h1.1.0"],
                                                 nbytes=1e6, alpha=1e-6, flows_per_pair=1, seed=0),
                                    allow={"alpha": {"zero"}, "seed": {"zero"}, "nbytes": {"zero"}}),
    "netsim.simulate_flows": E(kw(capacities={"a": 10.0, "b": 4.0}, paths=[["a"], ["a", "b"]],
                                  sizes=[5.0, 8.0])),
    # -- compilation (chapter 21) --------------------------------------------------------------
    "compilation.abs_histogram": E(lambda: dict(x=torch.randn(64, generator=_g()), bins=2048),
                                   allow={"x": {"shape"}}),
    "compilation.calibrate": E(lambda: dict(acts={"l": torch.randn(256, generator=_g())},
                                            method="percentile", percentile=99.9, bins=2048)),
    "compilation.count_ops": E(lambda: dict(gm=_traced())),
    "compilation.cuda_graph": E(lambda: dict(fn=lambda t: t * 2, example=torch.zeros(4),
                                             warmup=1), run_base=False),
    # histograms of counts may be integer or float tensors
    "compilation.entropy_amax": E(lambda: dict(zip(("hist", "edges"), _hist()), levels=128,
                                               start_bin=128), allow={"hist": {"dtype"}}),
    "compilation.entropy_divergences": E(lambda: dict(hist=_hist()[0], levels=128, start_bin=128),
                                         allow={"hist": {"dtype"}}),
    "compilation.fake_quant": E(lambda: dict(x=_w(), amax=2.0), allow={"x": {"shape"}}),
    "compilation.fold_constants": E(lambda: dict(gm=_traced())),
    "compilation.fuse_attention": E(lambda: dict(gm=_traced())),
    "compilation.fuse_sibling_linears": E(lambda: dict(gm=_traced())),
    "compilation.linear_inputs": E(lambda: dict(model=_tiny_model(),
                                                tokens=torch.tensor([[1, 2, 3, 4]]))),
    "compilation.matmul_count": E(lambda: dict(gm=_traced())),
    "compilation.max_amax": E(lambda: dict(x=_w()), allow={"x": {"shape"}}),
    "compilation.op_chain": E(lambda: dict(x=_w(), n=10), allow={"x": {"shape", "dtype"}}),
    "compilation.per_op_seconds": E(lambda: dict(fn=lambda t: t, x=_w(), n_ops=1, repeats=1,
                                                 number=1), run_base=False, allow={"x": {"shape", "dtype"}}),
    "compilation.percentile_amax": E(lambda: dict(zip(("hist", "edges"), _hist()),
                                                  percentile=99.99), allow={"hist": {"dtype"}}),
    "compilation.sdpa_attention": E(lambda: dict(q=torch.ones(1, 4, 3, 8), k=torch.ones(1, 2, 3, 8),
                                                 v=torch.ones(1, 2, 3, 8),
                                                 mask=tiny.causal_mask(torch.arange(3)[None], 3)),
                                    allow={"mask": {"shape"}}),
    "compilation.trace_tiny": E(lambda: dict(model=_tiny_model())),
    "compilation.w8a8": E(lambda: dict(model=_tiny_model(),
                                       amax=__import__("utils.compilation").compilation.calibrate(
                                           __import__("utils.compilation").compilation.linear_inputs(
                                               _tiny_model(), torch.tensor([[1, 2, 3, 4]])), "max"))),
})

def _block_tables():
    m = pk.BlockManager(8, block_size=2)
    m.append_slots("a", 3)
    return dict(manager=m, seqs=["a"])


def _serving_timeline():
    reqs = _reqs()
    clock = serving.VirtualClock(UNIT)
    out = serving.serve_continuous(None, reqs, 2, clock)
    return dict(requests=reqs, completions=out, log=clock.log)


_TMP = []


def _tmp_path():
    import pathlib
    import tempfile
    if not _TMP:
        _TMP.append(tempfile.TemporaryDirectory())
    return pathlib.Path(_TMP[0].name)


# ----------------------------------------------------------------------------------------
# Mutations
# ----------------------------------------------------------------------------------------
def _spec_types():
    return (hardware.GPUSpec, models.ModelSpec)


def mutations(value):
    """(kind, bad value) pairs for an argument whose valid value is ``value``."""
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, (int, float, np.number)):
        return [("nan", math.nan), ("inf", math.inf), ("neg", -1), ("zero", 0), ("type", "3")]
    if isinstance(value, str):
        return [("name", "no-such-name"), ("type", 3)]
    if isinstance(value, torch.Tensor):
        other = torch.int64 if value.is_floating_point() else torch.float32
        return [("type", value.tolist()), ("shape", value[None]), ("dtype", value.to(other))]
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        nan = list(value)
        nan[0] = math.nan
        neg = list(value)
        neg[0] = -1
        return [("elem_nan", type(value)(nan)), ("elem_neg", type(value)(neg)), ("type", 3)]
    return [("type", 3)]


def _call(fn, kwargs, varargs):
    if not varargs:
        return fn(**kwargs)
    kwargs = dict(kwargs)
    head = [kwargs.pop(n) for n in varargs if n != "*args"]
    return fn(*head, *kwargs.pop("args", ()), **kwargs)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def _timed(fn, kwargs, varargs):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
    try:
        return _call(fn, kwargs, varargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _resolve(qualname):
    """The function, class (its constructor is swept) or, for "module.Class.method", the
    method bound to a fresh object from the entry's ``make``."""
    mod, *names = qualname.split(".")
    if len(names) == 2:
        return getattr(SWEEP[qualname].make(), names[1])
    return getattr(importlib.import_module(f"utils.{mod}"), names[0])


def _names_arg(message: str, arg: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])", message,
                     re.IGNORECASE) is not None


def sweep_one(qualname: str) -> list[str]:
    """Problems found for one function (empty when it refuses every bad input properly)."""
    entry = SWEEP[qualname]
    fn = _resolve(qualname)
    problems = []
    if entry.run_base:
        try:                            # untimed: the first call may import a lot
            _call(fn, entry.base(), entry.varargs)
        except Exception as e:          # the table itself is wrong
            return [f"valid call failed: {type(e).__name__}: {e}"]
    for arg, value in entry.base().items():
        if arg in entry.skip or arg == "args":
            continue
        label = "args" if arg == "args" else arg
        for kind, bad in mutations(value):
            if kind in entry.allow.get(arg, ()) or kind in ALLOW_BY_NAME.get(arg, ()):
                continue
            kwargs = entry.base()
            kwargs[arg] = bad
            what = f"{arg}={kind}"
            if entry.make is not None:
                fn = _resolve(qualname)
            try:
                _timed(fn, kwargs, entry.varargs)
            except Hang:
                problems.append(f"{what}: no answer within {TIME_LIMIT} s")
            except (ValueError, TypeError) as e:
                if label != "args" and not _names_arg(str(e), label):
                    problems.append(f"{what}: {type(e).__name__} does not name {arg!r}: {e}")
            except Exception as e:
                problems.append(f"{what}: {type(e).__name__} (not ValueError/TypeError): {e}")
            else:
                problems.append(f"{what}: returned without an error")
    return problems


def public_functions(modname: str) -> list[str]:
    mod = importlib.import_module(f"utils.{modname}")
    return sorted(f"{modname}.{n}" for n, o in vars(mod).items()
                  if not n.startswith("_") and inspect.isfunction(o)
                  and o.__module__ == mod.__name__)


def _is_class_or_method(qualname: str) -> bool:
    mod, cls, *method = qualname.split(".")
    obj = getattr(importlib.import_module(f"utils.{mod}"), cls, None)
    if not inspect.isclass(obj):
        return False
    return not method or callable(getattr(obj, method[0], None))


def test_every_public_function_is_covered():
    public = {q for m in MODULES for q in public_functions(m)}
    missing = sorted(public - set(SWEEP))
    # entries beyond the functions: constructors ("module.Class") and methods
    # ("module.Class.method") of classes that still exist
    stale = sorted(q for q in set(SWEEP) - public if not _is_class_or_method(q))
    assert not missing, f"public functions without a sweep entry: {missing}"
    assert not stale, f"sweep entries for functions that no longer exist: {stale}"


#: Functions whose fixes have not landed yet (expected to fail; strict, so a fix that
#: lands without removing the name here is noticed).
PENDING: set = set()


@pytest.mark.parametrize("qualname", sorted(SWEEP))
def test_bad_inputs_are_refused_by_name(qualname):
    if qualname in PENDING:
        pytest.xfail("fix pending") if sweep_one(qualname) else \
            pytest.fail(f"{qualname} passes the sweep now: remove it from PENDING")
    problems = sweep_one(qualname)
    assert not problems, f"{qualname}:\n  " + "\n  ".join(problems)


# ----------------------------------------------------------------------------------------
# The cases reported in issue 12, section 3, one by one
# ----------------------------------------------------------------------------------------
def _p5_q1():
    return torch.full((5,), 0.2), torch.tensor([1.0])


SPECIFIC = [
    # (what, call, exception, words the message must contain)
    ("attainable_flops(nan)", lambda: hardware.attainable_flops(math.nan, 1e12, 1e9),
     ValueError, "intensity"),
    ("roofline.bound(nan)", lambda: roofline.bound(math.nan, 1e12, 1e9), ValueError, "intensity"),
    ("crossover_size(nan)", lambda: __import__("utils.collectives").collectives.crossover_size(
        math.nan, 1e-9, 8), ValueError, "alpha"),
    ("time_fn(min_run_time=nan)", lambda: __import__("utils.bench").bench.time_fn(
        lambda: None, min_run_time=math.nan), ValueError, "min_run_time"),
    ("time_fn(min_run_time=inf)", lambda: __import__("utils.bench").bench.time_fn(
        lambda: None, min_run_time=math.inf), ValueError, "min_run_time"),
    ("acceptance_rate(p[5], q[1])", lambda: sp.acceptance_rate(*_p5_q1()), ValueError, "p and q"),
    ("accept_or_resample(x=-1)", lambda: sp.accept_or_resample(*_pq(), x=-1), ValueError, "x"),
    ("paged_attention(lengths=[0, 0])",
     lambda: pk.paged_attention(**{**_paged(), "lengths": torch.tensor([0, 0])}), ValueError,
     "lengths"),
    ("paged_attention(lengths beyond the table)",
     lambda: pk.paged_attention(**{**_paged(), "lengths": torch.tensor([7, 3])}), ValueError,
     "lengths"),
    ("paged_attention(block id out of range)",
     lambda: pk.paged_attention(**{**_paged(), "block_tables": torch.tensor([[4, 1, 9], [2, 5, 5]])}),
     ValueError, "block_tables"),
    ("paged_attention(1-D table)",
     lambda: pk.paged_attention(**{**_paged(), "block_tables": torch.tensor([4, 1, 0])}),
     ValueError, "block_tables"),
    ("paged_attention(mismatched dtypes)",
     lambda: pk.paged_attention(**{**_paged(), "q": _paged()["q"].double()}), TypeError, "k_pool"),
    ("comm_per_step(tp=3)", lambda: __import__("utils.parallelism").parallelism.comm_per_step(
        "llama2-7b", 4096, 1, 8, tp=3), ValueError, "tp=3"),
    ("pp_bytes_per_microbatch(tp=0)", lambda: __import__("utils.parallelism").parallelism
     .pp_bytes_per_microbatch(4096, 4096, tp=0), ValueError, "tp"),
    ("generate(model, 'hello', 5)", lambda: tiny.generate(model(), "hello", 5), TypeError,
     "TOKENIZER.encode"),
    ("generate(empty prompt)", lambda: tiny.generate(model(), [], 5), ValueError, "prompt_tokens"),
    ("generate(temperature=nan)", lambda: tiny.generate(model(), [1, 2], 5, temperature=math.nan),
     ValueError, "temperature"),
    ("next_batch([0.5, 0.1], 0, 4)", lambda: serving.next_batch([0.5, 0.1], 0, 4), ValueError,
     "arrivals"),
    ("simulate_colocated(n_instances=0)", lambda: serving.simulate_colocated(_reqs(), UNIT, 0, 4),
     ValueError, "n_instances"),
    ("simulate_disaggregated(kv_bytes_per_token=-1e6)",
     lambda: serving.simulate_disaggregated(_reqs(), UNIT, 1, 1, 4, kv_bytes_per_token=-1e6,
                                            link_bandwidth=1e9), ValueError, "kv_bytes_per_token"),
]


@pytest.mark.parametrize("what,call,exc,words", SPECIFIC, ids=[s[0] for s in SPECIFIC])
def test_issue_12_cases_are_refused(what, call, exc, words):
    with pytest.raises(exc) as e:
        _timed(lambda: call(), {}, ())
    assert words in str(e.value), f"{what}: {e.value}"


def test_registry_names_accepted_where_specs_are():
    spec = models.get("llama2-7b")
    assert roofline.attention_decode("llama2-7b", 4096) == roofline.attention_decode(spec, 4096)
    from utils import inference_cost
    assert inference_cost.step_time(roofline.KernelCost(1e12, 1e9), "H100") == \
        inference_cost.step_time(roofline.KernelCost(1e12, 1e9), hardware.get("H100"))


def test_comm_per_step_agrees_with_memory_on_tp():
    from utils import memory, parallelism
    for tp in (1, 2, 4, 8, 3, 5):
        refused = []
        for f in (lambda: memory.training_bytes_per_device("llama2-7b", 4096, 1, tp=tp),
                  lambda: parallelism.comm_per_step("llama2-7b", 4096, 1, 8, tp=tp)):
            try:
                f()
                refused.append(False)
            except ValueError:
                refused.append(True)
        assert refused[0] == refused[1] == (32 % tp != 0), (tp, refused)


def test_sweep_catches_a_silent_function(monkeypatch):
    """The sweep itself can fail: a function that answers NaN is reported."""
    monkeypatch.setitem(SWEEP, "hardware.attainable_flops", SWEEP["hardware.attainable_flops"])
    monkeypatch.setattr(hardware, "attainable_flops",
                        lambda intensity, peak_flops, bandwidth: min(peak_flops, intensity * bandwidth))
    problems = sweep_one("hardware.attainable_flops")
    assert any("intensity=nan: returned without an error" in p for p in problems)
    assert any("does not name" in p for p in problems)     # "3" * 1e12 fails without a name


def test_sweep_catches_a_hang():
    import time as _time

    def spins(fn, min_run_time=None):
        while True:
            _time.sleep(0.01)
    global TIME_LIMIT
    old, TIME_LIMIT = TIME_LIMIT, 0.2
    try:
        with pytest.raises(Hang):
            _timed(spins, {"fn": None}, ())
    finally:
        TIME_LIMIT = old
