"""Lab 18's checkers pass right answers and fail the mistakes a learner is likely to make.

The right engines below are written the way the lab asks (real forward passes, one
ContiguousKVCache per request); each wrong one carries one bug.
"""
import math

import numpy as np
import pytest
import torch

from utils import serving as sv
from utils.checks import ExerciseFailed, LibraryAnswer, NotAttempted
from utils.checks import ch18 as check
from utils.serving import Completion
from utils.tiny import ContiguousKVCache


pytestmark = pytest.mark.usefixtures("one_thread", "library_answers_allowed")   # see tests/conftest.py


def engine(model, requests, max_batch, clock, token_budget=None, bug=None):
    """Continuous batching as the lab specifies it, with an optional bug."""
    out = {r.rid: Completion(r.rid, r.arrival) for r in requests}
    waiting, running, caches, done = list(requests), [], {}, {}
    while waiting or running:
        if not running and waiting[0].arrival > clock.now:
            clock.advance_to(waiting[0].arrival)
        room = max_batch + (1 if bug == "admit_one_too_many" else 0)
        horizon = clock.now + (0.005 if bug == "admit_before_arrival" else 0.0)
        while waiting and waiting[0].arrival <= horizon and len(running) < room:
            r = waiting.pop(0)
            caches[r.rid] = ContiguousKVCache(model.config, max_len=r.prompt_len + r.max_new + 1)
            done[r.rid] = 0
            running.append(r)
        decoding = [r for r in running if out[r.rid].tokens]
        prefilling = [r for r in running if not out[r.rid].tokens]
        n_for_budget = 0 if bug == "budget_ignores_decodes" else len(decoding)
        plan = sv.chunk_plan(n_for_budget, [r.prompt_len - done[r.rid] for r in prefilling], token_budget)
        chunks = [(r, n) for r, n in zip(prefilling, plan) if n > 0]
        if bug == "decode_at_once":        # a request decodes in the iteration its prompt completes
            decoding = decoding + [r for r, n in chunks if done[r.rid] + n == r.prompt_len and r.max_new > 1]
        before = clock.now
        new = []
        with clock.iteration(decode=[r.rid for r in decoding], prefill=[(r.rid, n) for r, n in chunks]):
            for r, n in chunks:
                start = done[r.rid]
                logits = model.prefill(torch.tensor(r.prompt[start:start + n])[None], caches[r.rid])
                done[r.rid] += n
                if done[r.rid] == r.prompt_len:
                    tok = int(logits[0, -1].argmax())
                    if bug == "decode_at_once":
                        out[r.rid].emit(tok, None)
                    else:
                        new.append((r, tok))
            if decoding:
                last = [out[r.rid].tokens[-1] for r in decoding]
                if bug == "first_request_token":
                    last = [last[0]] * len(last)
                nxt = model.decode_step(torch.tensor(last), [caches[r.rid] for r in decoding])
                new += list(zip(decoding, nxt.argmax(-1).tolist()))
        for r, tok in new:
            out[r.rid].emit(tok, before if bug == "stamp_at_start" else clock.now)
        for r in running:
            out[r.rid].times = [clock.now if t is None else t for t in out[r.rid].times]
        extra = 1 if bug == "retire_late" else 0
        running = [r for r in running if len(out[r.rid].tokens) < r.max_new + extra]
    return out


def test_right_answers_pass(capsys):
    check.summarize(sv.summarize)
    check.next_batch(sv.next_batch)
    check.chunk_plan(sv.chunk_plan)
    check.goodput(sv.goodput)
    check.serve_batched(sv.serve_batched)
    check.serve_continuous(engine)
    assert capsys.readouterr().out.count("passed") == 6


def test_summarize_counting_one_token_requests_in_tpot_fails():
    def wrong(comps):
        s = sv.summarize(comps)
        items = list(comps.values()) if isinstance(comps, dict) else list(comps)
        tp = [(c.times[-1] - c.times[0]) / max(len(c.times) - 1, 1) for c in items]
        s["tpot_p50"] = float(np.percentile(tp, 50))
        return s
    with pytest.raises(ExerciseFailed, match="tpot_p50"):
        check.summarize(wrong)


def test_summarize_rejecting_a_dict_fails():
    with pytest.raises(ExerciseFailed):
        check.summarize(lambda comps: sv.summarize(list(comps)))   # a dict iterates its keys


def test_next_batch_ignoring_the_delay_fails():
    with pytest.raises(ExerciseFailed, match="launch time"):
        check.next_batch(lambda a, now, mb, d: sv.next_batch(a, now, mb, math.inf))


def test_next_batch_ignoring_a_busy_server_fails():
    def no_now(a, now, mb, d):
        return sv.next_batch(a, 0.0, mb, d)
    with pytest.raises(ExerciseFailed):
        check.next_batch(no_now)


def test_chunk_plan_without_decode_priority_fails():
    with pytest.raises(ExerciseFailed, match="chunk_plan"):
        check.chunk_plan(lambda n, rem, b: sv.chunk_plan(0, rem, b))


def test_feeding_the_wrong_token_fails_on_tokens():
    with pytest.raises(ExerciseFailed, match="tokens differ"):
        check.serve_continuous(lambda *a, **k: engine(*a, **k, bug="first_request_token"))


def test_stamping_before_the_iteration_fails_on_times():
    with pytest.raises(ExerciseFailed, match="token times"):
        check.serve_continuous(lambda *a, **k: engine(*a, **k, bug="stamp_at_start"))


def test_continuous_engine_is_not_a_request_level_engine():
    def batched(model, requests, max_batch, max_delay, clock):
        return engine(model, requests, max_batch, clock)
    with pytest.raises(ExerciseFailed, match="diverges from the reference at iteration 0") as e:
        check.serve_batched(batched)
    # the first batch must wait for four requests; the continuous engine starts the first at once
    assert "belong in the batch launched at" in str(e.value)
    assert "requests 1, 2, 3" in str(e.value)


def test_goodput_not_stopping_at_the_first_miss_fails():
    def max_over_all(res, t1, t2, goal=0.9):
        ok = [r for r in res if sv.slo_attainment(res[r], t1, t2) >= goal]
        return float(max(ok)) if ok else 0.0
    with pytest.raises(ExerciseFailed, match="goodput"):
        check.goodput(max_over_all)


def test_goodput_with_strict_inequality_fails():
    def strict(res, t1, t2, goal=0.9):
        return sv.goodput(res, t1 - 1e-12, t2 - 1e-12, goal)
    with pytest.raises(ExerciseFailed):
        check.goodput(strict)


def test_stub_is_not_attempted():
    def stub(*args, **kwargs):
        raise NotImplementedError
    with pytest.raises(NotAttempted):
        check.next_batch(stub)


# --- the clock log: the first iteration where the schedules part, and the rule broken ---------

def planted(bug):
    return lambda *a, **k: engine(*a, **k, bug=bug)


def failure(checker, answer):
    with pytest.raises(ExerciseFailed) as e:
        checker(answer)
    return str(e.value)


def test_admitting_past_max_batch_names_the_waiting_request():
    msg = failure(check.serve_continuous, planted("admit_one_too_many"))
    assert "diverges from the reference at iteration" in msg
    assert "must wait: max_batch requests are already running" in msg


def test_admitting_before_arrival_names_the_arrival_time():
    msg = failure(check.serve_continuous, planted("admit_before_arrival"))
    assert "diverges from the reference at iteration" in msg
    assert "after this iteration starts" in msg and "not yet servable" in msg


def test_decoding_in_the_prefill_iteration_is_caught_in_the_log():
    msg = failure(check.serve_continuous, planted("decode_at_once"))
    assert "diverges from the reference at iteration" in msg
    assert "no token yet" in msg and "joins the decode pass from the next one" in msg


def test_a_budget_that_ignores_the_decodes_shows_the_chunk_sizes():
    msg = failure(check.serve_continuous, planted("budget_ignores_decodes"))
    assert "token_budget=" in msg and "diverges from the reference" in msg
    assert "chunk sizes differ" in msg and "first, then to prompts in admission order" in msg


def test_retiring_late_is_an_extra_decode_of_a_finished_request():
    msg = failure(check.serve_continuous, planted("retire_late"))
    assert "diverges from the reference" in msg
    assert "retire a request as soon as it has max_new tokens" in msg


def test_the_message_shows_both_iterations_and_the_last_that_agreed():
    msg = failure(check.serve_continuous, planted("admit_one_too_many"))
    expected = msg.split("expected:")[1].split("got:")[0]
    got = msg.split("got:")[1].split("hint:")[0]
    assert "iteration" in expected and "agreed" in expected
    assert expected.split("(iteration")[0].strip() != got.strip()
    assert "prefill" in got and "request" in got


def test_a_dynamic_batcher_without_its_timeout_diverges_at_a_launch():
    def no_timeout(model, requests, max_batch, max_delay, clock):
        return sv.serve_batched(model, requests, max_batch, math.inf, clock)
    msg = failure(check.serve_batched, no_timeout)
    assert "max_delay" in msg and "diverges from the reference at iteration" in msg
    assert "the oldest waiting request has waited max_delay" in msg


def test_an_engine_that_never_declares_iterations_is_told_so():
    def silent(model, requests, max_batch, clock, token_budget=None):
        return engine(model, requests, max_batch, sv.VirtualClock(sv.REFERENCE_COST), token_budget)
    msg = failure(check.serve_continuous, silent)
    assert "the clock logged no iterations" in msg


def test_an_engine_that_stops_early_is_told_to_keep_going():
    def early(model, requests, max_batch, clock, token_budget=None):
        return engine(model, requests[:-1], max_batch, clock, token_budget)
    msg = failure(check.serve_continuous, early)
    assert "no iteration (the schedule has ended)" in msg or "wrong request ids" in msg


def test_the_library_reference_is_refused(monkeypatch):
    import utils.checks as checks
    monkeypatch.setattr(checks, "_ALLOW_LIBRARY", False)      # undo this module's fixture
    for name in ("summarize", "next_batch", "chunk_plan", "serve_batched", "serve_continuous",
                 "goodput"):
        with pytest.raises(LibraryAnswer):
            getattr(check, name)(getattr(sv, name))
