"""Lab 19's checkers pass right answers and fail the wrong ones a learner is likely to write.

The right answers are the library's (``utils.speculative``, tested on its own in
``test_speculative.py``); the wrong ones are written out here, one mistake each, and the
loop's mistakes are switched on one at a time in a small copy of the loop below.
"""
import numpy as np
import pytest
import torch

from utils import speculative as sp
from utils.checks import ExerciseFailed, NotAttempted
from utils.checks import ch19 as check
from utils.tiny import ContiguousKVCache


pytestmark = pytest.mark.usefixtures("one_thread", "library_answers_allowed")   # see tests/conftest.py


# --- exercise 1 ----------------------------------------------------------------------------------

def test_right_one_position_rule_passes(capsys):
    check.accept_reject(sp.acceptance_probability, sp.residual, sp.accept_or_resample)
    assert "passed" in capsys.readouterr().out


def test_ratio_without_clamp_or_zero_guard_fails():
    with pytest.raises(ExerciseFailed, match="acceptance_probability"):
        check.accept_reject(lambda p, q: torch.clamp(p / q, max=1.0), sp.residual, sp.accept_or_resample)
    with pytest.raises(ExerciseFailed, match="acceptance_probability"):
        check.accept_reject(lambda p, q: torch.where(q > 0, p / q.clamp_min(1e-30), 1.0),
                            sp.residual, sp.accept_or_resample)      # no min(1, .)


def test_residual_without_normalising_fails():
    with pytest.raises(ExerciseFailed, match="residual"):
        check.accept_reject(sp.acceptance_probability, lambda p, q: torch.clamp(p - q, min=0),
                            sp.accept_or_resample)


def _resample_from(which):
    def rule(p, q, x, generator=None):
        a = sp.acceptance_probability(p, q)[x]
        if torch.rand((), generator=generator, dtype=torch.float64) < a:
            return True, int(x)
        dist = p if which == "p" else q
        return False, int(torch.multinomial(dist, 1, generator=generator))
    return rule


@pytest.mark.parametrize("rule", [sp.always_accept, _resample_from("p"), _resample_from("q")],
                         ids=["always-accept", "resample-from-p", "resample-from-q"])
def test_wrong_sampling_rule_fails_the_statistical_test(rule):
    with pytest.raises(ExerciseFailed, match="does not follow|greedy|temperature 0"):
        check.accept_reject(sp.acceptance_probability, sp.residual, rule)


def test_stub_is_not_attempted():
    def stub(*args, **kwargs):
        raise NotImplementedError
    with pytest.raises(NotAttempted):
        check.accept_reject(stub, stub, stub)


# --- a loop with one mistake at a time -----------------------------------------------------------

def make_loop(bug=None):
    """The reference loop, with one of: 'no-truncate', 'no-bonus', 'never-accept',
    'ignore-accept', 'stale-q', 'draft-full-gamma', 'endless' (emits nothing when it
    drafts nothing), 'no-gamma-check' (gamma=0 runs instead of raising)."""

    def loop(target, draft, prompt, max_new_tokens, gamma, temperature=1.0, generator=None,
             accept=None):
        if gamma < 1 and bug != "no-gamma-check":
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        accept = accept or sp.accept_or_resample
        if bug == "ignore-accept":
            accept = sp.accept_or_resample
        seq, res = list(prompt), sp.SpecResult(tokens=[])
        if max_new_tokens == 0:
            return res
        total = len(seq) + max_new_tokens + (gamma if bug == "draft-full-gamma" else 0)
        tc = ContiguousKVCache(target.config, max_len=min(total, target.config.max_seq_len))
        dc = ContiguousKVCache(draft.config, max_len=min(total, draft.config.max_seq_len))
        while len(res.tokens) < max_new_tokens:
            g = gamma if bug == "draft-full-gamma" else min(gamma, max_new_tokens - len(res.tokens) - 1)
            drafts, qs = [], []
            if g > 0:
                logits = draft.prefill(torch.tensor(seq[int(dc.lengths[0]):])[None], dc)[0, -1]
                for i in range(g):
                    q = sp.probs(logits, temperature)
                    drafts.append(int(torch.multinomial(q, 1, generator=generator)))
                    qs.append(q)
                    if i < g - 1:
                        logits = draft.decode_step(torch.tensor([drafts[-1]]), dc)[0]
            ps = sp.probs(target.prefill(torch.tensor(seq[int(tc.lengths[0]):] + drafts)[None], tc)[0, -(g + 1):],
                          temperature)
            n_ok, last = 0, None
            for i in range(g):
                q_used = qs[0] if bug == "stale-q" else qs[i]
                ok, token = (False, int(ps[i].argmax())) if bug == "never-accept" else \
                    accept(ps[i], q_used, drafts[i], generator)
                if not ok:
                    last = token
                    break
                n_ok += 1
            if last is None and bug == "endless" and g == 0:     # emits nothing, forever
                tc.truncate(len(seq) - 1)
                continue
            if last is None:
                if bug == "no-bonus" and g > 0:
                    res.target_calls += 1
                    res.drafted += g
                    res.accepted += n_ok
                    seq += drafts
                    res.tokens += drafts
                    tc.truncate(len(seq) - 1)
                    dc.truncate(min(int(dc.lengths[0]), len(seq) - 1))
                    continue
                last = int(torch.multinomial(ps[g], 1, generator=generator))
            emitted = drafts[:n_ok] + [last]
            seq += emitted
            res.tokens += emitted
            res.target_calls += 1
            res.drafted += g
            res.accepted += n_ok
            res.rejected += int(n_ok < g)
            if bug != "no-truncate":
                tc.truncate(len(seq) - 1)
                dc.truncate(min(int(dc.lengths[0]), len(seq) - 1))
        res.tokens = res.tokens[:max_new_tokens]
        return res

    return loop


def test_right_loop_passes(capsys):
    check.speculative_generate(make_loop())
    check.speculative_generate(sp.speculative_generate)
    assert capsys.readouterr().out.count("passed") == 2


@pytest.mark.parametrize("bug, match", [
    ("no-truncate", "greedy|your code raised"),
    ("never-accept", "too many target calls"),
    ("no-bonus", "do not add up|greedy"),
    ("endless", "more than"),
    ("draft-full-gamma", "do not add up|greedy|max_seq_len|raised"),
    ("no-gamma-check", "gamma=0"),
])
def test_loop_mistakes_fail(bug, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.speculative_generate(make_loop(bug))


# --- exercise 3 ------------------------------------------------------------------------------

# "ignore-accept" is right until the always-accept rule is passed in, so it also shows
# that a right loop passes the statistical tests at both temperatures.
@pytest.mark.parametrize("bug, match", [
    ("ignore-accept", "always_accept"),
    ("stale-q", "does not follow the target"),
])
def test_distribution_mistakes_fail(bug, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.same_distribution(make_loop(bug), sp.chi_square)


def test_chi_square_without_pooling_fails():
    from scipy import stats

    def unpooled(counts, probs, min_expected=5.0):
        counts, probs = np.asarray(counts, float), np.asarray(probs, float)
        stat, pv = stats.chisquare(counts, counts.sum() * probs)
        return float(stat), len(counts) - 1, float(pv)

    with pytest.raises(ExerciseFailed, match="degrees of freedom|statistic"):
        check.same_distribution(sp.speculative_generate, unpooled)


# --- exercises 4 and 5 -----------------------------------------------------------------------

def test_right_formulas_pass(capsys):
    check.acceptance(sp.measure_alpha, sp.expected_tokens)
    check.speedup_formula(sp.speedup, sp.optimal_gamma)
    assert capsys.readouterr().out.count("passed") == 2


def test_wrong_formulas_fail():
    with pytest.raises(ExerciseFailed, match="expected_tokens"):        # off by one power
        check.acceptance(sp.measure_alpha, lambda a, g: (1 - a ** g) / (1 - a) if a < 1 else g)
    with pytest.raises(ExerciseFailed, match=r"expected_tokens\(1.0"):  # 0/0 at alpha = 1
        check.acceptance(sp.measure_alpha, lambda a, g: (1 - a ** (g + 1)) / (1 - a) if a != 1 else float("nan"))
    with pytest.raises(ExerciseFailed, match="measure_alpha"):         # greedy agreement only
        check.acceptance(lambda t, d, toks, T, w: sp.measure_alpha(t, d, toks, 0.0, w), sp.expected_tokens)
    with pytest.raises(ExerciseFailed, match="speedup"):               # forgot the target step
        check.speedup_formula(lambda a, g, c: sp.expected_tokens(a, g) / (g * c) if g else 1.0,
                              sp.optimal_gamma)
    with pytest.raises(ExerciseFailed, match="optimal_gamma"):         # never says "don't"
        check.speedup_formula(sp.speedup, lambda a, c, m=64: max(1, sp.optimal_gamma(a, c, m)))


def _measurement(alpha=0.8, c=0.1, measured=None):
    gammas = [1, 2, 3, 4]
    predicted = [float(sp.speedup(alpha, g, c)) for g in gammas]
    return {"gamma": gammas, "alpha": alpha, "c": c, "predicted": predicted,
            "measured": list(predicted) if measured is None else measured}


def test_speedup_measurement_logic_fails():
    good = _measurement()
    with pytest.raises(ExerciseFailed, match="predicted"):
        check.speedup_measurement(dict(good, predicted=[1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ExerciseFailed, match="predicted"):      # forgot the draft's cost
        check.speedup_measurement(dict(good, predicted=[float(sp.expected_tokens(0.8, g)) for g in good["gamma"]]))
    with pytest.raises(ExerciseFailed, match="at least 3"):
        check.speedup_measurement(dict(good, gamma=[1], measured=[1.0], predicted=[1.0]))
    with pytest.raises(ExerciseFailed, match="no 'c'"):
        check.speedup_measurement({k: v for k, v in good.items() if k != "c"})
    for bad in (float("nan"), float("inf"), -1.0, 0.0):
        with pytest.raises(ExerciseFailed, match="measured speedup at gamma=2"):
            check.speedup_measurement(dict(good, measured=[1.5, bad, 1.5, 1.5]))
    with pytest.raises(ExerciseFailed, match="alpha and c"):
        check.speedup_measurement(dict(good, alpha=1.2))


def test_speedup_measurement_agreeing_passes_without_warning(capsys):
    good = _measurement()
    good["measured"] = [0.9 * p for p in good["predicted"]]       # 10% under: within 15%
    check.speedup_measurement(good)
    out = capsys.readouterr().out
    assert "✔ speedup_measurement: passed" in out and "⚠" not in out


@pytest.mark.parametrize("factor, words", [
    (0.6, "40% below Theorem 3.8"),      # a busy machine: the speculative runs were slowed
    (1.3, "30% above Theorem 3.8"),      # c measured in a slow moment
    (0.05, "far from the model"),        # nothing like the model at all
])
def test_speedup_measurement_noise_warns_but_passes(capsys, factor, words):
    noisy = _measurement()
    noisy["measured"] = [factor * p for p in noisy["predicted"]]
    check.speedup_measurement(noisy)                      # no exception: the logic is right
    out = capsys.readouterr().out
    assert "✔ speedup_measurement: passed" in out
    assert "⚠ measurement:" in out and words in out


def _with_extension(measured_factor, verify, per_call_factor=1.0, alpha=0.8, c=0.1):
    r = _measurement(alpha, c)
    r["measured"] = [measured_factor * p for p in r["predicted"]]
    r["verify_cost"] = [verify] * len(r["gamma"])
    # tokens per call written out: 1 + alpha + ... + alpha^gamma, scaled
    r["tokens_per_call"] = [per_call_factor * sum(alpha ** i for i in range(g + 1)) for g in r["gamma"]]
    return r


def test_speedup_measurement_extension_logic_fails():
    good = _with_extension(1.0, 1.0)
    for key in ("verify_cost", "tokens_per_call"):
        with pytest.raises(ExerciseFailed, match="no '"):                 # one without the other
            check.speedup_measurement({k: v for k, v in good.items() if k != key})
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ExerciseFailed, match="verify cost at gamma=2"):
            check.speedup_measurement(dict(good, verify_cost=[1.0, bad, 1.0, 1.0]))
    for bad in (0.5, 4.5, float("nan")):                                # gamma 3: at most 4 tokens
        with pytest.raises(ExerciseFailed, match="tokens per call at gamma=3"):
            check.speedup_measurement(dict(good, tokens_per_call=[1.5, 2.0, bad, 3.0]))
    with pytest.raises(ExerciseFailed, match="one entry per gamma"):
        check.speedup_measurement(dict(good, verify_cost=[1.0, 1.0]))


def test_speedup_measurement_extension_names_the_idealisation(capsys):
    # a verify call of 1.4 steps, tokens per call as Eq. 1: at gamma 4 (alpha 0.8, c 0.1)
    # Theorem 3.8 gives 3.36 / 1.4 = 2.40x, the extended model 3.36 / 1.8 = 1.87x; measured
    # 2% under the extended model: 0.98 * 1.4 / 1.8 = 0.76 of the theorem
    r = _with_extension(1.0, 1.4)
    r["measured"] = [e / (g * 0.1 + 1.4) * 0.98 for g, e in zip(r["gamma"], r["tokens_per_call"])]
    check.speedup_measurement(r)
    out = capsys.readouterr().out
    assert "✔ speedup_measurement: passed" in out and "of the extended model's" in out
    assert "24% below Theorem 3.8" in out and "idealisation" in out and "1.40 steps" in out
    # the same shortfall with a free verify call: the extension does not explain it
    check.speedup_measurement(_with_extension(0.76, 1.0))
    out = capsys.readouterr().out
    assert "24% below Theorem 3.8" in out and "another process busy" in out
    assert "idealisation" not in out


def test_speedup_measurement_extension_agreeing_passes_without_warning(capsys):
    check.speedup_measurement(_with_extension(0.9, 1.1))
    out = capsys.readouterr().out
    assert "✔ speedup_measurement: passed" in out and "⚠" not in out


# --- exercise 6 ------------------------------------------------------------------------------

def first_occurrence(context, gamma, max_ngram=3):
    ctx = list(context)
    if gamma == 0:
        return []
    for n in range(min(max_ngram, len(ctx) - 1), 0, -1):
        for s in range(0, len(ctx) - n):
            if ctx[s:s + n] == ctx[-n:]:
                return ctx[s + n:s + n + gamma]
    return []


def test_prompt_lookup_right_and_wrong(capsys):
    check.prompt_lookup(sp.lookup_draft, sp.prompt_lookup_generate)
    assert "passed" in capsys.readouterr().out
    with pytest.raises(ExerciseFailed, match="lookup_draft"):
        check.prompt_lookup(first_occurrence, sp.prompt_lookup_generate)

    def no_drafts(target, prompt, n, gamma, max_ngram=3):    # right output, never drafts
        from utils import tiny
        tokens = tiny.generate(target, prompt, n)
        return sp.SpecResult(tokens=tokens, target_calls=len(tokens))

    with pytest.raises(ExerciseFailed, match="never accepted"):
        check.prompt_lookup(sp.lookup_draft, no_drafts)
