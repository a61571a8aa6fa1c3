"""Prefect tasks of the evaluation flow: evaluate a model on the held-out sets, log it to MLflow."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from picorl import checkpoint, data, evaluate, models, pipeline
from picorl.envs import load_env
from picorl.run_folder import RunFolder
from tasks import tracking


def adapter_of_run(run_id: str, step: int | None) -> tuple[str, Path, dict]:
    """(model name, adapter folder, env {name, options}) of an MLflow training run's checkpoint
    (latest when step is None)."""
    folder = RunFolder(tracking.run_dir_of(run_id) or "")
    cfg = pipeline.run_config(folder.root)
    ckpt = folder.checkpoint(step) if step is not None else checkpoint.latest_checkpoint(folder.checkpoints)
    adapter = None if ckpt is None else checkpoint.adapter_path(ckpt)
    if adapter is None:
        raise FileNotFoundError(f"run {run_id}: no adapter checkpoint under {folder.checkpoints}" +
                                (f" for step {step}" if step is not None else ""))
    return cfg.model.name, adapter, {"name": cfg.env.name, "options": cfg.env.options}


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model(model_name: str, adapter: str | None, difficulties: list[int], size: int,
                   max_tokens: int, batch_size: int, seed: int, env: dict | None = None) -> dict:
    """Greedy eval on the environment's held-out sets (`env`: {name, options}; letter counting by default)."""
    environment = load_env(**(env or {}))
    sets = {d: data.eval_records(d, size, seed=seed, env=environment) for d in difficulties}  # bad input: before loading
    model, tok = models.load_model(model_name)
    if adapter:
        model = models.load_adapter(model, adapter)
    by_d, items = evaluate.evaluate_sets(model, tok, sets, max_tokens=max_tokens, batch_size=batch_size,
                                         env=environment)
    return {"by_difficulty": {str(d): s for d, s in by_d.items()}, "items": items}


@task(name="log-evaluation", cache_policy=NO_CACHE)
def log_evaluation(result: dict, *, experiment: str, model: str, adapter: str | None, of: str,
                   step: int | None, size: int, seed: int) -> str:
    """An MLflow run holding one evaluation: params, accuracies and the per-item table. Returns its id."""
    c = tracking.client()
    run = c.create_run(tracking.experiment_id(c, experiment),
                       run_name=f"eval-{Path(adapter).parent.name if adapter else model}",
                       tags={"picorl.eval_of": of, "picorl.model": model})
    rid = run.info.run_id
    tracking.log_params(c, rid, {"model": model, "adapter": adapter, "size": size, "seed": seed})
    tracking.sync_rows(c, rid, None, [{**pipeline.eval_row({"step": step or 0, "by_difficulty": result["by_difficulty"]}),
                                       "stage": None}])
    tracking.log_eval_table(c, rid, result["items"], "eval/items.json")
    c.set_terminated(rid, "FINISHED")
    return rid
