"""MLflow for picoRL runs: where runs live, parent and child runs, exactly-once metric logging.

Metric rows come from the pipeline's records (checkpoint history and eval files). Each row
is one step of one kind, logged with one `log_batch`, so one metric per kind tells whether
the row is already in MLflow. `sync_rows` logs only the rows that are not, which makes
logging idempotent across retries and resumes: every step lands exactly once.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from collections import defaultdict
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from picorl.config import flatten, to_dict
from picorl.evaluate import item_fields
from picorl.faults import fault_point
from picorl.plan import stage_names

DEFAULT_STORE = Path("mlruns")
_READY: set[str] = set()  # SQLite stores this process has seen initialised
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the classic runs view, not GenAI
SENTINEL = {"sft": "sft/loss", "train": "train/reward_mean"}


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (e.g. a real `mlflow server`), else a SQLite file under mlruns/."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    DEFAULT_STORE.mkdir(exist_ok=True)
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def client() -> MlflowClient:
    # MLflow's HTTP client retries a dead server for minutes per call by default; picoRL keeps
    # its own record and delivers later (tasks.pipeline_tasks.deliver), so fail fast instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    uri = tracking_uri()
    if not uri.startswith("sqlite:") or uri in _READY:
        return MlflowClient(tracking_uri=uri)
    # Two runs starting at once would both create and migrate a new SQLite store and break
    # each other's schema; whoever comes first does it under a file lock, the other waits.
    db = Path(uri.removeprefix("sqlite:///"))
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        c = MlflowClient(tracking_uri=uri)
        c.search_experiments(max_results=1)
    _READY.add(uri)
    return c


def ui_hint(experiment_id: str, run_id: str) -> str:
    """The command that serves the UI (on 127.0.0.1) and the page of this run's metric charts."""
    uri = tracking_uri()
    page = f"#/experiments/{experiment_id}/runs/{run_id}/model-metrics?workflowType=machine_learning"
    if uri.startswith("sqlite:"):
        return (f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000\n"
                f"  then open http://127.0.0.1:5000/{page}")
    return f"open {uri.rstrip('/')}/{page}"


def experiment_id(c: MlflowClient, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is None:
        artifacts = None
        if c.tracking_uri.startswith("sqlite:"):
            db = Path(c.tracking_uri.removeprefix("sqlite:///"))
            artifacts = (db.parent / "artifacts").resolve().as_uri()
        try:
            exp_id = c.create_experiment(name, artifact_location=artifacts)
        except Exception:  # another run created it first
            exp_id = c.get_experiment_by_name(name).experiment_id
    else:
        exp_id = exp.experiment_id
    c.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
    return exp_id


def log_params(c: MlflowClient, run_id: str, params: dict) -> None:
    """Params in batches of 100 (values cut to MLflow's 6000-character limit)."""
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def log_config(c: MlflowClient, run_id: str, cfg) -> None:
    """The flattened resolved config as params."""
    log_params(c, run_id, flatten(to_dict(cfg)))


def log_eval_table(c: MlflowClient, run_id: str, items: list[dict], artifact_file: str) -> None:
    """Per-item eval completions as an MLflow table (lists and dicts as JSON text)."""
    c.log_table(run_id, data={k: [json.dumps(i.get(k)) if isinstance(i.get(k), (dict, list)) else i.get(k)
                                  for i in items] for k in item_fields(items)}, artifact_file=artifact_file)


def stage_run_name(cfg, stage) -> str | None:
    if stage == "sft" or stage == -1:
        return "sft"
    if isinstance(stage, int) and 0 <= stage < len(cfg.stages):
        return stage_names(cfg)[stage]
    return None


def child_run(c: MlflowClient, parent_id: str, name: str) -> str:
    """The child run `name` of a parent, created on first use and found again on resume."""
    parent = c.get_run(parent_id)
    found = c.search_runs([parent.info.experiment_id],
                          filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.`picorl.stage` = '{name}'")
    if found:
        return found[0].info.run_id
    run = c.create_run(parent.info.experiment_id, run_name=name,
                       tags={"mlflow.parentRunId": parent_id, "picorl.stage": name})
    return run.info.run_id


def _logged_steps(c: MlflowClient, run_id: str, key: str) -> set[int]:
    return {m.step for m in c.get_metric_history(run_id, key)}


def sync_rows(c: MlflowClient, parent_id: str, cfg, rows: list[dict]) -> int:
    """Log every row not yet in MLflow to the parent run and its stage's child run; return how many."""
    by_run: dict[str, list[dict]] = defaultdict(list)
    children: dict[str, str] = {}
    for r in rows:
        by_run[parent_id].append(r)
        name = stage_run_name(cfg, r.get("stage"))
        if name is not None:
            if name not in children:
                children[name] = child_run(c, parent_id, name)
            by_run[children[name]].append(r)
    logged = 0
    now = int(time.time() * 1000)
    for run_id, rs in by_run.items():
        by_kind: dict[str, list[dict]] = defaultdict(list)
        for r in rs:
            by_kind[r["kind"]].append(r)
        for kind, krs in by_kind.items():
            sentinel = SENTINEL.get(kind) or sorted(krs[0]["metrics"])[0]
            done = _logged_steps(c, run_id, sentinel)
            for r in krs:
                if r["step"] in done:
                    continue
                fault_point("log", int(r["step"]))
                c.log_batch(run_id, metrics=[Metric(k, float(v), now, int(r["step"])) for k, v in r["metrics"].items()])
                done.add(r["step"])
                logged += 1
    return logged


def has_artifact(c: MlflowClient, run_id: str, path: str) -> bool:
    folder = str(Path(path).parent) if "/" in path else None
    return any(a.path == path for a in c.list_artifacts(run_id, folder))


def set_tags(c: MlflowClient, run_id: str, tags: dict) -> None:
    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def finish(c: MlflowClient, parent_id: str, status: str) -> None:
    """Close a parent run and its stage runs with `status`."""
    parent = c.get_run(parent_id)
    for child in c.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"):
        c.set_terminated(child.info.run_id, status)
    c.set_terminated(parent_id, status)


# ---------------------------------------------------------------- parent runs of the training flow


def run_dir_of(run_id: str) -> str | None:
    """The picorl run folder an MLflow run was made for (its `picorl.run_dir` tag); None if it has none.

    Raises LookupError when there is no such run at the tracking URI.
    """
    try:
        run = client().get_run(run_id)
    except Exception:
        raise LookupError(f"no such MLflow run {run_id} at {tracking_uri()}") from None
    return run.data.tags.get("picorl.run_dir")


def run_status(run_id: str) -> str:
    """RUNNING, FINISHED, FAILED or KILLED."""
    return client().get_run(run_id).info.status


def open_parent_run(cfg, run_dir, config_file, flow_run_id: str) -> str:
    """A new parent run for a training run folder: its config as params and artifact. Returns its id."""
    c = client()
    parent = c.create_run(experiment_id(c, cfg.run.experiment), run_name=cfg.run.name, tags={
        "prefect.flow_run_id": flow_run_id, "picorl.run_dir": str(run_dir), "picorl.parent": "true"})
    log_config(c, parent.info.run_id, cfg)
    c.log_artifact(parent.info.run_id, str(config_file))
    return parent.info.run_id


def reopen_parent_run(run_id: str, flow_run_id: str) -> None:
    """Mark a resumed parent run RUNNING again, under the flow run that continues it."""
    c = client()
    c.update_run(run_id, status="RUNNING")
    set_tags(c, run_id, {"prefect.flow_run_id": flow_run_id})


def close_parent_run(run_id: str, status: str) -> str | None:
    """Mark the parent run FINISHED or FAILED; returns the command that opens it in the MLflow UI."""
    c = client()
    finish(c, run_id, status)
    return ui_hint(c.get_run(run_id).info.experiment_id, run_id)


# ---------------------------------------------------------------- a run's records, portable


CHECKPOINTS = "checkpoints"  # the artifact folder a run's checkpoints are logged under
PORTABLE_STORE = "mlruns"  # inside an exported results folder: mlflow.db and artifacts/


def portable_ui_hint(folder) -> str:
    return (f"cd {folder} && mlflow ui --backend-store-uri sqlite:///{PORTABLE_STORE}/mlflow.db "
            f"--artifacts-destination {PORTABLE_STORE}/artifacts --host 127.0.0.1 --port 5000")


def export_records(run_dir, out_dir) -> dict:
    """Copy a training run's MLflow records (parent and stage runs: params, tags, metric
    histories, artifacts but the checkpoints) into out_dir/mlruns, so that `mlflow ui` opens
    them on any machine.

    The copy's artifact locations are `mlflow-artifacts:/...` URIs, which `mlflow ui
    --artifacts-destination mlruns/artifacts` resolves relative to where it is started
    (portable_ui_hint); a plain local store would record this machine's absolute paths.
    Returns {"runs": copied run count, "ui": the command that opens them}.
    """
    import shutil
    import tempfile

    src = client()
    run_dir = str(Path(run_dir).resolve())
    parents = src.search_runs([e.experiment_id for e in src.search_experiments()],
                              filter_string=f"tags.`picorl.run_dir` = '{run_dir}' and tags.`picorl.parent` = 'true'")
    if not parents:
        raise LookupError(f"no MLflow run at {tracking_uri()} has tag picorl.run_dir={run_dir}")
    parent = parents[0]
    children = src.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    store = Path(out_dir) / PORTABLE_STORE
    (store / "artifacts").mkdir(parents=True, exist_ok=True)
    dst = MlflowClient(tracking_uri=f"sqlite:///{(store / 'mlflow.db').resolve()}")
    name = src.get_experiment(parent.info.experiment_id).name
    exp = dst.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else dst.create_experiment(name, artifact_location=f"mlflow-artifacts:/{name}")
    dst.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
    new_ids = {}
    for run in [parent, *children]:
        tags = {k: v for k, v in run.data.tags.items() if k != "mlflow.parentRunId"}
        if "mlflow.parentRunId" in run.data.tags:
            tags["mlflow.parentRunId"] = new_ids[parent.info.run_id]
        copy = dst.create_run(exp_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name)
        rid = copy.info.run_id
        new_ids[run.info.run_id] = rid
        params = [Param(k, v) for k, v in run.data.params.items()]
        metrics = [m for key in run.data.metrics for m in src.get_metric_history(run.info.run_id, key)]
        for i in range(0, max(len(params), len(metrics)), 500):
            dst.log_batch(rid, metrics=metrics[i:i + 500], params=params[i:i + 500])
        # Artifacts go straight into the folder that `--artifacts-destination` serves. Not the
        # checkpoints: with optimizer state a GPU run's are over 100 MB each, too big to commit;
        # the final adapter is in the results folder, and every checkpoint stays in the source run.
        target = store / "artifacts" / copy.info.artifact_uri.removeprefix("mlflow-artifacts:/")
        with tempfile.TemporaryDirectory() as tmp:
            for item in src.list_artifacts(run.info.run_id):
                if item.path == CHECKPOINTS:
                    dst.set_tag(rid, "picorl.checkpoints", f"not copied; in run {run.info.run_id} at {tracking_uri()}")
                    continue
                got = Path(src.download_artifacts(run.info.run_id, item.path, tmp))
                dest = target / item.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                if got.is_dir():
                    shutil.copytree(got, dest, dirs_exist_ok=True)
                else:
                    shutil.copy2(got, dest)
        dst.set_terminated(rid, run.info.status, end_time=run.info.end_time)
    return {"runs": len(new_ids), "ui": portable_ui_hint(out_dir)}


def log_evaluation_run(result: dict, *, experiment: str, model: str, adapter: str | None, of: str,
                       step: int | None, size: int, seed: int) -> str:
    """An MLflow run holding one evaluation: params, accuracies and the per-item table. Returns its id."""
    from picorl.run_records import eval_row

    c = client()
    run = c.create_run(experiment_id(c, experiment),
                       run_name=f"eval-{Path(adapter).parent.name if adapter else model}",
                       tags={"picorl.eval_of": of, "picorl.model": model})
    rid = run.info.run_id
    log_params(c, rid, {"model": model, "adapter": adapter, "size": size, "seed": seed})
    sync_rows(c, rid, None, [{**eval_row({"step": step or 0, "by_difficulty": result["by_difficulty"]}),
                              "stage": None}])
    log_eval_table(c, rid, result["items"], "eval/items.json")
    c.set_terminated(rid, "FINISHED")
    return rid


def adapter_of_run(run_id: str, step: int | None) -> tuple[str, Path, dict]:
    """(model name, adapter folder, env {name, options}) of an MLflow training run's checkpoint
    (latest when step is None)."""
    from picorl import checkpoint
    from picorl.run_folder import RunFolder
    from picorl.run_records import run_config

    folder = RunFolder(run_dir_of(run_id) or "")
    cfg = run_config(folder.root)
    ckpt = folder.checkpoint(step) if step is not None else checkpoint.latest_checkpoint(folder.checkpoints)
    adapter = None if ckpt is None else checkpoint.adapter_path(ckpt)
    if adapter is None:
        raise FileNotFoundError(f"run {run_id}: no adapter checkpoint under {folder.checkpoints}" +
                                (f" for step {step}" if step is not None else ""))
    return cfg.model.name, adapter, {"name": cfg.env.name, "options": cfg.env.options}
