"""Lab 23's checkers pass right answers, fail planted bugs, and refuse the library's own code.

The right answers below are written the way the lab asks; each wrong one carries one bug.
"""
import math

import pytest

from utils import economics as econ
from utils import inference_cost as ic
from utils.checks import ExerciseFailed, LibraryAnswer
from utils.checks import ch23 as check
from utils.serving import Completion


# ----------------------------------------------------------------------------- right answers

def serving_cost(model, gpu, precision, batch, context, prompt_len, n_gpus, usd_per_gpu_hour,
                 bug=None):
    if precision not in econ.PRECISIONS:
        raise ValueError(f"precision {precision!r}")
    if not (isinstance(usd_per_gpu_hour, (int, float)) and math.isfinite(usd_per_gpu_hour)
            and usd_per_gpu_hour >= 0) and bug != "no_price_check":
        raise ValueError(f"usd_per_gpu_hour {usd_per_gpu_hour!r}")
    nbytes, dtype = econ.PRECISIONS[precision]
    tpot = ic.step_time(ic.decode_cost(model, batch, context, nbytes), gpu, dtype, n_gpus)
    ttft = ic.step_time(ic.prefill_cost(model, 1, prompt_len, nbytes), gpu, dtype, n_gpus)
    out = (1 if bug == "one_token_per_step" else batch) / tpot
    inp = prompt_len / ttft
    usd_s = (1 if bug == "one_gpu_price" else n_gpus) * usd_per_gpu_hour / 3600
    return {"tpot": tpot, "ttft": ttft, "output_tokens_per_s": out / n_gpus,
            "input_tokens_per_s": inp / n_gpus, "usd_per_m_output": usd_s / out * 1e6,
            "usd_per_m_input": usd_s / inp * 1e6}


def deepseek_ledger(inputs, bug=None):
    v = inputs
    if v["cache_hit_tokens"] > v["input_tokens"]:
        raise ValueError("cache_hit_tokens > input_tokens")
    if any(v[k] < 0 for k in ("usd_per_gpu_hour", "usd_per_m_cache_hit", "usd_per_m_cache_miss",
                              "usd_per_m_output")):
        raise ValueError("negative price")
    gpn = 1 if bug == "per_node_price" else v["gpus_per_node"]
    gpu_hours = v["average_nodes"] * gpn * v["hours"]
    cost = gpu_hours * v["usd_per_gpu_hour"]
    miss = v["input_tokens"] if bug == "all_miss" else v["input_tokens"] - v["cache_hit_tokens"]
    revenue = (v["cache_hit_tokens"] * v["usd_per_m_cache_hit"] + miss * v["usd_per_m_cache_miss"]
               + v["output_tokens"] * v["usd_per_m_output"]) / 1e6
    margin = revenue / cost if bug == "ratio_margin" else (revenue - cost) / cost
    pre = v["input_tokens"] / v["prefill_tokens_per_s_per_node"] / 3600
    dec = v["output_tokens"] / v["decode_tokens_per_s_per_node"] / 3600
    node_usd = v["gpus_per_node"] * v["usd_per_gpu_hour"]
    return {"gpu_hours": gpu_hours, "cost": cost, "revenue": revenue, "margin": margin,
            "prefill_node_hours": pre, "decode_node_hours": dec,
            "accounted_fraction": (pre + dec) / (v["average_nodes"] * v["hours"]),
            "usd_per_m_input": pre * node_usd / v["input_tokens"] * 1e6,
            "usd_per_m_output": dec * node_usd / v["output_tokens"] * 1e6}


def pareto_front(points, bug=None):
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front, best = [], math.inf
    for i in order:
        c = points[i][1]
        if (c <= best) if bug == "keep_ties" else (c < best):
            front.append(i)
            best = min(best, c)
    if bug == "index_order":
        front.sort()
    return front


def search_configs(model, options, tpot_slo, ttft_slo, context, prompt_len, bug=None):
    rows = []
    for i, o in enumerate(options):
        c = serving_cost(model, o["gpu"], o["precision"], o["batch"], context, prompt_len,
                         o["n_gpus"], o["usd_per_gpu_hour"])
        nbytes = econ.PRECISIONS[o["precision"]][0]
        fits = o["batch"] <= ic.max_decode_batch(model, o["gpu"], context, o["n_gpus"], nbytes)
        meets = (c["tpot"] < tpot_slo) if bug == "strict" else (c["tpot"] <= tpot_slo)
        if (fits or bug == "no_memory") and meets and c["ttft"] <= ttft_slo:
            rows.append((c["usd_per_m_input"] if bug == "input_cost" else c["usd_per_m_output"],
                         c["tpot"], i, {**o, **c}))
    rows.sort(key=lambda r: r[:3])
    return [r[3] for r in rows]


def measured_usd_per_mtok(completions, usd_per_hour, bug=None):
    if usd_per_hour < 0:
        raise ValueError("usd_per_hour")
    items = list(completions.values()) if isinstance(completions, dict) else list(completions)
    if not items:
        raise ValueError("no completions")
    tokens = sum(len(c.times) for c in items)
    start = min(c.times[0] for c in items) if bug == "from_first_token" else min(c.arrival for c in items)
    span = max(c.times[-1] for c in items) - start
    return usd_per_hour / 3600 / (tokens / span) * 1e6


def test_right_answers_pass(capsys):
    check.serving_cost(serving_cost)
    check.deepseek_ledger(deepseek_ledger)
    check.pareto_front(pareto_front)
    check.search_configs(search_configs)
    check.measured_usd_per_mtok(measured_usd_per_mtok)
    assert capsys.readouterr().out.count("passed") == 5


@pytest.mark.parametrize("name, checker", [
    ("serving_cost", check.serving_cost), ("deepseek_ledger", check.deepseek_ledger),
    ("pareto_front", check.pareto_front), ("search_configs", check.search_configs),
    ("measured_usd_per_mtok", check.measured_usd_per_mtok)])
def test_library_reference_is_refused(name, checker):
    with pytest.raises(LibraryAnswer):
        checker(getattr(econ, name))


def test_a_function_that_calls_the_library_is_refused():
    def serving_cost(*args):
        return econ.serving_cost(*args)
    with pytest.raises(LibraryAnswer):
        check.serving_cost(serving_cost)


def _with(bug, fn):
    return lambda *a: fn(*a, bug=bug)


@pytest.mark.parametrize("bug, match", [("one_token_per_step", "output_tokens_per_s"),
                                        ("one_gpu_price", "usd_per_m_output"),
                                        ("no_price_check", "negative price")])
def test_serving_cost_bugs_fail(bug, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.serving_cost(_with(bug, serving_cost))


@pytest.mark.parametrize("bug, match", [("per_node_price", "gpu_hours"), ("all_miss", "revenue"),
                                        ("ratio_margin", "margin")])
def test_ledger_bugs_fail(bug, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.deepseek_ledger(_with(bug, deepseek_ledger))


@pytest.mark.parametrize("bug", ["keep_ties", "index_order"])
def test_pareto_bugs_fail(bug):
    with pytest.raises(ExerciseFailed, match="pareto_front"):
        check.pareto_front(_with(bug, pareto_front))


def test_pareto_maximizing_fails():
    def wrong(points):
        return pareto_front([(-a, -b) for a, b in points])
    with pytest.raises(ExerciseFailed):
        check.pareto_front(wrong)


@pytest.mark.parametrize("bug, match", [("no_memory", "wrong options"), ("strict", "wrong options"),
                                        ("input_cost", "order")])
def test_search_bugs_fail(bug, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.search_configs(_with(bug, search_configs))


def test_measured_from_first_token_fails():
    with pytest.raises(ExerciseFailed, match="measured_usd_per_mtok"):
        check.measured_usd_per_mtok(_with("from_first_token", measured_usd_per_mtok))


def _run(scale):
    return [Completion(i, 0.1 * i, [0] * 3, [0.1 * i + scale * k for k in (1, 2, 3)]) for i in range(5)]


def test_measurement_far_from_model_warns_but_passes(capsys):
    check.measured_usd_per_mtok(measured_usd_per_mtok, measured=_run(1.0), predicted=_run(0.1),
                                usd_per_hour=0.1)
    out = capsys.readouterr().out
    assert "passed" in out and "⚠ measurement" in out


def test_measurement_close_to_model_does_not_warn(capsys):
    check.measured_usd_per_mtok(measured_usd_per_mtok, measured=_run(0.11), predicted=_run(0.1),
                                usd_per_hour=0.1)
    out = capsys.readouterr().out
    assert "passed" in out and "⚠" not in out
