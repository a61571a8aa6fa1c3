"""Data-parallel GRPO and SFT (picorl/distributed.py): N ranks give one process's gradient; several
machines (picorl/parallel.py) meet through torchrun's rendezvous."""
import json
import os
import subprocess
import sys
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
    from picorl import pipeline
    from picorl.config import load_config
    from picorl.parallel import run_chunk_parallel, run_sft_parallel
    from picorl.plan import chunks

    cfg = load_config(str(ROOT / "configs" / "smoke.yaml"), ["run.nproc_per_node=2"])
    pipeline.clear_sessions()
    pipeline.prepare_run_dir(cfg, tmp_path)
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
    rows = [r for r in pipeline.read_history(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["step"] for r in pipeline.read_history(tmp_path) if r["kind"] == "sft"] == [1, 2, 3]
    assert [t["ok"] for t in pipeline.read_timings(tmp_path) if t["task"] == "sft"] == [True]  # rank 0's row only
    timings = [t for t in pipeline.read_timings(tmp_path) if t["task"] == "grpo"]
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
    from picorl import pipeline
    assert [r["step"] for r in pipeline.read_history(run_dir) if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [p.name for p in (run_dir / "nodes").iterdir()] == ["done"]  # requests and results cleaned up
