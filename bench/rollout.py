"""Rollout throughput per engine, side by side in one run.

    python -m bench.rollout                      # CPU default: 64 prompts x 64 new tokens
    python -m bench.rollout --prompts 64 --max-tokens 512 --dtype bfloat16   # GPU shape
    python -m bench.rollout --engines hf hf-static hf-static-compile         # the HF switches
    python -m bench.rollout --prompts 128 --max-tokens 384 --dtype bfloat16 --engines hf graph

Engines: `hf` (transformers generate, dynamic KV cache), `hf-static` (static KV cache),
`hf-static-compile` (static cache + torch.compile'd decode step), `graph` (our decode step over
a static cache, CUDA graphs on a GPU: picorl/rollout/graph.py), `graph-compile` (the same step
compiled by Inductor before it is captured: `rollout.graph_compile`), `graph-whole` (the eager
step without compaction: every row of a chunk decodes until its longest row stops, the graph
engine's CPU path before rows that stopped left the batch), `graph-bf16` (the graph engine
over bf16 copies of the weights, `rollout.dtype=bfloat16`), `vllm`.
Sampling at temperature 1 from the embedded model with a LoRA adapter (as in training),
new tokens counted per engine, the best of --repeats timed calls after one warm-up call
(the warm-up pays any compile or graph capture; its seconds are reported as `warmup_s`);
`ms_per_step` is a timed call's seconds over its longest completion (the decode steps it
ran), and on a GPU `peak_gb` the most memory allocated while that engine ran. Each engine also
decodes 8 prompts greedily; `same_greedy_as_hf` says whether its token ids equal the
`hf` engine's, so a speed-up that changes results shows up beside its figure.
Prints a table and writes bench/results/rollout-<machine>-<prompts>x<tokens>.json.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from bench.common import machine, machine_tag, write_result
from picorl import data, models
from picorl.rollout import Sampling
from picorl.session import build_engine


def timed(engine, prompts, sampling, repeats):
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine.generate(prompts, 1, Sampling(**{**sampling.__dict__, "seed": 1000}))  # warm-up, same shapes
    best = {"warmup_s": round(time.perf_counter() - t0, 2)}
    for r in range(repeats):
        t0 = time.perf_counter()
        groups = engine.generate(prompts, 1, Sampling(**{**sampling.__dict__, "seed": r}))
        dt = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for g in groups for c in g)
        steps = max(len(c.token_ids) for g in groups for c in g)
        if tokens / dt > best.get("tokens_per_s", 0):
            best.update(seconds=round(dt, 2), new_tokens=tokens, tokens_per_s=round(tokens / dt, 1),
                        ms_per_step=round(dt / steps * 1e3, 2))
    if torch.cuda.is_available():
        best["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return best


def greedy_ids(engine, prompts, max_tokens):
    groups = engine.generate(prompts, 1, Sampling(temperature=0.0, max_tokens=max_tokens))
    return [g[0].token_ids for g in groups]


def make_engine(name, model, tok, args):
    """The engine a bench name stands for (hf, hf-static, hf-static-compile, graph, graph-whole,
    graph-compile, graph-bf16, vllm), built as the pipeline builds it."""
    if name.startswith("hf"):
        return build_engine("hf", model, tok, batch_size=args.prompts, progress=False,
                            hf_cache="static" if "static" in name else "dynamic", hf_compile="compile" in name)
    if name.startswith("graph"):
        return build_engine("graph", model, tok, batch_size=args.prompts, progress=False,
                            graph_compile=name == "graph-compile", compact=name != "graph-whole",
                            graph_dtype=torch.bfloat16 if name == "graph-bf16" else None)
    return build_engine("vllm", model, tok, model_path=str(models.embedded_model_dir()), dtype=args.dtype,
                        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=2048, lora_rank=32,
                        progress=False)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--difficulty", type=int, default=6)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"],
                    choices=["hf", "hf-static", "hf-static-compile", "graph", "graph-compile", "graph-whole", "graph-bf16",
                             "vllm"])
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = ap.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = models.load_model(models.EMBEDDED, device=device, dtype=args.dtype)
    model = models.add_lora(model, rank=32, alpha=64)
    prompts = [r["messages"] for r in data.eval_records(args.difficulty, args.prompts)]
    sampling = Sampling(temperature=1.0, max_tokens=args.max_tokens)
    results, reference = {}, None
    for name in args.engines:
        engine = make_engine(name, model, tok, args)
        results[name] = timed(engine, prompts, sampling, args.repeats)
        if name == "graph":  # capture seconds (CUDA), cache size and graphs held
            from picorl.rollout.graph import describe_capacity
            results[name]["capacity"] = describe_capacity(engine)
        ids = greedy_ids(engine, prompts[:8], args.max_tokens)
        if name == "hf":
            reference = ids
        if reference is not None:
            results[name]["same_greedy_as_hf"] = ids == reference
        print(name, results[name], flush=True)
        del engine
        gc.collect()
    out = {"machine": machine(), "torch": torch.__version__, "config": {
        "model": models.EMBEDDED, "lora_rank": 32, "prompts": args.prompts, "max_tokens": args.max_tokens,
        "difficulty": args.difficulty, "dtype": args.dtype, "temperature": 1.0}, "engines": results}
    try:
        import vllm
        out["vllm"] = vllm.__version__
    except ImportError:
        pass
    print(f"{out['machine']}: {args.prompts} prompts x {args.max_tokens} new tokens, {args.dtype}")
    print("| engine | new tokens | seconds | tokens/s | ms/step | vs hf | warm-up s | greedy = hf |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = r["tokens_per_s"] / results["hf"]["tokens_per_s"] if "hf" in results else float("nan")
        print(f"| {name} | {r['new_tokens']} | {r['seconds']} | {r['tokens_per_s']} | {r['ms_per_step']} | {ratio:.2f}x | "
              f"{r['warmup_s']} | {r.get('same_greedy_as_hf', '-')} |")
    write_result(f"rollout-{machine_tag(out['machine'])}-{args.prompts}x{args.max_tokens}-{args.dtype}-{'_'.join(args.engines)}", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
