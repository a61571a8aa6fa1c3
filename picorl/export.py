"""Export a finished run folder as a results folder worth committing.

    picorl export --run-dir outputs/gpu-curriculum-<stamp> --out results/<date>-smollm2-curriculum

writes
    report.md, curves.png      the run's report (the flow's last step writes them)
    config.yaml                the resolved config the run trained with
    final_eval.jsonl           the last greedy eval, one item per line: difficulty, string,
                               letters, answer, completion (and the prediction and its grade)
    adapter/                   the LoRA adapter of that step (adapter_config.json + safetensors),
                               loadable by `picorl eval --adapter`
    run.json                   the step, its accuracies, the machines and the wall time of each
                               kind of step (from timings.jsonl: failed tries count too)
    fresh_eval.jsonl           with --fresh N: the same adapter, greedy, on N fresh items per
                               eval difficulty (`picorl gen --split fresh`: strings no run
                               generates, letters drawn uniformly); run.json gets `fresh_exact`

Everything is written into a hidden folder beside `out` and renamed at the end, and `out`
must not exist yet, so an export never leaves half a folder nor overwrites an earlier one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from picorl.config import load_config
from picorl.data import check_fresh_size, fresh_records, write_jsonl
from picorl.files import atomic_folder
from picorl.pipeline import eval_engine, read_timings
from picorl.run_folder import RunFolder

EVAL_FIELDS = ("difficulty", "string", "letters", "answer", "completion", "prediction", "exact", "partial",
               "formatted")


def final_eval(run_dir: Path, step: int | None = None) -> dict:
    """The eval of `step`, or the run's last one."""
    files = RunFolder(run_dir).eval_files()
    if not files:
        raise FileNotFoundError(f"{run_dir} has no evals/step_N.json: is it a run folder, and did an eval run?")
    step = max(files) if step is None else step
    if step not in files:
        raise FileNotFoundError(f"{run_dir} has no eval of step {step}; evaluated steps: {sorted(files)}")
    return json.loads(files[step].read_text())


def time_summary(timings: list[dict]) -> dict:
    """Seconds per kind of step; `training_minutes` is SFT + GRPO, every try counted."""
    seconds = {kind: round(sum(t["seconds"] for t in timings if t["task"] == kind), 1) for kind in ("sft", "grpo", "eval")}
    return {"seconds": seconds, "training_minutes": round((seconds["sft"] + seconds["grpo"]) / 60, 2),
            "failed_tries": sum(not t["ok"] for t in timings),
            "machines": sorted({t["machine"] for t in timings})}


def fresh_eval(cfg, adapter: Path, n: int, progress: bool = True) -> tuple[dict, list[dict]]:
    """Greedy eval of the adapter on n fresh items per eval difficulty, decoded as the run's evals were."""
    from picorl.evaluate import evaluate_sets
    from picorl.models import load_for_config

    model, tok = load_for_config(cfg, adapter=adapter)
    sets = {d: fresh_records(d, n) for d in cfg.eval.difficulties}
    return evaluate_sets(model, tok, sets, max_tokens=cfg.eval.max_tokens,
                         engine=eval_engine(cfg, model, tok, progress))


def eval_lines(items: list[dict]) -> list[dict]:
    return [{k: item.get(k) for k in EVAL_FIELDS} for item in items]


def per_difficulty(by_d: dict, key: str) -> dict:
    return {f"d{d}": s[key] for d, s in by_d.items()}


def export_run(run_dir, out, step: int | None = None, fresh: int = 0, progress: bool = True) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists: export into a new folder")
    if fresh < 0:
        raise ValueError(f"--fresh must be >= 0 items per difficulty, got {fresh}")
    result = final_eval(run_dir, step)
    step = result["step"]
    run = RunFolder(run_dir)
    adapter = run.checkpoint(step) / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"no LoRA adapter for step {step} at {adapter} (pruned, or a full fine-tune?)")
    needed = [run.config, run.report, run.curves]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing from the run folder: {', '.join(missing)} (the flow's report step writes "
                                "report.md and curves.png)")
    if fresh:  # before anything is copied: a fresh set its tier cannot give is refused, not drawn forever
        for d in load_config(run.config).eval.difficulties:
            check_fresh_size(d, fresh)
    with atomic_folder(out) as tmp:
        for p in needed:
            shutil.copy2(p, tmp / p.name)
        (tmp / "adapter").mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(adapter / name, tmp / "adapter" / name)
        write_jsonl(eval_lines(result["items"]), tmp / "final_eval.jsonl")
        summary = {"step": step, "exact": per_difficulty(result["by_difficulty"], "exact"),
                   "n": per_difficulty(result["by_difficulty"], "n"), **time_summary(read_timings(run_dir))}
        if fresh:
            by_d, items = fresh_eval(load_config(run.config), tmp / "adapter", fresh, progress)
            write_jsonl(eval_lines(items), tmp / "fresh_eval.jsonl")
            summary["fresh_exact"] = per_difficulty(by_d, "exact")
            summary["fresh_n"] = fresh
        (tmp / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out
