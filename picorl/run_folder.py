"""The run folder: its layout in one place, and who owns it while a run trains.

A run folder holds everything a run needs to continue after a crash:
    config.yaml                  the resolved config
    config.lock.json             what config.yaml held when the run started (a hand edit is refused)
    data/                        train_dN/ and eval_dN/ datasets, manifest.json, sample.jsonl
    checkpoints/step_N/          adapter + trainer state + state.json + history.jsonl
    evals/step_N.json            per-difficulty summaries and per-item completions
    timings.jsonl                each step's wall time and machine, failed tries included
    report.md, curves.png        the training report
    nodes/                       data parallel chunks: <id>.request.json (what `picorl join`
                                 machines pick up), <id>.result.json (rank 0's result), done
    .lock                        held by the process training in it

    run = RunFolder("outputs/smoke-20261126-120000-abcd1234")
    run.checkpoint(4)            # .../checkpoints/step_4
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path


class RunFolder:
    def __init__(self, root):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    config = property(lambda self: self.root / "config.yaml")
    config_lock = property(lambda self: self.root / "config.lock.json")
    data = property(lambda self: self.root / "data")
    manifest = property(lambda self: self.data / "manifest.json")
    sample = property(lambda self: self.data / "sample.jsonl")
    checkpoints = property(lambda self: self.root / "checkpoints")
    evals = property(lambda self: self.root / "evals")
    timings = property(lambda self: self.root / "timings.jsonl")
    report = property(lambda self: self.root / "report.md")
    curves = property(lambda self: self.root / "curves.png")
    lock = property(lambda self: self.root / ".lock")
    nodes = property(lambda self: self.root / "nodes")
    nodes_done = property(lambda self: self.nodes / "done")  # the run is over: joined machines may leave

    def chunk_request(self, rdzv_id: str) -> Path:
        return self.nodes / f"{rdzv_id}.request.json"

    def chunk_result(self, rdzv_id: str) -> Path:
        return self.nodes / f"{rdzv_id}.result.json"

    @staticmethod
    def new_path(output_dir, name: str, flow_run_id: str) -> Path:
        """outputs/<name>-<date>-<time>-<first 8 of the flow run id>: unique, and sorted by start."""
        return Path(output_dir).resolve() / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{flow_run_id[:8]}"

    def dataset(self, split: str, difficulty: int) -> Path:
        return self.data / f"{split}_d{difficulty}"

    def checkpoint(self, step: int) -> Path:
        from picorl.checkpoint import step_path
        return step_path(self.checkpoints, step)

    def eval_file(self, step: int) -> Path:
        return self.evals / f"step_{step}.json"

    def eval_files(self) -> dict[int, Path]:
        """{step: evals/step_N.json}, oldest first."""
        found = {int(p.stem[5:]): p for p in self.evals.glob("step_*.json") if p.stem[5:].isdigit()}
        return dict(sorted(found.items()))


def output_dir_problem(output_dir) -> str | None:
    """Why run folders cannot be made under `output_dir` (checked without creating anything), or None."""
    path = Path(output_dir).resolve()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        return f"run.output_dir={str(output_dir)!r}: {path} is a file, not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"run.output_dir={str(output_dir)!r}: folder {path} is not writable"
    return None


class RunLocked(RuntimeError):
    """The run folder cannot be taken: another live process owns it, or it cannot be written."""


class RunLock:
    """Exclusive ownership of a run folder while a process trains in it.

    An advisory lock (flock) on the folder's .lock file: the kernel drops it when its holder
    exits, however it exits, so a crashed or killed run never keeps its folder locked. The
    file names the holder (pid and host) for the message a second process gets.
    """

    def __init__(self, run_dir):
        try:
            self.fd = os.open(RunFolder(run_dir).lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only or immutable folder: a run cannot continue in it
            raise RunLocked(f"run folder {run_dir} cannot be written ({e.strerror or e}: {RunFolder(run_dir).lock}); "
                            "a run needs its folder writable to continue") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise RunLocked(f"run folder {run_dir} is in use by {holder}; wait for it to finish or stop it "
                            "first (a second process would log every step twice)") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
