"""Model registry: the architectures of real, published transformer models.

``get(name)`` returns a :class:`ModelSpec`. Its :meth:`~ModelSpec.param_count` counts
every weight of the released checkpoint from the architecture alone (embeddings, each
projection, biases where the model has them, norm weights, the LM head unless it is
tied to the embedding). The test suite holds these counts to the Hugging Face
``transformers`` implementation of each architecture, built on the meta device.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Mapping

from .validate import UnknownName


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer's architecture."""

    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    ffn_kind: str               # "gated" (SwiGLU: gate, up, down) or "mlp" (up, down)
    vocab: int
    context: int                # the context length it was trained for
    tied_embeddings: bool       # LM head shares the token-embedding matrix
    norm: str = "rmsnorm"       # "rmsnorm" (weight only) or "layernorm" (weight and bias)
    bias: bool = False          # biases on the attention and MLP projections
    learned_positions: int = 0  # rows of a learned position embedding (0 for RoPE)
    source: str = ""

    def __post_init__(self):
        for f in ("n_layers", "hidden", "n_heads", "n_kv_heads", "ffn_hidden", "vocab", "context"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{self.name}: {f} must be a positive integer, got {v!r}")
        if self.hidden % self.n_heads:
            raise ValueError(f"{self.name}: hidden {self.hidden} not divisible by heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.name}: heads {self.n_heads} not divisible by KV heads "
                             f"{self.n_kv_heads}")
        if self.ffn_kind not in ("gated", "mlp"):
            raise ValueError(f"{self.name}: ffn_kind must be 'gated' or 'mlp', got {self.ffn_kind!r}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"{self.name}: norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")

    # -- shapes ---------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V): KV heads x head dim."""
        return self.n_kv_heads * self.head_dim

    # -- parameters -----------------------------------------------------------------
    def attention_params(self) -> int:
        """Q, K, V and output projections of one layer (with biases if any)."""
        d, kv = self.hidden, self.kv_dim
        weights = d * d + 2 * d * kv + d * d
        biases = (d + 2 * kv + d) if self.bias else 0
        return weights + biases

    def mlp_params(self) -> int:
        """The feed-forward block of one layer."""
        d, f = self.hidden, self.ffn_hidden
        if self.ffn_kind == "gated":
            return 3 * d * f + ((2 * f + d) if self.bias else 0)
        return 2 * d * f + ((f + d) if self.bias else 0)

    def norm_params(self) -> int:
        """One normalisation layer."""
        return self.hidden * (2 if self.norm == "layernorm" else 1)

    def layer_params(self) -> int:
        """One transformer block: attention, MLP, two norms."""
        return self.attention_params() + self.mlp_params() + 2 * self.norm_params()

    def embedding_params(self) -> int:
        """Token embedding, learned positions, and an untied LM head."""
        tok = self.vocab * self.hidden
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return tok + head + self.learned_positions * self.hidden

    def param_count(self) -> int:
        """Every parameter of the checkpoint."""
        return self.n_layers * self.layer_params() + self.norm_params() + self.embedding_params()

    def matmul_params(self) -> int:
        """Weights that take part in a matrix multiply for each token.

        All projections of all layers plus the LM head (which is the embedding matrix
        again when tied). Embedding look-ups, norms and biases are not matmuls.
        """
        d, kv, f = self.hidden, self.kv_dim, self.ffn_hidden
        per_layer = 2 * d * d + 2 * d * kv + (3 if self.ffn_kind == "gated" else 2) * d * f
        return self.n_layers * per_layer + self.vocab * d

    # -- compute --------------------------------------------------------------------
    def flops_per_token(self, context: int) -> float:
        """Forward-pass FLOPs for one token that attends to ``context`` earlier positions.

        2 FLOPs (a multiply and an add) per weight in a matmul, plus attention itself:
        Q.K^T and softmax(.).V each cost 2 x context x head_dim per head per layer.
        Elementwise work (norms, activations, softmax) is left out; it is under 1%.
        """
        if not isinstance(context, int) or context < 0:
            raise ValueError(f"context must be a non-negative integer, got {context!r}")
        attention = 2 * 2 * self.n_layers * self.n_heads * self.head_dim * context
        return 2 * self.matmul_params() + attention

    def with_(self, **changes) -> "ModelSpec":
        """A copy with some fields changed (for what-if questions)."""
        return replace(self, **changes)


def _llama(name, L, d, h, kv, f, vocab, ctx, source):
    return ModelSpec(name=name, n_layers=L, hidden=d, n_heads=h, n_kv_heads=kv, ffn_hidden=f,
                     ffn_kind="gated", vocab=vocab, context=ctx, tied_embeddings=False,
                     source=source)


_LLAMA2 = ("Touvron et al. 2023, 'Llama 2: Open Foundation and Fine-Tuned Chat Models', "
           "Table 1 and Section 2.2; shapes from the released checkpoints' config.json")
_LLAMA3 = ("Meta, 'The Llama 3 Herd of Models' (Dubey et al. 2024), Table 3; shapes from "
           "the released Meta-Llama-3 checkpoints' config.json")

_MODELS = {
    "llama2-7b": _llama("llama2-7b", 32, 4096, 32, 32, 11008, 32000, 4096, _LLAMA2),
    "llama2-13b": _llama("llama2-13b", 40, 5120, 40, 40, 13824, 32000, 4096, _LLAMA2),
    "llama2-70b": _llama("llama2-70b", 80, 8192, 64, 8, 28672, 32000, 4096, _LLAMA2),
    "llama3-8b": _llama("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, _LLAMA3),
    "llama3-70b": _llama("llama3-70b", 80, 8192, 64, 8, 28672, 128256, 8192, _LLAMA3),
    "llama3-405b": _llama("llama3-405b", 126, 16384, 128, 8, 53248, 128256, 131072,
                          "Meta, 'The Llama 3 Herd of Models' (Dubey et al. 2024), Table 3 "
                          "(126 layers, model dimension 16,384, FFN 53,248, 128 heads, 8 "
                          "key/value heads; 128K context, Section 3.4.2); vocabulary and "
                          "context from the released Llama 3.1 405B config.json"),
    "mistral-7b": _llama("mistral-7b", 32, 4096, 32, 8, 14336, 32000, 32768,
                         "Jiang et al. 2023, 'Mistral 7B', Table 1 (sliding window 4096); "
                         "Mistral-7B-v0.1 config.json"),
    "gpt3-175b": ModelSpec(
        name="gpt3-175b", n_layers=96, hidden=12288, n_heads=96, n_kv_heads=96,
        ffn_hidden=4 * 12288, ffn_kind="mlp", vocab=50257, context=2048,
        tied_embeddings=True, norm="layernorm", bias=True, learned_positions=2048,
        source=("Brown et al. 2020, 'Language Models are Few-Shot Learners', Table 2.1 "
                "(96 layers, d_model 12288, 96 heads, d_ff = 4 d_model, context 2048); "
                "GPT-2 architecture with the GPT-2 BPE vocabulary of 50257 tokens"),
    ),
    "opt-13b": ModelSpec(
        name="opt-13b", n_layers=40, hidden=5120, n_heads=40, n_kv_heads=40,
        ffn_hidden=20480, ffn_kind="mlp", vocab=50272, context=2048,
        tied_embeddings=True, norm="layernorm", bias=True, learned_positions=2048 + 2,
        source=("Zhang et al. 2022, 'OPT: Open Pre-trained Transformer Language Models', "
                "Table 1; facebook/opt-13b config.json (vocab 50272; the learned position "
                "table has 2 extra rows for its padding offset)"),
    ),
}

MODELS: Mapping[str, ModelSpec] = MappingProxyType(_MODELS)


def names() -> list[str]:
    return list(_MODELS)


def get(name: str) -> ModelSpec:
    """The architecture of model ``name`` (case-insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__} {name!r}")
    key = name.strip().lower()
    if key in _MODELS:
        return _MODELS[key]
    raise UnknownName(f"unknown model name {name!r}; known: {', '.join(_MODELS)}")
