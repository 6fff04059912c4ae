"""Korthikanti et al.'s price of selective recomputation (Section 5) against the course's formulas.

The paper quotes 2.7% extra FLOPs for GPT-3 and 1.6% for MT-NLG. Those are the recomputed
attention matmuls as a share of one forward pass, s / (6h + s); the course's
``recompute_overhead`` divides the same FLOPs by a whole training step, s / (18h + 3s).
"""
from __future__ import annotations

import pytest

from utils import models
from utils import recompute as rc

K22 = rc.PUBLISHED["korthikanti2022"]


@pytest.mark.parametrize("name", sorted(K22["selective_extra_flops"]))
def test_paper_figure_is_the_share_of_one_forward(name):
    p = K22["selective_extra_flops"][name]
    s, h = p["seq_len"], p["hidden"]
    recomputed = 4 * s * s * h                          # QK^T and (probabilities)V, batch 1
    share = recomputed / rc.layer_forward_flops(s, 1, h)
    assert share == pytest.approx(s / (6 * h + s), rel=1e-12)
    assert round(share, 3) == p["fraction"]             # the paper's one decimal, in percent


@pytest.mark.parametrize("name", sorted(K22["selective_extra_flops"]))
def test_course_overhead_is_a_third_of_it_and_not_the_paper_figure(name):
    p = K22["selective_extra_flops"][name]
    s, h = p["seq_len"], p["hidden"]
    step = rc.recompute_overhead(s, h, "selective")
    assert step == pytest.approx(s / (6 * h + s) / 3, rel=1e-12)
    assert abs(step - p["fraction"]) > 0.005            # would catch quoting one as the other


def test_gpt3_shape_matches_the_model_registry():
    p = K22["selective_extra_flops"]["gpt3-175b"]
    assert p["hidden"] == models.get("gpt3-175b").hidden == 12288
    assert "Section 5" in K22["selective_extra_flops_source"]
