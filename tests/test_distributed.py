"""Data-parallel GRPO and SFT (picorl/distributed.py): N ranks give one process's gradient; several
machines (picorl/parallel.py) meet through torchrun's rendezvous."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port, kill_session

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_gloo_ranks_give_the_single_process_gradient(tmp_path):
    from ddp_check import ALGORITHMS, gradients, sft_gradients

    out = tmp_path / "grads.pt"
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", str(ROOT / "tests" / "ddp_check.py"),
                        str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = torch.load(out)
    for algorithm in (*ALGORITHMS, "sft"):
        one = sft_gradients() if algorithm == "sft" else gradients(algorithm, rank=0, world=1)
        # float64 throughout (RMSNorm included): the ranks only sum the same terms in another
        # order, which moves a sum of n terms by at most ~n x 1.1e-16 relative.
        assert (ddp[algorithm] - one).norm() <= 1e-9 * one.norm(), algorithm
        assert one.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_two_rank_chunk_resumes_with_every_step_once(tmp_path, monkeypatch):
    from picorl import pipeline, run_records, session
    from picorl.config import load_config
    from picorl.parallel import run_chunk_parallel, run_sft_parallel
    from picorl.plan import chunks

    cfg = load_config(str(ROOT / "configs" / "smoke.yaml"), ["run.nproc_per_node=2"])
    session.clear_sessions()
    run_records.prepare_run_dir(cfg, tmp_path)
    pipeline.build_data(cfg, tmp_path)
    assert run_sft_parallel(cfg, tmp_path, progress=False)["sft_steps"] == cfg.sft.steps  # SFT on 2 ranks too
    first, second = chunks(cfg)
    assert run_chunk_parallel(cfg, tmp_path, first, progress=False)["step"] == 2
    monkeypatch.setenv("PICORL_FAULT", "update:3:kill")  # a rank dies mid-chunk: torchrun fails the chunk
    monkeypatch.setenv("PICORL_FAULT_MARKER", str(tmp_path / "fired"))
    with pytest.raises(RuntimeError, match="data-parallel chunk 2-4 failed"):
        run_chunk_parallel(cfg, tmp_path, second, progress=False)
    assert (tmp_path / "fired").exists()
    assert run_chunk_parallel(cfg, tmp_path, second, progress=False)["step"] == 4  # the retry resumes
    rows = [r for r in run_records.read_history(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["step"] for r in run_records.read_history(tmp_path) if r["kind"] == "sft"] == [1, 2, 3]
    assert [t["ok"] for t in run_records.read_timings(tmp_path) if t["task"] == "sft"] == [True]  # rank 0's row only
    timings = [t for t in run_records.read_timings(tmp_path) if t["task"] == "grpo"]
    # Rank 0's rows: the two chunks, and the killed try's failure row when rank 0 outlived the
    # killed rank long enough to record it (the fault fires in whichever rank reaches it first,
    # and torchrun then stops the others), never a finished one.
    oks = [t["ok"] for t in timings]
    assert oks in ([True, True], [True, False, True]), oks


def test_chunk_command_is_standalone_on_one_machine_and_a_rendezvous_on_several():
    from picorl.parallel import torchrun_command
    one = {"chunk": {"stage": 0, "start": 0, "end": 2, "eval_after": False}, "rdzv_id": "r-0-ab", "nproc_per_node": 2,
           "nnodes": 1, "endpoint": None}
    cmd = torchrun_command("RUN", one)
    assert "--standalone" in cmd and "--nproc-per-node=2" in cmd and not any("rdzv" in a for a in cmd)
    assert cmd[-4:] == ["picorl.parallel", "RUN", json.dumps(one["chunk"]), "r-0-ab"]
    two = torchrun_command("RUN", {**one, "nnodes": 2, "endpoint": "head:29500"})
    assert "--standalone" not in two
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29500", "--rdzv-id=r-0-ab"} <= set(two)


@pytest.mark.parametrize("endpoint", [None, "head", "head:port", "http://head:29500"])
def test_several_machines_need_a_rendezvous_endpoint(endpoint):
    from picorl.config import ConfigError, load_config
    sets = ["run.nnodes=2"] + ([f"run.rdzv_endpoint={endpoint}"] if endpoint else [])
    with pytest.raises(ConfigError, match="run.nnodes=2 needs run.rdzv_endpoint=host:port"):
        load_config(None, sets)
    for good in ("head:29500", "10.0.0.2:29500", "[fe80::1]:29500"):
        assert load_config(None, ["run.nnodes=2", f"run.rdzv_endpoint={good}"]).run.rdzv_endpoint == good


def test_a_resumed_run_publishes_its_chunks_as_live_again(tmp_path):
    # The first attempt ended (failed), so its folder says done; `picorl join --once` would
    # leave after one chunk of the resumed run if the marker stayed.
    from picorl.parallel import publish, release_nodes
    from picorl.run_folder import RunFolder
    folder = RunFolder(tmp_path)
    publish(folder, {"rdzv_id": "r-0-ab"})
    release_nodes(tmp_path)
    assert folder.nodes_done.exists()
    publish(folder, {"rdzv_id": "r-2-cd"})
    assert not folder.nodes_done.exists()
    assert json.loads(folder.chunk_request("r-2-cd").read_text()) == {"rdzv_id": "r-2-cd"}


GOOD_REQUEST = {"chunk": {"stage": 0, "start": 0, "end": 2, "eval_after": False}, "rdzv_id": "r-0-ab",
                "nproc_per_node": 1, "nnodes": 2, "endpoint": "head:29500"}


def _request_file(out, run, request, raw=None):
    folder = out / run / "nodes"
    folder.mkdir(parents=True, exist_ok=True)
    (out / run / "config.yaml").write_text("{}")
    path = folder / f"{request['rdzv_id'] if isinstance(request, dict) and isinstance(request.get('rdzv_id'), str) else 'x'}.request.json"
    path.write_text(raw if raw is not None else json.dumps(request))
    return path


@pytest.mark.parametrize("change,says", [
    ({"rdzv_id": None}, "rdzv_id=None"),
    ({"rdzv_id": [1, 2]}, "rdzv_id=[1, 2]"),
    ({"rdzv_id": "../../etc"}, "rdzv_id='../../etc'"),
    ({"nnodes": None}, "nnodes=None"),
    ({"nnodes": 1}, "nnodes=1: expected a whole number in [2, 4096]"),
    ({"nnodes": True}, "nnodes=True"),
    ({"nproc_per_node": 10**6}, "nproc_per_node=1000000"),
    ({"nproc_per_node": "2"}, "nproc_per_node='2'"),
    ({"endpoint": "head"}, "endpoint='head': expected host:port"),
    ({"endpoint": "head:1; rm -rf ~"}, "expected host:port"),
    ({"chunk": 5}, "chunk=5: expected null (SFT)"),
    ({"chunk": {"stage": 0, "start": 4, "end": 2, "eval_after": False}}, "end=2: expected a whole number in [5,"),
    ({"chunk": {"stage": 0, "start": 0, "end": 2, "eval_after": "yes"}}, "chunk.eval_after='yes'"),
])
def test_join_refuses_a_request_field_by_field(tmp_path, change, says):
    from picorl.parallel import BadRequest, read_request
    request = {**GOOD_REQUEST, **change}
    path = _request_file(tmp_path, "run1", GOOD_REQUEST, raw=json.dumps(request))
    with pytest.raises(BadRequest, match=re.escape(says)):
        read_request(path)


def test_join_reads_only_small_regular_files_of_a_run_folder(tmp_path):
    from picorl.parallel import MAX_REQUEST_BYTES, BadRequest, read_request
    good = _request_file(tmp_path, "run1", GOOD_REQUEST)
    assert read_request(good) == GOOD_REQUEST
    nodes = good.parent
    fifo = nodes / "f.request.json"
    os.mkfifo(fifo)  # reading it would block until a writer came
    with pytest.raises(BadRequest, match="not a regular file"):
        read_request(fifo)
    link = nodes / "z.request.json"
    link.symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(BadRequest, match="a symlink"):
        read_request(link)
    big = nodes / "big.request.json"
    big.write_text(" " * (MAX_REQUEST_BYTES + 1))
    with pytest.raises(BadRequest, match="bytes, over the"):
        read_request(big)
    for raw, says in (("[1, 2]", "not a JSON object"), ('{"rdzv_id"', "not JSON"),
                      (json.dumps({**GOOD_REQUEST, "rdzv_id": "other"}), "does not match the file's name")):
        (nodes / "r-0-ab.request.json").write_text(raw)
        with pytest.raises(BadRequest, match=re.escape(says)):
            read_request(good)
    (nodes / "r-0-ab.request.json").write_text(json.dumps(GOOD_REQUEST))
    (tmp_path / "run1" / "config.yaml").unlink()
    with pytest.raises(BadRequest, match="has no config.yaml"):
        read_request(good)


def test_join_skips_bad_and_stale_requests_and_runs_the_live_one(tmp_path, monkeypatch):
    # Three runs share the folder: one with a garbled request, one whose head was killed (its
    # request has not been touched for an hour), one live. torchrun is replaced by a command
    # that records which request it was given, so the test sees what join would have run.
    from picorl import parallel
    _request_file(tmp_path, "a-garbled", GOOD_REQUEST, raw='{"chunk": 5}')
    stale = _request_file(tmp_path, "b-stale", {**GOOD_REQUEST, "rdzv_id": "stale-1"})
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    _request_file(tmp_path, "c-live", {**GOOD_REQUEST, "rdzv_id": "live-1"})
    ran = tmp_path / "ran.txt"
    monkeypatch.setattr(parallel, "torchrun_command", lambda run_dir, request: [
        sys.executable, "-c", f"open({str(ran)!r}, 'a').write({request['rdzv_id']!r} + '\\n')"])
    (tmp_path / "c-live" / "nodes" / "done").touch()  # the live run is over once its chunk ran
    lines = []
    assert parallel.join(tmp_path, once=True, poll_s=0.01, log=lines.append) == 0
    assert ran.read_text() == "live-1\n"
    assert any("a-garbled" in x and "skipping" in x and "rdzv_id=None" in x for x in lines), lines
    assert any("b-stale" in x and "not touched for over 60 s" in x for x in lines), lines


def test_a_stale_request_that_starts_changing_again_is_joined(tmp_path):
    from picorl.parallel import is_live
    now = 10_000.0
    # Written an hour ago by this clock and never seen to change: stale.
    assert not is_live(now - 3600, now, (now - 3600, now - 5, False), 60)
    # The same file seen to change 5 s ago (a head whose clock is an hour behind): live.
    assert is_live(now - 3590, now, (now - 3590, now - 5, True), 60)
    assert is_live(now - 1, now, (now - 1, now - 1, False), 60)


def test_the_head_touches_its_request_while_the_chunk_runs(tmp_path, monkeypatch):
    import threading

    from picorl import parallel
    path = tmp_path / "r.request.json"
    path.write_text("{}")
    os.utime(path, (0, 0))
    monkeypatch.setattr(parallel, "HEARTBEAT_S", 0.01)
    stop = threading.Event()
    beat = threading.Thread(target=parallel._heartbeat, args=(path, stop))
    beat.start()
    deadline = time.time() + 30
    while path.stat().st_mtime == 0 and time.time() < deadline:
        time.sleep(0.01)
    stop.set()
    beat.join(30)
    assert path.stat().st_mtime > 0 and not beat.is_alive()


def test_join_needs_the_shared_output_folder(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cli", "join", "--output-dir", str(tmp_path / "none")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no such folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_on_two_machines_one_of_them_joined_with_picorl_join(tmp_path):
    # Two torchrun agents on this machine stand for two machines: the flow's, and one that
    # runs `picorl join` on the shared output folder. The rendezvous waits for both, so the
    # run can only finish if the joined machine took its rank in every chunk.
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PICORL_FAULT", None)
    with open(tmp_path / "join.log", "w") as log:
        joiner = subprocess.Popen([sys.executable, "-m", "cli", "join", "--output-dir", str(out), "--once"], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            train = subprocess.run([sys.executable, "-m", "cli", "train", "--config", str(ROOT / "configs" / "smoke.yaml"),
                                    "--set", f"run.output_dir={out}", "--set", "run.retries=0", "--nnodes", "2",
                                    "--rdzv-endpoint", f"127.0.0.1:{free_port()}"],
                                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=700)
            assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
            assert joiner.wait(timeout=60) == 0
        finally:
            kill_session(joiner)
    joined = (tmp_path / "join.log").read_text()
    assert "joining chunk 0-2 of smoke-" in joined and "joining chunk 2-4 of smoke-" in joined, joined[-3000:]
    (run_dir,) = out.iterdir()
    from picorl import run_records
    assert [r["step"] for r in run_records.read_history(run_dir) if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [p.name for p in (run_dir / "nodes").iterdir()] == ["done"]  # requests and results cleaned up
