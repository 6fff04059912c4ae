"""Plot style and the roofline plot."""
import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest

from utils import hardware, plots


def test_si_formatting():
    assert plots.si(3.35e12, "B/s") == "3.35 TB/s"
    assert plots.si(989.5e12, "FLOP/s") == "990 TFLOP/s"
    assert plots.si(0.002, "s") == "2 ms"


def test_roof_attainable_and_ridge():
    r = plots.Roof("m", peak_flops=100.0, bandwidth=10.0)
    assert r.ridge == 10.0
    np.testing.assert_allclose(r.attainable([1, 10, 100]), [10, 100, 100])


def test_roofline_draws_every_machine_and_kernel():
    plots.use_style()
    roofs = [plots.roof_from_spec(hardware.get(n), "bf16") for n in ("H100-SXM", "A100-SXM-80GB")]
    roofs.append(plots.Roof("cpu", 1e12, 5e10, extra_bandwidths=[("L2", 2e11)]))
    ax = plots.roofline(roofs, [plots.KernelPoint("gemv", 1.0), plots.KernelPoint("x", 5, 1e11, 2)])
    labels = [line.get_label() for line in ax.get_lines()]
    assert sum("H100" in lab for lab in labels) == 1
    assert any("L2" in lab for lab in labels)
    assert len([t for t in ax.texts]) == 2
    # the gemv point sits on the H100 roof: intensity 1 x 3.35 TB/s
    point = [l for l in ax.get_lines() if l.get_marker() == "o"][0]
    assert point.get_ydata()[0] == pytest.approx(3.35e12)
    with pytest.raises(ValueError):
        plots.roofline([])
