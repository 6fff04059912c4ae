"""utils.parallelism: communication volumes, bubbles, schedules, buckets and the counter.

Expected values are written out by hand from the papers' formulas (or, for the schedules,
traced slot by slot), never by calling the code under test a second time.
"""
import math

import pytest
import torch
import torch.distributed as dist

from utils import models
from utils import parallelism as par


# ---------------------------------------------------------------------------- volumes
def test_collective_bytes_ring_factors():
    assert par.collective_bytes("all_reduce", 1000, 4) == 1500          # 2 * 3/4
    assert par.collective_bytes("reduce_scatter", 1000, 4) == 750
    assert par.collective_bytes("all_gather", 1000, 4) == 750
    assert par.collective_bytes("broadcast", 1000, 4) == 1000
    assert par.collective_bytes("send", 1000, 4) == 1000
    assert par.collective_bytes("all_reduce", 1000, 1) == 0
    assert par.collective_bytes("send", 1000, 1) == 1000
    assert par.collective_bytes("all_reduce", 900, 3) == pytest.approx(1200)


@pytest.mark.parametrize("args", [("all_to_all", 10, 2), ("all_reduce", -1, 2),
                                  ("all_reduce", 10, 0), ("all_reduce", 10, 2.5)])
def test_collective_bytes_rejects_bad_input(args):
    with pytest.raises((ValueError, TypeError)):
        par.collective_bytes(*args)


def test_dp_bytes():
    assert par.dp_bytes_per_step(1000, 4, bytes_per_grad=2) == 3000      # 2 * 3/4 * 2000
    assert par.dp_bytes_per_step(1000, 1) == 0
    # Llama-2-7B: 6,738,415,616 parameters (Touvron et al. 2023), bf16 over 64 ranks
    assert par.dp_bytes_per_step("llama2-7b", 64) == pytest.approx(2 * 63 / 64 * 6_738_415_616 * 2)


def test_tp_bytes_per_layer_megatron_and_sequence_parallel():
    assert par.tp_collectives_per_layer() == {"all_reduce": 4}
    assert par.tp_collectives_per_layer(True) == {"reduce_scatter": 4, "all_gather": 4}
    # 4 all-reduces x 2 * 7/8 x 4096 * 8192 x 2 bytes = 7 x 67,108,864
    assert par.tp_bytes_per_layer(4096, 8192, 8) == 469_762_048
    assert par.tp_bytes_per_layer(4096, 8192, 8, sequence_parallel=True) == 469_762_048
    assert par.tp_bytes_per_layer(10, 10, 1) == 0


def test_pp_bytes():
    assert par.pp_bytes_per_microbatch(4096, 8192) == 67_108_864
    assert par.pp_bytes_per_microbatch(4096, 8192, tp=8, scatter_gather=True) == 8_388_608
    assert par.pp_bytes_per_microbatch(4096, 8192, tp=8) == 67_108_864


def test_comm_per_step_adds_the_three_parts():
    m = models.get("llama2-7b").with_(name="toy", n_layers=4, hidden=16, n_heads=4, n_kv_heads=4,
                                      ffn_hidden=32, vocab=100)
    psi = m.param_count()
    got = par.comm_per_step(m, seq_len=8, micro_batch=2, n_micro=3, tp=2, pp=4, dp=5,
                            scatter_gather=False)
    # TP: 3 micro-batches x 1 layer per stage x 4 all-reduces x 2*(1/2) x 16 tokens * 16 * 2 B
    assert got.tp == 3 * 1 * 4 * 1 * 16 * 16 * 2
    # PP, middle stage: both directions, 3 micro-batches of 16 tokens * 16 * 2 bytes
    assert got.pp == 2 * 3 * 16 * 16 * 2
    # DP: the GPU's 1/8 share of the parameters, ring all-reduce over 5
    share = math.ceil(psi / 8)
    assert got.dp == pytest.approx(2 * 4 / 5 * share * 2)
    assert got.total == pytest.approx(got.tp + got.pp + got.dp)
    two = par.comm_per_step(m, 8, 2, 3, tp=2, pp=2, dp=1, scatter_gather=True)
    assert two.pp == 3 * 16 * 16 * 2 / 2 and two.dp == 0
    fsdp = par.comm_per_step(m, 8, 2, 3, dp=4, zero_stage=3)
    assert fsdp.dp == pytest.approx(3 * 3 / 4 * psi * 2)                  # 1.5x DDP's
    with pytest.raises(ValueError):
        par.comm_per_step(m, 8, 2, 3, pp=5)


def test_dgx_h100_bandwidths():
    assert par.DGX_H100.intra_bandwidth == 450e9      # NVLink 4, per direction
    assert par.DGX_H100.inter_bandwidth == 50e9       # one 400 Gb/s NDR port per GPU


def test_ddp_defaults_match_pytorch():
    from torch.nn.parallel import distributed as ddp_module
    if hasattr(ddp_module, "_DEFAULT_BUCKET_CAP_MB"):
        assert ddp_module._DEFAULT_BUCKET_CAP_MB == par.DDP_BUCKET_CAP_MB == 25
    if hasattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES"):
        assert dist._DEFAULT_FIRST_BUCKET_BYTES == par.DDP_FIRST_BUCKET_BYTES == 2**20


# ---------------------------------------------------------------------------- bubbles
def test_bubble_fraction_conventions():
    assert par.bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert par.bubble_fraction(4, 8, relative_to="compute") == pytest.approx(3 / 8)
    assert par.bubble_fraction(4, 8, v=2) == pytest.approx(3 / 19)
    assert par.bubble_fraction(4, 8, v=2, relative_to="compute") == pytest.approx(3 / 16)
    assert par.bubble_fraction(1, 5) == 0
    assert par.bubble_fraction(8, 1, relative_to="compute") == 7          # can exceed 1
    with pytest.raises(ValueError):
        par.bubble_fraction(4, 8, relative_to="ideal")
    with pytest.raises(ValueError):
        par.bubble_fraction(0, 8)


# ---------------------------------------------------------------------------- schedules
def test_orders_by_hand():
    assert par.pipeline_orders("gpipe", 2, 2) == [[("F", 0), ("F", 1), ("B", 0), ("B", 1)]] * 2
    assert par.pipeline_orders("1f1b", 3, 4) == [
        [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1), ("B", 2), ("B", 3)],
        [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2), ("B", 3)],
        [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("F", 3), ("B", 3)]]
    # m < p: the warm-up is cut to m
    assert par.pipeline_orders("1f1b", 4, 1)[0] == [("F", 0), ("B", 0)]
    # interleaved, p=2, m=2, v=2: device 0 warms up with (2-0-1)*2 + (2-1)*2 = 4 forwards
    # (all of them), device 1 with 2; forwards run chunk 0 for micro-batches 0, 1, then
    # chunk 1; backwards the chunks in reverse
    assert par.pipeline_orders("interleaved", 2, 2, 2) == [
        [("F", 0, 0), ("F", 1, 0), ("F", 0, 1), ("F", 1, 1),
         ("B", 0, 1), ("B", 1, 1), ("B", 0, 0), ("B", 1, 0)],
        [("F", 0, 0), ("F", 1, 0), ("F", 0, 1), ("B", 0, 1), ("F", 1, 1), ("B", 1, 1),
         ("B", 0, 0), ("B", 1, 0)]]
    with pytest.raises(ValueError):
        par.pipeline_orders("interleaved", 4, 6, 2)                          # m % p != 0
    with pytest.raises(ValueError):
        par.pipeline_orders("zigzag", 2, 2)


def test_assign_slots_traced_by_hand():
    # 1F1B, p=2, m=2. Stage 1: F0 after F(0,0) ends at 1; B0 at 2; F1 after F(0,1) (ends 2)
    # and the stage (free at 3); B1 at 4. Stage 0: F0 0, F1 1, B0 after B(1,0) ends 3,
    # B1 after B(1,1) ends 5.
    assert par.schedule("1f1b", 2, 2) == [
        [(0, "F", 0), (1, "F", 1), (3, "B", 0), (5, "B", 1)],
        [(1, "F", 0), (2, "B", 0), (3, "F", 1), (4, "B", 1)]]
    # backward twice as long as forward, GPipe p=2, m=1: F 0-1, F 1-2, B 2-4, B 4-6
    assert par.schedule("gpipe", 2, 1, backward_slots=2) == [[(0, "F", 0), (4, "B", 0)],
                                                            [(1, "F", 0), (2, "B", 0)]]


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(1, 1), (2, 3), (4, 8), (4, 2), (8, 3), (5, 16)])
def test_makespan_and_bubble_match_the_formulas(kind, p, m):
    sched = par.schedule(kind, p, m)
    end = max(o[0] + 1 for row in sched for o in row)
    assert end == 2 * (m + p - 1)
    assert par.idle_fraction(sched) == pytest.approx((p - 1) / (m + p - 1))
    slow = par.schedule(kind, p, m, backward_slots=2)
    assert max(o[0] + (1 if o[1] == "F" else 2) for row in slow for o in row) == 3 * (m + p - 1)


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 4, 3), (4, 8, 4)])
def test_interleaved_bubble_is_divided_by_v(p, m, v):
    sched = par.schedule("interleaved", p, m, v)
    end = max(o[0] + 1 for row in sched for o in row)          # slots of one chunk each
    assert end == 2 * (m * v + p - 1)
    assert par.idle_fraction(sched) == pytest.approx((p - 1) / (v * m + p - 1))


def test_1f1b_holds_fewer_microbatches():
    def peak(row):
        live = best = 0
        for o in row:
            live += 1 if o[1] == "F" else -1
            best = max(best, live)
        return best
    assert [peak(r) for r in par.schedule("1f1b", 4, 8)] == [4, 3, 2, 1]
    assert [peak(r) for r in par.schedule("gpipe", 4, 8)] == [8, 8, 8, 8]


def test_deadlock_and_bad_orders_are_reported():
    with pytest.raises(ValueError, match="deadlock"):
        par.assign_slots([[("B", 0), ("F", 0)], [("F", 0), ("B", 0)]])
    with pytest.raises(ValueError):
        par.assign_slots([[("X", 0)]])
    with pytest.raises(ValueError):
        par.assign_slots([[("F", 0), ("F", 0)]])


def test_plot_timeline_draws():
    import matplotlib
    matplotlib.use("Agg")
    ax = par.plot_timeline(par.schedule("interleaved", 2, 2, 2), title="t")
    assert ax.get_title() == "t" and len(ax.collections) == 2 * 2 * 2 * 2


# ---------------------------------------------------------------------------- buckets
def test_bucket_assignment_by_hand():
    assert par.bucket_assignment([100, 200, 300], 250) == [[0, 1], [2]]
    assert par.bucket_assignment([100, 200, 300], 300) == [[0, 1], [2]]
    assert par.bucket_assignment([100, 200, 300], 301) == [[0, 1, 2]]
    assert par.bucket_assignment([400, 16, 16], 32) == [[0], [1, 2]]
    assert par.bucket_assignment([], 10) == []
    with pytest.raises(ValueError):
        par.bucket_assignment([1], 0)


def test_bucket_assignment_matches_pytorch():
    compute = getattr(dist, "_compute_bucket_assignment_by_size", None)
    if compute is None:
        pytest.skip("this PyTorch has no _compute_bucket_assignment_by_size")
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        sizes = torch.randint(1, 50, (n,), generator=gen).tolist()
        cap = int(torch.randint(1, 300, (1,), generator=gen))
        theirs, _ = compute([torch.empty(s) for s in sizes], [cap])
        assert [list(b) for b in theirs] == par.bucket_assignment([4 * s for s in sizes], cap)
