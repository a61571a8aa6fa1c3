"""The training pipeline's Prefect tasks. Each one: call picorl, then deliver to MLflow.

Tasks take and return paths and small dicts (never models): `run` is
{"run_dir": ..., "parent_run_id": ...}, and the resolved config is read from the run folder.
The model stays loaded between tasks in picorl's process-wide session cache.

The run folder is the record; MLflow gets a copy. `deliver` logs whatever the folder holds
that MLflow lacks (metric rows, eval tables, checkpoints, data manifest), so when the
tracking server is unreachable training goes on and the gap is delivered on its return.
Only an outage longer than `run.tracking_outage_s` fails a task (and its retry resumes).
"""
from __future__ import annotations

import json
import time

import requests
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE

from picorl import checkpoint, pipeline, report
from picorl.parallel import run_chunk_parallel, run_sft_parallel
from picorl.plan import Chunk
from picorl.run_folder import RunFolder
from tasks import tracking

# An unreachable server, and a full, read-only or denied artifact store (OSError from the
# artifact repository): either way MLflow cannot take the records now, and the run folder
# keeps them until it can.
TRACKING_ERRORS = (MlflowException, requests.exceptions.RequestException, OSError)
_OUTAGE_SINCE: dict[str, float] = {}  # parent run id -> when delivery first failed


class TrackingOutage(RuntimeError):
    """MLflow stayed unreachable for longer than run.tracking_outage_s."""


def run_config(run: dict):
    return pipeline.run_config(run["run_dir"])


def _deliver_once(run: dict, cfg) -> None:
    c = tracking.client()
    parent, folder = run["parent_run_id"], RunFolder(run["run_dir"])
    for f in (folder.manifest, folder.sample):
        if f.is_file() and not tracking.has_artifact(c, parent, f"data/{f.name}"):
            c.log_artifact(parent, str(f), "data")
    tracking.sync_rows(c, parent, cfg, pipeline.read_history(folder.root) + pipeline.eval_rows(folder.root))
    for f in folder.eval_files().values():
        table = f"eval/{f.name}"
        if not tracking.has_artifact(c, parent, table):
            tracking.log_eval_table(c, parent, json.loads(f.read_text())["items"], table)
    for ckpt in checkpoint.list_checkpoints(folder.checkpoints):
        if not tracking.has_artifact(c, parent, f"{tracking.CHECKPOINTS}/{ckpt.name}"):
            c.log_artifacts(parent, str(ckpt), f"{tracking.CHECKPOINTS}/{ckpt.name}")


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def deliver(run: dict, cfg, *, wait: bool = False) -> bool:
    """Bring MLflow up to date with the run folder. Tolerates an outage up to the configured limit.

    wait=True (the last task) keeps trying until delivery succeeds or the limit is reached.
    """
    limit = cfg.run.tracking_outage_s
    while True:
        try:
            _deliver_once(run, cfg)
            _OUTAGE_SINCE.pop(run["parent_run_id"], None)
            return True
        except TRACKING_ERRORS as e:
            since = _OUTAGE_SINCE.setdefault(run["parent_run_id"], time.time())
            down = time.time() - since
            if down > limit:
                _OUTAGE_SINCE.pop(run["parent_run_id"], None)
                raise TrackingOutage(f"MLflow at {tracking.tracking_uri()} could not take the run's records for "
                                     f"{down:.0f} s (run.tracking_outage_s={limit:g}; last error: {_short(e)}); "
                                     f"the run folder keeps everything: {run['run_dir']}") from e
            print(f"MLflow could not take the run's records for {down:.0f} s, training goes on; will deliver "
                  f"later ({_short(e)})")
            if not wait:
                return False
            time.sleep(min(5.0, max(limit - down, 0.1)))


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


def data_parallel(cfg) -> bool:
    return cfg.run.nproc_per_node > 1 or cfg.run.nnodes > 1


def run_any_sft(cfg, run_dir) -> dict:
    """SFT in this process, or under torchrun as the chunks are (picorl/parallel.py)."""
    return (run_sft_parallel if data_parallel(cfg) else pipeline.run_sft)(cfg, run_dir)


def run_any_chunk(cfg, run_dir, chunk: Chunk) -> dict:
    """In this process, or under torchrun with one process per GPU, on one machine or several (picorl/parallel.py)."""
    runner = run_chunk_parallel if data_parallel(cfg) else pipeline.run_chunk
    return runner(cfg, run_dir, chunk)


@task(name="eval", task_run_name="eval-{step}", cache_policy=NO_CACHE)
def evaluate(run: dict, step: int) -> dict:
    result = run_step(run, pipeline.run_eval, step)
    return {"step": step, **{f"d{d}": s["exact"] for d, s in result["by_difficulty"].items()}}


@task(name="report", cache_policy=NO_CACHE)
def write_report(run: dict) -> dict:
    cfg = run_config(run)
    history = pipeline.read_history(run["run_dir"])
    evals = pipeline.eval_rows(run["run_dir"])
    gains = pipeline.grpo_gains(run["run_dir"])
    md, png = report.write_report(cfg, history, evals, run["run_dir"], gains=gains)
    deliver(run, cfg, wait=True)  # the run is not done until MLflow has all of it
    c = tracking.client()
    c.log_artifact(run["parent_run_id"], str(md))
    c.log_artifact(run["parent_run_id"], str(png))
    timings = RunFolder(run["run_dir"]).timings
    if timings.is_file():
        c.log_artifact(run["parent_run_id"], str(timings))
    return {"report": str(md), "curves": str(png), "gains": [report.gain_line(d, g) for d, g in gains.items()]}
