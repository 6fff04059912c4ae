"""Record the allocation trace of chapter 05 and write utils/data/alloc_trace_ch05.json.

    python scripts/record_alloc_trace.py          # writes the file
    python scripts/record_alloc_trace.py --check  # records again, compares with the file

A small transformer encoder (2 layers, d_model 256, 4 heads, feed-forward 1024, a batch of
16 sequences of 128 tokens) takes three AdamW training steps on the CPU under the PyTorch
profiler with ``profile_memory=True``. Every call of PyTorch's CPU allocator is one event
of the profiler's event tree (kind ``Allocation``: an address and a size, negative for a
free). The events, in time order, become ``('a', id, nbytes)`` and ``('f', id, nbytes)``
with ids numbered by allocation; an address freed and reused later gets a new id. The
tensors that exist before the first step (parameters, the batch) are allocations at the
start. On one thread the trace is the same from run to run on a given PyTorch build.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch._C._profiler import _EventType

OUT = Path(__file__).resolve().parents[1] / "utils" / "data" / "alloc_trace_ch05.json"
CONFIG = {"layers": 2, "d_model": 256, "heads": 4, "ffn": 1024, "batch": 16, "seq": 128,
          "steps": 3, "optimizer": "AdamW", "seed": 0}


def record() -> list:
    torch.set_num_threads(1)
    torch.manual_seed(CONFIG["seed"])
    c = CONFIG
    layer = torch.nn.TransformerEncoderLayer(c["d_model"], c["heads"], c["ffn"], dropout=0.0,
                                             batch_first=True)
    model = torch.nn.TransformerEncoder(layer, c["layers"], enable_nested_tensor=False)
    head = torch.nn.Linear(c["d_model"], c["d_model"])
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    x = torch.randn(c["batch"], c["seq"], c["d_model"])
    y = torch.randn(c["batch"], c["seq"], c["d_model"])
    start = [t.untyped_storage().nbytes() for t in params + [x, y]]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        for _ in range(c["steps"]):
            loss = torch.nn.functional.mse_loss(head(model(x)), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
    raw = []

    def walk(e):
        if e.tag == _EventType.Allocation:
            raw.append((e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size))
        for ch in e.children:
            walk(ch)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    raw.sort(key=lambda r: r[0])
    events, live, nid = [], {}, 0
    for n in start:
        events.append(["a", nid, n])
        nid += 1
    for _, ptr, size in raw:
        if size > 0:
            live[ptr] = (nid, size)
            events.append(["a", nid, size])
            nid += 1
        elif ptr in live:                 # frees of memory allocated before recording: skip
            ident, n = live.pop(ptr)
            events.append(["f", ident, n])
    return events


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    events = record()
    doc = {"source": "scripts/record_alloc_trace.py", "torch": torch.__version__,
           "config": CONFIG, "events": events}
    if args.check:
        old = json.loads(OUT.read_text())["events"]
        same = old == events
        print(f"{len(events)} events; same as the shipped file: {same}")
        return 0 if same else 1
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(events)} events)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
