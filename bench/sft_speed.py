"""SFT throughput: demonstration tokens per second and seconds per step, on the embedded model.

    python -m bench.sft_speed                                    # CPU: batch 8, cot, d1-d6
    python -m bench.sft_speed --batch-size 64 --dtype bfloat16   # the GPU shape of configs/gpu.yaml's recipe

Runs `train_sft` for --steps steps after --warmup steps (kernels, allocator) with a fresh
LoRA adapter r32/alpha64, timing only the measured steps. Tokens are every token of the
batches (prompt + demonstration, what the forward pass reads), and the demonstration
tokens alone (what the loss covers), so padding and prompt costs show. Writes
bench/results/sft-speed-<machine>-<batch>-<dtype>.json.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from bench.common import machine, machine_tag, write_result
from picorl import data, models
from picorl.sft import encode_example, train_sft


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--style", default="cot")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--difficulties", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    args = ap.parse_args()
    if args.dtype == "auto":  # name the dtype that ran in the result
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    torch.manual_seed(0)
    model, tok = models.load_model(models.EMBEDDED, dtype=args.dtype)
    model = models.add_lora(model, rank=32, alpha=64)
    records = [r for d in args.difficulties for r in data.train_records(d, 500, seed=0)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    train_sft(model, tok, records, style=args.style, steps=args.warmup, batch_size=args.batch_size, lr=1e-3,
              optimizer=opt, progress=False)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    train_sft(model, tok, records, style=args.style, steps=args.warmup + args.steps, start_step=args.warmup,
              batch_size=args.batch_size, lr=1e-3, optimizer=opt, progress=False)
    sync()
    seconds = time.perf_counter() - t0
    # The same batches again, tokenized only: train_sft draws step s's batch from (seed, s).
    total = target = 0
    for step in range(args.warmup, args.warmup + args.steps):
        rng = random.Random(f"sft/0/{step}")
        for ids, labels in (encode_example(tok, rng.choice(records), args.style) for _ in range(args.batch_size)):
            total += len(ids)
            target += sum(x != -100 for x in labels)
    out = {"machine": machine(), "torch": torch.__version__, "config": vars(args),
           "step_s": round(seconds / args.steps, 3), "tokens_per_s": round(total / seconds, 1),
           "target_tokens_per_s": round(target / seconds, 1)}
    print(f"{out['machine']}: SFT {args.style}, batch {args.batch_size}, {args.dtype}: {out['step_s']} s/step, "
          f"{out['tokens_per_s']} tokens/s ({out['target_tokens_per_s']} demonstration tokens/s)")
    write_result(f"sft-speed-{machine_tag(out['machine'])}-{args.batch_size}-{args.dtype}", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
