"""One GRPO chunk, data parallel: each process torchrun starts runs this as one rank.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m picorl.parallel RUN_DIR '{"stage": 0, ...}'

Every rank restores the chunk's starting checkpoint, runs the updates with its share of each
update's tasks (picorl/distributed.py), and rank 0 alone writes the checkpoint and the
timings; the chunk's result is rank 0's last line of output. `run_chunk_parallel` is how
the pipeline launches it (`run.nproc_per_node` > 1).
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

from picorl.plan import Chunk


def run_chunk_parallel(cfg, run_dir, chunk: Chunk, progress: bool = True) -> dict:
    """Run a chunk under torchrun with cfg.run.nproc_per_node ranks; its result, as run_chunk's."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.run.nproc_per_node}",
           "-m", "picorl.parallel", str(run_dir), json.dumps(asdict(chunk))]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE, text=True)
    if done.returncode != 0:
        tail = (done.stderr or "")[-2000:]
        raise RuntimeError(f"data-parallel chunk {chunk.start}-{chunk.end} failed (exit {done.returncode}); "
                           f"the next try resumes from the last checkpoint{': ' + tail if tail else ''}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    from picorl import pipeline
    from picorl.distributed import init_from_env

    run_dir, chunk = argv[0], Chunk(**json.loads(argv[1]))
    rank, _ = init_from_env()
    try:
        out = pipeline.run_chunk(pipeline.run_config(run_dir), run_dir, chunk, progress=rank == 0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
