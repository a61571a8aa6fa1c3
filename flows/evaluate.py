"""Evaluate a model (+ adapter, or an MLflow run's checkpoint) on the held-out sets; log to MLflow.

    evaluate -> log (tasks/evaluation.py; the MLflow side in tracking/runs.py)

    python -m flows.evaluate --run RUN_ID                 # the run's latest checkpoint
    python -m flows.evaluate --model smollm2-135m-instruct --adapter path/to/adapter
"""
from __future__ import annotations

import argparse

from prefect import flow

from picorl import data, models
from tasks.evaluation import evaluate_model, log_evaluation
from tracking.runs import adapter_of_run


@flow(name="picorl-evaluate")
def evaluate_flow(model: str = models.EMBEDDED, adapter: str | None = None, run_id: str | None = None,
                  step: int | None = None, difficulties: list[int] = (3, 5, 6), size: int = 128,
                  max_tokens: int = 512, batch_size: int = 32, seed: int = data.EVAL_SEED,
                  experiment: str = "picorl", env: str = "letter_counting", env_options: dict | None = None) -> dict:
    """A run's checkpoint is evaluated on its own environment's tasks; a model or adapter on `env`'s."""
    env_spec = {"name": env, "options": env_options or {}}
    if run_id:
        model, adapter_path, env_spec = adapter_of_run(run_id, step)
        adapter = str(adapter_path)
    result = evaluate_model(model, adapter, list(difficulties), size, max_tokens, batch_size, seed, env_spec)
    rid = log_evaluation(result, experiment=experiment, model=model, adapter=adapter,
                         of=run_id or adapter or model, step=step, size=size, seed=seed)
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
