"""A run folder's records, read and written: the config it started with, the metric history,
the eval results, the wall-time log. The layout itself (which file is where) is
picorl/run_folder.py's; what is inside a checkpoint is picorl/checkpoint.py's.

    cfg = run_config("outputs/smoke-...")      # refused if config.yaml was edited since the start
    rows = read_history(run_dir) + eval_rows(run_dir)   # every metric row, for MLflow and the report
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from picorl import checkpoint
from picorl.config import Config, ConfigError, dump_yaml, flatten, load_config, to_dict
from picorl.distributed import rank_and_world
from picorl.evaluate import changes_by_difficulty
from picorl.files import atomic_write_text
from picorl.machine import machine_name
from picorl.metrics import eval_metrics
from picorl.run_folder import RunFolder


def prepare_run_dir(cfg: Config, run_dir) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(run_dir)
    # The lock first: a config.yaml without one is an older run, read as it is.
    atomic_write_text(folder.config_lock, json.dumps(flatten(to_dict(cfg)), indent=1, default=str))
    atomic_write_text(folder.config, dump_yaml(cfg))
    return run_dir


def run_config(run_dir) -> Config:
    """The config a run folder was started with. A config.yaml edited since is refused, naming
    the keys: MLflow's params, the data and the checkpoints all follow from the first one, and a
    resume that trained 50 updates where the run's record says 2 would contradict them."""
    folder = RunFolder(run_dir)
    cfg = load_config(folder.config)
    if folder.config_lock.is_file():
        started = json.loads(folder.config_lock.read_text())
        now = json.loads(json.dumps(flatten(to_dict(cfg)), default=str))
        changed = [f"{k} ({started.get(k, 'not set')!r} -> {now.get(k, 'not set')!r})"
                   for k in sorted(set(started) | set(now)) if started.get(k) != now.get(k)]
        if changed:
            raise ConfigError(f"{folder.config} was edited after the run started: {', '.join(changed)}. "
                              "A run keeps the config it started with (its MLflow params and checkpoints "
                              "follow from it): put the file back, or start a new run with the new values")
    return cfg


def read_history(run_dir) -> list[dict]:
    latest = checkpoint.latest_checkpoint(RunFolder(run_dir).checkpoints)
    return [] if latest is None else checkpoint.read_history(latest)


def eval_rows(run_dir) -> list[dict]:
    """Eval metric rows from evals/step_N.json, oldest first."""
    return [eval_row(json.loads(p.read_text())) for p in RunFolder(run_dir).eval_files().values()]


def grpo_gains(run_dir) -> dict[str, dict]:
    """Per eval difficulty: the final eval against the one after SFT on the same held-out
    items (exact before and after, items gained and lost, the sign test's p; with eval.samples
    the same for the fraction of samples right, under "sampled"); {} before a second eval exists."""
    files = RunFolder(run_dir).eval_files()
    if len(files) < 2:
        return {}
    first, last = (json.loads(files[s].read_text()) for s in (min(files), max(files)))
    samples = {"samples": last["samples"]} if "samples" in last else {}  # the k of pass@k
    return {str(d): {**c, "from_step": min(files), "to_step": max(files), **samples}
            for d, c in changes_by_difficulty(first["items"], last["items"], matched_only=True).items()}


def eval_row(result: dict) -> dict:
    return {"kind": "eval", "step": result["step"], "stage": result.get("stage"),
            "metrics": eval_metrics(result["by_difficulty"])}


@contextlib.contextmanager
def timed(run_dir, task: str, **fields):
    """Append the step's wall time and machine to timings.jsonl when it ends, failed or not:
    the run's compute budget counts every try, and a run may move between machines."""
    t0 = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        row = {"task": task, **fields, "seconds": round(time.perf_counter() - t0, 2), "ok": ok,
               "machine": machine_name()}
        if rank_and_world()[0] == 0:  # data parallel: one row per step, not one per rank
            append_line(RunFolder(run_dir).timings, json.dumps(row))


def append_line(path: Path, line: str) -> None:
    """Append one line; a last line torn by a crash mid-append is closed first, so the new
    row starts a line of its own instead of being glued onto the torn one and lost with it."""
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode() + b"\n")


def read_timings(run_dir) -> list[dict]:
    """Every row of timings.jsonl; a torn line (a crash mid-append) is skipped with a warning
    that names the file and line, since the rows around it are intact."""
    path = RunFolder(run_dir).timings
    if not path.is_file():
        return []
    rows = []
    for n, x in enumerate(path.read_text().splitlines(), start=1):
        if not x.strip():
            continue
        try:
            row = json.loads(x)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            print(f"warning: {path}:{n} is not a JSON row (torn by a crash?); skipped", file=sys.stderr)
    return rows
