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
