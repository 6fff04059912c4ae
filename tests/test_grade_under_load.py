"""Grading the measurement-heavy solutions while the machine is busy passes every exercise.

A classroom's laptops are busy: a correct answer must never fail because another
program was running. Every lab that measures this machine (cache and STREAM sweeps,
its roof, memory latency and data loaders, copies, a slow-rank hunt, a collective sweep,
shard reads and checkpoint stalls, a torchrun restart, a decode sweep, speculative
decoding's speedup, compiled graphs, GGUF decoding) is graded while one spinning process
per core competes with it: every exercise must pass on its logic. Disagreeing measurements
may show as warnings; they are reported, not scored.

Slow (minutes), so it is marked ``load`` and runs on request: ``pytest -m load``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from utils import grade

ROOT = Path(__file__).resolve().parents[1]


def _spin():
    while True:
        pass


@pytest.fixture
def busy_machine():
    ctx = mp.get_context("spawn")
    spinners = [ctx.Process(target=_spin, daemon=True) for _ in range(os.cpu_count() or 2)]
    for p in spinners:
        p.start()
    yield len(spinners)
    for p in spinners:
        p.kill()
        p.join(5)


@pytest.mark.load
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", ["01_memory_hierarchy", "02_hbm_gddr", "03_roofline",
                                  "04_cpu_memory_numa", "06_pcie_nvlink", "08_cluster_networking",
                                  "09_collectives", "10_storage_io", "15_fault_tolerance",
                                  "16_inference_hardware", "19_speculative_decoding",
                                  "21_compilation", "22_edge_inference"])
def test_a_busy_machine_does_not_fail_a_correct_answer(name, busy_machine):
    report = grade.grade(ROOT / "solutions" / f"{name}.ipynb", timeout=600, total_timeout=1100)
    print(grade.format_report(report))
    failed = [(r["exercise"], r["status"], r["message"][:300]) for r in report["exercises"]
              if r["status"] not in grade.PASSING]
    assert not failed, failed
