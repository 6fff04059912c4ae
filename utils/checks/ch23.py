"""Checkers for lab 23, inference economics.

The oracles: the course's roofline step-time model (:mod:`utils.inference_cost`), through
:func:`utils.economics.serving_cost`, for the cost model; DeepSeek's published inputs and
results (:data:`utils.economics.DEEPSEEK_DAY6`) for the ledger; a brute-force dominance
test written here for the Pareto front; and the rules the lab states, recomputed here, for
the search and the measured cost.
"""
from __future__ import annotations

import math
import numbers
import random
from typing import Mapping

from .. import economics as econ
from .. import inference_cost as ic
from . import (describe, exercise, expect_close, expect_equal, expect_raises, expect_type, fail,
               measurement_warning)

_COST_KEYS = ("tpot", "ttft", "output_tokens_per_s", "input_tokens_per_s", "usd_per_m_output",
              "usd_per_m_input")


def _dict_with(got, keys, what, hint):
    expect_type(got, dict, what, hint="return a dict")
    missing = [k for k in keys if k not in got]
    if missing:
        fail(f"{what} is missing keys", f"keys {list(keys)}", f"no {missing}", hint)
    return got


# ----------------------------------------------------------------------------- exercise 1
@exercise
def serving_cost(fn):
    """``fn(model, gpu, precision, batch, context, prompt_len, n_gpus, usd_per_gpu_hour)``."""
    cases = [("llama2-7b", "H100-SXM", "bf16", 1, 1024, 1024, 1, 12.29),
             ("llama2-7b", "H100-SXM", "bf16", 64, 1024, 1024, 1, 12.29),
             ("llama3-70b", "H100-SXM", "fp8", 32, 4096, 2048, 4, 4.86),
             ("llama3-70b", "H200", "bf16", 128, 2048, 512, 8, 10.60),
             ("llama3-8b", "A100-SXM-80GB", "fp16", 16, 8192, 4096, 2, 1.81)]
    hints = {"tpot": "one decode step: step_time(decode_cost(model, batch, context, bytes), gpu, "
                     "dtype, n_gpus)",
             "ttft": "one prefill of one prompt: step_time(prefill_cost(model, 1, prompt_len, "
                     "bytes), gpu, dtype, n_gpus)",
             "output_tokens_per_s": "a decode step yields `batch` tokens; per GPU: divide by n_gpus",
             "input_tokens_per_s": "a prefill step consumes `prompt_len` tokens; per GPU: divide "
                                   "by n_gpus",
             "usd_per_m_output": "dollars per second of all n_gpus GPUs / output tokens per second "
                                 "of the whole group x 1e6",
             "usd_per_m_input": "dollars per second of all n_gpus GPUs / input tokens per second "
                                "of the whole group x 1e6"}
    for args in cases:
        what = "serving_cost(" + ", ".join(map(repr, args)) + ")"
        got = _dict_with(fn(*args), _COST_KEYS, what, "return tpot, ttft, output_tokens_per_s, "
                         "input_tokens_per_s, usd_per_m_output, usd_per_m_input")
        want = econ.serving_cost(*args)
        for k in _COST_KEYS:
            expect_close(got[k], want[k], rtol=1e-6, atol=0.0, what=f"{what}[{k!r}]", hint=hints[k])
    good = ("llama2-7b", "H100-SXM", "bf16", 8, 1024, 1024, 1, 2.0)
    for i, bad, label in [(7, -1.0, "a negative price"), (2, "int3", "an unknown precision"),
                          (3, 0, "batch 0"), (7, float("nan"), "a NaN price")]:
        args = list(good)
        args[i] = bad
        expect_raises(lambda: fn(*args), (ValueError, TypeError), f"serving_cost with {label}",
                "a ValueError (or TypeError) naming the argument",
                "check the arguments first: precision in economics.PRECISIONS, counts >= 1, "
                "a finite price >= 0")
    return "tokens/s and $/Mtok for input and output on 5 configurations; bad input refused"


# ----------------------------------------------------------------------------- exercise 2
_LEDGER_KEYS = ("gpu_hours", "cost", "revenue", "margin", "prefill_node_hours", "decode_node_hours",
                "accounted_fraction", "usd_per_m_input", "usd_per_m_output")


@exercise
def deepseek_ledger(fn):
    """``fn(inputs)`` -> the day's ledger (dict), from DeepSeek's published inputs."""
    base = dict(econ.DEEPSEEK_DAY6)
    variants = [("DeepSeek's published day", base),
                ("a day with fewer cache hits and dearer GPUs",
                 {**base, "cache_hit_tokens": 100e9, "usd_per_gpu_hour": 3.5}),
                ("a smaller fleet with 4 GPUs per node",
                 {**base, "average_nodes": 50.0, "gpus_per_node": 4, "hours": 12.0,
                  "output_tokens": 20e9, "input_tokens": 70e9, "cache_hit_tokens": 35e9})]
    hints = {"gpu_hours": "average nodes x GPUs per node x hours",
             "cost": "GPU-hours x dollars per GPU-hour",
             "revenue": "cache hits at the hit price, the other input tokens (input - hits) at the "
                        "miss price, output at the output price; prices are per million tokens",
             "margin": "(revenue - cost) / cost: 5.45 means 545%",
             "prefill_node_hours": "input tokens / (prefill tokens per second per node) / 3600",
             "decode_node_hours": "output tokens / (decode tokens per second per node) / 3600",
             "accounted_fraction": "(prefill + decode node-hours) / (average nodes x hours)",
             "usd_per_m_input": "prefill node-hours x (GPUs per node x $/GPU-hour) / input tokens x 1e6",
             "usd_per_m_output": "decode node-hours x (GPUs per node x $/GPU-hour) / output tokens x 1e6"}
    for label, inputs in variants:
        what = f"deepseek_ledger({label})"
        got = _dict_with(fn(dict(inputs)), _LEDGER_KEYS, what, f"return the keys {list(_LEDGER_KEYS)}")
        want = econ.deepseek_ledger(inputs)
        for k in _LEDGER_KEYS:
            expect_close(got[k], want[k], rtol=1e-9, atol=0.0, what=f"{what}[{k!r}]", hint=hints[k])
    got = fn(dict(base))
    expect_close(got["cost"], base["published_daily_cost"], rtol=1e-9, atol=0.0,
                 what="the daily cost against DeepSeek's published $87,072")
    expect_close(got["revenue"], base["published_revenue"], rtol=1e-3, atol=0.0,
                 what="the revenue against DeepSeek's published $562,027 (token counts are rounded "
                      "to 1B in the post)")
    expect_close(got["margin"], base["published_margin"], rtol=2e-3, atol=0.0,
                 what="the margin against DeepSeek's published 545%")
    expect_raises(lambda: fn({**base, "cache_hit_tokens": 700e9}), (ValueError,),
            "deepseek_ledger with more cache hits than input tokens", "a ValueError",
            "cache_hit_tokens cannot exceed input_tokens")
    expect_raises(lambda: fn({**base, "usd_per_gpu_hour": -2.0}), (ValueError,),
            "deepseek_ledger with a negative price", "a ValueError", "prices must be >= 0")
    return (f"cost ${got['cost']:,.0f}, revenue ${got['revenue']:,.0f}, margin {got['margin']:.0%} "
            f"(published $87,072, $562,027, 545%); 3 days")


# ----------------------------------------------------------------------------- exercise 3
def _front_brute(points):
    """Non-dominated points, first of duplicates, by increasing latency (then index)."""
    keep = []
    for i, (a, b) in enumerate(points):
        dominated = any((c <= a and d <= b and (c < a or d < b)) or ((c, d) == (a, b) and j < i)
                        for j, (c, d) in enumerate(points) if j != i)
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: (points[i][0], i))


@exercise
def pareto_front(fn):
    """``fn(points)`` -> indices of the (latency, cost) points on the front, by latency."""
    rng = random.Random(23)
    cases = [("three points, one dominated", [(1.0, 5.0), (2.0, 6.0), (3.0, 1.0)]),
             ("a point equal to another", [(1.0, 2.0), (1.0, 2.0), (0.5, 3.0)]),
             ("same latency, different cost", [(1.0, 3.0), (1.0, 2.0), (2.0, 1.0)]),
             ("same cost, different latency", [(2.0, 1.0), (1.0, 1.0), (0.5, 4.0)]),
             ("one point", [(0.02, 0.7)]),
             ("no points", []),
             ("60 random points", [(round(rng.uniform(0.005, 0.1), 4), round(rng.uniform(0.1, 5), 3))
                                   for _ in range(60)])]
    for label, pts in cases:
        got = fn([tuple(p) for p in pts])
        expect_type(got, list, f"pareto_front({label})", hint="return a list of indices")
        want = _front_brute(pts)
        expect_equal([int(i) if isinstance(i, numbers.Integral) else i for i in got], want,
                     what=f"pareto_front({label}) for {pts if len(pts) <= 4 else f'{len(pts)} points'}",
                     hint="both coordinates are to be minimized; a point is dominated when "
                          "another is no worse in both and better in one; keep only the first "
                          "of identical points; order by latency")
    return "the non-dominated set, in latency order, on 7 sets (ties and duplicates included)"


# ----------------------------------------------------------------------------- exercise 4
def _search_cases():
    opts = []
    for gpu, key, precs in [("H100-SXM", "gcp-a3-h100-3y", ("bf16", "fp8")),
                            ("H200", "aws-p5e-h200", ("bf16", "fp8")),
                            ("A100-SXM-80GB", "aws-p4de-a100-3y", ("bf16",))]:
        for prec in precs:
            for n in (1, 2, 4, 8):
                for b in (1, 8, 32, 128, 512):
                    opts.append({"gpu": gpu, "precision": prec, "n_gpus": n, "batch": b,
                                 "usd_per_gpu_hour": econ.price(key).usd_per_hour})
    return opts


def _row_key(r):
    return (r["gpu"], r["precision"], r["n_gpus"], r["batch"])


@exercise
def search_configs(fn):
    """``fn(model, options, tpot_slo, ttft_slo, context, prompt_len)`` -> rows, cheapest first."""
    opts = _search_cases()
    cases = [("llama3-70b", 0.050, 1.0, 2048, 2048),
             ("llama3-8b", 0.020, 0.2, 8192, 4096),
             ("llama2-13b", 0.030, 0.5, 4096, 1024)]
    # a target exactly equal to one option's TPOT: a row at the target meets it
    edge = econ.serving_cost("llama3-8b", "H200", "bf16", 32, 4096, 1024, 2, 10.60)
    cases.append(("llama3-8b", edge["tpot"], 10.0, 4096, 1024))
    for model, tpot_slo, ttft_slo, ctx, plen in cases:
        what = (f"search_configs({model!r}, {len(opts)} options, tpot_slo={tpot_slo:.4g}, "
                f"ttft_slo={ttft_slo:g}, context={ctx}, prompt_len={plen})")
        got = fn(model, [dict(o) for o in opts], tpot_slo, ttft_slo, ctx, plen)
        expect_type(got, list, what, hint="return a list of dicts")
        want = econ.search_configs(model, opts, tpot_slo, ttft_slo, ctx, plen)
        for i, r in enumerate(got):
            _dict_with(r, ("gpu", "precision", "n_gpus", "batch", "usd_per_m_output", "tpot"),
                       f"{what}[{i}]", "each row: the option's items and its cost (usd_per_m_output, tpot, ...)")
        got_keys = [_row_key(r) for r in got]
        want_keys = [_row_key(r) for r in want]
        if sorted(got_keys) != sorted(want_keys):
            extra = [k for k in got_keys if k not in want_keys][:3]
            missing = [k for k in want_keys if k not in got_keys][:3]
            hint = ("keep an option only if its batch fits in memory "
                    "(batch <= inference_cost.max_decode_batch(model, gpu, context, n_gpus, bytes)) "
                    "and tpot <= tpot_slo and ttft <= ttft_slo (a row exactly at a target meets it)")
            fail(f"{what} keeps the wrong options", f"{len(want_keys)} rows",
                 f"{len(got_keys)} rows; e.g. wrongly kept {extra}, wrongly left out {missing}", hint)
        expect_equal(got_keys, want_keys, what=f"{what}: the order of the rows",
                     hint="sort by usd_per_m_output, then tpot, then the option's position")
        for r, w in zip(got, want):
            expect_close(r["usd_per_m_output"], w["usd_per_m_output"], rtol=1e-6, atol=0.0,
                         what=f"{what}: usd_per_m_output of {_row_key(r)}")
    best = econ.search_configs(*cases[0][:1], opts, *cases[0][1:])[0]
    return (f"4 searches; Llama-3-70B at TPOT <= 50 ms: {best['n_gpus']} x {best['gpu']} "
            f"{best['precision']}, batch {best['batch']}, ${best['usd_per_m_output']:.3f}/M output tokens")


# ----------------------------------------------------------------------------- exercise 5
def _fake(rid, arrival, times):
    from ..serving import Completion
    return Completion(rid, arrival, [0] * len(times), list(times))


def _oracle_usd(comps, usd_per_hour):
    items = list(comps.values()) if isinstance(comps, Mapping) else list(comps)
    tokens = sum(len(c.times) for c in items)
    span = max(c.times[-1] for c in items) - min(c.arrival for c in items)
    return usd_per_hour / 3600 / (tokens / span) * 1e6


@exercise
def measured_usd_per_mtok(fn, measured=None, predicted=None, usd_per_hour=None):
    """``fn(completions, usd_per_hour)`` -> dollars per million output tokens of a served run.

    With ``measured`` and ``predicted`` runs (and their ``usd_per_hour``) the checker also
    compares this machine's measured cost with the model's prediction: a disagreement is a
    measurement warning, never a failure.
    """
    hand = [_fake(0, 0.0, [0.1, 0.2, 0.3]), _fake(1, 0.5, [0.9, 1.0]), _fake(2, 0.25, [1.5])]
    cases = [("3 hand-made completions (a list)", hand, 0.08925),
             ("the same as a dict", {c.rid: c for c in hand}, 0.08925),
             ("a late first arrival", [_fake(0, 10.0, [10.5, 11.0]), _fake(1, 10.2, [11.2])], 3.0)]
    for label, comps, usd in cases:
        got = fn(comps, usd)
        expect_close(got, _oracle_usd(comps, usd), rtol=1e-9, atol=0.0,
                     what=f"measured_usd_per_mtok({label}, {usd})",
                     hint="throughput = all tokens / (last token's time - first arrival); "
                          "$/Mtok = usd_per_hour / 3600 / throughput x 1e6")
    expect_raises(lambda: fn(hand, -1.0), (ValueError,), "measured_usd_per_mtok with a negative price",
            "a ValueError", "check usd_per_hour >= 0")
    expect_raises(lambda: fn([], 1.0), (ValueError,), "measured_usd_per_mtok with no completions",
            "a ValueError", "an empty run has no throughput: raise ValueError")
    detail = "throughput -> $/Mtok on 3 runs; bad input refused"
    if measured is not None and predicted is not None and usd_per_hour is not None:
        m, p = fn(measured, usd_per_hour), fn(predicted, usd_per_hour)
        detail += f"; this machine ${m:.3f}/M vs the model's ${p:.3f}/M"
        if not 0.5 <= m / p <= 2.0:
            measurement_warning(
                "the measured cost per token is far from the cost model's prediction",
                f"${p:.3f} per M output tokens (the reference CPU's step times)",
                f"${m:.3f} per M output tokens ({m / p:.2f}x)",
                "this CPU is faster or slower than the course's reference CPU, or other work "
                "was running during the measurement")
    return detail
