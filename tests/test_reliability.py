"""Faults injected on purpose: tracking outages, numerical faults, two runs at once."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_http

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
MLFLOW = str(Path(sys.executable).parent / "mlflow")


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend that a test can stop and start."""
    def __init__(self, tmp: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.tmp, self.proc = tmp, None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.tmp / 'mlflow.db'}",
             "--artifacts-destination", str(self.tmp / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=open(self.tmp / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.uri}/health", self.tmp / "server.log")

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)


@pytest.fixture
def server(tmp_path, monkeypatch):
    srv = MlflowServer(tmp_path)
    srv.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=90):
        yield


def steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def wrap_chunks(monkeypatch, hooks):
    """Call hooks[(start, 'after')] around pipeline.run_chunk."""
    from picorl import pipeline
    real = pipeline.run_chunk

    def run_chunk(cfg, run_dir, chunk, **kw):
        out = real(cfg, run_dir, chunk, **kw)
        hook = hooks.pop(chunk.start, None)
        if hook:
            hook()
        return out
    monkeypatch.setattr(pipeline, "run_chunk", run_chunk)


@pytest.mark.slow
def test_outage_mid_run_is_delivered_when_the_server_returns(server, prefect_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.train import train
    from picorl import pipeline
    pipeline.clear_sessions()
    # Down after the first chunk (so eval@2 and chunk 2-4 happen during the outage), back after the second.
    wrap_chunks(monkeypatch, {0: server.stop, 2: server.start})
    out = train(config_path=SMOKE, overrides=[f"run.output_dir={tmp_path / 'out'}"])
    c = MlflowClient(server.uri)
    pid = out["parent_run_id"]
    assert c.get_run(pid).info.status == "FINISHED"
    assert steps(c, pid, "train/reward_mean") == [1, 2, 3, 4]
    assert steps(c, pid, "eval/acc_d3") == [0, 2, 4]
    arts = {a.path for a in c.list_artifacts(pid, "eval")} | {a.path for a in c.list_artifacts(pid, "checkpoints")}
    assert {"eval/step_2.json", "checkpoints/step_2", "checkpoints/step_4"} <= arts


@pytest.mark.slow
def test_outage_past_the_limit_fails_cleanly_then_resumes(server, prefect_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.train import train
    from picorl import pipeline
    from tasks.pipeline_tasks import TrackingOutage
    pipeline.clear_sessions()
    wrap_chunks(monkeypatch, {0: server.stop})
    with pytest.raises(TrackingOutage, match=r"unreachable for .*\(run.tracking_outage_s=2\)"):
        train(config_path=SMOKE, overrides=[f"run.output_dir={tmp_path / 'out'}", "run.tracking_outage_s=2",
                                            "run.retries=0"])
    (run_dir,) = (tmp_path / "out").iterdir()
    assert (run_dir / "checkpoints" / "step_2" / "state.json").is_file()  # nothing lost
    server.start()
    c = MlflowClient(server.uri)
    (parent,) = c.search_runs([c.get_experiment_by_name("picorl").experiment_id],
                              filter_string="tags.`picorl.parent` = 'true'")
    out = train(config_path=SMOKE, resume=parent.info.run_id)
    assert steps(c, out["parent_run_id"], "train/reward_mean") == [1, 2, 3, 4]
    assert steps(c, out["parent_run_id"], "eval/acc_d3") == [0, 2, 4]


def test_non_finite_updates_in_a_row_stop_with_a_checkpoint(tmp_path, monkeypatch):
    from picorl import pipeline
    from picorl.config import load_config
    from picorl.plan import Chunk
    from picorl.trainer import GRPOTrainer
    cfg = load_config(SMOKE, ["stages=[{difficulty: 1, updates: 8}]", "run.chunk_updates=8", "eval.every=8"])
    pipeline.clear_sessions()
    pipeline.prepare_run_dir(cfg, tmp_path)
    pipeline.build_data(cfg, tmp_path)
    pipeline.run_sft(cfg, tmp_path, progress=False)
    monkeypatch.setattr(GRPOTrainer, "_optimise", lambda self, *a: (float("inf"), 0.0, 0.0))
    with pytest.raises(pipeline.NumericalError, match="5 updates in a row .* stopped with a checkpoint"):
        pipeline.run_chunk(cfg, tmp_path, Chunk(0, 0, 8, True), progress=False)
    rows = [r for r in pipeline.read_history(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["metrics"]["train/skipped_updates"] for r in rows] == [1, 2, 3, 4, 5]
    assert (tmp_path / "checkpoints" / "step_5" / "state.json").is_file()


@pytest.mark.slow
def test_two_runs_at_once_stay_apart(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
    env.pop("PICORL_FAULT", None)
    procs = []
    for i, extra in enumerate([[], ["--set", "grpo.lr=0.002"]]):
        e = {**env, "PREFECT_HOME": str(tmp_path / f"prefect{i}")}
        log = open(tmp_path / f"run{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "flows.train", "--config", SMOKE,
                                       "--set", f"run.output_dir={tmp_path / 'out'}", *extra],
                                      cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    for i, p in enumerate(procs):
        try:
            assert p.wait(600) == 0, (tmp_path / f"run{i}.log").read_text()[-3000:]
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    from mlflow.tracking import MlflowClient
    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parents = c.search_runs([c.get_experiment_by_name("picorl").experiment_id],
                            filter_string="tags.`picorl.parent` = 'true'")
    assert len(parents) == 2
    dirs = {p.data.tags["picorl.run_dir"] for p in parents}
    assert len(dirs) == 2 and all(Path(d, "report.md").is_file() for d in dirs)
    assert {p.data.params["grpo.lr"] for p in parents} == {"0.001", "0.002"}
    for p in parents:
        assert p.info.status == "FINISHED"
        assert steps(c, p.info.run_id, "train/reward_mean") == [1, 2, 3, 4]
