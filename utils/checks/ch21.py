"""Checkers for lab 21, TensorRT and compilation.

Oracles: the model itself run eagerly (a rewritten graph must compute what it computed);
graphs counted node by node here; for the auto-tuner, fake candidates with known costs
that advance a fake clock (decisions, caching, warm-up and noise are then exact), and a
real timing on this machine reported as a measurement warning, never a failure; for the
calibrators, the algorithms of NVIDIA's pytorch-quantization (TensorRT repository)
as ``utils.compilation`` implements them.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.fx as fx
import torch.nn as nn

from .. import compilation, tiny
from . import (describe, exercise, expect_close, expect_equal, expect_raises, expect_type,
               fail, measurement_warning)

_TOKENS = torch.randint(0, 44, (2, 48), generator=torch.Generator().manual_seed(21))


def _model():
    return tiny.load("tiny-target")


def _counts(gm: fx.GraphModule) -> dict:
    """What the graph runs, counted here from the nodes (independent of the learner)."""
    out: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            key = type(gm.get_submodule(node.target)).__name__
        elif node.op == "call_method":
            key = str(node.target)
        elif node.op == "call_function":
            key = getattr(node.target, "__name__", str(node.target))
        else:
            continue
        out[key] = out.get(key, 0) + 1
    return out


class _Toy(nn.Module):
    """Two bias linears and one bias-free linear on x; two linears on relu(x), with a
    user of the first between them; a linear on a third input."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(8, 4)
        self.c = nn.Linear(8, 5, bias=False)
        self.d = nn.Linear(8, 3, bias=False)
        self.e = nn.Linear(8, 7, bias=False)
        self.f = nn.Linear(3, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        y = x.relu()
        d = self.d(y)
        scaled = d * 2.0
        e = self.e(y)
        out = torch.cat([self.a(x), self.b(x), self.c(x), e], dim=-1).sum(-1, keepdim=True)
        return out + self.f(scaled).sum(-1, keepdim=True)


# --------------------------------------------------------------------------- exercise 1

@exercise
def count_ops(fn):
    """``fn(gm) -> {op name: count}`` over the call nodes of a GraphModule."""
    model = _model()
    toy = fx.symbolic_trace(_Toy())
    fused = compilation.trace_tiny(model)
    compilation.fuse_sibling_linears(fused)
    cases = [("the traced tiny model", compilation.trace_tiny(model)), ("a small module", toy),
             ("the tiny model after horizontal fusion", fused)]
    for what, gm in cases:
        got = fn(gm)
        expect_type(got, dict, f"count_ops({what})", hint="return a dict {op name: count}")
        expect_equal(dict(got), _counts(gm), f"count_ops({what})",
                     hint="count call_module nodes by their module's class name "
                          "(type(gm.get_submodule(node.target)).__name__), call_function by "
                          "the function's __name__, call_method by the method name; skip "
                          "placeholder, get_attr and output nodes")
    for bad in ("graph", nn.Linear(2, 2)):
        expect_raises(lambda: fn(bad), TypeError, f"count_ops({describe(bad)})",
                      "a TypeError: gm must be a torch.fx.GraphModule")
    n = _counts(cases[0][1])
    return f"tiny model: {sum(n.values())} ops, {n['Linear']} of them Linear"


# --------------------------------------------------------------------------- exercise 2

def _check_recompiled(gm, what):
    if gm.code != gm.graph.python_code(root_module="self").src:
        fail(f"{what}: the module's code is stale", "gm.code generated from the rewritten graph",
             "code generated before the rewrite", "call gm.recompile() after changing gm.graph")


@exercise
def fuse_sibling_linears(fn):
    """``fn(gm) -> groups fused``: linears reading one node merged into one matmul."""
    model = _model()
    with torch.no_grad():
        ref = model(_TOKENS)
    gm = compilation.trace_tiny(model)
    got = fn(gm)
    expect_equal(got, 8, "fuse_sibling_linears(traced tiny model), the number of groups fused",
                 "4 blocks x (Q, K, V and gate, up) = 8 groups; the output projection, the "
                 "down projection and the LM head have no sibling")
    _check_recompiled(gm, "the fused tiny model")
    n = _counts(gm).get("Linear", 0)
    expect_equal(n, 17, "Linear calls in the fused tiny model",
                 "29 before: per block 7 (q, k, v, o, gate, up, down) plus the LM head; after, "
                 "per block 4 (qkv, o, gate-up, down) plus the LM head")
    with torch.no_grad():
        out = gm(_TOKENS)
        again = model(_TOKENS)
    expect_close(out, ref, rtol=1e-5, atol=1e-5, what="logits of the fused graph",
                 hint="concatenate the weights along dim 0 (output features) in the order the "
                      "slices are taken; each original output is a slice of the last dimension")
    expect_close(again, ref, rtol=0, atol=1e-6, what="logits of the original model after fusing",
                 hint="build new nn.Linear modules; do not change the original layers' weights "
                      "(the GraphModule shares them with the model)")
    toy_mod = _Toy()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = toy_mod(x)
    toy = fx.symbolic_trace(toy_mod)
    got = fn(toy)
    expect_equal(got, 2, "fuse_sibling_linears on a module with linears a, b (bias) and c "
                         "(no bias) reading x; d, e (no bias) reading relu(x); f reading d * 2",
                 "2 groups: (a, b) and (d, e). c has no bias, so it is not fused with a and b; "
                 "f has no sibling")
    _check_recompiled(toy, "the fused small module")
    expect_equal(_counts(toy).get("Linear", 0), 4, "Linear calls in the fused small module",
                 "6 linears, two groups of two merged: 4 remain")
    with torch.no_grad():
        expect_close(toy(x), want, rtol=1e-5, atol=1e-5, what="the fused small module's output",
                     hint="insert the fused call before the first linear of its group, so every "
                          "user of the group's outputs comes after it; keep the biases")
    lone = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    expect_equal(fn(lone), 0, "fuse_sibling_linears on a chain of linears (no siblings)",
                 "a group needs two or more linears reading the same node")
    for bad in (None, nn.Linear(2, 2)):
        expect_raises(lambda: fn(bad), TypeError, f"fuse_sibling_linears({describe(bad)})",
                      "a TypeError: gm must be a torch.fx.GraphModule")
    err = float((out - ref).abs().max())
    return f"8 groups, 29 -> 17 matmuls, logits within {err:.1e} of eager"


# --------------------------------------------------------------------------- exercise 3

class _Clock:
    """A fake timer: candidates advance it by their cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _candidates(clock, costs, first_extra=None, spikes=None, fails=None):
    """Fake candidates ``name -> fn(n)`` costing ``costs[name](n)`` seconds of fake time.

    first_extra[name]: added to the first call for each n (a JIT compile);
    spikes[name]: call indices (per n, counting from 0) that cost 100x (preemption);
    fails[name](n): True when the candidate does not support n (it raises).
    """
    log: list = []
    calls: dict = {}

    def make(name):
        def candidate(n):
            log.append(name)
            if fails and name in fails and fails[name](n):
                raise ValueError(f"{name} does not support n={n}")
            k = calls.get((name, n), 0)
            calls[(name, n)] = k + 1
            cost = costs[name](n)
            if k == 0 and first_extra:
                cost += first_extra.get(name, 0.0)
            if spikes and k in spikes.get(name, ()):
                cost *= 100
            clock.now += cost
            return (name, n)
        return candidate

    return {name: make(name) for name in costs}, log


_U = 2.0 ** -20     # the fake clock's tick (~0.95 µs): sums of ticks are exact in float64
_COSTS = {"small_tile": lambda n: _U * (100 + n * n),
          "large_tile": lambda n: _U * (500 + n * n // 5)}


@exercise
def autotuner(cls):
    """``Autotuner(candidates, warmup=, repeats=, timer=)``: ``best``, ``cache``, ``__call__``."""
    hint_timer = "time each call with the timer you were given: t0 = timer(); fn(*args); timer() - t0"
    clock = _Clock()
    cands, log = _candidates(clock, _COSTS)
    tuner = cls(cands, warmup=1, repeats=5, timer=clock)
    for n, want in ((8, "small_tile"), (64, "large_tile")):
        got = tuner.best(("n", n), n)
        expect_equal(got, want, f"best(('n', {n}), {n}) with costs small_tile = 100 + n² ticks, "
                                f"large_tile = 500 + n²/5 ticks", hint_timer)
    expect_equal(len(log), 2 * 2 * 6, "calls made while tuning 2 keys x 2 candidates with "
                                      "warmup=1, repeats=5",
                 "each candidate runs warmup + repeats times for a new key, and no more")
    cache = getattr(tuner, "cache", None)
    expect_type(cache, dict, "tuner.cache", hint="keep a dict key -> chosen candidate's name")
    expect_equal(dict(cache), {("n", 8): "small_tile", ("n", 64): "large_tile"}, "tuner.cache")
    before = len(log)
    expect_equal(tuner.best(("n", 8), 8), "small_tile", "best(('n', 8), 8) a second time")
    if len(log) != before:
        fail("best() for a key already tuned ran candidates again",
             "no candidate called (the choice comes from the cache)",
             f"{len(log) - before} calls", "look the key up in the cache before timing anything")
    result = tuner(("n", 64), 64)
    expect_equal(result, ("large_tile", 64), "tuner(('n', 64), 64)",
                 "__call__ runs the chosen candidate on the arguments and returns its result")
    expect_equal(log[before:], ["large_tile"], "candidates called by tuner(('n', 64), 64)",
                 "a tuned key runs only its winner, once")

    # warm-up: a candidate that is slow only on its first call (it compiles) must still win
    clock = _Clock()
    costs = dict(_COSTS, jit=lambda n: 50 * _U)
    cands, log = _candidates(clock, costs, first_extra={"jit": 10 ** 6 * _U})
    got = cls(cands, warmup=1, repeats=5, timer=clock).best(("n", 8), 8)
    expect_equal(got, "jit", "best() when 'jit' costs 10⁶ ticks on its first call and 50 after",
                 "run warmup untimed calls of each candidate before timing it")
    for warmup, repeats in ((0, 3), (2, 4)):
        clock = _Clock()
        cands, log = _candidates(clock, _COSTS)
        cls(cands, warmup=warmup, repeats=repeats, timer=clock).best(("n", 8), 8)
        expect_equal(log.count("small_tile"), warmup + repeats,
                     f"calls of one candidate with warmup={warmup}, repeats={repeats}",
                     "warmup untimed calls, then repeats timed calls")

    # noise: two of five timed runs of the true winner preempted (x100)
    clock = _Clock()
    cands, log = _candidates(clock, _COSTS, spikes={"small_tile": (2, 4)})
    got = cls(cands, warmup=1, repeats=5, timer=clock).best(("n", 8), 8)
    expect_equal(got, "small_tile", "best() when 2 of small_tile's 5 timed runs were "
                                    "preempted (100x slower)",
                 "time each repeat on its own and take a robust statistic (the median, or the "
                 "minimum), not the mean or the total")

    # a tactic that does not support the shape is skipped; none at all is an error
    clock = _Clock()
    costs = dict(_COSTS, fast_small_only=lambda n: 10 * _U)
    cands, log = _candidates(clock, costs, fails={"fast_small_only": lambda n: n > 32})
    tuner = cls(cands, warmup=1, repeats=3, timer=clock)
    expect_equal(tuner.best(("n", 64), 64), "large_tile",
                 "best() at n=64 when 'fast_small_only' raises for n > 32",
                 "a candidate that raises is skipped for that key")
    expect_equal(tuner.best(("n", 8), 8), "fast_small_only",
                 "best() at n=8, where 'fast_small_only' works")
    clock = _Clock()
    cands, _ = _candidates(clock, _COSTS, fails={k: (lambda n: True) for k in _COSTS})
    expect_raises(lambda: cls(cands, warmup=1, repeats=2, timer=clock).best(("n", 8), 8),
                  RuntimeError, "best() when every candidate raises",
                  "a RuntimeError: there is nothing to choose")

    # ties go to the first candidate
    clock = _Clock()
    cands, _ = _candidates(clock, {"first": lambda n: 100 * _U, "second": lambda n: 100 * _U})
    expect_equal(cls(cands, warmup=0, repeats=3, timer=clock).best("k", 1), "first",
                 "best() with two equally fast candidates", "a tie goes to the first candidate")

    for kwargs, kind, what in (({}, ValueError, "no candidates"),
                               ({"repeats": 0}, ValueError, "repeats=0"),
                               ({"warmup": -1}, ValueError, "warmup=-1"),
                               ({"bad": 3}, TypeError, "a candidate that is not callable")):
        cands = {} if what == "no candidates" else \
            ({"ok": lambda n: n, "bad": 3} if "bad" in kwargs else {"ok": lambda n: n})
        opts = {k: v for k, v in kwargs.items() if k != "bad"}
        expect_raises(lambda: cls(cands, timer=_Clock(), **opts), kind, f"Autotuner with {what}",
                      f"a {kind.__name__} from the constructor")

    # a real measurement: the same matmul done once or eight times
    a = torch.randn(96, 96, generator=torch.Generator().manual_seed(0))
    real = cls({"once": lambda x: x @ x, "eight_times": lambda x: [x @ x for _ in range(8)][-1]},
               warmup=2, repeats=9)
    picked = real.best(("matmul", 96), a)
    if picked != "once":
        measurement_warning("the auto-tuner's real timing", "'once' (one 96x96 matmul)",
                            f"{picked!r} (eight of them)",
                            "the machine was heavily loaded while timing; the logic checks "
                            "above passed")
    return "decisions, cache, warm-up, noise and unsupported tactics all hold"


# --------------------------------------------------------------------------- exercises 4, 5

def _histograms():
    g = torch.Generator().manual_seed(7)
    normal = torch.randn(200_000, generator=g)
    heavy = torch.randn(100_000, generator=g) * torch.rand(100_000, generator=g).pow(3) * 4
    heavy[:20] *= 25
    sparse = torch.randn(400, generator=g)
    relu = torch.relu(torch.randn(50_000, generator=g)) * 3
    uniform = torch.rand(200_000, generator=g) * 2 - 1
    out = [("|N(0,1)|, 200,000 samples", *compilation.abs_histogram(normal)),
           ("a heavy-tailed activation with 20 outliers", *compilation.abs_histogram(heavy)),
           ("400 samples (many empty bins)", *compilation.abs_histogram(sparse)),
           ("relu(N(0,1)): half of the mass in bin 0", *compilation.abs_histogram(relu)),
           ("|N(0,1)| in 512 bins", *compilation.abs_histogram(normal, 512)),
           ("|U(-1, 1)|: no tail to clip", *compilation.abs_histogram(uniform))]
    return out


def _float(x, what):
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        fail(f"{what} is not a number", "a float", describe(x), "return float(...)")
    return float(x)


@exercise
def percentile_amax(fn):
    """``fn(hist, edges, percentile) -> amax``: the percentile calibrator."""
    hist = torch.tensor([10.0, 0.0, 80.0, 10.0])
    edges = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    for p, want in ((10, 1.0), (50, 3.0), (90, 3.0), (90.0001, 4.0), (100, 4.0)):
        what = f"percentile_amax([10, 0, 80, 10], edges 0..4, {p})"
        expect_close(_float(fn(hist, edges, p), what), want, rtol=1e-12, what=what,
                     hint="the upper edge of the first bin where the cumulative count reaches "
                          "percentile/100 of the total (reaching it exactly counts)")
    expect_close(_float(fn(hist.long(), edges, 50), "with integer counts"), 3.0, rtol=1e-12,
                 what="percentile_amax with int64 counts", hint="convert the counts to float64")
    rows = []
    for name, h, e in _histograms():
        for p in (99.0, 99.9, 99.99):
            what = f"percentile_amax on {name}, {p}"
            want = compilation.percentile_amax(h, e, p)
            expect_close(_float(fn(h, e, p), what), want, rtol=1e-12, what=what)
        rows.append(f"{fn(h, e, 99.99):.3g}")
    for bad, what in ((0, "percentile=0"), (100.5, "percentile=100.5"),
                      (float("nan"), "percentile=nan")):
        expect_raises(lambda: fn(hist, edges, bad), ValueError, f"percentile_amax with {what}",
                      "a ValueError: percentile must be in (0, 100]")
    expect_raises(lambda: fn(hist, edges[:-1], 50), ValueError,
                  "percentile_amax with 4 bins and 4 edges", "a ValueError: edges needs len(hist) + 1")
    expect_raises(lambda: fn(torch.tensor([1.0, -1.0, 3.0, 0.0]), edges, 50), ValueError,
                  "percentile_amax with a negative count", "a ValueError: counts are >= 0")
    expect_raises(lambda: fn(torch.zeros(4), edges, 50), ValueError,
                  "percentile_amax with an empty histogram", "a ValueError: nothing to calibrate")
    return "99.99th percentile of the test histograms: " + ", ".join(rows)


@exercise
def entropy_amax(fn):
    """``fn(hist, edges) -> amax``: TensorRT's entropy calibrator (KL search)."""
    rows = []
    for name, h, e in _histograms():
        what = f"entropy_amax on {name}"
        want = compilation.entropy_amax(h, e)
        got = _float(fn(h.clone(), e.clone()), what)
        if not math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12):
            div = compilation.entropy_divergences(h)
            i_want = int(torch.searchsorted(e, torch.tensor(want, dtype=e.dtype)))
            fail(f"{what}: the threshold is wrong",
                 f"{want:.6g} (bin {i_want} of {h.numel()}; its KL {float(div[i_want - 128]):.4g})",
                 f"{got:.6g}",
                 "P = hist[:i] with every count beyond bin i-1 added to bin i-1; Q = hist[:i] "
                 "merged into 128 groups (bin j in group j*128//i), each group's total spread "
                 "over its non-empty bins only; normalize both; KL = sum p log(p/q) over p > 0; "
                 "i from 128 to len(hist) inclusive; the threshold is edges[i] of the minimum "
                 "(the largest i among equal minima)")
        rows.append(f"{got:.3g} of max {float(e[-1]):.3g}")
    short = torch.ones(100)
    expect_raises(lambda: fn(short, torch.linspace(0, 1, 101, dtype=torch.float64)), ValueError,
                  "entropy_amax with 100 bins", "a ValueError: fewer bins than the 128 levels")
    h, e = _histograms()[0][1:]
    expect_raises(lambda: fn(torch.zeros_like(h), e), ValueError,
                  "entropy_amax with an empty histogram", "a ValueError: nothing to calibrate")
    expect_raises(lambda: fn(h, e[:-1]), ValueError, "entropy_amax with len(edges) == len(hist)",
                  "a ValueError: edges needs len(hist) + 1")
    return "thresholds " + "; ".join(rows)
