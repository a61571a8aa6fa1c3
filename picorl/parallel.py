"""SFT or one GRPO chunk, data parallel: each process torchrun starts runs this as one rank.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m picorl.parallel RUN_DIR '{"stage": 0, ...}' ID
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m picorl.parallel RUN_DIR sft ID

For a chunk, every rank restores the chunk's starting checkpoint and runs the updates with
its share of each update's tasks; for SFT, every rank starts from the base model and trains
on its share of each step's batch (picorl/distributed.py, picorl/sft.py). Rank 0 alone
writes the checkpoint, the timings and the result (nodes/ID.result.json in the run folder).
`run_any_sft` and `run_any_chunk` run a step here, or launch it so (`run_sft_parallel`,
`run_chunk_parallel`) when `run.nproc_per_node` > 1 or `run.nnodes` > 1.

Several machines: the flow's machine publishes each chunk as nodes/ID.request.json in the
run folder, then starts its torchrun agent with a c10d rendezvous at `run.rdzv_endpoint`;
every other machine runs `picorl join --output-dir DIR` on the same (shared) output folder,
which starts the same torchrun command for every request it sees. torchrun waits until
`run.nnodes` agents have met, numbers the ranks, and the chunk runs as on one machine. A
request is removed when its torchrun ends, so a joining machine never waits on a chunk that
is over; a failed chunk's retry is a new request with a new rendezvous id.

The shared folder is read by a daemon that serves every run in it, so join trusts nothing
there: a request must be a small regular file (no FIFO, no link to /dev/zero) whose every
field has its type and bounds, for a run folder with a config. Anything else is logged once
and skipped. The head touches its request every HEARTBEAT_S while the chunk runs; one left by
a killed head stops changing, and join leaves it after STALE_S instead of waiting in a
rendezvous nobody else comes to while a live run's request queues behind it.
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from picorl.config import RDZV_ENDPOINT
from picorl.files import atomic_write_text
from picorl.plan import Chunk
from picorl.run_folder import RunFolder

JOIN_POLL_S = 1.0
HEARTBEAT_S = 10.0  # the head touches its request this often while the chunk runs
STALE_S = 60.0  # a request unchanged for this long (its head died) is not joined
MAX_REQUEST_BYTES = 64 * 1024  # a request is ~300 bytes
_RDZV_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


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


def data_parallel(cfg) -> bool:
    return cfg.run.nproc_per_node > 1 or cfg.run.nnodes > 1


def run_any_sft(cfg, run_dir) -> dict:
    """SFT in this process, or under torchrun as the chunks are."""
    from picorl import pipeline
    return (run_sft_parallel if data_parallel(cfg) else pipeline.run_sft)(cfg, run_dir)


def run_any_chunk(cfg, run_dir, chunk: Chunk) -> dict:
    """A chunk in this process, or under torchrun with one process per GPU, on one machine or several."""
    from picorl import pipeline
    return (run_chunk_parallel if data_parallel(cfg) else pipeline.run_chunk)(cfg, run_dir, chunk)


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
    alive = threading.Event()
    if cfg.run.nnodes > 1:
        publish(folder, request)
        threading.Thread(target=_heartbeat, args=(published, alive), daemon=True).start()
    try:
        done = subprocess.run(torchrun_command(run_dir, request), stdout=None if progress else subprocess.DEVNULL,
                              stderr=None if progress else subprocess.PIPE, text=True)
    finally:
        alive.set()
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


def _heartbeat(path: Path, stop: threading.Event) -> None:
    """Touch a published request until `stop` is set: joined machines see the head is alive."""
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(path)
        except OSError:  # removed: the chunk is over
            return


class BadRequest(ValueError):
    """A file under nodes/ that is not a request join can run."""


def _int_in(request: dict, key: str, lo: int, hi: int) -> int:
    v = request.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise BadRequest(f"{key}={v!r}: expected a whole number in [{lo}, {hi}]")
    return v


def read_request(path: Path) -> dict:
    """A chunk request, checked field by field; BadRequest says what is wrong with it.

    Opened without following links and without blocking, so a FIFO or a link to a device
    cannot hang or flood the daemon; read only if it is a regular file of bounded size."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise BadRequest(f"cannot open it ({e.strerror or e}; a symlink?)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest("not a regular file")
        if st.st_size > MAX_REQUEST_BYTES:
            raise BadRequest(f"{st.st_size} bytes, over the {MAX_REQUEST_BYTES} a request can hold")
        raw = os.read(fd, MAX_REQUEST_BYTES + 1)
    finally:
        os.close(fd)
    try:
        request = json.loads(raw)
    except ValueError as e:
        raise BadRequest(f"not JSON ({e})") from None
    if not isinstance(request, dict):
        raise BadRequest("not a JSON object")
    rdzv_id = request.get("rdzv_id")
    if not isinstance(rdzv_id, str) or not _RDZV_ID.match(rdzv_id):
        raise BadRequest(f"rdzv_id={rdzv_id!r}: expected 1-128 letters, digits, '.', '_' or '-'")
    if path.name != f"{rdzv_id}.request.json":
        raise BadRequest(f"rdzv_id={rdzv_id!r} does not match the file's name")
    _int_in(request, "nproc_per_node", 1, os.cpu_count() or 1)
    # One machine runs a chunk itself (--standalone, under its run lock): only a rendezvous of
    # several is published for others to join.
    _int_in(request, "nnodes", 2, 4096)
    endpoint = request.get("endpoint")
    if not isinstance(endpoint, str) or not RDZV_ENDPOINT.fullmatch(endpoint):  # the rule run.rdzv_endpoint passed
        raise BadRequest(f"endpoint={endpoint!r}: expected host:port")
    chunk = request.get("chunk", "missing")
    if chunk is not None:
        if not isinstance(chunk, dict) or set(chunk) != {"stage", "start", "end", "eval_after"}:
            raise BadRequest(f"chunk={chunk!r}: expected null (SFT) or {{stage, start, end, eval_after}}")
        _int_in(chunk, "stage", 0, 10**6)
        start = _int_in(chunk, "start", 0, 10**9)
        _int_in(chunk, "end", start + 1, 10**9)
        if type(chunk["eval_after"]) is not bool:
            raise BadRequest(f"chunk.eval_after={chunk['eval_after']!r}: expected true or false")
    run = RunFolder(path.parent.parent)
    if not run.config.is_file():
        raise BadRequest(f"{run.root} has no config.yaml: not a run folder")
    return request


def release_nodes(run_dir) -> None:
    """Tell machines that joined the run that it is over (finished or failed)."""
    folder = RunFolder(run_dir)
    if folder.nodes.is_dir():
        folder.nodes_done.touch()


def is_live(mtime: float, now: float, seen: tuple[float, float, bool], stale_s: float) -> bool:
    """Whether a request's head is alive: touched within stale_s by this machine's clock, or seen
    by join to change within stale_s (a shared folder's clock may differ from this one's)."""
    _, seen_at, changed = seen
    return abs(now - mtime) <= stale_s or (changed and now - seen_at <= stale_s)


def join(output_dir, *, once: bool = False, poll_s: float = JOIN_POLL_S, stale_s: float = STALE_S,
         log=print) -> int:
    """Run this machine's ranks of every chunk request that appears under output_dir.

    Runs until interrupted; with once=True, returns when a run it joined is over. A request
    whose torchrun fails is logged and left: the flow's retry publishes a new one. A bad or
    stale request is logged once and skipped; it never stops another run's request.
    """
    out, joined, last_run = Path(output_dir), set(), None
    skipped: set[tuple] = set()  # (path, why) already logged
    seen: dict[Path, tuple[float, float, bool]] = {}  # request -> (mtime, when join saw it, changed since first look)
    log(f"waiting for data-parallel chunks under {out.resolve()} (Ctrl-C to stop)")
    while True:
        for path in sorted(out.glob("*/nodes/*.request.json")):
            try:
                request = read_request(path)
                if request["rdzv_id"] in joined:
                    continue
                mtime = path.lstat().st_mtime
            except FileNotFoundError:  # the chunk ended between the glob and the read
                continue
            except BadRequest as e:
                if (path, str(e)) not in skipped:
                    skipped.add((path, str(e)))
                    log(f"skipping {path}: {e}")
                continue
            now = time.time()
            if path not in seen:
                seen[path] = (mtime, now, False)
            elif seen[path][0] != mtime:
                seen[path] = (mtime, now, True)
            if not is_live(mtime, now, seen[path], stale_s):
                if (path, "stale") not in skipped:
                    skipped.add((path, "stale"))
                    log(f"skipping {path} while it is unchanged: not touched for over {stale_s:.0f} s "
                        "(its run's head stopped?)")
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
    from picorl.run_records import run_config

    run_dir, job, rdzv_id = argv[0], argv[1], argv[2]
    rank, _ = init_from_env()
    try:
        cfg = run_config(run_dir)
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
