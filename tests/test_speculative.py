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
