"""prefect.yaml for real: a local Prefect server, a process work pool, `prefect deploy`, a
triggered on-demand run with the smoke config, and a worker that runs it into MLflow."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deploy_trigger_and_run_on_a_process_pool(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PICORL_CACHE": os.environ.get(
               "PICORL_CACHE", str(Path.home() / ".cache" / "picorl"))}
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", tmp_path / "server.log")

        def prefect(*args):
            r = subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
            return r.stdout

        prefect("work-pool", "create", "picorl-process", "--type", "process")
        prefect("work-pool", "create", "picorl-gpu", "--type", "process")
        prefect("--no-prompt", "deploy", "--all")
        nightly = prefect("deployment", "inspect", "picorl-train/nightly-curriculum")
        assert "0 2 * * *" in nightly and "configs/default.yaml" in nightly
        prefect("deployment", "inspect", "picorl-train/on-demand")
        gpu = prefect("deployment", "inspect", "picorl-train/gpu-curriculum")
        assert "configs/gpu.yaml" in gpu and "'nproc_per_node': 1" in gpu and "picorl-gpu" in gpu
        out = tmp_path / "out"
        smoke = f"config_path={ROOT / 'configs' / 'smoke.yaml'}"
        prefect("deployment", "run", "picorl-train/on-demand", "-p", smoke,
                "-p", "overrides=" + json.dumps([f"run.output_dir={out}", "run.name=deployed"]))
        prefect("worker", "start", "--pool", "picorl-process", "--run-once")
        # The GPU pool's deployment with the smoke config and 2 processes: torchrun with 2 gloo
        # ranks here, as it would start 2 GPU ranks on the GPU machine.
        prefect("deployment", "run", "picorl-train/gpu-curriculum", "-p", smoke, "-p", "nproc_per_node=2",
                "-p", "overrides=" + json.dumps([f"run.output_dir={out}", "run.name=deployed-gpu"]))
        prefect("worker", "start", "--pool", "picorl-gpu", "--run-once")
    finally:
        server.terminate()
        server.wait(30)

    from mlflow.tracking import MlflowClient
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("picorl")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id],
                                                            filter_string="tags.`picorl.parent` = 'true'")}
    assert set(runs) == {"deployed", "deployed-gpu"}
    for run in runs.values():
        assert run.info.status == "FINISHED" and run.data.tags["prefect.flow_run_id"] != "local"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/reward_mean")) == [1, 2, 3, 4]
    assert runs["deployed"].data.params["run.nproc_per_node"] == "1"
    assert runs["deployed-gpu"].data.params["run.nproc_per_node"] == "2"
    assert list(out.glob("deployed-*/report.md"))


def test_a_deployed_run_reads_configs_only_from_the_configs_folder(tmp_path, monkeypatch):
    from flows.train import CONFIG_DIR, check_config_path
    from picorl.config import ConfigError
    monkeypatch.delenv("PICORL_CONFIG_DIR", raising=False)
    monkeypatch.chdir(ROOT)
    for ok in ("configs/smoke.yaml", str(CONFIG_DIR / "gpu.yaml"), None):
        check_config_path(ok, deployed=True)
    secret = tmp_path / "secret.yaml"
    secret.write_text("token: hunter2\n")
    link = tmp_path / "configs-link"
    link.symlink_to(CONFIG_DIR)
    for bad in (str(secret), "/etc/passwd", "configs/../../../etc/passwd", "~/.netrc"):
        with pytest.raises(ConfigError, match=r"a deployed run reads configs only from .*PICORL_CONFIG_DIR") as e:
            check_config_path(bad, deployed=True)
        assert "hunter2" not in str(e.value)
    check_config_path(str(link / "smoke.yaml"), deployed=True)  # a link into configs/ is where it points
    check_config_path(str(secret), deployed=False)  # the command line reads what its user names
    monkeypatch.setenv("PICORL_CONFIG_DIR", str(tmp_path))
    check_config_path(str(secret), deployed=True)
