"""Evaluate a model (+ adapter, or an MLflow run's checkpoint) on the held-out sets; log to MLflow.

    python -m flows.evaluate --run RUN_ID                 # the run's latest checkpoint
    python -m flows.evaluate --model smollm2-135m-instruct --adapter path/to/adapter
"""
from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from picorl import checkpoint, data, evaluate, models
from picorl.config import load_config
from picorl.run_folder import RunFolder
from tasks import tracking


def resolve_adapter(run_id: str, step: int | None) -> tuple[str, Path]:
    """(model name, adapter folder) of an MLflow training run's checkpoint (latest when step is None)."""
    run = tracking.client().get_run(run_id)
    folder = RunFolder(run.data.tags.get("picorl.run_dir", ""))
    cfg = load_config(folder.config)
    root = folder.checkpoints
    ckpt = folder.checkpoint(step) if step is not None else checkpoint.latest_checkpoint(root)
    if ckpt is None or not (ckpt / "adapter").is_dir():
        raise FileNotFoundError(f"run {run_id}: no adapter checkpoint under {root}" +
                                (f" for step {step}" if step is not None else ""))
    return cfg.model.name, ckpt / "adapter"


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model(model_name: str, adapter: str | None, difficulties: list[int], size: int,
                   max_tokens: int, batch_size: int, seed: int) -> dict:
    model, tok = models.load_model(model_name)
    if adapter:
        model = models.load_adapter(model, adapter)
    sets = {d: data.eval_records(d, size, seed=seed) for d in difficulties}
    by_d, items = evaluate.evaluate_sets(model, tok, sets, max_tokens=max_tokens, batch_size=batch_size)
    return {"by_difficulty": {str(d): s for d, s in by_d.items()}, "items": items}


@flow(name="picorl-evaluate")
def evaluate_flow(model: str = models.EMBEDDED, adapter: str | None = None, run_id: str | None = None,
                  step: int | None = None, difficulties: list[int] = (3, 5, 6), size: int = 128,
                  max_tokens: int = 512, batch_size: int = 32, seed: int = data.EVAL_SEED,
                  experiment: str = "picorl") -> dict:
    if run_id:
        model, adapter_path = resolve_adapter(run_id, step)
        adapter = str(adapter_path)
    result = evaluate_model(model, adapter, list(difficulties), size, max_tokens, batch_size, seed)
    c = tracking.client()
    run = c.create_run(tracking.experiment_id(c, experiment), run_name=f"eval-{Path(adapter).parent.name if adapter else model}",
                       tags={"picorl.eval_of": run_id or adapter or model, "picorl.model": model})
    rid = run.info.run_id
    tracking.log_params(c, rid, {"model": model, "adapter": adapter, "size": size, "seed": seed})
    from picorl.pipeline import eval_row
    tracking.sync_rows(c, rid, None, [{**eval_row({"step": step or 0, "by_difficulty": result["by_difficulty"]}),
                                       "stage": None}])
    tracking.log_eval_table(c, rid, result["items"], "eval/items.json")
    c.set_terminated(rid, "FINISHED")
    summary = {d: s["exact"] for d, s in result["by_difficulty"].items()}
    print(f"exact by difficulty: {summary}  (MLflow run {rid})")
    return {"run_id": rid, "by_difficulty": result["by_difficulty"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.evaluate")
    p.add_argument("--model", default=models.EMBEDDED)
    p.add_argument("--adapter", default=None)
    p.add_argument("--run", dest="run_id", default=None, help="MLflow run id of a training run")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--difficulties", type=int, nargs="+", default=[3, 5, 6])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=512)
    args = p.parse_args(argv)
    evaluate_flow(model=args.model, adapter=args.adapter, run_id=args.run_id, step=args.step,
                  difficulties=args.difficulties, size=args.size, max_tokens=args.max_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
