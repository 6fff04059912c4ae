"""One look for every figure in the course, and the roofline plot.

Call :func:`use_style` once at the top of a notebook. Figures are PNG at a modest DPI
so the stored notebooks stay small.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import matplotlib

import matplotlib.pyplot as plt
import numpy as np

from .validate import check_int, check_number, resolve_gpu

#: Colour cycle (colour-blind safe, Okabe-Ito).
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
           "#F0E442", "#000000"]

_STYLE = {
    "figure.figsize": (7.0, 4.2),
    "figure.dpi": 80,
    "savefig.dpi": 80,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "font.size": 10,
}


def use_style() -> None:
    """Apply the course's plot style (and PNG output in notebooks)."""
    matplotlib.rcParams.update(_STYLE)
    try:  # inline PNG at the style's DPI; harmless outside IPython
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("png")
    except Exception:
        pass


def si(value: float, unit: str = "", digits: int = 3) -> str:
    """Format ``value`` with an SI prefix: si(3.35e12, 'B/s') -> '3.35 TB/s'.

    NaN and infinity are shown as ``nan`` and ``inf``, so a missing figure is visible.
    """
    if value == value:                       # NaN is shown, anything else must be a number
        check_number("value", value, finite=False)
    if not isinstance(unit, str):
        raise TypeError(f"unit must be a string, got {type(unit).__name__} {unit!r}")
    check_int("digits", digits, low=1)
    if value == 0 or not np.isfinite(value):
        return f"{value:g} {unit}".strip()
    prefixes = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""),
                (1e-3, "m"), (1e-6, "µ"), (1e-9, "n")]
    for scale, p in prefixes:
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g} {p}{unit}".strip()
    return f"{value:.{digits}g} {unit}".strip()


@dataclass(frozen=True)
class Roof:
    """A machine's roofline: a peak and one or more bandwidth ceilings."""

    label: str
    peak_flops: float
    bandwidth: float
    extra_bandwidths: Sequence[tuple[str, float]] = ()   # e.g. [("L2", 7e12)]

    def __post_init__(self):
        from .validate import check_positive
        if not isinstance(self.label, str):
            raise TypeError(f"label must be a str, got {type(self.label).__name__}")
        check_positive("peak_flops", self.peak_flops)
        check_positive("bandwidth", self.bandwidth)
        for name, bw in self.extra_bandwidths:
            check_positive(f"extra_bandwidths[{name!r}]", bw)

    def attainable(self, intensity, bandwidth: Optional[float] = None):
        bw = self.bandwidth if bandwidth is None else bandwidth
        return np.minimum(self.peak_flops, np.asarray(intensity, dtype=float) * bw)

    @property
    def ridge(self) -> float:
        return self.peak_flops / self.bandwidth


@dataclass(frozen=True)
class KernelPoint:
    """A kernel placed on a roofline: its intensity and (optionally) achieved FLOP/s.

    With ``achieved`` None the point is drawn on the roof of ``roof_index``.
    """

    label: str
    intensity: float
    achieved: Optional[float] = None
    roof_index: int = 0


def roof_from_spec(spec, dtype: str = "bf16") -> Roof:
    """A :class:`Roof` for a GPU from ``utils.hardware`` (a spec or a registry name)."""
    spec = resolve_gpu(spec, "spec")
    return Roof(label=f"{spec.name} {dtype}", peak_flops=spec.flops(dtype),
                bandwidth=spec.memory_bandwidth)


def roofline(roofs: Iterable[Roof], kernels: Iterable[KernelPoint] = (), ax=None,
             intensity_range: tuple[float, float] = (1 / 16, 4096), title: str = "Roofline"):
    """Draw several machines' rooflines on log-log axes and place kernels on them."""
    if isinstance(roofs, Roof) or not isinstance(roofs, Iterable):
        raise TypeError(f"roofs must be a list of Roof, got {type(roofs).__name__}")
    roofs = list(roofs)
    if not roofs:
        raise ValueError("roofs must hold at least one Roof")
    for r in roofs:
        if not isinstance(r, Roof):
            raise TypeError(f"roofs must hold Roof objects, got {type(r).__name__}")
    kernels = list(kernels)
    for k in kernels:
        if not isinstance(k, KernelPoint) or not 0 <= k.roof_index < len(roofs):
            raise ValueError(f"kernels must be KernelPoints whose roof_index is in "
                             f"[0, {len(roofs)}), got {k!r}")
    if len(intensity_range) != 2:
        raise ValueError(f"intensity_range must be (low, high), got {intensity_range!r}")
    lo, hi = (check_number("intensity_range", v, positive=True) for v in intensity_range)
    if not lo < hi:
        raise ValueError(f"intensity_range must have low < high, got {intensity_range!r}")
    if ax is None:
        _, ax = plt.subplots()
    x = np.logspace(np.log10(intensity_range[0]), np.log10(intensity_range[1]), 400)
    for i, roof in enumerate(roofs):
        color = PALETTE[i % len(PALETTE)]
        ax.loglog(x, roof.attainable(x), color=color, lw=2,
                  label=f"{roof.label}: {si(roof.peak_flops, 'FLOP/s')}, "
                        f"{si(roof.bandwidth, 'B/s')}")
        for j, (name, bw) in enumerate(roof.extra_bandwidths):
            ax.loglog(x, roof.attainable(x, bw), color=color, lw=1.2,
                      ls=["--", ":", "-."][j % 3], label=f"{roof.label} {name}: {si(bw, 'B/s')}")
        ax.axvline(roof.ridge, color=color, lw=0.8, alpha=0.4)
    for k in kernels:
        roof = roofs[k.roof_index]
        y = k.achieved if k.achieved is not None else float(roof.attainable(k.intensity))
        color = PALETTE[k.roof_index % len(PALETTE)]
        ax.plot([k.intensity], [y], "o", color=color, mec="black", ms=6, zorder=5)
        ax.annotate(k.label, (k.intensity, y), textcoords="offset points", xytext=(5, -11),
                    fontsize=8)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attainable FLOP/s")
    ax.set_title(title)
    ax.legend(loc="upper left")
    return ax
