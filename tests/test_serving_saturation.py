"""utils.serving at saturation: every request queued at time 0, each scheduler's capacity.

The small schedules are worked out by hand with unit costs; the chapter's claim (continuous
batching at least twice static batching's throughput on a long-tailed trace, on the H100
roofline cost of Llama-2-7B) is held here too, so a change to the engines that breaks it
fails a test and not only a stored notebook output.
"""
import math

import pytest

from utils import serving as sv

UNIT = sv.CostModel(decode_base=1.0, decode_per_seq=0.0, prefill_base=1.0, prefill_per_token=0.0)


def req(rid, arrival, prompt_len, max_new):
    return sv.Request(rid, arrival, tuple(range(1, prompt_len + 1)), max_new)


def hand_trace():
    # two long (4 tokens) and two short (1 token) requests, arriving one second apart
    return [req(0, 0.0, 1, 4), req(1, 1.0, 1, 1), req(2, 2.0, 1, 4), req(3, 3.0, 1, 1)]


def test_saturate_queues_every_request_at_zero_and_keeps_the_rest():
    tr = sv.make_trace(20, 5.0, seed=1)
    sat = sv.saturate(tr)
    assert [r.arrival for r in sat] == [0.0] * 20
    assert [(r.rid, r.prompt, r.max_new) for r in sat] == [(r.rid, r.prompt, r.max_new) for r in tr]
    assert tr[-1].arrival > 0                       # the input is not modified


def test_static_at_saturation_by_hand():
    # batch {0, 1}: one prefill iteration of two passes (2 s), then 3 decodes of request 0 -> t = 5;
    # batch {2, 3}: 2 s of prefill, 3 decodes -> t = 10. Ten tokens in ten seconds.
    out, log = sv.simulate("static", sv.saturate(hand_trace()), UNIT, 2)
    assert {rid: c.times for rid, c in out.items()} == {
        0: [2.0, 3.0, 4.0, 5.0], 1: [2.0], 2: [7.0, 8.0, 9.0, 10.0], 3: [7.0]}
    assert len(log) == 8
    assert sv.saturation_throughput("static", hand_trace(), UNIT, 2) == pytest.approx(1.0)


def test_continuous_at_saturation_by_hand():
    # it1: prefill 0 and 1 (2 s). it2: 2 joins the slot 1 freed: decode [0] + prefill 2 (2 s).
    # it3, it4: decode [0, 2] (1 s each); 0 is done. it5: 3 joins: decode [2] + prefill 3 (2 s).
    out, _ = sv.simulate("continuous", sv.saturate(hand_trace()), UNIT, 2)
    assert {rid: c.times for rid, c in out.items()} == {
        0: [2.0, 4.0, 5.0, 6.0], 1: [2.0], 2: [4.0, 5.0, 6.0, 8.0], 3: [8.0]}
    assert sv.saturation_throughput("continuous", hand_trace(), UNIT, 2) == pytest.approx(10 / 8)


def test_saturation_is_the_limit_of_rising_offered_load():
    cost = sv.REFERENCE_COST
    base = sv.make_trace(200, 1.0, seed=2)
    for kind in ("static", "continuous"):
        cap = sv.saturation_throughput(kind, base, cost, 16)
        got = [sv.summarize(sv.simulate(kind, sv.make_trace(200, rate, seed=2), cost, 16)[0])["throughput"]
               for rate in (20.0, 100.0, 1e4, 1e7)]
        # low load: the server keeps up, throughput = offered tokens / time, well below capacity
        assert got[0] < 0.5 * cap
        # far above capacity the run is the saturated schedule, shifted by the arrivals
        assert got[-1] == pytest.approx(cap, rel=1e-3)
        assert got[2] <= cap * 1.001 and got[2] > 0.9 * cap


def test_dynamic_equals_static_at_saturation():
    tr = sv.make_trace(100, 50.0, seed=3)
    for cost in (sv.REFERENCE_COST, UNIT):
        assert sv.saturation_throughput("dynamic", tr, cost, 8, max_delay=0.001) == \
            sv.saturation_throughput("static", tr, cost, 8)


def test_continuous_doubles_static_on_a_long_tailed_trace_on_an_h100():
    gpu = sv.gpu_cost_model("llama2-7b", "H100-SXM", context=1024)
    tr = sv.make_trace(400, 100.0, seed=2, median_out=16, sigma=1.2, max_out=256)
    static = sv.saturation_throughput("static", tr, gpu, 64)
    cont = sv.saturation_throughput("continuous", tr, gpu, 64)
    assert cont >= 2.0 * static
    # and the bound: no scheduler beats a full batch of 64 decoding all the time
    assert cont <= 64 / gpu.decode(64)


def test_short_tailed_trace_gains_less():
    gpu = sv.gpu_cost_model("llama2-7b", "H100-SXM", context=1024)
    ratio = {}
    for sigma in (0.3, 1.2):
        tr = sv.make_trace(400, 100.0, seed=2, median_out=16, sigma=sigma, max_out=256)
        ratio[sigma] = (sv.saturation_throughput("continuous", tr, gpu, 64)
                        / sv.saturation_throughput("static", tr, gpu, 64))
    assert ratio[0.3] < ratio[1.2]


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(scheduler="orca"), ValueError, "scheduler"),
    (dict(max_batch=0), ValueError, "max_batch"),
    (dict(max_batch=2.5), TypeError, "max_batch"),
    (dict(scheduler="chunked"), ValueError, "token_budget"),
    (dict(scheduler="chunked", token_budget=0), ValueError, "token_budget"),
    (dict(scheduler="dynamic", max_delay=-1.0), ValueError, "max_delay"),
    (dict(scheduler="dynamic", max_delay=math.nan), ValueError, "max_delay"),
    (dict(cost="H100"), TypeError, "cost"),
])
def test_bad_arguments_are_named(kwargs, err, match):
    args = dict(scheduler="continuous", requests=hand_trace(), cost=UNIT, max_batch=2)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        sv.saturation_throughput(**args)


def test_saturate_refuses_unsorted_requests():
    with pytest.raises(ValueError, match="sorted"):
        sv.saturate([req(0, 1.0, 1, 1), req(1, 0.5, 1, 1)])
