"""The training pipeline's Prefect tasks. Each one: call picorl, then deliver to MLflow.

Tasks take and return paths and small dicts (never models): `run` is the run handle
{"run_dir": ..., "parent_run_id": ..., "config": the resolved config as a dict} that the flow
made once (flows/train.py `open_run`), so no task reads the YAML again.
The model stays loaded between tasks in picorl's process-wide session (picorl/session.py).

The run folder is the record; MLflow gets a copy (tracking/delivery.py): when the tracking
server is unreachable training goes on and the gap is delivered on its return. Only an
outage longer than `run.tracking_outage_s` fails a task (and its retry resumes).
"""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from picorl import pipeline, report, run_records
from picorl.config import config_from_dict
from picorl.parallel import run_any_chunk, run_any_sft
from picorl.plan import Chunk
from picorl.run_folder import RunFolder
from tracking.delivery import deliver, log_report


def run_config(run: dict):
    """The run handle's config."""
    return config_from_dict(run["config"])


def run_step(run: dict, step, *args):
    """The one shape of a pipeline task: the picorl step on the run's folder with the run's
    config, then MLflow brought up to date with the folder, also when the step failed
    (whatever reached a checkpoint, e.g. before a numerical stop, is delivered)."""
    cfg = run_config(run)
    try:
        return step(cfg, run["run_dir"], *args)
    finally:
        deliver(run, cfg)


@task(name="build-data", cache_policy=NO_CACHE)
def build_data(run: dict) -> dict:
    return run_step(run, pipeline.build_data)


@task(name="sft", cache_policy=NO_CACHE)
def sft(run: dict) -> dict:
    return run_step(run, run_any_sft)


@task(name="grpo-chunk", task_run_name="grpo-{chunk[start]}-{chunk[end]}", cache_policy=NO_CACHE)
def grpo_chunk(run: dict, chunk: dict) -> dict:
    return run_step(run, run_any_chunk, Chunk(**chunk))


@task(name="eval", task_run_name="eval-{step}", cache_policy=NO_CACHE)
def evaluate(run: dict, step: int) -> dict:
    result = run_step(run, pipeline.run_eval, step)
    return {"step": step, **{f"d{d}": s["exact"] for d, s in result["by_difficulty"].items()}}


@task(name="report", cache_policy=NO_CACHE)
def write_report(run: dict) -> dict:
    cfg = run_config(run)
    history = run_records.read_history(run["run_dir"])
    evals = run_records.eval_rows(run["run_dir"])
    gains = run_records.grpo_gains(run["run_dir"])
    md, png = report.write_report(cfg, history, evals, run["run_dir"], gains=gains)
    deliver(run, cfg, wait=True)  # the run is not done until MLflow has all of it
    log_report(run, [md, png, RunFolder(run["run_dir"]).timings])
    return {"report": str(md), "curves": str(png), "gains": [report.gain_line(d, g) for d, g in gains.items()]}
