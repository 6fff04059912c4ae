"""utils.tiling: the fast memory, the tiled matmul and its traffic, FlashAttention, caches."""
import math

import pytest
import torch
import torch.nn.functional as F

from utils import tiling as tl


def test_fast_memory_counts_and_refuses():
    mem = tl.FastMemory(64)
    x = torch.arange(32, dtype=torch.float32).reshape(4, 8)
    a = mem.load(x[:2, :4])                      # 8 floats = 32 bytes
    assert mem.bytes_read == 32 and mem.resident == 32
    with pytest.raises(MemoryError, match="capacity 64"):
        mem.load(x[:3, :4])                      # 48 more bytes would not fit
    c = mem.alloc((2, 4))
    assert mem.resident == 64 and mem.bytes_read == 32   # alloc moves nothing
    out = torch.zeros(2, 4)
    mem.store(out, a)
    assert torch.equal(out, x[:2, :4]) and mem.bytes_written == 32
    mem.free(a), mem.free(c)
    assert mem.resident == 0 and mem.peak == 64
    with pytest.raises(ValueError, match="already freed"):
        mem.free(a)
    with pytest.raises(ValueError, match="not a buffer"):
        mem.store(out, x[:2, :4])
    for bad in (0, -5):
        with pytest.raises(ValueError, match="capacity"):
            tl.FastMemory(bad)
    with pytest.raises(TypeError, match="capacity"):
        tl.FastMemory(2.5)


@pytest.mark.parametrize("m,n,k,tiles,dtype", [(64, 48, 40, (16, 8, 4), torch.float32),
                                               (50, 30, 21, (16, 16, 8), torch.float64),
                                               (7, 5, 3, (1, 1, 1), torch.float32)])
def test_tiled_matmul_equals_matmul_and_its_closed_form(m, n, k, tiles, dtype):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(m, k, generator=g, dtype=dtype), torch.randn(k, n, generator=g, dtype=dtype)
    s = A.element_size()
    mem = tl.FastMemory(tl.fast_bytes_needed(*tiles, s))
    C = tl.tiled_matmul(A, B, mem, *tiles)
    torch.testing.assert_close(C, A @ B)
    tm, tn, tk = tiles
    reads = s * (m * k * math.ceil(n / tn) + k * n * math.ceil(m / tm))
    assert mem.bytes_read == reads and mem.bytes_written == s * m * n
    assert mem.bytes_read + mem.bytes_written == tl.matmul_traffic(m, n, k, *tiles, s)
    assert mem.peak <= mem.capacity and mem.resident == 0


def test_matmul_traffic_by_hand():
    # 64x40 @ 40x48, tiles 16x8: A read 6 times (48/8), B 4 times (64/16), C written once
    assert tl.matmul_traffic(64, 48, 40, 16, 8, 4, 4) == 4 * (64 * 40 * 6 + 40 * 48 * 4 + 64 * 48)
    assert tl.fast_bytes_needed(16, 8, 4, 4) == 4 * (128 + 64 + 32)


def test_tile_larger_than_fast_memory_is_refused():
    A, B = torch.ones(8, 8), torch.ones(8, 8)
    with pytest.raises(ValueError, match="need 192 bytes.*capacity is 100"):
        tl.tiled_matmul(A, B, tl.FastMemory(100), 4, 4, 4)
    with pytest.raises(ValueError, match="inner sizes"):
        tl.tiled_matmul(A, torch.ones(7, 8), tl.FastMemory(1000), 2, 2, 2)
    with pytest.raises(ValueError, match="tm"):
        tl.matmul_traffic(8, 8, 8, 0, 1, 1, 4)


def test_best_tile_approaches_the_lower_bound():
    m = n = k = 256
    cap = 4 * (34 * 34 + 2 * 34)              # exactly a 34x34 C tile plus a column and a row
    tm, tn, tk = tl.best_tile(m, n, k, cap, 4)
    assert tl.fast_bytes_needed(tm, tn, tk, 4) <= cap
    best = tl.matmul_traffic(m, n, k, tm, tn, tk, 4)
    # no tile that fits does better (brute force over square and oblong tiles)
    for a in range(1, 60):
        for b in range(1, 60):
            for c in (1, 2, 4):
                if tl.fast_bytes_needed(a, b, c, 4) <= cap:
                    assert tl.matmul_traffic(m, n, k, a, b, c, 4) >= best
    ratio = best / tl.io_lower_bound(m, n, k, cap, 4)
    assert 1.0 < ratio < 1.3
    with pytest.raises(ValueError, match="cannot hold"):
        tl.best_tile(8, 8, 8, 8, 4)


def test_io_lower_bound_by_hand():
    # 2 n^3 / sqrt(M) elements: n = 1024, M = 4096 elements -> 2^31 / 64 = 2^25 elements
    assert tl.io_lower_bound(1024, 1024, 1024, 4096 * 4, 4) == pytest.approx(2**25 * 4)


@pytest.mark.parametrize("shape,causal,dtype,blocks", [
    ((2, 3, 37, 16), False, torch.float32, (8, 8)),
    ((2, 3, 37, 16), True, torch.float32, (8, 16)),
    ((1, 2, 64, 32), True, torch.float64, (16, 16)),
    ((1, 1, 50, 8), False, torch.bfloat16, (16, 4)),
])
def test_flash_attention_equals_sdpa(shape, causal, dtype, blocks):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    got = tl.flash_attention(q, k, v, causal, *blocks)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    assert got.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)


def test_flash_attention_rejects_bad_input():
    q = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="block_q"):
        tl.flash_attention(q, q, q, block_q=0)
    with pytest.raises(ValueError, match="shapes"):
        tl.flash_attention(q, torch.randn(1, 4, 7), q)
    with pytest.raises(TypeError, match="q"):
        tl.flash_attention(q.numpy(), q, q)


def test_attention_hbm_accesses_by_hand():
    # Algorithm 0: 4Nd + 4N^2
    assert tl.standard_attention_hbm_accesses(1024, 64) == 4 * 1024 * 64 + 4 * 1024**2
    # Algorithm 1, N=1024, d=64, M=49152: Bc = 192, Tc = 6
    N, d = 1024, 64
    expected = 2 * N * d + (N * d + 2 * N) + 6 * (3 * N * d + 4 * N)
    assert tl.flash_attention_hbm_accesses(N, d, 49152) == expected
    # Theorem 2: the flash count falls like 1/M while M is small against N d
    a = tl.flash_attention_hbm_accesses(8192, 64, 2**14)
    b = tl.flash_attention_hbm_accesses(8192, 64, 2**16)
    assert 3.5 < a / b < 4.1
    with pytest.raises(ValueError, match="at least 4\\*d"):
        tl.flash_attention_hbm_accesses(1024, 64, 100)
    with pytest.raises(ValueError, match="N"):
        tl.standard_attention_hbm_accesses(-1, 64)


def _fake_sysfs(root, entries):
    for i, (level, kind, size) in enumerate(entries):
        d = root / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")


def test_cache_levels_from_a_fake_sysfs(tmp_path):
    _fake_sysfs(tmp_path, [(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"),
                           (3, "Unified", "96M")])
    (tmp_path / "uevent").write_text("")
    assert tl.cache_levels(str(tmp_path)) == {"L1": 48 * 1024, "L2": 2 * 2**20, "L3": 96 * 2**20}
    assert tl.cache_levels(str(tmp_path / "missing")) == {}


def test_plateaus_group_by_level():
    levels = {"L1": 32 * 1024, "L2": 1 << 20}
    sweep = [(16 * 1024, 100.0), (32 * 1024, 90.0), (64 * 1024, 50.0), (512 * 1024, 40.0),
             (1 << 20, 45.0), (4 << 20, 10.0), (8 << 20, 12.0)]
    assert tl.plateaus(sweep, levels) == {"L1": 95.0, "L2": 45.0, "DRAM": 11.0}
    with pytest.raises(ValueError, match="bandwidth"):
        tl.plateaus([(1024, float("nan"))], levels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_sweep_shows_l2_above_hbm():
    from utils import bench, hardware

    l2 = 40 * 2**20                          # at least the L2 of the GPUs in the registry
    sweep = bench.cache_sweep([l2 // 8, l2 // 4, 2**30, 2**31], device="cuda")
    small = max(bw for w, bw in sweep if w <= l2 // 4)
    big = min(bw for w, bw in sweep if w >= 2**30)
    assert small > big                        # working sets in L2 copy faster than HBM
    name = torch.cuda.get_device_name(0)
    known = [g for g in hardware.GPUS.values() if g.name.split("-")[0] in name]
    if known:
        assert big < known[0].memory_bandwidth  # nobody beats the datasheet
