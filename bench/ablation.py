"""The ablation table: one `picorl train` per row, each changing one thing from a base config.

    python -m bench.ablation --config configs/ablation_cpu.yaml             # CPU scale, target d3
    python -m bench.ablation --config configs/gpu.yaml                      # the headline's rows
    python -m bench.ablation --config configs/gpu.yaml --runs full_ft direct   # some rows; the others are kept
    python -m bench.ablation --config configs/gpu.yaml --dry-run            # every row's config, validated

Every row is a whole pipeline run (data -> SFT -> GRPO -> evals, tracked in MLflow like any
run) with the base config's budget: the same SFT steps and batch, the same GRPO updates and
batch, the same held-out sets (eval sets are fixed by difficulty, not by run). Each row
reports its own eval after SFT (update 0) and its final eval, so one table holds

    base            SFT + curriculum GRPO, as the config says    (its after-SFT column: SFT only)
    no_curriculum   SFT + GRPO, every update at the last stage's difficulty, as many updates
    partial_reward  reward.kind=partial (the reference run's reward) instead of binary
    full_ft         every weight trains, no LoRA; learning rates x FULL_FT_LR_SCALE
    direct          sft.style=direct: the answer alone, no chain
    cot_tokens      sft.style=cot_tokens: the chain re-reads the string token by token
    random_batches  sft.group_by_length=false: does batching by length cost accuracy?

A row whose change is already the base config's (a base without stages to drop, a
base that is already `direct`) is the base run and is not run twice.

The result, bench/results/ablation-<machine>-<config name>.json, is written after every row,
so an interrupted ablation keeps the rows it finished; rerunning with the same base config
on the same machine redoes only the rows asked for. `python -m bench.table --write` puts
the table in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS, earlier_rows, machine, machine_tag, write_result
from picorl.config import ConfigError, flatten, load_config, to_dict
from picorl.export import time_summary
from picorl.run_records import read_timings
from picorl.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]

# LoRA's update is scaled by alpha / r and starts from B = 0; full fine-tuning moves every
# weight directly, so it takes learning rates about an order of magnitude smaller.
FULL_FT_LR_SCALE = 0.1


def row_overrides(cfg) -> dict[str, tuple[str, list[str]]]:
    """Each row's name -> (what it changes, in words; its --set values over the base config)."""
    last = cfg.stages[-1].difficulty
    updates = sum(s.updates for s in cfg.stages)
    one_stage = json.dumps([{"difficulty": last, "updates": updates}])
    return {
        "base": ("the base config", []),
        "no_curriculum": (f"no curriculum: {updates} updates at d{last}", [f"stages={one_stage}"]),
        "partial_reward": ("reward partial (0 / 0.1 + 0.9 x fraction right)", ["reward.kind=partial"]),
        "full_ft": (f"full fine-tuning, learning rates x {FULL_FT_LR_SCALE}",
                    ["model.lora.enabled=false", f"sft.lr={cfg.sft.lr * FULL_FT_LR_SCALE:g}",
                     f"grpo.lr={cfg.grpo.lr * FULL_FT_LR_SCALE:g}"]),
        "direct": ("SFT style direct (answer only)", ["sft.style=direct"]),
        "cot_tokens": ("SFT style cot_tokens", ["sft.style=cot_tokens"]),
        "random_batches": ("SFT batches drawn at random, not by length", ["sft.group_by_length=false"]),
    }


def plan_rows(config: str, names: list[str]) -> dict[str, dict]:
    """The rows to run, in the order named, each validated; a row equal to the base config is dropped (with a note)."""
    base = load_config(config)
    base_flat = flatten(to_dict(base))
    overrides, rows = row_overrides(base), {}
    for name in dict.fromkeys(names):  # in the order asked, each once
        change, sets = overrides[name]
        try:
            flat = flatten(to_dict(load_config(config, sets)))
        except ConfigError as e:
            raise ConfigError(f"row {name} ({' '.join(sets)}): {e}") from None
        if name != "base" and flat == base_flat:
            print(f"{name}: the base config already has {change}; it is the base row")
            continue
        rows[name] = {"change": change, "sets": sets}
    return rows


def run_row(config: str, name: str, sets: list[str], out_dir: Path) -> Path:
    """Train one row with the real command line; returns its run folder."""
    row_dir = out_dir / name
    cmd = [sys.executable, "-m", "cli", "train", "--config", config, "--set", f"run.name={name}",
           "--set", f"run.output_dir={row_dir}", *[a for s in sets for a in ("--set", s)]]
    print(f"\n=== {name}: {' '.join(cmd[3:])}", flush=True)
    started = time.time()
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"row {name}: picorl train exited {done.returncode}")
    runs = [p for p in row_dir.iterdir() if RunFolder(p).report.is_file() and p.stat().st_mtime >= started]
    if not runs:
        raise RuntimeError(f"row {name}: no finished run folder under {row_dir}")
    return max(runs, key=lambda p: p.name)


def config_key(config: str) -> dict:
    """The base config's values that differ from the defaults: what identifies an ablation.

    Only these, so that a knob added later with a default that changes nothing does not
    orphan the rows already measured."""
    defaults = flatten(to_dict(load_config(None)))
    return {k: v for k, v in flatten(to_dict(load_config(config))).items() if defaults.get(k) != v}


def row_result(run_dir: Path, change: str, sets: list[str]) -> dict:
    """The row's evals after SFT and at the end, and its training minutes, from its run folder."""
    files = RunFolder(run_dir).eval_files()
    first, last = (json.loads(files[s].read_text())["by_difficulty"] for s in (min(files), max(files)))
    return {"change": change, "sets": sets, "run_folder": run_dir.name,
            "final_update": max(files), "after_sft": first, "final": last,
            "training_minutes": time_summary(read_timings(run_dir))["training_minutes"]}


def cell(score: dict) -> str:
    """Exact as a percentage with its binomial standard error: 71.9% ±4.0 on 128 items."""
    p, n = score["exact"], score["n"]
    return f"{p:.1%} ±{100 * math.sqrt(p * (1 - p) / n):.1f}"


def table(out: dict) -> list[str]:
    ds = sorted({d for r in out["rows"].values() for d in r["final"]}, key=int)
    head = " | ".join(f"d{d} after SFT | d{d} final" for d in ds)
    lines = [f"| row | change | {head} | training min |", "|---" * (3 + 2 * len(ds)) + "|"]
    for name, r in out["rows"].items():
        cells = " | ".join(f"{cell(r['after_sft'][d])} | {cell(r['final'][d])}" for d in ds)
        lines.append(f"| {name} | {r['change']} | {cells} | {r['training_minutes']} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="the base config every row changes one thing of")
    names = list(row_overrides(load_config(None)))
    ap.add_argument("--runs", nargs="+", default=names, choices=names, help="rows to (re)run, in this order")
    ap.add_argument("--out-dir", default="outputs/ablation", help="where the rows' run folders go")
    ap.add_argument("--results-dir", default=str(RESULTS), help="where the result JSON goes")
    ap.add_argument("--dry-run", action="store_true", help="validate every row's config, print the plan, run nothing")
    args = ap.parse_args()
    try:
        rows = plan_rows(args.config, args.runs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, r in rows.items():
        print(f"{name}: {r['change']}" + (f"  (--set {' --set '.join(r['sets'])})" if r["sets"] else ""))
    if args.dry_run:
        return 0
    out = {"machine": machine(), "config": config_key(args.config), "rows": {}}
    stem = f"ablation-{machine_tag(out['machine'])}-{Path(args.config).stem}"
    results_dir = Path(args.results_dir)
    kept = earlier_rows(results_dir / f"{stem}.json", out, set(rows))
    out_dir = Path(args.out_dir).resolve()
    failed = []
    for name, r in rows.items():
        try:
            run_dir = run_row(args.config, name, r["sets"], out_dir)
        except RuntimeError as e:
            print(f"error: {e}; the other rows go on", file=sys.stderr)
            failed.append(name)
            continue
        kept[name] = row_result(run_dir, r["change"], r["sets"])
        out["rows"] = {k: kept[k] for k in names if k in kept}  # the table's order, whatever ran first
        write_result(stem, out, results_dir)  # after every row: an interrupted ablation keeps what it finished
    out["rows"] = {k: kept[k] for k in names if k in kept}
    print("\n".join(["", f"{out['machine']}, base config {args.config}:", *table(out)]))
    if failed:
        print(f"rows that failed: {', '.join(failed)} (their run logs are above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
