"""Checkers for lab 11, memory requirements.

Each formula is held to the real thing where one exists, and to ``utils.memory`` (whose
unit tests derive every number from the papers by hand) where it does not:

* parameter counts: Hugging Face ``transformers``' own ``LlamaForCausalLM``, built from
  the same config on the meta device (no weights allocated);
* model-state bytes: ``torch.optim.AdamW`` / ``SGD`` after a real step (fp32 training),
  and a bf16 model with fp32 master copies (mixed precision);
* ZeRO and activation formulas: ``utils.memory`` (the papers' tables);
* bytes saved for backward: autograd's own graph (every ``_saved_*`` tensor of every
  node), an independent route to the same tensors;
* KV cache: the ``DynamicCache`` that ``transformers`` fills during a real forward pass.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import memory, models
from . import exercise, expect_close, expect_equal, expect_type, fail

#: The config keys of a Llama-style model, as in a Hugging Face ``config.json``.
CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")


def llama_config(spec) -> dict:
    """The Hugging Face-style config dict of a gated (Llama-style) registry model."""
    m = models.get(spec) if isinstance(spec, str) else spec
    if m.ffn_kind != "gated" or m.bias or m.norm != "rmsnorm" or m.learned_positions:
        raise ValueError(f"{m.name} is not a Llama-style model (gated MLP, RMSNorm, no biases)")
    return {"vocab_size": m.vocab, "hidden_size": m.hidden, "intermediate_size": m.ffn_hidden,
            "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
            "num_key_value_heads": m.n_kv_heads, "tie_word_embeddings": m.tied_embeddings}


def _tiny_configs() -> list[tuple[str, dict]]:
    base = {"vocab_size": 1000, "hidden_size": 256, "intermediate_size": 688,
            "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 8,
            "tie_word_embeddings": False}
    return [("tiny, multi-head", base),
            ("tiny, grouped-query (8 heads, 2 KV heads)", {**base, "num_key_value_heads": 2}),
            ("tiny, multi-query, tied embeddings",
             {**base, "num_key_value_heads": 1, "tie_word_embeddings": True}),
            ("one layer, odd sizes", {**base, "vocab_size": 37, "hidden_size": 96,
                                      "intermediate_size": 50, "num_hidden_layers": 1,
                                      "num_attention_heads": 3, "num_key_value_heads": 1})]


def _hf_llama(cfg: dict, device="meta", dtype=None):
    import transformers as tf

    config = tf.LlamaConfig(**cfg, max_position_embeddings=256)
    with torch.device(device):
        model = tf.LlamaForCausalLM(config)
    return model if dtype is None else model.to(dtype)


def _unique_param_count(module: nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# --------------------------------------------------------------------------- exercise 1
@exercise
def param_count(fn):
    """``fn(config)``: parameters of a Llama-style model from its config dict."""
    cases = _tiny_configs() + [(name, llama_config(name))
                               for name in ("llama2-7b", "llama2-70b", "llama3-8b", "mistral-7b")]
    for label, cfg in cases:
        want = _unique_param_count(_hf_llama(cfg))
        got = fn(dict(cfg))
        expect_type(got, int, f"param_count({label})")
        expect_equal(got, want, what=f"param_count({label}): transformers' LlamaForCausalLM has",
                     hint="per layer: q and o are hidden x hidden; k and v are hidden x "
                          "(kv_heads x head_dim); gate, up, down are hidden x intermediate; two "
                          "RMSNorm weights of length hidden. Then the embedding, the final "
                          "norm and an LM head unless tie_word_embeddings")
    return (f"{len(cases)} configs match transformers' LlamaForCausalLM (MHA, GQA, MQA, tied "
            f"embeddings; Llama-2-7B/70B, Llama-3-8B, Mistral-7B)")


# --------------------------------------------------------------------------- exercise 2
_PARTS = ("weights", "grads", "optimizer")


def _state_dict_of(got, what):
    expect_type(got, dict, what, hint="return a dict {'weights': ..., 'grads': ..., "
                                      "'optimizer': ...} of bytes")
    if set(got) != set(_PARTS):
        fail(what, f"the keys {', '.join(map(repr, _PARTS))}",
             f"the keys {', '.join(map(repr, sorted(map(str, got))))}",
             "one entry per kind of model state, in bytes")
    return got


def _real_state_bytes(optimizer: str, mixed: bool) -> tuple[int, dict]:
    """A small model, one real optimizer step; returns (params, measured bytes by part)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 64), nn.GELU(),
                          nn.Linear(64, 16, bias=False), nn.LayerNorm(16))
    make = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
            "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
            "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)}[optimizer]
    if mixed:   # bf16 weights and gradients; the optimizer steps fp32 master copies
        model = model.to(torch.bfloat16)
        master = [p.detach().float().requires_grad_() for p in model.parameters()]
        opt = make(master)
    else:
        opt = make(list(model.parameters()))
    x = torch.randint(0, 50, (4, 8))
    model(x).float().pow(2).mean().backward()
    if mixed:
        for m, p in zip(master, model.parameters()):
            m.grad = p.grad.float()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    params = list(model.parameters())
    state = [t for st in opt.state.values() for k, t in st.items()
             if k != "step" and torch.is_tensor(t)]
    measured = {"weights": nbytes(params), "grads": nbytes(p.grad for p in params),
                "optimizer": nbytes(state) + (nbytes(master) if mixed else 0)}
    return sum(p.numel() for p in params), measured


@exercise
def model_state_bytes(fn):
    """``fn(n_params, optimizer, mixed_precision)`` -> {'weights', 'grads', 'optimizer'} bytes."""
    # The real thing: one optimizer step on a real model, every state tensor counted.
    for optimizer in ("adamw", "sgd_momentum", "sgd"):
        for mixed in (False, True):
            n, measured = _real_state_bytes(optimizer, mixed)
            what = f"model_state_bytes({n}, {optimizer!r}, mixed_precision={mixed})"
            got = _state_dict_of(fn(n, optimizer, mixed), what)
            setup = ("bf16 weights and grads, fp32 master copies stepped by torch.optim"
                     if mixed else "fp32 weights and grads, torch.optim state")
            for part in _PARTS:
                expect_equal(got[part], measured[part],
                             what=f"{what}[{part!r}]: a real {optimizer} step ({setup}) holds",
                             hint="per parameter: weights and grads 2 bytes in mixed precision, "
                                  "4 in fp32; optimizer state in fp32: AdamW keeps exp_avg and "
                                  "exp_avg_sq (8 B), SGD with momentum a momentum buffer (4 B), "
                                  "plain SGD nothing; mixed precision adds the fp32 master "
                                  "weights (4 B)")
    # Paper scale: ZeRO's 2 + 2 + 12 = 16 bytes per parameter.
    psi = memory.PUBLISHED["zero_gpt2"]["params"]
    got = _state_dict_of(fn(psi, "adamw", True), f"model_state_bytes({psi}, 'adamw', True)")
    want = {"weights": memory.weights_bytes(psi, 2), "grads": memory.gradient_bytes(psi, 2),
            "optimizer": memory.optimizer_bytes(psi, "adamw", master_weights=True)}
    for part in _PARTS:
        expect_equal(got[part], want[part], what=f"model_state_bytes(1.5e9, 'adamw', True)[{part!r}]",
                     hint="ZeRO Section 3.1: 2 + 2 + 12 bytes per parameter")
    try:
        fn(1000, "lamb", True)
    except ValueError:
        pass
    else:
        fail("model_state_bytes(1000, 'lamb', True)", "a ValueError for an unknown optimizer",
             "no error", "raise ValueError naming the optimizers you know")
    total = sum(got.values())
    return (f"matches real AdamW, SGD-momentum and SGD steps in fp32 and mixed precision; "
            f"GPT-2 1.5B needs {total / 1e9:.0f} GB (ZeRO Section 3.1: "
            f"{memory.PUBLISHED['zero_gpt2']['gb']} GB)")


# --------------------------------------------------------------------------- exercise 3
@exercise
def zero_bytes_per_device(fn):
    """``fn(n_params, stage, dp, k=12)`` -> {'params', 'grads', 'optimizer'} bytes on one rank."""
    keys = ("params", "grads", "optimizer")
    fig = memory.PUBLISHED["zero_figure1"]
    cases = [(fig["params"], s, fig["dp"], fig["k"]) for s in (0, 1, 2, 3)]
    cases += [(10, s, 4, 12) for s in (0, 1, 2, 3)]            # shards that do not divide
    cases += [(1_000_003, 2, 8, 12), (6_738_415_616, 3, 1, 12), (70_000_000_000, 3, 512, 8),
              (1000, 1, 3, 4)]
    for psi, stage, dp, k in cases:
        what = f"zero_bytes_per_device({psi}, stage={stage}, dp={dp}, k={k})"
        got = fn(psi, stage, dp, k)
        expect_type(got, dict, what, hint="return a dict {'params': ..., 'grads': ..., "
                                          "'optimizer': ...} of bytes")
        ref = memory.zero_bytes_per_device(psi, stage, dp, k)
        want = {key: getattr(ref, key) for key in keys}
        expect_equal(got, want, what=what,
                     hint="stage 1 shards the optimizer states (K bytes/param), stage 2 also "
                          "the 2-byte gradients, stage 3 also the 2-byte parameters; a shard "
                          "of n elements over dp ranks holds ceil(n / dp) of them")
    try:
        fn(1000, 4, 8, 12)
    except ValueError:
        pass
    else:
        fail("zero_bytes_per_device(1000, stage=4, ...)", "a ValueError: stages are 0 to 3",
             "no error", "check the stage and raise ValueError for anything else")
    gb = [round(sum(fn(fig["params"], s, fig["dp"], fig["k"]).values()) / 1e9, 1)
          for s in (0, 1, 2, 3)]
    return f"Figure 1 reproduced: {' / '.join(f'{g:g}' for g in gb)} GB per device"


# --------------------------------------------------------------------------- exercise 4
@exercise
def activation_bytes_per_layer(fn):
    """``fn(s, b, h, a, t=1, sequence_parallel=False, recompute="none")`` -> bytes (int)."""
    shapes = [(2048, 1, 12288, 96, 8), (2048, 1, 20480, 128, 8), (4096, 2, 4096, 32, 4),
              (128, 2, 256, 4, 1), (512, 3, 1024, 16, 2), (1, 1, 8, 1, 1)]
    for s, b, h, a, t in shapes:
        for sp in (False, True):
            for mode in memory.RECOMPUTE_MODES:
                what = (f"activation_bytes_per_layer(s={s}, b={b}, h={h}, a={a}, t={t}, "
                        f"sequence_parallel={sp}, recompute={mode!r})")
                got = fn(s, b, h, a, t, sp, mode)
                expect_type(got, int, what)
                want = memory.activation_bytes_per_layer(s, b, h, a, t, sp, mode)
                expect_equal(got, want, what=what, hint=_ACT_HINT[(mode, sp and t > 1)])
    try:
        fn(128, 1, 256, 4, 1, False, "some")
    except ValueError:
        pass
    else:
        fail("activation_bytes_per_layer(..., recompute='some')",
             "a ValueError for an unknown recompute mode", "no error",
             "accept 'none', 'selective' and 'full' and raise ValueError otherwise")
    s, h, a, t = 2048, 20480, 128, 8
    ratio = fn(s, 1, h, a, t, False, "none") / fn(s, 1, h, a, t, True, "selective")
    return (f"Korthikanti Table 2 in 8 of 9 cases, Megatron-LM's 2sbh/t in the ninth (full "
            f"recompute with sequence parallelism); 530B-shaped layer: {ratio:.2f}x less with "
            f"sequence parallelism + selective recompute (paper: "
            f"{memory.PUBLISHED['korthikanti_reduction']['factor']}x)")


_ACT_HINT = {
    ("none", False): "no sequence parallelism: sbh(10 + 24/t + 5as/(ht)); with t = 1 that is "
                     "sbh(34 + 5as/h). Only the 24sbh and the 5as^2b terms are split by t",
    ("none", True): "sequence parallelism splits the remaining 10sbh along the sequence too: "
                    "sbh/t (34 + 5as/h)",
    ("selective", False): "selective recompute drops the whole 5as^2b/t term: sbh(10 + 24/t)",
    ("selective", True): "sequence parallelism + selective recompute: 34sbh/t",
    ("full", False): "full recompute keeps only the layer input, 2sbh (not divided by t "
                     "without sequence parallelism)",
    ("full", True): "full recompute with sequence parallelism: the layer input is split along "
                    "the sequence, 2sbh/t",
}


# --------------------------------------------------------------------------- exercise 5
def _graph_saved_bytes(output: torch.Tensor, exclude: set) -> int:
    """Bytes of the unique storages held by the ``_saved_*`` fields of ``output``'s graph.

    An independent route to what saved-tensor hooks see. 0-dim tensors are skipped: they
    are Python numbers autograd wrapped (e.g. the divisor in ``x / 8.0``), saved as
    scalars, never packed.
    """
    storages, seen, stack = {}, set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            value = getattr(node, name)
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if torch.is_tensor(t) and t.dim() > 0:
                    st = t.untyped_storage()
                    if st.data_ptr() not in exclude:
                        storages.setdefault(st.data_ptr(), st.nbytes())
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


class _Reuse(nn.Module):
    """exp saves its result y; y * y saves y twice: one storage."""

    def forward(self, x):
        y = x.exp()
        return y * y


class _HalfView(nn.Module):
    """sin saves a view of half of x: the whole storage of x stays alive."""

    def forward(self, x):
        return torch.sin(x[:, : x.shape[1] // 2])


class _AddOnly(nn.Module):
    def forward(self, x):
        return x + 1.0


class _BoolMask(nn.Module):
    """The dropout GPUs run (native_dropout) saves a 1-byte bool mask."""

    def forward(self, x):
        return torch.native_dropout(x, 0.5, True)[0]


class _GPTLayer(nn.Module):
    """A pre-norm GPT layer (LayerNorm, attention with softmax and dropout, 4h GeLU MLP)."""

    def __init__(self, h, a, p=0.1):
        super().__init__()
        self.a, self.p = a, p
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):
        s, b, h = x.shape
        d = h // self.a
        q, k, v = (t.reshape(s, b * self.a, d).transpose(0, 1)
                   for t in self.qkv(self.ln1(x)).split(h, -1))
        p = F.dropout(torch.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(d), -1), self.p)
        o = torch.bmm(p, v).transpose(0, 1).reshape(s, b, h)
        x = x + F.dropout(self.proj(o), self.p)
        return x + F.dropout(self.fc2(F.gelu(self.fc1(self.ln2(x)))), self.p)


@exercise
def saved_activation_bytes(fn):
    """``fn(module, *inputs)``: bytes of the unique storages autograd saves, parameters excluded."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, requires_grad=True)
    lin = nn.Linear(16, 32)
    half = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    cases = [
        ("nn.Linear(16, 32) on a (8, 16) fp32 input", lin, (x,), x.nbytes,
         "a linear layer saves its input (and its weight, a parameter: leave parameters out)"),
        ("y = exp(x); y * y", _Reuse(), (x,), x.nbytes,
         "exp saves its output y and the product saves y twice: count each storage once "
         "(key on t.untyped_storage().data_ptr())"),
        ("sin(x[:, :8])", _HalfView(), (x,), x.nbytes,
         "the saved tensor is a view; autograd keeps its whole storage alive: count "
         "t.untyped_storage().nbytes(), not t.numel() * t.element_size()"),
        ("x + 1.0", _AddOnly(), (x,), 0, "an addition saves nothing for backward"),
        ("native_dropout in bf16", _BoolMask(), (half,), half.numel(),
         "native_dropout saves a bool mask, 1 byte an element"),
    ]
    for label, module, inputs, want, hint in cases:
        got = fn(module, *inputs)
        expect_type(got, int, f"saved_activation_bytes({label})")
        expect_equal(got, want, what=f"saved_activation_bytes({label})", hint=hint)
    # A whole GPT layer: compare with autograd's own graph, in bf16 and fp32.
    details = []
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        layer = _GPTLayer(64, 4).to(dtype)
        xs = torch.randn(32, 2, 64, dtype=dtype, requires_grad=True)
        got = fn(layer, xs)
        torch.manual_seed(0)
        params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        want = _graph_saved_bytes(layer(xs), params)
        expect_equal(got, want, what=f"saved_activation_bytes(GPT layer, {dtype})",
                     hint="register pack/unpack hooks with torch.autograd.graph."
                          "saved_tensors_hooks around the forward call only; count every "
                          "packed tensor's storage once, skip the module's parameters")
        details.append(f"{want:,} B in {str(dtype).split('.')[-1]}")
    # full recompute: only the input of the checkpointed layer is saved
    torch.manual_seed(0)
    layer = _GPTLayer(64, 4)
    xs = torch.randn(32, 2, 64, requires_grad=True)

    class _Checkpointed(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return torch.utils.checkpoint.checkpoint(self.inner, t, use_reentrant=False)

    got = fn(_Checkpointed(layer), xs)
    expect_equal(got, xs.nbytes, what="saved_activation_bytes(checkpointed GPT layer)",
                 hint="under torch.utils.checkpoint only the layer's input is saved")
    return "5 small cases, a GPT layer against autograd's graph (" + ", ".join(details) + \
           "), and a checkpointed layer"


# --------------------------------------------------------------------------- exercise 6
def _real_kv_bytes_per_token(cfg: dict, dtype) -> float:
    torch.manual_seed(0)
    model = _hf_llama(cfg, device="cpu", dtype=dtype).eval()
    batch, tokens = 2, 5
    ids = torch.randint(0, cfg["vocab_size"], (batch, tokens))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    total = 0
    for layer in cache.layers:
        total += layer.keys.numel() * layer.keys.element_size()
        total += layer.values.numel() * layer.values.element_size()
    return total / (batch * tokens)


@exercise
def kv_cache_bytes_per_token(fn):
    """``fn(config, bytes_per_element=2)``: KV-cache bytes per token of a Llama-style model."""
    details = []
    # The real thing: the cache transformers fills during a forward pass.
    for label, cfg in _tiny_configs()[:3]:
        for dtype, nbytes in ((torch.float32, 4), (torch.bfloat16, 2)):
            want = _real_kv_bytes_per_token(cfg, dtype)
            got = fn(dict(cfg), nbytes)
            what = f"kv_cache_bytes_per_token({label}, bytes_per_element={nbytes})"
            expect_type(got, (int, float), what)
            expect_close(got, want, rtol=0, atol=0, what=what + ": transformers' DynamicCache holds",
                         hint="K and V, for every layer, for every KV head (not every query "
                              "head): 2 x layers x kv_heads x head_dim x bytes, with head_dim = "
                              "hidden / attention heads")
    for name in ("llama2-7b", "llama2-70b", "llama3-8b", "mistral-7b"):
        for nbytes in (2, 1, 0.5):
            want = memory.kv_cache_bytes_per_token(name, nbytes)
            got = fn(llama_config(name), nbytes)
            expect_close(got, want, rtol=1e-12, atol=0,
                         what=f"kv_cache_bytes_per_token({name}, bytes_per_element={nbytes})",
                         hint="2 x layers x kv_heads x head_dim x bytes_per_element")
        if isinstance(got, numbers.Number):
            details.append(f"{name} {fn(llama_config(name), 2) / 2**10:g} KiB")
    return "matches transformers' cache; " + ", ".join(details) + " per token in 16-bit"
