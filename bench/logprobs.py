"""Peak memory and seconds of GRPO's loss + backward, whole logits against the chunked head.

    python -m bench.logprobs                         # CPU: 8 tasks x k 8 x 64 completion tokens
    python -m bench.logprobs --chunk 256 --repeats 3

One fixed batch (d6 prompts of the training set, random completion tokens, LoRA r32) goes
through `token_logprobs` and a backward of its sum, `grpo.logprob_chunk` = 0 (the whole
(positions x vocab) logits, today's path) and = --chunk. Each way runs in a process of its
own, alternating, so one process's peak never hides the other's: the figure is the peak
resident memory (GPU: max allocated) above what the process held before the loss. Writes
bench/results/logprobs-<machine>-<tasks>x<k>x<tokens>-<dtype>.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from bench.common import machine, machine_tag, write_result
from picorl import models


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> int:
    """Start counting the peak from now; returns the bytes held now. On Linux, writing 5 to
    clear_refs resets the process's resident high-water mark, so the model's load (whose peak
    may be higher than a chunked loss's) does not mask the figure."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS") * 1024
    except OSError:  # not Linux: the peak since the process started
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    try:
        return _status_kb("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one_way(args) -> dict:
    """In this process: one loss + backward at chunk args.one; its seconds and peak above the start."""
    from picorl import data
    from picorl.batching import chat_prompt_ids, pad_batch
    from picorl.config import load_config
    from picorl.grpo import token_logprobs

    cfg = load_config(None, [f"model.name={args.model}", f"model.dtype={args.dtype}", "model.lora.rank=32",
                             "model.lora.alpha=64"])
    torch.manual_seed(0)
    model, tok = models.load_for_config(cfg)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    records = data.train_records(6, args.tasks, seed=0)
    seqs, masks = [], []
    for r in records:
        prompt = chat_prompt_ids(tok, data.messages_of(r))
        for _ in range(args.k):
            completion = torch.randint(0, len(tok), (args.max_tokens,), generator=g).tolist()
            seqs.append(prompt + completion)
            masks.append([0] * len(prompt) + [1] * len(completion))
    batch = pad_batch(seqs, masks, tok.pad_token_id, device)
    with torch.no_grad():  # warm: kernels, allocator and the forward's buffers before the baseline
        token_logprobs(model, *batch, chunk=args.one)
    base = reset_peak()
    t0 = time.perf_counter()
    logp, mask = token_logprobs(model, *batch, chunk=args.one)
    (logp * mask).sum().backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "peak_above_start_gb": (peak_bytes() - base) / 2**30,
            "positions": int(mask.sum().item()), "vocab": len(tok)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=models.EMBEDDED, help="another model makes a smoke run: no result file")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--chunk", type=int, default=256, help="positions per pass through the head")
    ap.add_argument("--repeats", type=int, default=3, help="processes per way, alternating")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child: run one way, print JSON
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one_way(args)))
        return 0
    if args.chunk < 1:
        ap.error(f"--chunk must be >= 1, got {args.chunk}")
    runs: dict[str, list[dict]] = {"whole": [], "chunked": []}
    for _ in range(args.repeats):
        for way, chunk in (("whole", 0), ("chunked", args.chunk)):
            cmd = [sys.executable, "-m", "bench.logprobs", "--one", str(chunk), "--model", args.model,
                   "--tasks", str(args.tasks), "--k", str(args.k), "--max-tokens", str(args.max_tokens),
                   "--dtype", args.dtype]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            runs[way].append(json.loads(done.stdout.strip().splitlines()[-1]))
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_above_start_gb")}
           for w, rs in runs.items()}
    out = {"machine": machine(), "torch": torch.__version__,
           "config": {"model": args.model, "tasks": args.tasks, "k": args.k, "max_tokens": args.max_tokens,
                      "dtype": args.dtype, "chunk": args.chunk, "repeats": args.repeats,
                      "positions": runs["whole"][0]["positions"], "vocab": runs["whole"][0]["vocab"]},
           "runs": runs, "median": med,
           "memory_ratio": round(med["whole"]["peak_above_start_gb"] / max(med["chunked"]["peak_above_start_gb"], 1e-9), 2),
           "seconds_ratio": round(med["chunked"]["seconds"] / med["whole"]["seconds"], 2)}
    print(f"{out['machine']}: {args.tasks} x k {args.k} x {args.max_tokens} completion tokens, chunk {args.chunk}")
    print("| way | loss + backward s (median) | peak above start GB (median) |")
    print("|---|---|---|")
    for w in ("whole", "chunked"):
        print(f"| {w} | {med[w]['seconds']:.2f} | {med[w]['peak_above_start_gb']:.3f} |")
    print(f"memory {out['memory_ratio']}x lower chunked; chunked takes {out['seconds_ratio']}x the seconds")
    if args.model == models.EMBEDDED:
        write_result(f"logprobs-{machine_tag(out['machine'])}-{args.tasks}x{args.k}x{args.max_tokens}-{args.dtype}", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
