"""Checkers for lab 19, speculative decoding.

The oracles: the target model itself (``utils.tiny.generate`` for greedy output, its
exact next-token distributions for sampling), exact distributions of
:class:`utils.speculative.MarkovLM` for statistical tests of whole loops,
``scipy.stats.chisquare`` for the goodness-of-fit statistic, and the formulas of
Leviathan et al. 2023, written out here independently of ``utils.speculative``.

Every statistical test is seeded: it either passes or fails the same way on every run.
Its threshold is a p-value of 0.001: a correct sampler fails it with probability 0.001
for a random seed, and the sample sizes are chosen so that the wrong samplers the tests
in ``tests/test_ch19_checks.py`` try are rejected with p-values below 1e-6.
"""
from __future__ import annotations

import math
import numbers
from functools import lru_cache

import numpy as np
import torch

from .. import speculative as sp
from .. import tiny, tiny_corpus
from . import (exercise, expect_close, expect_dtype, expect_equal, expect_shape, expect_type, fail,
               measurement_warning)

P_MIN = 1e-3            # a correct sampler passes unless its seeded p-value is below this
P_BROKEN = 1e-6         # a broken one must be rejected at least this clearly

# Hand-made distributions for one position. B has a token the draft never proposes
# (q = 0, p > 0: reachable only through the residual) and one the target never emits
# (p = 0, q > 0: must always be rejected).
_PQ = {
    "A": ([0.40, 0.30, 0.20, 0.10], [0.10, 0.20, 0.30, 0.40]),
    "B": ([0.50, 0.20, 0.20, 0.10, 0.00], [0.20, 0.40, 0.00, 0.10, 0.30]),
    "C": ([0.25, 0.25, 0.50], [0.25, 0.25, 0.50]),                 # p = q: always accept
    "greedy": ([0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]),        # one-hot, disagreeing
}
_N_ONE_POSITION = 10_000


def _pq(name):
    p, q = _PQ[name]
    return torch.tensor(p), torch.tensor(q)


def _oracle_accept(p, q):
    p64, q64 = p.double(), q.double()
    out = torch.ones_like(p64)
    mask = q64 > 0
    out[mask] = torch.clamp(p64[mask] / q64[mask], max=1.0)
    return out


def _oracle_residual(p, q):
    r = torch.clamp(p.double() - q.double(), min=0)
    return r / r.sum() if r.sum() > 0 else p.double()


def _call_pure(fn, p, q, what):
    p0, q0 = p.clone(), q.clone()
    got = fn(p, q)
    if not (torch.equal(p, p0) and torch.equal(q, q0)):
        fail(f"{what} changed its inputs", "p and q left as they were", "they were modified in place",
             "work on new tensors (torch.clamp(p - q, min=0) makes one), never p -= ...")
    expect_type(got, torch.Tensor, what)
    expect_shape(got, p.shape, what)
    expect_dtype(got, p.dtype, what)
    return got


def _pair_result(got, what):
    if not isinstance(got, tuple) or len(got) != 2:
        fail(f"{what} returned the wrong kind of result", "a tuple (accepted: bool, token: int)",
             repr(got)[:80], "return (True, x) to keep the draft token, (False, y) after resampling")
    ok, token = got
    if isinstance(ok, torch.Tensor):
        ok = ok.item()
    if isinstance(token, torch.Tensor):
        if token.numel() != 1:
            fail(f"{what} returned a token tensor of shape {tuple(token.shape)}",
                 "one token id", repr(token), "int(torch.multinomial(r, 1, generator=g))")
        token = token.item()
    if not isinstance(ok, (bool, np.bool_)) or isinstance(token, bool) or \
            not isinstance(token, numbers.Integral):
        fail(f"{what} returned the wrong types", "(bool, int)",
             f"({type(ok).__name__}, {type(token).__name__})", "e.g. return bool(u < a), int(x)")
    return bool(ok), int(token)


@exercise
def accept_reject(acceptance_probability, residual, accept_or_resample):
    """The one-position rule: exact min(1, p/q) and residual; sampled tokens follow p."""
    for name in _PQ:
        p, q = _pq(name)
        a = _call_pure(acceptance_probability, p, q, f"acceptance_probability(p, q) for pair {name}")
        expect_close(a, _oracle_accept(p, q).float(), rtol=1e-6, atol=1e-7,
                     what=f"acceptance_probability(p, q) for pair {name} (p={p.tolist()}, "
                          f"q={q.tolist()})",
                     hint="min(1, p(x)/q(x)) for every x; where q(x) = 0 the draft never proposes "
                          "x, so return 1 there (and avoid dividing by zero)")
        r = _call_pure(residual, p, q, f"residual(p, q) for pair {name}")
        expect_close(r, _oracle_residual(p, q).float(), rtol=1e-6, atol=1e-7,
                     what=f"residual(p, q) for pair {name} (p={p.tolist()}, q={q.tolist()})",
                     hint="max(0, p - q), divided by its sum; when p = q the sum is 0 and a "
                          "rejection cannot happen: return p then")

    # Greedy: one-hot p and q that disagree -> always rejected, the target's argmax comes out.
    p, q = _pq("greedy")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ok, token = _pair_result(accept_or_resample(p, q, 1, g), "accept_or_resample")
        if ok or token != 2:
            fail("accept_or_resample at temperature 0 (one-hot p on token 2, q on token 1)",
                 "(False, 2) every time: p(1) = 0, so the draft token is never kept",
                 f"({ok}, {token})", "accept when u < min(1, p(x)/q(x)) with u uniform in [0, 1): "
                 "u < 0 is never true")

    # Statistics: the pair (accepted?, token) has an exact law.
    #   P(accepted, x) = q(x) min(1, p(x)/q(x)) = min(p(x), q(x))
    #   P(rejected, y) = (1 - beta) residual(y),     beta = sum_x min(p(x), q(x))
    details = []
    for k, name in enumerate(("A", "B")):
        p, q = _pq(name)
        V = p.numel()
        gen = torch.Generator().manual_seed(100 + k)
        drafts = torch.multinomial(q, _N_ONE_POSITION, replacement=True, generator=gen).tolist()
        counts = np.zeros(2 * V)
        emitted = np.zeros(V)
        for x in drafts:
            ok, token = _pair_result(accept_or_resample(p.clone(), q.clone(), x, gen),
                                     "accept_or_resample")
            if not 0 <= token < V:
                fail(f"accept_or_resample returned token {token} for pair {name}",
                     f"a token id in [0, {V})", str(token), "sample from the residual over the vocabulary")
            if ok and token != x:
                fail(f"accept_or_resample accepted draft token {x} but returned {token}",
                     "the draft token itself when accepted", str(token), "return (True, x)")
            counts[(0 if ok else V) + token] += 1
            emitted[token] += 1
        beta = float(torch.minimum(p, q).sum())
        law = np.concatenate([torch.minimum(p, q).double().numpy(),
                              (1 - beta) * _oracle_residual(p, q).numpy()])
        stat, dof, pv = sp.chi_square(counts, law)
        if pv < P_MIN:
            rate = counts[:V].sum() / _N_ONE_POSITION
            fail(f"accept_or_resample: (accepted, token) does not follow the rule for pair {name}",
                 f"acceptance rate ≈ sum min(p, q) = {beta:.3f}; accepted tokens ∝ min(p, q); "
                 f"rejections resampled from the residual (chi-square p ≥ {P_MIN:g})",
                 f"acceptance rate {rate:.3f}; chi-square {stat:.1f} on {dof} dof, p = {pv:.2g} "
                 f"over {_N_ONE_POSITION:,} seeded draws",
                 "draw u = torch.rand((), generator=generator), keep x if u < min(1, p(x)/q(x)), "
                 "else return (False, a sample of residual(p, q)); use the generator for every draw")
        _, _, pv_p = sp.chi_square(emitted, p.double().numpy())
        details.append(f"{name}: p = {pv:.2f}")
        if pv_p < P_MIN:      # implied by the joint test; kept for a clearer message
            fail(f"emitted tokens do not follow p for pair {name}", "tokens distributed as p",
                 f"chi-square p = {pv_p:.2g}", "see the joint test above")
    return (f"exact min(1, p/q) and residual on {len(_PQ)} pairs; greedy case exact; "
            f"(accepted, token) over 2 × {_N_ONE_POSITION:,} seeded draws matches the law "
            f"({', '.join(details)})")


# --- the loop ------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _models():
    return tiny.load("tiny-target"), tiny.load("tiny-draft")


class _Counted:
    """A model behind a call counter: the learner's loop is handed this instead.

    It counts forward calls (``prefill``, ``decode_step``, or calling the model) so the
    checker can compare them with the loop's own count, and stops a loop that runs on
    and on (a round that emits nothing never ends) with a clear failure.
    """

    def __init__(self, model, name: str, limit: int):
        self._model, self._name, self._limit = model, name, limit
        self.calls = 0
        self.config, self.device = model.config, model.device

    def _tick(self):
        self.calls += 1
        if self.calls > self._limit:
            fail(f"your loop called the {self._name} more than {self._limit} times",
                 "a loop that emits at least one token per target call and then stops",
                 f"{self.calls} calls and counting", "every round must emit the accepted drafts "
                 "plus one token (the correction, or the bonus token when all were kept), even "
                 "when it drafts nothing; stop at max_new_tokens")

    def prefill(self, tokens, cache):
        self._tick()
        return self._model.prefill(tokens, cache)

    def decode_step(self, tokens, cache):
        self._tick()
        return self._model.decode_step(tokens, cache)

    def __call__(self, tokens):
        self._tick()
        return self._model(tokens)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _counted_pair(target, draft, max_new_tokens, gamma):
    return (_Counted(target, "target", 2 * max_new_tokens + 8),
            _Counted(draft, "draft", (gamma + 2) * (max_new_tokens + 2) + 8))


def _check_call_count(res, counted_target, what):
    if not counted_target.calls - 1 <= res.target_calls <= counted_target.calls:
        fail(f"{what}: target_calls does not count the target's forward calls",
             f"{counted_target.calls} (or one less, if the prompt is prefilled on its own)",
             f"target_calls = {res.target_calls}", "add 1 for every target.prefill you make")


@lru_cache(maxsize=None)
def _prompts():
    return tuple(tuple(tiny.TOKENIZER.encode(p)) for p in tiny_corpus.prompts(3, seed=19))


@lru_cache(maxsize=None)
def _greedy_reference(prompt: tuple, n: int):
    target, _ = _models()
    return tuple(tiny.generate(target, list(prompt), n))


@lru_cache(maxsize=None)
def _oracle_calls(prompt: tuple, n: int, gamma: int):
    target, draft = _models()
    return sp.speculative_generate(target, draft, list(prompt), n, gamma, temperature=0.0).target_calls


def _result(got, what, gamma=None):
    for attr in ("tokens", "target_calls", "drafted", "accepted", "rejected"):
        if not hasattr(got, attr):
            fail(f"{what} returned no `{attr}`", "a utils.speculative.SpecResult",
                 type(got).__name__, "return SpecResult(tokens=..., target_calls=..., drafted=..., "
                 "accepted=..., rejected=...)")
    tokens = got.tokens
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    expect_type(tokens, list, f"{what}.tokens", hint="a list of int token ids")
    for attr in ("target_calls", "drafted", "accepted", "rejected"):
        expect_type(getattr(got, attr), int, f"{what}.{attr}")
    n, calls, acc, rej, dr = len(tokens), got.target_calls, got.accepted, got.rejected, got.drafted
    if n and not (acc + calls == n and rej <= calls and acc + rej <= dr
                  and (gamma is None or dr <= gamma * calls)):
        fail(f"{what}: the counts do not add up",
             "len(tokens) = accepted + target_calls (each call emits the accepted drafts and one "
             "more token); rejected ≤ target_calls; accepted + rejected ≤ drafted ≤ gamma × calls",
             f"{n} tokens, {calls} calls, drafted {dr}, accepted {acc}, rejected {rej}",
             "count once per target call; a rejection ends the round")
    return [int(t) for t in tokens]


@exercise
def speculative_generate(fn):
    """``fn(target, draft, prompt, max_new_tokens, gamma, temperature, generator, accept)``."""
    target, draft = _models()
    n_new = 40
    cases = 0
    for prompt in _prompts():
        ref = list(_greedy_reference(prompt, n_new))
        for gamma in (1, 3, 6):
            what = (f"speculative_generate(prompt {tiny.TOKENIZER.decode(list(prompt))!r}, "
                    f"max_new_tokens={n_new}, gamma={gamma}, temperature=0)")
            ct, cd = _counted_pair(target, draft, n_new, gamma)
            got = fn(ct, cd, list(prompt), n_new, gamma, temperature=0.0,
                     generator=torch.Generator().manual_seed(0))
            tokens = _result(got, what, gamma)
            _check_call_count(got, ct, what)
            if tokens != ref:
                i = next((k for k, (a, b) in enumerate(zip(tokens, ref)) if a != b), min(len(tokens), len(ref)))
                fail(f"{what} differs from the target's greedy output",
                     f"{len(ref)} tokens: {tiny.TOKENIZER.decode(ref)!r}",
                     f"{len(tokens)} tokens: {tiny.TOKENIZER.decode([t for t in tokens if 0 <= t < 44])!r} "
                     f"(first difference at token {i})",
                     "after each round truncate both caches to the tokens that stand (and never "
                     "keep the newest token in them); verify with the target's logits for the "
                     "positions of the drafts, emit the accepted prefix plus one more token")
            best = _oracle_calls(prompt, n_new, gamma)
            if got.target_calls > best + max(2, best // 10):
                fail(f"{what} makes too many target calls",
                     f"about {best} target calls (the reference loop's, greedy is deterministic)",
                     f"{got.target_calls}", "keep every draft token the target agrees with, "
                     "not only the first; after a full acceptance add the bonus token")
            cases += 1
    # edges: nothing to do, a single token, a one-token prompt, a request up to max_seq_len
    prompt = list(_prompts()[0])
    target, draft = _counted_pair(target, draft, 256, 6)     # a guard against endless loops
    got = _result(fn(target, draft, prompt, 0, 4, temperature=0.0), "max_new_tokens=0")
    expect_equal(got, [], what="speculative_generate(..., max_new_tokens=0).tokens")
    got = _result(fn(target, draft, prompt, 1, 4, temperature=0.0), "max_new_tokens=1", 4)
    expect_equal(got, list(_greedy_reference(tuple(prompt), 1)),
                 what="speculative_generate(..., max_new_tokens=1, gamma=4).tokens",
                 hint="never emit more than max_new_tokens: draft at most (tokens still needed - 1)")
    one = [tiny.TOKENIZER.encode("m")[0]]
    got = _result(fn(target, draft, one, 12, 3, temperature=0.0), "one-token prompt", 3)
    expect_equal(got, list(_greedy_reference(tuple(one), 12)),
                 what="speculative_generate(prompt 'm', max_new_tokens=12, gamma=3).tokens")
    long_prompt = (list(tiny.TOKENIZER.encode(tiny_corpus.heldout_text(300)))[:240])
    got = _result(fn(target, draft, long_prompt, 16, 5, temperature=0.0), "prompt of 240 + 16 new", 5)
    expect_equal(got, list(_greedy_reference(tuple(long_prompt), 16)),
                 what="speculative_generate(240-token prompt, max_new_tokens=16, gamma=5).tokens",
                 hint="prompt + max_new_tokens = 256 = max_seq_len: make the caches that long and "
                      "never draft more than the tokens still needed minus one")
    try:
        fn(target, draft, prompt, 4, 0, temperature=0.0)
    except ValueError as err:
        if "gamma" not in str(err):
            fail("speculative_generate(..., gamma=0) raised a ValueError that does not name gamma",
                 "a message naming `gamma`", repr(str(err)), "say which argument was wrong")
    else:
        fail("speculative_generate(..., gamma=0) did not raise", "ValueError naming gamma",
             "it returned normally", "gamma is the most draft tokens per round: 1 or more")
    # sampling runs and uses the generator
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = _result(fn(target, draft, prompt, 30, 4, temperature=1.0, generator=g1), "T=1 run", 4)
    b = _result(fn(target, draft, prompt, 30, 4, temperature=1.0, generator=g2), "T=1 run", 4)
    if len(a) != 30 or a != b:
        fail("speculative_generate at temperature 1 is not reproducible",
             "30 tokens, the same twice with generators seeded alike", f"{len(a)} and {len(b)} tokens, "
             f"{'equal' if a == b else 'different'}", "pass `generator` to every torch.multinomial "
             "and torch.rand call")
    return (f"greedy output equals utils.tiny.generate on {cases} (prompt, gamma) cases and 4 edge "
            "cases (0 and 1 new tokens, a 1-token prompt, a request up to max_seq_len); gamma=0 "
            "refused; sampling reproducible")


# --- the distribution ------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _markov_pair():
    return sp.MarkovLM.random_pair(vocab=5, seed=0, mix=0.6)


def _markov_counts(fn, n_runs, temperature, seed, accept=None, n_tokens=4, gamma=2):
    target, draft = _markov_pair()
    V = target.config.vocab
    counts = np.zeros(V ** n_tokens)
    gen = torch.Generator().manual_seed(seed)
    prompt = [1, 2]
    kwargs = {"accept": accept} if accept is not None else {}
    for _ in range(n_runs):
        ct, cd = _counted_pair(target, draft, n_tokens, gamma)
        res = fn(ct, cd, list(prompt), n_tokens, gamma, temperature=temperature,
                 generator=gen, **kwargs)
        toks = _result(res, "speculative_generate on the MarkovLM pair", gamma)
        if len(toks) != n_tokens or not all(0 <= t < V for t in toks):
            fail("speculative_generate on the MarkovLM pair returned the wrong tokens",
                 f"{n_tokens} token ids in [0, {V})", str(toks), "emit exactly max_new_tokens tokens")
        counts[int(np.ravel_multi_index(toks, (V,) * n_tokens))] += 1
    law = target.sequence_probs(prompt, n_tokens, temperature).reshape(-1).numpy()
    return counts, law


def _check_chi_square_fn(fn):
    rng = np.random.default_rng(0)
    cases = []
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.04, 0.01])
    cases.append((rng.multinomial(200, probs).astype(float), probs, "6 cells, 2 pooled"))
    probs = rng.dirichlet(np.full(30, 0.3))
    cases.append((rng.multinomial(1000, probs).astype(float), probs, "30 cells"))
    skew = probs.copy()
    skew[:5] += 0.05
    skew /= skew.sum()
    cases.append((rng.multinomial(1000, skew).astype(float), probs, "30 cells, a different law"))
    for counts, probs_, label in cases:
        got = fn(counts.copy(), probs_.copy())
        if not isinstance(got, tuple) or len(got) != 3:
            fail(f"chi_square_test({label}) returned the wrong kind of result",
                 "a tuple (statistic, dof, p_value)", repr(got)[:80], "return stat, dof, pvalue")
        ref = sp.chi_square(counts, probs_)
        expect_equal(int(got[1]), ref[1], what=f"chi_square_test({label}): degrees of freedom",
                     hint="cells with expected count N·p below min_expected are pooled into one "
                          "cell; dof = number of cells after pooling - 1")
        expect_close(float(got[0]), ref[0], rtol=1e-9, atol=1e-12,
                     what=f"chi_square_test({label}): statistic",
                     hint="sum over (pooled) cells of (observed - expected)^2 / expected")
        expect_close(float(got[2]), ref[2], rtol=1e-6, atol=1e-300,
                     what=f"chi_square_test({label}): p-value",
                     hint="scipy.stats.chi2.sf(statistic, dof)")
    got = fn(np.array([10.0, 0.0, 1.0]), np.array([0.9, 0.1, 0.0]))
    if not (math.isinf(float(got[0])) and float(got[2]) == 0.0):
        fail("chi_square_test with a count in a cell of probability 0",
             "statistic inf and p-value 0: that outcome is impossible under the law",
             repr(got), "check counts[probs == 0] before pooling")


@exercise
def same_distribution(speculative_generate, chi_square_test):
    """The learner's loop samples from the target's law; an always-accept loop does not."""
    _check_chi_square_fn(chi_square_test)
    parts = []
    for temperature, n_runs, seed in ((1.0, 3000, 11), (0.5, 2000, 12)):
        counts, law = _markov_counts(speculative_generate, n_runs, temperature, seed)
        stat, dof, pv = sp.chi_square(counts, law)
        if pv < P_MIN:
            fail(f"speculative sampling at temperature {temperature:g} does not follow the target",
                 f"the joint law of 4 emitted tokens equal to the target's (chi-square p ≥ {P_MIN:g})",
                 f"chi-square {stat:.1f} on {dof} dof, p = {pv:.2g}, over {n_runs:,} seeded runs of "
                 "the MarkovLM pair (gamma = 2, so the 4th token always comes from a second round)",
                 "use the q you sampled each draft from, p from the target's logits at the draft's "
                 "position, the accept rule of exercise 1, a bonus token from p after a full "
                 "acceptance, and roll both caches back to the tokens that stand")
        parts.append(f"T={temperature:g}: {n_runs:,} runs, p = {pv:.2f}")
    counts, law = _markov_counts(speculative_generate, 3000, 1.0, 11, accept=sp.always_accept)
    stat, dof, pv = sp.chi_square(counts, law)
    if pv > P_BROKEN:
        fail("with accept=always_accept your loop still matched the target",
             f"the broken rule rejected (p < {P_BROKEN:g}): keeping every draft samples the draft's law",
             f"p = {pv:.2g}", "pass `accept` through: call accept(p, q, x, generator) for each draft")
    return (f"chi_square_test matches scipy.stats.chisquare; 4-token joint law of the MarkovLM "
            f"pair ({'; '.join(parts)}); always-accept caught (p < {P_BROKEN:g})")


# --- alpha and tokens per call ------------------------------------------------------------

@exercise
def acceptance(measure_alpha, expected_tokens):
    """``expected_tokens(alpha, gamma)`` and ``measure_alpha(target, draft, tokens, T, window)``."""
    for alpha in (0.0, 0.3, 0.82, 0.99, 1.0):
        for gamma in (0, 1, 4, 10):
            want = sum(alpha ** i for i in range(gamma + 1))
            got = expected_tokens(alpha, gamma)
            expect_close(float(got), want, rtol=1e-9, atol=1e-12,
                         what=f"expected_tokens({alpha}, {gamma})",
                         hint="(1 - alpha^(gamma+1)) / (1 - alpha), which is 1 + alpha + ... + "
                              "alpha^gamma; at alpha = 1 it is gamma + 1 (no division by zero)")
    target, draft = _models()
    held = torch.tensor(tiny.TOKENIZER.encode(tiny_corpus.heldout_text(128 * 24)))
    details = []
    for temperature in (1.0, 0.0):
        got = measure_alpha(target, draft, held.clone(), temperature, 128)
        expect_type(got, float, f"measure_alpha(..., temperature={temperature:g})",
                    hint="return a Python float: float(beta.mean())")
        want = sp.measure_alpha(target, draft, held, temperature, 128)
        expect_close(got, want, rtol=0, atol=2e-4,
                     what=f"measure_alpha(tiny-target, tiny-draft, 24 held-out windows, "
                          f"temperature={temperature:g})",
                     hint="run both models over each window of 128 tokens (teacher forcing), take "
                          "probs(logits, T) for each, sum min(p, q) over the vocabulary at every "
                          "position and average over all positions; at T = 0 it is the argmax "
                          "agreement rate")
        details.append(f"T={temperature:g}: {want:.3f}")
    mt, md = _markov_pair()
    toks = torch.randint(0, 5, (64 * 8,), generator=torch.Generator().manual_seed(3))
    expect_close(measure_alpha(mt, md, toks, 1.0, 64), sp.measure_alpha(mt, md, toks, 1.0, 64),
                 rtol=0, atol=1e-6, what="measure_alpha on the MarkovLM pair, window 64")
    return f"formula for 20 (alpha, gamma) pairs; alpha of the tiny pair {', '.join(details)}"


# --- the speedup model -------------------------------------------------------------------------

def _speedup_oracle(alpha, gamma, c):
    return sum(alpha ** i for i in range(gamma + 1)) / (gamma * c + 1)


@exercise
def speedup_formula(speedup, optimal_gamma):
    """``speedup(alpha, gamma, c)`` (Theorem 3.8) and ``optimal_gamma(alpha, c, max_gamma)``."""
    for alpha in (0.0, 0.5, 0.8, 1.0):
        for gamma in (0, 1, 3, 8):
            for c in (0.0, 0.05, 0.3, 1.0):
                expect_close(float(speedup(alpha, gamma, c)), _speedup_oracle(alpha, gamma, c),
                             rtol=1e-9, atol=1e-12, what=f"speedup({alpha}, {gamma}, {c})",
                             hint="expected tokens per target call / (gamma c + 1): one round "
                                  "costs gamma draft steps and one target step")
    for alpha, c, max_gamma in ((0.8, 0.05, 64), (0.8, 0.3, 64), (0.9, 0.01, 64), (0.6, 0.5, 64),
                                (0.5, 0.6, 64), (0.99, 0.001, 16), (0.0, 0.1, 8)):
        scores = [_speedup_oracle(alpha, g, c) for g in range(max_gamma + 1)]
        want = int(np.argmax(scores))
        got = optimal_gamma(alpha, c, max_gamma)
        expect_type(got, int, f"optimal_gamma({alpha}, {c}, {max_gamma})")
        expect_equal(got, want, what=f"optimal_gamma({alpha}, {c}, {max_gamma})",
                     hint="the gamma in 0..max_gamma with the largest speedup (the smallest on a "
                          "tie); 0 means speculation does not pay")
    return "Theorem 3.8 on 64 (alpha, gamma, c) triples; optimal gamma on 7 cases, incl. 0 and the cap"


#: How far the best measured speedup may sit from Theorem 3.8 before a warning.
MEASUREMENT_TOLERANCE = 0.15


@exercise
def speedup_measurement(results):
    """``results``: {"gamma": [...], "measured": [...], "predicted": [...], "alpha", "c"},
    optionally with "verify_cost" and "tokens_per_call" (one per gamma, both or neither).

    Logic (fails): the keys, equal lengths, alpha a probability and c a positive ratio,
    every prediction equal to Theorem 3.8 at (alpha, gamma, c), every measurement a
    positive finite number; when given, every verify cost (a verify call over a one-token
    call) positive and finite and every tokens-per-call figure in [1, gamma + 1].
    Measurement (warns, never fails): a measured speedup more than 10x away from its
    prediction, and the best measured speedup more than ``MEASUREMENT_TOLERANCE`` away
    from the prediction at the same gamma. With the two optional lists the warning names
    the extended model, tokens per call / (gamma c + verify cost), Theorem 3.8's cost model
    with the measured verify cost in place of one step: when it explains the measurement,
    the theorem's idealisation (not the loop, not the machine) is the likely cause.
    """
    expect_type(results, dict, "results")
    for key in ("gamma", "measured", "predicted", "alpha", "c"):
        if key not in results:
            fail(f"results has no {key!r}", "keys gamma, measured, predicted, alpha, c",
                 ", ".join(map(repr, results)), "build the dict as the cell above describes")
    gammas, meas, pred = list(results["gamma"]), list(results["measured"]), list(results["predicted"])
    alpha, c = float(results["alpha"]), float(results["c"])
    if not (len(gammas) == len(meas) == len(pred) >= 3):
        fail("results lists", "gamma, measured and predicted of equal length, at least 3 gammas",
             f"lengths {len(gammas)}, {len(meas)}, {len(pred)}", "sweep gamma over 1..6")
    if not (0 < alpha < 1 and math.isfinite(c) and c > 0):
        fail("results alpha and c", "0 < alpha < 1 (measured acceptance) and a cost ratio c > 0",
             f"alpha {alpha}, c {c}", "c = time of a draft step / time of a target step")
    for g, m, p in zip(gammas, meas, pred):
        expect_close(float(p), _speedup_oracle(alpha, int(g), c), rtol=1e-6,
                     what=f"predicted speedup at gamma={g}", hint="speedup(alpha, gamma, c)")
        if not (isinstance(m, numbers.Real) and math.isfinite(m) and m > 0):
            fail(f"measured speedup at gamma={g}", "a positive finite number", f"{m!r}",
                 "speedup = baseline seconds per token / speculative seconds per token")
    extended = _extended_model(results, gammas, c)
    busy = ("another process busy on this machine during the timing, or a CPU whose "
            "per-call overhead differs (re-run the cell when the machine is quiet)")
    for g, m, p in zip(gammas, meas, pred):
        if not 0.1 * p <= m <= 10 * p:
            measurement_warning(f"the measured speedup at gamma={g} is far from the model",
                                f"{p:.2f}x (Theorem 3.8)", f"{m:.2f}x", busy)
    i = int(np.argmax(meas))
    best, ratio = gammas[i], float(meas[i]) / float(pred[i])
    if abs(ratio - 1) > MEASUREMENT_TOLERANCE:
        if ratio > 1:
            cause = "c measured in a slow moment (a draft step timed while the machine was busy)"
        elif extended is not None and abs(meas[i] / extended[i] - 1) <= MEASUREMENT_TOLERANCE:
            v, n = float(results["verify_cost"][i]), float(results["tokens_per_call"][i])
            cause = (f"Theorem 3.8's idealisation: it takes a verify call to cost one decode step "
                     f"and a call to yield Eq. 1's {_speedup_oracle(alpha, int(best), 0):.2f} "
                     f"tokens; here the call costs {v:.2f} steps and yielded {n:.2f} tokens, and "
                     f"with those the same cost model predicts {extended[i]:.2f}x, close to the "
                     f"measurement")
        else:
            cause = busy
        measurement_warning(
            f"best measured speedup {meas[i]:.2f}x at gamma={best} is {abs(ratio - 1):.0%} "
            f"{'below' if ratio < 1 else 'above'} Theorem 3.8",
            f"{pred[i]:.2f}x ± {MEASUREMENT_TOLERANCE:.0%} (alpha {alpha:.2f}, c {c:.2f})",
            f"{meas[i]:.2f}x", cause)
    summary = (f"{len(gammas)} gammas; predictions follow Theorem 3.8; best measured {meas[i]:.2f}x "
               f"at gamma {best} ({ratio:.2f} of the prediction {pred[i]:.2f}x")
    if extended is not None:
        summary += f", {meas[i] / extended[i]:.2f} of the extended model's {extended[i]:.2f}x"
    return summary + ")"


def _extended_model(results, gammas, c):
    """tokens per call / (gamma c + verify cost) per gamma, or None when not given."""
    given = [k for k in ("verify_cost", "tokens_per_call") if results.get(k) is not None]
    if not given:
        return None
    if len(given) == 1:
        missing = ({"verify_cost", "tokens_per_call"} - set(given)).pop()
        fail(f"results has {given[0]!r} but no {missing!r}",
             "both verify_cost and tokens_per_call (one per gamma), or neither",
             ", ".join(map(repr, results)), "the extended model needs both")
    verify, per_call = list(results["verify_cost"]), list(results["tokens_per_call"])
    if not len(verify) == len(per_call) == len(gammas):
        fail("results verify_cost and tokens_per_call", f"one entry per gamma ({len(gammas)})",
             f"lengths {len(verify)} and {len(per_call)}", "one figure for each gamma swept")
    for g, v, n in zip(gammas, verify, per_call):
        if not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):
            fail(f"verify cost at gamma={g}", "a positive finite ratio: one target call scoring "
                 "gamma + 1 tokens over one scoring a single token", f"{v!r}",
                 "time both calls after the same cached context and divide")
        if not (isinstance(n, numbers.Real) and 1 <= n <= int(g) + 1):
            fail(f"tokens per call at gamma={g}", f"between 1 and gamma + 1 = {int(g) + 1}: a "
                 "round emits its accepted drafts and one more token", f"{n!r}",
                 "tokens emitted / target calls, from the timed runs")
    return [float(n) / (int(g) * c + float(v)) for g, n, v in zip(gammas, per_call, verify)]


# --- prompt lookup -----------------------------------------------------------------------------

_LOOKUP_CASES = [
    # (context, gamma, max_ngram)
    ([1, 2, 3, 4, 1, 2, 3], 3, 3),          # trigram 1 2 3 recurs: propose 4 1 2
    ([1, 2, 3, 4, 1, 2, 3], 10, 3),         # the continuation runs to the end of the context
    ([5, 6, 7, 5, 6, 8, 5, 6], 2, 3),       # bigram 5 6: the LAST earlier occurrence -> 8 5
    ([1, 2, 3, 9, 3], 4, 3),                # only the unigram 3 recurs -> 9 3
    ([1, 2, 3, 4], 3, 3),                   # nothing recurs -> []
    ([7, 7, 7, 7], 3, 2),                   # overlapping: the last earlier 7 7 starts at 1 -> 7
    ([4], 3, 3),                            # too short to have an earlier occurrence
    ([1, 2, 1, 2], 0, 3),                   # gamma 0 -> []
    ([3, 1, 2, 3, 1, 2, 4, 1, 2], 3, 1),    # max_ngram 1: last earlier '2' is at index 5 -> 4 1 2
]


@exercise
def prompt_lookup(lookup_draft, prompt_lookup_generate):
    """``lookup_draft(context, gamma, max_ngram)`` and greedy ``prompt_lookup_generate``."""
    for ctx, gamma, n in _LOOKUP_CASES:
        got = lookup_draft(list(ctx), gamma, n)
        if isinstance(got, torch.Tensor):
            got = got.tolist()
        expect_equal(list(got) if isinstance(got, tuple) else got, sp.lookup_draft(ctx, gamma, n),
                     what=f"lookup_draft({ctx}, gamma={gamma}, max_ngram={n})",
                     hint="for n = max_ngram down to 1: find the last start s < len - n with "
                          "context[s:s+n] == context[-n:]; return context[s+n : s+n+gamma]; "
                          "[] if no n-gram recurs")
    rng = np.random.default_rng(7)
    for _ in range(200):
        ctx = rng.integers(0, 4, size=int(rng.integers(1, 30))).tolist()
        gamma, n = int(rng.integers(0, 6)), int(rng.integers(1, 4))
        got = lookup_draft(list(ctx), gamma, n)
        got = got.tolist() if isinstance(got, torch.Tensor) else list(got)
        expect_equal(got, sp.lookup_draft(ctx, gamma, n), what=f"lookup_draft({ctx}, {gamma}, {n})")
    target, _ = _models()
    accepted = calls = 0
    for prompt in _prompts():
        ref = list(_greedy_reference(prompt, 40))
        ct = _Counted(target, "target", 2 * 40 + 8)
        got = prompt_lookup_generate(ct, list(prompt), 40, 4)
        tokens = _result(got, "prompt_lookup_generate", 4)
        _check_call_count(got, ct, "prompt_lookup_generate")
        expect_equal(tokens, ref, what=f"prompt_lookup_generate(prompt "
                                       f"{tiny.TOKENIZER.decode(list(prompt))!r}, 40, gamma=4).tokens",
                     hint="keep the drafts while they equal the target's argmax at their "
                          "position, then add the target's next argmax; truncate the cache")
        accepted += got.accepted
        calls += got.target_calls
    if accepted == 0:
        fail("prompt_lookup_generate never accepted a draft token", "some accepted lookups",
             f"0 accepted over {calls} calls", "propose lookup_draft(seq, ...) over the prompt AND "
             "the tokens generated so far")
    prompt = list(_prompts()[0])
    expect_equal(_result(prompt_lookup_generate(target, prompt, 0, 4), "max_new_tokens=0"), [],
                 what="prompt_lookup_generate(..., max_new_tokens=0).tokens")
    return (f"lookup_draft on {len(_LOOKUP_CASES)} hand-made and 200 random contexts; greedy "
            f"output equals the target's on 3 prompts ({accepted} drafts accepted in {calls} calls)")
