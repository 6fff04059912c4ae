"""The lab-21 checkers pass right answers, catch planted bugs and refuse the library's own."""
import math
import statistics
import time

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from utils import compilation
from utils.checks import ExerciseFailed, LibraryAnswer
from utils.checks import ch21 as check

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- exercise 1

def _name(gm, node):
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return node.target
    return node.target.__name__


def count_ops(gm):
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"gm must be a GraphModule, got {type(gm).__name__}")
    out = {}
    for node in gm.graph.nodes:
        if node.op.startswith("call_"):
            out[_name(gm, node)] = out.get(_name(gm, node), 0) + 1
    return out


def test_count_ops_passes(capsys):
    check.count_ops(count_ops)
    assert "passed" in capsys.readouterr().out


def count_ops_all_nodes(gm):            # bug: placeholders and outputs counted too
    out = count_ops(gm)
    out["output"] = 1
    return out


def count_ops_module_paths(gm):         # bug: call_module keyed by path, not class
    out = {}
    for node in gm.graph.nodes:
        if node.op.startswith("call_"):
            key = node.target if node.op == "call_module" else _name(gm, node)
            out[key] = out.get(key, 0) + 1
    return out


def count_ops_no_check(gm):             # bug: no TypeError for a non-graph
    try:
        return count_ops(gm)
    except TypeError:
        return {}


@pytest.mark.parametrize("bug", [count_ops_all_nodes, count_ops_module_paths, count_ops_no_check])
def test_count_ops_bugs_fail(bug):
    with pytest.raises(ExerciseFailed):
        check.count_ops(bug)


def test_count_ops_library_refused():
    with pytest.raises(LibraryAnswer):
        check.count_ops(compilation.count_ops)


def test_count_ops_library_allowed(library_answers_allowed):
    check.count_ops(compilation.count_ops)


# --------------------------------------------------------------------------- exercise 2

def fuse_sibling_linears(gm, *, check_bias=True, copy_weights=True, recompile=True,
                         insert_first=True):
    if not isinstance(gm, fx.GraphModule):
        raise TypeError("gm must be a GraphModule")
    groups = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
            lin = gm.get_submodule(node.target)
            key = (node.args[0], lin.bias is not None) if check_bias else (node.args[0],)
            groups.setdefault(key, []).append(node)
    n = 0
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        lins = [gm.get_submodule(x.target) for x in nodes]
        has_bias = lins[0].bias is not None
        new = nn.Linear(lins[0].in_features, sum(l.out_features for l in lins), bias=has_bias)
        with torch.no_grad():
            w = torch.cat([l.weight for l in lins])
            if copy_weights:
                new.weight.copy_(w)
            else:                                     # bug: the original layer is overwritten
                lins[0].weight = nn.Parameter(w)
                new = lins[0]
            if has_bias:
                new.bias = nn.Parameter(torch.cat([l.bias if l.bias is not None
                                                   else torch.zeros(l.out_features) for l in lins]))
        name = f"fused{n}"
        gm.add_submodule(name, new)
        where = nodes[0] if insert_first else nodes[-1]
        with gm.graph.inserting_before(where):
            big = gm.graph.call_module(name, (nodes[0].args[0],))
            start = 0
            pieces = []
            for x, l in zip(nodes, lins):
                pieces.append(gm.graph.call_method("narrow", (big, -1, start, l.out_features)))
                start += l.out_features
        for x, piece in zip(nodes, pieces):
            x.replace_all_uses_with(piece)
            gm.graph.erase_node(x)
        n += 1
    if recompile:
        gm.recompile()
    return n


def test_fuse_sibling_linears_passes(capsys):
    check.fuse_sibling_linears(fuse_sibling_linears)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize("bug", [
    lambda gm: fuse_sibling_linears(gm, check_bias=False),       # bias and no-bias merged
    lambda gm: fuse_sibling_linears(gm, copy_weights=False),     # original layers mutated
    lambda gm: fuse_sibling_linears(gm, recompile=False),        # stale code
    lambda gm: fuse_sibling_linears(gm, insert_first=False),     # a user comes before the fused call
])
def test_fuse_sibling_linears_bugs_fail(bug):
    with pytest.raises(ExerciseFailed):
        check.fuse_sibling_linears(bug)


def test_fuse_sibling_linears_wrong_order_fails():
    def swapped(gm):                                 # bug: slices taken in reverse order
        n = fuse_sibling_linears(gm)
        for mod in gm.modules():
            if isinstance(mod, nn.Linear) and mod.out_features == 256:     # fused q|k|v
                with torch.no_grad():
                    mod.weight.copy_(torch.flip(mod.weight, [0]))
        return n
    with pytest.raises(ExerciseFailed):
        check.fuse_sibling_linears(swapped)


def test_fuse_sibling_linears_library_refused():
    with pytest.raises(LibraryAnswer):
        check.fuse_sibling_linears(compilation.fuse_sibling_linears)


def test_fuse_sibling_linears_library_allowed(library_answers_allowed):
    check.fuse_sibling_linears(compilation.fuse_sibling_linears)


# --------------------------------------------------------------------------- exercise 3

class Autotuner:
    def __init__(self, candidates, warmup=1, repeats=5, timer=time.perf_counter, stat="median",
                 use_cache=True, skip_failures=True):
        if not candidates:
            raise ValueError("no candidates")
        if any(not callable(f) for f in candidates.values()):
            raise TypeError("candidates must be callable")
        if warmup < 0 or repeats < 1:
            raise ValueError("warmup >= 0 and repeats >= 1")
        self.candidates, self.warmup, self.repeats, self.timer = candidates, warmup, repeats, timer
        self.stat, self.use_cache, self.skip_failures = stat, use_cache, skip_failures
        self.cache = {}

    def _time(self, fn, args):
        for _ in range(self.warmup):
            fn(*args)
        if self.stat == "total":
            t0 = self.timer()
            for _ in range(self.repeats):
                fn(*args)
            return self.timer() - t0
        times = []
        for _ in range(self.repeats):
            t0 = self.timer()
            fn(*args)
            times.append(self.timer() - t0)
        return {"median": statistics.median, "min": min, "mean": statistics.mean}[self.stat](times)

    def best(self, key, *args):
        if self.use_cache and key in self.cache:
            return self.cache[key]
        costs = {}
        for name, fn in self.candidates.items():
            try:
                costs[name] = self._time(fn, args)
            except Exception:
                if not self.skip_failures:
                    raise
        if not costs:
            raise RuntimeError("every candidate failed")
        self.cache[key] = min(costs, key=costs.get)
        return self.cache[key]

    def __call__(self, key, *args):
        return self.candidates[self.best(key, *args)](*args)


@pytest.mark.parametrize("stat", ["median", "min"])
def test_autotuner_passes(stat, capsys):
    check.autotuner(lambda *a, **k: Autotuner(*a, stat=stat, **k))
    assert "passed" in capsys.readouterr().out


class NoWarmup(Autotuner):
    def _time(self, fn, args):
        self.warmup, w = 0, self.warmup
        try:
            return super()._time(fn, args)
        finally:
            self.warmup = w


class WallClock(Autotuner):                      # bug: ignores the timer it was given
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.timer = time.perf_counter


class LastTie(Autotuner):                        # bug: ties go to the last candidate
    def best(self, key, *args):
        if key in self.cache:
            return self.cache[key]
        costs = {n: self._time(f, args) for n, f in self.candidates.items()}
        self.cache[key] = max((c, i, n) for i, (n, c) in enumerate(costs.items())
                              if c == min(costs.values()))[2]
        return self.cache[key]


class NoValidation(Autotuner):                   # bug: accepts repeats=0
    def __init__(self, candidates, warmup=1, repeats=5, timer=time.perf_counter):
        super().__init__(candidates, warmup, max(repeats, 1), timer)


@pytest.mark.parametrize("bug", [
    lambda *a, **k: Autotuner(*a, stat="mean", **k),
    lambda *a, **k: Autotuner(*a, stat="total", **k),
    lambda *a, **k: Autotuner(*a, use_cache=False, **k),
    lambda *a, **k: Autotuner(*a, skip_failures=False, **k),
    NoWarmup, WallClock, LastTie, NoValidation,
])
def test_autotuner_bugs_fail(bug):
    with pytest.raises(ExerciseFailed):
        check.autotuner(bug)


def test_autotuner_library_refused():
    with pytest.raises(LibraryAnswer):
        check.autotuner(compilation.Autotuner)


def test_autotuner_library_allowed(library_answers_allowed):
    check.autotuner(compilation.Autotuner)


# --------------------------------------------------------------------------- exercise 4

def percentile_amax(hist, edges, percentile=99.99, upper=True):
    if not 0 < percentile <= 100:
        raise ValueError("percentile must be in (0, 100]")
    if len(edges) != len(hist) + 1:
        raise ValueError("edges must have len(hist) + 1 entries")
    h = np.asarray(hist, dtype=np.float64)
    if (h < 0).any() or h.sum() == 0:
        raise ValueError("counts must be >= 0 and not all 0")
    cum = np.cumsum(h)
    k = int(np.argmax(cum >= percentile / 100 * h.sum()))
    return float(edges[k + 1] if upper else edges[k])


def test_percentile_amax_passes(capsys):
    check.percentile_amax(percentile_amax)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize("bug", [
    lambda h, e, p=99.99: percentile_amax(h, e, p, upper=False),      # the lower edge
    lambda h, e, p=99.99: percentile_amax(h, e, p * 0.01 if p > 1 else p),   # fraction vs percent
    lambda h, e, p=99.99: percentile_amax(h, e, min(max(p, 1e-9), 100)),     # no range check
])
def test_percentile_amax_bugs_fail(bug):
    with pytest.raises(ExerciseFailed):
        check.percentile_amax(bug)


def test_percentile_amax_library_refused():
    with pytest.raises(LibraryAnswer):
        check.percentile_amax(compilation.percentile_amax)


def test_percentile_amax_library_allowed(library_answers_allowed):
    check.percentile_amax(compilation.percentile_amax)


# --------------------------------------------------------------------------- exercise 5
# Written as a plain loop over thresholds with NumPy, as NVIDIA's pytorch-quantization does.

def entropy_amax(hist, edges, levels=128, start=128, outliers=True, nonzero_only=True,
                 last_min=True, edge_offset=0, include_last=True):
    h = np.asarray(hist, dtype=np.float64)
    if len(h) < start:
        raise ValueError("need at least 128 bins")
    if len(edges) != len(h) + 1:
        raise ValueError("edges must have len(hist) + 1 entries")
    if h.sum() <= 0:
        raise ValueError("empty histogram")
    divs = []
    for i in range(start, len(h) + 1 if include_last else len(h)):
        p = h[:i].copy()
        if outliers:
            p[-1] += h[i:].sum()
        group = np.arange(i) * levels // i
        filled = h[:i] > 0
        total = np.bincount(group, weights=h[:i], minlength=levels)
        spread_over = np.bincount(group, weights=filled if nonzero_only else np.ones(i),
                                  minlength=levels)
        q = total[group] / np.maximum(spread_over[group], 1)
        if nonzero_only:
            q[~filled] = 0
        if q.sum() == 0:
            divs.append(math.inf)
            continue
        p, q = p / p.sum(), q / q.sum()
        s = p > 0
        divs.append(math.inf if (q[s] == 0).any() else float(np.sum(p[s] * np.log(p[s] / q[s]))))
    divs = np.array(divs)
    best = np.nonzero(divs == divs.min())[0]
    i = (best.max() if last_min else best.min()) + start
    return float(edges[i + edge_offset])


def test_entropy_amax_passes(capsys):
    check.entropy_amax(entropy_amax)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize("bug", [
    lambda h, e: entropy_amax(h, e, outliers=False),          # clipped counts dropped from P
    lambda h, e: entropy_amax(h, e, nonzero_only=False),      # Q spread over empty bins too
    lambda h, e: entropy_amax(h, e, edge_offset=-1),          # lower edge of the last bin
    lambda h, e: entropy_amax(h, e, include_last=False),      # the full range never tried
])
def test_entropy_amax_bugs_fail(bug):
    with pytest.raises(ExerciseFailed):
        check.entropy_amax(bug)


def test_entropy_amax_library_refused():
    with pytest.raises(LibraryAnswer):
        check.entropy_amax(compilation.entropy_amax)


def test_entropy_amax_library_allowed(library_answers_allowed):
    check.entropy_amax(compilation.entropy_amax)
