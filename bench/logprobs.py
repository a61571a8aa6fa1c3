"""Log-probs of the sampled tokens, forward and backward: `selected_logprobs` beside the plain
`log_softmax(logits.float()).gather(...)` it replaced, at one micro-batch of the GRPO loss.

    python -m bench.logprobs                                     # CPU: 8 x 384 positions, float32
    python -m bench.logprobs --rows 64 --dtype bfloat16          # configs/gpu.yaml's micro-batch

Each expression runs in a fresh process, so its peak memory is its own: the peak allocated
by torch on a GPU, the peak resident set size on a CPU (less the process's size before).
The logits are random, of the embedded model's vocabulary (49,152). Writes
bench/results/logprobs-<machine>-<rows>x<positions>-<dtype>.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from bench.common import machine, machine_tag, write_result

VOCAB = 49152


def measure(way: str, rows: int, positions: int, dtype: str, repeats: int) -> dict:
    """In this process: peak memory and the median seconds of forward + backward."""
    from picorl.grpo import selected_logprobs

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    # Drawn in their own dtype: a float32 draw cast down would raise the peak before it is read.
    logits = torch.randn(rows, positions + 1, VOCAB, generator=g, device=device, dtype=getattr(torch, dtype))
    logits.requires_grad_()
    targets = torch.randint(0, VOCAB, (rows, positions), generator=g, device=device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        view = logits[:, :-1]  # the last position predicts nothing, as in the trainer
        if way == "selected":
            logp = selected_logprobs(view, targets)
        else:
            logp = torch.log_softmax(view.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
        logp.sum().backward()
        logits.grad = None
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20  # KiB -> GiB
    return {"peak_gb": round(peak, 2), "seconds": round(sorted(times)[len(times) // 2], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8, help="sequences in the micro-batch")
    ap.add_argument("--positions", type=int, default=384, help="completion positions per sequence")
    ap.add_argument("--dtype", default="float32", help="the logits' dtype: float32 or bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.rows, args.positions, args.dtype, args.repeats)))
        return 0
    rows = {}
    for way in ("log_softmax", "selected"):
        out = subprocess.run([sys.executable, "-m", "bench.logprobs", "--child", way, "--rows", str(args.rows),
                              "--positions", str(args.positions), "--dtype", args.dtype,
                              "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        rows[way] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{way:>11}: peak {rows[way]['peak_gb']} GB above the logits, {rows[way]['seconds']} s forward + backward",
              flush=True)
    res = {"machine": machine(), "torch": torch.__version__, "config": vars(args) | {"vocab": VOCAB}, "rows": rows,
           "memory_ratio": round(rows["log_softmax"]["peak_gb"] / max(rows["selected"]["peak_gb"], 1e-9), 2),
           "speedup": round(rows["log_softmax"]["seconds"] / rows["selected"]["seconds"], 2)}
    print(f"{res['machine']}: {args.rows} x {args.positions} positions x {VOCAB}, {args.dtype}: selected_logprobs "
          f"peaks {res['memory_ratio']}x lower, {res['speedup']}x the speed")
    write_result(f"logprobs-{machine_tag(res['machine'])}-{args.rows}x{args.positions}-{args.dtype}", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
