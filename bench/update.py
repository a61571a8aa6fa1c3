"""Seconds per full GRPO update and peak memory, split into its parts.

    python -m bench.update                                    # CPU: 8 tasks x k 8 x 64 new tokens
    python -m bench.update --max-tokens 512 --dtype bfloat16  # the GPU shape
    python -m bench.update --tasks 16 --k 8 --max-tokens 384 --micro-batch 64 --engine graph  # configs/gpu.yaml's

One update = rollouts (all tasks x k in one engine call) -> rewards -> loss + backward over
micro-batches -> optimizer step -> weight sync to the engine. Tasks are d6 strings from the
embedded model's training set, LoRA r32/alpha64. The first update pays one-time costs
(allocator, kernels) and is reported apart; the rest are summarised by their median.

The reward is the letter-counting partial reward plus a small deterministic jitter per
completion: every sequence then carries a non-zero advantage, so the loss + backward part
is the full batch's cost (the trainer skips zero-advantage sequences, and an untrained
model's groups are mostly all-zero). The same reward drives `bench/vs_trl.py`.
Writes bench/results/update-<machine>-<tasks>x<k>x<tokens>.json.
"""
from __future__ import annotations

import argparse
import hashlib
import resource
import statistics
import sys
import time

import torch

from bench.common import machine, machine_tag, print_profile, profile_top, write_result
from picorl import data, models
from picorl.config import Config, load_config
from picorl.envs.letter_counting import fraction_right, parse_answer, reward_of

PARTS = ("rollout_s", "reward_s", "loss_backward_s", "optimizer_s", "sync_s", "update_s")


def jitter(text: str) -> float:
    """A deterministic number in [0, 0.01) from the completion text."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32 * 0.01


def bench_reward_value(text: str, letters: list[str], answer: dict) -> float:
    parsed = parse_answer(text, letters)
    return reward_of(parsed, answer, kind="partial") + jitter(text)


def picorl_reward(c, r):
    parsed = parse_answer(c.text, r["letters"])
    return (reward_of(parsed, r["answer"], kind="partial") + jitter(c.text), fraction_right(parsed, r["answer"]) == 1.0,
            parsed.formatted)


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=models.EMBEDDED, help="another model makes a smoke run: no result file")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--updates", type=int, default=4, help="updates timed; the first is reported apart")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--engine", default="hf", help="hf, graph, graph-compile (rollout.graph_compile) or vllm")
    ap.add_argument("--difficulty", type=int, default=6)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile one more update and report its N most expensive operators")


def bench_config(args) -> Config:
    return load_config(None, [
        f"model.name={args.model}", f"model.dtype={args.dtype}", "model.lora.rank=32", "model.lora.alpha=64",
        f"rollout.engine={args.engine.removesuffix('-compile')}", f"rollout.graph_compile={args.engine == 'graph-compile'}",
        f"rollout.max_tokens={args.max_tokens}",
        f"rollout.batch_size={args.tasks * args.k}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "grpo.algorithm=grpo", f"grpo.tasks_per_update={args.tasks}", f"grpo.group_size={args.k}",
        f"grpo.micro_batch_size={args.micro_batch}", "grpo.lr=1e-5", "grpo.kl_coef=0.0"])


def resolved_dtype(args) -> str:
    """The dtype `auto` stands for here (bf16 on GPU, fp32 on CPU)."""
    if args.dtype != "auto":
        return args.dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"


def engine_suffix(args) -> str:
    """'' for the hf engine (the files written before engines were named), else '-<engine>'."""
    return "" if args.engine == "hf" else f"-{args.engine}"


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def summarise(per_update: list[dict], keys) -> dict:
    first, rest = per_update[0], per_update[1:] or per_update[:1]
    return {"first": {k: round(first[k], 3) for k in keys},
            "median": {k: round(statistics.median(u[k] for u in rest), 3) for k in keys}}


def run_picorl(args) -> dict:
    """Time `args.updates` picoRL updates; returns the figures."""
    from picorl.session import engine_for_config
    from picorl.trainer import GRPOTrainer

    cfg = bench_config(args)
    torch.manual_seed(0)
    model, tok = models.load_for_config(cfg)
    engine = engine_for_config(cfg, model, tok, progress=False)
    trainer = GRPOTrainer(model, tok, engine, cfg, reward_fn=picorl_reward)
    records = data.train_records(args.difficulty, 256, seed=0)
    per_update = []
    for _ in range(args.updates):
        m = trainer.update(records)
        per_update.append({**{k: m.get(k, 0.0) for k in PARTS}, "rollout_tokens": m["rollout_tokens"],
                           "completion_len": m["completion_len"]})
    out = summarise(per_update, PARTS + ("rollout_tokens", "completion_len"))
    out["peak_memory_gb"] = round(peak_memory_gb(), 2)
    out["rollout_tokens_per_s"] = round(out["median"]["rollout_tokens"] / out["median"]["rollout_s"], 1)
    if args.profile:
        out["profile"] = profile_top(lambda: trainer.update(records), args.profile)
    return out


def describe(args) -> dict:
    import peft
    import transformers
    return {"machine": machine(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "config": {
                "model": args.model, "lora_rank": 32, "lora_alpha": 64, "tasks": args.tasks, "k": args.k,
                "max_tokens": args.max_tokens, "micro_batch": args.micro_batch, "dtype": resolved_dtype(args),
                "engine": args.engine, "difficulty": args.difficulty, "updates": args.updates,
                "reward": "partial + jitter < 0.01", "kl_coef": 0.0, "temperature": 1.0}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap)
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = run_picorl(args)
    out = {**describe(args), "picorl": res, "wall_s": round(time.perf_counter() - t0, 1)}
    med = res["median"]
    print(f"{out['machine']}: {args.tasks} tasks x k {args.k} x {args.max_tokens} new tokens, "
          f"{args.dtype}, engine {args.engine}")
    print("| part | seconds (median) | share |")
    print("|---|---|---|")
    for k in PARTS[:-1]:
        print(f"| {k[:-2]} | {med[k]:.2f} | {med[k] / med['update_s']:.0%} |")
    print(f"| **update** | **{med['update_s']:.2f}** | first update {res['first']['update_s']:.2f} s |")
    print(f"peak memory {res['peak_memory_gb']} GB, rollout {res['rollout_tokens_per_s']} tokens/s, "
          f"mean completion {med['completion_len']:.0f} tokens")
    if res.get("profile"):
        print_profile("one more update", res["profile"])
    if args.model != models.EMBEDDED:
        return 0
    write_result(f"update-{machine_tag(out['machine'])}-{args.tasks}x{args.k}x{args.max_tokens}-{resolved_dtype(args)}"
                 f"{engine_suffix(args)}", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
