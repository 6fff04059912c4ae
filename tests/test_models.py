"""The model registry against the real architectures.

Each architecture is built with Hugging Face ``transformers`` on the meta device (no
weights, no download) and its parameters are counted: that is the released
checkpoint's parameter count, independent of our formula.
"""
import pytest
import torch

from utils import models


def _hf_model(spec):
    tf = pytest.importorskip("transformers")
    if spec.ffn_kind == "gated":
        cfg = tf.LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden,
                             intermediate_size=spec.ffn_hidden,
                             num_hidden_layers=spec.n_layers,
                             num_attention_heads=spec.n_heads,
                             num_key_value_heads=spec.n_kv_heads,
                             max_position_embeddings=spec.context,
                             tie_word_embeddings=spec.tied_embeddings)
        cls = tf.LlamaForCausalLM
    elif spec.name.startswith("opt"):
        cfg = tf.OPTConfig(vocab_size=spec.vocab, hidden_size=spec.hidden,
                           ffn_dim=spec.ffn_hidden, num_hidden_layers=spec.n_layers,
                           num_attention_heads=spec.n_heads,
                           max_position_embeddings=spec.context,
                           word_embed_proj_dim=spec.hidden, tie_word_embeddings=True)
        cls = tf.OPTForCausalLM
    else:  # GPT-3 uses the GPT-2 architecture
        cfg = tf.GPT2Config(vocab_size=spec.vocab, n_embd=spec.hidden,
                            n_layer=spec.n_layers, n_head=spec.n_heads,
                            n_positions=spec.context, n_inner=spec.ffn_hidden)
        cls = tf.GPT2LMHeadModel
    with torch.device("meta"):
        return cls(cfg)


def _count(model):
    seen, total = set(), 0
    for p in model.parameters():  # parameters() already skips tied duplicates
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@pytest.mark.parametrize("name", models.names())
def test_param_count_matches_the_real_architecture(name):
    spec = models.get(name)
    assert spec.param_count() == _count(_hf_model(spec))


def test_required_models_present():
    for name in ["llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b",
                 "mistral-7b", "gpt3-175b", "opt-13b"]:
        assert models.get(name).source


def test_published_sizes():
    # The names promise a size; the counts should round to it.
    assert round(models.get("llama2-7b").param_count() / 1e9, 1) == 6.7
    assert round(models.get("llama2-70b").param_count() / 1e9) == 69
    assert round(models.get("gpt3-175b").param_count() / 1e9) == 175
    assert round(models.get("llama3-8b").param_count() / 1e9) == 8
    assert 405 <= models.get("llama3-405b").param_count() / 1e9 < 406


def test_gqa_shapes():
    m = models.get("llama2-70b")
    assert (m.head_dim, m.kv_dim) == (128, 8 * 128)


def test_flops_per_token():
    m = models.get("llama2-7b")
    # 2 FLOPs per matmul weight; matmul weights exclude the input embedding look-up
    matmul = m.param_count() - m.vocab * m.hidden - m.n_layers * 2 * m.hidden - m.hidden
    assert m.flops_per_token(0) == 2 * matmul
    # attention adds 4 * layers * hidden per token of context
    assert m.flops_per_token(1000) - m.flops_per_token(0) == 4 * 32 * 4096 * 1000
    # the 2N rule of thumb holds within a few percent at short context
    assert m.flops_per_token(0) == pytest.approx(2 * m.param_count(), rel=0.03)


def test_errors():
    with pytest.raises(KeyError, match="llama2-7b"):
        models.get("llama9")
    with pytest.raises(ValueError, match="context"):
        models.get("llama2-7b").flops_per_token(-1)
    with pytest.raises(ValueError, match="heads"):
        models.get("llama2-7b").with_(n_kv_heads=5)
