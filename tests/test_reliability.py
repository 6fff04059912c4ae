"""utils.reliability: formulas against hand arithmetic, the checkpoint file against damage,
the Monte Carlo against the first-order model, and clear errors for bad input."""
import math
import os

import pytest
import torch

from utils import economics as econ
from utils import reliability as rel


def test_job_mtbf_is_one_over_n():
    assert rel.job_mtbf(1000.0, 1) == 1000.0
    assert rel.job_mtbf(1000.0, 8) == 125.0


def test_young_daly_by_hand():
    # delta = 50 s, M = 10 000 s: sqrt(2 * 50 * 10000) = 1000 s
    assert rel.young_daly_interval(50.0, 10_000.0) == pytest.approx(1000.0)
    # Daly: x = 50 / 20000 = 0.0025; 1000 (1 + 0.05/3 + 0.0025/9) - 50
    assert rel.daly_interval(50.0, 10_000.0) == pytest.approx(1000 * (1 + 0.05 / 3 + 0.0025 / 9) - 50)
    assert rel.daly_interval(300.0, 100.0) == 100.0


def test_economics_uses_the_same_functions():
    assert econ.young_interval is rel.young_interval
    assert econ.daly_interval is rel.daly_interval


@pytest.mark.parametrize("args", [(0.0, 100.0), (10.0, 0.0), (-1.0, 100.0), (math.nan, 1.0),
                                  (10.0, math.inf)])
def test_interval_refuses_bad_input(args):
    with pytest.raises(ValueError):
        rel.young_daly_interval(*args)


@pytest.mark.parametrize("args", [(0.0, 4), (-5.0, 4), (10.0, 0), (10.0, 2.5), (math.nan, 2)])
def test_job_mtbf_refuses_bad_input(args):
    with pytest.raises((ValueError, TypeError)):
        rel.job_mtbf(*args)


def test_goodput_first_order_and_bad_costs():
    # 600/660 * (1 - (330 + 120)/10800)
    assert rel.goodput(600, 60, 120, 10800) == pytest.approx(600 / 660 * (1 - 450 / 10800))
    with pytest.raises(ValueError, match="checkpoint_seconds"):
        rel.goodput(600, -1, 120, 10800)
    with pytest.raises(ValueError, match="mtbf_seconds"):
        rel.goodput(600, 60, 120, 0)


def test_monte_carlo_near_first_order_model_and_optimum_near_young():
    d, r, m, w = 60.0, 120.0, 3 * 3600.0, 200 * 3600.0
    taus = [200, 600, 1138, 2500, 6000]
    sim = [sum(rel.simulate_goodput(t, d, r, m, w, seed=s) for s in range(4)) / 4 for t in taus]
    assert max(range(len(taus)), key=lambda i: sim[i]) in (1, 2, 3)
    for t, g in zip(taus[:4], sim):
        assert g == pytest.approx(rel.goodput(t, d, r, m), abs=0.03)


def test_checkpoint_round_trip_and_damage(tmp_path):
    p = tmp_path / "c"
    state = {"w": torch.arange(6.0), "rng": rel.rng_state(), "step": 3}
    rel.save_checkpoint(p, state)
    assert os.listdir(tmp_path) == ["c"]
    got = rel.load_checkpoint(p)
    assert torch.equal(got["w"], state["w"]) and got["step"] == 3
    data = p.read_bytes()
    for blob in (data[:-1], data[: len(data) // 2], b"", b"junk"):
        p.write_bytes(blob)
        with pytest.raises(rel.CheckpointError):
            rel.load_checkpoint(p)
    torch.save(state, p)  # a foreign file
    with pytest.raises(ValueError, match="not a course checkpoint"):
        rel.load_checkpoint(p)
    with pytest.raises(TypeError, match="state"):
        rel.save_checkpoint(p, [1])


def test_rng_state_restores_every_generator():
    import random

    import numpy as np
    s = rel.rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(1).item())
    rel.set_rng_state(s)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == a


def test_find_stragglers():
    t = torch.full((10, 4), 0.1)
    t[:, 2] = 0.2
    t[3, 0] = 5.0
    assert rel.find_stragglers(t) == [2]
    with pytest.raises(ValueError, match="step_times"):
        rel.find_stragglers(torch.ones(3))
    with pytest.raises(ValueError, match="step_times"):
        rel.find_stragglers([[0.1, float("nan")]])


def test_census_rows_and_bad_input():
    assert len(rel.LLAMA3_CENSUS) == 18
    assert rel.LLAMA3_RUN["planned"] + rel.LLAMA3_RUN["unexpected"] == rel.LLAMA3_RUN["interruptions"]
    assert rel.census_mismatches([("a", "x", 1, 50.0), ("b", "x", 1, 50.0)], 2) == []
    assert rel.census_mismatches([("a", "x", 1, 40.0), ("b", "x", 1, 50.0)], 2) == ["a"]
    with pytest.raises(ValueError, match="total"):
        rel.census_mismatches(rel.LLAMA3_CENSUS, 0)


def test_simulate_goodput_refuses_a_job_that_never_finishes():
    with pytest.raises(ValueError, match="does not finish"):
        rel.simulate_goodput(3600.0, 60.0, 50.0, 10.0, 36000.0)
