"""The lab-01 checkers pass right answers, catch planted bugs and refuse the library's own.

Right answers are the library's (utils.tiling), with refusal switched off for the length
of a test; each planted bug is a small function with one mistake a learner could make.
"""
import math
import statistics

import pytest
import torch

from utils import bench
from utils import tiling as tl
from utils.checks import ExerciseFailed, LibraryAnswer, allow_library_answers
from utils.checks import ch01 as check

pytestmark = pytest.mark.usefixtures("one_thread")


def both_counts(N, d, M):
    return tl.standard_attention_hbm_accesses(N, d), tl.flash_attention_hbm_accesses(N, d, M)


def test_right_answers_pass(capsys):
    with allow_library_answers():
        check.tiled_matmul(tl.tiled_matmul)
        check.best_tile(tl.best_tile)
        check.flash_attention(tl.flash_attention)
        check.attention_hbm_accesses(both_counts)
        check.cache_levels(tl.cache_levels)
        check.plateaus(tl.plateaus)
    assert capsys.readouterr().out.count("passed") == 6


@pytest.mark.parametrize("name, reference", [
    ("tiled_matmul", tl.tiled_matmul), ("best_tile", tl.best_tile),
    ("flash_attention", tl.flash_attention), ("cache_levels", tl.cache_levels),
    ("plateaus", tl.plateaus), ("measure_sweep", bench.cache_sweep)])
def test_library_reference_is_refused(name, reference):
    with pytest.raises(LibraryAnswer):
        getattr(check, name)(reference)


# -- exercise 1: tiled matmul ------------------------------------------------------------
def _guard(A, B, mem, tm, tn, tk):
    if (tm * tn + tm * tk + tk * tn) * A.element_size() > mem.capacity:
        raise ValueError("tiles do not fit")
    if A.shape[1] != B.shape[0]:
        raise ValueError("inner sizes differ")


def matmul_without_memory(A, B, mem, tm, tn, tk):
    _guard(A, B, mem, tm, tn, tk)
    return A @ B                                      # right result, no traffic at all


def matmul_reloads_c(A, B, mem, tm, tn, tk):
    """Loads the C tile from slow memory for every k step: too many bytes."""
    _guard(A, B, mem, tm, tn, tk)
    m, k = A.shape
    n = B.shape[1]
    C = torch.zeros(m, n, dtype=A.dtype)
    for i in range(0, m, tm):
        for j in range(0, n, tn):
            for p in range(0, k, tk):
                c = mem.load(C[i:i + tm, j:j + tn])
                a, b = mem.load(A[i:i + tm, p:p + tk]), mem.load(B[p:p + tk, j:j + tn])
                c += a @ b
                mem.store(C[i:i + tm, j:j + tn], c)
                for t in (a, b, c):
                    mem.free(t)
    return C


def matmul_drops_edges(A, B, mem, tm, tn, tk):
    """Stops at the last full tile: wrong when sizes are not multiples of the tile."""
    _guard(A, B, mem, tm, tn, tk)
    m, k = A.shape
    n = B.shape[1]
    C = torch.zeros(m, n, dtype=A.dtype)
    for i in range(0, m - tm + 1, tm):
        for j in range(0, n - tn + 1, tn):
            c = mem.alloc((tm, tn), A.dtype)
            for p in range(0, k - tk + 1, tk):
                a, b = mem.load(A[i:i + tm, p:p + tk]), mem.load(B[p:p + tk, j:j + tn])
                c += a @ b
                mem.free(a), mem.free(b)
            mem.store(C[i:i + tm, j:j + tn], c)
            mem.free(c)
    return C


def matmul_leaks(A, B, mem, tm, tn, tk):
    """Never frees the A tiles: the fast memory overflows."""
    _guard(A, B, mem, tm, tn, tk)
    m, k = A.shape
    n = B.shape[1]
    C = torch.empty(m, n, dtype=A.dtype)
    for i in range(0, m, tm):
        for j in range(0, n, tn):
            c = mem.alloc((min(tm, m - i), min(tn, n - j)), A.dtype)
            for p in range(0, k, tk):
                a, b = mem.load(A[i:i + tm, p:p + tk]), mem.load(B[p:p + tk, j:j + tn])
                c += a @ b
                mem.free(b)
            mem.store(C[i:i + tm, j:j + tn], c)
            mem.free(c)
    return C


def matmul_no_capacity_check(A, B, mem, tm, tn, tk):
    if A.shape[1] != B.shape[0]:
        raise ValueError("inner sizes differ")
    mem.capacity = 10**9                              # "fixes" the capacity instead of refusing
    return _plain(A, B, mem, tm, tn, tk)


def _plain(A, B, mem, tm, tn, tk):
    m, k = A.shape
    n = B.shape[1]
    C = torch.empty(m, n, dtype=A.dtype)
    for i in range(0, m, tm):
        for j in range(0, n, tn):
            c = mem.alloc((min(tm, m - i), min(tn, n - j)), A.dtype)
            for p in range(0, k, tk):
                a, b = mem.load(A[i:i + tm, p:p + tk]), mem.load(B[p:p + tk, j:j + tn])
                c += a @ b
                mem.free(a), mem.free(b)
            mem.store(C[i:i + tm, j:j + tn], c)
            mem.free(c)
    return C


@pytest.mark.parametrize("fn, match", [
    (matmul_without_memory, "read the wrong number of bytes"),
    (matmul_reloads_c, "read the wrong number of bytes"),
    (matmul_drops_edges, "wrong values"),
    (matmul_leaks, "overflowed the fast memory"),
    (matmul_no_capacity_check, "100-byte fast memory"),
])
def test_tiled_matmul_bugs_are_caught(fn, match):
    with pytest.raises(ExerciseFailed, match=match):
        check.tiled_matmul(fn)


def test_a_plain_correct_loop_passes(capsys):
    def mine(A, B, mem, tm, tn, tk):
        _guard(A, B, mem, tm, tn, tk)
        return _plain(A, B, mem, tm, tn, tk)
    check.tiled_matmul(mine)
    assert "passed" in capsys.readouterr().out


# -- exercise 2: best tile ----------------------------------------------------------------
def square_tile(m, n, k, capacity, itemsize):
    """The textbook answer 3T^2 <= M: square tiles of all three, a factor sqrt(3) off."""
    if 3 * itemsize > capacity:
        raise ValueError("too small")
    t = max(1, math.isqrt(capacity // (3 * itemsize)))
    return min(t, m), min(t, n), min(t, k)


def too_big_tile(m, n, k, capacity, itemsize):
    if 3 * itemsize > capacity:
        raise ValueError("too small")
    t = max(1, math.isqrt(capacity // itemsize))       # forgets the A and B tiles
    return min(t, m), min(t, n), 1


def best_tile_no_check(m, n, k, capacity, itemsize):
    return tl.best_tile(m, n, k, max(capacity, 3 * itemsize), itemsize)


@pytest.mark.parametrize("fn, match", [(square_tile, "not the best tile"),
                                       (too_big_tile, "does not fit"),
                                       (best_tile_no_check, "capacity=8")])
def test_best_tile_bugs_are_caught(fn, match):
    with allow_library_answers(), pytest.raises(ExerciseFailed, match=match):
        check.best_tile(fn)


# -- exercise 3: FlashAttention -------------------------------------------------------------
def _checked(fn):
    def wrapper(q, k, v, causal=False, block_q=64, block_k=64):
        if block_q < 1 or block_k < 1:
            raise ValueError("block_q and block_k must be positive")
        if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[:-2] != k.shape[:-2]:
            raise ValueError("shapes")
        return fn(q, k, v, causal, block_q, block_k)
    return wrapper


@_checked
def attention_without_max(q, k, v, causal, bq, bk):
    """Online softmax without the running maximum: exp overflows on a peaked row."""
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), -math.inf)
    p = torch.exp(s)
    return ((p @ v.float()) / p.sum(-1, keepdim=True)).to(q.dtype)


@_checked
def attention_ignores_causal(q, k, v, causal, bq, bk):
    return tl.flash_attention(q, k, v, False, bq, bk)


@_checked
def attention_no_rescale(q, k, v, causal, bq, bk):
    """Forgets to rescale the running output when the maximum grows."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    N, d = q.shape[-2], q.shape[-1]
    out = torch.empty(q.shape, dtype=q.dtype)
    for i in range(0, N, bq):
        qi = q[..., i:i + bq, :].to(acc) / math.sqrt(d)
        m = torch.full(qi.shape[:-1], -math.inf, dtype=acc)
        l = torch.zeros(qi.shape[:-1], dtype=acc)
        o = torch.zeros(qi.shape, dtype=acc)
        for j in range(0, k.shape[-2], bk):
            s = qi @ k[..., j:j + bk, :].to(acc).transpose(-1, -2)
            if causal:
                s = s.masked_fill(torch.arange(j, j + s.shape[-1]) > torch.arange(i, i + s.shape[-2])
                                  .unsqueeze(-1), -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            p = torch.exp(s - m_new.unsqueeze(-1))
            l = torch.exp(m - m_new) * l + p.sum(-1)
            o = o + p @ v[..., j:j + bk, :].to(acc)          # missing exp(m - m_new) * o
            m = m_new
        out[..., i:i + bq, :] = (o / l.unsqueeze(-1)).to(q.dtype)
    return out


@_checked
def attention_returns_float32(q, k, v, causal, bq, bk):
    return tl.flash_attention(q.float(), k.float(), v.float(), causal, bq, bk)


def attention_no_validation(q, k, v, causal=False, block_q=64, block_k=64):
    return tl.flash_attention(q, k, v, causal, max(block_q, 1), max(block_k, 1))


@pytest.mark.parametrize("fn, match", [(attention_without_max, "wrong values|not a finite"),
                                       (attention_ignores_causal, "causal=True"),
                                       (attention_no_rescale, "wrong values"),
                                       (attention_returns_float32, "dtype"),
                                       (attention_no_validation, "block_q=0")])
def test_flash_attention_bugs_are_caught(fn, match):
    with allow_library_answers(), pytest.raises(ExerciseFailed, match=match):
        check.flash_attention(fn)


# -- exercise 4: HBM accesses -----------------------------------------------------------------
def counts_forget_p(N, d, M):
    """Standard attention that writes S but forgets P's round trip."""
    s, f = both_counts(N, d, M)
    return s - 2 * N * N, f


def counts_no_init(N, d, M):
    """FlashAttention without step 2's initialisation of O, l, m."""
    s, f = both_counts(N, d, M)
    return s, f - (N * d + 2 * N)


def counts_floor(N, d, M):
    """Bc by floor instead of ceil: off whenever 4d does not divide M."""
    s = tl.standard_attention_hbm_accesses(N, d)
    Bc = M // (4 * d)
    Tc = -(-N // Bc)
    return s, 2 * N * d + (N * d + 2 * N) + Tc * (3 * N * d + 4 * N)


def counts_no_validation(N, d, M):
    return tl.standard_attention_hbm_accesses(N, d), \
        tl.flash_attention_hbm_accesses(N, d, max(M, 4 * d))


@pytest.mark.parametrize("fn, match", [(counts_forget_p, "standard attention"),
                                       (counts_no_init, "FlashAttention's count"),
                                       (counts_floor, "FlashAttention's count"),
                                       (counts_no_validation, "M=100")])
def test_attention_count_bugs_are_caught(fn, match):
    with allow_library_answers(), pytest.raises(ExerciseFailed, match=match):
        check.attention_hbm_accesses(fn)


def test_counts_hand_numbers():
    # N=1024, d=64: standard 4Nd + 4N^2; flash with M=49152: Bc=192, Tc=6
    N, d = 1024, 64
    assert check._standard(N, d) == 4 * N * d + 4 * N * N
    assert check._flash(N, d, 49152) == 2 * N * d + N * d + 2 * N + 6 * (3 * N * d + 4 * N)


# -- exercise 5: cache levels ---------------------------------------------------------------
def levels_keeps_instruction(root):
    out = {}
    for entry in sorted(__import__("os").listdir(root)):
        if entry.startswith("index"):
            base = f"{root}/{entry}"
            level = int(open(f"{base}/level").read())
            out[f"L{level}"] = tl._parse_size(open(f"{base}/size").read())   # last one wins
    return dict(sorted(out.items()))


def levels_decimal_k(root):
    return {k: v // 1024 * 1000 for k, v in tl.cache_levels(root).items()}


@pytest.mark.parametrize("fn, match", [(levels_keeps_instruction, "cache_levels"),
                                       (levels_decimal_k, "cache_levels")])
def test_cache_level_bugs_are_caught(fn, match):
    with allow_library_answers(), pytest.raises(ExerciseFailed, match=match):
        check.cache_levels(fn)


# -- exercise 6: plateaus -------------------------------------------------------------------
def plateaus_mean(sweep, levels):
    caps = sorted(levels.items(), key=lambda kv: kv[1])
    groups = {}
    for w, bw in sweep:
        if not bw > 0:
            raise ValueError("bandwidth")
        groups.setdefault(next((lv for lv, c in caps if w <= c), "DRAM"), []).append(bw)
    return {lv: statistics.mean(groups[lv]) for lv in [c[0] for c in caps] + ["DRAM"] if lv in groups}


def plateaus_strict(sweep, levels):
    caps = sorted(levels.items(), key=lambda kv: kv[1])
    groups = {}
    for w, bw in sweep:
        if not bw > 0:
            raise ValueError("bandwidth")
        groups.setdefault(next((lv for lv, c in caps if w < c), "DRAM"), []).append(bw)
    return {lv: statistics.median(groups[lv]) for lv in [c[0] for c in caps] + ["DRAM"] if lv in groups}


def plateaus_no_validation(sweep, levels):
    return tl.plateaus([(w, abs(bw)) for w, bw in sweep], levels)


@pytest.mark.parametrize("fn, match", [(plateaus_mean, "median bandwidth"),
                                       (plateaus_strict, "median bandwidth per level"),
                                       (plateaus_no_validation, "negative bandwidth")])
def test_plateau_bugs_are_caught(fn, match):
    with allow_library_answers(), pytest.raises(ExerciseFailed, match=match):
        check.plateaus(fn)


# -- measurement ----------------------------------------------------------------------------
def test_measure_sweep_logic_fails_but_measurement_only_warns(capsys, monkeypatch):
    monkeypatch.setattr(check.bench, "cache_sweep", lambda sizes: [(s, 10e9) for s in sizes])
    check.measure_sweep(lambda sizes: [(s, 20e9 if s < 2**20 else 10e9) for s in sizes])
    out = capsys.readouterr().out
    assert "passed" in out and "⚠" not in out
    # a sweep 4x slower than utils.bench, and no cache step: two warnings, still passed
    check.measure_sweep(lambda sizes: [(s, 2.5e9) for s in sizes])
    out = capsys.readouterr().out
    assert "passed" in out and out.count("⚠") == 2
    with pytest.raises(ExerciseFailed, match="number of points"):
        check.measure_sweep(lambda sizes: [(sizes[0], 1e9)])
    with pytest.raises(ExerciseFailed, match="positive"):
        check.measure_sweep(lambda sizes: [(s, float("nan")) for s in sizes])
