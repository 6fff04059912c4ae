"""A worker under ``torchrun --max-restarts`` crashes once and finishes on its own (chapter 15).

The elastic agent restarts every worker of the job when one fails; the workers resume from
their last checkpoint (``utils.reliability.save_checkpoint``). The losses of the run that
crashed once must be bit-identical to those of a run that never crashed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    from utils import reliability

    ckpt_dir, crash_at, n_steps, every = sys.argv[1], int(sys.argv[2]), 12, 4
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # the agent's store outlives a restart, with the old round's gloo addresses in it: each
    # attempt rendezvous under its own prefix, or the restarted ranks dial dead ports
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt{attempt}", store),
                            rank=rank, world_size=world)
    path = os.path.join(ckpt_dir, f"rank{rank}.ckpt")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start, losses = 0, []
    if os.path.exists(path):
        state = reliability.load_checkpoint(path)
        model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"])
        reliability.set_rng_state(state["rng"])
        start, losses = state["step"], state["losses"].tolist()
    for step in range(start, n_steps):
        if attempt == 0 and rank == 1 and step == crash_at:
            os._exit(3)                                   # a crash: no cleanup, no goodbye
        x = torch.randn(16, 8)
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        opt.zero_grad(); loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad); p.grad /= world
        opt.step()
        losses.append(loss.item())
        if (step + 1) % every == 0:
            reliability.save_checkpoint(path, {"model": model.state_dict(), "opt": opt.state_dict(),
                                               "rng": reliability.rng_state(), "step": step + 1,
                                               "losses": torch.tensor(losses, dtype=torch.float64)})
    with open(os.path.join(ckpt_dir, f"done{rank}.json"), "w") as f:
        json.dump({"losses": losses, "attempt": attempt}, f)
    dist.destroy_process_group()
''')


def _torchrun(tmp_path, name, crash_at):
    folder = tmp_path / name
    folder.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    cmd = [torchrun, "--max-restarts=1", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           str(script), str(folder), str(crash_at)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [json.loads((folder / f"done{r}.json").read_text()) for r in range(2)]


@pytest.mark.timeout(600)
def test_a_crash_under_torchrun_max_restarts_resumes_bit_identically(tmp_path):
    clean = _torchrun(tmp_path, "clean", crash_at=-1)
    crashed = _torchrun(tmp_path, "crashed", crash_at=6)
    assert [r["attempt"] for r in clean] == [0, 0]
    assert [r["attempt"] for r in crashed] == [1, 1]        # the agent restarted both workers
    assert len(clean[0]["losses"]) == 12
    for r in range(2):
        assert crashed[r]["losses"] == clean[r]["losses"]   # bit-identical, step for step
