"""utils.serving: traces, the cost model and clock, the batcher and chunk planner, the
engines' schedules (worked out by hand with unit costs), metrics, goodput, and the
disaggregated simulation."""
import math

import pytest
import torch

from utils import hardware, memory, models, serving as sv, tiny

UNIT = sv.CostModel(decode_base=1.0, decode_per_seq=0.0, prefill_base=1.0, prefill_per_token=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")   # see tests/conftest.py


def req(rid, arrival, prompt_len, max_new):
    return sv.Request(rid, arrival, tuple(range(1, prompt_len + 1)), max_new)


def times(out):
    return {rid: c.times for rid, c in out.items()}


# --- traces ----------------------------------------------------------------------------

def test_trace_is_seeded_and_rate_only_scales_arrivals():
    a, b = sv.make_trace(50, 10.0, seed=3), sv.make_trace(50, 10.0, seed=3)
    assert a == b
    fast = sv.make_trace(50, 20.0, seed=3)
    assert [r.prompt for r in a] == [r.prompt for r in fast]
    assert [r.max_new for r in a] == [r.max_new for r in fast]
    for x, y in zip(a, fast):
        assert y.arrival == pytest.approx(x.arrival / 2, abs=2e-6)
    assert all(x.arrival <= y.arrival for x, y in zip(a, a[1:]))
    assert all(1 <= r.max_new <= 64 for r in a)
    assert sv.make_trace(50, 10.0, seed=4) != a
    assert sv.make_trace(0, 1.0) == []


def test_trace_mean_gap_is_one_over_rate():
    tr = sv.make_trace(2000, 50.0, seed=1)
    assert tr[-1].arrival / len(tr) == pytest.approx(1 / 50.0, rel=0.1)


@pytest.mark.parametrize("kw", [dict(rate=0.0), dict(rate=-1.0), dict(rate=math.inf), dict(n=-1)])
def test_trace_rejects_bad_arguments(kw):
    args = dict(n=3, rate=1.0) | kw
    with pytest.raises(ValueError):
        sv.make_trace(**args)


# --- cost model and clock ----------------------------------------------------------------

def test_cost_model_passes_and_iterations():
    c = sv.CostModel(0.5e-3, 0.25e-3, 1e-3, 0.01e-3)
    assert c.decode(4) == pytest.approx(1.5e-3)
    assert c.prefill(100) == pytest.approx(2e-3)
    assert c.iteration(4, [100, 100]) == pytest.approx(1.5e-3 + 4e-3)
    assert c.iteration(0, [50]) == pytest.approx(1.5e-3)
    f = sv.CostModel(0.5e-3, 0.25e-3, 1e-3, 0.01e-3, fused=True)
    # one pass: the larger base once, then per-sequence and per-token work
    assert f.iteration(4, [100, 100]) == pytest.approx(1e-3 + 1e-3 + 2e-3)
    assert f.iteration(4, []) == pytest.approx(1.5e-3)
    with pytest.raises(ValueError):
        c.decode(0)
    with pytest.raises(ValueError):
        c.iteration(1, [0])
    with pytest.raises(ValueError):
        sv.CostModel(-1.0, 0.0, 1.0, 0.0)


def test_fit_recovers_a_line():
    dec = [(b, 0.4e-3 + 0.1e-3 * b) for b in (1, 2, 8, 32)]
    pre = [(t, 0.7e-3 + 0.02e-3 * t) for t in (8, 64, 128)]
    c = sv.CostModel.fit(dec, pre)
    assert (c.decode_base, c.decode_per_seq) == pytest.approx((0.4e-3, 0.1e-3))
    assert (c.prefill_base, c.prefill_per_token) == pytest.approx((0.7e-3, 0.02e-3))
    with pytest.raises(ValueError):
        sv.CostModel.fit([(4, 1.0), (4, 1.1)], pre)


def test_gpu_cost_model_is_the_roofline():
    c = sv.gpu_cost_model("llama2-7b", "H100-SXM", context=1024)
    g, m = hardware.get("H100-SXM"), models.get("llama2-7b")
    assert c.decode_base == pytest.approx(m.param_count() * 2 / g.memory_bandwidth)
    assert c.decode_per_seq == pytest.approx(2 * 32 * 32 * 128 * 2 * 1024 / g.memory_bandwidth)
    assert c.prefill_per_token == pytest.approx(2 * m.param_count() / g.flops("bf16"))
    assert c.fused


def test_clock_charges_the_cost_model_and_skips_idle_time():
    clock = sv.VirtualClock(UNIT)
    with clock.iteration(decode=[1, 2], prefill=[(3, 10)]):
        pass
    assert clock.now == 2.0
    clock.advance_to(1.0)            # never backwards
    assert clock.now == 2.0
    clock.advance_to(5.0)
    assert clock.now == 5.0
    assert clock.log == [sv.Iteration(0.0, 2.0, (1, 2), ((3, 10),))]
    with pytest.raises(ValueError):
        with clock.iteration():
            pass
    wall = sv.VirtualClock(None)
    with wall.iteration(decode=[0]):
        sum(range(10000))
    assert wall.measured and wall.now > 0


# --- decisions ---------------------------------------------------------------------------

@pytest.mark.parametrize("arrivals, now, mb, delay, expected", [
    ([1.0, 2.0, 3.0, 4.0], 0.0, 3, 10.0, (3.0, 3)),     # fills first
    ([1.0, 5.0, 9.0], 0.0, 3, 2.0, (3.0, 1)),           # oldest times out at 1 + 2
    ([1.0, 2.0, 3.0, 4.0], 10.0, 3, 1.0, (10.0, 3)),    # busy server: now, full batch
    ([1.0, 2.0], 0.0, 4, math.inf, (2.0, 2)),           # end of trace
    ([1.0, 1.0, 2.0], 0.0, 4, 0.0, (1.0, 2)),           # no waiting at all
    ([0.5, 1.0, 7.0, 8.0, 9.0], 0.0, 4, math.inf, (8.0, 4)),
])
def test_next_batch(arrivals, now, mb, delay, expected):
    assert sv.next_batch(arrivals, now, mb, delay) == expected


def test_next_batch_rejects_bad_input():
    for args in (([], 0.0, 1), ([1.0], 0.0, 0), ([1.0], 0.0, 2, -1.0)):
        with pytest.raises(ValueError):
            sv.next_batch(*args)


@pytest.mark.parametrize("n_decode, remaining, budget, expected", [
    (0, [10, 20], None, [10, 20]),
    (3, [10, 20], 16, [10, 3]),
    (20, [10], 16, [0]),
    (2, [5, 5, 5], 8, [5, 1, 0]),
    (0, [], 4, []),
])
def test_chunk_plan(n_decode, remaining, budget, expected):
    assert sv.chunk_plan(n_decode, remaining, budget) == expected


def test_chunk_plan_rejects_bad_budget():
    with pytest.raises(ValueError):
        sv.chunk_plan(0, [3], 0)


# --- engines, by hand with one time unit per pass ---------------------------------------------

THREE = [req(0, 0.0, 3, 3), req(1, 0.5, 2, 2), req(2, 0.5, 1, 1)]


def test_static_schedule_by_hand():
    # launch at 0.5 with r0, r1 (full); 2 prefill passes -> 2.5; decodes at 3.5, 4.5; r2 at 5.5
    out = sv.serve_batched(None, THREE, 2, math.inf, sv.VirtualClock(UNIT))
    assert times(out) == {0: [2.5, 3.5, 4.5], 1: [2.5, 3.5], 2: [5.5]}


def test_dynamic_schedule_by_hand():
    # r0 alone times out at 0.2; prefill -> 1.2, decodes 2.2, 3.2; then r1 and r2 together
    out = sv.serve_batched(None, THREE, 2, 0.2, sv.VirtualClock(UNIT))
    assert times(out) == {0: [1.2, 2.2, 3.2], 1: [5.2, 6.2], 2: [5.2]}


def test_continuous_schedule_by_hand():
    # @0 prefill r0 -> 1; @1 admit r1 (r2 waits: 2 in flight): prefill r1 + decode r0 -> 3;
    # @3 decode both -> 4, both done; @4 admit r2, prefill -> 5
    out = sv.serve_continuous(None, THREE, 2, sv.VirtualClock(UNIT))
    assert times(out) == {0: [1.0, 3.0, 4.0], 1: [3.0, 4.0], 2: [5.0]}
    fused = sv.CostModel(1.0, 0.0, 1.0, 0.0, fused=True)   # r1's prefill shares r0's pass
    assert times(sv.serve_continuous(None, THREE, 2, sv.VirtualClock(fused))) == \
        {0: [1.0, 2.0, 3.0], 1: [2.0, 3.0], 2: [4.0]}


def test_chunked_schedule_by_hand():
    # budget 2: @0 r0 chunk 2 -> 1; @1 r0 1 + r1 1 (two passes) -> 3, r0's first token;
    # @3 decode r0 + r1's last 1 -> 5; @5 decode both -> 6; @6 r2 -> 7
    out = sv.serve_continuous(None, THREE, 2, sv.VirtualClock(UNIT), token_budget=2)
    assert times(out) == {0: [3.0, 5.0, 6.0], 1: [5.0, 6.0], 2: [7.0]}


def test_engines_reject_unsorted_requests():
    with pytest.raises(ValueError):
        sv.serve_continuous(None, THREE[::-1], 2, sv.VirtualClock(UNIT))


def test_real_engines_reproduce_generation_alone():
    model = tiny.load("tiny-target")
    trace = sv.make_trace(6, 500.0, seed=9, median_out=4, max_out=8)
    alone = {r.rid: tiny.generate(model, list(r.prompt), r.max_new) for r in trace}
    runs = [sv.serve_batched(model, trace, 3, math.inf, sv.VirtualClock(UNIT)),
            sv.serve_continuous(model, trace, 3, sv.VirtualClock(UNIT)),
            sv.serve_continuous(model, trace, 4, sv.VirtualClock(UNIT), token_budget=7)]
    for out in runs:
        assert {rid: c.tokens for rid, c in out.items()} == alone


# --- metrics ---------------------------------------------------------------------------------

def test_summarize_by_hand():
    comps = [sv.Completion(0, 0.0, [0] * 3, [1.0, 2.0, 3.0]),     # TTFT 1, TPOT 1, e2e 3
             sv.Completion(1, 1.0, [0] * 2, [4.0, 7.0]),          # TTFT 3, TPOT 3, e2e 6
             sv.Completion(2, 2.0, [0], [4.0])]                   # TTFT 2, e2e 2
    s = sv.summarize(comps)
    assert s["ttft_p50"] == pytest.approx(2.0)
    assert s["ttft_p90"] == pytest.approx(2.8)          # linear between 2 and 3 at 0.8 of the way
    assert s["tpot_p50"] == pytest.approx(2.0)          # over the two multi-token requests
    assert s["e2e_p99"] == pytest.approx(5.94)
    assert s["throughput"] == pytest.approx(6 / 7.0)
    assert (s["n_requests"], s["n_tokens"]) == (3, 6)
    assert math.isnan(sv.summarize([comps[2]])["tpot_p50"])
    with pytest.raises(ValueError):
        sv.summarize([])


def test_slo_attainment_and_goodput():
    ok = sv.Completion(0, 0.0, [0] * 3, [0.5, 1.0, 1.5])           # TTFT 0.5, TPOT 0.5
    slow_first = sv.Completion(1, 0.0, [0] * 2, [2.0, 2.5])        # TTFT 2
    one = sv.Completion(2, 0.0, [0], [0.5])                        # no TPOT
    assert sv.slo_attainment([ok, slow_first, one], 1.0, 0.5) == pytest.approx(2 / 3)
    res = {1.0: [ok, one], 2.0: [ok, slow_first, one], 3.0: [ok]}
    assert sv.goodput(res, 1.0, 0.5, goal=0.9) == 1.0          # stops at 2.0 although 3.0 meets
    assert sv.goodput(res, 1.0, 0.5, goal=0.6) == 3.0
    assert sv.goodput({1.0: [slow_first]}, 1.0, 0.5) == 0.0


# --- several instances -------------------------------------------------------------------------

def test_disaggregated_by_hand():
    cost = sv.CostModel(decode_base=1.0, decode_per_seq=0.0, prefill_base=1.0, prefill_per_token=0.5)
    reqs = [req(0, 0.0, 4, 3), req(1, 0.0, 2, 2)]
    # prefill r0: 0 -> 3, r1: 3 -> 5; KV 100 B/token over 100 B/s: r0 ready 3 + 4 = 7,
    # r1 ready 5 + 2 = 7; decodes at 8 (both), 9 (r0)
    out = sv.simulate_disaggregated(reqs, cost, 1, 1, 8, kv_bytes_per_token=100, link_bandwidth=100)
    assert times(out) == {0: [3.0, 8.0, 9.0], 1: [5.0, 8.0]}


def test_colocated_is_round_robin_continuous():
    out = sv.simulate_colocated(THREE, UNIT, 3, 4)
    # each request alone on its own instance: prefill 1 pass, then one decode per token
    assert times(out) == {0: [1.0, 2.0, 3.0], 1: [1.5, 2.5], 2: [1.5]}


def test_kv_bytes_for_the_tiny_model():
    cfg = tiny.load("tiny-target").config
    assert cfg.kv_bytes_per_token(4) == 2 * 4 * 2 * 32 * 4
    assert memory.kv_cache_bytes_per_token("llama2-70b", 2) == 327_680


def test_plot_timeline_draws():
    import matplotlib
    matplotlib.use("Agg")
    clock = sv.VirtualClock(UNIT)
    out = sv.serve_continuous(None, THREE, 2, clock)
    ax = sv.plot_timeline(THREE, out, clock.log, title="t")
    assert ax.get_title() == "t"
