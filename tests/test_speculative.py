"""utils.speculative: the cost model against hand-computed values, the one-position rule
against its exact law, the loops against the target's own greedy output and exact
distributions, prompt lookup on hand-made contexts, and alpha against the value the
training script stored with the weights."""
import itertools
import math

import numpy as np
import pytest
import torch

from utils import speculative as sp
from utils import tiny, tiny_corpus
from utils.tiny import TOKENIZER


pytestmark = pytest.mark.usefixtures("one_thread")   # see tests/conftest.py


@pytest.fixture(scope="module")
def pair():
    return tiny.load("tiny-target"), tiny.load("tiny-draft")


# --- cost model ------------------------------------------------------------------------------

def test_expected_tokens_by_hand():
    assert sp.expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert sp.expected_tokens(0.0, 7) == 1.0
    assert sp.expected_tokens(1.0, 4) == 5.0                     # the alpha -> 1 limit
    assert sp.expected_tokens(0.8, 0) == 1.0
    np.testing.assert_allclose(sp.expected_tokens(np.array([0.5, 1.0]), 3), [1.875, 4.0])


def test_speedup_and_optimal_gamma_by_hand():
    # alpha 0.8, gamma 4, c 0.05: (1 + .8 + .64 + .512 + .4096) / 1.2
    assert sp.speedup(0.8, 4, 0.05) == pytest.approx(3.3616 / 1.2)
    assert sp.speedup(0.0, 3, 0.5) == pytest.approx(1 / 2.5)     # nothing accepted: pure cost
    for alpha, c in [(0.8, 0.05), (0.9, 0.01), (0.6, 0.5), (0.5, 0.6), (0.95, 0.2)]:
        best, best_g = 1.0, 0                                   # gamma 0 is plain decoding
        for g in range(1, 65):
            s = sum(alpha ** i for i in range(g + 1)) / (g * c + 1)
            if s > best:
                best, best_g = s, g
        assert sp.optimal_gamma(alpha, c) == best_g
    assert sp.optimal_gamma(0.5, 0.6) == 0


@pytest.mark.parametrize("bad", [dict(alpha=1.2), dict(alpha=-0.1), dict(gamma=-1), dict(gamma=2.5),
                                 dict(c=-1.0)])
def test_cost_model_rejects_bad_input(bad):
    args = dict(alpha=0.8, gamma=3, c=0.1) | bad
    with pytest.raises(ValueError):
        sp.speedup(**args)


# --- one position ----------------------------------------------------------------------------

P = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
Q = torch.tensor([0.2, 0.4, 0.0, 0.1, 0.3])


def test_acceptance_probability_and_residual_by_hand():
    torch.testing.assert_close(sp.acceptance_probability(P, Q), torch.tensor([1.0, 0.5, 1.0, 1.0, 0.0]))
    # max(0, p - q) = [0.3, 0, 0.2, 0, 0], sum 0.5
    torch.testing.assert_close(sp.residual(P, Q), torch.tensor([0.6, 0.0, 0.4, 0.0, 0.0]))
    torch.testing.assert_close(sp.residual(P, P), P)               # empty residual: p itself
    assert float(sp.acceptance_rate(P, Q)) == pytest.approx(0.2 + 0.2 + 0.0 + 0.1 + 0.0)


def test_one_position_samples_follow_p_and_always_accept_follows_q():
    g = torch.Generator().manual_seed(0)
    n = 20_000
    drafts = torch.multinomial(Q, n, replacement=True, generator=g).tolist()
    good = np.bincount([sp.accept_or_resample(P, Q, x, g)[1] for x in drafts], minlength=5) / n
    bad = np.bincount([sp.always_accept(P, Q, x, g)[1] for x in drafts], minlength=5) / n
    assert 0.5 * np.abs(good - P.numpy()).sum() < 0.015
    assert 0.5 * np.abs(bad - Q.numpy()).sum() < 0.015
    assert good[4] == 0                                            # p = 0: never emitted


def test_probs_at_temperature_zero_is_one_hot():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    torch.testing.assert_close(sp.probs(logits, 0.0), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(sp.probs(logits, 1.0), torch.softmax(logits, -1))
    with pytest.raises(ValueError):
        sp.probs(logits, -1.0)


# --- the loops --------------------------------------------------------------------------------

def test_greedy_speculative_equals_target_greedy(pair):
    target, draft = pair
    for text in tiny_corpus.prompts(2, seed=5):
        ids = TOKENIZER.encode(text)
        ref = tiny.generate(target, ids, 50)
        for gamma in (1, 4):
            res = sp.speculative_generate(target, draft, ids, 50, gamma, temperature=0.0)
            assert res.tokens == ref
            assert res.accepted + res.target_calls == len(res.tokens)
            assert res.target_calls < len(res.tokens)            # the draft does save calls
        res = sp.prompt_lookup_generate(target, ids, 50, 4)
        assert res.tokens == ref


def test_loop_respects_max_seq_len_and_zero_tokens(pair):
    target, draft = pair
    ids = TOKENIZER.encode(tiny_corpus.heldout_text(400))[:250]
    assert sp.speculative_generate(target, draft, ids, 6, 8, temperature=0.0).tokens == \
        tiny.generate(target, ids, 6)
    assert sp.speculative_generate(target, draft, ids, 0, 3).tokens == []
    with pytest.raises(ValueError, match="max_seq_len"):
        sp.speculative_generate(target, draft, ids, 7, 3)


def test_markov_lm_sequence_probs_by_brute_force():
    target, _ = sp.MarkovLM.random_pair(vocab=4, seed=3)
    for prompt in ([2], [0, 3]):
        for temperature in (1.0, 0.5):
            table = target.table ** (1 / temperature)
            table = table / table.sum(-1, keepdim=True)
            first = target.first ** (1 / temperature)
            first = first / first.sum(-1, keepdim=True)
            joint = target.sequence_probs(prompt, 3, temperature)
            for xs in itertools.product(range(4), repeat=3):
                seq, prob = list(prompt), 1.0
                for x in xs:
                    dist = first[seq[-1]] if len(seq) == 1 else table[seq[-2], seq[-1]]
                    prob *= float(dist[x])
                    seq.append(x)
                assert float(joint[xs]) == pytest.approx(prob, abs=1e-12)


def test_markov_lm_follows_its_cache():
    target, _ = sp.MarkovLM.random_pair(vocab=4, seed=1)
    cache = tiny.ContiguousKVCache(target.config, max_len=10)
    out = target.prefill(torch.tensor([[1, 2, 3]]), cache)
    torch.testing.assert_close(out[0], target(torch.tensor([[1, 2, 3]]))[0])
    cache.truncate(2)                                              # forget the 3
    step = target.decode_step(torch.tensor([0]), cache)
    torch.testing.assert_close(step[0].exp(), target.table[2, 0].float())


def test_speculative_sampling_matches_exact_law_and_always_accept_does_not():
    target, draft = sp.MarkovLM.random_pair(vocab=4, seed=2, mix=0.7)
    law = target.sequence_probs([1, 2], 2).reshape(-1).numpy()
    g = torch.Generator().manual_seed(0)
    good, bad = np.zeros(16), np.zeros(16)
    n = 3000
    for _ in range(n):
        a = sp.speculative_generate(target, draft, [1, 2], 2, 2, 1.0, g).tokens
        b = sp.speculative_generate(target, draft, [1, 2], 2, 2, 1.0, g, accept=sp.always_accept).tokens
        good[4 * a[0] + a[1]] += 1
        bad[4 * b[0] + b[1]] += 1
    assert 0.5 * np.abs(good / n - law).sum() < 0.04
    assert 0.5 * np.abs(bad / n - law).sum() > 0.1


# --- prompt lookup, alpha, chi-square ----------------------------------------------------

@pytest.mark.parametrize("ctx, gamma, n, want", [
    ([1, 2, 3, 4, 1, 2, 3], 3, 3, [4, 1, 2]),
    ([1, 2, 3, 4, 1, 2, 3], 9, 3, [4, 1, 2, 3]),
    ([5, 6, 7, 5, 6, 8, 5, 6], 2, 3, [8, 5]),          # the last earlier occurrence wins
    ([1, 2, 3, 9, 3], 4, 3, [9, 3]),
    ([1, 2, 3, 4], 3, 3, []),
    ([7, 7, 7, 7], 3, 2, [7]),
    ([4], 3, 3, []),
    ([1, 2, 1, 2], 0, 3, []),
])
def test_lookup_draft_by_hand(ctx, gamma, n, want):
    assert sp.lookup_draft(ctx, gamma, n) == want


def test_alpha_as_the_training_script_measures_it(pair):
    """scripts/train_tiny.py: both models over consecutive 256-token held-out windows,
    sum min(p, q) per position, mean over positions (here the first 16 windows)."""
    target, draft = pair
    held = torch.tensor(TOKENIZER.encode(tiny_corpus.heldout_text(16 * 256)))
    betas = []
    for i in range(16):
        w = held[i * 256:(i + 1) * 256][None]
        p, q = target(w)[0].softmax(-1), draft(w)[0].softmax(-1)
        betas += torch.minimum(p, q).sum(-1).tolist()
    assert sp.measure_alpha(target, draft, held, 1.0, 256) == pytest.approx(np.mean(betas), abs=1e-5)
    stored = tiny.metadata("tiny-draft")["training"]["alpha_vs_target"]    # all 50,000 chars
    assert abs(np.mean(betas) - stored) < 0.03


def test_chi_square_by_hand():
    stat, dof, pv = sp.chi_square([30, 20], [0.5, 0.5])
    assert (stat, dof) == (pytest.approx(2.0), 1)
    assert pv == pytest.approx(math.erfc(math.sqrt(2.0 / 2)))     # chi2 with 1 dof
    # cells with expected count < 5 are pooled: [50, 30, 16, 4] vs [.5, .3, .17, .03]
    stat, dof, _ = sp.chi_square([50, 30, 16, 4], [0.5, 0.3, 0.17, 0.03])
    assert dof == 2
    assert stat == pytest.approx(0 + 0 + (20 - 20) ** 2 / 20)
    assert sp.chi_square([3, 1], [1.0, 0.0])[0] == math.inf      # an impossible outcome


# --- wall-clock measurement ------------------------------------------------------------------

class _Sleepy:
    """A model wrapper whose decode step also sleeps: a known, load-proof cost."""

    def __init__(self, model, seconds):
        self._model, self._seconds = model, seconds
        self.config, self.device = model.config, model.device

    def prefill(self, tokens, cache):
        return self._model.prefill(tokens, cache)

    def decode_step(self, tokens, cache):
        import time
        time.sleep(self._seconds)
        return self._model.decode_step(tokens, cache)


def test_decode_step_times_orders_the_models_and_restores_the_caches():
    target, _ = sp.MarkovLM.random_pair(vocab=5, seed=1, max_seq_len=64)
    slow, fast = _Sleepy(target, 0.004), _Sleepy(target, 0.0)
    t_slow, t_fast = sp.decode_step_times([slow, fast], [1, 2, 3], steps=4, repeats=2)
    assert t_slow >= 0.004 > t_fast > 0               # sleep is a floor: load only adds to it
    assert t_slow / t_fast > 3


def test_decode_step_times_bad_inputs():
    target, _ = sp.MarkovLM.random_pair(vocab=5, seed=1, max_seq_len=16)
    with pytest.raises(ValueError, match="models"):
        sp.decode_step_times([], [1, 2])
    with pytest.raises(TypeError, match="models"):
        sp.decode_step_times(["not a model"], [1, 2])
    with pytest.raises(ValueError, match="context_tokens"):
        sp.decode_step_times([target], [])
    with pytest.raises(ValueError, match="max_seq_len"):
        sp.decode_step_times([target], list(range(4)) * 3, steps=8)
    for bad in (0, -1, 1.5, True):
        with pytest.raises((ValueError, TypeError), match="steps"):
            sp.decode_step_times([target], [1, 2], steps=bad)
        with pytest.raises((ValueError, TypeError), match="repeats"):
            sp.decode_step_times([target], [1, 2], repeats=bad)


def test_measure_speedup_counts_what_the_loops_did():
    target, draft = sp.MarkovLM.random_pair(vocab=5, seed=3, mix=0.3, max_seq_len=64)
    prompts, n, gammas = [[1, 2], [3]], 12, [1, 3]
    calls = []

    def counted(t, d, prompt, k, gamma, temperature, generator):
        calls.append(gamma)
        return sp.speculative_generate(t, d, prompt, k, gamma, temperature, generator)

    run = sp.measure_speedup(target, draft, prompts, n, gammas, loops={"mine": counted}, repeats=2)
    assert calls == [1, 1, 3, 3] * 2                  # every prompt, every gamma, every repeat
    assert run["gamma"] == gammas and run["baseline"] > 0
    # the same seeded runs, recounted here: acceptance, tokens per call, pooled alpha
    acc, tested, tpc = [], [], []
    for gamma in gammas:
        rs = [sp.speculative_generate(target, draft, p, n, gamma, 1.0, torch.Generator().manual_seed(0))
              for p in prompts]
        acc.append(sum(r.accepted for r in rs))
        tested.append(sum(r.accepted + r.rejected for r in rs))
        tpc.append(sum(len(r.tokens) for r in rs) / sum(r.target_calls for r in rs))
    assert run["acceptance"]["mine"] == [a / t for a, t in zip(acc, tested)]
    assert run["tokens_per_call"]["mine"] == tpc
    assert run["alpha"]["mine"] == sum(acc) / sum(tested)
    assert run["measured"]["mine"] == [run["baseline"] / s for s in run["seconds"]["mine"]]


def test_measure_speedup_bad_inputs():
    target, draft = sp.MarkovLM.random_pair(vocab=5, seed=3, max_seq_len=32)
    ok = dict(target=target, draft=draft, prompts=[[1]], max_new_tokens=4, gammas=[1])
    with pytest.raises(ValueError, match="gammas"):
        sp.measure_speedup(**dict(ok, gammas=[]))
    with pytest.raises(ValueError, match="gammas"):
        sp.measure_speedup(**dict(ok, gammas=[0]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        sp.measure_speedup(**dict(ok, max_new_tokens=0))
    with pytest.raises(ValueError, match="prompts"):
        sp.measure_speedup(**dict(ok, prompts=[]))
    with pytest.raises((ValueError, TypeError), match="repeats"):
        sp.measure_speedup(**dict(ok, repeats=0))
    with pytest.raises(ValueError, match="temperature"):
        sp.measure_speedup(**dict(ok, temperature=float("nan")))
    with pytest.raises(TypeError, match="loops"):
        sp.measure_speedup(**dict(ok, loops={"x": 3}))


def test_the_deep_target_is_the_draft_widened_in_depth_only():
    xl, draft = tiny.load("tiny-target-xl"), tiny.load("tiny-draft")
    meta = tiny.metadata("tiny-target-xl")["training"]
    assert xl.config.d_model == draft.config.d_model and xl.config.n_layers == 16 * draft.config.n_layers
    assert meta["params"] == xl.num_params()
    # the alpha stored at training time, recomputed on the same held-out text's start
    held = torch.tensor(TOKENIZER.encode(tiny_corpus.heldout_text(256 * 12)))
    alpha = sp.measure_alpha(xl, draft, held, 1.0, window=256)
    assert abs(alpha - meta["alpha_vs_draft"]) < 0.03
    assert meta["heldout_loss"] < tiny.metadata("tiny-draft")["training"]["heldout_loss"]


# --- lab 19's checkers refuse this module's functions as answers ------------------------------
# (here, not in test_ch19_checks.py, whose tests hold the checkers to this module and so
# allow library answers)

@pytest.mark.parametrize("exercise, answers", [
    ("accept_reject", (sp.acceptance_probability, sp.residual, sp.accept_or_resample)),
    ("speculative_generate", (sp.speculative_generate,)),
    ("same_distribution", (sp.speculative_generate, sp.chi_square)),
    ("acceptance", (sp.measure_alpha, sp.expected_tokens)),
    ("speedup_formula", (sp.speedup, sp.optimal_gamma)),
    ("prompt_lookup", (sp.lookup_draft, sp.prompt_lookup_generate)),
])
def test_lab19_refuses_the_library_reference(exercise, answers):
    from utils.checks import LibraryAnswer
    from utils.checks import ch19 as check

    with pytest.raises(LibraryAnswer, match="utils.speculative"):
        getattr(check, exercise)(*answers)
