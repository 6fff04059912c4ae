"""utils.quant held to the real implementations: PyTorch's float8 dtypes and quantized
tensors, torch.ao's observers, bitsandbytes' NF4 and int8 routines."""
import math
import warnings

import pytest
import torch

from utils import quant as Q

pytest.importorskip("bitsandbytes")
bnb_f = Q.bitsandbytes_functional()

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def _same_bits(got, exp):
    """Equal values with equal signs (so -0.0 != 0.0); NaN equals NaN."""
    both_nan = got.isnan() & exp.isnan()
    return both_nan | ((got == exp) & (torch.signbit(got) == torch.signbit(exp)))


# --------------------------------------------------------------------------- formats

@pytest.mark.parametrize("fmt, dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_format_info_matches_torch_finfo(fmt, dtype):
    info, fi = Q.format_info(fmt), torch.finfo(dtype)
    assert info.max_finite == fi.max and info.min_value == fi.min
    assert info.min_normal == fi.smallest_normal
    assert info.bits == fi.bits
    grid = Q.fp_grid(fmt)
    positive = grid[(grid > 0) & torch.isfinite(grid)]
    assert positive.min().item() == info.min_subnormal
    assert positive.max().item() == info.max_finite


def test_format_info_int_and_e2m1():
    assert Q.format_info("INT8").max_finite == torch.iinfo(torch.int8).max
    assert Q.format_info("int8").min_value == torch.iinfo(torch.int8).min
    assert Q.format_info("int4").max_finite == 7
    e2m1 = Q.fp_grid("e2m1")
    assert sorted(set(e2m1.abs().tolist())) == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert Q.format_info("e2m1").max_finite == 6.0
    assert Q.format_info("nf4").bits == 4


@pytest.mark.parametrize("fmt, dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp_grid_decodes_every_code_like_torch(fmt, dtype):
    ref = torch.arange(256, dtype=torch.uint8).view(dtype).double()
    assert _same_bits(Q.fp_grid(fmt), ref).all()


def test_e2m1_rounding_is_nearest_with_ties_to_even():
    grid = Q.fp_grid("e2m1")[:8].float()                       # 0, 0.5, 1, 1.5, 2, 3, 4, 6 (codes 0..7)
    x = torch.cat([torch.rand(20_000, generator=torch.Generator().manual_seed(11)) * 7,
                   (grid[:-1] + grid[1:]) / 2])
    got = Q.fp8_round(x, "e2m1")
    dist = (x[:, None] - grid[None, :]).abs()
    best = dist.min(1, keepdim=True).values
    # among the nearest codes (two on a tie) take the even one
    candidates = (dist == best) & (torch.arange(8) % 2 == 0)[None, :]
    fallback = dist == best
    pick = torch.where(candidates.any(1), candidates.float().argmax(1), fallback.float().argmax(1))
    expected = torch.where(x > 6, torch.tensor(6.0), grid[pick])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("fmt, dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_round_bit_exact_against_torch(fmt, dtype):
    g = torch.Generator().manual_seed(0)
    grid = Q.fp_grid(fmt)
    finite = grid[torch.isfinite(grid)].float().unique()
    mids = ((finite[:-1].double() + finite[1:].double()) / 2).float()
    up, down = torch.tensor(math.inf), torch.tensor(-math.inf)
    x = torch.cat([
        finite, -finite, mids, -mids,
        torch.nextafter(mids, up), torch.nextafter(mids, down),
        torch.randint(-2 ** 31, 2 ** 31 - 1, (300_000,), dtype=torch.int32, generator=g).view(torch.float32),
        torch.randn(100_000, generator=g) * 300,
        torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 1e30, -1e-30, 464.0, 470.0, 480.0,
                      61439.0, 61440.0, -61440.0, 2.0 ** -10, 3 * 2.0 ** -18]),
    ])
    got, exp = Q.fp8_round(x, fmt), x.to(dtype).float()
    bad = ~_same_bits(got, exp)
    assert not bad.any(), (x[bad][:5], got[bad][:5], exp[bad][:5])
    assert torch.equal(Q.fp8_bits(x[torch.isfinite(x)], fmt),
                       x[torch.isfinite(x)].to(dtype).view(torch.uint8))


def test_fp8_saturation_rules():
    x = torch.tensor([500.0, math.inf, -math.inf, 1e9])
    assert Q.fp8_round(x, "e4m3").tolist() == [448.0, 448.0, -448.0, 448.0]
    assert Q.fp8_round(x, "e5m2").tolist() == [512.0, math.inf, -math.inf, math.inf]
    assert Q.fp8_round(torch.tensor([7.0, 100.0, -0.25]), "e2m1").tolist() == [6.0, 6.0, -0.0]


def test_fp8_round_bad_input():
    with pytest.raises(ValueError, match="unknown format"):
        Q.fp8_round(torch.zeros(3), "e3m4")
    with pytest.raises(ValueError, match="float format"):
        Q.fp8_round(torch.zeros(3), "int8")
    with pytest.raises(TypeError, match="float32"):
        Q.fp8_round(torch.zeros(3, dtype=torch.float64), "e4m3")
    with pytest.raises(TypeError, match="torch.Tensor"):
        Q.fp8_round([1.0], "e4m3")
    with pytest.raises(ValueError, match="NaN"):
        Q.fp8_round(torch.tensor([math.nan]), "e2m1")
    with pytest.raises(TypeError):
        Q.format_info(8)


def test_bits_per_weight():
    assert Q.bits_per_weight("int8") == 8
    assert Q.bits_per_weight("nf4", 64) == 4.5
    # QLoRA Section 3: double quantization cuts the scales from 0.5 to 0.127 bits/param
    assert Q.bits_per_weight("nf4", 64, double_quant=True) - 4 == pytest.approx(0.127, abs=5e-4)
    assert Q.bits_per_weight("e2m1", 32, scale_bits=8) == 4.25      # MXFP4
    assert Q.bits_per_weight("e4m3", 32, scale_bits=8) == 8.25      # MXFP8
    with pytest.raises(ValueError, match="block_size"):
        Q.bits_per_weight("nf4", 0)
    with pytest.raises(TypeError, match="block_size"):
        Q.bits_per_weight("nf4", 6.4)
    with pytest.raises(ValueError, match="double_quant"):
        Q.bits_per_weight("nf4", None, double_quant=True)
    with pytest.raises(ValueError, match="unknown format"):
        Q.bits_per_weight("fp3")


def test_gptq_table_is_consistent():
    for model, row in Q.GPTQ_LLAMA_WIKI2.items():
        assert row["fp16"] < row["gptq4"] < row["rtn4"], model
        assert row["gptq3"] < row["rtn3"], model
        assert row["gptq3_g128"] < row["gptq3"], model
    assert Q.GPTQ_LLAMA_WIKI2["LLaMA-7B"]["rtn3"] == 25.54


# --------------------------------------------------------------------------- INT8

@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dim", [None, 0, 1, -1])
def test_int8_matches_torch_quantized_tensors(symmetric, dim):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 40, generator=g) * 3 + 0.5
    x[3] = 0.0          # an all-zero channel
    q, scale, zp = Q.int8_quantize(x, dim, symmetric)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and zp.dtype == torch.int64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dim is None:
            ref = torch.quantize_per_tensor(x, scale.item(), int(zp), torch.qint8)
        else:
            ref = torch.quantize_per_channel(x, scale.double(), zp, dim % 2, torch.qint8)
    assert torch.equal(q, ref.int_repr())
    assert torch.allclose(Q.int8_dequantize(q, scale, zp, dim), ref.dequantize())
    if symmetric:
        assert int(q.abs().max()) <= 127 and not zp.any()


@pytest.mark.parametrize("dim", [None, 1])
def test_int8_affine_params_match_torch_observer(dim):
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    x = torch.randn(16, 33, generator=torch.Generator().manual_seed(2)) * 2 + 1
    x[:, 5] = 0.0
    if dim is None:
        obs = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_affine)
    else:
        obs = PerChannelMinMaxObserver(ch_axis=dim, dtype=torch.qint8, qscheme=torch.per_channel_affine)
    obs(x)
    scale, zp = obs.calculate_qparams()
    _, s, z = Q.int8_quantize(x, dim, symmetric=False)
    assert torch.equal(s.reshape(scale.shape), scale) and torch.equal(z.reshape(zp.shape), zp.long())


def test_int8_ties_round_to_even():
    q, s, _ = Q.int8_quantize(torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5]))
    assert s.item() == 1.0 and q.tolist() == [127, 0, 2, 2, 0]


def test_int8_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        Q.int8_quantize(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="inf"):
        Q.int8_quantize(torch.tensor([1.0, math.inf]))
    with pytest.raises(TypeError, match="dtype"):
        Q.int8_quantize(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="dim"):
        Q.int8_quantize(torch.zeros(2, 2), dim=2)
    with pytest.raises(ValueError, match="empty"):
        Q.int8_quantize(torch.zeros(0))
    q, s, z = Q.int8_quantize(torch.zeros(5))          # all zeros: eps scale, zero codes
    assert s.item() == torch.finfo(torch.float32).eps and not q.any()


def test_int_quantize_groups():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    for bits in (3, 4, 8):
        out = Q.int_quantize_groups(w, bits, 16)
        for r in range(8):
            for grp in range(4):
                vals = out[r, grp * 16:(grp + 1) * 16].unique()
                assert vals.numel() <= 2 ** bits
    assert (Q.int_quantize_groups(w, 4, 16) - w).abs().mean() < (Q.int_quantize_groups(w, 4) - w).abs().mean()
    sym = Q.int_quantize_groups(w, 4, 32, symmetric=True)
    assert all(sym[r, :32].unique().numel() <= 15 for r in range(8))
    with pytest.raises(ValueError, match="does not divide"):
        Q.int_quantize_groups(w, 4, 10)
    with pytest.raises(ValueError, match="bits"):
        Q.int_quantize_groups(w, 1)


# --------------------------------------------------------------------------- NF4

def test_nf4_codebook_is_bitsandbytes_table():
    code = Q.nf4_codebook()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert torch.equal(code, bnb_f.get_4bit_type("nf4", device="cpu"))
    assert code[7] == 0 and code[0] == -1 and code[-1] == 1


@pytest.mark.parametrize("n, block", [(4096, 64), (1000, 64), (777, 128), (64 * 33, 256), (130, 32)])
def test_nf4_bit_exact_against_bitsandbytes(n, block):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3
    x[:block] = 0.0                                    # an all-zero block
    packed, state = bnb_f.quantize_4bit(x.reshape(1, -1), blocksize=block, quant_type="nf4")
    codes, absmax = Q.nf4_quantize(x, block)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    assert torch.equal(Q.nf4_pack(codes), packed)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(Q.nf4_dequantize(codes, absmax, block), bnb_f.dequantize_4bit(packed, state).reshape(-1))


def test_nf4_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        Q.nf4_quantize(torch.tensor([math.nan, 1.0]))
    with pytest.raises(ValueError, match="block_size"):
        Q.nf4_quantize(torch.ones(8), 0)
    with pytest.raises(ValueError, match="absmax"):
        Q.nf4_dequantize(torch.zeros(10, dtype=torch.uint8), torch.ones(2), 4)
    with pytest.raises(ValueError, match="0..15"):
        Q.nf4_pack(torch.tensor([16], dtype=torch.uint8))


# --------------------------------------------------------------------------- LLM.int8()

def _bnb_llm_int8(x, w, threshold):
    ca, sca, cols = bnb_f.int8_vectorwise_quant(x.clone(), threshold=threshold)
    cb, scb, _ = bnb_f.int8_vectorwise_quant(w.clone())
    out = torch.ops.bitsandbytes.int8_mm_dequant.default(
        bnb_f.int8_linear_matmul(ca, cb), sca, scb, dtype=torch.float32)
    if cols is not None and cols.numel():
        out = out + x[:, cols] @ (cb[:, cols].float() * scb[:, None] / 127).T
    return out


def test_llm_int8_matches_bitsandbytes():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 96, generator=g)
    x[:, [5, 50, 51]] *= 15
    w = torch.randn(48, 96, generator=g) * 0.1
    for thr in (6.0, 0.0):
        got = Q.llm_int8_matmul(x, w, thr)
        # bitsandbytes multiplies by 6.200124e-05 where 1/127² = 6.2000124e-05 (1.8e-5 relative)
        assert torch.allclose(got, _bnb_llm_int8(x, w, thr), rtol=1e-4, atol=1e-4)
    exact = x @ w.T
    err_mixed = (Q.llm_int8_matmul(x, w, 6.0) - exact).abs().mean()
    err_plain = (Q.llm_int8_matmul(x, w, 0.0) - exact).abs().mean()
    assert err_mixed < err_plain / 2        # the decomposition is what saves the accuracy


def test_llm_int8_matches_bitsandbytes_linear8bitlt():
    """The whole bitsandbytes layer (fp16 on CPU) agrees to fp16 precision."""
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=g) * 0.1)
    layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.load_state_dict(lin.state_dict())
    x = torch.randn(8, 64, generator=g).half().float()
    x[:, 7] *= 20
    with torch.no_grad():
        ref = layer(x.half()).float()
    got = Q.llm_int8_matmul(x, lin.weight.detach().half().float(), 6.0)
    assert torch.allclose(got, ref, rtol=2e-2, atol=2e-2)


def test_llm_int8_bad_input():
    with pytest.raises(ValueError, match="features"):
        Q.llm_int8_matmul(torch.ones(2, 3), torch.ones(4, 5))
    with pytest.raises(ValueError, match="threshold"):
        Q.llm_int8_matmul(torch.ones(2, 3), torch.ones(4, 3), -1.0)
    with pytest.raises(ValueError, match="inf"):
        Q.llm_int8_matmul(torch.full((2, 3), math.inf), torch.ones(4, 3))


# --------------------------------------------------------------------------- GPTQ

def _layer(seed=0, rows=24, cols=48, n=1500):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
    return torch.randn(rows, cols, generator=g), 2 * x.T @ x


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_gptq_beats_rtn_and_stays_on_the_grid(bits):
    w, h = _layer(bits)
    gq, rq = Q.gptq_quantize(w, h, bits), Q.rtn_quantize(w, bits)
    assert Q.quantization_error(w, gq, h) < 0.8 * Q.quantization_error(w, rq, h)
    for r in range(w.shape[0]):
        assert gq[r].unique().numel() <= 2 ** bits
        grid = _grid(w[r], bits)
        assert (gq[r][:, None] - grid[None, :]).abs().min(dim=1).values.max() < 1e-5


def _grid(row, bits):
    maxq = 2 ** bits - 1
    lo, hi = min(row.min().item(), 0.0), max(row.max().item(), 0.0)
    scale = (hi - lo) / maxq
    zero = round(-lo / scale)
    return torch.tensor([scale * (k - zero) for k in range(maxq + 1)])


def test_gptq_with_identity_hessian_is_rtn():
    w = torch.randn(10, 16, generator=torch.Generator().manual_seed(6))
    h = torch.eye(16)
    assert torch.allclose(Q.gptq_quantize(w, h, 4, damp=0.0), Q.rtn_quantize(w, 4), atol=1e-6)


def test_gptq_dead_inputs_and_bad_input():
    w, h = _layer(7, rows=6, cols=12, n=200)
    h[3, :] = 0
    h[:, 3] = 0
    out = Q.gptq_quantize(w, h, 4)
    assert (out[:, 3] == 0).all()
    with pytest.raises(ValueError, match="h must be"):
        Q.gptq_quantize(w, torch.eye(5), 4)
    with pytest.raises(ValueError, match="bits"):
        Q.gptq_quantize(w, h, 1)
    with pytest.raises(ValueError, match="NaN"):
        Q.gptq_quantize(w, torch.full_like(h, math.nan), 4)


def test_tiny_model_gptq_beats_rtn_at_3_bits(one_thread):
    from utils import tiny, tiny_corpus

    model = tiny.load("tiny-target")
    text = tiny_corpus.heldout_text(3000)
    calib = torch.tensor(tiny.CharTokenizer().encode(tiny_corpus.train_text(20_000)[:16 * 128])).reshape(16, 128)
    base = Q.perplexity(model, text)
    rtn = Q.perplexity(Q.quantize_model_weights(model, "rtn", 3), text)
    gptq = Q.perplexity(Q.quantize_model_weights(model, "gptq", 3, calib), text)
    assert base < gptq < rtn
    # the original is untouched
    assert Q.perplexity(model, text) == base
    with pytest.raises(ValueError, match="method"):
        Q.quantize_model_weights(model, "awq", 4)
    with pytest.raises(TypeError, match="model"):
        Q.quantize_model_weights(torch.nn.Linear(2, 2), "rtn", 4)
    with pytest.raises(TypeError, match="calib_tokens"):
        Q.quantize_model_weights(model, "gptq", 4, calib_tokens=None)
    with pytest.raises(TypeError, match="quantize_fn"):
        Q.quantize_model_weights(model, "gptq", 4, calib, quantize_fn=3)
    with pytest.raises(TypeError, match="model"):
        Q.perplexity("tiny-target", text)
    with pytest.raises(ValueError, match="shorter"):
        Q.perplexity(model, "ab c")


# --------------------------------------------------------------------------- measured

def test_dynamic_int8_benchmark_shape_of_result():
    r = Q.dynamic_int8_benchmark(d_model=64, n_layers=2, batch=2, repeats=1)
    # int8 weights: about a quarter of the fp32 bytes (biases and pickling overhead aside)
    assert r["bytes_int8"] < 0.45 * r["bytes_fp32"]
    assert r["max_rel_error"] < 0.05
    assert r["seconds_fp32"] > 0 and r["seconds_int8"] > 0
    with pytest.raises(ValueError, match="d_model"):
        Q.dynamic_int8_benchmark(d_model=2)
    with pytest.raises(TypeError, match="batch"):
        Q.dynamic_int8_benchmark(batch=2.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_matmul_cuda():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9 or later")
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(256, 512, device="cuda", generator=g)
    b = torch.randn(512, 128, device="cuda", generator=g)
    out, ref = Q.fp8_matmul_cuda(a, b)
    exact = a @ b
    rel = ((out.float() - exact).norm() / exact.norm()).item()
    assert out.dtype == torch.bfloat16 and rel < 0.05


def test_fp8_matmul_cuda_refuses_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        Q.fp8_matmul_cuda(torch.ones(2, 2), torch.ones(2, 2))


# --------------------------------------------------------------------------- SmoothQuant, AWQ

def test_smoothquant_preserves_the_product_and_helps_w8a8():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 32, generator=g)
    x[:, [2, 17]] *= 40
    w = torch.randn(16, 32, generator=g) * 0.1
    s = Q.smoothquant_scales(x.abs().amax(0), w, 0.5)
    assert torch.allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4)
    exact = x @ w.T
    plain = Q.fake_quant_int8(x) @ Q.fake_quant_int8(w, 0).T
    smooth = Q.fake_quant_int8(x / s) @ Q.fake_quant_int8(w * s, 0).T
    assert (smooth - exact).abs().mean() < 0.5 * (plain - exact).abs().mean()
    with pytest.raises(ValueError, match="alpha"):
        Q.smoothquant_scales(x.abs().amax(0), w, 1.5)
    with pytest.raises(ValueError, match="channels"):
        Q.smoothquant_scales(x.abs().amax(0)[:5], w)


def test_awq_search_never_worse_than_rtn():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(256, 64, generator=g)
    x[:, :4] *= 10                                  # salient input channels
    w = torch.randn(32, 64, generator=g)
    w_hat, alpha, errors = Q.awq_search(w, x, 3, 32)
    assert len(errors) == 20 and min(errors) == errors[int(round(alpha * 20))]
    assert errors[int(round(alpha * 20))] <= errors[0]
    assert alpha > 0 and errors[int(round(alpha * 20))] < 0.9 * errors[0]
    assert torch.allclose(Q.awq_search(w, x, 3, 32, grid=1)[0], Q.int_quantize_groups(w, 3, 32), atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        Q.awq_search(w, x[:, :10])


def test_dynamic_int8_warnings_decide_on_simulated_noise(capsys):
    base = {"bytes_fp32": 4_000_000, "bytes_int8": 1_010_000, "seconds_fp32": 4e-4, "seconds_int8": 1.6e-4}
    assert Q.dynamic_int8_warnings(base) == []
    assert capsys.readouterr().out == ""
    g = torch.Generator().manual_seed(12)
    for _ in range(50):                        # int8 timings scaled by a random factor 0.4 to 4
        noisy = dict(base, seconds_int8=base["seconds_int8"] * float(torch.empty(1).uniform_(0.4, 4.0, generator=g)))
        warns = Q.dynamic_int8_warnings(noisy, report=False)
        slower = noisy["seconds_int8"] > noisy["seconds_fp32"]
        assert [w[0] for w in warns] == (["int8 dynamic linear speed"] if slower else [])
    warns = Q.dynamic_int8_warnings(dict(base, bytes_int8=2_000_000, seconds_int8=1e-3))
    assert [w[0] for w in warns] == ["int8 state dict size", "int8 dynamic linear speed"]
    out = capsys.readouterr().out
    assert out.count("⚠ measurement") == 2 and "0.50" in out
    with pytest.raises(ValueError, match="lacks"):
        Q.dynamic_int8_warnings({"bytes_fp32": 1})
    with pytest.raises(ValueError, match="seconds_int8"):
        Q.dynamic_int8_warnings(dict(base, seconds_int8=0.0))
    with pytest.raises(TypeError):
        Q.dynamic_int8_warnings([1, 2])
