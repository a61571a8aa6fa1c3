"""The benchmark tables (docs/benchmarks.md), built from the JSON files in bench/results/, and
the README's headline table, built from the exported runs in results/ (`picorl export` writes
their run.json).

    python -m bench.table            # print the tables
    python -m bench.table --write    # replace the blocks between the markers in both pages

Every figure comes from a result file, and a test checks that each page's block equals this
script's output, so neither page can drift from what was measured.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- bench tables: python -m bench.table --write -->", "<!-- end of bench tables -->"
HEAD_BEGIN, HEAD_END = "<!-- headline: python -m bench.table --write -->", "<!-- end of headline -->"
EXPORTS = ROOT / "results"
README, BENCH_PAGE = ROOT / "README.md", ROOT / "docs" / "benchmarks.md"  # where each block lives
# The reference: the earlier picoRL's training report (configs/seed_qwen3_4b.yaml is its config).
# Its report gives the d6 peak only; the other cells stay empty rather than guessed.
REFERENCE = ("reference run (earlier picoRL)", "Qwen3-4B-Instruct-2507, LoRA r32, direct SFT + GRPO, partial reward",
             {"d6": "56.2% (peak)"})


def _load(prefix: str) -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(RESULTS.glob(f"{prefix}-*.json"))
            if not p.name.endswith("-items.json")]


def rollout_rows() -> list[str]:
    rows = []
    for name, r in _load("rollout"):
        c = r["config"]
        base = r["engines"].get("hf", {}).get("tokens_per_s")
        for engine, e in r["engines"].items():
            ratio = f"{e['tokens_per_s'] / base:.2f}x" if base else "-"
            same = {True: "yes", False: "no"}.get(e.get("same_greedy_as_hf"), "-")
            rows.append(f"| {r['machine']} | {c['prompts']} x {c['max_tokens']}, {c['dtype']} | {engine} | "
                        f"{e['tokens_per_s']} | {ratio} | {e.get('warmup_s', '-')} | {same} | `{name}` |")
    return ["| machine | prompts x new tokens | engine | tokens/s | vs hf | warm-up s | greedy = hf | file |",
            "|---|---|---|---|---|---|---|---|", *rows]


def update_rows() -> list[str]:
    rows = []
    for name, r in _load("update"):
        c, m = r["config"], r["picorl"]["median"]
        parts = " | ".join(f"{m[k]:.2f}" for k in ("rollout_s", "reward_s", "loss_backward_s", "optimizer_s", "sync_s"))
        rows.append(f"| {r['machine']} | {c['tasks']} x {c['k']} x {c['max_tokens']}, {c['dtype']}, {c['engine']} | "
                    f"{parts} | **{m['update_s']:.2f}** | {r['picorl']['peak_memory_gb']} | `{name}` |")
    return ["| machine | tasks x k x new tokens | rollout s | reward s | loss+backward s | optimizer s | sync s "
            "| update s | peak memory GB | file |",
            "|---|---|---|---|---|---|---|---|---|---|", *rows]


def vs_trl_rows() -> list[str]:
    rows = []
    for name, r in _load("vs_trl"):
        c = r["config"]
        p, t = r["picorl"], r["trl"]
        rows.append(f"| {r['machine']} | {c['tasks']} x {c['k']} x {c['max_tokens']}, {c['dtype']} | "
                    f"{p['median']['update_s']:.2f} | {t['median']['update_s']:.2f} (TRL {r['trl_version']}) | "
                    f"**{r['speedup_per_update']:.2f}x** | {p['peak_memory_gb']} / {t['peak_memory_gb']} | `{name}` |")
    return ["| machine | tasks x k x new tokens | picoRL s/update | TRL s/update | picoRL speed-up "
            "| peak memory GB (picoRL / TRL) | file |",
            "|---|---|---|---|---|---|---|", *rows]


def sft_rows() -> list[str]:
    rows = []
    for name, r in _load("sft-recipe"):
        c = r["config"]
        ds = c["eval_difficulties"]
        for style, row in r["rows"].items():
            cells = " | ".join(f"{row['eval'][str(d)]['exact']:.1%} ({row['eval'][str(d)]['formatted']:.0%})" for d in ds)
            sft = "-" if style == "base" else f"{c['steps']} x {c['batch_size']} on d{'/'.join(map(str, c['sft_difficulties']))}"
            if style != "base" and c.get("lr_schedule", "constant") != "constant":
                sft += f", lr {c['lr_schedule']}" + (f" (warmup {c['warmup_steps']})" if c.get("warmup_steps") else "")
            rows.append(f"| {r['machine']} | {style} | {sft} | {', '.join(f'd{d}' for d in ds)}: {cells} | "
                        f"{c['eval_size']} | `{name}` |")
    return ["| machine | row | SFT steps x batch | greedy exact (formatted) | items per set | file |",
            "|---|---|---|---|---|---|", *rows]


def sft_speed_rows() -> list[str]:
    rows = []
    for name, r in _load("sft-speed"):
        c = r["config"]
        for batching, row in r["rows"].items():
            rows.append(f"| {r['machine']} | {c['style']}, batch {c['batch_size']}, {c['dtype']} | {batching} | "
                        f"{row['step_s']} | {row['tokens_per_s']} | {row['target_tokens_per_s']} | "
                        f"{row['real_share']:.0%} | `{name}` |")
    return ["| machine | style, batch, dtype | batches | s/step | tokens/s | demonstration tokens/s "
            "| real tokens in the batch | file |", "|---|---|---|---|---|---|---|---|", *rows]


def ablation_rows() -> list[str]:
    from bench.ablation import cell
    rows = []
    for name, r in _load("ablation"):
        for row, a in r["rows"].items():
            ds = sorted(a["final"], key=int)
            after = ", ".join(f"d{d} {cell(a['after_sft'][d])}" for d in ds)
            final = ", ".join(f"d{d} {cell(a['final'][d])}" for d in ds)
            rows.append(f"| {r['machine']} | {row} | {a['change']} | {after} | {final} | {a['training_minutes']} "
                        f"| `{name}` |")
    return ["| machine | row | change from the base config | greedy exact after SFT | after GRPO (final) "
            "| training min | file |", "|---|---|---|---|---|---|---|", *rows]


def headline_rows(exports: Path = EXPORTS) -> list[str]:
    """One row per exported letter-counting run (results/*/run.json) beside the reference run:
    greedy exact on the held-out sets at the exported step, and on fresh items when the export
    ran --fresh. Runs of another environment are another task, not rows of this headline."""
    import yaml

    ds = ("d3", "d5", "d6")
    rows = [f"| {REFERENCE[0]} | {REFERENCE[1]} | - | - | " + " | ".join(REFERENCE[2].get(d, "-") for d in ds)
            + " | - | - |"]
    for run_json in sorted(exports.glob("*/run.json")):
        r = json.loads(run_json.read_text())
        cfg = yaml.safe_load((run_json.parent / "config.yaml").read_text())
        if (cfg.get("env") or {}).get("name", "letter_counting") != "letter_counting":
            continue
        lora = cfg["model"].get("lora", {})
        model = cfg["model"]["name"] + (f", LoRA r{lora.get('rank')}" if lora.get("enabled", True) else ", full fine-tune")
        model += f", {cfg['sft']['style']} SFT {cfg['sft']['steps']} x {cfg['sft']['batch_size']} + GRPO {r['step']} updates"
        held = " | ".join(f"{r['exact'][d]:.1%}" if d in r["exact"] else "-" for d in ds)
        fresh = r.get("fresh_exact", {})
        fresh_cells = (" / ".join(f"{fresh[d]:.1%}" if d in fresh else "-" for d in ds) + f" (n={r['fresh_n']})"
                       if fresh else "-")
        folder = run_json.parent.name
        rows.append(f"| [{folder}](results/{folder}/report.md) | {model} | {', '.join(r['machines'])} | "
                    f"{r['training_minutes']:.1f} | {held} | {fresh_cells} | "
                    f"{r['failed_tries']} |")
    return ["| run | model and recipe | machine | training min (SFT + GRPO) | d3 | d5 | d6 "
            "| fresh items d3 / d5 / d6 | failed tries |", "|---|---|---|---|---|---|---|---|---|", *rows]


def headline_markdown(exports: Path = EXPORTS) -> str:
    return "\n".join([HEAD_BEGIN, "", *headline_rows(exports), "", HEAD_END])


def markdown() -> str:
    return "\n".join([BEGIN, "", "Rollout throughput (`bench/rollout.py`):", "", *rollout_rows(), "",
                      "One GRPO update, split (`bench/update.py`, medians after the first update):", "",
                      *update_rows(), "",
                      "picoRL beside TRL's GRPOTrainer at the equal configuration (`bench/vs_trl.py`):", "",
                      *vs_trl_rows(), "",
                      "The SFT rows of the ablation, same batches and same held-out sets (`bench/sft_recipe.py`):", "",
                      *sft_rows(), "",
                      "SFT throughput, random batches beside batches by length; random_full: every row run whole "
                      "(the shared system prompt read once per row, not once per batch) (`bench/sft_speed.py`):", "",
                      *sft_speed_rows(), "",
                      "The ablation, one whole run per row, each on the same held-out sets and budget "
                      "(`bench/ablation.py`; exact ± its standard error):", "",
                      *ablation_rows(), "", END])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    blocks = [(README, HEAD_BEGIN, HEAD_END, headline_markdown()), (BENCH_PAGE, BEGIN, END, markdown())]
    if not args.write:
        print("\n\n".join(text for _, _, _, text in blocks))
        return 0
    texts = {page: page.read_text() for page, *_ in blocks}
    for page, begin, end, _ in blocks:  # every marker checked before any page is written
        if begin not in texts[page] or end not in texts[page]:
            print(f"{page.relative_to(ROOT)} lacks a marker: add {begin!r} and {end!r} lines first", file=sys.stderr)
            return 1
    for page, begin, end, text in blocks:
        head, rest = texts[page].split(begin, 1)
        page.write_text(head + text + rest.split(end, 1)[1])
    print("README.md headline and docs/benchmarks.md tables updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
