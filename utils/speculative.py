"""Speculative decoding: the cost model, the acceptance rule, and reference loops.

A cheap *draft* proposes ``gamma`` tokens one at a time; the expensive *target* scores
all of them in one call; a rejection-sampling rule keeps a prefix of the proposals and
repairs the first rejected one, so that every emitted token is distributed exactly as
the target alone would have sampled it (Leviathan, Kalman and Matias 2023; Chen et al.
2023). Chapter 19 explains it; lab 19 builds it; this module is the oracle the lab's
checkers and measurements use.

What is here:

- the cost model: :func:`expected_tokens` (tokens per target call, Leviathan et al.
  Eq. 1), :func:`speedup` (Theorem 3.8) and :func:`optimal_gamma`;
- one position: :func:`probs`, :func:`acceptance_probability`, :func:`residual`,
  :func:`accept_or_resample`, and :func:`acceptance_rate` (beta = sum min(p, q));
- whole loops over the tiny models of :mod:`utils.tiny`: :func:`speculative_generate`
  and the draft-free :func:`prompt_lookup_generate` (with :func:`lookup_draft`);
- :func:`measure_alpha`, the average acceptance rate over held-out text;
- :func:`decode_step_times` (the cost ratio c) and :func:`measure_speedup` (the wall-clock
  speedup over target-only sampling), timed robustly on a shared machine;
- :class:`MarkovLM`, a model whose every sequence probability is known in closed form,
  so that statistical tests of a sampler are cheap and exact; and :func:`chi_square`.

Quantities: ``alpha`` and ``beta`` are probabilities, ``c`` is a ratio of times
(one draft step over one target step), ``gamma`` a number of draft tokens.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Sequence

import numpy as np
import torch

from .tiny import ContiguousKVCache, TinyConfig
from .validate import check_int as _check_int, check_number as _check_number

__all__ = [
    "SOURCES", "PUBLISHED",
    "expected_tokens", "speedup", "optimal_gamma",
    "probs", "acceptance_probability", "residual", "accept_or_resample", "always_accept",
    "acceptance_rate",
    "SpecResult", "speculative_generate", "lookup_draft", "prompt_lookup_generate",
    "measure_alpha", "decode_step_times", "measure_speedup", "MarkovLM", "chi_square",
]

SOURCES = MappingProxyType({
    "leviathan": ("Y. Leviathan, M. Kalman, Y. Matias, 'Fast Inference from Transformers via "
                  "Speculative Decoding', ICML 2023, arXiv:2211.17192 — Section 2.3 and "
                  "Appendix A.1 (the sampling rule and its correctness), Eq. 1 (expected "
                  "tokens per iteration), Theorem 3.8 (walltime improvement factor)"),
    "chen": ("C. Chen, S. Borgeaud, G. Irving, J.-B. Lespiau, L. Sifre, J. Jumper, "
             "'Accelerating Large Language Model Decoding with Speculative Sampling', "
             "arXiv:2302.01318, 2023 — modified rejection sampling"),
    "medusa": ("T. Cai, Y. Li, Z. Geng, H. Peng, J. D. Lee, D. Chen, T. Dao, 'Medusa: Simple "
               "LLM Inference Acceleration Framework with Multiple Decoding Heads', ICML 2024, "
               "arXiv:2401.10774"),
    "eagle": ("Y. Li, F. Wei, C. Zhang, H. Zhang, 'EAGLE: Speculative Sampling Requires "
              "Rethinking Feature Uncertainty', ICML 2024, arXiv:2401.15077"),
    "lookahead": ("Y. Fu, P. Bailis, I. Stoica, H. Zhang, 'Break the Sequential Dependency of "
                  "LLM Inference Using Lookahead Decoding', ICML 2024, arXiv:2402.02057"),
    "prompt_lookup": ("A. Saxena, 'Prompt Lookup Decoding', GitHub project "
                      "apoorvumang/prompt-lookup-decoding, 2023 (README)"),
    "layerskip": ("M. Elhoushi et al., 'LayerSkip: Enabling Early Exit Inference and "
                  "Self-Speculative Decoding', ACL 2024, arXiv:2404.16710"),
})

#: Published speedups, as the sources state them (abstracts and README).
PUBLISHED = MappingProxyType({
    "leviathan_t5xxl": MappingProxyType(dict(
        low=2.0, high=3.0, what="T5-XXL (11B), identical outputs, vs the standard T5X "
        "implementation", source="Leviathan et al. 2023, abstract and Section 4")),
    "chen_chinchilla": MappingProxyType(dict(
        low=2.0, high=2.5, what="Chinchilla 70B, decoding speedup in a "
        "distributed setup", source="Chen et al. 2023, abstract")),
    "eagle_llama2_70b": MappingProxyType(dict(
        low=2.7, high=3.5, what="LLaMA2-Chat 70B, latency speedup, output distribution kept",
        source="Li et al. 2024 (EAGLE), ICML 2024, abstract")),
    "prompt_lookup": MappingProxyType(dict(
        low=2.0, high=4.0, what="input-grounded tasks (summarization, document QA, "
        "multi-turn chat), greedy decoding", source="Saxena 2023, README")),
})


# --- the cost model ---------------------------------------------------------------------

def _check_alpha(alpha):
    a = np.asarray(alpha, dtype=float)
    if np.any(~np.isfinite(a)) or np.any(a < 0) or np.any(a > 1):
        raise ValueError(f"alpha is an acceptance rate in [0, 1], got {alpha!r}")
    return a


def _check_gamma(gamma, allow_zero=True):
    g = np.asarray(gamma)
    if g.dtype.kind not in "iu" or np.any(g < (0 if allow_zero else 1)):
        low = 0 if allow_zero else 1
        raise ValueError(f"gamma is a whole number of draft tokens >= {low}, got {gamma!r}")
    return g


def _scalar(x):
    x = np.asarray(x)
    return float(x) if x.ndim == 0 else x


def expected_tokens(alpha, gamma):
    """Expected tokens emitted per target call: ``(1 - alpha^(gamma+1)) / (1 - alpha)``.

    Leviathan et al. 2023, Eq. 1. Equal to ``1 + alpha + ... + alpha^gamma`` (so
    ``gamma + 1`` at ``alpha = 1``). Works on scalars and NumPy arrays.
    """
    a = _check_alpha(alpha)
    g = _check_gamma(gamma)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(a < 1, (1 - a ** (g + 1)) / np.where(a < 1, 1 - a, 1), g + 1.0)
    return _scalar(out)


def speedup(alpha, gamma, c):
    """Expected walltime improvement factor of speculative decoding over plain decoding.

    ``(1 - alpha^(gamma+1)) / ((1 - alpha) (gamma c + 1))`` (Leviathan et al. 2023,
    Theorem 3.8), where ``c`` is the time of one draft step over one target step. It
    assumes the target scores gamma + 1 tokens in the time of one step.
    """
    if isinstance(c, (str, bytes, bool)):
        raise TypeError(f"c must be a number or an array of numbers, got {c!r}")
    cc = np.asarray(c, dtype=float)
    if np.any(~np.isfinite(cc)) or np.any(cc < 0):
        raise ValueError(f"c is a cost ratio >= 0, got {c!r}")
    g = _check_gamma(gamma)
    return _scalar(np.asarray(expected_tokens(alpha, gamma)) / (g * cc + 1))


def optimal_gamma(alpha: float, c: float, max_gamma: int = 64) -> int:
    """The gamma in ``0 .. max_gamma`` with the largest :func:`speedup` (smallest on ties).

    0 means "do not speculate": no gamma >= 1 beats plain decoding.
    """
    if not isinstance(max_gamma, int) or max_gamma < 1:
        raise ValueError(f"max_gamma must be a positive integer, got {max_gamma!r}")
    _check_number("alpha", alpha, low=0, high=1)
    _check_number("c", c, nonnegative=True)
    gammas = np.arange(max_gamma + 1)
    s = np.asarray(speedup(float(alpha), gammas, float(c)))
    return int(np.argmax(s))      # argmax returns the first maximum


# --- one position -------------------------------------------------------------------------

def probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sampling distribution over the last dimension of ``logits``, float32.

    ``softmax(logits / temperature)``; at temperature 0, the one-hot vector of the argmax
    (greedy decoding is sampling from that point mass, so one loop serves both).
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    _check_number("temperature", temperature, nonnegative=True)
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits.float() / temperature, dim=-1)


def _check_pq(p: torch.Tensor, q: torch.Tensor) -> None:
    if not (isinstance(p, torch.Tensor) and isinstance(q, torch.Tensor)):
        raise TypeError("p and q must be torch tensors of probabilities")
    if p.shape != q.shape or p.dim() != 1:
        raise ValueError(f"p and q must be 1-D of the same length, got {tuple(p.shape)} "
                         f"and {tuple(q.shape)}")
    if not (p.is_floating_point() and q.is_floating_point()):
        raise TypeError(f"p and q must be floating-point probabilities, got {p.dtype} and {q.dtype}")


def _check_token(x, p) -> int:
    return _check_int("x", x, low=0, high=p.shape[-1] - 1)


def acceptance_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``min(1, p(x) / q(x))`` for every token x; 1 where ``q(x) = 0`` (never drafted)."""
    _check_pq(p, q)
    safe = torch.where(q > 0, q, torch.ones_like(q))
    return torch.where(q > 0, torch.clamp(p / safe, max=1.0), torch.ones_like(q))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``max(0, p - q)`` normalised: where to sample after a rejection.

    When p equals q everywhere the residual is empty (and rejection impossible); ``p``
    is returned then, so the function is total.
    """
    _check_pq(p, q)
    r = torch.clamp(p - q, min=0)
    total = r.sum()
    return r / total if total > 0 else p.clone()


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, x: int,
                       generator: torch.Generator | None = None) -> tuple[bool, int]:
    """Keep draft token ``x`` (drawn from q) with probability min(1, p(x)/q(x)); else draw
    from the residual. Returns ``(accepted, token)``; the token is distributed as p."""
    _check_pq(p, q)
    x = _check_token(x, p)
    a = acceptance_probability(p, q)[x]
    u = torch.rand((), generator=generator, dtype=torch.float64)
    if u < a:
        return True, int(x)
    return False, int(torch.multinomial(residual(p, q), 1, generator=generator))


def always_accept(p, q, x, generator=None) -> tuple[bool, int]:
    """A broken rule that keeps every draft token: it samples from q, not p."""
    _check_pq(p, q)
    x = _check_token(x, p)
    return True, int(x)


def acceptance_rate(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """beta = sum_x min(p(x), q(x)) over the last dimension: the chance a draft token from
    q is accepted, and 1 minus the total-variation distance between p and q."""
    if not (isinstance(p, torch.Tensor) and isinstance(q, torch.Tensor)):
        raise TypeError("p and q must be torch tensors of probabilities")
    if p.shape != q.shape or p.dim() == 0:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and "
                         f"{tuple(q.shape)}")
    if not (p.is_floating_point() and q.is_floating_point()):
        raise TypeError(f"p and q must be floating-point probabilities, got {p.dtype} and {q.dtype}")
    return torch.minimum(p, q).sum(-1)


# --- the loops ---------------------------------------------------------------------------

@dataclass
class SpecResult:
    """What a speculative loop emitted, and how.

    ``target_calls`` counts target forward calls (each verifies up to gamma drafts and
    produces one more token); ``drafted`` counts draft tokens proposed, ``accepted`` those
    kept and ``rejected`` those turned down (at most one per call: drafts after the first
    rejection are discarded untested). ``rounds`` holds, per call,
    ``(drafts, n_accepted, last_token)``.
    """

    tokens: list[int]
    target_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    rounds: list[tuple[list[int], int, int]] = field(default_factory=list, repr=False)

    @property
    def acceptance(self) -> float:
        """Empirical acceptance rate: accepted over tested draft tokens (accepted plus
        rejected; nan when nothing was tested). It estimates alpha."""
        tested = self.accepted + self.rejected
        return self.accepted / tested if tested else float("nan")

    @property
    def tokens_per_call(self) -> float:
        return len(self.tokens) / self.target_calls if self.target_calls else float("nan")


def _check_lm(name, model) -> None:
    if not (hasattr(model, "config") and callable(getattr(model, "prefill", None))):
        raise TypeError(f"{name} must be a tiny model (prefill, decode_step, config), "
                        f"got {type(model).__name__}")


def _prompt_list(prompt_tokens, config: TinyConfig, max_new_tokens: int) -> list[int]:
    if isinstance(prompt_tokens, (str, bytes)) or \
            not isinstance(prompt_tokens, (Sequence, torch.Tensor)):
        raise TypeError(f"prompt_tokens must be a sequence of token ids, got "
                        f"{type(prompt_tokens).__name__}")
    prompt = torch.as_tensor(prompt_tokens).tolist() if not isinstance(prompt_tokens, list) \
        else list(prompt_tokens)
    if not prompt or not all(isinstance(t, int) for t in prompt):
        raise ValueError("prompt_tokens must be a non-empty 1-D sequence of token ids")
    if not all(0 <= t < config.vocab for t in prompt):
        raise ValueError(f"prompt_tokens must be ids in [0, {config.vocab}), got {prompt}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    total = len(prompt) + max_new_tokens
    if total > config.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds max_seq_len {config.max_seq_len}")
    return prompt


def _sample(dist: torch.Tensor, generator) -> int:
    return int(torch.multinomial(dist, 1, generator=generator))


@torch.no_grad()
def speculative_generate(target, draft, prompt_tokens, max_new_tokens: int, gamma: int,
                         temperature: float = 1.0, generator: torch.Generator | None = None,
                         accept: Callable | None = None) -> SpecResult:
    """Continue one prompt with speculative sampling; the tokens follow the target's law.

    Each round: the draft proposes ``g = min(gamma, still needed - 1)`` tokens one step at
    a time; the target scores them (and everything it has not seen yet) in one
    ``prefill``; ``accept(p, q, x, generator)`` keeps a prefix; the first rejection is
    replaced by its residual sample, or, if all were kept, one more token is sampled from
    the target's last distribution. Both KV caches are then cut back (``truncate``) to
    the tokens that stand. At temperature 0 the output equals the target's greedy output.
    """
    _check_lm("target", target)
    _check_lm("draft", draft)
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma must be a positive integer, got {gamma!r}")
    if target.config.vocab != draft.config.vocab:
        raise ValueError(f"target and draft vocabularies differ: {target.config.vocab} vs "
                         f"{draft.config.vocab}")
    seq = _prompt_list(prompt_tokens, target.config, max_new_tokens)
    _prompt_list(seq, draft.config, max_new_tokens)
    accept = accept_or_resample if accept is None else accept
    res = SpecResult(tokens=[])
    if max_new_tokens == 0:
        return res
    total = len(seq) + max_new_tokens
    t_cache = ContiguousKVCache(target.config, max_len=total, device=target.device)
    d_cache = ContiguousKVCache(draft.config, max_len=total, device=draft.device)
    while len(res.tokens) < max_new_tokens:
        g = min(gamma, max_new_tokens - len(res.tokens) - 1)
        drafts, qs = [], []
        if g > 0:                               # the draft catches up, then proposes g tokens
            new = torch.tensor(seq[int(d_cache.lengths[0]):], device=draft.device)
            logits = draft.prefill(new[None], d_cache)[0, -1]
            for i in range(g):
                q = probs(logits, temperature)
                drafts.append(_sample(q, generator))
                qs.append(q)
                if i < g - 1:
                    logits = draft.decode_step(torch.tensor([drafts[-1]], device=draft.device),
                                               d_cache)[0]
        new = torch.tensor(seq[int(t_cache.lengths[0]):] + drafts, device=target.device)
        ps = probs(target.prefill(new[None], t_cache)[0, -(g + 1):], temperature)
        n_ok, last = 0, None
        for i in range(g):
            ok, token = accept(ps[i], qs[i], drafts[i], generator)
            if not ok:
                last = int(token)
                break
            n_ok += 1
        if last is None:                         # every draft kept: a bonus token from p
            last = _sample(ps[g], generator)
        emitted = drafts[:n_ok] + [last]
        seq += emitted
        res.tokens += emitted
        res.target_calls += 1
        res.drafted += g
        res.accepted += n_ok
        res.rejected += int(n_ok < g)
        res.rounds.append((drafts, n_ok, last))
        # The caches may hold only tokens that stand, and never the newest one.
        t_cache.truncate(len(seq) - 1)
        d_cache.truncate(min(int(d_cache.lengths[0]), len(seq) - 1))
    return res


def lookup_draft(context: Sequence[int], gamma: int, max_ngram: int = 3) -> list[int]:
    """Draft tokens by prompt lookup: find the last earlier occurrence of the context's
    final n-gram (n = max_ngram, then smaller) and propose up to ``gamma`` tokens that
    followed it. Returns ``[]`` when no n-gram of length >= 1 recurs."""
    if not isinstance(gamma, int) or gamma < 0:
        raise ValueError(f"gamma must be a non-negative integer, got {gamma!r}")
    if not isinstance(max_ngram, int) or max_ngram < 1:
        raise ValueError(f"max_ngram must be a positive integer, got {max_ngram!r}")
    if isinstance(context, (str, bytes)) or not isinstance(context, (Sequence, torch.Tensor)):
        raise TypeError(f"context must be a sequence of token ids, got {type(context).__name__}")
    ctx = [int(t) for t in context] if isinstance(context, torch.Tensor) else list(context)
    for t in ctx:
        _check_int("context (each token id)", t)
    if gamma == 0:
        return []
    for n in range(min(max_ngram, len(ctx) - 1), 0, -1):
        tail = ctx[-n:]
        for start in range(len(ctx) - n - 1, -1, -1):   # the tail itself is not a match
            if ctx[start:start + n] == tail:
                return ctx[start + n:start + n + gamma]
    return []


@torch.no_grad()
def prompt_lookup_generate(target, prompt_tokens, max_new_tokens: int, gamma: int,
                           max_ngram: int = 3) -> SpecResult:
    """Greedy decoding of ``target`` with prompt-lookup drafts (no draft model).

    The drafts come from :func:`lookup_draft` over everything so far; the target keeps
    the longest prefix that matches its own argmax and adds its next argmax. The output
    equals the target's greedy output.
    """
    _check_lm("target", target)
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma must be a positive integer, got {gamma!r}")
    seq = _prompt_list(prompt_tokens, target.config, max_new_tokens)
    res = SpecResult(tokens=[])
    if max_new_tokens == 0:
        return res
    cache = ContiguousKVCache(target.config, max_len=len(seq) + max_new_tokens,
                              device=target.device)
    while len(res.tokens) < max_new_tokens:
        drafts = lookup_draft(seq, min(gamma, max_new_tokens - len(res.tokens) - 1), max_ngram)
        new = torch.tensor(seq[int(cache.lengths[0]):] + drafts, device=target.device)
        best = target.prefill(new[None], cache)[0, -(len(drafts) + 1):].argmax(-1).tolist()
        n_ok = 0
        while n_ok < len(drafts) and drafts[n_ok] == best[n_ok]:
            n_ok += 1
        emitted = drafts[:n_ok] + [best[n_ok]]
        seq += emitted
        res.tokens += emitted
        res.target_calls += 1
        res.drafted += len(drafts)
        res.accepted += n_ok
        res.rejected += int(n_ok < len(drafts))
        res.rounds.append((drafts, n_ok, best[n_ok]))
        cache.truncate(len(seq) - 1)
    return res


@torch.no_grad()
def measure_alpha(target, draft, tokens, temperature: float = 1.0, window: int = 128) -> float:
    """Average acceptance rate alpha = mean over positions of sum_x min(p, q).

    ``tokens`` (1-D) is cut into consecutive windows of ``window`` tokens (a shorter last
    one is dropped); both models run teacher-forced over each window, and every position
    of every window counts once. At temperature 0 this is the greedy agreement rate.
    """
    _check_lm("target", target)
    _check_lm("draft", draft)
    _check_number("temperature", temperature, nonnegative=True)
    try:
        t = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"tokens must be a sequence of token ids, got {type(tokens).__name__}") from None
    if t.numel() and (t.is_floating_point() or t.dtype == torch.bool):
        raise TypeError(f"tokens must be integer token ids, got dtype {t.dtype}")
    t = t.long()
    vocab = min(target.config.vocab, draft.config.vocab)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise ValueError(f"tokens must be ids in [0, {vocab}), got min {int(t.min())}, "
                         f"max {int(t.max())}")
    if t.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(t.shape)}")
    if not isinstance(window, int) or not 1 <= window <= min(target.config.max_seq_len,
                                                              draft.config.max_seq_len):
        raise ValueError(f"window must be an integer in [1, max_seq_len], got {window!r}")
    n = t.numel() // window
    if n == 0:
        raise ValueError(f"need at least one window of {window} tokens, got {t.numel()} tokens")
    x = t[:n * window].view(n, window).to(target.device)
    beta = acceptance_rate(probs(target(x), temperature), probs(draft(x.to(draft.device)),
                                                                 temperature).to(target.device))
    return float(beta.double().mean())


# --- wall-clock measurement ------------------------------------------------------------------

def _check_models(models) -> list:
    if isinstance(models, (str, bytes)) or not isinstance(models, Sequence):
        raise TypeError(f"models must be a list of tiny models, got {type(models).__name__}")
    models = list(models)
    if not models:
        raise ValueError("models must name at least one model")
    for m in models:
        if not (hasattr(m, "decode_step") and hasattr(m, "prefill") and hasattr(m, "config")):
            raise TypeError(f"models must be tiny models (prefill, decode_step, config), "
                            f"got {type(m).__name__}")
    return models


@torch.no_grad()
def decode_step_times(models, context_tokens, steps: int = 16, repeats: int = 5) -> list[float]:
    """Seconds per decode step of each model, with ``context_tokens`` already in its cache.

    Each model decodes ``steps`` tokens in a row (positions after the context), and the
    models take turns, ``repeats`` turns each; every model keeps its fastest turn. Load
    on a shared machine then hits all models alike, and the fastest turn is the one least
    disturbed. The ratio of two entries is the cost ratio ``c`` of Theorem 3.8.
    """
    from .validate import check_int

    models = _check_models(models)
    steps, repeats = check_int("steps", steps, low=1), check_int("repeats", repeats, low=1)
    try:
        ctx = torch.as_tensor(context_tokens)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"context_tokens must be a sequence of token ids, got "
                        f"{type(context_tokens).__name__}") from None
    if ctx.numel() and (ctx.is_floating_point() or ctx.dtype == torch.bool):
        raise TypeError(f"context_tokens must be integer token ids, got dtype {ctx.dtype}")
    ctx = ctx.long()
    vocab = min(m.config.vocab for m in models)
    if ctx.numel() and (int(ctx.min()) < 0 or int(ctx.max()) >= vocab):
        raise ValueError(f"context_tokens must be ids in [0, {vocab}), got {ctx.tolist()}")
    if ctx.dim() != 1 or ctx.numel() == 0:
        raise ValueError(f"context_tokens must be a non-empty 1-D sequence of token ids, "
                         f"got shape {tuple(ctx.shape)}")
    n = ctx.numel()
    caches = []
    for m in models:
        if n + steps > m.config.max_seq_len:
            raise ValueError(f"context_tokens ({n}) + steps ({steps}) exceed max_seq_len "
                             f"{m.config.max_seq_len}")
        cache = ContiguousKVCache(m.config, max_len=n + steps, device=m.device)
        m.prefill(ctx[None].to(m.device), cache)
        caches.append(cache)
    best = [math.inf] * len(models)
    for turn in range(repeats + 1):              # the first turn warms up and is not kept
        for i, (m, cache) in enumerate(zip(models, caches)):
            token = ctx[-1:].to(m.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                m.decode_step(token, cache)
            seconds = (time.perf_counter() - t0) / steps
            cache.truncate(n)
            if turn > 0:
                best[i] = min(best[i], seconds)
    return best


@torch.no_grad()
def measure_speedup(target, draft, prompts, max_new_tokens: int, gammas, loops=None,
                    temperature: float = 1.0, repeats: int = 3, seed: int = 0) -> dict:
    """Wall-clock speedup of speculative sampling over sampling from the target alone.

    The baseline is :func:`utils.tiny.generate` on ``target``; each loop in ``loops``
    (name -> a function with :func:`speculative_generate`'s signature; default the
    reference loop) runs at every gamma in ``gammas``. Each configuration continues every
    prompt by ``max_new_tokens`` tokens with a generator seeded ``seed``, so every repeat
    does the same work; the configurations take turns, ``repeats`` turns, and each keeps
    its fastest run of every prompt: seconds per token. Returns a dict:

    ``gamma``; ``baseline`` (seconds per token); per loop name, in ``seconds``,
    ``measured`` (baseline over loop: the speedup), ``acceptance`` (accepted over tested
    drafts, per gamma), ``tokens_per_call`` (per gamma) and ``alpha`` (the acceptance
    pooled over all gammas: the alpha of Theorem 3.8 that this run achieved).
    """
    from .tiny import generate
    from .validate import check_int, check_number

    _check_lm("target", target)
    _check_lm("draft", draft)
    for name, v in (("gammas", gammas), ("prompts", prompts)):
        if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
            raise TypeError(f"{name} must be a list, got {type(v).__name__}")
    gammas = [check_int("gammas", g, low=1) for g in gammas]
    if not gammas:
        raise ValueError("gammas must hold at least one draft length")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
    repeats = check_int("repeats", repeats, low=1)
    check_number("temperature", temperature, nonnegative=True)
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("prompts must hold at least one prompt")
    loops = {"reference": speculative_generate} if loops is None else dict(loops)
    for name, fn in loops.items():
        if not callable(fn):
            raise TypeError(f"loops[{name!r}] must be callable, got {type(fn).__name__}")

    def baseline(prompt):
        g = torch.Generator().manual_seed(seed)
        return len(generate(target, prompt, max_new_tokens, temperature, g)), None

    def spec(fn, gamma):
        def run(prompt):
            g = torch.Generator().manual_seed(seed)
            r = fn(target, draft, prompt, max_new_tokens, gamma, temperature, g)
            return len(r.tokens), r
        return run

    configs = {("baseline", 0): baseline}
    for name, fn in loops.items():
        for gamma in gammas:
            configs[(name, gamma)] = spec(fn, gamma)
    # the unit of timing is one prompt's continuation: short enough that some repeats
    # of it fall into a quiet moment of a shared machine
    fastest = {key: [math.inf] * len(prompts) for key in configs}
    n_tokens = dict.fromkeys(configs, 0)
    runs = {key: [None] * len(prompts) for key in configs}
    for turn in range(repeats):
        for key, fn in configs.items():
            for i, prompt in enumerate(prompts):
                t0 = time.perf_counter()
                n, r = fn(prompt)
                fastest[key][i] = min(fastest[key][i], time.perf_counter() - t0)
                runs[key][i] = r
                if turn == 0:
                    n_tokens[key] += n
    best = {key: sum(fastest[key]) / n_tokens[key] for key in configs}
    out = {"gamma": gammas, "baseline": best[("baseline", 0)], "seconds": {}, "measured": {},
           "acceptance": {}, "tokens_per_call": {}, "alpha": {}}
    for name in loops:
        rs = [runs[(name, g)] for g in gammas]
        out["seconds"][name] = [best[(name, g)] for g in gammas]
        out["measured"][name] = [out["baseline"] / best[(name, g)] for g in gammas]
        acc = [sum(r.accepted for r in rg) for rg in rs]
        tested = [sum(r.accepted + r.rejected for r in rg) for rg in rs]
        out["acceptance"][name] = [a / t if t else math.nan for a, t in zip(acc, tested)]
        out["tokens_per_call"][name] = [sum(len(r.tokens) for r in rg) / sum(r.target_calls for r in rg)
                                        for rg in rs]
        out["alpha"][name] = sum(acc) / sum(tested) if sum(tested) else math.nan
    return out


# --- a model with exact probabilities, for statistical tests ------------------------------

class MarkovLM:
    """A second-order Markov language model behind the tiny models' interface.

    The next token's distribution depends on the last two tokens only:
    ``table[a, b]`` is the distribution after ``... a b``, and ``first[b]`` the one after a
    sequence of the single token b. Any sequence's probability is then a product of table
    entries, so a sampler's output can be tested exactly and cheaply. ``prefill``,
    ``decode_step`` and ``forward`` behave like :class:`utils.tiny.TinyTransformer`'s and
    work with a :class:`utils.tiny.ContiguousKVCache` made from ``model.config``; the tokens
    each cache has seen are remembered on the cache (and forgotten by ``truncate``), so a
    loop that forgets to roll back its cache is served the wrong distribution.
    """

    def __init__(self, table: torch.Tensor, first: torch.Tensor, max_seq_len: int = 64):
        table = torch.as_tensor(table, dtype=torch.float64)
        first = torch.as_tensor(first, dtype=torch.float64)
        V = table.shape[-1]
        if table.shape != (V, V, V) or first.shape != (V, V):
            raise ValueError(f"table must be [V, V, V] and first [V, V], got {tuple(table.shape)} "
                             f"and {tuple(first.shape)}")
        for name, t in (("table", table), ("first", first)):
            if (t < 0).any() or not torch.allclose(t.sum(-1), torch.ones(()).double(), atol=1e-9):
                raise ValueError(f"every row of {name} must be a probability distribution")
        self.table, self.first = table, first
        self.config = TinyConfig(vocab=V, n_layers=1, d_model=2, n_heads=1, n_kv_heads=1,
                                 d_ff=1, max_seq_len=max_seq_len)
        self.device = torch.device("cpu")
        with torch.no_grad():
            self._log_table = table.log().float()    # log 0 = -inf: softmax gives 0 back
            self._log_first = first.log().float()

    @classmethod
    def random_pair(cls, vocab: int = 6, seed: int = 0, mix: float = 0.5,
                    concentration: float = 0.5, max_seq_len: int = 64) -> tuple["MarkovLM", "MarkovLM"]:
        """A (target, draft) pair: target rows from a Dirichlet, draft rows a mix of the
        target's and independent ones (``mix`` = weight of the independent part)."""
        g = torch.Generator().manual_seed(seed)

        def dirichlet(*shape):
            x = torch._standard_gamma(torch.full(shape, concentration, dtype=torch.float64),
                                      generator=g)
            return x / x.sum(-1, keepdim=True)

        t_table, t_first = dirichlet(vocab, vocab, vocab), dirichlet(vocab, vocab)
        d_table = (1 - mix) * t_table + mix * dirichlet(vocab, vocab, vocab)
        d_first = (1 - mix) * t_first + mix * dirichlet(vocab, vocab)
        return cls(t_table, t_first, max_seq_len), cls(d_table, d_first, max_seq_len)

    def _logits(self, seq: list[int]) -> torch.Tensor:
        rows = [self._log_first[seq[0]]]
        rows += [self._log_table[a, b] for a, b in zip(seq[:-1], seq[1:])]
        return torch.stack(rows)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward(tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._logits(row) for row in tokens.tolist()])

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        if isinstance(cache, (list, tuple)) or tokens.dim() != 2 or tokens.shape[0] != 1:
            raise ValueError("MarkovLM runs one sequence at a time: tokens [1, T], one cache")
        L = int(cache.lengths[0])
        seen = getattr(cache, "_markov_tokens", [])[:L]
        if len(seen) != L:
            raise ValueError("this cache holds positions MarkovLM did not fill")
        new = tokens[0].tolist()
        if min(new) < 0 or max(new) >= self.config.vocab:
            raise ValueError(f"token ids must be in [0, {self.config.vocab})")
        if L + len(new) > cache.max_len:
            raise ValueError(f"cache full: {L} + {len(new)} positions > max_len {cache.max_len}")
        full = seen + new
        cache._markov_tokens = full
        cache.advance(len(new))
        return self._logits(full)[L:][None]

    def decode_step(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        return self.prefill(tokens.reshape(1, 1), cache)[:, -1]

    def sequence_probs(self, prompt: Sequence[int], k: int, temperature: float = 1.0) -> torch.Tensor:
        """Exact joint probabilities of the next ``k`` tokens after ``prompt`` when sampling
        at ``temperature`` (``softmax(log p / T)``, the argmax at 0): shape ``[V] * k``."""
        prompt = list(prompt)
        if not prompt or not isinstance(k, int) or k < 1:
            raise ValueError("need a non-empty prompt and k >= 1")
        table, first = _tempered(self.table, temperature), _tempered(self.first, temperature)
        joint = first[prompt[-1]] if len(prompt) == 1 else table[prompt[-2], prompt[-1]]
        for step in range(1, k):
            if step == 1:     # p(x2 | prompt[-1], x1)
                joint = joint[:, None] * table[prompt[-1]]
            else:             # p(x_{s+1} | x_{s-1}, x_s): the table broadcast over the last two axes
                joint = joint[..., None] * table
        return joint.clone()


def _tempered(dist: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T) renormalised over the last axis (float64); the one-hot argmax at T = 0."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return torch.nn.functional.one_hot(dist.argmax(-1), dist.shape[-1]).double()
    w = dist.double() ** (1.0 / temperature)
    return w / w.sum(-1, keepdim=True)


# --- a goodness-of-fit test ------------------------------------------------------------------

def chi_square(counts, expected_probs, min_expected: float = 5.0) -> tuple[float, int, float]:
    """Pearson's chi-square test of ``counts`` against the distribution ``expected_probs``.

    Cells whose expected count (``N * prob``) is below ``min_expected`` are pooled into one
    cell (and that cell into the smallest other one if it is still below), so the
    chi-square approximation holds. A count in a cell of probability 0 is
    impossible under the distribution: the statistic is inf and the p-value 0.
    Returns ``(statistic, degrees of freedom, p-value)``.
    """
    from scipy import stats

    counts = np.asarray(counts, dtype=float).reshape(-1)
    p = np.asarray(expected_probs, dtype=float).reshape(-1)
    if counts.shape != p.shape:
        raise ValueError(f"counts and expected_probs differ in size: {counts.size} vs {p.size}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"counts must be finite and >= 0, got {counts.tolist()}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or not math.isclose(p.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"expected_probs must be a distribution (>= 0, sum 1), got {p.tolist()}")
    n = counts.sum()
    if n <= 0:
        raise ValueError("no observations")
    if np.any(counts[p == 0] > 0):
        return math.inf, 0, 0.0
    expected = n * p / p.sum()
    big = expected >= min_expected
    obs = list(counts[big])
    exp = list(expected[big])
    small_obs, small_exp = counts[~big].sum(), expected[~big].sum()
    if small_exp >= min_expected or (small_exp > 0 and not exp):
        obs.append(small_obs)
        exp.append(small_exp)
    elif small_exp > 0:                  # still too small: join the smallest big cell
        i = int(np.argmin(exp))
        obs[i] += small_obs
        exp[i] += small_exp
    if len(obs) < 2:
        return 0.0, 0, 1.0
    stat, pvalue = stats.chisquare(obs, exp)
    return float(stat), len(obs) - 1, float(pvalue)
