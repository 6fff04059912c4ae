"""Checkers for lab 18, batching strategies.

The oracles: :func:`utils.tiny.generate` run on each request alone for every token an
engine produces (batching must not change outputs), and the reference schedulers in
:mod:`utils.serving` for every decision and every timestamp, replayed on the same
seeded traces under the same deterministic cost model. The engines' clock logs are
compared with the reference's iteration by iteration; at the first difference the
message shows both iterations (which requests, which passes) and names the rule of the
policy that was broken. Metrics are held to ``numpy.percentile``.
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Mapping

import numpy as np

from .. import serving as sv
from . import exercise, expect_close, expect_equal, expect_type, fail

_MODEL = {}
_REFS: dict = {}


def _model():
    if "target" not in _MODEL:
        from .. import tiny
        _MODEL["target"] = tiny.load("tiny-target")
    return _MODEL["target"]


def _alone(requests):
    """Each request's tokens from utils.tiny.generate, run on its own (cached per trace)."""
    from .. import tiny
    out = {}
    for r in requests:
        key = (r.prompt, r.max_new)
        if key not in _REFS:
            _REFS[key] = tiny.generate(_model(), list(r.prompt), r.max_new)
        out[r.rid] = _REFS[key]
    return out


def _trace():
    """Twelve short requests with the awkward cases in them: a one-token request, two
    requests arriving together, and an idle gap before the last three."""
    base = sv.make_trace(12, rate=300.0, seed=5, median_out=5, max_out=10)
    reqs = []
    for r in base:
        arrival = r.arrival + (0.2 if r.rid >= 9 else 0.0)
        if r.rid == 5:
            arrival = reqs[4].arrival          # arrives together with request 4
        reqs.append(dataclasses.replace(r, arrival=round(arrival, 6),
                                        max_new=1 if r.rid == 3 else r.max_new))
    return reqs


def _completions(got, requests, what):
    """Check the engine's return value has one Completion-like entry per request."""
    expect_type(got, Mapping, what, hint="return a dict {request id: Completion}")
    want = [r.rid for r in requests]
    if sorted(got) != sorted(want):
        missing = [k for k in want if k not in got]
        extra = [k for k in got if k not in want]
        fail(f"{what} has the wrong request ids", f"one entry for each of the ids {want}",
             f"missing {missing}, unexpected {extra}",
             "make one Completion(r.rid, r.arrival) per request, up front, and return them all")
    for rid in want:
        c = got[rid]
        if not (hasattr(c, "tokens") and hasattr(c, "times")):
            fail(f"{what}[{rid}] is not a Completion", "an object with .tokens and .times lists",
                 f"{type(c).__name__}", "use utils.serving.Completion and its emit(token, time)")
    return got


def _compare_run(got, ref, alone, requests, what, hint_times):
    for r in requests:
        g = got[r.rid]
        tokens = [int(t) for t in g.tokens]
        if tokens != alone[r.rid]:
            i = next((k for k, (a, b) in enumerate(zip(tokens, alone[r.rid])) if a != b),
                     min(len(tokens), len(alone[r.rid])))
            fail(f"{what}: request {r.rid}'s tokens differ from generating it alone",
                 f"{len(alone[r.rid])} tokens {alone[r.rid]}",
                 f"{len(tokens)} tokens {tokens} (first difference at token {i})",
                 "each request needs its own KV cache; prefill the whole prompt (or its "
                 "chunks, in order) before decoding, feed each request its own last token, "
                 "take the argmax of its own logits row, and stop after exactly max_new tokens")
        times = list(g.times)
        want = ref[r.rid].times
        if len(times) != len(want) or any(not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
                                          for a, b in zip(times, want)):
            i = next((k for k, (a, b) in enumerate(zip(times, want))
                      if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)), min(len(times), len(want)))
            fail(f"{what}: request {r.rid}'s token times differ from the reference schedule",
                 f"times (ms) {[round(t * 1e3, 4) for t in want]}",
                 f"times (ms) {[round(t * 1e3, 4) for t in times]} (first difference at token {i})",
                 hint_times)


def _ms(t):
    return f"{t * 1e3:.4g} ms"


def _norm_iteration(it):
    """(start, end, sorted decode ids, sorted (id, tokens) prefill passes) of a logged iteration."""
    try:
        decode = sorted(int(r) for r in it.decode)
        prefill = sorted((int(r), int(n)) for r, n in it.prefill)
    except (TypeError, ValueError):
        fail("the clock log has an iteration that is not ids and token counts",
             "decode=[request ids], prefill=[(request id, prompt tokens), ...]",
             f"decode={it.decode!r}, prefill={it.prefill!r}",
             "declare each iteration with clock.iteration(decode=[r.rid, ...], "
             "prefill=[(r.rid, n_tokens), ...])")
    return float(it.start), float(it.end), decode, prefill


def _describe(it):
    if it is None:
        return "no iteration (the schedule has ended)"
    start, end, decode, prefill = it
    parts = [f"starts at {_ms(start)}"]
    parts.append(f"decode pass over requests {decode}" if decode else "no decode pass")
    parts.append("prefill " + ", ".join(f"{n} prompt token{'s' if n != 1 else ''} of request {r}"
                                        for r, n in prefill)
                 if prefill else "no prefill")
    return "; ".join(parts)


def _state(log, requests, upto):
    """Each request's progress before iteration ``upto`` of a (reference) log: prompt tokens
    in the cache, tokens produced, and the iteration its prompt completed in."""
    by_id = {r.rid: r for r in requests}
    prefilled = {r.rid: 0 for r in requests}
    tokens = {r.rid: 0 for r in requests}
    for _, _, decode, prefill in log[:upto]:
        for rid in decode:
            tokens[rid] += 1
        for rid, n in prefill:
            prefilled[rid] += n
            if prefilled[rid] == by_id[rid].prompt_len:
                tokens[rid] += 1
    return prefilled, tokens


def _ids(items):
    ids = [rid for rid, _ in items]
    return f"request {ids[0]}" if len(ids) == 1 else "requests " + ", ".join(map(str, ids))


def _v(items, one, many):
    return one if len(items) == 1 else many


def _details(items):
    return ", ".join(d for _, d in items)


def _diagnose(ref_it, got_it, requests, ref_log, i, policy):
    """Which rule of the policy the first differing iteration breaks, in words."""
    by_id = {r.rid: r for r in requests}
    if got_it is None:
        return ("your engine stopped here while requests still had work: keep iterating until "
                "every request has exactly max_new tokens")
    if ref_it is None:
        return ("every request is already complete in the reference: an extra iteration means "
                "a request ran past its max_new tokens or a finished request was not retired")
    prefilled, tokens = _state(ref_log, requests, i)
    start = ref_it[0]
    found: dict[str, list] = {}

    def note(kind, rid, detail=""):
        found.setdefault(kind, []).append((rid, detail))

    ref_pre, got_pre = dict(ref_it[3]), dict(got_it[3])
    for rid in sorted(set(ref_pre) | set(got_pre)):
        r = by_id.get(rid)
        if r is None:
            note("unknown", rid)
        elif rid in ref_pre and rid not in got_pre:
            if prefilled[rid] > 0:
                note("next_chunk", rid, f"{r.prompt_len - prefilled[rid]} left")
            else:
                note("admit_" + policy, rid, _ms(r.arrival))
        elif rid in got_pre and rid not in ref_pre:
            if r.arrival > start + 1e-12:
                note("not_arrived", rid, _ms(r.arrival))
            elif prefilled[rid] >= r.prompt_len:
                note("prefilled_twice", rid)
            elif policy == "batched":
                note("not_in_batch", rid)
            elif prefilled[rid] > 0:
                note("chunk_no_room", rid)
            else:
                note("must_wait", rid)
        elif ref_pre[rid] != got_pre[rid]:
            note("chunk_size", rid, f"request {rid}: {ref_pre[rid]} in the reference, {got_pre[rid]} in "
                                    f"yours, {r.prompt_len - prefilled[rid]} left")
    for rid in sorted(set(ref_it[2]) - set(got_it[2])):
        r = by_id[rid]
        note("must_decode", rid, f"{tokens[rid]} of {r.max_new}")
    for rid in sorted(set(got_it[2]) - set(ref_it[2])):
        r = by_id.get(rid)
        if r is None:
            note("unknown", rid)
        elif tokens[rid] == 0:
            note("no_token_yet", rid)
        elif tokens[rid] >= r.max_new:
            note("finished", rid, f"{r.max_new}")
        else:
            note("not_decoding", rid)

    text = {
        "unknown": lambda x: f"{_ids(x)} {_v(x, 'is', 'are')} not in the trace",
        "next_chunk": lambda x: f"{_ids(x)} {_v(x, 'is', 'are')} still prefilling ({_details(x)} prompt tokens): the next "
                                f"chunk belongs in this iteration",
        "admit_batched": lambda x: f"{_ids(x)} (arrived {_details(x)}) {_v(x, 'belongs', 'belong')} in the batch launched at "
                                   f"{_ms(start)}: a batch takes every request arrived by its launch, at "
                                   f"most max_batch, in arrival order",
        "admit_continuous": lambda x: f"{_ids(x)} arrived by this iteration's start ({_details(x)}) and a "
                                      f"slot is free: admit arrived requests in arrival order while fewer "
                                      f"than max_batch run, and prefill them",
        "not_arrived": lambda x: f"{_ids(x)} {_v(x, 'arrives', 'arrive')} at {_details(x)}, after this iteration starts "
                                 f"({_ms(start)}): not yet servable",
        "prefilled_twice": lambda x: f"{_ids(x)} already {_v(x, 'has', 'have')} the whole prompt in the cache: prefill once",
        "not_in_batch": lambda x: f"{_ids(x)} {_v(x, 'is', 'are')} not in this batch: a batch holds at most max_batch requests, "
                                  f"and nobody joins a batch once it runs",
        "chunk_no_room": lambda x: f"no room for {_ids(x)}'s next chunk: the token budget goes to the "
                                   f"decodes first, then to prompts in admission order",
        "must_wait": lambda x: f"{_ids(x)} must wait: max_batch requests are already running (those "
                               f"still prefilling count), or the token budget is spent",
        "chunk_size": lambda x: f"chunk sizes differ ({'; '.join(d for _, d in x)}): the budget goes to "
                                f"the {len(ref_it[2])} decode{'s' if len(ref_it[2]) != 1 else ''} first, then to prompts in "
                                f"admission order, "
                                f"each taking min(its remaining prompt, what is left)",
        "must_decode": lambda x: f"{_ids(x)} ({_details(x)} tokens so far) {_v(x, 'decodes', 'decode')} in every "
                                 f"iteration until {_v(x, 'it has', 'they have')} max_new",
        "no_token_yet": lambda x: f"{_ids(x)} {_v(x, 'has', 'have')} no token yet: a request whose prompt completes gets "
                                  f"its first token at the end of that iteration and joins the decode "
                                  f"pass from the next one",
        "finished": lambda x: f"{_ids(x)} already {_v(x, 'has', 'have')} all {_v(x, 'its', 'their')} tokens (max_new {_details(x)}): retire "
                              f"a request as soon as it has max_new tokens",
        "not_decoding": lambda x: f"{_ids(x)} {_v(x, 'is', 'are')} not in this decode pass in the reference",
    }
    notes = [text[k](v) for k, v in found.items()]
    if not math.isclose(ref_it[0], got_it[0], rel_tol=1e-9, abs_tol=1e-12):
        when = f"yours starts at {_ms(got_it[0])}, the reference's at {_ms(ref_it[0])}"
        if policy == "batched":
            notes.insert(0, f"{when}: a batch launches once the server is free, at the earlier of "
                            f"the moment max_batch requests have arrived and the moment the oldest "
                            f"waiting request has waited max_delay (next_batch)")
        else:
            notes.insert(0, f"{when}: an iteration starts when the previous one ends; the clock "
                            f"jumps to the next arrival only when nothing is running")
    if not notes:
        notes.append("the same passes cost another time: declare each iteration's passes with one "
                     "clock.iteration(...) block and run nothing outside it")
    return "; ".join(notes)


def _compare_log(got_log, ref_log, requests, what, policy):
    """Hold the learner's clock log to the reference's, iteration by iteration; at the first
    difference, show both iterations and say which rule of the policy it breaks."""
    got = [_norm_iteration(it) for it in got_log]
    ref = [_norm_iteration(it) for it in ref_log]
    if not got:
        fail(f"{what}: the clock logged no iterations",
             f"{len(ref)} iterations, each declared with clock.iteration(decode=..., prefill=...)",
             "an empty clock.log",
             "wrap every iteration's forward passes in `with clock.iteration(decode=[...], "
             "prefill=[(rid, n), ...]):` on the clock you were given")

    def same(a, b):
        return (a[2] == b[2] and a[3] == b[3]
                and math.isclose(a[0], b[0], rel_tol=1e-9, abs_tol=1e-12)
                and math.isclose(a[1], b[1], rel_tol=1e-9, abs_tol=1e-12))

    for i in range(max(len(got), len(ref))):
        g = got[i] if i < len(got) else None
        r = ref[i] if i < len(ref) else None
        if g is not None and r is not None and same(g, r):
            continue
        before = (f"\n(iteration {i - 1} agreed: {_describe(ref[i - 1])})" if i > 0 else "")
        fail(f"{what}: the schedule diverges from the reference at iteration {i} "
             f"(of {len(ref)} in the reference)",
             f"iteration {i}: {_describe(r)}{before}",
             f"iteration {i}: {_describe(g)}",
             _diagnose(r, g, requests, ref, i, policy))


# ----------------------------------------------------------------------------- exercise 1
def _fake(rid, arrival, times):
    return sv.Completion(rid, arrival, [0] * len(times), list(times))


@exercise
def summarize(fn):
    """``fn(completions)`` -> dict of TTFT/TPOT/e2e percentiles, throughput and counts."""
    hand = [_fake(0, 0.0, [0.1, 0.3, 0.5]), _fake(1, 0.2, [0.25]),
            _fake(2, 0.3, [0.6, 0.7, 0.8, 0.9]), _fake(3, 0.35, [0.5, 1.0])]
    run = sv.serve_continuous(None, sv.make_trace(60, 120.0, seed=3), 8, sv.VirtualClock(sv.REFERENCE_COST))
    single = [_fake(0, 0.0, [0.5]), _fake(1, 0.1, [0.2])]
    cases = [("4 hand-made completions (a list)", hand,
              "TTFT = times[0] - arrival; TPOT = (times[-1] - times[0]) / (len - 1), over "
              "requests with 2+ tokens; e2e = times[-1] - arrival"),
             ("a simulated run of 60 requests (a dict)", run,
              "accept a dict {rid: Completion} as well as a list: use .values()"),
             ("two one-token requests", single,
              "with no request of 2+ tokens the TPOT percentiles are float('nan')")]
    for what, comps, hint in cases:
        got = fn(comps)
        expect_type(got, dict, f"summarize({what})", hint="return a dict")
        want = sv.summarize(comps)
        missing = [k for k in want if k not in got]
        if missing:
            fail(f"summarize({what}) is missing keys", f"keys {list(want)}", f"no {missing}",
                 "ttft_p50 … e2e_p99, throughput, n_requests, n_tokens")
        for k, v in want.items():
            w = f"summarize({what})[{k!r}]"
            if isinstance(v, int):
                expect_equal(got[k], v, what=w, hint="count requests, and tokens over all requests")
            elif math.isnan(v):
                if not (isinstance(got[k], float) and math.isnan(got[k])):
                    fail(w, "nan (no request has two tokens)", repr(got[k]), hint)
            else:
                expect_close(got[k], v, rtol=1e-9, atol=1e-12, what=w,
                             hint=hint if k != "throughput" else
                             "tokens of all requests / (last token's time - first arrival)")
    return "percentiles (numpy's linear), throughput and counts on 3 sets, one-token edge case"


# ----------------------------------------------------------------------------- exercise 2
@exercise
def next_batch(fn):
    """``fn(arrivals, now, max_batch, max_delay)`` -> (launch_time, n)."""
    inf = math.inf
    hand = [
        ([1.0, 2.0, 3.0, 4.0, 5.0], 0.0, 3, 10.0, "the batch fills (3rd arrival) before the timeout"),
        ([1.0, 5.0, 9.0], 0.0, 3, 2.0, "the oldest request times out (1 + 2) before the batch fills"),
        ([1.0, 2.0, 3.0, 4.0, 5.0], 10.0, 3, 1.0, "the server was busy: launch now, take max_batch"),
        ([1.0, 2.0], 0.0, 4, inf, "end of the trace: every remaining request has arrived"),
        ([1.0, 1.0, 2.0], 0.0, 4, 0.0, "max_delay 0: launch at the first arrival with whoever is there"),
        ([0.5, 1.0, 7.0, 8.0, 9.0], 0.0, 4, inf, "static batching waits for a full batch"),
        ([0.5, 1.0, 7.0], 3.0, 1, inf, "max_batch 1: one request at a time"),
    ]
    rng = random.Random(18)
    for _ in range(300):
        n = rng.randint(1, 12)
        arr, t = [], 0.0
        for _ in range(n):
            t = round(t + rng.choice([0.0, rng.random() * 0.02]), 6)
            arr.append(t)
        now = round(rng.random() * (arr[-1] + 0.01), 6)
        delay = rng.choice([0.0, inf, round(rng.random() * 0.01, 6)])
        hand.append((arr, now, rng.randint(1, 6), delay, "a random case"))
    for arrivals, now, mb, delay, why in hand:
        what = f"next_batch({arrivals if len(arrivals) <= 6 else '[...]'}, now={now}, max_batch={mb}, max_delay={delay})"
        got = fn(list(arrivals), now, mb, delay)
        expect_type(got, tuple, what, hint="return a tuple (launch_time, n)")
        if len(got) != 2:
            fail(what, "a tuple (launch_time, n)", f"a tuple of length {len(got)}")
        want = sv.next_batch(arrivals, now, mb, delay)
        hint = (f"{why}. Launch at max(now, min(arrival of request min(max_batch, remaining), "
                "first arrival + max_delay)); take the requests that arrived by then, at most max_batch")
        expect_close(got[0], want[0], rtol=0, atol=1e-12, what=f"{what}: launch time", hint=hint)
        expect_equal(int(got[1]) if isinstance(got[1], (int, np.integer)) else got[1], want[1],
                     what=f"{what}: batch size", hint=hint)
    try:
        fn([1.0], 0.0, 0, inf)
    except ValueError:
        pass
    else:
        fail("next_batch([1.0], 0.0, max_batch=0, inf)", "ValueError", "no error",
             "a batch of at most 0 requests can never launch: raise ValueError")
    return f"{len(hand)} cases (fill, timeout, busy server, end of trace, static), ValueError on max_batch 0"


# ----------------------------------------------------------------------------- exercise 3
@exercise
def serve_batched(fn):
    """``fn(model, requests, max_batch, max_delay, clock)`` -> {rid: Completion}."""
    reqs = _trace()
    model = _model()
    alone = _alone(reqs)
    for mb, delay in ((4, math.inf), (3, 0.004), (8, 0.0), (1, math.inf)):
        kind = "static" if delay == math.inf else f"dynamic, max_delay {delay * 1e3:g} ms"
        what = f"serve_batched(max_batch={mb}, {kind})"
        clock = sv.VirtualClock(sv.REFERENCE_COST)
        got = _completions(fn(model, reqs, mb, delay, clock), reqs, what)
        ref_clock = sv.VirtualClock(sv.REFERENCE_COST)
        ref = sv.serve_batched(None, reqs, mb, delay, ref_clock)
        _compare_log(clock.log, ref_clock.log, reqs, what, "batched")
        _compare_run(got, ref, alone, reqs, what,
                     "launch each batch at next_batch(arrivals of the unserved requests, clock.now, "
                     "...) after clock.advance_to; one iteration prefills every member (one "
                     "prefill pass each), then one decode iteration per step over the members "
                     "still unfinished; stamp each token with clock.now after its iteration")
    return ("12 requests, static and dynamic, 4 settings: the clock log equals the reference's, "
            "tokens equal generate() alone, token times exact")


# ----------------------------------------------------------------------------- exercise 4
@exercise
def chunk_plan(fn):
    """``fn(n_decode, remaining, token_budget)`` -> tokens to prefill per prefilling request."""
    cases = [
        (0, [10, 20], None, "no budget: whole prompts"),
        (3, [10, 20], 16, "3 decodes use 3 of 16; 10 + 3 for the prompts, in order"),
        (20, [10], 16, "the decodes exceed the budget: no prefill this iteration (decodes never wait)"),
        (0, [], 8, "nobody is prefilling"),
        (2, [5, 5, 5], 8, "6 tokens left: 5, then 1, then 0"),
        (0, [7], 7, "exactly the budget"),
        (16, [40, 3], 16, "the budget is all decodes"),
    ]
    rng = random.Random(4)
    for _ in range(200):
        rem = [rng.randint(1, 80) for _ in range(rng.randint(0, 5))]
        cases.append((rng.randint(0, 20), rem, rng.choice([None, rng.randint(1, 96)]), "a random case"))
    for n_decode, remaining, budget, why in cases:
        what = f"chunk_plan({n_decode}, {remaining}, {budget})"
        got = fn(n_decode, list(remaining), budget)
        expect_type(got, (list, tuple), what, hint="return a list with one int per prefilling request")
        want = sv.chunk_plan(n_decode, remaining, budget)
        expect_equal([int(x) if isinstance(x, (int, np.integer)) else x for x in got], want, what=what,
                     hint=f"{why}. Budget left = token_budget - n_decode; each request in order "
                          "takes min(its remaining prompt, what is left, never below 0)")
    return f"{len(cases)} cases: no budget, decodes first, budget exhausted, empty"


# ----------------------------------------------------------------------------- exercise 5
@exercise
def serve_continuous(fn):
    """``fn(model, requests, max_batch, clock, token_budget=None)`` -> {rid: Completion}."""
    reqs = _trace()
    model = _model()
    alone = _alone(reqs)
    for mb, budget in ((4, None), (3, 8), (16, 24), (1, None), (2, 5)):
        what = f"serve_continuous(max_batch={mb}, token_budget={budget})"
        clock = sv.VirtualClock(sv.REFERENCE_COST)
        got = _completions(fn(model, reqs, mb, clock, token_budget=budget), reqs, what)
        ref_clock = sv.VirtualClock(sv.REFERENCE_COST)
        ref = sv.serve_continuous(None, reqs, mb, ref_clock, budget)
        _compare_log(clock.log, ref_clock.log, reqs, what, "continuous")
        _compare_run(got, ref, alone, reqs, what,
                     "each iteration: if nothing runs, advance the clock to the next arrival; admit "
                     "arrived requests while fewer than max_batch run; decoding = running requests "
                     "that already have a token; chunk_plan the rest; one iteration runs the "
                     "prefill chunks and one decode pass; a request whose prompt completes gets "
                     "its first token now and decodes from the next iteration")
    return ("12 requests, 5 settings incl. chunked prefill: the clock log equals the reference's, "
            "tokens equal generate() alone, token times exact")


# ----------------------------------------------------------------------------- exercise 6
def _group(rate_ok, n=20, single=0):
    """n completions of which ``rate_ok`` fraction meet TTFT 0.25 s / TPOT 0.125 s exactly at
    the boundary, the rest miss one of the two; ``single`` one-token requests with late TTFT ok."""
    out, good = [], int(round(rate_ok * n))
    for i in range(n):
        if i < good:
            out.append(_fake(i, 1.0, [1.25, 1.375, 1.5]))           # TTFT 0.25, TPOT 0.125: both at the limit
        elif i % 2:
            out.append(_fake(i, 1.0, [1.5, 1.5625]))                 # TTFT 0.5: misses
        else:
            out.append(_fake(i, 1.0, [1.125, 1.375, 1.625]))         # TPOT 0.25: misses
    for j in range(single):
        out.append(_fake(n + j, 1.0, [1.25]))                        # one token, TTFT at the limit: meets
    return out


@exercise
def goodput(fn):
    """``fn(results_by_rate, ttft_slo, tpot_slo, goal=0.9)`` -> the highest rate meeting the goal."""
    cases = [
        ({1.0: _group(1.0), 2.0: _group(0.95), 3.0: _group(0.85), 4.0: _group(0.95)}, 0.9,
         "attainment 1, 0.95, 0.85, 0.95: the sweep stops at the first miss (3), so 2"),
        ({2.0: _group(0.5), 1.0: _group(0.9)}, 0.9,
         "rates come unsorted; 0.9 meets a goal of 0.9 (>=); 2 misses"),
        ({1.0: _group(0.8)}, 0.9, "even the lowest rate misses: 0.0"),
        ({5.0: _group(1.0), 10.0: _group(0.95, single=20)}, 1.0,
         "goal 1.0; one-token requests have no TPOT and meet that part"),
        ({5.0: _group(1.0), 10.0: _group(1.0, single=5)}, 0.99,
         "a value exactly at the SLO meets it (<=)"),
    ]
    for res, goal, why in cases:
        what = f"goodput(rates {sorted(res)}, ttft_slo=0.25, tpot_slo=0.125, goal={goal})"
        got = fn(res, 0.25, 0.125, goal)
        expect_type(got, float, what, hint="return the rate as a float")
        expect_close(float(got), sv.goodput(res, 0.25, 0.125, goal), rtol=0, atol=1e-12, what=what,
                     hint=f"{why}. A request meets the SLO when TTFT <= ttft_slo and (it has one "
                          "token or TPOT <= tpot_slo); attainment = fraction meeting it")
    return "5 sweeps: stop at the first miss, unsorted rates, none, one-token requests, boundaries"
