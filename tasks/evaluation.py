"""Prefect tasks of the evaluation flow: evaluate a model on the held-out sets, log it to MLflow."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from picorl import data, evaluate, models
from picorl.envs import load_env
from tracking import runs


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
    return runs.log_evaluation_run(result, experiment=experiment, model=model, adapter=adapter, of=of, step=step,
                                   size=size, seed=seed)
