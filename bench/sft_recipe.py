"""The SFT rows of the ablation: base model, SFT `direct` (the reference recipe), SFT `cot`.

    python -m bench.sft_recipe                                  # CPU: 200 steps on d1-d3, eval d3
    python -m bench.sft_recipe --steps 400 --batch-size 32 --sft-difficulties 1 2 3 4 5 6 \
        --eval-difficulties 3 5 6 --dtype bfloat16              # the GPU shape

Each style trains a fresh LoRA adapter (r32/alpha64) on the same batches (same seed, same
tasks) for the same number of steps, then every row is greedy-evaluated on the same
held-out sets with the one parsing rule. Writes bench/results/sft-recipe-<machine>-d<sft difficulties>-<steps>x<batch>.json and
the per-item completions beside it, so a row can be read, not just trusted.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from bench.common import RESULTS, earlier_rows, machine, machine_tag, write_result
from picorl import data, models
from picorl.evaluate import evaluate_sets
from picorl.sft import train_sft


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-schedule", default="constant", help="sft.lr_schedule: constant, cosine or linear")
    ap.add_argument("--warmup-steps", type=int, default=0, help="sft.warmup_steps")
    ap.add_argument("--sft-difficulties", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--eval-difficulties", type=int, nargs="+", default=[3])
    ap.add_argument("--eval-size", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--styles", nargs="+", default=["base", "direct", "cot"],
                    help="rows to measure: base and any of the letter_counting demonstration styles; rows of an earlier run with "
                         "the same settings are kept")
    args = ap.parse_args()

    train = [r for d in args.sft_difficulties for r in data.train_records(d, 2000, seed=0)]
    sets = {d: data.eval_records(d, args.eval_size) for d in args.eval_difficulties}
    rows, items_out = {}, {}
    for style in args.styles:
        torch.manual_seed(0)
        model, tok = models.load_model(models.EMBEDDED, dtype=args.dtype)
        model = models.add_lora(model, rank=32, alpha=64)
        t0 = time.perf_counter()
        losses = []
        if style != "base":
            losses = [m["sft/loss"] for m in train_sft(model, tok, train, style=style, steps=args.steps,
                                                       batch_size=args.batch_size, lr=args.lr, seed=0,
                                                       lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps)]
        sft_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        by_d, items = evaluate_sets(model, tok, sets, max_tokens=args.max_tokens, batch_size=64)
        rows[style] = {"sft_s": round(sft_s, 1), "eval_s": round(time.perf_counter() - t0, 1),
                       "final_loss": round(sum(losses[-10:]) / max(len(losses[-10:]), 1), 4) if losses else None,
                       "eval": {str(d): s for d, s in by_d.items()}}
        items_out[style] = items
        print(style, json.dumps(rows[style]), flush=True)
        del model

    out = {"machine": machine(), "torch": torch.__version__, "config": {
        "model": models.EMBEDDED, "lora_rank": 32, "lora_alpha": 64, "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "sft_difficulties": args.sft_difficulties,
        "eval_difficulties": args.eval_difficulties, "eval_size": args.eval_size,
        "max_tokens": args.max_tokens, "dtype": args.dtype}, "rows": rows}
    shape = "".join(map(str, args.sft_difficulties))
    stem = f"sft-recipe-{machine_tag(out['machine'])}-d{shape}-{args.steps}x{args.batch_size}"
    if args.lr_schedule != "constant" or args.warmup_steps:  # constant rows keep their earlier files and keys
        out["config"].update(lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps)
        stem += f"-{args.lr_schedule}" + (f"-warmup{args.warmup_steps}" if args.warmup_steps else "")
    kept = earlier_rows(RESULTS / f"{stem}.json", out, set(rows))
    out["rows"] = {**kept, **rows}
    print(f"\n{out['machine']}: SFT {args.steps} steps x {args.batch_size} on d{args.sft_difficulties}, "
          f"lr {args.lr} {args.lr_schedule} (warmup {args.warmup_steps})")
    head = " | ".join(f"d{d} exact | d{d} formatted" for d in args.eval_difficulties)
    print(f"| row | {head} | SFT s |")
    print("|---" * (1 + 2 * len(args.eval_difficulties) + 1) + "|")
    for style, r in out["rows"].items():
        cells = " | ".join(f"{r['eval'][str(d)]['exact']:.1%} | {r['eval'][str(d)]['formatted']:.1%}"
                           for d in args.eval_difficulties)
        print(f"| {style} | {cells} | {r['sft_s']} |")
    items = [i for i in data.read_jsonl(RESULTS / f"{stem}-items.jsonl") if i["row"] in kept] if kept else []
    path = write_result(stem, out)
    data.write_jsonl(items + [{"row": s, **i} for s, its in items_out.items() for i in its],
                     path.with_name(f"{stem}-items.jsonl"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
