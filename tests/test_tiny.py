"""The tiny model family: exact incremental decoding, GQA against PyTorch's attention,
the shipped weights, the corpus generator, and the errors for bad inputs."""
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from utils import tiny, tiny_corpus
from utils.tiny import (CacheBatch, ContiguousKVCache, TinyConfig, TinyTransformer, TOKENIZER,
                        attention, causal_mask, generate)

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")   # see tests/conftest.py


@pytest.fixture(scope="module", params=tiny.MODEL_NAMES)
def model(request):
    return tiny.load(request.param)


@pytest.fixture(scope="module")
def target():
    return tiny.load("tiny-target")


def _text_tokens(n: int, seed: int = 99) -> torch.Tensor:
    return torch.tensor(TOKENIZER.encode(tiny_corpus.generate_text(n, seed)), dtype=torch.long)


# --- incremental decoding is exact ------------------------------------------------------

def test_prefill_then_decode_matches_forward(model):
    tokens = _text_tokens(90)
    full = model(tokens[None])[0]                                   # [T, vocab]
    cache = ContiguousKVCache(model.config)
    got = [model.prefill(tokens[None, :30], cache)[0]]
    for t in range(30, len(tokens)):
        got.append(model.decode_step(tokens[t:t + 1], cache))
    torch.testing.assert_close(torch.cat(got), full, atol=ATOL, rtol=0)
    assert cache.lengths.tolist() == [len(tokens)]


def test_chunked_prefill_matches_forward(model):
    tokens = _text_tokens(70, seed=3)
    full = model(tokens[None])[0]
    cache = ContiguousKVCache(model.config, max_len=80)
    chunks = [model.prefill(tokens[None, s:s + 16], cache)[0] for s in range(0, len(tokens), 16)]
    torch.testing.assert_close(torch.cat(chunks), full, atol=ATOL, rtol=0)


def test_batched_decode_of_different_lengths(target):
    """Per-sequence caches decoded together (CacheBatch) equal each sequence on its own."""
    seqs = [_text_tokens(n, seed=s) for n, s in ((12, 1), (40, 2), (25, 3))]
    caches = [ContiguousKVCache(target.config) for _ in seqs]
    for s, c in zip(seqs, caches):
        target.prefill(s[None, :-3], c)
    steps = [target.decode_step(torch.stack([s[-3 + i] for s in seqs]), caches) for i in range(3)]
    for b, s in enumerate(seqs):
        full = target(s[None])[0, -3:]
        torch.testing.assert_close(torch.stack([st[b] for st in steps]), full, atol=ATOL, rtol=0)
    assert [int(c.lengths) for c in caches] == [len(s) for s in seqs]


def test_contiguous_rows_of_different_lengths_and_truncate(target):
    """One ContiguousKVCache with two rows; truncating a row (rejected drafts) and decoding on."""
    a, b = _text_tokens(30, seed=5), _text_tokens(30, seed=6)
    cache = ContiguousKVCache(target.config, batch_size=2, max_len=40)
    target.prefill(torch.stack([a[:20], b[:20]]), cache)
    cache.truncate(torch.tensor([20, 14]))                 # row 1 forgets its last 6 positions
    nxt = target.decode_step(torch.stack([a[20], b[14]]), cache)
    torch.testing.assert_close(nxt[0], target(a[None, :21])[0, -1], atol=ATOL, rtol=0)
    torch.testing.assert_close(nxt[1], target(b[None, :15])[0, -1], atol=ATOL, rtol=0)
    assert cache.lengths.tolist() == [21, 15]
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(30)


# --- grouped-query attention against scaled_dot_product_attention ------------------------

@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1), (6, 3)])
def test_attention_matches_sdpa(n_heads, n_kv_heads):
    g = torch.Generator().manual_seed(0)
    B, S, T, d = 2, 11, 4, 8                      # last T of S positions are queries
    q = torch.randn(B, n_heads, T, d, generator=g)
    k = torch.randn(B, n_kv_heads, S, d, generator=g)
    v = torch.randn(B, n_kv_heads, S, d, generator=g)
    q_pos = torch.arange(S - T, S).expand(B, T)
    got = attention(q, k, v, causal_mask(q_pos, S))
    rep = n_heads // n_kv_heads
    allowed = torch.ones(S, S, dtype=torch.bool).tril()[S - T:]
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=allowed)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_layer_matches_reference(target):
    """The model's first attention layer, recomputed by hand with SDPA and repeated KV heads."""
    cfg = target.config
    layer = target.blocks[0].attn
    x = torch.randn(1, 9, cfg.d_model, generator=torch.Generator().manual_seed(1))
    cos, sin = target.rope_cos[:9], target.rope_sin[:9]

    def heads(w, n):
        return (x @ w.weight.T).view(1, 9, n, cfg.head_dim).transpose(1, 2)

    def rope(t):                                    # rotate pairs (i, i + d/2)
        t1, t2 = t[..., :cfg.head_dim // 2], t[..., cfg.head_dim // 2:]
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], -1)

    q, k, v = rope(heads(layer.wq, cfg.n_heads)), rope(heads(layer.wk, cfg.n_kv_heads)), heads(layer.wv, cfg.n_kv_heads)
    rep = cfg.n_heads // cfg.n_kv_heads
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                         is_causal=True)
    want = layer.wo(out.transpose(1, 2).reshape(1, 9, -1))
    with torch.no_grad():
        got = layer(x, cos[None, None], sin[None, None], 0, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- shipped weights ----------------------------------------------------------------------

@pytest.mark.parametrize("name,threshold", [("tiny-target", 0.6), ("tiny-draft", 1.2)])
def test_shipped_weights_heldout_loss(name, threshold):
    """Loss on freshly generated text (a seed used neither for training nor validation),
    in nats per character. Uniform guessing scores log(vocab) = log(44) = 3.78."""
    model = tiny.load(name)
    assert model.config.vocab == len(tiny_corpus.ALPHABET)
    tokens = _text_tokens(8 * 256 + 1, seed=424242).view(-1)
    windows = torch.stack([tokens[i * 256:(i + 1) * 256 + 1] for i in range(8)])
    with torch.no_grad():
        logits = model(windows[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, model.config.vocab), windows[:, 1:].reshape(-1)).item()
    assert loss < threshold < math.log(model.config.vocab)
    assert tiny.weights_path(name).stat().st_size < 2_000_000


def test_target_is_better_than_draft():
    meta_t, meta_d = tiny.metadata("tiny-target"), tiny.metadata("tiny-draft")
    assert meta_t["training"]["heldout_loss"] < meta_d["training"]["heldout_loss"]
    assert 0.5 < meta_d["training"]["alpha_vs_target"] < 0.95
    assert TinyConfig(**meta_t["config"]).n_layers > TinyConfig(**meta_d["config"]).n_layers


# --- generation ---------------------------------------------------------------------------

def _greedy_by_full_forward(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_generate_matches_full_forward(model):
    prompt = TOKENIZER.encode("mia has 3 plums. tom gives mia 2 plums. now mia has")
    got = generate(model, prompt, 40)
    assert got == _greedy_by_full_forward(model, prompt, 40)
    assert len(got) == 40


def test_sampling_is_reproducible_and_stops(target):
    prompt = TOKENIZER.encode("the cow says")
    runs = [generate(target, prompt, 60, temperature=1.0, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert runs[0] == runs[1]
    stopped = generate(target, prompt, 200, stop_token=TOKENIZER.eos_id)
    assert stopped[-1] == TOKENIZER.eos_id and TOKENIZER.eos_id not in stopped[:-1]
    assert generate(target, prompt, 0) == []


def test_generate_with_custom_cache_factory(target):
    prompt = TOKENIZER.encode("count by 3: 6, 9,")
    made = []

    def factory(cfg):
        made.append(ContiguousKVCache(cfg, max_len=64))
        return made[-1]

    assert generate(target, prompt, 20, cache_factory=factory) == generate(target, prompt, 20)
    assert len(made) == 1 and int(made[0].lengths) == len(prompt) + 19


# --- corpus -------------------------------------------------------------------------------

def test_corpus_is_deterministic():
    def digest(text):
        return hashlib.sha256(text.encode()).hexdigest()

    assert digest(tiny_corpus.generate_text(20_000, 5)) == digest(tiny_corpus.generate_text(20_000, 5))
    assert tiny_corpus.generate_text(20_000, 5) != tiny_corpus.generate_text(20_000, 6)
    assert tiny_corpus.train_text(5000) == tiny_corpus.generate_text(5000, tiny_corpus.TRAIN_SEED)
    assert tiny_corpus.prompts(10) == tiny_corpus.prompts(10)
    text = tiny_corpus.generate_text(50_000, 1)
    assert len(text) == 50_000 and set(text) <= set(tiny_corpus.ALPHABET)
    assert TOKENIZER.decode(TOKENIZER.encode(text)) == text


# --- bad inputs ---------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(target):
    cfg = target.config
    ok = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match="integer"):
        target(ok.float())
    with pytest.raises(TypeError, match="torch.Tensor"):
        target([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        target(ok[0])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        target(torch.tensor([[1, cfg.vocab]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        target(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="max_seq_len"):
        target(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))
    cache = ContiguousKVCache(cfg)
    target.prefill(torch.zeros(1, cfg.max_seq_len - 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        target.prefill(torch.zeros(1, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="batch"):
        target.prefill(torch.zeros(2, 1, dtype=torch.long), ContiguousKVCache(cfg))
    with pytest.raises(ValueError, match="one token per sequence"):
        target.decode_step(torch.zeros(1, 2, dtype=torch.long), ContiguousKVCache(cfg))
    with pytest.raises(TypeError, match="KVCache"):
        target.decode_step(torch.zeros(1, dtype=torch.long), {"k": None})
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(target, [1, 2, 3], cfg.max_seq_len)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        TOKENIZER.encode("Hello")
    with pytest.raises(ValueError, match="not in"):
        TOKENIZER.decode([cfg.vocab])
    with pytest.raises(ValueError, match="unknown tiny model"):
        tiny.load("tiny-huge")
    with pytest.raises(ValueError, match="n_kv_heads"):
        TinyConfig(vocab=44, n_layers=1, d_model=64, n_heads=4, n_kv_heads=3, d_ff=64, max_seq_len=32)
    with pytest.raises(ValueError, match="cache full"):
        small = ContiguousKVCache(cfg, max_len=4)
        target.prefill(torch.zeros(1, 5, dtype=torch.long), small)


def test_fresh_model_shapes():
    cfg = TinyConfig(vocab=44, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16)
    m = TinyTransformer(cfg)
    assert m(torch.zeros(3, 5, dtype=torch.long)).shape == (3, 5, 44)
    assert cfg.kv_bytes_per_token() == 2 * 2 * 2 * 8 * 4
    expected = 2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 48 + 2 * 32) + 32 + 2 * 44 * 32
    assert m.num_params() == expected
