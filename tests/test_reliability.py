"""Faults injected on purpose: tracking outages, numerical faults, two runs at once."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kill_session, wait_http

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
    from picorl import session
    session.clear_sessions()
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
    from picorl import session
    from tracking.delivery import TrackingOutage
    session.clear_sessions()
    wrap_chunks(monkeypatch, {0: server.stop})
    with pytest.raises(TrackingOutage, match=r"could not take the run.s records for .*\(run.tracking_outage_s=2;"):
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


def test_a_full_artifact_store_is_an_outage_not_a_failed_run(tmp_path, monkeypatch, capsys):
    # MLflow's own database works, but its artifact folder is on a full disk: delivery waits,
    # training goes on, and what the folder holds is delivered once there is room.
    import errno

    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from mlflow.tracking import MlflowClient

    from picorl import pipeline, run_records
    from picorl.config import load_config
    from tracking import runs as tracking
    from tracking.delivery import TrackingOutage, deliver
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config(SMOKE, [])
    run_dir = tmp_path / "run"
    run_records.prepare_run_dir(cfg, run_dir)
    pipeline.build_data(cfg, run_dir)
    run = {"run_dir": str(run_dir), "parent_run_id": tracking.open_parent_run(cfg, run_dir, run_dir / "config.yaml", "t")}

    def disk_full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as full:
        full.setattr(LocalArtifactRepository, "log_artifact", disk_full)
        assert deliver(run, cfg) is False
        out = capsys.readouterr().out
        assert "training goes on" in out and "No space left on device" in out
        with pytest.raises(TrackingOutage, match=r"run.tracking_outage_s=0; last error: OSError: \[Errno 28\] No space"):
            deliver(run, load_config(SMOKE, ["run.tracking_outage_s=0"]))
    assert deliver(run, cfg) is True
    arts = {a.path for a in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(run["parent_run_id"], "data")}
    assert arts == {"data/manifest.json", "data/sample.jsonl"}


def test_non_finite_updates_in_a_row_stop_with_a_checkpoint(tmp_path, monkeypatch):
    from picorl import pipeline, run_records, session
    from picorl.config import load_config
    from picorl.plan import Chunk
    from picorl.trainer import GRPOTrainer
    cfg = load_config(SMOKE, ["stages=[{difficulty: 1, updates: 8}]", "run.chunk_updates=8", "eval.every=8"])
    session.clear_sessions()
    run_records.prepare_run_dir(cfg, tmp_path)
    pipeline.build_data(cfg, tmp_path)
    pipeline.run_sft(cfg, tmp_path, progress=False)
    monkeypatch.setattr(GRPOTrainer, "_optimise", lambda self, *a: (float("inf"), 0.0, 0.0))
    with pytest.raises(pipeline.NumericalError, match="5 updates in a row .* stopped with a checkpoint"):
        pipeline.run_chunk(cfg, tmp_path, Chunk(0, 0, 8, True), progress=False)
    rows = [r for r in run_records.read_history(tmp_path) if r["kind"] == "train"]
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
        procs.append(subprocess.Popen([sys.executable, "-m", "cli", "train", "--config", SMOKE,
                                       "--set", f"run.output_dir={tmp_path / 'out'}", *extra],
                                      cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    for i, p in enumerate(procs):
        try:
            assert p.wait(600) == 0, (tmp_path / f"run{i}.log").read_text()[-3000:]
        finally:
            kill_session(p)
        # Prefect's batched logs reach the temporary server before it stops, not after
        assert "Error logging to API" not in (tmp_path / f"run{i}.log").read_text()
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


def test_the_cli_sets_prefect_defaults_only_where_unset():
    from cli import PREFECT_DEFAULTS, prefect_environment
    env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "30"}
    applied = prefect_environment(env)
    assert env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "30"  # the user's value stands
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in applied
    assert env["DO_NOT_TRACK"] == "1" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert int(PREFECT_DEFAULTS["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 90


def test_the_cli_creates_a_prefect_home_two_folders_deep(tmp_path):
    from cli import prefect_environment
    home = tmp_path / "new" / "prefect"
    prefect_environment({"PREFECT_HOME": str(home)})
    assert home.is_dir()


def test_a_bad_resume_is_refused_before_prefect_starts(tmp_path, monkeypatch, capsys):
    """MLflow alone knows whether a run can be resumed, so `picorl train --resume` of a run it does
    not have fails in one line without starting Prefect's server (seconds, not a minute)."""
    import contextlib

    import cli
    from cli import PREFECT_DEFAULTS
    for k, v in PREFECT_DEFAULTS.items():  # what the command would set, undone after the test
        monkeypatch.setenv(k, os.environ.get(k, v))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    started = []
    monkeypatch.setattr(cli, "local_prefect_server", lambda: started.append(1) or contextlib.nullcontext())
    code = cli.main(["train", "--config", SMOKE, "--set", f"run.output_dir={tmp_path}", "--resume", "0123abcd"])
    err = capsys.readouterr().err
    assert (code, started) == (2, [])
    assert "picorl train: error: --resume 0123abcd: no such MLflow run 0123abcd" in err
    assert "starting Prefect" not in err


def start_hanging_train(tmp_path):
    """`picorl train` of the smoke config in a session of its own, hanging at update 1 (a fault
    point) with Prefect's temporary server up; returns (process, its environment) once it hangs."""
    import time

    marker = tmp_path / "hanging"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_HOME": str(tmp_path / "prefect"), "PICORL_FAULT": "update:1:hang",
           "PICORL_FAULT_MARKER": str(marker)}
    for k in ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PREFECT_API_URL"):
        env.pop(k, None)  # the CLI's own defaults must carry a fresh Prefect home
    log = open(tmp_path / "train.log", "w")
    p = subprocess.Popen([str(Path(sys.executable).parent / "picorl"), "train", "--config", SMOKE,
                          "--set", f"run.output_dir={tmp_path / 'out'}"],
                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    while not marker.exists():
        if p.poll() is not None or time.time() > deadline:
            kill_session(p)
            raise AssertionError((tmp_path / "train.log").read_text()[-3000:])
        time.sleep(0.2)
    return p, env


def wait_session_gone(p, timeout_s: float = 30) -> None:
    """Wait until no process is left in p's session (p started it); fail listing what is."""
    import time

    deadline = time.time() + timeout_s
    while True:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            return
        assert time.time() < deadline, subprocess.run(["ps", "-o", "pid,args", "-g", str(p.pid)],
                                                      capture_output=True, text=True).stdout
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])  # a service manager; a closed terminal
def test_sigterm_marks_the_run_and_stops_prefects_server(tmp_path, signum):
    from mlflow.tracking import MlflowClient

    p, env = start_hanging_train(tmp_path)
    try:
        p.send_signal(signum)  # to the CLI alone, as a service manager or a terminal would
        assert p.wait(120) == 128 + signum, (tmp_path / "train.log").read_text()[-3000:]
        text = (tmp_path / "train.log").read_text()
        assert "picorl train: terminated" in text and "Traceback" not in text
        assert "starting Prefect's local API server" in text
        wait_session_gone(p)  # the ephemeral server, a child in the same session, is gone too
    finally:
        kill_session(p)
    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (parent,) = c.search_runs([c.get_experiment_by_name("picorl").experiment_id],
                              filter_string="tags.`picorl.parent` = 'true'")
    assert parent.info.status == "FAILED"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sigkilled_train_leaves_no_prefect_server_behind(tmp_path):
    """SIGKILL (the OOM killer's) runs no clean-up at all: the temporary Prefect server must
    die with the CLI all the same, not live on listening, one orphan per crash."""
    p, _ = start_hanging_train(tmp_path)
    try:
        server = subprocess.run(["pgrep", "-s", str(p.pid), "-f", "uvicorn"], capture_output=True, text=True).stdout
        assert server.strip(), "no Prefect server child found while the flow ran"
        p.kill()
        assert p.wait(60) == -signal.SIGKILL
        wait_session_gone(p)  # the server, in the CLI's session, goes when its parent does
    finally:
        kill_session(p)


def test_a_run_folder_has_one_owner_and_a_dead_owner_keeps_nothing(tmp_path):
    from picorl.run_folder import RunLock, RunLocked
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from picorl.run_folder import RunLock; "
                               f"RunLock({str(tmp_path)!r}); print('locked', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=rf"in use by pid {holder.pid} on .*; wait for it to finish"):
            RunLock(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait()
    lock = RunLock(tmp_path)
    assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
    lock.release()
    RunLock(tmp_path).release()


def test_a_run_folder_that_cannot_be_written_is_named_not_a_traceback(tmp_path):
    """A lock that cannot be opened (here a folder where the .lock file goes; a read-only or
    immutable run folder alike) is a RunLocked that names the file, which the flow reports as
    one line."""
    from picorl.run_folder import RunLock, RunLocked
    (tmp_path / ".lock").mkdir()
    with pytest.raises(RunLocked, match=rf"run folder {tmp_path} cannot be written \(Is a directory: .*\.lock\)"):
        RunLock(tmp_path)


def test_resume_refuses_overrides_that_change_the_run():
    from flows.train import refuse_changes_on_resume
    from picorl.config import ConfigError, load_config
    cfg = load_config(SMOKE, ["run.output_dir=/tmp/x"])
    refuse_changes_on_resume(cfg, ["run.output_dir=/tmp/x", "grpo.lr=1e-3"])  # what it already is: fine
    with pytest.raises(ConfigError, match=r"would change it: grpo.lr \(0.001 -> 0.5\), stages.1.updates \(2 -> 6\)"):
        refuse_changes_on_resume(cfg, ["grpo.lr=0.5", "stages.1.updates=6"])


@pytest.mark.parametrize("override,msg", [
    ("model.name=does-not-exist", "model 'does-not-exist' not found"),
    ("model.lora.target_modules=[nope]", "model.lora.target_modules: ['nope'] not found in tiny-random-llama"),
    ("sft.difficulties=[]", "sft.difficulties: expected a non-empty list"),
    ("eval.difficulties=[]", "eval.difficulties: expected a non-empty list"),
    ("rollout.max_tokens=1000000000", "rollout.max_tokens=1000000000 leaves no room for a prompt in "
                                      "tiny-random-llama's context of 4096 tokens"),
    ("eval.max_tokens=4096", "eval.max_tokens=4096 leaves no room for a prompt"),
])
def test_values_that_would_fail_mid_run_are_refused_before_any_work(tmp_path, override, msg):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    r = subprocess.run([sys.executable, "-m", "cli", "train", "--config", SMOKE, "--set", override,
                        "--set", f"run.output_dir={tmp_path / 'out'}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()
    dry = subprocess.run([sys.executable, "-m", "cli", "train", "--config", SMOKE, "--set", override, "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    if override.startswith("model.") or "max_tokens" in override:  # checked against the model, which the
        # plan may be meant to find on another machine: a warning
        assert dry.returncode == 0 and f"warning: {msg}" in dry.stdout
    else:
        assert dry.returncode == 2 and msg in dry.stderr


def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where run.output_dir should be a folder")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    r = subprocess.run([sys.executable, "-m", "cli", "train", "--config", SMOKE, "--set",
                        f"run.output_dir={blocker}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr and "Traceback" not in r.stderr, \
        r.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()
