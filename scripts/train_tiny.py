"""Train the tiny model family from scratch and write the shipped weights.

    python scripts/train_tiny.py            # all three models: about 20 minutes on one CPU thread
    python scripts/train_tiny.py --only tiny-target-xl    # one model (the others are loaded)
    python scripts/train_tiny.py --quick    # a smoke test: 20 steps each, nothing written

Both models learn the toy language of ``utils.tiny_corpus`` (training text from
``TRAIN_SEED``) with AdamW and fixed seeds, on one thread by default (two threads are
slower on a CPU shared with other work). With the same thread count and PyTorch build
the written weights are identical from run to run. The script then reports, on held-out
text (``HELDOUT_SEED``), each model's loss and perplexity, how often the draft's greedy
token equals the target's, and the speculative-sampling acceptance rate
alpha = E[sum_x min(p_target(x), p_draft(x))] at temperature 1, for the draft against each
target. ``tiny-target-xl`` is the deep target of chapter 19: sixteen layers as narrow as the
draft's one, so that a decode step costs about sixteen draft steps on a CPU (at this size a
layer's cost is mostly its fixed per-call work, not its arithmetic). Everything is measured
on the float16 weights that are written, since those are what ``utils.tiny.load``
returns; the numbers are stored in each file's metadata (``utils.tiny.metadata``).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from utils import tiny, tiny_corpus

CONFIGS = {
    "tiny-target": tiny.TinyConfig(vocab=len(tiny_corpus.ALPHABET), n_layers=4, d_model=128,
                                   n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=256),
    # one layer: no induction head, so it cannot copy a name back as well as the target
    "tiny-draft": tiny.TinyConfig(vocab=len(tiny_corpus.ALPHABET), n_layers=1, d_model=64,
                                  n_heads=2, n_kv_heads=1, d_ff=192, max_seq_len=256),
    # the draft's width, sixteen times its depth: the speculative-decoding target of chapter 19
    "tiny-target-xl": tiny.TinyConfig(vocab=len(tiny_corpus.ALPHABET), n_layers=16, d_model=64,
                                      n_heads=2, n_kv_heads=1, d_ff=192, max_seq_len=256),
}
SEEDS = {"tiny-target": 1, "tiny-draft": 2, "tiny-target-xl": 3}
TARGETS = ("tiny-target", "tiny-target-xl")     # each is scored against the draft
# steps, peak learning rate; batch x seq_len tokens per step
SCHEDULE = {"tiny-target": (600, 2e-3), "tiny-draft": (400, 3e-3), "tiny-target-xl": (500, 2e-3)}
BATCH, SEQ_LEN, WARMUP = 16, 256, 100
TRAIN_CHARS, HELDOUT_CHARS = 2_000_000, 50_000


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < WARMUP:
        return peak * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, steps - WARMUP)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(name: str, data: torch.Tensor, steps: int, peak_lr: float, seed: int) -> tiny.TinyTransformer:
    torch.manual_seed(seed)
    model = tiny.TinyTransformer(CONFIGS[name])
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak_lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(data) - SEQ_LEN - 1, (BATCH,), generator=gen)
        batch = torch.stack([data[s:s + SEQ_LEN + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  {name} step {step:5d}  loss {loss.item():.4f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return model.eval()


def as_shipped(model: tiny.TinyTransformer) -> tiny.TinyTransformer:
    """The model with its weights rounded to float16 and back, as ``load`` will see them."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


@torch.no_grad()
def heldout_logits(model: tiny.TinyTransformer, windows: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(w[None, :-1])[0] for w in windows])      # [N, vocab]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few steps each; writes nothing")
    ap.add_argument("--threads", type=int, default=1, choices=(1, 2),
                    help="1 (default) is faster than 2 on a CPU shared with other work")
    ap.add_argument("--out", type=Path, default=tiny.WEIGHTS_DIR)
    ap.add_argument("--only", nargs="+", choices=tuple(CONFIGS), default=tuple(CONFIGS),
                    help="train these models only; the others are loaded from --out")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    data = torch.tensor(tiny.TOKENIZER.encode(tiny_corpus.train_text(TRAIN_CHARS)), dtype=torch.long)
    held = torch.tensor(tiny.TOKENIZER.encode(tiny_corpus.heldout_text(HELDOUT_CHARS)), dtype=torch.long)
    n_win = (len(held) - 1) // SEQ_LEN
    windows = torch.stack([held[i * SEQ_LEN:(i + 1) * SEQ_LEN + 1] for i in range(n_win)])
    targets = windows[:, 1:].reshape(-1)

    models, logits, report = {}, {}, {}
    for name in CONFIGS:                       # targets first: the draft is scored against them
        if name not in args.only:
            continue
        steps, lr = SCHEDULE[name]
        steps = 20 if args.quick else steps
        print(f"training {name}: {CONFIGS[name]}", flush=True)
        t0 = time.perf_counter()
        model = as_shipped(train(name, data, steps, lr, SEEDS[name]))
        seconds = time.perf_counter() - t0
        models[name] = model
        logits[name] = heldout_logits(model, windows)
        loss = F.cross_entropy(logits[name], targets).item()
        report[name] = {"params": model.num_params(), "train_steps": steps,
                        "train_tokens": steps * BATCH * SEQ_LEN, "train_seed": SEEDS[name],
                        "heldout_loss": round(loss, 4), "heldout_ppl": round(math.exp(loss), 3)}
        print(f"{name}: {model.num_params():,} params, {seconds:.0f} s, held-out loss {loss:.4f} "
              f"nats/char, perplexity {math.exp(loss):.3f} (uniform: {math.log(model.config.vocab):.3f} nats)")

    for name in ("tiny-draft",) + TARGETS:    # the shipped weights of the models not trained now
        if name not in logits:
            path = args.out / f"{name}.safetensors"
            if path.exists():
                logits[name] = heldout_logits(load_from(path), windows)

    if "tiny-draft" in logits:
        p_d = logits["tiny-draft"].softmax(-1)
        for target in TARGETS:
            if target not in logits or not ({target, "tiny-draft"} & set(models)):
                continue
            p_t = logits[target].softmax(-1)
            agreement = (p_t.argmax(-1) == p_d.argmax(-1)).float().mean().item()
            alpha = torch.minimum(p_t, p_d).sum(-1).mean().item()
            print(f"draft vs {target} on {len(targets):,} held-out positions: greedy agreement "
                  f"{agreement:.3f}, acceptance rate alpha (T=1) {alpha:.3f}")
            if target == "tiny-target":        # the draft's record, as before
                rec = report.get("tiny-draft")
                keys = ("greedy_agreement_with_target", "alpha_vs_target")
            else:                              # the deep target's record names its draft
                rec = report.get(target)
                keys = ("greedy_agreement_with_draft", "alpha_vs_draft")
            if rec is not None:
                rec.update({keys[0]: round(agreement, 4), keys[1]: round(alpha, 4)})

    if args.quick:
        print("--quick: nothing written")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        path = args.out / f"{name}.safetensors"
        tiny.save(model, path, extra={"training": report[name]})
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def load_from(path: Path) -> tiny.TinyTransformer:
    """A model from a weights file written by this script (float16 weights, as shipped)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        config = tiny.TinyConfig.from_json(f.metadata()["config"])
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    model = tiny.TinyTransformer(config)
    model.load_state_dict(state)
    return model.eval()


if __name__ == "__main__":
    main()
