"""Serving the tiny model: request traces, a step-cost model, batching schedulers, latency
metrics and goodput, and a discrete-event simulation of prefill-decode disaggregation.

Chapter 18 explains the schedulers and lab 18 builds them; this module is the reference
the lab's checkers hold the learner to, and the simulator the chapter's explorer runs.

The pieces:

- :func:`make_trace` — requests with Poisson arrivals, prompts from
  :func:`utils.tiny_corpus.prompts` and lognormal output lengths, all seeded. The same
  seed gives the same requests at every rate; only the arrival times scale.
- :class:`CostModel` — seconds per forward pass: ``decode(b)`` for one decode step of
  ``b`` sequences, ``prefill(t)`` for ``t`` prompt tokens of one sequence. Fitted to
  measured step times (:func:`measure_step_times`, :meth:`CostModel.fit`), or derived from
  a GPU's datasheet (:func:`gpu_cost_model`).
- :class:`VirtualClock` — the engine's clock. Every iteration of an engine runs inside
  ``with clock.iteration(decode=..., prefill=...)``; the clock then advances by the cost
  model's time for that iteration (deterministic) or, with no cost model, by the measured
  wall time of the block. Idle gaps are skipped (``advance_to``), so a trace of minutes
  runs in the seconds its forward passes take.
- Schedulers: :func:`next_batch` (static and dynamic batching), :func:`chunk_plan`
  (chunked prefill under a token budget), and the engines :func:`serve_batched` and
  :func:`serve_continuous`, which run real forward passes of a
  :class:`~utils.tiny.TinyTransformer` (or none, with ``model=None``, to simulate).
- Metrics: :func:`summarize` (TTFT, TPOT, end-to-end percentiles and throughput),
  :func:`slo_attainment`, :func:`goodput`.
- :func:`simulate_colocated` and :func:`simulate_disaggregated`: several instances, with
  prefill and decode on the same instances or on separate pools joined by a link.

Conventions every engine here follows (and the lab states):

1. An iteration is one scheduling step: some prefill passes (whole prompts or chunks, one
   pass per request) and at most one batched decode pass. Its cost is the sum of its
   passes' costs (or, with ``CostModel.fused``, the cost of one hybrid pass).
2. Every token an iteration produces is stamped with the clock at the end of the iteration.
3. Generation ignores end-of-text: a request stops after exactly ``max_new`` tokens.
4. Greedy decoding (argmax), so outputs are comparable with :func:`utils.tiny.generate`.

Times are seconds, sizes bytes, rates requests per second.
"""
from __future__ import annotations

import math
import numbers
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from . import tiny_corpus
from .validate import check_int, check_number, resolve_gpu, resolve_model

__all__ = [
    "Request", "Completion", "Iteration", "CostModel", "REFERENCE_COST", "VirtualClock",
    "make_trace", "next_batch", "chunk_plan", "serve_batched", "serve_continuous",
    "ttft", "tpot", "summarize", "slo_attainment", "goodput", "simulate_colocated",
    "simulate_disaggregated", "measure_step_times", "gpu_cost_model", "plot_timeline",
    "PUBLISHED", "SCHEDULERS", "saturate", "simulate", "saturation_throughput",
]


# --- requests and results ---------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """One request: arrives at ``arrival`` (s) with ``prompt`` (token ids) and wants
    exactly ``max_new`` output tokens."""

    rid: int
    arrival: float
    prompt: tuple
    max_new: int

    def __post_init__(self):
        if not isinstance(self.max_new, int) or self.max_new < 1:
            raise ValueError(f"request {self.rid}: max_new must be a positive integer, got {self.max_new!r}")
        if len(self.prompt) < 1:
            raise ValueError(f"request {self.rid}: the prompt is empty")
        if not (isinstance(self.arrival, (int, float)) and math.isfinite(self.arrival) and self.arrival >= 0):
            raise ValueError(f"request {self.rid}: arrival must be a finite time >= 0, got {self.arrival!r}")

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)


@dataclass
class Completion:
    """What an engine returns for one request: the tokens and the time each was produced."""

    rid: int
    arrival: float
    tokens: list = field(default_factory=list)
    times: list = field(default_factory=list)

    def emit(self, token, t: float) -> None:
        self.tokens.append(token)
        self.times.append(t)


@dataclass(frozen=True)
class Iteration:
    """One engine iteration, as the clock logged it: for timeline pictures."""

    start: float
    end: float
    decode: tuple        # request ids in the decode pass
    prefill: tuple       # (request id, tokens) per prefill pass


def make_trace(n: int, rate: float, seed: int = 0, median_out: int = 16, sigma: float = 0.8,
               max_out: int = 64, min_chars: int = 12, max_chars: int = 60) -> list[Request]:
    """``n`` requests arriving as a Poisson process of ``rate`` requests per second.

    Prompts are :func:`utils.tiny_corpus.prompts` (``min_chars``..``max_chars`` characters,
    one token each); output lengths are lognormal with median ``median_out`` and shape
    ``sigma``, rounded and clipped to ``[1, max_out]``. The seed fixes prompts, lengths
    and the *shape* of the arrival process: arrival i is ``S_i / rate`` for fixed
    unit-rate arrival times ``S_i``, so changing ``rate`` replays the same requests
    faster or slower. Times are rounded to the microsecond.
    """
    from .tiny import TOKENIZER

    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not (isinstance(rate, (int, float)) and rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate!r}")
    if not 1 <= median_out <= max_out:
        raise ValueError(f"need 1 <= median_out <= max_out, got {median_out}, {max_out}")
    texts = tiny_corpus.prompts(n, seed=tiny_corpus.PROMPT_SEED + seed,
                                min_chars=min_chars, max_chars=max_chars)
    lengths = random.Random(seed)
    gaps = random.Random(seed + 1_000_003)
    out, s = [], 0.0
    for i, text in enumerate(texts):
        s += gaps.expovariate(1.0)
        k = int(round(lengths.lognormvariate(math.log(median_out), sigma)))
        out.append(Request(rid=i, arrival=round(s / rate, 6), prompt=tuple(TOKENIZER.encode(text)),
                           max_new=min(max(k, 1), max_out)))
    return out


# --- cost of a forward pass ---------------------------------------------------------------

@dataclass(frozen=True)
class CostModel:
    """Seconds per forward pass, linear in the work:

    ``decode(b) = decode_base + decode_per_seq * b`` (one decode step of ``b`` sequences),
    ``prefill(t) = prefill_base + prefill_per_token * t`` (``t`` prompt tokens of one
    sequence).

    An iteration (:meth:`iteration`) with ``fused=False`` costs the sum of its passes:
    what the tiny model's engine runs, a prefill pass per request and one decode pass.
    With ``fused=True`` all of an iteration's tokens go through the weights in one pass
    (Orca's selective batching, Sarathi-Serve's hybrid batches), so the fixed cost is paid
    once: ``max(the bases of the kinds present) + decode_per_seq * decodes +
    prefill_per_token * prompt tokens``.
    """

    decode_base: float
    decode_per_seq: float
    prefill_base: float
    prefill_per_token: float
    fused: bool = False
    source: str = ""

    def __post_init__(self):
        for f in ("decode_base", "decode_per_seq", "prefill_base", "prefill_per_token"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"CostModel.{f} must be a finite number >= 0 (seconds), got {v!r}")
        if self.decode_base + self.decode_per_seq <= 0 or self.prefill_base + self.prefill_per_token <= 0:
            raise ValueError("a forward pass must cost some time: decode(1) and prefill(1) must be > 0")

    def decode(self, batch: int) -> float:
        if batch < 1:
            raise ValueError(f"a decode pass needs at least one sequence, got batch {batch}")
        return self.decode_base + self.decode_per_seq * batch

    def prefill(self, tokens: int) -> float:
        if tokens < 1:
            raise ValueError(f"a prefill pass needs at least one token, got {tokens}")
        return self.prefill_base + self.prefill_per_token * tokens

    def iteration(self, n_decode: int, prefill_tokens: Iterable[int] = ()) -> float:
        """Cost of one iteration: a decode pass over ``n_decode`` sequences (none if 0) and
        a prefill pass per entry of ``prefill_tokens``; summed, or fused into one pass."""
        chunks = list(prefill_tokens)
        if n_decode < 0 or any(n < 1 for n in chunks):
            raise ValueError(f"bad iteration: n_decode={n_decode}, prefill_tokens={chunks}")
        if not self.fused:
            t = self.decode(n_decode) if n_decode else 0.0
            for n in chunks:
                t += self.prefill(n)
            return t
        if not n_decode and not chunks:
            raise ValueError("an iteration needs a decode pass or at least one prefill pass")
        base = max(self.decode_base if n_decode else 0.0, self.prefill_base if chunks else 0.0)
        return base + self.decode_per_seq * n_decode + self.prefill_per_token * sum(chunks)

    @classmethod
    def fit(cls, decode_samples: Sequence[tuple[int, float]],
            prefill_samples: Sequence[tuple[int, float]], source: str = "",
            fused: bool = False) -> "CostModel":
        """Least-squares lines through measured ``(batch, seconds)`` and ``(tokens, seconds)``
        samples; negative coefficients (noise) are clipped to zero."""
        def line(samples, what):
            xs = np.array([s[0] for s in samples], dtype=float)
            ys = np.array([s[1] for s in samples], dtype=float)
            if len(set(xs.tolist())) < 2:
                raise ValueError(f"fitting the {what} cost needs samples at two or more sizes")
            slope, base = np.polyfit(xs, ys, 1)
            return max(float(base), 0.0), max(float(slope), 0.0)

        db, ds = line(decode_samples, "decode")
        pb, pt = line(prefill_samples, "prefill")
        return cls(db, ds, pb, pt, fused=fused, source=source)


#: The tiny target on the 2-core CPU that wrote this chapter (one thread, fp32): lines
#: through the medians of 20 decode steps at batch 1-32 and 10 prefills of 8-128 tokens,
#: rounded, measured while the machine also ran other work. Your machine's fit comes from
#: :func:`measure_step_times` and :meth:`CostModel.fit`.
REFERENCE_COST = CostModel(decode_base=0.52e-3, decode_per_seq=0.24e-3, prefill_base=0.85e-3,
                           prefill_per_token=0.022e-3,
                           source="tiny-target, 1 thread, the course's reference 2-core CPU")


def measure_step_times(model, batches: Sequence[int] = (1, 2, 4, 8, 16, 32),
                       prompt_lens: Sequence[int] = (8, 16, 32, 64, 128), context: int = 32,
                       min_run_time: float | None = None):
    """Median seconds of real forward passes of ``model``: ``(decode_samples, prefill_samples)``.

    A decode step runs ``batch`` sequences of ``context`` cached tokens, each in its own
    cache (a :class:`~utils.tiny.CacheBatch`), as a continuous-batching engine does; a
    prefill runs one prompt into an empty cache. Timed with :func:`utils.bench.time_fn`.
    """
    import torch

    from . import bench
    from .tiny import ContiguousKVCache

    if not hasattr(model, "config") or not callable(getattr(model, "prefill", None)):
        raise TypeError(f"model must be a TinyTransformer, got {type(model).__name__}")
    for name, values in (("batches", batches), ("prompt_lens", prompt_lens)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(f"{name} must be a sequence of positive integers, got "
                            f"{type(values).__name__}")
        for v in values:
            check_int(f"{name} (each entry)", v, low=1)
    check_int("context", context, low=1)
    if min_run_time is not None:
        check_number("min_run_time", min_run_time, positive=True)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    decode_samples, prefill_samples = [], []
    for b in batches:
        caches = [ContiguousKVCache(cfg, max_len=context + 1, device=model.device) for _ in range(b)]
        for c in caches:
            model.prefill(torch.randint(0, cfg.vocab, (1, context), generator=g).to(model.device), c)
        tokens = torch.randint(0, cfg.vocab, (b,), generator=g).to(model.device)

        def step():
            model.decode_step(tokens, caches)
            for c in caches:
                c.truncate(context)
        decode_samples.append((b, bench.time_fn(step, min_run_time=min_run_time).median))
    for t in prompt_lens:
        cache = ContiguousKVCache(cfg, max_len=t, device=model.device)
        prompt = torch.randint(0, cfg.vocab, (1, t), generator=g).to(model.device)

        def pre():
            model.prefill(prompt, cache)
            cache.truncate(0)
        prefill_samples.append((t, bench.time_fn(pre, min_run_time=min_run_time).median))
    return decode_samples, prefill_samples


def gpu_cost_model(model_name: str, gpu_name: str, context: int = 1024,
                   bytes_per_element: int = 2, dtype: str = "bf16", fused: bool = True) -> CostModel:
    """A roofline cost model of a registry model on a registry GPU (ideal, no overheads).

    A decode pass streams the weights once (``decode_base``) and each sequence's KV cache
    of ``context`` tokens (``decode_per_seq``): memory-bound, valid while the batch stays
    far below the ridge point (chapter 03). A prefill pass streams the weights once
    (``prefill_base``) and does ``2 x params`` FLOP per token at the dense peak
    (``prefill_per_token``); the sum of the two is an upper bound within 2x of the
    roofline's max. ``fused`` (default): iterations run as one hybrid pass, as GPU
    engines with selective batching do.
    """
    from . import hardware, memory, models

    m, g = resolve_model(model_name, "model_name"), resolve_gpu(gpu_name, "gpu_name")
    weights = m.param_count() * bytes_per_element
    kv = memory.kv_cache_bytes_per_token(m, bytes_per_element) * context
    bw, peak = g.memory_bandwidth, g.flops(dtype)
    return CostModel(decode_base=weights / bw, decode_per_seq=kv / bw, prefill_base=weights / bw,
                     prefill_per_token=2 * m.param_count() / peak, fused=fused,
                     source=f"roofline: {model_name} on {gpu_name}, {dtype}, context {context}")


# --- the clock ---------------------------------------------------------------------------

class VirtualClock:
    """The engine's notion of time.

    ``with clock.iteration(decode=rids, prefill=[(rid, n_tokens), ...]):`` wraps one
    iteration's forward passes. On leaving the block the clock advances by
    ``cost.iteration(len(decode), [n for _, n in prefill])`` when a :class:`CostModel` was
    given, or by the block's measured wall time when ``cost`` is None. ``advance_to(t)``
    jumps over idle time (a server waiting for requests). ``log`` keeps every iteration.
    """

    def __init__(self, cost: CostModel | None = None):
        if cost is not None and not isinstance(cost, CostModel):
            raise TypeError(f"cost must be a CostModel or None (measured), got {type(cost).__name__}")
        self.cost = cost
        self.now = 0.0
        self.log: list[Iteration] = []

    @property
    def measured(self) -> bool:
        return self.cost is None

    def advance_to(self, t: float) -> None:
        """Move the clock forward to ``t`` (a time at or before now leaves it where it is)."""
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise TypeError(f"t must be a number of seconds, got {type(t).__name__}")
        if not math.isfinite(t):
            raise ValueError(f"cannot advance the clock to t={t!r}")
        if t > self.now:
            self.now = t

    @contextmanager
    def iteration(self, decode: Iterable = (), prefill: Iterable = ()):
        decode = tuple(decode)
        prefill = tuple((rid, int(n)) for rid, n in prefill)
        if not decode and not prefill:
            raise ValueError("an iteration needs a decode pass or at least one prefill pass")
        if any(n < 1 for _, n in prefill):
            raise ValueError(f"every prefill pass needs at least one token, got {prefill}")
        start, t0 = self.now, time.perf_counter()
        yield self
        if self.cost is None:
            dt = time.perf_counter() - t0
        else:
            dt = self.cost.iteration(len(decode), [n for _, n in prefill])
        self.now = start + dt
        self.log.append(Iteration(start, self.now, decode, prefill))


# --- scheduling decisions ------------------------------------------------------------------

def next_batch(arrivals: Sequence[float], now: float, max_batch: int,
               max_delay: float = math.inf) -> tuple[float, int]:
    """When a (dynamic) batcher launches its next batch, and how many requests it takes.

    ``arrivals``: sorted arrival times of the requests not yet served (past and future);
    the server is free from ``now``. The batcher launches at the first moment ``t >= now``
    when either ``max_batch`` requests have arrived (or every remaining request has, at
    the end of a trace), or the oldest waiting request has waited ``max_delay``. It takes
    the requests that have arrived by then, at most ``max_batch``. ``max_delay = inf`` is
    static batching: wait for a full batch. Returns ``(launch_time, n)``.
    """
    if isinstance(arrivals, (str, bytes)) or not isinstance(arrivals, Sequence):
        raise TypeError(f"arrivals must be a sequence of arrival times, got {type(arrivals).__name__}")
    if len(arrivals) == 0:
        raise ValueError("arrivals must hold at least one remaining request")
    for t in arrivals:
        check_number("arrivals (each arrival time)", t, nonnegative=True)
    if any(b < a for a, b in zip(arrivals, arrivals[1:])):
        raise ValueError(f"arrivals must be sorted, got {list(arrivals)}")
    check_number("now", now, nonnegative=True)
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    check_number("max_delay", max_delay, nonnegative=True, finite=False)
    k = min(max_batch, len(arrivals))
    full = arrivals[k - 1]                  # the moment the batch is full
    timeout = arrivals[0] + max_delay       # the moment the oldest request has waited enough
    launch = max(now, min(full, timeout))
    n = 0
    while n < len(arrivals) and n < max_batch and arrivals[n] <= launch:
        n += 1
    return launch, n


def chunk_plan(n_decode: int, remaining: Sequence[int], token_budget: int | None) -> list[int]:
    """Prompt tokens to prefill this iteration for each request still prefilling.

    Sarathi-Serve's stall-free rule: the iteration's ``token_budget`` goes first to the
    ``n_decode`` running decodes (one token each), then to the prefilling requests in
    admission order, each taking ``min(its remaining prompt, what is left)``. With
    ``token_budget=None`` every prompt is prefilled whole (no chunking).
    """
    check_int("n_decode", n_decode, low=0)
    if isinstance(remaining, (str, bytes)) or not isinstance(remaining, Iterable):
        raise TypeError(f"remaining must be a sequence of prompt lengths, got "
                        f"{type(remaining).__name__}")
    for r in remaining:
        check_int("remaining (each prompt length)", r)
    if any(r < 1 for r in remaining):
        raise ValueError(f"remaining prompt lengths must be >= 1, got {list(remaining)}")
    if token_budget is None:
        return [int(r) for r in remaining]
    if not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"token_budget must be a positive integer or None, got {token_budget!r}")
    left = token_budget - n_decode
    out = []
    for r in remaining:
        c = min(int(r), max(left, 0))
        out.append(c)
        left -= c
    return out


# --- engines -------------------------------------------------------------------------------

def _check_requests(requests: Sequence[Request]) -> list[Request]:
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Iterable):
        raise TypeError(f"requests must be a list of Request, got {type(requests).__name__}")
    reqs = list(requests)
    for r in reqs:
        if not isinstance(r, Request):
            raise TypeError(f"requests must hold Request objects, got {type(r).__name__}")
    for a, b in zip(reqs, reqs[1:]):
        if b.arrival < a.arrival:
            raise ValueError(f"requests must be sorted by arrival: request {b.rid} arrives at "
                             f"{b.arrival} before request {a.rid} at {a.arrival}")
    if len({r.rid for r in reqs}) != len(reqs):
        raise ValueError("request ids must be unique")
    return reqs


class _Runner:
    """Real forward passes for an engine: one contiguous KV cache per request, greedy tokens.
    With ``model=None`` nothing runs and tokens are None (a pure simulation)."""

    def __init__(self, model):
        self.model = model
        self.caches = {}

    def prefill(self, req: Request, start: int, n: int):
        """Prefill prompt tokens ``start .. start + n``; the next token if that ends the prompt."""
        if self.model is None:
            return None
        import torch

        from .tiny import ContiguousKVCache
        if start == 0:
            self.caches[req.rid] = ContiguousKVCache(self.model.config, max_len=req.prompt_len + req.max_new,
                                                     device=self.model.device)
        chunk = torch.tensor(req.prompt[start:start + n], dtype=torch.long, device=self.model.device)
        logits = self.model.prefill(chunk[None], self.caches[req.rid])
        return int(logits[0, -1].argmax()) if start + n == req.prompt_len else None

    def decode(self, reqs: Sequence[Request], last_tokens: Sequence[int]):
        if self.model is None:
            return [None] * len(reqs)
        import torch

        tokens = torch.tensor(list(last_tokens), dtype=torch.long, device=self.model.device)
        logits = self.model.decode_step(tokens, [self.caches[r.rid] for r in reqs])
        return logits.argmax(dim=-1).tolist()

    def free(self, req: Request) -> None:
        self.caches.pop(req.rid, None)


def _check_clock(clock) -> None:
    if not isinstance(clock, VirtualClock):
        raise TypeError(f"clock must be a VirtualClock, got {type(clock).__name__}")


def _check_cost(cost) -> None:
    if not isinstance(cost, CostModel):
        raise TypeError(f"cost must be a CostModel, got {type(cost).__name__}")


def serve_batched(model, requests: Sequence[Request], max_batch: int, max_delay: float,
                  clock: VirtualClock) -> dict[int, Completion]:
    """Static (``max_delay=inf``) or dynamic batching: request-level scheduling.

    The batcher (:func:`next_batch`) launches a batch once the server is free; the batch
    runs one prefill iteration (every member's whole prompt, one pass each), then decode
    iterations over its unfinished members until all are done. Nobody joins a running
    batch. ``model=None`` simulates (tokens are None).
    """
    reqs = _check_requests(requests)
    check_number("max_delay", max_delay, nonnegative=True, finite=False)
    _check_clock(clock)
    runner = _Runner(model)
    done = {r.rid: Completion(r.rid, r.arrival) for r in reqs}
    pending = reqs
    while pending:
        launch, n = next_batch([r.arrival for r in pending], clock.now, max_batch, max_delay)
        clock.advance_to(launch)
        batch, pending = pending[:n], pending[n:]
        with clock.iteration(prefill=[(r.rid, r.prompt_len) for r in batch]):
            first = [runner.prefill(r, 0, r.prompt_len) for r in batch]
        for r, tok in zip(batch, first):
            done[r.rid].emit(tok, clock.now)
        active = [r for r in batch if len(done[r.rid].times) < r.max_new]
        while active:
            with clock.iteration(decode=[r.rid for r in active]):
                toks = runner.decode(active, [done[r.rid].tokens[-1] for r in active])
            for r, tok in zip(active, toks):
                done[r.rid].emit(tok, clock.now)
            active = [r for r in active if len(done[r.rid].times) < r.max_new]
        for r in batch:
            runner.free(r)
    return done


def serve_continuous(model, requests: Sequence[Request], max_batch: int, clock: VirtualClock,
                     token_budget: int | None = None) -> dict[int, Completion]:
    """Continuous (iteration-level) batching, with chunked prefill when ``token_budget`` is set.

    Each iteration: admit arrived requests in arrival order while fewer than ``max_batch``
    are running; plan prefill with :func:`chunk_plan` (decodes first, then prompt chunks;
    whole prompts when ``token_budget`` is None); run the prefill passes and one decode
    pass over every request that had its first token before this iteration; retire the
    finished. A request whose prompt completes in this iteration gets its first token now
    and decodes from the next iteration on. ``model=None`` simulates (tokens are None).
    """
    reqs = _check_requests(requests)
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    _check_clock(clock)
    runner = _Runner(model)
    done = {r.rid: Completion(r.rid, r.arrival) for r in reqs}
    prefilled = {}                          # rid -> prompt tokens already in the cache
    queue = list(reqs)
    qi = 0                                  # queue[qi:] are not admitted yet
    running: list[Request] = []
    while qi < len(queue) or running:
        if not running and queue[qi].arrival > clock.now:
            clock.advance_to(queue[qi].arrival)
        while qi < len(queue) and queue[qi].arrival <= clock.now and len(running) < max_batch:
            prefilled[queue[qi].rid] = 0
            running.append(queue[qi])
            qi += 1
        decoding = [r for r in running if done[r.rid].times]
        prefilling = [r for r in running if not done[r.rid].times]
        chunks = chunk_plan(len(decoding), [r.prompt_len - prefilled[r.rid] for r in prefilling],
                            token_budget)
        plan = [(r, c) for r, c in zip(prefilling, chunks) if c > 0]
        with clock.iteration(decode=[r.rid for r in decoding], prefill=[(r.rid, c) for r, c in plan]):
            firsts = []
            for r, c in plan:
                tok = runner.prefill(r, prefilled[r.rid], c)
                prefilled[r.rid] += c
                if prefilled[r.rid] == r.prompt_len:
                    firsts.append((r, tok))
            toks = runner.decode(decoding, [done[r.rid].tokens[-1] for r in decoding]) if decoding else []
        for r, tok in firsts:
            done[r.rid].emit(tok, clock.now)
        for r, tok in zip(decoding, toks):
            done[r.rid].emit(tok, clock.now)
        still = []
        for r in running:
            if len(done[r.rid].times) >= r.max_new:
                runner.free(r)
            else:
                still.append(r)
        running = still
    return done


# --- metrics ---------------------------------------------------------------------------------

PERCENTILES = (50, 90, 99)


def _completions(completions) -> list[Completion]:
    if not isinstance(completions, (Mapping, Iterable)) or isinstance(completions, (str, bytes)):
        raise TypeError(f"completions must be a dict or list of Completion, got "
                        f"{type(completions).__name__}")
    items = list(completions.values()) if isinstance(completions, Mapping) else list(completions)
    for c in items:
        if not isinstance(c, Completion):
            raise TypeError(f"completions must hold Completion objects, got {type(c).__name__}")
    if not items:
        raise ValueError("no completions to summarize")
    for c in items:
        if len(c.times) == 0:
            raise ValueError(f"request {c.rid} produced no tokens")
    return items


def _check_completion(c) -> None:
    if not isinstance(c, Completion):
        raise TypeError(f"c must be a Completion, got {type(c).__name__}")
    if not c.times:
        raise ValueError(f"c (request {c.rid}) has no tokens yet")


def ttft(c: Completion) -> float:
    """Time to first token: first token's time minus arrival."""
    _check_completion(c)
    return c.times[0] - c.arrival


def tpot(c: Completion) -> float:
    """Time per output token after the first: (last - first) / (tokens - 1); NaN for one token."""
    _check_completion(c)
    return (c.times[-1] - c.times[0]) / (len(c.times) - 1) if len(c.times) > 1 else math.nan


def summarize(completions) -> dict:
    """Latency percentiles and throughput of a run.

    ``ttft_pXX``, ``tpot_pXX``, ``e2e_pXX`` for XX in 50, 90, 99 (NumPy's default linear
    interpolation; TPOT over requests with two or more tokens, NaN if there are none),
    ``throughput`` (output tokens per second from the first arrival to the last token),
    ``n_requests`` and ``n_tokens``.
    """
    items = _completions(completions)
    ttfts = np.array([ttft(c) for c in items])
    tpots = np.array([tpot(c) for c in items if len(c.times) > 1])
    e2es = np.array([c.times[-1] - c.arrival for c in items])
    out = {}
    for name, xs in (("ttft", ttfts), ("tpot", tpots), ("e2e", e2es)):
        for p in PERCENTILES:
            out[f"{name}_p{p}"] = float(np.percentile(xs, p)) if len(xs) else math.nan
    n_tokens = sum(len(c.times) for c in items)
    span = max(c.times[-1] for c in items) - min(c.arrival for c in items)
    out["throughput"] = n_tokens / span if span > 0 else math.inf
    out["n_requests"] = len(items)
    out["n_tokens"] = n_tokens
    return out


def slo_attainment(completions, ttft_slo: float, tpot_slo: float) -> float:
    """Fraction of requests with TTFT <= ``ttft_slo`` and TPOT <= ``tpot_slo`` (a one-token
    request has no TPOT and meets that part)."""
    check_number("ttft_slo", ttft_slo, positive=True, finite=False)
    check_number("tpot_slo", tpot_slo, positive=True, finite=False)
    items = _completions(completions)
    ok = sum(1 for c in items if ttft(c) <= ttft_slo and (len(c.times) < 2 or tpot(c) <= tpot_slo))
    return ok / len(items)


def goodput(results_by_rate: Mapping[float, object], ttft_slo: float, tpot_slo: float,
            goal: float = 0.9) -> float:
    """DistServe's goodput: the highest request rate served with SLO attainment >= ``goal``.

    ``results_by_rate`` maps each swept rate to that run's completions. Rates are tried in
    increasing order and the sweep stops at the first rate that misses the goal; the last
    rate that met it is returned (0.0 if even the lowest misses).
    """
    if not 0 < goal <= 1:
        raise ValueError(f"goal must be a fraction in (0, 1], got {goal!r}")
    best = 0.0
    if not isinstance(results_by_rate, Mapping):
        raise TypeError(f"results_by_rate must map rates to completions, got "
                        f"{type(results_by_rate).__name__}")
    check_number("ttft_slo", ttft_slo, positive=True, finite=False)
    check_number("tpot_slo", tpot_slo, positive=True, finite=False)
    for rate in sorted(results_by_rate):
        if slo_attainment(results_by_rate[rate], ttft_slo, tpot_slo) >= goal:
            best = float(rate)
        else:
            break
    return best


# --- several instances: colocated vs disaggregated --------------------------------------------

def _round_robin(reqs: Sequence[Request], n: int) -> list[list[Request]]:
    return [list(reqs[i::n]) for i in range(n)]


def simulate_colocated(requests: Sequence[Request], cost: CostModel, n_instances: int,
                       max_batch: int, token_budget: int | None = None) -> dict[int, Completion]:
    """``n_instances`` identical instances, each running prefill and decode together with
    :func:`serve_continuous` (chunked when ``token_budget`` is set); a round-robin load
    balancer sends request i to instance ``i % n_instances``. No tokens are computed."""
    reqs = _check_requests(requests)
    _check_cost(cost)
    check_int("n_instances", n_instances, low=1)
    check_int("max_batch", max_batch, low=1)
    out: dict[int, Completion] = {}
    for part in _round_robin(reqs, n_instances):
        if part:
            out.update(serve_continuous(None, part, max_batch, VirtualClock(cost), token_budget))
    return {r.rid: out[r.rid] for r in reqs}


def simulate_disaggregated(requests: Sequence[Request], cost: CostModel, n_prefill: int,
                           n_decode: int, max_batch: int, kv_bytes_per_token: float,
                           link_bandwidth: float, link_latency: float = 0.0) -> dict[int, Completion]:
    """Prefill and decode on separate pools (DistServe, Splitwise), as a discrete-event simulation.

    Prefill instance ``i % n_prefill`` runs request i's whole prompt when free (FCFS, one
    prompt per pass) and produces the first token. The KV cache (``prompt_len x
    kv_bytes_per_token`` bytes) then crosses a link in ``link_latency + bytes /
    link_bandwidth`` seconds to decode instance ``i % n_decode``, which runs continuous
    batching over decodes only (no prefill ever interrupts it). Links are not shared.
    """
    reqs = _check_requests(requests)
    _check_cost(cost)
    check_int("n_prefill", n_prefill, low=1)
    check_int("n_decode", n_decode, low=1)
    check_int("max_batch", max_batch, low=1)
    check_number("kv_bytes_per_token", kv_bytes_per_token, nonnegative=True)
    check_number("link_bandwidth", link_bandwidth, positive=True)
    check_number("link_latency", link_latency, nonnegative=True)
    done = {r.rid: Completion(r.rid, r.arrival) for r in reqs}
    ready: dict[int, list[tuple[float, Request]]] = {j: [] for j in range(n_decode)}
    for i, part in enumerate(_round_robin(reqs, n_prefill)):
        free_at = 0.0
        for r in part:
            free_at = max(free_at, r.arrival) + cost.prefill(r.prompt_len)
            done[r.rid].emit(None, free_at)
    for idx, r in enumerate(reqs):
        if r.max_new > 1:
            t = done[r.rid].times[0] + link_latency + r.prompt_len * kv_bytes_per_token / link_bandwidth
            ready[idx % n_decode].append((t, r))
    for j in range(n_decode):
        items = sorted(ready[j], key=lambda x: (x[0], x[1].rid))
        now, qi, running = 0.0, 0, []
        while qi < len(items) or running:
            if not running and items[qi][0] > now:
                now = items[qi][0]
            while qi < len(items) and items[qi][0] <= now and len(running) < max_batch:
                running.append(items[qi][1])
                qi += 1
            now += cost.decode(len(running))
            for r in running:
                done[r.rid].emit(None, now)
            running = [r for r in running if len(done[r.rid].times) < r.max_new]
    return done


# --- throughput at saturation ------------------------------------------------------------------

SCHEDULERS = ("static", "dynamic", "continuous", "chunked")


def saturate(requests: Sequence[Request]) -> list[Request]:
    """The same requests, all arriving at time 0: an offered load above any server's capacity.

    With every request queued from the start the server never idles until the queue is
    empty, so the throughput of a run is the most its scheduler can deliver on this
    workload (its capacity), whatever the arrival process would have been.
    """
    reqs = _check_requests(requests)
    return [Request(r.rid, 0.0, r.prompt, r.max_new) for r in reqs]


def simulate(scheduler: str, requests: Sequence[Request], cost: CostModel, max_batch: int,
             max_delay: float = 0.010, token_budget: int | None = None):
    """Run one of :data:`SCHEDULERS` on ``requests`` under ``cost`` (no model runs).

    ``"static"`` is :func:`serve_batched` with ``max_delay = inf``; ``"dynamic"`` the same
    with ``max_delay`` (seconds); ``"continuous"`` is :func:`serve_continuous` with whole
    prompts; ``"chunked"`` the same with ``token_budget`` tokens per iteration. Returns
    ``(completions, clock.log)``.
    """
    from .validate import check_choice, check_int, check_number

    check_choice("scheduler", scheduler, SCHEDULERS)
    if not isinstance(cost, CostModel):
        raise TypeError(f"cost must be a CostModel, got {type(cost).__name__}")
    check_int("max_batch", max_batch, low=1)
    clock = VirtualClock(cost)
    if scheduler in ("static", "dynamic"):
        delay = math.inf if scheduler == "static" else check_number("max_delay", max_delay, nonnegative=True)
        out = serve_batched(None, requests, max_batch, delay, clock)
    else:
        if scheduler == "chunked":
            if token_budget is None:
                raise ValueError("token_budget must be a positive integer for the 'chunked' scheduler")
            check_int("token_budget", token_budget, low=1)
        out = serve_continuous(None, requests, max_batch, clock,
                               token_budget if scheduler == "chunked" else None)
    return out, clock.log


def saturation_throughput(scheduler: str, requests: Sequence[Request], cost: CostModel,
                          max_batch: int, max_delay: float = 0.010,
                          token_budget: int | None = None) -> float:
    """Output tokens per second of ``scheduler`` when every request of ``requests`` is
    queued at time 0 (:func:`saturate`): the scheduler's capacity on this workload.

    Any offered rate above capacity gives the same schedule once the queue has built up;
    arriving all at once is the limit of those rates, so the result is deterministic.
    """
    out, _ = simulate(scheduler, saturate(requests), cost, max_batch, max_delay, token_budget)
    return summarize(out)["throughput"]


# --- published numbers the chapter quotes -------------------------------------------------------

PUBLISHED = {
    "orca_throughput_x": (36.9, "Yu et al., Orca, OSDI 2022, abstract: 36.9x throughput over "
                                "NVIDIA FasterTransformer at the same level of latency, GPT-3 175B"),
    "sarathi_capacity_x": (2.6, "Agrawal et al., Sarathi-Serve, OSDI 2024, abstract: 2.6x higher "
                                "serving capacity for Mistral-7B on one A100 than vLLM, under "
                                "tail-latency constraints"),
    "distserve_rate_x": (7.4, "Zhong et al., DistServe, OSDI 2024, abstract: 7.4x more requests "
                              "(or 12.6x tighter SLO) than state-of-the-art systems with > 90% of "
                              "requests within latency constraints (the first arXiv version said "
                              "4.48x and 10.2x)"),
    "vllm_throughput_x": ((2, 4), "Kwon et al., Efficient Memory Management for Large Language "
                                  "Model Serving with PagedAttention (vLLM), SOSP 2023, abstract: "
                                  "2-4x the throughput of FasterTransformer and Orca at the same "
                                  "level of latency"),
    "splitwise_throughput_x": (1.4, "Patel et al., Splitwise, ISCA 2024, abstract: up to 1.4x higher "
                                    "throughput at 20% lower cost (or 2.35x more throughput at the "
                                    "same power and cost budgets)"),
}


# --- pictures ---------------------------------------------------------------------------------

def plot_timeline(requests: Sequence[Request], completions: Mapping[int, Completion],
                  log: Sequence[Iteration], ax=None, title: str = "", max_requests: int = 12,
                  t_max: float | None = None):
    """Draw a schedule: one row per request (the first ``max_requests``), the engine on top.

    A request's row has a thin line from arrival to its last token, orange where its
    prompt is in a prefill pass, blue where it is in a decode pass, and a dot at each
    token. The engine row shows each iteration: orange if prefill only, blue if decode
    only, purple if both (a stall for the decodes unless the passes are fused). The time
    axis runs to ``t_max`` (default: the shown requests' last token).
    """
    import matplotlib.pyplot as plt

    if isinstance(requests, (str, bytes)) or not isinstance(requests, Iterable):
        raise TypeError(f"requests must be a list of Request, got {type(requests).__name__}")
    reqs = list(requests)
    if not isinstance(completions, Mapping):
        raise TypeError(f"completions must map request ids to Completion, got "
                        f"{type(completions).__name__}")
    if isinstance(log, (str, bytes)) or not isinstance(log, Iterable):
        raise TypeError(f"log must be a list of Iteration (clock.log), got {type(log).__name__}")
    check_int("max_requests", max_requests, low=1)
    requests = reqs
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.28 * (max_requests + 2) + 0.8))
    shown = [r for r in requests][:max_requests]
    ids = {r.rid: i for i, r in enumerate(shown)}
    t_end = max(completions[r.rid].times[-1] for r in shown) if t_max is None else t_max
    colors = {"prefill": "tab:orange", "decode": "tab:blue", "both": "tab:purple"}
    engine = {k: [] for k in colors}                     # kind -> [(start, width)]
    rows = {(i, k): [] for i in range(len(shown)) for k in ("prefill", "decode")}
    for it in log:
        if it.start > t_end:
            break
        span = (it.start, it.end - it.start)
        engine["both" if it.decode and it.prefill else ("decode" if it.decode else "prefill")].append(span)
        for rid in it.decode:
            if rid in ids:
                rows[ids[rid], "decode"].append(span)
        for rid, _ in it.prefill:
            if rid in ids:
                rows[ids[rid], "prefill"].append(span)
    for kind, spans in engine.items():
        if spans:
            ax.broken_barh(spans, (-1.7, 0.8), facecolors=colors[kind], edgecolor="white", linewidth=0.4)
    for (i, kind), spans in rows.items():
        if spans:
            ax.broken_barh(spans, (i - 0.25, 0.5), facecolors=colors[kind],
                           alpha=0.55 if kind == "decode" else 0.85, linewidth=0)
    for r in shown:
        c = completions[r.rid]
        y = ids[r.rid]
        ax.plot([r.arrival, c.times[-1]], [y, y], color="0.6", lw=0.8, zorder=0)
        ax.plot([r.arrival], [y], marker="|", color="k", ms=8)
        ax.plot(c.times, [y] * len(c.times), ".", color="k", ms=2.5)
    ax.set_yticks([-1.3] + list(range(len(shown))))
    ax.set_yticklabels(["engine"] + [f"req {r.rid}" for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, t_end * 1.02)
    ax.set_xlabel("time (s)")
    if title:
        ax.set_title(title, fontsize=10)
    return ax
