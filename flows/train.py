"""The training pipeline as a Prefect flow. It reads like the diagram:

    data -> SFT -> eval@0 -> for each stage: [GRPO chunk -> (eval)]* -> report (-> registered model)

    picorl train --config configs/smoke.yaml      (the command line is cli.py; deployments call `train`)
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from prefect import flow, runtime

from picorl import run_records
from picorl.config import Config, ConfigError, config_from_dict, to_dict
from picorl.parallel import release_nodes
from picorl.plan import chunks
from picorl.preflight import checked_config
from picorl.run_folder import RunFolder, RunLock, RunLocked
from tasks import pipeline_tasks as t
from tasks.registry import register_final_model
from tracking import runs


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def check_config_path(config_path: str | None, deployed: bool) -> None:
    """A deployment's config_path names a file the worker reads (and a YAML error quotes it into
    the flow run's failure): a deployed run reads configs only from the checkout's configs/ or
    from $PICORL_CONFIG_DIR. A run started from the command line reads what its user names."""
    if not deployed or config_path is None:
        return
    allowed = [CONFIG_DIR, *([Path(os.environ["PICORL_CONFIG_DIR"])] if os.environ.get("PICORL_CONFIG_DIR") else [])]
    path = Path(config_path).expanduser()
    resolved = (path if path.is_absolute() else Path.cwd() / path).resolve()  # links followed: where it really is
    if not any(resolved.is_relative_to(a.resolve()) for a in allowed):
        raise ConfigError(f"config_path={config_path!r}: a deployed run reads configs only from "
                          f"{' or '.join(str(a) for a in allowed)}; set PICORL_CONFIG_DIR on the worker to allow "
                          "another folder")


def refuse_changes_on_resume(run_cfg, overrides: list[str] | None) -> None:
    """A resumed run keeps the config it started with: an override that would change it is refused."""
    from picorl.config import flatten, parse_override

    kept = flatten(to_dict(run_cfg))
    changed = []
    for text in overrides or []:
        key, value = parse_override(text)
        if key not in kept or kept[key] != value:
            changed.append(f"{key} ({kept.get(key, 'not a key')!r} -> {value!r})")
    if changed:
        raise ConfigError(f"--resume keeps the run's own config; these --set values would change it: "
                          f"{', '.join(changed)}. Drop them, or start a new run")


def resumable_run(resume: str, overrides: list[str] | None = None) -> tuple[str, Config]:
    """(run folder, the config it started with) of MLflow parent run `resume`, refused
    (ConfigError) when there is none, the run is finished, or an override would change its
    config. MLflow alone is asked, so `picorl train --resume` checks this before it starts Prefect."""
    try:
        run_dir = runs.run_dir_of(resume)
    except LookupError as e:
        raise ConfigError(f"--resume {resume}: {e}") from None
    if not run_dir or not RunFolder(run_dir).config.is_file():
        raise ConfigError(f"--resume {resume}: run has no picorl run folder (tag picorl.run_dir={run_dir!r})")
    if runs.run_status(resume) == "FINISHED":  # resuming would only report and register it again
        raise ConfigError(f"--resume {resume}: that run is finished (report: {RunFolder(run_dir).report}); "
                          "there is nothing left to train. Start a new run, or `picorl export` this one")
    run_cfg = run_records.run_config(run_dir)
    refuse_changes_on_resume(run_cfg, overrides)
    return run_dir, run_cfg


def open_run(cfg, resume: str | None, overrides: list[str] | None = None) -> tuple[dict, RunLock]:
    """The run handle ({run_dir, parent_run_id, config}: the MLflow parent run, the run folder and
    the resolved config, of a new run or of the run being resumed) and the folder's lock."""
    flow_run_id = str(runtime.flow_run.id or "local")
    if resume:
        run_dir, run_cfg = resumable_run(resume, overrides)  # a resumed run keeps its folder's config
        lock = RunLock(run_dir)  # before touching the run: a live owner keeps it as it is
        runs.reopen_parent_run(resume, flow_run_id)
        return {"run_dir": run_dir, "parent_run_id": resume, "config": to_dict(run_cfg)}, lock
    run_dir = RunFolder.new_path(cfg.run.output_dir, cfg.run.name, flow_run_id)
    try:
        run_records.prepare_run_dir(cfg, run_dir)
    except OSError as e:  # a read-only or full run.output_dir: before any MLflow run exists
        raise ConfigError(f"run.output_dir={cfg.run.output_dir!r}: cannot create the run folder "
                          f"{run_dir}: {e.strerror or e}") from None
    lock = RunLock(run_dir)
    parent = runs.open_parent_run(cfg, run_dir, RunFolder(run_dir).config, flow_run_id)
    return {"run_dir": str(run_dir), "parent_run_id": parent, "config": to_dict(cfg)}, lock


def with_nproc(overrides: list[str] | None, nproc_per_node: int | None) -> list[str]:
    """The overrides, with run.nproc_per_node set when the deployment passes it."""
    return [*(overrides or []), *([f"run.nproc_per_node={nproc_per_node}"] if nproc_per_node is not None else [])]


@flow(name="picorl-train")
def train(config_path: str | None = None, overrides: list[str] | None = None, resume: str | None = None,
          nproc_per_node: int | None = None, config: dict | None = None) -> dict:
    """config_path + overrides: the run's config, loaded and checked here (a deployment's run).
    config: instead, a resolved config that its caller loaded and checked (`picorl train` passes
    it; overrides are then only held against a resumed run's config).
    nproc_per_node: GPUs of the worker's machine that train each GRPO chunk (torchrun); None keeps the config's."""
    if config is not None:
        if config_path is not None or nproc_per_node is not None:
            raise ConfigError("config= is a resolved config: config_path and nproc_per_node go with a config file")
        cfg = config_from_dict(config)
    else:
        overrides = with_nproc(overrides, nproc_per_node)
        check_config_path(config_path, deployed=runtime.deployment.id is not None)
        cfg = checked_config(config_path, overrides, resume=bool(resume))  # before any task runs
    try:
        run, lock = open_run(cfg, resume, overrides)
    except RunLocked as e:
        raise ConfigError(str(e)) from None
    cfg = t.run_config(run)  # a resumed run keeps the config it started with
    opts = dict(retries=cfg.run.retries, retry_delay_seconds=cfg.run.retry_delay_s)
    try:
        t.build_data.with_options(**opts)(run)
        t.sft.with_options(**opts)(run)
        evals = [t.evaluate.with_options(**opts)(run, 0)]
        for chunk in chunks(cfg):
            t.grpo_chunk.with_options(**opts)(run, asdict(chunk))
            if chunk.eval_after:
                evals.append(t.evaluate.with_options(**opts)(run, chunk.end))
        out = t.write_report.with_options(**opts)(run)
        if cfg.run.registered_model:
            out["registered"] = register_final_model.with_options(**opts)(run, cfg.run.registered_model)
    except BaseException:
        try:
            runs.close_parent_run(run["parent_run_id"], "FAILED")
        except Exception as e:  # e.g. MLflow itself is down: the original error matters more
            print(f"could not mark MLflow run {run['parent_run_id']} FAILED: {e}")
        raise
    finally:
        release_nodes(run["run_dir"])  # machines that joined its chunks (run.nnodes > 1) may leave
        lock.release()
    hint = runs.close_parent_run(run["parent_run_id"], "FINISHED")
    for line in out.get("gains", []):
        print(line)
    print(f"report: {out['report']}")
    print(f"MLflow: {hint}")
    return {**run, **out, "evals": evals}
