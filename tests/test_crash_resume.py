"""Kill -9 anywhere, then resume: real subprocesses killed at injected points.

Each case runs the smoke pipeline in a fresh process that SIGKILLs itself at one point,
resumes it with `--resume RUN_ID`, and checks through MlflowClient that every step is
logged exactly once, contiguous, and that the final adapter equals an uninterrupted run's.

The tiny random model never earns a reward, so its advantages are all zero and plain GRPO
would leave the SFT adapter as it is: a resume that lost the optimizer's moments or the
rollouts' seed would still end equal. A KL penalty to the base model (the adapter off) gives
every update a gradient that depends on the sampled completions, so the final adapter
depends on the whole GRPO state being restored.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_session
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def train(tmp_path, *extra, fault=None):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
    env.pop("PICORL_FAULT", None)
    if fault:
        env["PICORL_FAULT"] = fault
    # Its own process group, output to a file: a SIGKILLed flow leaves its ephemeral Prefect
    # server orphaned, and that server would hold a pipe open (and the test) forever.
    log = tmp_path / f"train-{len(list(tmp_path.glob('train-*.log')))}.log"
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, "-m", "cli", "train", "--config", SMOKE,
                              "--set", f"run.output_dir={tmp_path / 'out'}", "--set", "run.retries=0",
                              "--set", "grpo.kl_coef=0.1", "--set", "grpo.kl_reference=base", *extra],
                             cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=600)
        finally:
            kill_session(p)
    return subprocess.CompletedProcess(p.args, p.returncode, "", log.read_text())


def client(tmp_path):
    from mlflow.tracking import MlflowClient
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def parent_runs(c):
    exp = c.get_experiment_by_name("picorl")
    return c.search_runs([exp.experiment_id], filter_string="tags.`picorl.parent` = 'true'")


def final_adapter(run, step: int = 4):
    ckpt = Path(run.data.tags["picorl.run_dir"]) / "checkpoints" / f"step_{step}" / "adapter" / "adapter_model.safetensors"
    return load_file(str(ckpt))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    r = train(tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = parent_runs(client(tmp))
    final, after_sft = final_adapter(run), final_adapter(run, 0)
    # GRPO moved every tensor: the comparison below would see a resume that restored it wrong
    assert all(not torch.equal(final[k], after_sft[k]) for k in final)
    return final


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["sft:2:kill", "rollout:3:kill", "checkpoint:4:kill", "log:1:kill", "eval:2:kill"])
def test_killed_anywhere_then_resumed_loses_nothing(tmp_path, reference, fault):
    r = train(tmp_path, fault=fault)
    assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
    c = client(tmp_path)
    (run,) = parent_runs(c)
    assert run.info.status == "RUNNING"  # killed: nobody closed it
    r = train(tmp_path, "--resume", run.info.run_id)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = parent_runs(c)
    assert run.info.status == "FINISHED"
    rid = run.info.run_id

    def steps(key):
        return [m.step for m in sorted(c.get_metric_history(rid, key), key=lambda m: m.step)]
    assert steps("train/reward_mean") == [1, 2, 3, 4]
    assert steps("train/loss") == [1, 2, 3, 4]
    assert steps("sft/loss") == [1, 2, 3]
    assert steps("eval/acc_d3") == [0, 2, 4]
    got = final_adapter(run)
    assert set(got) == set(reference)
    differ = {k: (got[k] - reference[k]).abs().max().item() for k in got if not torch.equal(got[k], reference[k])}
    assert not differ, f"resumed run ended in another state: {len(differ)} of {len(got)} tensors, largest " \
        f"differences {sorted(differ.values())[-3:]}, of weights up to {max(t.abs().max().item() for t in got.values())}"
    # no temp folders left behind by the interrupted checkpoint write
    ckpts = Path(run.data.tags["picorl.run_dir"]) / "checkpoints"
    assert all(not p.name.startswith(".") for p in ckpts.iterdir())
