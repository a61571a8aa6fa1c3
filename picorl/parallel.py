"""SFT or one GRPO chunk, data parallel: each process torchrun starts runs this as one rank.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m picorl.parallel RUN_DIR '{"stage": 0, ...}' ID
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m picorl.parallel RUN_DIR sft ID

For a chunk, every rank restores the chunk's starting checkpoint and runs the updates with
its share of each update's tasks; for SFT, every rank starts from the base model and trains
on its share of each step's batch (picorl/distributed.py, picorl/sft.py). Rank 0 alone
writes the checkpoint, the timings and the result (nodes/ID.result.json in the run folder).
`run_sft_parallel` and `run_chunk_parallel` are how the pipeline launches them
(`run.nproc_per_node` > 1 or `run.nnodes` > 1).

Several machines: the flow's machine publishes each chunk as nodes/ID.request.json in the
run folder, then starts its torchrun agent with a c10d rendezvous at `run.rdzv_endpoint`;
every other machine runs `picorl join --output-dir DIR` on the same (shared) output folder,
which starts the same torchrun command for every request it sees. torchrun waits until
`run.nnodes` agents have met, numbers the ranks, and the chunk runs as on one machine. A
request is removed when its torchrun ends, so a joining machine never waits on a chunk that
is over; a failed chunk's retry is a new request with a new rendezvous id.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from picorl.files import atomic_write_text
from picorl.plan import Chunk
from picorl.run_folder import RunFolder

JOIN_POLL_S = 1.0


SFT = "sft"  # what a request's job is when it is not a chunk


def job_name(request: dict) -> str:
    chunk = request.get("chunk")
    return "SFT" if chunk is None else f"chunk {chunk['start']}-{chunk['end']}"


def torchrun_command(run_dir, request: dict) -> list[str]:
    """The torchrun command line of a request (SFT or a chunk), the same on every machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={request['nproc_per_node']}"]
    if request["nnodes"] == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={request['nnodes']}", "--rdzv-backend=c10d", f"--rdzv-endpoint={request['endpoint']}",
                f"--rdzv-id={request['rdzv_id']}"]
    job = SFT if request.get("chunk") is None else json.dumps(request["chunk"])
    return cmd + ["-m", "picorl.parallel", str(run_dir), job, request["rdzv_id"]]


def run_sft_parallel(cfg, run_dir, progress: bool = True) -> dict:
    """Run SFT under torchrun (on run.nnodes machines of run.nproc_per_node ranks); its result, as run_sft's."""
    return _run_parallel(cfg, run_dir, None, progress)


def run_chunk_parallel(cfg, run_dir, chunk: Chunk, progress: bool = True) -> dict:
    """Run a chunk under torchrun (on run.nnodes machines of run.nproc_per_node ranks); its result, as run_chunk's."""
    return _run_parallel(cfg, run_dir, chunk, progress)


def _run_parallel(cfg, run_dir, chunk: Chunk | None, progress: bool) -> dict:
    folder = RunFolder(run_dir)
    tag = SFT if chunk is None else chunk.start
    request = {"chunk": None if chunk is None else asdict(chunk),
               "rdzv_id": f"{folder.root.name[-40:]}-{tag}-{uuid.uuid4().hex[:8]}",
               "nproc_per_node": cfg.run.nproc_per_node, "nnodes": cfg.run.nnodes, "endpoint": cfg.run.rdzv_endpoint}
    published = folder.chunk_request(request["rdzv_id"])
    if cfg.run.nnodes > 1:
        publish(folder, request)
    try:
        done = subprocess.run(torchrun_command(run_dir, request), stdout=None if progress else subprocess.DEVNULL,
                              stderr=None if progress else subprocess.PIPE, text=True)
    finally:
        published.unlink(missing_ok=True)
    result = folder.chunk_result(request["rdzv_id"])
    if done.returncode != 0 or not result.is_file():
        tail = (done.stderr or "")[-2000:]
        raise RuntimeError(f"data-parallel {job_name(request)} failed (exit {done.returncode}); "
                           f"the next try resumes from the last checkpoint{': ' + tail if tail else ''}")
    out = json.loads(result.read_text())
    result.unlink()
    return out


def publish(folder: RunFolder, request: dict) -> None:
    """Put a chunk request where `picorl join` looks; a resumed run's folder is live again."""
    folder.nodes.mkdir(exist_ok=True)
    folder.nodes_done.unlink(missing_ok=True)  # left by the attempt before a --resume
    atomic_write_text(folder.chunk_request(request["rdzv_id"]), json.dumps(request))


def release_nodes(run_dir) -> None:
    """Tell machines that joined the run that it is over (finished or failed)."""
    folder = RunFolder(run_dir)
    if folder.nodes.is_dir():
        folder.nodes_done.touch()


def join(output_dir, *, once: bool = False, poll_s: float = JOIN_POLL_S, log=print) -> int:
    """Run this machine's ranks of every chunk request that appears under output_dir.

    Runs until interrupted; with once=True, returns when a run it joined is over. A request
    whose torchrun fails is logged and left: the flow's retry publishes a new one.
    """
    out, joined, last_run = Path(output_dir), set(), None
    log(f"waiting for data-parallel chunks under {out.resolve()} (Ctrl-C to stop)")
    while True:
        for path in out.glob("*/nodes/*.request.json"):
            try:
                request = json.loads(path.read_text())
            except (OSError, ValueError):  # removed, or not a request: the head owns these files
                continue
            if request["rdzv_id"] in joined:
                continue
            joined.add(request["rdzv_id"])
            run_dir, job = path.parent.parent, job_name(request)
            log(f"joining {job} of {run_dir.name}")
            code = subprocess.run(torchrun_command(run_dir, request)).returncode
            if code != 0:
                log(f"{job} of {run_dir.name} failed here (exit {code}); the flow's retry will publish it again")
            last_run = run_dir
        if once and last_run is not None and RunFolder(last_run).nodes_done.exists():
            log(f"{last_run.name} is over")
            return 0
        time.sleep(poll_s)


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    from picorl import pipeline
    from picorl.distributed import init_from_env

    run_dir, job, rdzv_id = argv[0], argv[1], argv[2]
    rank, _ = init_from_env()
    try:
        cfg = pipeline.run_config(run_dir)
        if job == SFT:
            out = pipeline.run_sft(cfg, run_dir, progress=rank == 0)
        else:
            out = pipeline.run_chunk(cfg, run_dir, Chunk(**json.loads(job)), progress=rank == 0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        RunFolder(run_dir).nodes.mkdir(exist_ok=True)
        atomic_write_text(RunFolder(run_dir).chunk_result(rdzv_id), json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
