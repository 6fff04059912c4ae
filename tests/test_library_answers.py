"""Every lab's checkers refuse the course library's own reference as an answer.

For each exercise whose mechanism the library implements (for the chapters' own use),
handing the library's object to the check cell must end as ``LibraryAnswer``, and the
same call with refusal switched off must pass: the refusal, not a wrong answer, is what
stops it. The generic rules (subclasses, wrappers, partials) are tested in test_checks.py.
"""
from __future__ import annotations

import importlib

import pytest

from utils.checks import LibraryAnswer, allow_library_answers

# (lab, exercise, the library objects a learner could import and hand over)
CASES = [
    ("ch01", "tiled_matmul", ["utils.tiling.tiled_matmul"]),
    ("ch01", "best_tile", ["utils.tiling.best_tile"]),
    ("ch01", "flash_attention", ["utils.tiling.flash_attention"]),
    ("ch01", "cache_levels", ["utils.tiling.cache_levels"]),
    ("ch01", "plateaus", ["utils.tiling.plateaus"]),
    ("ch02", "interface_bandwidth", ["utils.memtech.interface_bandwidth"]),
    ("ch02", "implied_pin_rate", ["utils.memtech.implied_pin_rate"]),
    ("ch02", "decode_ceiling", ["utils.memtech.decode_ceiling"]),
    ("ch04", "build_chain", ["utils.hostmem.build_chain"]),
    ("ch04", "chase", ["utils.hostmem.chase"]),
    ("ch04", "prefetch_loader", ["utils.hostmem.prefetch_loader"]),
    ("ch04", "count_faults", ["utils.hostmem.count_faults"]),
    ("ch04", "numa_topology", ["utils.hostmem.numa_topology"]),
    ("ch05", "round_size", ["utils.allocator.round_size"]),
    ("ch05", "segment_size", ["utils.allocator.segment_size"]),
    ("ch05", "caching_allocator", ["utils.allocator.CachingAllocator"]),
    ("ch06", "transfer_time", ["utils.topology.transfer_time"]),
    ("ch06", "max_min_fair", ["utils.topology.max_min_fair"]),
    ("ch07", "dgx_graph", ["utils.dgx.dgx_graph"]),
    ("ch07", "ring_busbw", ["utils.dgx.ring_busbw"]),
    ("ch07", "double_binary_tree", ["utils.dgx.double_binary_tree"]),
    ("ch07", "tree_busbw", ["utils.dgx.tree_busbw"]),
    ("ch07", "power_plan", ["utils.dgx.power_plan"]),
    ("ch07", "fabric_size", ["utils.dgx.fabric_size"]),
    ("ch08", "fat_tree", ["utils.topology.fat_tree"]),
    ("ch08", "bisection_bandwidth", ["utils.topology.bisection_bandwidth"]),
    ("ch08", "simulate_flows", ["utils.netsim.simulate_flows"]),
    ("ch08", "pair_bandwidths", ["utils.netsim.pair_bandwidths"]),
    ("ch08", "ring_allreduce_time", ["utils.netsim.ring_allreduce_time"]),
    ("ch10", "checkpoint_seconds", ["utils.storage.write_seconds"]),
    ("ch10", "write_shards", ["utils.storage.write_shards"]),
    ("ch10", "read_shard", ["utils.storage.read_shard"]),
    ("ch10", "shard_stream", ["utils.storage.shard_stream"]),
    ("ch10", "resumable_stream", ["utils.storage.ShardStream"]),
    ("ch10", "async_checkpoint", ["utils.storage.AsyncCheckpointer", "utils.storage.restore"]),
    ("ch21", "count_ops", ["utils.compilation.count_ops"]),
    ("ch21", "fuse_sibling_linears", ["utils.compilation.fuse_sibling_linears"]),
    ("ch21", "autotuner", ["utils.compilation.Autotuner"]),
    ("ch21", "percentile_amax", ["utils.compilation.percentile_amax"]),
    ("ch21", "entropy_amax", ["utils.compilation.entropy_amax"]),
    ("ch22", "pack_q4_k", ["utils.edge.pack_q4_k"]),
    ("ch03", "attainable", ["utils.roofline.attainable"]),
    ("ch11", "param_count", ["utils.memory.param_count"]),
    ("ch11", "zero_bytes_per_device", ["utils.memory.zero_bytes_per_device"]),
    ("ch11", "activation_bytes_per_layer", ["utils.memory.activation_bytes_per_layer"]),
    ("ch11", "kv_cache_bytes_per_token", ["utils.memory.kv_cache_bytes_per_token"]),
    ("ch12", "saved_bytes", ["utils.recompute.saved_bytes"]),
    ("ch12", "checkpoint_segments", ["utils.recompute.checkpoint_segments"]),
    ("ch13", "pipeline_orders", ["utils.parallelism.pipeline_orders"]),
    ("ch13", "assign_slots", ["utils.parallelism.assign_slots"]),
    ("ch13", "bubble_fraction", ["utils.parallelism.bubble_fraction"]),
    ("ch13", "comm_counter", ["utils.collectives.CommCounter"]),
    ("ch15", "checkpoint_io", ["utils.reliability.save_checkpoint",
                               "utils.reliability.load_checkpoint"]),
    ("ch15", "find_stragglers", ["utils.reliability.find_stragglers"]),
    ("ch16", "prefill_cost", ["utils.inference_cost.prefill_cost"]),
    ("ch16", "decode_cost", ["utils.inference_cost.decode_cost"]),
    ("ch17", "block_allocator", ["utils.paged_kv.BlockAllocator"]),
    ("ch17", "block_manager", ["utils.paged_kv.BlockManager"]),
    ("ch17", "paged_attention", ["utils.paged_kv.paged_attention"]),
    ("ch18", "summarize", ["utils.serving.summarize"]),
    ("ch18", "next_batch", ["utils.serving.next_batch"]),
    ("ch18", "serve_batched", ["utils.serving.serve_batched"]),
    ("ch18", "chunk_plan", ["utils.serving.chunk_plan"]),
    ("ch18", "serve_continuous", ["utils.serving.serve_continuous"]),
    ("ch18", "goodput", ["utils.serving.goodput"]),
    ("ch19", "accept_reject", ["utils.speculative.acceptance_probability",
                               "utils.speculative.residual",
                               "utils.speculative.accept_or_resample"]),
    ("ch19", "speedup_formula", ["utils.speculative.speedup", "utils.speculative.optimal_gamma"]),
    ("ch19", "prompt_lookup", ["utils.speculative.lookup_draft",
                               "utils.speculative.prompt_lookup_generate"]),
    ("ch20", "int8_quantize", ["utils.quant.int8_quantize"]),
    ("ch20", "fp8_round", ["utils.quant.fp8_round"]),
    ("ch20", "nf4_codebook", ["utils.quant.nf4_codebook"]),
    ("ch20", "nf4_quantize", ["utils.quant.nf4_quantize"]),
    ("ch20", "llm_int8_matmul", ["utils.quant.llm_int8_matmul"]),
    ("ch20", "gptq_quantize", ["utils.quant.gptq_quantize"]),
    ("ch23", "serving_cost", ["utils.economics.serving_cost"]),
    ("ch23", "deepseek_ledger", ["utils.economics.deepseek_ledger"]),
    ("ch23", "pareto_front", ["utils.economics.pareto_front"]),
    ("ch23", "search_configs", ["utils.economics.search_configs"]),
    ("ch23", "measured_usd_per_mtok", ["utils.economics.measured_usd_per_mtok"]),
    ("ch24", "onprem_cost_per_gpu_hour", ["utils.economics.onprem_cost_per_gpu_hour"]),
    ("ch24", "break_even_utilization", ["utils.economics.break_even_utilization"]),
    ("ch24", "spot_job_time", ["utils.economics.spot_job_time"]),
    ("ch24", "best_fit", ["utils.scheduler.best_fit"]),
    ("ch24", "validate_schedule", ["utils.scheduler.validate_schedule"]),
]

# Refusal only: slow to pass in full (statistical tests, real models), or the library's
# function has another signature than the exercise's (it takes a model spec, returns a
# KernelCost), so it would fail on its own anyway.
REFUSAL_ONLY = {("ch19", "accept_reject"), ("ch19", "prompt_lookup"), ("ch17", "paged_attention"),
                ("ch11", "param_count"), ("ch11", "zero_bytes_per_device"),
                ("ch11", "kv_cache_bytes_per_token"), ("ch13", "bubble_fraction"),
                ("ch16", "prefill_cost"), ("ch16", "decode_cost"), ("ch13", "comm_counter"),
                ("ch04", "numa_topology"), ("ch08", "fat_tree"), ("ch08", "bisection_bandwidth"),
                ("ch10", "checkpoint_seconds")}


def resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("lab, exercise, references", CASES,
                         ids=[f"{lab}.{exercise}" for lab, exercise, _ in CASES])
def test_the_library_reference_is_refused(lab, exercise, references):
    checker = getattr(importlib.import_module(f"utils.checks.{lab}"), exercise)
    answers = [resolve(r) for r in references]
    with pytest.raises(LibraryAnswer) as refused:
        checker(*answers)
    assert references[0] in str(refused.value)
    assert "the course's reference" in str(refused.value)
    if (lab, exercise) in REFUSAL_ONLY:
        return
    with allow_library_answers():      # the same answer passes on its logic
        checker(*answers)


def test_every_lab_with_a_reference_is_covered():
    labs = {lab for lab, _, _ in CASES}
    assert labs >= {"ch01", "ch02", "ch03", "ch04", "ch05", "ch07", "ch08", "ch10", "ch21", "ch06", "ch15", "ch22", "ch11", "ch12", "ch13", "ch16", "ch17", "ch18", "ch19",
                    "ch20", "ch23", "ch24"}
