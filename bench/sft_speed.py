"""SFT throughput: tokens per second and seconds per step, random batches beside batches by length.

    python -m bench.sft_speed                                    # CPU: batch 8, cot, d1-d6
    python -m bench.sft_speed --batch-size 64 --dtype bfloat16   # the GPU shape of configs/gpu.yaml's recipe

For each batching (random draws, and demonstrations grouped by length: `sft.group_by_length`)
a fresh LoRA adapter r32/alpha64 runs `train_sft` for --warmup steps (kernels, allocator),
then --steps timed steps; `random_full` repeats the random batches with every row run whole
(`sft.shared_prefix` off: the system prompt read once per row, not once per batch). Tokenizing the demonstrations, once per run, is timed apart. Tokens
are the real tokens of the batches (prompt + demonstration, what the forward pass must read),
the demonstration tokens alone (what the loss covers), and the padded total (what it does
read), so padding and prompt costs show. --profile N profiles 2 more steps of random batches
and lists their N costliest operators, with the time the device was busy against the wall.
--compile adds random batches with the forward compiled (`sft.compile`): its steps, and its
warm-up (the compile) apart. --lora-top-layers N ... adds random batches with the adapter on
the last N layers only (`random_topN`): the backward stops at the lowest adapted layer. Writes
bench/results/sft-speed-<machine>-<batch>-<dtype>.json.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.common import machine, machine_tag, print_profile, profile_top, write_result
from picorl import base_matmuls, data, models
from picorl.sft import SFTBatches, encode_records, sft_step, train_sft


def profile_sft_steps(model, tok, examples, args, steps) -> dict:
    """`steps` more SFT steps of random batches under the profiler (tokenizing is not in it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    plan = SFTBatches([len(ids) for ids, _ in examples], args.batch_size, 0, False)
    model.train()

    def run():
        for s in steps:
            sft_step(model, params, optimizer, [examples[i] for i in plan(s)], tok.pad_token_id)
    return profile_top(run, args.profile)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    ap.add_argument("--style", default="cot")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--difficulties", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    ap.add_argument("--per-difficulty", type=int, default=500, help="demonstrations per difficulty")
    ap.add_argument("--compile", action="store_true",
                    help="add a row of random batches with the forward compiled (sft.compile), and its warm-up")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile 2 more steps of random batches and report their N most expensive operators")
    ap.add_argument("--bf16-base", action="store_true",
                    help="add a row of random batches with the frozen base weights' matmuls on bf16 copies "
                         "(model.lora.base_dtype=bfloat16)")
    ap.add_argument("--lora-top-layers", type=int, nargs="+", default=[], metavar="N",
                    help="add a row of random batches per N with the adapter on the last N layers only")
    args = ap.parse_args()
    if args.lora_top_layers:  # before any row runs: a bad N would otherwise fail after the others
        from transformers import AutoConfig
        depth = AutoConfig.from_pretrained(models.resolve_model(models.EMBEDDED)).num_hidden_layers
        try:
            for n in args.lora_top_layers:
                models.top_layer_indices(depth, n)
        except ValueError as e:
            ap.error(f"--lora-top-layers: {e}")
    if args.warmup < 1 or args.steps < 1:
        ap.error(f"--warmup and --steps must be at least 1, got {args.warmup} and {args.steps}")
    if args.dtype == "auto":  # name the dtype that ran in the result
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    tok = models.load_tokenizer(models.EMBEDDED)
    records = [r for d in args.difficulties for r in data.train_records(d, args.per_difficulty, seed=0)]
    t0 = time.perf_counter()
    examples = encode_records(tok, records, args.style, progress=False)
    encode_s = time.perf_counter() - t0
    lengths = [len(ids) for ids, _ in examples]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    rows = {}
    variants = [("random", False, False, True, None), ("random_full", False, False, False, None),
                ("by_length", True, False, True, None)]
    if args.bf16_base:
        variants.append(("random_bf16_base", False, False, True, None))
    if args.compile:
        variants.append(("random_compiled", False, True, False, None))
    variants += [(f"random_top{n}", False, False, True, n) for n in args.lora_top_layers]
    for name, by_length, compiled, shared, top in variants:
        torch.manual_seed(0)
        model, _ = models.load_model(models.EMBEDDED, dtype=args.dtype)
        model = models.add_lora(model, rank=32, alpha=64, top_layers=top)
        if name == "random_bf16_base":
            base_matmuls.attach(model, torch.bfloat16)
        done_at = []  # train_sft reads each loss back (a sync), so the clock is honest on a GPU too

        def stamp(step, loss):
            sync()
            done_at.append(time.perf_counter())
        started = time.perf_counter()
        train_sft(model, tok, records, style=args.style, steps=args.warmup + args.steps, batch_size=args.batch_size,
                  lr=1e-3, group_by_length=by_length, compile_forward=compiled, shared_prefix=shared, on_step=stamp,
                  progress=False)
        seconds = done_at[-1] - done_at[args.warmup - 1]  # the timed steps: after warmup, tokenizing excluded
        if args.profile and name == "random":
            n = args.warmup + args.steps
            prof = profile_sft_steps(model, tok, examples, args, range(n, n + 2))
        del model
        plan = SFTBatches(lengths, args.batch_size, 0, by_length)
        batches = [plan(s) for s in range(args.warmup, args.warmup + args.steps)]
        real = sum(lengths[i] for b in batches for i in b)
        padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        target = sum(sum(x != -100 for x in examples[i][1]) for b in batches for i in b)
        rows[name] = {"step_s": round(seconds / args.steps, 3), "tokens_per_s": round(real / seconds, 1),
                      "target_tokens_per_s": round(target / seconds, 1), "real_share": round(real / padded, 3),
                      "warmup_s": round(done_at[args.warmup - 1] - started, 1)}  # tokenizing, and a compile
        r = rows[name]
        print(f"{name:>9}: {r['step_s']} s/step, {r['tokens_per_s']} tokens/s "
              f"({r['target_tokens_per_s']} demonstration tokens/s), {r['real_share']:.0%} of the batch real tokens, "
              f"warm-up {r['warmup_s']} s", flush=True)
    out = {"machine": machine(), "torch": torch.__version__, "config": vars(args),
           "encode_s": round(encode_s, 2), "encode_ms_per_record": round(1e3 * encode_s / len(records), 3),
           "rows": rows, "by_length_speedup": round(rows["random"]["step_s"] / rows["by_length"]["step_s"], 2),
           "shared_prefix_speedup": round(rows["random_full"]["step_s"] / rows["random"]["step_s"], 2)}
    for n in args.lora_top_layers:
        out[f"top{n}_speedup"] = round(rows["random"]["step_s"] / rows[f"random_top{n}"]["step_s"], 2)
        print(f"adapter on the last {n} layers: {out[f'top{n}_speedup']}x the steps/s of every layer's")
    if args.bf16_base:
        out["bf16_base_speedup"] = round(rows["random"]["step_s"] / rows["random_bf16_base"]["step_s"], 2)
        print(f"frozen base matmuls on bf16 copies: {out['bf16_base_speedup']}x the steps/s of float32's")
    if args.compile:
        out["compiled_speedup"] = round(rows["random"]["step_s"] / rows["random_compiled"]["step_s"], 2)
        print(f"compiled (sft.compile): {out['compiled_speedup']}x the steps/s of eager random batches, "
              f"after a warm-up of {rows['random_compiled']['warmup_s']} s against {rows['random']['warmup_s']} s")
    if args.profile:
        out["profile"] = prof
        print_profile("2 more SFT steps of random batches", prof)
    print(f"{out['machine']}: SFT {args.style}, batch {args.batch_size}, {args.dtype}: tokenizing "
          f"{len(records)} demonstrations once {out['encode_s']} s ({out['encode_ms_per_record']} ms each); "
          f"by length {out['by_length_speedup']}x the steps/s of random batches; the shared prefix run once "
          f"{out['shared_prefix_speedup']}x the steps/s of whole rows")
    extra = "".join(f"-top{n}" for n in args.lora_top_layers) + ("-bf16base" if args.bf16_base else "")  # kept apart from the plain runs' file
    write_result(f"sft-speed-{machine_tag(out['machine'])}-{args.batch_size}-{args.dtype}{extra}", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
