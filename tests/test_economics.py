"""utils.economics: cost per token, DeepSeek's ledger, TCO, checkpoint intervals, spot runs."""
import math
import random

import pytest

from utils import economics as econ
from utils import hardware, models


# ----------------------------------------------------------------------------- prices
def test_every_price_is_dated_and_sourced():
    for p in econ.PRICES.values():
        assert len(p.date) == 10 and p.date[4] == "-" and p.source and p.usd_per_hour > 0


def test_price_history_is_dated_and_in_order():
    for series in econ.PRICE_HISTORY.values():
        dates = [d for d, _, _ in series]
        assert dates == sorted(dates) and all(p > 0 and src for _, p, src in series)


def test_price_lookup_errors():
    with pytest.raises(KeyError, match="unknown price"):
        econ.price("nope")
    with pytest.raises(TypeError):
        econ.price(3)


def test_per_gpu_prices_are_the_instance_prices_over_8():
    # The registry stores per-GPU prices; the archived pages list 8-GPU instances.
    assert econ.price("aws-p5-h100").usd_per_hour == pytest.approx(98.32 / 8, abs=0.005)
    assert econ.price("aws-p5e-h200").usd_per_hour == pytest.approx(84.80 / 8, abs=0.005)
    assert econ.price("aws-p4de-a100").usd_per_hour == pytest.approx(40.96 / 8, abs=0.005)


# ----------------------------------------------------------------------------- serving cost
def test_serving_cost_batch_one_is_weight_streaming():
    """At batch 1 a 7B decode step is memory-bound: weights + KV over HBM bandwidth."""
    m, g = models.get("llama2-7b"), hardware.get("H100-SXM")
    ctx = 1024
    weights = m.matmul_params() * 2
    kv = m.n_layers * (2 * ctx * m.kv_dim + 2 * m.hidden) * 2
    c = econ.serving_cost("llama2-7b", "H100-SXM", "bf16", 1, ctx, 512, 1, 3600.0)
    assert c["tpot"] == pytest.approx((weights + kv) / g.memory_bandwidth, rel=1e-12)
    # $1 per GPU-second: $/Mtok output = 1e6 x seconds per token
    assert c["usd_per_m_output"] == pytest.approx(1e6 * c["tpot"], rel=1e-12)


def test_serving_cost_prices_every_gpu():
    one = econ.serving_cost("llama3-70b", "H100-SXM", "fp8", 32, 2048, 1024, 4, 2.0)
    assert one["usd_per_m_output"] == pytest.approx(4 * 2.0 / 3600 / (32 / one["tpot"]) * 1e6)
    assert one["output_tokens_per_s"] == pytest.approx(32 / one["tpot"] / 4)


def test_serving_cost_fp8_is_cheaper_and_fits_more():
    a = econ.serving_cost("llama3-70b", "H100-SXM", "bf16", 64, 2048, 1024, 4, 2.0)
    b = econ.serving_cost("llama3-70b", "H100-SXM", "fp8", 64, 2048, 1024, 4, 2.0)
    assert b["usd_per_m_output"] < a["usd_per_m_output"] and b["max_batch"] > a["max_batch"]


@pytest.mark.parametrize("kw, err, match", [
    ({"usd_per_gpu_hour": -1.0}, ValueError, "usd_per_gpu_hour"),
    ({"usd_per_gpu_hour": float("nan")}, ValueError, "usd_per_gpu_hour"),
    ({"precision": "int3"}, ValueError, "precision"),
    ({"batch": 0}, ValueError, "batch"),
    ({"n_gpus": 1.5}, TypeError, "n_gpus"),
    ({"efficiency": 1.5}, ValueError, "efficiency"),
    ({"gpu": "TPU9"}, KeyError, "unknown GPU"),
])
def test_serving_cost_bad_input(kw, err, match):
    args = dict(model="llama2-7b", gpu="H100-SXM", precision="bf16", batch=4, context=512,
                prompt_len=512, n_gpus=1, usd_per_gpu_hour=2.0)
    args.update(kw)
    with pytest.raises(err, match=match):
        econ.serving_cost(**args)


def test_search_rows_meet_targets_and_are_sorted():
    opts = [{"gpu": g, "precision": p, "n_gpus": n, "batch": b, "usd_per_gpu_hour": 3.0}
            for g in ("H100-SXM", "H200") for p in ("bf16", "fp8") for n in (1, 2, 4, 8)
            for b in (1, 16, 64, 256)]
    rows = econ.search_configs("llama3-70b", opts, 0.05, 1.0, 2048, 2048)
    assert rows
    assert all(r["fits"] and r["tpot"] <= 0.05 and r["ttft"] <= 1.0 for r in rows)
    costs = [r["usd_per_m_output"] for r in rows]
    assert costs == sorted(costs)
    # nothing left out: every option that meets the targets is a row
    kept = {(r["gpu"], r["precision"], r["n_gpus"], r["batch"]) for r in rows}
    for o in opts:
        c = econ.serving_cost("llama3-70b", o["gpu"], o["precision"], o["batch"], 2048, 2048,
                              o["n_gpus"], 3.0)
        ok = c["fits"] and c["tpot"] <= 0.05 and c["ttft"] <= 1.0
        assert ok == ((o["gpu"], o["precision"], o["n_gpus"], o["batch"]) in kept)


def test_search_bad_option():
    with pytest.raises(ValueError, match="lacks"):
        econ.search_configs("llama2-7b", [{"gpu": "H100-SXM"}], 0.05, 1.0)
    with pytest.raises(ValueError, match="tpot_slo"):
        econ.search_configs("llama2-7b", [], 0.0, 1.0)


def test_pareto_front_against_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        pts = [(rng.randint(0, 6), rng.randint(0, 6)) for _ in range(rng.randint(0, 12))]
        front = econ.pareto_front(pts)
        for i, (a, b) in enumerate(pts):
            beaten = any((c <= a and d <= b and (c, d) != (a, b)) or ((c, d) == (a, b) and j < i)
                         for j, (c, d) in enumerate(pts) if j != i)
            assert (i in front) == (not beaten)
        assert [pts[i][0] for i in front] == sorted(pts[i][0] for i in front)


def test_pareto_front_bad_input():
    with pytest.raises(TypeError):
        econ.pareto_front([(1.0, 2.0, 3.0)])
    with pytest.raises(ValueError, match="finite"):
        econ.pareto_front([(1.0, float("inf"))])


# ----------------------------------------------------------------------------- DeepSeek
def test_deepseek_ledger_reproduces_the_published_figures():
    d = econ.DEEPSEEK_DAY6
    led = econ.deepseek_ledger()
    assert led["cost"] == d["published_daily_cost"] == 226.75 * 8 * 24 * 2
    # token counts are printed rounded to 1B, so revenue matches to about 0.02%
    assert led["revenue"] == pytest.approx(d["published_revenue"], rel=2e-4)
    assert round(led["margin"] * 100) == 546 and int(led["margin"] * 100) == 545
    # the published per-node throughputs account for the whole average fleet
    assert led["accounted_fraction"] == pytest.approx(1.0, abs=0.002)


def test_deepseek_ledger_bad_input():
    d = dict(econ.DEEPSEEK_DAY6)
    with pytest.raises(ValueError, match="cache_hit_tokens"):
        econ.deepseek_ledger({**d, "cache_hit_tokens": 1e12})
    with pytest.raises(ValueError, match="usd_per_gpu_hour"):
        econ.deepseek_ledger({**d, "usd_per_gpu_hour": -2})
    with pytest.raises(ValueError, match="lacks"):
        econ.deepseek_ledger({"hours": 24})
    with pytest.raises(TypeError):
        econ.deepseek_ledger([1, 2])


def test_measured_usd_per_mtok():
    from utils.serving import Completion
    comps = [Completion(0, 0.0, [0, 0], [0.5, 1.0]), Completion(1, 0.5, [0, 0], [1.5, 2.0])]
    # 4 tokens in 2 s = 2 tok/s; $3.6/h = $0.001/s -> $500 per M tokens
    assert econ.measured_usd_per_mtok(comps, 3.6) == pytest.approx(500.0)
    with pytest.raises(ValueError):
        econ.measured_usd_per_mtok([], 1.0)
    with pytest.raises(ValueError, match="usd_per_hour"):
        econ.measured_usd_per_mtok(comps, -1.0)


# ----------------------------------------------------------------------------- TCO
def test_worked_dgx_h100_by_hand():
    c = econ.onprem_cost_per_gpu_hour(econ.DGX_H100_WORKED)
    assert c["capex"] == pytest.approx(270_000 / 0.81 / 8 / (5 * 365.25 * 24), rel=1e-12)
    assert c["power"] == pytest.approx(10.2 * 0.75 * 1.25 / 8 * 0.0826, rel=1e-12)
    assert c["total"] == pytest.approx(1.0494, abs=1e-4)
    assert econ.break_even_utilization(econ.DGX_H100_WORKED, 12.29) == pytest.approx(c["total"] / 12.29)
    assert econ.cost_per_used_gpu_hour(econ.DGX_H100_WORKED, 0.5) == pytest.approx(2 * c["total"])


@pytest.mark.parametrize("field, value", [("server_usd", -1.0), ("pue", 0.9), ("power_fraction", 1.2),
                                          ("network_fraction", 1.0), ("lifetime_years", 0),
                                          ("usd_per_kwh", float("nan"))])
def test_onprem_config_bad_input(field, value):
    from dataclasses import replace
    with pytest.raises(ValueError, match=field):
        replace(econ.DGX_H100_WORKED, **{field: value})


def test_utilization_above_one_is_refused():
    with pytest.raises(ValueError, match="utilization"):
        econ.cost_per_used_gpu_hour(econ.DGX_H100_WORKED, 1.2)
    with pytest.raises(ValueError, match="utilization"):
        econ.cost_per_used_gpu_hour(econ.DGX_H100_WORKED, 0.0)
    with pytest.raises(ValueError, match="cloud_usd_per_gpu_hour"):
        econ.break_even_utilization(econ.DGX_H100_WORKED, -3.0)


def test_tornado_sorts_by_swing():
    rows = econ.tornado(lambda p: p["a"] * 2 + p["b"], {"a": 1.0, "b": 1.0, "c": 5.0},
                        {"b": (0.0, 1.0), "a": (0.0, 2.0)})
    assert rows == [("a", 1.0, 5.0), ("b", 2.0, 3.0)]
    with pytest.raises(ValueError, match="not in base"):
        econ.tornado(lambda p: 0.0, {"a": 1}, {"z": (0, 1)})


# ----------------------------------------------------------------------------- spot
def test_young_and_daly():
    assert econ.young_interval(300, 14400) == pytest.approx(math.sqrt(2 * 300 * 14400))
    # Daly tends to Young - delta when the checkpoint is cheap next to the MTBF
    d, m = 1.0, 1e6
    assert econ.daly_interval(d, m) == pytest.approx(math.sqrt(2 * d * m) - d, rel=1e-3)
    assert econ.daly_interval(500, 200) == 200                 # delta >= 2M: checkpoint every M
    with pytest.raises(ValueError, match="mtbf_seconds"):
        econ.young_interval(300, 0)
    with pytest.raises(ValueError, match="checkpoint_seconds"):
        econ.daly_interval(-1, 100)


def test_spot_job_time_by_hand():
    assert econ.spot_job_time(100, 30, 5, 10, []) == (100 + 3 * 5, 0)
    # hit at 40 during piece 2 (35..70): resume at 50; 45 falls in the restart; 200 after the end
    assert econ.spot_job_time(100, 30, 5, 10, [40, 45, 200]) == (130.0, 1)
    # a preemption exactly at a checkpoint's completion finds it complete: only the restart is lost
    assert econ.spot_job_time(60, 30, 5, 10, [35]) == (35 + 10 + 30, 1)
    # during the checkpoint of piece 1: the piece is lost
    assert econ.spot_job_time(60, 30, 5, 10, [33]) == (33 + 10 + 35 + 30, 1)
    with pytest.raises(ValueError, match="increasing"):
        econ.spot_job_time(10, 5, 1, 1, [3, 2])
    with pytest.raises(ValueError, match="work_seconds"):
        econ.spot_job_time(0, 5, 1, 1, [])


def test_young_interval_is_near_the_simulated_optimum():
    work, delta, restart, m = 12 * 3600, 300.0, 600.0, 3 * 3600.0
    tau = econ.young_interval(delta, m)

    def mean_time(interval):
        runs = econ.spot_monte_carlo(work, interval, delta, restart, m, n_trials=300, seed=1)
        return sum(t for t, _ in runs) / len(runs)

    at = mean_time(tau)
    assert at < mean_time(tau / 5) and at < mean_time(tau * 5)


def test_spot_monte_carlo_is_seeded():
    a = econ.spot_monte_carlo(3600, 600, 30, 60, 1800, n_trials=20, seed=3)
    assert a == econ.spot_monte_carlo(3600, 600, 30, 60, 1800, n_trials=20, seed=3)
    with pytest.raises(ValueError, match="mean_seconds_between_preemptions"):
        econ.spot_monte_carlo(3600, 600, 30, 60, 0)
