"""Reliability figures: kill the smoke pipeline at each fault point, resume it, count what was lost.

    python -m bench.faults [--repeats 1]

For every point it runs `python -m cli train` (`picorl train`) in a fresh process armed to SIGKILL itself
there, then `--resume RUN_ID`, and reads the MLflow history: steps missing, steps logged
twice, whether the final adapter equals an uninterrupted run's, and the resume's wall time.
Prints a markdown table and writes bench/results/faults-<cpu>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench.common import cpu_name

SMOKE = str(ROOT / "configs" / "smoke.yaml")
POINTS = ["sft:2:kill", "rollout:3:kill", "update:3:kill", "checkpoint:4:kill", "eval:2:kill", "log:3:kill"]
EXPECTED = {"sft/loss": [1, 2, 3], "train/reward_mean": [1, 2, 3, 4], "eval/acc_d3": [0, 2, 4]}


def train(tmp: Path, *extra: str, fault: str | None = None) -> tuple[int, float]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PREFECT_HOME": str(tmp / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
    env.pop("PICORL_FAULT", None)
    if fault:
        env["PICORL_FAULT"] = fault
    t0 = time.perf_counter()
    with open(tmp / "log.txt", "a") as log:
        p = subprocess.Popen([sys.executable, "-m", "cli", "train", "--config", SMOKE, "--set",
                              f"run.output_dir={tmp / 'out'}", "--set", "run.retries=0", *extra],
                             cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        rc = p.wait(900)
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the orphaned ephemeral Prefect server of a killed run
        except ProcessLookupError:
            pass
    return rc, time.perf_counter() - t0


def parent(tmp: Path):
    from mlflow.tracking import MlflowClient
    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    (run,) = c.search_runs([c.get_experiment_by_name("picorl").experiment_id],
                           filter_string="tags.`picorl.parent` = 'true'")
    return c, run


def adapter(run) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(run.data.tags["picorl.run_dir"]) / "checkpoints/step_4/adapter/adapter_model.safetensors"))


def main() -> int:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        rc, clean_s = train(Path(d))
        assert rc == 0, "the uninterrupted run failed"
        _, ref_run = parent(Path(d))
        reference = adapter(ref_run)
    rows = []
    for point in POINTS:
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as d:
                tmp = Path(d)
                rc, _ = train(tmp, fault=point)
                assert rc == -signal.SIGKILL, f"{point}: expected SIGKILL, got {rc}"
                _, run = parent(tmp)
                rc, resume_s = train(tmp, "--resume", run.info.run_id)
                assert rc == 0, f"{point}: resume failed, see {tmp / 'log.txt'}"
                c, run = parent(tmp)
                lost = doubled = 0
                for key, want in EXPECTED.items():
                    got = [m.step for m in c.get_metric_history(run.info.run_id, key)]
                    lost += len(set(want) - set(got))
                    doubled += len(got) - len(set(got))
                final = adapter(run)
                same = all(torch.equal(final[k], reference[k]) for k in reference)
                rows.append({"fault": point, "lost_steps": lost, "doubled_steps": doubled,
                             "final_state_equal": same, "resume_s": round(resume_s, 1), "status": run.info.status})
    result = {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "python": platform.python_version(), "config": "configs/smoke.yaml",
              "uninterrupted_s": round(clean_s, 1), "rows": rows}
    cpu = cpu_name().replace(" ", "_").replace("(R)", "").replace("/", "_")[:40]
    out = ROOT / "bench" / "results" / f"faults-{cpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"uninterrupted smoke run: {clean_s:.1f} s ({result['cpu_count']} cores, {cpu_name()})")
    print("| fault (point:update) | runs | steps lost | steps doubled | final state = uninterrupted | resume wall time |")
    print("|---|---|---|---|---|---|")
    for point in POINTS:
        rs = [r for r in rows if r["fault"] == point]
        print(f"| SIGKILL at {point.rsplit(':', 1)[0]} | {len(rs)} | {sum(r['lost_steps'] for r in rs)} | "
              f"{sum(r['doubled_steps'] for r in rs)} | {all(r['final_state_equal'] for r in rs)} | "
              f"{sum(r['resume_s'] for r in rs) / len(rs):.1f} s |")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
