"""The memory calculator against the papers' formulas and numbers, and PyTorch itself.

Expected values are written out here as products from the published formulas (or
taken from the papers' printed numbers), never obtained by calling the code under test.
"""
import math

import pytest
import torch

from utils import memory, models

# GPT-3 175B as Korthikanti et al. 2022 train it: s = 2048, a = 96, h = 12288, t = 8.
S, B, H, A, T = 2048, 1, 12288, 96, 8


# -- activations: Korthikanti et al. 2022, Section 4, Table 2 ---------------------------
def act(**kw):
    args = dict(seq_len=S, batch=B, hidden=H, heads=A)
    args.update(kw)
    return memory.activation_bytes_per_layer(**args)


def test_table2_no_parallelism():
    # sbh(34 + 5as/h) = 34 sbh + 5 a s^2 b
    assert act() == S * B * H * 34 + 5 * A * S * S * B


def test_table2_tensor_parallel():
    # sbh(10 + 24/t + 5as/(ht))
    assert act(tp=T) == S * B * H * 10 + S * B * H * 24 // T + 5 * A * S * S * B // T


def test_table2_tensor_and_sequence_parallel():
    # sbh/t (34 + 5as/h)
    assert act(tp=T, sequence_parallel=True) == (S * B * H * 34 + 5 * A * S * S * B) // T


def test_table2_selective_recompute():
    # tensor parallel + selective: sbh(10 + 24/t); with sequence parallel too: 34 sbh/t
    assert act(tp=T, recompute="selective") == S * B * H * 10 + S * B * H * 24 // T
    assert act(tp=T, sequence_parallel=True, recompute="selective") == S * B * H * 34 // T
    assert act(recompute="selective") == S * B * H * 34


def test_table2_full_recompute():
    # only the layer input, 2sbh; split along the sequence with sequence parallelism
    assert act(recompute="full") == 2 * S * B * H
    assert act(tp=T, recompute="full") == 2 * S * B * H
    assert act(tp=T, sequence_parallel=True, recompute="full") == 2 * S * B * H // T


@pytest.mark.parametrize("s,b,h,a,t", [(2048, 1, 12288, 96, 8), (512, 4, 1024, 16, 4),
                                       (4096, 2, 8192, 64, 2), (128, 3, 256, 8, 8)])
def test_internal_consistency(s, b, h, a, t):
    kw = dict(seq_len=s, batch=b, hidden=h, heads=a, tp=t)
    plain = memory.activation_bytes_per_layer(s, b, h, a)
    # sequence parallelism divides every term by t
    assert memory.activation_bytes_per_layer(**kw, sequence_parallel=True) * t == plain
    # selective recompute removes exactly 5 a s^2 b / t, with or without sequence parallel
    for sp in (False, True):
        none = memory.activation_bytes_per_layer(**kw, sequence_parallel=sp)
        sel = memory.activation_bytes_per_layer(**kw, sequence_parallel=sp, recompute="selective")
        assert none - sel == 5 * a * s * s * b // t
    # full recompute leaves the layer input
    assert memory.activation_bytes_per_layer(**kw, recompute="full") == 2 * s * b * h


def test_breakdown_reproduces_the_papers_per_block_sums():
    # Section 4.1: attention 11sbh + 5as^2b, MLP 19sbh, layer norms 4sbh
    parts = memory.activation_breakdown_per_layer(S, B, H, A)
    attn = sum(v for k, v in parts.items() if k.startswith("attn."))
    mlp = sum(v for k, v in parts.items() if k.startswith("mlp."))
    ln = sum(v for k, v in parts.items() if k.startswith("ln"))
    assert attn == 11 * S * B * H + 5 * A * S * S * B
    assert mlp == 19 * S * B * H
    assert ln == 4 * S * B * H
    assert sum(parts.values()) == act()
    assert memory.activation_breakdown_per_layer(S, B, H, A, recompute="full") == {
        "layer_input": 2 * S * B * H}
    assert "attn.softmax_output" not in memory.activation_breakdown_per_layer(
        S, B, H, A, recompute="selective")


def test_five_times_less_activation_memory_for_530b():
    # Abstract: sequence parallelism + selective recompute "reduces activation memory by
    # 5x" against the tensor-parallel baseline. 530B model (Korthikanti Table 3 / MT-NLG):
    # 105 layers, h = 20480, a = 128, t = 8, s = 2048.
    s, h, a, t = 2048, 20480, 128, 8
    baseline = act(seq_len=s, hidden=h, heads=a, tp=t)
    both = act(seq_len=s, hidden=h, heads=a, tp=t, sequence_parallel=True, recompute="selective")
    assert baseline == s * h * 10 + s * h * 24 // t + 5 * a * s * s // t   # sbh (10 + 3 + 8)
    assert both == 34 * s * h // t                                          # sbh 4.25
    assert 4.5 < baseline / both < 5.5                                      # 21 / 4.25 = 4.94


def test_logits_bytes():
    # Section 4.3: fp32 logits 4sbv/t
    assert memory.logits_bytes(2048, 2, 50257) == 4 * 2048 * 2 * 50257
    assert memory.logits_bytes(2048, 2, 51200, tp=8) == 4 * 2048 * 2 * 51200 // 8


# -- ZeRO: Rajbhandari et al. 2020 ------------------------------------------------------
def test_zero_figure1():
    # Figure 1: Psi = 7.5B, Nd = 64, K = 12 -> 120 GB, 31.4 GB, 16.6 GB, 1.9 GB
    psi, nd = 7_500_000_000, 64
    got = [memory.zero_bytes_per_device(7.5e9, stage, 64).total for stage in (0, 1, 2, 3)]
    assert got == [(2 + 2 + 12) * psi, 2 * psi + 2 * psi + 12 * psi // nd,
                   2 * psi + (2 + 12) * psi // nd, (2 + 2 + 12) * psi // nd]
    assert [round(g / 1e9, 1) for g in got] == [120.0, 31.4, 16.6, 1.9]


def test_zero_breakdown_fields():
    psi, nd = 1_000_000, 8
    z = memory.zero_bytes_per_device(psi, 2, nd)
    assert (z.params, z.grads, z.optimizer) == (2 * psi, 2 * psi // nd, 12 * psi // nd)
    assert z.as_dict() == {"params": 2 * psi, "grads": 2 * psi // nd,
                           "optimizer": 12 * psi // nd, "total": 2 * psi + 14 * psi // nd}
    # a shard that does not divide evenly is rounded up (padded flat buffer)
    z3 = memory.zero_bytes_per_device(10, 3, 4)
    assert (z3.params, z3.grads, z3.optimizer) == (2 * 3, 2 * 3, 12 * 3)
    assert "GB" in str(z3)


def test_zero_section_3_1_gpt2():
    # Section 3.1: GPT-2, 1.5B parameters, 16 bytes each with mixed-precision Adam: 24 GB
    assert memory.zero_bytes_per_device(1.5e9, 0, 1).total == 24e9
    assert memory.optimizer_bytes_per_param("adamw", master_weights=True) == 12


def test_zero_comm_volume():
    psi, nd = 1_000_000_000, 8
    for stage in (0, 1, 2):  # Sections 7.1, 7.2.1: 2 Psi
        c = memory.zero_comm_bytes_per_step(psi, stage, nd)
        assert (c.reduce_scatter, c.all_gather, c.total) == (psi * 2, psi * 2, 2 * psi * 2)
    c3 = memory.zero_comm_bytes_per_step(psi, 3, nd)  # Section 7.2.2: 3 Psi, 1.5x baseline
    assert c3.total == 3 * psi * 2
    assert c3.total / memory.zero_comm_bytes_per_step(psi, 0, nd).total == 1.5
    ring = memory.zero_comm_bytes_per_step(psi, 0, nd, exact=True)
    assert ring.total == pytest.approx(2 * psi * 2 * (nd - 1) / nd, rel=1e-12)
    ring3 = memory.zero_comm_bytes_per_step(psi, 3, nd, bytes_per_element=4, exact=True)
    assert ring3.total == pytest.approx(3 * psi * 4 * 7 / 8, rel=1e-12)
    assert memory.zero_comm_bytes_per_step(psi, 3, 1).total == 0


# -- model states ---------------------------------------------------------------------
def test_weights_and_gradients_from_the_registry():
    # Llama-2-7B has 6,738,415,616 parameters (the released checkpoint)
    assert memory.weights_bytes("llama2-7b") == 2 * 6_738_415_616
    assert memory.weights_bytes(models.get("llama2-7b"), bytes_per_param=0.5) == 6_738_415_616 / 2
    assert memory.gradient_bytes("llama2-7b", 4) == 4 * 6_738_415_616
    assert memory.weights_bytes(1000, 1) == 1000


@pytest.mark.parametrize("name", models.names())
def test_tensor_shapes_add_up_to_param_count(name):
    spec = models.get(name)
    assert sum(math.prod(s) for s in memory.tensor_shapes(spec)) == spec.param_count()


def test_tensor_shapes_match_hugging_face():
    tf = pytest.importorskip("transformers")
    llama = models.get("llama2-7b").with_(name="tiny", n_layers=2, hidden=64, n_heads=4,
                                          n_kv_heads=2, ffn_hidden=96, vocab=100)
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    opt = models.get("opt-13b").with_(name="tiny-opt", n_layers=2, hidden=64, n_heads=4,
                                      n_kv_heads=4, ffn_hidden=256, vocab=100, context=32,
                                      learned_positions=34)
    ocfg = tf.OPTConfig(vocab_size=100, hidden_size=64, ffn_dim=256, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=32,
                        word_embed_proj_dim=64)
    for spec, c, cls in ((llama, cfg, tf.LlamaForCausalLM), (opt, ocfg, tf.OPTForCausalLM)):
        with torch.device("meta"):
            hf = cls(c)
        want = sorted(tuple(p.shape) for p in hf.parameters())
        assert sorted(memory.tensor_shapes(spec)) == want


def test_optimizer_bytes_per_param():
    n = 1_000_000
    assert memory.optimizer_bytes(n, "adamw") == (4 + 4 + 4) * n      # master, m, v
    assert memory.optimizer_bytes(n, "adam", master_weights=False) == (4 + 4) * n
    assert memory.optimizer_bytes(n, "sgd") == 4 * n                   # master only
    assert memory.optimizer_bytes(n, "sgd", master_weights=False) == 0
    assert memory.optimizer_bytes(n, "SGD_momentum", master_weights=False) == 4 * n


def _torch_state_bytes(module, opt):
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return sum(t.numel() * t.element_size() for st in opt.state.values()
               for k, t in st.items() if k != "step" and torch.is_tensor(t))


@pytest.mark.parametrize("kind", ["adamw", "sgd", "sgd_momentum", "adafactor"])
def test_optimizer_bytes_against_pytorch(kind):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 64),
                                 torch.nn.Linear(64, 16, bias=False), torch.nn.LayerNorm(16))
    make = {"adamw": lambda p: torch.optim.AdamW(p),
            "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
            "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            "adafactor": lambda p: torch.optim.Adafactor(p)}[kind]
    real = _torch_state_bytes(module, make(module.parameters()))
    shapes = [tuple(p.shape) for p in module.parameters()]
    assert memory.optimizer_bytes(shapes, kind, master_weights=False) == real


def test_adafactor_from_model_spec():
    spec = models.get("llama2-7b")
    d, f, V, L = 4096, 11008, 32000, 32
    # per layer: q,k,v,o (d,d): 4(d+d); gate, up (f,d): 2(f+d); down (d,f): d+f; 2 norms: 2d
    per_layer = 4 * (d + d) + 2 * (f + d) + (d + f) + 2 * d
    elems = L * per_layer + 2 * (V + d) + d              # embedding, LM head, final norm
    assert memory.optimizer_bytes(spec, "adafactor", master_weights=False) == 4 * elems
    with pytest.raises(ValueError, match="adafactor's factored state depends on tensor shapes"):
        memory.optimizer_bytes(1000, "adafactor")


# -- KV cache ---------------------------------------------------------------------------
def test_kv_cache_per_token():
    # 2 (K, V) x layers x KV heads x head dim x 2 bytes
    assert memory.kv_cache_bytes_per_token("llama2-7b") == 2 * 32 * 32 * 128 * 2 == 2**19  # 0.5 MiB
    assert memory.kv_cache_bytes_per_token(models.get("llama2-70b")) == 2 * 80 * 8 * 128 * 2 \
        == 320 * 1024                                                                     # 320 KiB
    assert memory.kv_cache_bytes_per_token("llama2-70b", bytes_per_element=1) == 2 * 80 * 8 * 128


def test_kv_cache_total_and_inference():
    assert memory.kv_cache_bytes("llama2-7b", 4096, 1) == 2 * 32 * 32 * 128 * 2 * 4096 == 2 * 2**30
    inf = memory.inference_bytes("llama2-70b", 4096, 8)
    assert inf.weights == 2 * 68_976_648_192
    assert inf.kv_cache == 2 * 80 * 8 * 128 * 2 * 4096 * 8
    assert inf.total == inf.weights + inf.kv_cache


# -- totals -----------------------------------------------------------------------------
def test_training_single_device():
    psi, s, h, a, L = 6_738_415_616, 4096, 4096, 32, 32
    t = memory.training_bytes_per_device("llama2-7b", s, 1)
    assert (t.params, t.grads, t.optimizer) == (2 * psi, 2 * psi, 12 * psi)
    assert t.activations == L * (s * h * 34 + 5 * a * s * s)
    assert t.logits == 0
    assert t.total == 16 * psi + L * (s * h * 34 + 5 * a * s * s)


def test_training_3d_parallel():
    psi, s, h, v = 6_738_415_616, 4096, 4096, 32000
    tp, pp, dp = 2, 4, 8
    t = memory.training_bytes_per_device("llama2-7b", s, 1, tp=tp, pp=pp, dp=dp, zero_stage=1,
                                         sequence_parallel=True, recompute="selective",
                                         include_logits=True)
    shard = psi // (tp * pp)                      # 842,301,952: divides evenly
    assert (t.params, t.grads, t.optimizer) == (2 * shard, 2 * shard, 12 * shard // dp)
    # 32/4 = 8 layers on a stage, 4 micro-batches in flight (1F1B), 34 sbh / t each
    assert t.activations == 8 * 4 * (34 * s * h // tp)
    assert t.logits == 4 * s * v // tp
    one = memory.training_bytes_per_device("llama2-7b", s, 1, tp=tp, pp=pp,
                                           in_flight_microbatches=1)
    assert one.activations == 8 * (10 * s * h + 24 * s * h // tp + 5 * 32 * s * s // tp)


def test_min_gpus():
    need = 2 * 68_976_648_192 + 2 * 80 * 8 * 128 * 2 * 4096          # weights + KV, 1 x 4096
    assert memory.min_gpus("llama2-70b", "H100-SXM", seq_len=4096) == math.ceil(need / (80 * 2**30))
    assert memory.min_gpus("llama2-70b", "H100-SXM", seq_len=4096) == 2
    # ZeRO-3 training of 7B: 16 x 6.74e9 = 107.8 GB of states + 1 GiB of full-recompute
    # activations (32 layers x 2sbh) -> two 80 GiB GPUs
    assert memory.min_gpus("llama2-7b", "H100-SXM", "training", seq_len=4096) == 2
    with pytest.raises(ValueError, match="activations alone"):
        memory.min_gpus("llama2-7b", "L4", "training", seq_len=4096, batch=64, recompute="none")


# -- bad input ------------------------------------------------------------------------
@pytest.mark.parametrize("call,exc,match", [
    (lambda: act(seq_len=-1), ValueError, "seq_len must be a positive integer, got -1"),
    (lambda: act(batch=2.5), ValueError, "batch must be a whole number, got 2.5"),
    (lambda: act(hidden="4096"), TypeError, "hidden must be an integer"),
    (lambda: act(recompute="fulll"), ValueError, "unknown recompute mode 'fulll'"),
    (lambda: act(tp=5), ValueError, "tp=5 does not divide heads=96"),
    (lambda: act(hidden=100, heads=3), ValueError, "hidden=100 is not divisible by heads=3"),
    (lambda: act(sequence_parallel="yes"), TypeError, "sequence_parallel must be True or False"),
    (lambda: memory.zero_bytes_per_device(1e9, 4, 8), ValueError, "unknown ZeRO stage 4"),
    (lambda: memory.zero_bytes_per_device(1e9, True, 8), ValueError, "unknown ZeRO stage True"),
    (lambda: memory.zero_bytes_per_device(1e9, 1, 0), ValueError, "dp must be a positive integer, got 0"),
    (lambda: memory.zero_bytes_per_device(-5, 1, 8), ValueError, "params must be a positive integer"),
    (lambda: memory.zero_comm_bytes_per_step(1e9, 5, 8), ValueError, "unknown ZeRO stage 5"),
    (lambda: memory.optimizer_bytes(1000, "lamb"), ValueError, "unknown optimizer 'lamb'"),
    (lambda: memory.weights_bytes(1000, 0), ValueError, "bytes_per_param must be a positive number"),
    (lambda: memory.kv_cache_bytes_per_token("gpt-9"), KeyError, "unknown model 'gpt-9'"),
    (lambda: memory.kv_cache_bytes("llama2-7b", 0, 1), ValueError, "seq_len must be a positive"),
    (lambda: memory.training_bytes_per_device("llama2-7b", 4096, 1, tp=3), ValueError,
     "tp=3 does not divide heads=32"),
    (lambda: memory.training_bytes_per_device("llama2-7b", 4096, 1, pp=64), ValueError,
     "pp=64 is larger than the 32 layers"),
    (lambda: memory.min_gpus("llama2-7b", "H100-SXM", "serve"), ValueError, "unknown workload 'serve'"),
])
def test_bad_input_is_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
