"""The lab-11 checkers: they pass a correct answer and fail wrong ones with a message.

The reference answers below are written out from the formulas in this file; the wrong
ones are the mistakes a learner is likely to make, one per function.
"""
import pytest
import torch

from utils import memory
from utils.checks import ExerciseFailed, NotAttempted
from utils.checks import ch11 as check

# Logic tests hold the checkers to the library reference; refusal: tests/test_library_answers.py
pytestmark = pytest.mark.usefixtures("library_answers_allowed")

pytest.importorskip("transformers")


# -- reference answers ------------------------------------------------------------------
def param_count(config, gqa=True, tied=True, norms=True):
    V, d, f = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"] if gqa else heads
    kv = kv_heads * (d // heads)
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + (2 * d if norms else 0)
    head = 0 if (tied and config["tie_word_embeddings"]) else V * d
    return config["num_hidden_layers"] * per_layer + V * d + (d if norms else 0) + head


STATE = {"adamw": 8, "sgd_momentum": 4, "sgd": 0}


def model_state_bytes(n, optimizer="adamw", mixed_precision=True, master=None):
    if optimizer not in STATE:
        raise ValueError(optimizer)
    w = 2 if mixed_precision else 4
    master = mixed_precision if master is None else master
    return {"weights": w * n, "grads": w * n, "optimizer": (STATE[optimizer] + 4 * master) * n}


def zero_bytes_per_device(n, stage, dp, k=12, ceil=True, shard_grads=True):
    if stage not in (0, 1, 2, 3):
        raise ValueError(stage)
    shard = -(-n // dp) if ceil else n // dp
    return {"params": 2 * (shard if stage >= 3 else n),
            "grads": 2 * (shard if stage >= 2 and shard_grads else n),
            "optimizer": k * (shard if stage >= 1 else n)}


def activation_bytes_per_layer(s, b, h, a, t=1, sequence_parallel=False, recompute="none",
                               split_attention=True):
    if recompute not in ("none", "selective", "full"):
        raise ValueError(recompute)
    sbh, as2b = s * b * h, a * s * s * b
    if recompute == "full":
        return 2 * sbh // t if sequence_parallel else 2 * sbh
    core = 0 if recompute == "selective" else (5 * as2b // t if split_attention else 5 * as2b)
    if sequence_parallel:
        return 34 * sbh // t + core
    return 10 * sbh + 24 * sbh // t + core


def saved_activation_bytes(module, *inputs, dedup=True, skip_params=True, whole_storage=True):
    params = {p.untyped_storage().data_ptr() for p in module.parameters()} if skip_params else set()
    kept, total = {}, [0]

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            nbytes = st.nbytes() if whole_storage else t.numel() * t.element_size()
            kept[st.data_ptr()] = nbytes
            total[0] += nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(kept.values()) if dedup else total[0]


def kv_cache_bytes_per_token(config, bytes_per_element=2, gqa=True):
    heads = config["num_key_value_heads"] if gqa else config["num_attention_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * heads * head_dim * bytes_per_element


REFERENCE = {
    "param_count": param_count, "model_state_bytes": model_state_bytes,
    "zero_bytes_per_device": zero_bytes_per_device,
    "activation_bytes_per_layer": activation_bytes_per_layer,
    "saved_activation_bytes": saved_activation_bytes,
    "kv_cache_bytes_per_token": kv_cache_bytes_per_token,
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_checker_passes_a_correct_answer(name, capsys):
    getattr(check, name)(REFERENCE[name])
    assert f"✔ {name}: passed" in capsys.readouterr().out


def _no_value_error(fn):
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError:
            return None
    return wrapped


WRONG = [
    ("param_count", lambda c: param_count(c, gqa=False), "grouped-query"),
    ("param_count", lambda c: param_count(c, tied=False), "tied"),
    ("param_count", lambda c: param_count(c, norms=False), "multi-head"),
    ("param_count", lambda c: float(param_count(c)), "wrong type"),
    ("model_state_bytes", lambda n, o, m: model_state_bytes(n, o, m, master=True), "real adamw"),
    ("model_state_bytes", lambda n, o, m: {k: float(v) for k, v in model_state_bytes(n, o, m).items()},
     "wrong type"),
    ("model_state_bytes", lambda n, o, m: model_state_bytes(n, "adamw" if o == "lamb" else o, m),
     "ValueError"),
    ("zero_bytes_per_device", lambda n, s, d, k: zero_bytes_per_device(n, s, d, k, ceil=False), "dp=4"),
    ("zero_bytes_per_device", lambda n, s, d, k: zero_bytes_per_device(n, s, d, k, shard_grads=False),
     "stage=2"),
    ("zero_bytes_per_device", _no_value_error(zero_bytes_per_device), "stage=4"),
    ("activation_bytes_per_layer",
     lambda *a: activation_bytes_per_layer(*a, split_attention=False), "t=8"),
    ("activation_bytes_per_layer",
     lambda s, b, h, a, t, sp, rc: activation_bytes_per_layer(s, b, h, a, t, False, rc), "sequence_parallel=True"),
    ("activation_bytes_per_layer", lambda *a: activation_bytes_per_layer(*a) * 1.0, "wrong type"),
    ("activation_bytes_per_layer", _no_value_error(activation_bytes_per_layer), "recompute='some'"),
    ("saved_activation_bytes", lambda m, *x: saved_activation_bytes(m, *x, skip_params=False), "nn.Linear"),
    ("saved_activation_bytes", lambda m, *x: saved_activation_bytes(m, *x, dedup=False), "exp"),
    ("saved_activation_bytes", lambda m, *x: saved_activation_bytes(m, *x, whole_storage=False), "sin"),
    ("kv_cache_bytes_per_token", lambda c, nb=2: kv_cache_bytes_per_token(c, nb, gqa=False), "grouped-query"),
    ("kv_cache_bytes_per_token", lambda c, nb=2: kv_cache_bytes_per_token(c, nb) // 2, "DynamicCache"),
]


@pytest.mark.parametrize("name,wrong,needle", WRONG, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(WRONG)])
def test_checker_fails_a_wrong_answer(name, wrong, needle):
    with pytest.raises(ExerciseFailed) as info:
        getattr(check, name)(wrong)
    message = str(info.value)
    assert f"exercise {name}" in message
    assert needle in message
    assert "expected:" in message and "got:" in message


@pytest.mark.parametrize("name", list(REFERENCE))
def test_stub_is_not_attempted(name):
    def stub(*args, **kwargs):
        raise NotImplementedError("replace this line with your code")

    with pytest.raises(NotAttempted):
        getattr(check, name)(stub)


def test_learner_exception_is_reported():
    def broken(config):
        return config["hidden"]          # a wrong key

    with pytest.raises(ExerciseFailed, match="KeyError"):
        check.param_count(broken)


def test_published_numbers_are_the_papers():
    p = memory.PUBLISHED
    assert dict(p["zero_figure1"]) == {"params": 7_500_000_000, "dp": 64, "k": 12,
                                       "gb": (120, 31.4, 16.6, 1.9),
                                       "source": "Rajbhandari et al. 2020 (ZeRO), Figure 1"}
    assert (p["zero_gpt2"]["params"], p["zero_gpt2"]["gb"]) == (1_500_000_000, 24)
    assert p["korthikanti_reduction"]["factor"] == 5
    v = p["vllm_opt13b_kv"]
    # 2 (K and V) x 5120 (hidden) x 40 (layers) x 2 bytes = 819,200 B = 800 KiB (vLLM, Section 3)
    assert v["kb_per_token"] * 1024 == 2 * 5120 * 40 * 2
    assert (v["model"], v["tokens"], v["gb_per_request"]) == ("opt-13b", 2048, 1.6)
    with pytest.raises(TypeError):
        p["zero_gpt2"]["gb"] = 25                       # read-only


def test_llama_config_matches_the_registry():
    cfg = check.llama_config("llama2-70b")
    assert cfg == {"vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
                   "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                   "tie_word_embeddings": False}
    with pytest.raises(ValueError, match="not a Llama-style model"):
        check.llama_config("gpt3-175b")
