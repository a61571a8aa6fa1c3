"""The training flow end to end: Prefect's test harness, an MLflow SQLite store in a temp dir."""
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def store(tmp_path, monkeypatch, prefect_server):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from picorl import session
    session.clear_sessions()
    from mlflow.tracking import MlflowClient
    return MlflowClient(uri), tmp_path


def run_flow(tmp_path, *overrides, resume=None):
    from flows.train import train
    return train(config_path=SMOKE, overrides=[f"run.output_dir={tmp_path / 'out'}", *overrides], resume=resume)


def steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def children(client, parent):
    exp = client.get_run(parent).info.experiment_id
    return {r.data.tags["picorl.stage"]: r for r in
            client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")}


def artifacts(client, run_id, path=None):
    out = set()
    for a in client.list_artifacts(run_id, path):
        out.add(a.path)
        if a.is_dir:
            out |= artifacts(client, run_id, a.path)
    return out


def test_smoke_flow_logs_everything_once(store, monkeypatch):
    client, tmp = store
    from picorl import config
    parsed, real = [], config.read_yaml
    monkeypatch.setattr(config, "read_yaml", lambda text, where: parsed.append(where) or real(text, where))
    out = run_flow(tmp)
    assert parsed == [SMOKE]  # the flow loads the config once; no task reads a YAML again
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect.flow_run_id"]
    assert parent.data.params["grpo.lr"] == "0.001" and parent.data.params["stages.1.difficulty"] == "3"
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    pid = parent.info.run_id
    assert steps(client, pid, "train/reward_mean") == [1, 2, 3, 4]
    for key in ("train/loss", "train/grad_norm", "train/kl", "train/frac_zero_var_groups",
                "train/reward_std_in_group", "train/completion_len", "train/rollout_tokens_per_s",
                "train/update_s", "train/difficulty", "train/frac_correct"):
        assert steps(client, pid, key) == [1, 2, 3, 4], key
    assert steps(client, pid, "sft/loss") == [1, 2, 3]
    for d in (3, 5, 6):
        for k in ("acc", "partial", "format"):
            assert steps(client, pid, f"eval/{k}_d{d}") == [0, 2, 4]
    kids = children(client, pid)
    assert set(kids) == {"sft", "grpo-d1", "grpo-d3"}
    assert all(k.info.status == "FINISHED" for k in kids.values())
    assert steps(client, kids["grpo-d1"].info.run_id, "train/reward_mean") == [1, 2]
    assert steps(client, kids["grpo-d3"].info.run_id, "train/reward_mean") == [3, 4]
    assert steps(client, kids["sft"].info.run_id, "sft/loss") == [1, 2, 3]
    arts = artifacts(client, pid)
    for a in ("config.yaml", "data/manifest.json", "data/sample.jsonl", "report.md", "curves.png",
              "eval/step_0.json", "eval/step_4.json", "checkpoints/step_4/adapter/adapter_model.safetensors",
              "checkpoints/step_0/state.json"):
        assert a in arts, a
    report = Path(out["report"]).read_text()
    assert "## Greedy evals" in report and "| 4 |" in report

    # The evaluate flow picks the run's latest checkpoint and logs a run of its own.
    from flows.evaluate import evaluate_flow
    res = evaluate_flow(run_id=pid, difficulties=[1, 3], size=3, max_tokens=8)
    ev = client.get_run(res["run_id"])
    assert ev.data.tags["picorl.eval_of"] == pid and ev.data.params["adapter"].endswith("step_4/adapter")
    assert set(res["by_difficulty"]) == {"1", "3"} and res["by_difficulty"]["3"]["n"] == 3
    assert steps(client, res["run_id"], "eval/acc_d3") == [0]


def test_failed_task_is_retried_and_logs_each_step_once(store, monkeypatch):
    client, tmp = store
    # Fails once after update 3 (before its checkpoint), then once while logging update 2's rows.
    monkeypatch.setenv("PICORL_FAULT", "update:3")
    monkeypatch.setenv("PICORL_FAULT_MARKER", str(tmp / "fired"))
    out = run_flow(tmp, "run.retries=2")
    assert (tmp / "fired").exists()
    pid = out["parent_run_id"]
    assert steps(client, pid, "train/reward_mean") == [1, 2, 3, 4]
    assert steps(client, children(client, pid)["grpo-d3"].info.run_id, "train/loss") == [3, 4]


def test_failure_while_logging_is_retried_without_doubles(store, monkeypatch):
    client, tmp = store
    monkeypatch.setenv("PICORL_FAULT", "log:2")
    monkeypatch.setenv("PICORL_FAULT_MARKER", str(tmp / "fired"))
    out = run_flow(tmp, "run.retries=1")
    assert (tmp / "fired").exists()
    pid = out["parent_run_id"]
    assert steps(client, pid, "train/reward_mean") == [1, 2, 3, 4]
    assert steps(client, pid, "train/update_s") == [1, 2, 3, 4]


def test_stopped_run_resumes_where_it_stopped(store, monkeypatch):
    client, tmp = store
    from picorl.faults import FaultInjected
    monkeypatch.setenv("PICORL_FAULT", "update:3")
    with pytest.raises(FaultInjected):
        run_flow(tmp, "run.retries=0")
    exp = client.get_experiment_by_name("picorl")
    (failed,) = client.search_runs([exp.experiment_id], filter_string="tags.`picorl.parent` = 'true'")
    assert failed.info.status == "FAILED"
    pid = failed.info.run_id
    assert steps(client, pid, "train/reward_mean") == [1, 2]
    monkeypatch.delenv("PICORL_FAULT")
    # A config.yaml edited since the run started is refused, naming the key; the run stays as it was.
    from picorl.config import ConfigError
    from picorl.run_folder import RunFolder
    config = RunFolder(failed.data.tags["picorl.run_dir"]).config
    started = config.read_text()
    edited = yaml.safe_load(started)
    edited["stages"][0]["updates"] = 50
    config.write_text(yaml.safe_dump(edited))
    with pytest.raises(ConfigError, match=r"config.yaml was edited after the run started: stages.0.updates \(2 -> 50\)"):
        run_flow(tmp, resume=pid)
    assert client.get_run(pid).info.status == "FAILED"
    config.write_text(started)
    out = run_flow(tmp, resume=pid)
    assert out["parent_run_id"] == pid
    assert client.get_run(pid).info.status == "FINISHED"
    # A finished run is not resumed again (that would only re-report and re-register it).
    with pytest.raises(ConfigError, match="that run is finished"):
        run_flow(tmp, resume=pid)
    assert steps(client, pid, "train/reward_mean") == [1, 2, 3, 4]
    assert steps(client, pid, "sft/loss") == [1, 2, 3]
    assert steps(client, pid, "eval/acc_d3") == [0, 2, 4]
    assert steps(client, pid, "eval/sampled_d3") == steps(client, pid, "eval/pass_d3") == [0, 2, 4]  # eval.samples
    assert len(client.search_runs([exp.experiment_id], filter_string="tags.`picorl.parent` = 'true'")) == 1


@pytest.mark.parametrize("override,msg", [("grpo.lr=-1", "grpo.lr=-1"), ("grpo.lrr=1", "did you mean 'grpo.lr'")])
def test_bad_config_fails_before_any_task(store, override, msg):
    client, tmp = store
    from picorl.config import ConfigError
    with pytest.raises(ConfigError, match=msg):
        run_flow(tmp, override)
    assert not (tmp / "out").exists()
    assert client.get_experiment_by_name("picorl") is None


def test_exported_mlflow_records_open_from_any_folder(store):
    import json
    import shutil
    import socket
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from cli import main
    from conftest import kill_session, wait_http
    client, tmp = store
    out = run_flow(tmp)
    pid = out["parent_run_id"]
    assert main(["export", "--run-dir", out["run_dir"], "--out", str(tmp / "results" / "smoke"), "--mlflow"]) == 0
    # Another machine: the results folder somewhere else, the original store gone.
    moved = tmp / "elsewhere" / "smoke"
    shutil.copytree(tmp / "results" / "smoke", moved)
    shutil.rmtree(tmp / "results")
    copy = MlflowClient(f"sqlite:///{moved / 'mlruns' / 'mlflow.db'}")
    (parent,) = copy.search_runs([e.experiment_id for e in copy.search_experiments()],
                                 filter_string="tags.`picorl.parent` = 'true'")
    assert parent.info.status == "FINISHED" and parent.data.params == client.get_run(pid).data.params
    assert steps(copy, parent.info.run_id, "train/reward_mean") == [1, 2, 3, 4]
    assert [m.value for m in copy.get_metric_history(parent.info.run_id, "eval/acc_d3")] == \
           [m.value for m in client.get_metric_history(pid, "eval/acc_d3")]
    assert set(children(copy, parent.info.run_id)) == {"sft", "grpo-d1", "grpo-d3"}
    # `mlflow ui` as the export says, started in the moved folder, serves the artifacts.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp / "ui.log"
    ui = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                           "sqlite:///mlruns/mlflow.db", "--artifacts-destination", "mlruns/artifacts",
                           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=moved,
                          stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", log)
        served = MlflowClient(f"http://127.0.0.1:{port}")
        names = {a.path for a in served.list_artifacts(parent.info.run_id)}
        assert {"report.md", "curves.png", "config.yaml", "eval"} <= names
        assert "checkpoints" not in names and (moved / "adapter" / "adapter_model.safetensors").is_file()
        assert client.list_artifacts(pid, "checkpoints")  # they stay in the source run, which says so
        assert copy.get_run(parent.info.run_id).data.tags["picorl.checkpoints"].startswith(f"not copied; in run {pid}")
        got = served.download_artifacts(parent.info.run_id, "config.yaml", str(tmp))
        assert Path(got).read_text() == (Path(out["run_dir"]) / "config.yaml").read_text()
    finally:
        kill_session(ui)
    assert json.loads((moved / "run.json").read_text())["step"] == 4


@pytest.mark.parametrize("tasks,says", [
    ("banana", "expected a list of tasks"),
    ({"string": "banana", "letters": ["a"]}, "expected a list of tasks"),
    ([{"string": "banana"}], "task 0: expected {'string': ..., 'letters': [...]}"),
    ([{"string": "ab", "letters": ["a"]}, {"string": 5, "letters": ["a"]}], "task 1: 'string' must be a non-empty string, got 5"),
    ([{"string": "banana", "letters": []}], "task 0: 'letters' must be a non-empty list"),
    ([{"string": "banana", "letters": ["an"]}], "'letters' must be a non-empty list of distinct single characters"),
    ([{"string": "banana", "letters": ["a", "a"]}], "distinct single characters"),
])
def test_a_served_model_names_the_task_it_cannot_answer(tasks, says):
    import re

    from picorl.serving import check_tasks
    with pytest.raises(ValueError, match=re.escape(says)):
        check_tasks(tasks)
    assert check_tasks([{"string": "banana", "letters": ("a", "n"), "answer": {}}]) == [
        {"string": "banana", "letters": ["a", "n"]}]


def test_the_final_weights_are_registered_and_served_by_mlflows_loader(store, monkeypatch):
    import json

    import mlflow

    from cli import main
    from picorl import data
    client, tmp = store
    out = run_flow(tmp, "run.registered_model=picorl-smoke")
    assert out["registered"] == {"name": "picorl-smoke", "version": "1", "checkpoint": "step_4"}
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    model = mlflow.pyfunc.load_model("models:/picorl-smoke/1")
    (answer,) = model.predict([{"string": "banana", "letters": ["a", "n"]}], params={"max_tokens": 8})
    assert isinstance(answer["completion"], str) and answer["completion"] and "prediction" in answer
    # max_tokens reaches predict (a params schema): fewer tokens cut the same greedy answer short.
    (short,) = model.predict([{"string": "banana", "letters": ["a", "n"]}], params={"max_tokens": 2})
    assert answer["completion"].startswith(short["completion"]) and len(short["completion"]) < len(answer["completion"])
    # Input that is not a list of {string, letters} tasks is refused with a message, not a traceback deep inside.
    for bad in ("banana", [{"string": 5, "letters": ["a"]}], [{"string": "banana"}], [{"string": "banana", "letters": []}]):
        with pytest.raises(Exception) as e:
            model.predict(bad)
        assert not isinstance(e.value, (AttributeError, KeyError, TypeError)), repr(e.value)
    # The served model is the run's final model: its greedy answers are the final eval's.
    last = json.loads((Path(out["run_dir"]) / "evals" / "step_4.json").read_text())["items"][:2]
    got = model.predict([{"string": i["string"], "letters": i["letters"]} for i in last], params={"max_tokens": 8})
    assert [g["completion"] for g in got] == [i["completion"] for i in last]
    # `picorl eval` takes the registry URI as its model.
    src = tmp / "in.jsonl"
    data.write_jsonl([{k: i[k] for k in ("string", "letters", "answer")} for i in last], src)
    import tempfile
    downloads = set(Path(tempfile.gettempdir()).glob("picorl-registered-*"))
    assert main(["eval", "--model", "models:/picorl-smoke/1", "--data", str(src), "--out", str(tmp / "o.jsonl"),
                 "--max-tokens", "8"]) == 0
    assert [r["completion"] for r in data.read_jsonl(tmp / "o.jsonl")] == [i["completion"] for i in last]
    assert set(Path(tempfile.gettempdir()).glob("picorl-registered-*")) == downloads  # the download is not left behind


def test_a_users_own_environment_runs_the_whole_pipeline(store, tmp_path, monkeypatch):
    """The README's environment, in a module of its own outside picorl/: data, a curriculum,
    evals, report, export, the registered model and `picorl gen`/`eval`, with no change to picoRL."""
    import json

    import mlflow

    from cli import main
    from picorl.export import export_run
    from test_envs import readme_environment
    client, tmp = store
    (tmp / "user").mkdir()
    (tmp / "user" / "my_task.py").write_text(readme_environment())
    monkeypatch.syspath_prepend(str(tmp / "user"))
    out = run_flow(tmp, "env.name=my_task:Reverse", "sft.enabled=false", "eval.difficulties=[1, 2]",
                   "stages=[{difficulty: 1, updates: 4, promote_at: 0.0, window: 2, max_difficulty: 2}]",
                   "run.registered_model=picorl-reverse")
    pid = out["parent_run_id"]
    assert client.get_run(pid).info.status == "FINISHED"
    assert client.get_run(pid).data.params["env.name"] == "my_task:Reverse"
    for d in (1, 2):
        assert steps(client, pid, f"eval/acc_d{d}") == [0, 2, 4]
    # promote_at 0 moves up after the first window: the curriculum climbed the user's tiers
    assert [m.value for m in client.get_metric_history(pid, "train/difficulty")][-1] == 2.0
    run_dir = Path(out["run_dir"])
    items = json.loads((run_dir / "evals" / "step_4.json").read_text())["items"]
    assert {"word", "answer", "completion", "prediction", "exact"} <= set(items[0])
    assert "| task | my_task:Reverse |" in Path(out["report"]).read_text()
    moved = export_run(run_dir, tmp / "export", fresh=2, progress=False)
    lines = [json.loads(x) for x in (moved / "final_eval.jsonl").read_text().splitlines()]
    assert [x["word"] for x in lines] == [i["word"] for i in items]
    assert len((moved / "fresh_eval.jsonl").read_text().splitlines()) == 4  # 2 fresh items x 2 tiers
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    model = mlflow.pyfunc.load_model("models:/picorl-reverse/1")
    got = model.predict([{"word": i["word"]} for i in items[:2]], params={"max_tokens": 8})
    assert [g["completion"] for g in got] == [i["completion"] for i in items[:2]]
    with pytest.raises(ValueError, match="task 0: reverse cannot build a prompt"):
        model.predict([{"string": "abc"}])
    # `picorl gen` and `picorl eval` take the environment too.
    assert main(["gen", "--env", "my_task:Reverse", "--difficulty", "2", "--n", "3", "--out", str(tmp / "g.jsonl")]) == 0
    assert main(["eval", "--env", "my_task:Reverse", "--model", "tiny-random-llama", "--data", str(tmp / "g.jsonl"),
                 "--out", str(tmp / "e.jsonl"), "--max-tokens", "4"]) == 0
    assert [len(json.loads(x)["word"]) for x in (tmp / "e.jsonl").read_text().splitlines()] == [5, 5, 5]
