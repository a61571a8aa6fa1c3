"""Export a finished run folder as a results folder worth committing.

    picorl export --run-dir outputs/gpu-curriculum-<stamp> --out results/<date>-smollm2-curriculum

writes
    report.md, curves.png      the run's report (the flow's last step writes them)
    config.yaml                the resolved config the run trained with
    final_eval.jsonl           the last greedy eval, one item per line: the record's fields (letter
                               counting: difficulty, string, letters, answer), the completion, the
                               prediction and its grade (with eval.samples, `sampled`: the
                               fraction of the item's samples exactly right)
    adapter/                   the LoRA adapter of that step (adapter_config.json + safetensors),
                               loadable by `picorl eval --adapter`
    run.json                   the step, its accuracies, the machines and the wall time of each
                               kind of step (from timings.jsonl: failed tries count too)
    fresh_eval.jsonl           with --fresh N: the same adapter, greedy, on N fresh items per
                               eval difficulty (`picorl gen --split fresh`: items no run
                               generates; letter counting draws the letters uniformly there);
                               run.json gets `fresh_exact`
and, when the run kept its after-SFT checkpoint (step_0) and evaluated it, the baseline that
GRPO is measured against, on the same items:
    sft_adapter/, sft_eval.jsonl     step 0's adapter and its eval of the run's held-out items
    sft_fresh_eval.jsonl             with --fresh N: step 0's adapter on the same fresh items
                                     run.json's `change` (and `fresh_change`): per difficulty,
                                     exact before -> after, items gained and lost, sign-test p
                                     (with eval.samples, `sampled`: the same for the samples)

Everything is written into a hidden folder beside `out` and renamed at the end, and `out`
must not exist yet, so an export never leaves half a folder nor overwrites an earlier one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from picorl import checkpoint
from picorl.config import load_config
from picorl.data import check_fresh_size, fresh_records, write_jsonl
from picorl.envs import env_of
from picorl.evaluate import item_fields
from picorl.faults import fault_point
from picorl.files import atomic_folder
from picorl.run_folder import RunFolder
from picorl.run_records import read_timings
from picorl.session import eval_engine


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


def fresh_eval(cfg, adapter: Path, sets: dict[int, list[dict]], progress: bool = True) -> tuple[dict, list[dict]]:
    """Greedy eval of the adapter on fresh sets ({difficulty: records}), decoded as the run's evals were."""
    from picorl.evaluate import evaluate_sets
    from picorl.models import load_for_config

    model, tok = load_for_config(cfg, adapter=adapter)
    return evaluate_sets(model, tok, sets, max_tokens=cfg.eval.max_tokens,
                         engine=eval_engine(cfg, model, tok, progress), env=env_of(cfg))


def changes(before: list[dict], after: list[dict]) -> dict:
    """{"d3": paired_change of that difficulty's items} for two evals of the same items."""
    from picorl.evaluate import changes_by_difficulty
    return {f"d{d}": c for d, c in changes_by_difficulty(before, after).items()}


def eval_lines(items: list[dict]) -> list[dict]:
    fields = item_fields(items)
    return [{k: item.get(k) for k in fields} for item in items]


def per_difficulty(by_d: dict, key: str) -> dict:
    return {f"d{d}": s[key] for d, s in by_d.items()}


def export_run(run_dir, out, step: int | None = None, fresh: int = 0, progress: bool = True) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists: export into a new folder")
    if fresh < 0:
        raise ValueError(f"--fresh must be >= 0 items per difficulty, got {fresh}")
    result = final_eval(run_dir, step)
    if out.resolve().is_relative_to(run_dir.resolve()):  # checked once run_dir is known to be a run
        raise ValueError(f"--out {out} is inside the run folder {run_dir}: export to a folder outside it "
                         "(inside, it becomes part of the run it copies)")
    step = result["step"]
    run = RunFolder(run_dir)
    if checkpoint.adapter_path(run.checkpoint(step)) is None:
        raise FileNotFoundError(f"no LoRA adapter for step {step} in {run.checkpoint(step)} (pruned, or a full "
                                "fine-tune?)")
    needed = [run.config, run.report, run.curves]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing from the run folder: {', '.join(missing)} (the flow's report step writes "
                                "report.md and curves.png)")
    if fresh:  # before anything is copied: a fresh set its tier cannot give is refused, not drawn forever
        cfg = load_config(run.config)
        for d in cfg.eval.difficulties:
            check_fresh_size(d, fresh, env_of(cfg))
    files = run.eval_files()
    baseline = step != 0 and 0 in files and checkpoint.adapter_path(run.checkpoint(0)) is not None
    with atomic_folder(out) as tmp:
        for p in needed:
            shutil.copy2(p, tmp / p.name)
        checkpoint.copy_adapter(run.checkpoint(step), tmp / "adapter")
        fault_point("export", step)
        write_jsonl(eval_lines(result["items"]), tmp / "final_eval.jsonl")
        summary = {"step": step, "exact": per_difficulty(result["by_difficulty"], "exact"),
                   "n": per_difficulty(result["by_difficulty"], "n"), **time_summary(read_timings(run_dir))}
        if baseline:
            first = json.loads(files[0].read_text())
            checkpoint.copy_adapter(run.checkpoint(0), tmp / "sft_adapter")
            write_jsonl(eval_lines(first["items"]), tmp / "sft_eval.jsonl")
            summary["sft_exact"] = per_difficulty(first["by_difficulty"], "exact")
            summary["change"] = changes(first["items"], result["items"])
        if fresh:
            sets = {d: fresh_records(d, fresh, env=env_of(cfg)) for d in cfg.eval.difficulties}  # one draw for both
            by_d, items = fresh_eval(cfg, tmp / "adapter", sets, progress)
            write_jsonl(eval_lines(items), tmp / "fresh_eval.jsonl")
            summary["fresh_exact"] = per_difficulty(by_d, "exact")
            summary["fresh_n"] = fresh
            if baseline:
                sft_by_d, sft_items = fresh_eval(cfg, tmp / "sft_adapter", sets, progress)
                write_jsonl(eval_lines(sft_items), tmp / "sft_fresh_eval.jsonl")
                summary["sft_fresh_exact"] = per_difficulty(sft_by_d, "exact")
                summary["fresh_change"] = changes(sft_items, items)
        (tmp / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out
