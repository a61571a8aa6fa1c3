"""MLflow brought up to date with a run folder, through an outage.

The run folder is the record; MLflow gets a copy. `deliver` logs whatever the folder holds
that MLflow lacks (metric rows, eval tables, checkpoints, data manifest), so when the
tracking server is unreachable training goes on and the gap is delivered on its return.
Only an outage longer than `run.tracking_outage_s` raises `TrackingOutage` (and the task's
retry resumes).
"""
from __future__ import annotations

import json
import time

import requests
from mlflow.exceptions import MlflowException

from picorl import checkpoint
from picorl.run_folder import RunFolder
from picorl.run_records import eval_rows, read_history
from tracking import runs

# An unreachable server, and a full, read-only or denied artifact store (OSError from the
# artifact repository): either way MLflow cannot take the records now, and the run folder
# keeps them until it can.
TRACKING_ERRORS = (MlflowException, requests.exceptions.RequestException, OSError)
_OUTAGE_SINCE: dict[str, float] = {}  # parent run id -> when delivery first failed


class TrackingOutage(RuntimeError):
    """MLflow stayed unreachable for longer than run.tracking_outage_s."""


def _deliver_once(run: dict, cfg) -> None:
    c = runs.client()
    parent, folder = run["parent_run_id"], RunFolder(run["run_dir"])
    for f in (folder.manifest, folder.sample):
        if f.is_file() and not runs.has_artifact(c, parent, f"data/{f.name}"):
            c.log_artifact(parent, str(f), "data")
    runs.sync_rows(c, parent, cfg, read_history(folder.root) + eval_rows(folder.root))
    for f in folder.eval_files().values():
        table = f"eval/{f.name}"
        if not runs.has_artifact(c, parent, table):
            runs.log_eval_table(c, parent, json.loads(f.read_text())["items"], table)
    for ckpt in checkpoint.list_checkpoints(folder.checkpoints):
        if not runs.has_artifact(c, parent, f"{runs.CHECKPOINTS}/{ckpt.name}"):
            c.log_artifacts(parent, str(ckpt), f"{runs.CHECKPOINTS}/{ckpt.name}")


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def deliver(run: dict, cfg, *, wait: bool = False) -> bool:
    """Bring MLflow up to date with the run folder. Tolerates an outage up to the configured limit.

    `run` is {"run_dir": ..., "parent_run_id": ...}. wait=True (the last task) keeps trying
    until delivery succeeds or the limit is reached.
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
                raise TrackingOutage(f"MLflow at {runs.tracking_uri()} could not take the run's records for "
                                     f"{down:.0f} s (run.tracking_outage_s={limit:g}; last error: {_short(e)}); "
                                     f"the run folder keeps everything: {run['run_dir']}") from e
            print(f"MLflow could not take the run's records for {down:.0f} s, training goes on; will deliver "
                  f"later ({_short(e)})")
            if not wait:
                return False
            time.sleep(min(5.0, max(limit - down, 0.1)))


def log_report(run: dict, files) -> None:
    """The report, its curves and the timings (the files that exist) onto the parent run."""
    c = runs.client()
    for f in files:
        if f.is_file():
            c.log_artifact(run["parent_run_id"], str(f))
