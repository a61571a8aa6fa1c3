"""Data-parallel GRPO (picorl/distributed.py): N ranks give one process's gradient."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_gloo_ranks_give_the_single_process_gradient(tmp_path):
    from ddp_check import ALGORITHMS, gradients

    out = tmp_path / "grads.pt"
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", str(ROOT / "tests" / "ddp_check.py"),
                        str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = torch.load(out)
    for algorithm in ALGORITHMS:
        one = gradients(algorithm, rank=0, world=1)
        # float64 throughout (RMSNorm included): the ranks only sum the same terms in another
        # order, which moves a sum of n terms by at most ~n x 1.1e-16 relative.
        assert (ddp[algorithm] - one).norm() <= 1e-9 * one.norm(), algorithm
        assert one.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_two_rank_chunk_resumes_with_every_step_once(tmp_path, monkeypatch):
    from picorl import pipeline
    from picorl.config import load_config
    from picorl.parallel import run_chunk_parallel
    from picorl.plan import chunks

    cfg = load_config(str(ROOT / "configs" / "smoke.yaml"), ["run.nproc_per_node=2"])
    pipeline.clear_sessions()
    pipeline.prepare_run_dir(cfg, tmp_path)
    pipeline.build_data(cfg, tmp_path)
    pipeline.run_sft(cfg, tmp_path, progress=False)
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
    timings = [t for t in pipeline.read_timings(tmp_path) if t["task"] == "grpo"]
    assert [t["ok"] for t in timings] == [True, True]  # rank 0's rows; the killed try never finished one
