"""Bad input to utils.economics and utils.scheduler: every public function, one argument at a
time, must raise ValueError or TypeError whose message names the argument.

The same rules as the course-wide sweep (tests/test_bad_inputs.py): numbers get NaN, inf,
-1, 0 and a string; names get an unknown name and an int; sequences and objects get an
int. Mutations that are valid for an argument are listed in ``allow``.
"""
import inspect
import math
import re

import pytest

from utils import economics as econ
from utils import scheduler as sch
from utils.serving import Completion


def _comps():
    return [Completion(0, 0.0, [0, 0], [0.5, 1.0]), Completion(1, 0.5, [0], [1.5])]


def _schedule():
    jobs = [sch.Job(0, 0.0, 8, 10.0), sch.Job(1, 0.0, 4, 5.0)]
    return sch.simulate(jobs, 2), jobs


OPTS = [{"gpu": "H100-SXM", "precision": "bf16", "n_gpus": 1, "batch": 4, "usd_per_gpu_hour": 2.0}]

#: function -> (valid kwargs factory, {argument: allowed mutations})
SWEEP = {
    econ.price: (lambda: dict(key="aws-p5-h100"), {}),
    econ.serving_cost: (lambda: dict(model="llama2-7b", gpu="H100-SXM", precision="bf16", batch=4, context=512,
                                     prompt_len=256, n_gpus=1, usd_per_gpu_hour=2.0, efficiency=1.0),
                        {"usd_per_gpu_hour": {"zero"}}),
    econ.measured_usd_per_mtok: (lambda: dict(completions=_comps(), usd_per_hour=1.0), {"usd_per_hour": {"zero"}}),
    econ.search_configs: (lambda: dict(model="llama2-7b", options=OPTS, tpot_slo=0.05, ttft_slo=1.0, context=512,
                                       prompt_len=256, efficiency=1.0), {}),
    econ.pareto_front: (lambda: dict(points=[(1.0, 2.0), (2.0, 1.0)]), {}),
    econ.deepseek_ledger: (lambda: dict(inputs=dict(econ.DEEPSEEK_DAY6)), {}),
    econ.onprem_cost_per_gpu_hour: (lambda: dict(cfg=econ.DGX_H100_WORKED), {}),
    econ.cost_per_used_gpu_hour: (lambda: dict(cfg=econ.DGX_H100_WORKED, utilization=0.5), {}),
    econ.break_even_utilization: (lambda: dict(cfg=econ.DGX_H100_WORKED, cloud_usd_per_gpu_hour=3.0), {}),
    econ.tornado: (lambda: dict(fn=lambda p: p["a"], base={"a": 1.0}, ranges={"a": (0.0, 2.0)}), {}),
    econ.young_interval: (lambda: dict(checkpoint_seconds=60.0, mtbf_seconds=3600.0), {}),
    econ.daly_interval: (lambda: dict(checkpoint_seconds=60.0, mtbf_seconds=3600.0), {}),
    econ.spot_job_time: (lambda: dict(work_seconds=100.0, interval_seconds=30.0, checkpoint_seconds=5.0,
                                      restart_seconds=10.0, preemptions=[40.0]),
                         {"checkpoint_seconds": {"zero"}, "restart_seconds": {"zero"}}),
    econ.spot_monte_carlo: (lambda: dict(work_seconds=100.0, interval_seconds=30.0, checkpoint_seconds=5.0,
                                         restart_seconds=10.0, mean_seconds_between_preemptions=200.0,
                                         n_trials=3, seed=0),
                            {"checkpoint_seconds": {"zero"}, "restart_seconds": {"zero"}, "seed": {"zero"}}),
    sch.pods: (lambda: dict(gpus=12, gpus_per_node=8), {}),
    sch.best_fit: (lambda: dict(free=[8, 4], pod_sizes=[4]), {}),
    sch.make_jobs: (lambda: dict(n=3, seed=0, mean_gap=60.0, sizes=(1, 8), weights=(0.5, 0.5),
                                 median_duration=600.0, sigma=1.0, high_priority_share=0.2),
                    {"n": {"zero"}, "seed": {"zero"}, "high_priority_share": {"zero"}}),
    sch.simulate: (lambda: dict(jobs=[sch.Job(0, 0.0, 8, 10.0)], n_nodes=2, gpus_per_node=8, policy="fifo",
                                preempt=False, placement=sch.best_fit), {}),
    sch.validate_schedule: (lambda: dict(zip(("schedule", "jobs"), _schedule())), {}),
    sch.metrics: (lambda: dict(zip(("schedule", "jobs"), _schedule())), {}),
}

BAD_NUMBERS = {"nan": math.nan, "inf": math.inf, "neg": -1, "zero": 0, "str": "x"}


def _mutations(value):
    if isinstance(value, bool):
        return {"int": 3}
    if isinstance(value, (int, float)):
        return BAD_NUMBERS
    if isinstance(value, str):
        return {"unknown": "no-such-name", "int": 7}
    return {"int": 5}


CASES = [(fn, arg, label, bad)
         for fn, (make, allow) in SWEEP.items()
         for arg, value in make().items()
         for label, bad in _mutations(value).items()
         if label not in allow.get(arg, set())]


def test_every_public_function_is_covered():
    public = {getattr(m, n) for m in (econ, sch) for n in m.__all__ if inspect.isfunction(getattr(m, n))}
    assert public == set(SWEEP), sorted(f.__name__ for f in public ^ set(SWEEP))


@pytest.mark.parametrize("fn", list(SWEEP), ids=lambda f: f.__name__)
def test_valid_call_answers(fn):
    make, _ = SWEEP[fn]
    fn(**make())


@pytest.mark.parametrize("fn, arg, label, bad", CASES,
                         ids=[f"{c[0].__name__}-{c[1]}-{c[2]}" for c in CASES])
def test_bad_argument_is_named(fn, arg, label, bad):
    make, _ = SWEEP[fn]
    kwargs = make()
    kwargs[arg] = bad
    with pytest.raises((ValueError, TypeError)) as info:
        fn(**kwargs)
    assert re.search(rf"\b{re.escape(arg)}\b", str(info.value), re.IGNORECASE), str(info.value)
