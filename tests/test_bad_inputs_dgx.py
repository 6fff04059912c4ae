"""Bad input to utils.dgx and the system registry: every public function, one argument at a
time, must raise ValueError or TypeError whose message names the argument.

The same rules as the course-wide sweep (tests/test_bad_inputs.py): numbers get NaN, inf,
-1, 0 and a string; names get an unknown name and an int; sequences and objects get an
int. Mutations that are valid for an argument are listed in ``allow``.
"""
import inspect
import math
import re

import pytest

from utils import dgx, hardware

GPUS = [f"GPU{i}" for i in range(8)]
ONE = [("GPU0", "GPU1", 1e6)]

#: function -> (valid kwargs factory, {argument: allowed mutations})
SWEEP = {
    hardware.system: (lambda: dict(name="DGX-H100"), {}),
    hardware.systems: (lambda: dict(), {}),
    dgx.switch: (lambda: dict(name="QM9700"), {}),
    dgx.dgx_graph: (lambda: dict(system="DGX-H100", gpus_per_pcie_switch=2), {}),
    dgx.fast_route: (lambda: dict(graph=dgx.dgx_graph(), src="GPU0", dst="GPU1"), {}),
    dgx.link_loads: (lambda: dict(graph=dgx.dgx_graph(), transfers=list(ONE)), {}),
    dgx.schedule_time: (lambda: dict(graph=dgx.dgx_graph(), transfers=list(ONE)), {}),
    dgx.ring_transfers: (lambda: dict(order=["GPU0", "GPU1"], nbytes=1e6), {}),
    dgx.ring_busbw: (lambda: dict(graph=dgx.dgx_graph(), rings=[list(GPUS)]), {}),
    dgx.double_binary_tree: (lambda: dict(n=8), {}),
    dgx.tree_transfers: (lambda: dict(parents=[None, 0], gpus=["GPU0", "GPU1"], nbytes=1e6), {}),
    dgx.tree_busbw: (lambda: dict(graph=dgx.dgx_graph(), trees=[[None, 0]], gpus=["GPU0", "GPU1"]),
                     {}),
    dgx.power_plan: (lambda: dict(system="DGX-H100", nodes=4, rack_power_w=41e3, pdu_w=17.3e3,
                                  pue=1.2, hours=1.0, load=0.8), {"hours": {"zero"}}),
    dgx.fabric_size: (lambda: dict(gpus=256, radix=64, gpus_per_node=8, su_nodes=32,
                                   ports_per_transceiver=2), {}),
}


def _mutations(value):
    if value is None or isinstance(value, bool):
        return {}
    if isinstance(value, (int, float)):
        return {"nan": math.nan, "inf": math.inf, "neg": -1, "zero": 0, "type": "3"}
    if isinstance(value, str):
        return {"name": "no-such-name", "type": 3}
    return {"type": 3}


CASES = [(fn, arg, label, bad)
         for fn, (make, allow) in SWEEP.items()
         for arg, value in make().items()
         for label, bad in _mutations(value).items()
         if label not in allow.get(arg, set())]


def test_every_public_function_is_covered():
    public = {getattr(dgx, n) for n in dgx.__all__ if inspect.isfunction(getattr(dgx, n))}
    public |= {hardware.system, hardware.systems}
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
