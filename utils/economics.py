"""Inference economics and total cost of ownership: dollars per token, per GPU-hour, per job.

Chapters 23 and 24 use this module; labs 23 and 24 hold the learner's versions to it.

Part 1 (chapter 23), cost per token:

* :data:`PRICES` — dated GPU and CPU prices, each with its source. A price is a fact about
  one offer on one day; the chapters always print the date beside it.
* :func:`serving_cost` — tokens/s per GPU and $/Mtok for input (prefill) and output
  (decode) tokens of a registry model on a registry GPU, built on the course's roofline
  step-time model (:mod:`utils.inference_cost`, chapter 16).
* :data:`DEEPSEEK_DAY6` and :func:`deepseek_ledger` — DeepSeek's published day of V3/R1
  serving, and the ledger recomputed from its published inputs.
* :func:`search_configs` and :func:`pareto_front` — the configurations that meet latency
  targets, and the cost-latency front among them.

Part 2 (chapter 24), cost of owning:

* :class:`OnPremConfig`, :data:`DGX_H100_WORKED` — capex amortized over a lifetime plus power
  at a PUE (and optional operations cost) per GPU-hour; :func:`onprem_cost_per_gpu_hour`,
  :func:`cost_per_used_gpu_hour`, :func:`break_even_utilization`, :func:`tornado`.
* Spot instances: :func:`young_interval`, :func:`daly_interval` (the checkpoint interval),
  :func:`spot_job_time` (one job under given preemptions) and :func:`spot_monte_carlo`.

Units: seconds, bytes, watts, dollars. Prices per hour are stored as dollars per hour, the
unit every price list uses, and converted with :data:`SECONDS_PER_HOUR` where time is in
seconds. Every public function checks its arguments and raises ValueError or TypeError
naming the bad one.
"""
from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

from . import hardware as _hardware
from . import inference_cost as _ic
from . import models as _models
from . import validate as _v

__all__ = [
    "SECONDS_PER_HOUR", "HOURS_PER_YEAR", "Price", "PRICES", "PRICE_HISTORY", "price", "PRECISIONS",
    "serving_cost", "measured_usd_per_mtok", "DEEPSEEK_DAY6", "deepseek_ledger",
    "search_configs", "pareto_front",
    "OnPremConfig", "DGX_H100_WORKED", "onprem_cost_per_gpu_hour", "cost_per_used_gpu_hour",
    "break_even_utilization", "tornado", "young_interval", "daly_interval", "spot_job_time",
    "spot_monte_carlo",
]

SECONDS_PER_HOUR = 3600.0
#: 365.25 days of 24 hours, the year Epoch AI's cost model uses.
HOURS_PER_YEAR = 365.25 * 24


# --------------------------------------------------------------------------- validation
# thin wrappers over the course's shared validators (utils.validate)

def _number(name: str, value) -> float:
    return float(_v.check_number(name, value))


def _positive(name: str, value) -> float:
    return float(_v.check_positive(name, value))


def _nonneg(name: str, value) -> float:
    return float(_v.check_nonnegative(name, value))


def _fraction(name: str, value) -> float:
    """A number in (0, 1]."""
    return float(_v.check_number(name, value, positive=True, high=1))


def _count(name: str, value, minimum: int = 1) -> int:
    return _v.check_int(name, value, low=minimum)


def _sequence(name: str, value) -> list:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple, range)):
        raise TypeError(f"{name} must be a list or tuple, got {type(value).__name__} {value!r}")
    return list(value)


# --------------------------------------------------------------------------- prices

@dataclass(frozen=True)
class Price:
    """One offer: ``usd_per_hour`` for one ``unit`` (a GPU, or a whole CPU instance)."""

    key: str
    what: str               # the hardware, as the registry names it ("H100-SXM") or a CPU instance
    vendor: str
    offer: str              # "on-demand", "1-year commitment", "3-year commitment", "assumption"
    usd_per_hour: float
    date: str               # the day the price was observed (ISO)
    source: str
    unit: str = "GPU"

    def __post_init__(self):
        _positive(f"price {self.key}: usd_per_hour", self.usd_per_hour)


_EPOCH = ("Epoch AI, 'Hardware prices' data set (data/Hardware prices.csv in "
          "github.com/epoch-research/training-cost-trends, commit 263c40a of 2026-04-01), row ")

_PRICES = {p.key: p for p in [
    Price("aws-p5-h100", "H100-SXM", "AWS", "on-demand", 12.29, "2025-03-17",
          _EPOCH + "for p5.48xlarge, US East: $98.32 per hour for 8 H100 SXM, from the archived "
          "AWS EC2 on-demand pricing page (web.archive.org/web/20250317144823)"),
    Price("gcp-a3-h100", "H100-SXM", "Google Cloud", "on-demand", 11.06, "2025-03-17",
          _EPOCH + "for a3-highgpu, Iowa (us-central1), archived Google Cloud pricing page "
          "(web.archive.org/web/20250317151647)"),
    Price("gcp-a3-h100-3y", "H100-SXM", "Google Cloud", "3-year commitment", 4.86, "2025-03-17",
          _EPOCH + "for a3-highgpu, us-central1, 3-year committed-use price, same page"),
    Price("lambda-h100", "H100-SXM", "Lambda", "on-demand", 3.29, "2025-02-28",
          _EPOCH + "for Lambda GPU cloud, 1x H100 SXM (web.archive.org/web/20250228210058)"),
    Price("aws-p5e-h200", "H200", "AWS", "on-demand", 10.60, "2025-03-17",
          _EPOCH + "for H200, US East: $84.80 per hour for 8 GPUs, archived AWS EC2 on-demand "
          "pricing page (web.archive.org/web/20250317144823)"),
    Price("aws-p4de-a100", "A100-SXM-80GB", "AWS", "on-demand", 5.12, "2025-03-02",
          _EPOCH + "for p4de, US East: $40.96 per hour for 8 A100 80GB "
          "(web.archive.org/web/20250302190228)"),
    Price("aws-p4de-a100-3y", "A100-SXM-80GB", "AWS", "3-year commitment", 1.81, "2025-03-02",
          _EPOCH + "for p4de, US East: $14.46 per hour for 8 GPUs, 3-year, same page"),
    Price("runpod-l4", "L4", "RunPod", "on-demand", 0.43, "2025-03-03",
          _EPOCH + "for RunPod, NVIDIA L4 (web.archive.org/web/20250303172225)"),
    Price("deepseek-h800", "H800", "DeepSeek (assumed lease)", "assumption", 2.00, "2025-02-28",
          "DeepSeek, 'Day 6: One More Thing, DeepSeek-V3/R1 Inference System Overview' "
          "(github.com/deepseek-ai/open-infra-index, 202502OpenSourceWeek): 'Assuming the "
          "leasing cost of one H800 GPU is $2 per hour'"),
    Price("aws-c7i-large", "c7i.large (2 vCPU = 1 core, Intel Sapphire Rapids)", "AWS",
          "on-demand", 0.08925, "2026-08-11",
          "AWS EC2 on-demand, Linux, US East (N. Virginia), c7i.large, as quoted (dated "
          "2026-08-11) in a public deployment note found by the course on 2026-12-05; not read "
          "from AWS's own page by the course. Check the current price before relying on it",
          unit="instance"),
]}

#: Dated prices, by key. Read-only.
PRICES: Mapping[str, Price] = MappingProxyType(_PRICES)


#: The same offer observed on several dates: (date, $/GPU-hour, where it was read), per
#: series. All rows from Epoch AI's 'Hardware prices' data set (commit 263c40a), which links
#: each to the vendor page or an archived copy of it.
PRICE_HISTORY = MappingProxyType({
    "Lambda, 1x H100 SXM 80GB, on-demand": (
        ("2024-01-29", 3.49, "lambdalabs.com/service/gpu-cloud"),
        ("2024-07-11", 3.49, "web.archive.org/web/20240711213314/https://lambdalabs.com/service/gpu-cloud"),
        ("2024-09-01", 2.99, "web.archive.org/web/20240901231348/https://lambdalabs.com/service/gpu-cloud"),
        ("2024-11-29", 3.29, "web.archive.org/web/20241119072257/https://lambdalabs.com/service/gpu-cloud"),
        ("2025-02-28", 3.29, "web.archive.org/web/20250228210058/https://lambdalabs.com/service/gpu-cloud"),
    ),
    "Lambda, 1x A100 SXM4 40GB, on-demand": (
        ("2022-08-04", 1.10, "github.com/the-full-stack/website, docs/cloud-gpus/cloud-gpus.csv"),
        ("2023-01-10", 1.10, "github.com/the-full-stack/website, docs/cloud-gpus/cloud-gpus.csv"),
        ("2024-07-11", 1.29, "web.archive.org/web/20240711213314/https://lambdalabs.com/service/gpu-cloud"),
        ("2024-09-01", 1.29, "web.archive.org/web/20240901231348/https://lambdalabs.com/service/gpu-cloud"),
        ("2024-11-29", 1.29, "web.archive.org/web/20241119072257/https://lambdalabs.com/service/gpu-cloud"),
    ),
})


def price(key: str) -> Price:
    """The :class:`Price` registered under ``key`` (see :data:`PRICES`)."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a string, got {type(key).__name__} {key!r}")
    try:
        return _PRICES[key]
    except KeyError:
        raise _v.UnknownName(f"key: unknown price {key!r}; known: {', '.join(_PRICES)}") from None


# --------------------------------------------------------------------------- cost per token

#: precision -> (bytes per weight and KV element, the dtype whose dense peak applies)
PRECISIONS = MappingProxyType({"bf16": (2, "bf16"), "fp16": (2, "fp16"), "fp8": (1, "fp8")})


def _precision(value) -> tuple[int, str]:
    if not isinstance(value, str):
        raise TypeError(f"precision must be a string, one of {', '.join(PRECISIONS)}; got {value!r}")
    return PRECISIONS[_v.check_choice("precision", value, PRECISIONS)]


def _gpu(value) -> _hardware.GPUSpec:
    return _v.resolve_gpu(value, "gpu")


def _model(value):
    if isinstance(value, str):
        return _v.resolve_model(value, "model")
    try:
        return _ic.as_spec(value)
    except TypeError as err:
        raise TypeError(f"model: {err}") from None


def serving_cost(model, gpu, precision: str = "bf16", batch: int = 1, context: int = 1024,
                 prompt_len: int = 1024, n_gpus: int = 1, usd_per_gpu_hour: float = 1.0,
                 efficiency: float = 1.0) -> dict:
    """What serving ``model`` on ``n_gpus`` x ``gpu`` costs per token (ideal roofline).

    The step times are :func:`utils.inference_cost.step_time` of
    :func:`~utils.inference_cost.decode_cost` (``batch`` sequences at ``context`` tokens) and
    :func:`~utils.inference_cost.prefill_cost` (one prompt of ``prompt_len`` tokens), with
    weights and KV cache at ``precision``'s bytes and its dense peak, divided by
    ``efficiency`` (the fraction of the roofline an engine reaches; 1 = ideal). ``n_gpus``
    split each step perfectly (ideal tensor parallelism).

    Input and output tokens are priced separately, each as if the GPUs did only that work:
    ``$/Mtok = n_gpus x usd_per_gpu_hour / 3600 / (tokens per second) x 1e6``.

    Returns a dict: ``tpot`` (s, one decode step), ``ttft`` (s, one prefill, no queueing),
    ``output_tokens_per_s`` and ``input_tokens_per_s`` (per GPU), ``usd_per_m_output``,
    ``usd_per_m_input``, ``max_batch`` (sequences of ``context`` tokens whose KV cache fits
    beside the weights in 90% of the GPUs' memory) and ``fits`` (``batch <= max_batch``).
    """
    spec = _gpu(gpu)
    m = _model(model)
    bpe, dtype = _precision(precision)
    b = _count("batch", batch)
    ctx = _count("context", context)
    p = _count("prompt_len", prompt_len)
    n = _count("n_gpus", n_gpus)
    usd = _nonneg("usd_per_gpu_hour", usd_per_gpu_hour)
    eff = _fraction("efficiency", efficiency)
    tpot = _ic.step_time(_ic.decode_cost(m, b, ctx, bpe), spec, dtype, n) / eff
    ttft = _ic.step_time(_ic.prefill_cost(m, 1, p, bpe), spec, dtype, n) / eff
    out_tps = b / tpot
    in_tps = p / ttft
    usd_per_s = n * usd / SECONDS_PER_HOUR
    max_batch = _ic.max_decode_batch(m, spec, ctx, n, bpe)
    return {"tpot": tpot, "ttft": ttft, "output_tokens_per_s": out_tps / n,
            "input_tokens_per_s": in_tps / n, "usd_per_m_output": usd_per_s / out_tps * 1e6,
            "usd_per_m_input": usd_per_s / in_tps * 1e6, "max_batch": max_batch,
            "fits": b <= max_batch}


def measured_usd_per_mtok(completions, usd_per_hour: float) -> float:
    """Dollars per million output tokens of a served run (chapter 18's completions).

    ``completions`` is a list or dict of :class:`utils.serving.Completion`. Throughput is all
    tokens / (last token's time - first arrival); the machine costs ``usd_per_hour``.
    """
    usd = _nonneg("usd_per_hour", usd_per_hour)
    items = list(completions.values()) if isinstance(completions, Mapping) \
        else _sequence("completions", completions)
    if any(not (hasattr(c, "times") and hasattr(c, "arrival")) for c in items):
        raise TypeError("completions must hold Completion objects (with .arrival and .times)")
    items = [c for c in items if c.times]
    if not items:
        raise ValueError("completions holds no tokens: a run needs at least one token")
    tokens = sum(len(c.times) for c in items)
    span = max(c.times[-1] for c in items) - min(c.arrival for c in items)
    if not span > 0:
        raise ValueError("the run takes no time: its tokens must come after its first arrival")
    return usd / SECONDS_PER_HOUR / (tokens / span) * 1e6


def search_configs(model, options: Sequence[Mapping], tpot_slo: float, ttft_slo: float,
                   context: int = 1024, prompt_len: int = 1024, efficiency: float = 1.0) -> list[dict]:
    """Every option that fits in memory and meets both latency targets, cheapest output first.

    Each option is a mapping with ``gpu``, ``precision``, ``n_gpus``, ``batch`` and
    ``usd_per_gpu_hour``. A row of the result is the option's items followed by
    :func:`serving_cost`'s. Sorted by ``usd_per_m_output``, ties by ``tpot``, then by the
    option's position in ``options``. A row meets the targets when ``tpot <= tpot_slo``
    and ``ttft <= ttft_slo``.
    """
    _model(model)
    t_slo = _positive("tpot_slo", tpot_slo)
    f_slo = _positive("ttft_slo", ttft_slo)
    _count("context", context)
    _count("prompt_len", prompt_len)
    _fraction("efficiency", efficiency)
    rows = []
    for i, opt in enumerate(_sequence("options", options)):
        if not isinstance(opt, Mapping):
            raise TypeError(f"options[{i}] must be a mapping, got {type(opt).__name__}")
        missing = [k for k in ("gpu", "precision", "n_gpus", "batch", "usd_per_gpu_hour") if k not in opt]
        if missing:
            raise ValueError(f"options[{i}] lacks {', '.join(missing)}")
        c = serving_cost(model, opt["gpu"], opt["precision"], opt["batch"], context, prompt_len,
                         opt["n_gpus"], opt["usd_per_gpu_hour"], efficiency)
        if c["fits"] and c["tpot"] <= t_slo and c["ttft"] <= f_slo:
            rows.append((c["usd_per_m_output"], c["tpot"], i, {**dict(opt), **c}))
    rows.sort(key=lambda r: r[:3])
    return [r[3] for r in rows]


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimized).

    ``points`` are ``(latency, cost)`` pairs. Point i is dominated when some j has
    ``latency_j <= latency_i`` and ``cost_j <= cost_i`` with at least one strict. Of
    identical points only the first is kept. Returned in increasing latency (ties: index).
    """
    pts = []
    for i, p in enumerate(_sequence("points", points)):
        if not isinstance(p, (tuple, list)) or len(p) != 2:
            raise TypeError(f"points[{i}] must be a (latency, cost) pair, got {p!r}")
        pts.append((_number(f"points[{i}][0]", p[0]), _number(f"points[{i}][1]", p[1]), i))
    front, best_cost = [], math.inf
    for lat, cost, i in sorted(pts):
        if cost < best_cost:
            front.append(i)
            best_cost = cost
    return front


# --------------------------------------------------------------------------- DeepSeek Day 6

#: DeepSeek's published day of V3/R1 serving, 2025-02-27 12:00 to 2025-02-28 12:00 (UTC+8).
DEEPSEEK_DAY6 = MappingProxyType({
    "hours": 24.0,
    "average_nodes": 226.75,
    "peak_nodes": 278,
    "gpus_per_node": 8,
    "usd_per_gpu_hour": 2.0,
    "input_tokens": 608e9,
    "cache_hit_tokens": 342e9,
    "output_tokens": 168e9,
    "prefill_tokens_per_s_per_node": 73.7e3,
    "decode_tokens_per_s_per_node": 14.8e3,
    "usd_per_m_cache_hit": 0.14,
    "usd_per_m_cache_miss": 0.55,
    "usd_per_m_output": 2.19,
    # what DeepSeek printed as results, to hold a recomputation to
    "published_daily_cost": 87072.0,
    "published_revenue": 562027.0,
    "published_margin": 5.45,
    "source": ("DeepSeek, 'Day 6: One More Thing, DeepSeek-V3/R1 Inference System Overview' "
               "(github.com/deepseek-ai/open-infra-index, 202502OpenSourceWeek, 2025-03-01), "
               "section 'Statistics of DeepSeek's Online Service': 278 peak and 226.75 average "
               "nodes of 8 H800; $2 per H800-hour assumed; 608B input tokens of which 342B "
               "(56.3%) hit the on-disk KV cache; 168B output tokens; ~73.7k input tokens/s "
               "per node in prefill, ~14.8k output tokens/s per node in decode; $87,072 cost; "
               "$562,027 theoretical revenue at R1 prices ($0.14 / $0.55 / $2.19 per M "
               "cache-hit input / cache-miss input / output tokens); 545% cost profit margin"),
})

_LEDGER_INPUTS = ("hours", "average_nodes", "gpus_per_node", "usd_per_gpu_hour", "input_tokens",
                  "cache_hit_tokens", "output_tokens", "prefill_tokens_per_s_per_node",
                  "decode_tokens_per_s_per_node", "usd_per_m_cache_hit", "usd_per_m_cache_miss",
                  "usd_per_m_output")


def deepseek_ledger(inputs: Mapping = DEEPSEEK_DAY6) -> dict:
    """The day's ledger from its inputs (the keys of :data:`DEEPSEEK_DAY6` without
    ``published_*``):

    * ``gpu_hours`` = average nodes x GPUs per node x hours; ``cost`` = that x $/GPU-hour;
    * ``revenue`` = cache hits, cache misses (input - hits) and output tokens at their
      prices; ``margin`` = (revenue - cost) / cost (DeepSeek's "cost profit margin");
    * ``prefill_node_hours`` and ``decode_node_hours``: the node-hours the published
      per-node throughputs need for the day's input and output tokens, and
      ``accounted_fraction``, their sum over the average-node-hours the fleet had;
    * ``usd_per_m_input`` and ``usd_per_m_output``: the day's cost split by those
      node-hours, per million tokens.
    """
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a mapping, got {type(inputs).__name__}")
    missing = [k for k in _LEDGER_INPUTS if k not in inputs]
    if missing:
        raise ValueError(f"inputs lacks {', '.join(missing)}")
    v = {k: _nonneg(k, inputs[k]) for k in _LEDGER_INPUTS}
    for k in ("hours", "average_nodes", "gpus_per_node", "prefill_tokens_per_s_per_node",
              "decode_tokens_per_s_per_node", "input_tokens", "output_tokens"):
        _positive(k, v[k])
    if v["cache_hit_tokens"] > v["input_tokens"]:
        raise ValueError(f"cache_hit_tokens ({v['cache_hit_tokens']:g}) cannot exceed "
                         f"input_tokens ({v['input_tokens']:g})")
    gpu_hours = v["average_nodes"] * v["gpus_per_node"] * v["hours"]
    cost = gpu_hours * v["usd_per_gpu_hour"]
    hit, miss = v["cache_hit_tokens"], v["input_tokens"] - v["cache_hit_tokens"]
    revenue = (hit * v["usd_per_m_cache_hit"] + miss * v["usd_per_m_cache_miss"]
               + v["output_tokens"] * v["usd_per_m_output"]) / 1e6
    prefill_nh = v["input_tokens"] / v["prefill_tokens_per_s_per_node"] / SECONDS_PER_HOUR
    decode_nh = v["output_tokens"] / v["decode_tokens_per_s_per_node"] / SECONDS_PER_HOUR
    usd_per_node_hour = v["gpus_per_node"] * v["usd_per_gpu_hour"]
    return {"gpu_hours": gpu_hours, "cost": cost, "revenue": revenue,
            "margin": (revenue - cost) / cost if cost > 0 else math.inf,
            "prefill_node_hours": prefill_nh, "decode_node_hours": decode_nh,
            "accounted_fraction": (prefill_nh + decode_nh) / (v["average_nodes"] * v["hours"]),
            "usd_per_m_input": prefill_nh * usd_per_node_hour / v["input_tokens"] * 1e6,
            "usd_per_m_output": decode_nh * usd_per_node_hour / v["output_tokens"] * 1e6}


# --------------------------------------------------------------------------- TCO (chapter 24)

@dataclass(frozen=True)
class OnPremConfig:
    """Owning GPU servers. Money in dollars, power in watts, time in years where named so.

    * ``server_usd``: purchase price of one server with ``gpus_per_server`` GPUs;
    * ``network_fraction``: the share of the whole cluster's cost that is the cluster
      network (switches, cables, NICs outside the servers): cluster cost = servers /
      (1 - network_fraction);
    * ``lifetime_years``: straight-line depreciation to zero over this life;
    * ``server_watts``: the server's maximum power; ``power_fraction``: its average draw as a
      fraction of that; ``pue``: facility power / IT power; ``usd_per_kwh``: electricity;
    * ``ops_usd_per_gpu_year``: everything else per GPU and year (staff, space, support
      contracts); 0 unless you have a figure for your site.
    """

    server_usd: float
    gpus_per_server: int
    lifetime_years: float
    server_watts: float
    power_fraction: float
    pue: float
    usd_per_kwh: float
    network_fraction: float = 0.0
    ops_usd_per_gpu_year: float = 0.0
    source: str = ""

    def __post_init__(self):
        _positive("server_usd", self.server_usd)
        _count("gpus_per_server", self.gpus_per_server)
        _positive("lifetime_years", self.lifetime_years)
        _positive("server_watts", self.server_watts)
        _fraction("power_fraction", self.power_fraction)
        if _number("pue", self.pue) < 1:
            raise ValueError(f"pue must be >= 1 (facility power includes the IT power), got {self.pue!r}")
        _nonneg("usd_per_kwh", self.usd_per_kwh)
        nf = _number("network_fraction", self.network_fraction)
        if not 0 <= nf < 1:
            raise ValueError(f"network_fraction must be in [0, 1), got {nf!r}")
        _nonneg("ops_usd_per_gpu_year", self.ops_usd_per_gpu_year)


#: A DGX H100 owned by a non-hyperscaler, with the constants of Epoch AI's cost model.
DGX_H100_WORKED = OnPremConfig(
    server_usd=270_000.0, gpus_per_server=8, lifetime_years=5.0, server_watts=10_200.0,
    power_fraction=0.75, pue=1.25, usd_per_kwh=0.0826, network_fraction=0.19,
    ops_usd_per_gpu_year=0.0,
    source=("Server price: SemiAnalysis (2023-05-29), 'Nvidia sells DGX H100's at around "
            "$270,000', as recorded in Epoch AI's 'Hardware prices' data set. All other "
            "constants from Epoch AI's cost model (cost_analysis_standalone.py in "
            "github.com/epoch-research/training-cost-trends, commit 263c40a, 2026-04-01; "
            "Cottier et al., 'The rising costs of training frontier AI models', "
            "arXiv:2405.21015): server life 5 years for 2023+ hardware; DGX H100 server "
            "power 10.2 kW for 8 GPUs (NVIDIA DGX H100 datasheet); average draw 0.75 of it; "
            "PUE 1.25 outside hyperscalers; US industrial electricity $0.0826/kWh (2025); "
            "cluster interconnect 19% of total cluster cost. ops_usd_per_gpu_year is left at "
            "0: no public figure was verified for staff and space"),
)


def _config(cfg) -> OnPremConfig:
    if not isinstance(cfg, OnPremConfig):
        raise TypeError(f"cfg must be an OnPremConfig, got {type(cfg).__name__}")
    return cfg


def onprem_cost_per_gpu_hour(cfg: OnPremConfig) -> dict:
    """Cost of one owned GPU for one hour of its life, busy or not, by component ($/h).

    ``capex`` = server price / (1 - network_fraction) / GPUs / (lifetime x 8766 h);
    ``power`` = server watts x power_fraction x PUE / GPUs, in kW, x $/kWh;
    ``ops`` = ops_usd_per_gpu_year / 8766; ``total`` = their sum.
    """
    c = _config(cfg)
    capex = c.server_usd / (1 - c.network_fraction) / c.gpus_per_server / (c.lifetime_years * HOURS_PER_YEAR)
    power = c.server_watts * c.power_fraction * c.pue / c.gpus_per_server / 1000 * c.usd_per_kwh
    ops = c.ops_usd_per_gpu_year / HOURS_PER_YEAR
    return {"capex": capex, "power": power, "ops": ops, "total": capex + power + ops}


def cost_per_used_gpu_hour(cfg: OnPremConfig, utilization: float) -> float:
    """Dollars per GPU-hour of *useful* work when the GPUs are busy ``utilization`` of the
    time: the owner pays every hour (a simplification: an idle GPU draws the same power).
    ``utilization`` in (0, 1]."""
    u = _fraction("utilization", utilization)
    return onprem_cost_per_gpu_hour(cfg)["total"] / u


def break_even_utilization(cfg: OnPremConfig, cloud_usd_per_gpu_hour: float) -> float:
    """Utilization above which owning is cheaper than renting at ``cloud_usd_per_gpu_hour``
    (paid only for the hours used): owned $/GPU-hour / cloud price. A value above 1 means
    renting is cheaper at any utilization."""
    p = _positive("cloud_usd_per_gpu_hour", cloud_usd_per_gpu_hour)
    return onprem_cost_per_gpu_hour(cfg)["total"] / p


def tornado(fn: Callable[[Mapping], float], base: Mapping, ranges: Mapping) -> list[tuple]:
    """One-at-a-time sensitivity of ``fn(params)``.

    ``base`` holds the parameters; ``ranges`` maps some of their names to ``(low, high)``
    values. For each name, ``fn`` is evaluated with that parameter at low and at high and
    every other at base. Returns ``(name, fn at low, fn at high)`` sorted by the swing
    ``|high - low|``, largest first (ties: name).
    """
    for name, value in (("base", base), ("ranges", ranges)):
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a mapping (a dict), got {type(value).__name__} {value!r}")
    _v.check_callable("fn", fn)
    out = []
    for name, pair in ranges.items():
        if name not in base:
            raise ValueError(f"ranges names {name!r}, which is not in base")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"ranges[{name!r}] must be a (low, high) pair, got {pair!r}")
        lo = fn({**base, name: pair[0]})
        hi = fn({**base, name: pair[1]})
        out.append((name, lo, hi))
    out.sort(key=lambda r: (-abs(r[2] - r[1]), r[0]))
    return out


# --------------------------------------------------------------------------- spot instances

# The checkpoint interval (Young 1974, Daly 2006) lives in utils.reliability (chapter 15),
# once; imported here for the spot-instance model.
from .reliability import daly_interval, young_interval  # noqa: E402


def spot_job_time(work_seconds: float, interval_seconds: float, checkpoint_seconds: float,
                  restart_seconds: float, preemptions: Sequence[float]) -> tuple[float, int]:
    """Wall time for a job of ``work_seconds`` of compute on a spot instance, and how many
    preemptions hit it.

    The job computes ``interval_seconds`` of work, then writes a checkpoint taking
    ``checkpoint_seconds``; that work is safe once the checkpoint is complete. The last
    piece of work (possibly shorter) needs no checkpoint: the job ends when it is done.
    ``preemptions`` are the wall-clock times (s, from the job's start, increasing) at which
    the instance is taken away. A preemption at time p while work or a checkpoint is in
    progress loses everything since the last complete checkpoint; the job resumes at
    ``p + restart_seconds`` (new instance, checkpoint loaded). Preemptions during a restart,
    or at or after the job's end, do not count. An event exactly at a checkpoint's
    completion finds the checkpoint complete.
    """
    work = _positive("work_seconds", work_seconds)
    tau = _positive("interval_seconds", interval_seconds)
    delta = _nonneg("checkpoint_seconds", checkpoint_seconds)
    restart = _nonneg("restart_seconds", restart_seconds)
    times = [_nonneg(f"preemptions[{i}]", p) for i, p in enumerate(_sequence("preemptions", preemptions))]
    if any(b < a for a, b in zip(times, times[1:])):
        raise ValueError("preemptions must be in increasing order")
    t, done, hits, k = 0.0, 0.0, 0, 0
    while True:
        piece = min(tau, work - done)
        last = done + piece >= work - 1e-12 * work
        commit = t + piece + (0.0 if last else delta)
        while k < len(times) and times[k] < t:
            k += 1                                   # fell in a restart: no effect
        if k < len(times) and times[k] < commit:
            hits += 1
            t = times[k] + restart
            k += 1
            continue
        t = commit
        done += piece
        if last:
            return t, hits


def spot_monte_carlo(work_seconds: float, interval_seconds: float, checkpoint_seconds: float,
                     restart_seconds: float, mean_seconds_between_preemptions: float,
                     n_trials: int = 1000, seed: int = 0) -> list[tuple[float, int]]:
    """:func:`spot_job_time` under ``n_trials`` draws of preemptions, a Poisson process with
    mean gap ``mean_seconds_between_preemptions`` (exponential gaps, ``random.Random(seed)``)."""
    m = _positive("mean_seconds_between_preemptions", mean_seconds_between_preemptions)
    n = _count("n_trials", n_trials)
    rng = random.Random(_count("seed", seed, minimum=0))
    work = _positive("work_seconds", work_seconds)
    out = []
    for _ in range(n):
        times, t, horizon = [], 0.0, 4 * work + 10 * m
        while True:
            while t < horizon:
                t += rng.expovariate(1.0 / m)
                times.append(t)
            end, hits = spot_job_time(work, interval_seconds, checkpoint_seconds,
                                      restart_seconds, times)
            if end < times[-1]:
                break
            if horizon > 1e4 * (work + m):
                raise ValueError("the job cannot finish: preemptions come too often for this "
                                 "checkpoint interval (shorten interval_seconds)")
            horizon *= 2                      # draw more of the same process and replay
        out.append((end, hits))
    return out
