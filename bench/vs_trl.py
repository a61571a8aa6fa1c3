"""picoRL beside TRL's GRPOTrainer at the equal configuration, on this machine, in one run.

    python -m bench.vs_trl                                    # CPU: 8 tasks x k 8 x 64 new tokens
    python -m bench.vs_trl --max-tokens 512 --dtype bfloat16  # the GPU shape
    python -m bench.vs_trl --tasks 16 --k 8 --max-tokens 384 --micro-batch 64 --engine graph  # picoRL on its GPU engine

Equal means: the same model (embedded SmolLM2-135M-Instruct), a LoRA adapter r32/alpha64 on
every projection, 8 prompts x 8 completions per optimizer step, the same most new tokens,
the same dtype, temperature 1 / top-p 1, micro-batches of 16 sequences with gradients
accumulated to one optimizer step, no KL term (so no reference model), GRPO's per-sequence
loss with group-scaled advantages, the same d6 tasks and the same reward function (see
`bench/update.py`). TRL's gradient checkpointing is turned off (picoRL does not
checkpoint) and it generates with transformers `generate`, as picoRL's `hf` engine does.

Each framework runs in a child process of its own, so their peak memories are their own
and neither inherits the other's threads or allocator. Writes
bench/results/vs_trl-<machine>-<tasks>x<k>x<tokens>.json with both and the ratio.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from bench.common import machine_tag, write_result
from bench.update import (add_shape_args, bench_reward_value, describe, engine_suffix, peak_memory_gb,
                          resolved_dtype, run_picorl, summarise)
from picorl import data, models


def run_trl(args) -> dict:
    """Time `args.updates` optimizer steps of TRL's GRPOTrainer; returns the figures."""
    import datasets
    import trl
    from peft import LoraConfig
    from transformers import TrainerCallback

    from picorl.config import DEFAULT_LORA_TARGETS

    torch.manual_seed(0)
    model, tok = models.load_model(args.model, dtype=args.dtype, attention="sdpa")  # TRL as it comes
    tok.padding_side = "left"
    records = data.train_records(args.difficulty, 256, seed=0)
    ds = datasets.Dataset.from_list([{"prompt": data.messages_of(r), "letters": r["letters"],
                                      "answer_json": json.dumps(r["answer"])} for r in records])

    def letter_reward(prompts, completions, letters, answer_json, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [bench_reward_value(t, ls, json.loads(a)) for t, ls, a in zip(texts, letters, answer_json)]

    stamps: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    n = args.tasks * args.k
    gpu = torch.cuda.is_available()
    bf16 = gpu and args.dtype in ("auto", "bfloat16")
    with tempfile.TemporaryDirectory() as out:
        cfg = trl.GRPOConfig(
            output_dir=out, max_steps=args.updates, learning_rate=1e-5, lr_scheduler_type="constant",
            per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=n // args.micro_batch,
            steps_per_generation=n // args.micro_batch, num_generations=args.k,
            max_completion_length=args.max_tokens, temperature=1.0, top_p=1.0, top_k=0,
            loss_type="grpo", scale_rewards="group", beta=0.0, num_iterations=1,
            gradient_checkpointing=False, bf16=bf16, use_cpu=not gpu, max_grad_norm=1.0,
            report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
            dataloader_num_workers=0)
        trainer = trl.GRPOTrainer(
            model=model, reward_funcs=letter_reward, args=cfg, train_dataset=ds, processing_class=tok,
            peft_config=LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=DEFAULT_LORA_TARGETS,
                                   task_type="CAUSAL_LM"),
            callbacks=[StepClock()])
        trainer.train()
        logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    per_update = [{"update_s": b - a, "completion_len": logs[i]["completions/mean_length"] if i < len(logs) else 0.0}
                  for i, (a, b) in enumerate(zip(stamps, stamps[1:]))]
    out = summarise(per_update, ("update_s", "completion_len"))
    out["peak_memory_gb"] = round(peak_memory_gb(), 2)
    out["trl"] = trl.__version__
    return out


def child(which: str, args, path: Path) -> dict:
    """Run one framework in a fresh interpreter and read its figures back."""
    cmd = [sys.executable, "-m", "bench.vs_trl", "--only", which, "--json-out", str(path)] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("only", "json_out")]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(path.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap)
    ap.add_argument("--only", choices=["picorl", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if (args.tasks * args.k) % args.micro_batch:
        ap.error(f"--micro-batch {args.micro_batch} must divide tasks x k = {args.tasks * args.k}")
    if args.only:
        res = run_picorl(args) if args.only == "picorl" else run_trl(args)
        Path(args.json_out).write_text(json.dumps(res))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        res = {w: child(w, args, Path(tmp) / f"{w}.json") for w in ("picorl", "trl")}
    ratio = res["trl"]["median"]["update_s"] / res["picorl"]["median"]["update_s"]
    out = {**describe(args), "trl_version": res["trl"].pop("trl"), "picorl": res["picorl"], "trl": res["trl"],
           "speedup_per_update": round(ratio, 2)}
    print(f"{out['machine']}: {args.tasks} tasks x k {args.k} x {args.max_tokens} new tokens, {args.dtype}")
    print("| trainer | s / update (median) | first update s | mean completion tokens | peak memory GB |")
    print("|---|---|---|---|---|")
    for w in ("picorl", "trl"):
        r = res[w]
        print(f"| {w} | {r['median']['update_s']:.2f} | {r['first']['update_s']:.2f} | "
              f"{r['median']['completion_len']:.0f} | {r['peak_memory_gb']} |")
    print(f"picoRL is {ratio:.2f}x faster per update than TRL {out['trl_version']}")
    if args.model != models.EMBEDDED:
        return 0  # a smoke run on another model writes no result file
    write_result(f"vs_trl-{machine_tag(out['machine'])}-{args.tasks}x{args.k}x{args.max_tokens}-{resolved_dtype(args)}"
                 f"{engine_suffix(args)}", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
