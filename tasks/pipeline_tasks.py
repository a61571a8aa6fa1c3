"""The training pipeline's Prefect tasks. Each one: call picorl, then log what it produced.

Tasks take and return paths and small dicts (never models): `run` is
{"run_dir": ..., "parent_run_id": ...}, and the resolved config is read from the run folder.
The model stays loaded between tasks in picorl's process-wide session cache.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from picorl import pipeline, report
from picorl.config import load_config
from picorl.plan import Chunk
from tasks import tracking


def run_config(run: dict):
    return load_config(Path(run["run_dir"]) / "config.yaml")


def _sync(run: dict, cfg, rows: list[dict]) -> int:
    return tracking.sync_rows(tracking.client(), run["parent_run_id"], cfg, rows)


def _log_checkpoint(run: dict, ckpt: str) -> None:
    c = tracking.client()
    name = Path(ckpt).name
    if not tracking.has_artifact(c, run["parent_run_id"], f"checkpoints/{name}"):
        c.log_artifacts(run["parent_run_id"], ckpt, f"checkpoints/{name}")


@task(name="build-data", cache_policy=NO_CACHE)
def build_data(run: dict) -> dict:
    cfg = run_config(run)
    manifest = pipeline.build_data(cfg, run["run_dir"])
    c = tracking.client()
    data_dir = Path(run["run_dir"]) / "data"
    for name in ("manifest.json", "sample.jsonl"):
        if not tracking.has_artifact(c, run["parent_run_id"], f"data/{name}"):
            c.log_artifact(run["parent_run_id"], str(data_dir / name), "data")
    return manifest


@task(name="sft", cache_policy=NO_CACHE)
def sft(run: dict) -> dict:
    cfg = run_config(run)
    out = pipeline.run_sft(cfg, run["run_dir"])
    _sync(run, cfg, pipeline.read_history(run["run_dir"]))
    _log_checkpoint(run, out["checkpoint"])
    return out


@task(name="grpo-chunk", task_run_name="grpo-{chunk[start]}-{chunk[end]}", cache_policy=NO_CACHE)
def grpo_chunk(run: dict, chunk: dict) -> dict:
    cfg = run_config(run)
    try:
        out = pipeline.run_chunk(cfg, run["run_dir"], Chunk(**chunk))
    finally:
        # Whatever reached a checkpoint (also the one written before a numerical stop) is logged.
        _sync(run, cfg, pipeline.read_history(run["run_dir"]))
    _log_checkpoint(run, out["checkpoint"])
    return out


@task(name="eval", task_run_name="eval-{step}", cache_policy=NO_CACHE)
def evaluate(run: dict, step: int) -> dict:
    cfg = run_config(run)
    result = pipeline.run_eval(cfg, run["run_dir"], step)
    _sync(run, cfg, [pipeline.eval_row(result)])
    c = tracking.client()
    table = f"eval/step_{step}.json"
    if not tracking.has_artifact(c, run["parent_run_id"], table):
        cols = ["difficulty", "string", "letters", "answer", "completion", "exact", "partial", "formatted"]
        c.log_table(run["parent_run_id"], data={k: [json.dumps(i.get(k)) if isinstance(i.get(k), (dict, list))
                                                   else i.get(k) for i in result["items"]] for k in cols},
                    artifact_file=table)
    return {"step": step, **{f"d{d}": s["exact"] for d, s in result["by_difficulty"].items()}}


@task(name="report", cache_policy=NO_CACHE)
def write_report(run: dict) -> dict:
    cfg = run_config(run)
    history = pipeline.read_history(run["run_dir"])
    evals = pipeline.eval_rows(run["run_dir"])
    md, png = report.write_report(cfg, history, evals, run["run_dir"])
    c = tracking.client()
    c.log_artifact(run["parent_run_id"], str(md))
    c.log_artifact(run["parent_run_id"], str(png))
    return {"report": str(md), "curves": str(png)}
