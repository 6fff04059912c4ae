"""The GPU paths the chapters claim, in one command: ``pytest -m gpu``.

Every test here is marked ``gpu`` and is skipped on a machine without CUDA (see
tests/conftest.py), so the default suite stays CPU-only. On a GPU machine, ``pytest -m gpu``
runs exactly these: device selection, the tiny models and paged attention on the device,
the roofline measured on the device, and the GPU variants the chapters add.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import utils
from utils import bench, hardware, paged_kv, tiny, tiny_corpus

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def test_the_course_picks_the_gpu():
    assert utils.device().type == "cuda"
    assert "cpu" not in bench.machine_name().lower()


def test_tiny_target_on_the_gpu_matches_the_cpu():
    cpu, gpu = tiny.load("tiny-target"), tiny.load("tiny-target", device=CUDA)
    tokens = torch.tensor([tiny.TOKENIZER.encode("the cat sat on the mat. ")])
    with torch.inference_mode():
        logits_cpu = cpu(tokens)
        logits_gpu = gpu(tokens.to(CUDA)).cpu()
    torch.testing.assert_close(logits_gpu, logits_cpu, rtol=1e-3, atol=1e-3)
    prompt = tiny.TOKENIZER.encode("alice has ")
    assert tiny.generate(gpu, prompt, 24) == tiny.generate(cpu, prompt, 24)


def test_paged_attention_on_the_gpu_equals_sdpa():
    g = torch.Generator(device="cpu").manual_seed(0)
    B, H, Hkv, d, bs, blocks = 3, 8, 2, 64, 16, 32
    k_pool = torch.randn(blocks, Hkv, bs, d, generator=g).to(CUDA)
    v_pool = torch.randn(blocks, Hkv, bs, d, generator=g).to(CUDA)
    q = torch.randn(B, H, d, generator=g).to(CUDA)
    tables = torch.randperm(blocks, generator=g)[: B * 4].reshape(B, 4).to(CUDA)
    lengths = torch.tensor([1, 37, 64], device=CUDA)
    got = paged_kv.paged_attention(q, k_pool, v_pool, tables, lengths)
    for b in range(B):
        n = int(lengths[b])
        k = k_pool[tables[b]].transpose(0, 1).reshape(Hkv, -1, d)[:, :n]
        v = v_pool[tables[b]].transpose(0, 1).reshape(Hkv, -1, d)[:, :n]
        k, v = (t.repeat_interleave(H // Hkv, dim=0) for t in (k, v))
        want = F.scaled_dot_product_attention(q[b, :, None], k, v)[:, 0]
        torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4)


def test_a_paged_cache_on_the_gpu_generates_what_the_contiguous_one_does():
    model = tiny.load("tiny-target", device=CUDA)
    prompt = tiny.TOKENIZER.encode("bob said that ")
    pool = paged_kv.KVPool(model.config, paged_kv.BlockManager(64, block_size=8), device=CUDA)
    paged = tiny.generate(model, prompt, 40,
                          cache_factory=lambda cfg: paged_kv.PagedKVCache(pool, ["s"]))
    assert paged == tiny.generate(model, prompt, 40)


def _datasheet_gpu():
    """The registry entry of this GPU, or None when the registry does not have it."""
    name = torch.cuda.get_device_name(0).lower()
    form = "pcie" if "pcie" in name else "sxm"
    for family in ("h200", "h100", "b200", "a100", "mi300x", "l4"):
        if family in name:
            matches = [n for n in hardware.names() if n.lower().startswith(family)]
            exact = [n for n in matches if form in n.lower()] or matches
            return hardware.get(exact[0]) if exact else None
    return None


def test_the_roofline_measured_on_the_gpu_is_under_its_datasheet():
    bench.clear_cache()
    peak, bandwidth = bench.peak_flops("bf16", device=CUDA), bench.peak_bandwidth(device=CUDA)
    assert peak > 1e13 and bandwidth > 3e11, (peak, bandwidth)
    spec = _datasheet_gpu()
    if spec is None:
        pytest.skip(f"{torch.cuda.get_device_name(0)} is not in the registry")
    print(f"\n{torch.cuda.get_device_name(0)}: {peak / 1e12:.0f} TFLOP/s bf16 measured, "
          f"{bandwidth / 1e12:.2f} TB/s; datasheet ({spec.name}) "
          f"{spec.flops('bf16') / 1e12:.0f} TFLOP/s, {spec.memory_bandwidth / 1e12:.2f} TB/s")
    assert peak <= 1.05 * spec.flops("bf16") and bandwidth <= 1.05 * spec.memory_bandwidth
    assert bandwidth >= 0.5 * spec.memory_bandwidth


def test_the_cache_sweep_on_the_gpu_shows_l2_above_hbm():
    small, large = bench.cache_sweep([8 * 2**20, 2 * 2**30], device=CUDA)
    assert small[1] > large[1], (small, large)


def test_a_cuda_graph_replays_what_eager_computes():
    # chapter 21: one launch replays the captured kernels, on new inputs copied in
    from utils import compilation

    chain = lambda t: compilation.op_chain(t, 100)
    x = torch.randn(64, device=CUDA)
    replay = compilation.cuda_graph(chain, x)
    for _ in range(3):
        x = torch.randn(64, device=CUDA)
        assert torch.equal(replay(x), chain(x))
    model = tiny.load("tiny-target", device=CUDA)
    forward = compilation.CausalForward(model)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab, (2, 32), generator=g).to(CUDA)
    with torch.no_grad():
        replay = compilation.cuda_graph(forward, tokens)
        for _ in range(2):
            tokens = torch.randint(0, model.config.vocab, (2, 32), generator=g).to(CUDA)
            torch.testing.assert_close(replay(tokens), forward(tokens), rtol=1e-5, atol=1e-5)
    eager = compilation.per_op_seconds(chain, x, 100)
    graphed = compilation.per_op_seconds(compilation.cuda_graph(chain, x), x, 100)
    print(f"\n{torch.cuda.get_device_name(0)}: eager {eager * 1e6:.2f} µs per kernel, "
          f"CUDA graph {graphed * 1e6:.2f} µs per kernel")
