"""Seconds per GRPO update on 1 process and on N data-parallel ranks (torchrun, gloo on CPU), side by side.

    python -m bench.ddp                       # tiny model, smoke shape, 1 vs 2 ranks
    python -m bench.ddp --model smollm2-135m-instruct --tasks 4 --k 4 --max-tokens 32

Each setting runs the same chunk of updates from the same SFT checkpoint (a copy of one run
folder each), the 1-process chunk in this process and the N-rank chunk through
picorl/parallel.py, as the pipeline does. Both include the chunk's model load; torchrun's
start and the ranks' imports are measured apart (`launch_s`, a chunk with nothing left to
do) and taken out of the N-rank figure. Writes bench/results/ddp-<machine>-<model>-<ranks>ranks.json.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from bench.common import machine, machine_tag, write_result
from picorl import pipeline, run_records, session
from picorl.config import load_config
from picorl.parallel import run_chunk_parallel
from picorl.plan import Chunk


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-random-llama")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--updates", type=int, default=4)
    args = ap.parse_args()
    cfg = load_config(str(ROOT / "configs" / "smoke.yaml"), [
        f"model.name={args.model}", f"grpo.tasks_per_update={args.tasks}", f"grpo.group_size={args.k}",
        f"rollout.max_tokens={args.max_tokens}", f"stages=[{{difficulty: 1, updates: {args.updates}}}]",
        f"run.chunk_updates={args.updates}", "model.dtype=float32"])
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        run_records.prepare_run_dir(cfg, base)
        pipeline.build_data(cfg, base)
        pipeline.run_sft(cfg, base, progress=False)
        session.clear_sessions()
        runs = {}
        for label in ("one", "launch", "ranks"):
            shutil.copytree(base, Path(tmp) / label)
        t0 = time.perf_counter()
        pipeline.run_chunk(cfg, Path(tmp) / "one", Chunk(0, 0, args.updates, False), progress=False)
        runs["one_process_s"] = time.perf_counter() - t0
        par = load_config(str(Path(tmp) / "one" / "config.yaml"), [f"run.nproc_per_node={args.ranks}"])
        t0 = time.perf_counter()
        run_chunk_parallel(par, Path(tmp) / "launch", Chunk(0, 0, 0, False), progress=False)
        runs["launch_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_chunk_parallel(par, Path(tmp) / "ranks", Chunk(0, 0, args.updates, False), progress=False)
        runs["ranks_s"] = time.perf_counter() - t0
    per_one = runs["one_process_s"] / args.updates
    per_ranks = (runs["ranks_s"] - runs["launch_s"]) / args.updates
    out = {"machine": machine(), "torch": torch.__version__, "config": vars(args),
           "seconds": {k: round(v, 2) for k, v in runs.items()},
           "update_s": {"one_process": round(per_one, 3), f"{args.ranks}_ranks": round(per_ranks, 3)}}
    print(f"{out['machine']}: {args.model}, {args.tasks} tasks x k {args.k} x {args.max_tokens} tokens")
    print(f"| setting | s / update |\n|---|---|\n| 1 process | {per_one:.3f} |\n"
          f"| {args.ranks} ranks (launch {runs['launch_s']:.1f} s apart) | {per_ranks:.3f} |")
    write_result(f"ddp-{machine_tag(out['machine'])}-{args.model}-{args.ranks}ranks", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
