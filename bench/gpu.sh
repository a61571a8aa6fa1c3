#!/usr/bin/env bash
# Every GPU figure of the fast-engine work, in order of importance, on a machine with one
# CUDA GPU and requirements.txt installed. Each benchmark writes bench/results/*.json naming
# the GPU; `python -m bench.table --write` then rebuilds the README's headline and docs/benchmarks.md. About 12 minutes
# on one H100; a step that fails stops the script, so the figures before it are kept.
#
#   bash bench/gpu.sh 2>&1 | tee gpu.log
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

# 1. The CUDA graphs replay the eager step exactly, and a sync reaches them.
python -m pytest -q tests/test_graph_engine_cuda.py
# 2. Decode throughput at the issue's shapes, the graph engine beside hf (128 rows) and alone (256).
python -m bench.rollout --prompts 128 --max-tokens 384 --dtype bfloat16 --engines hf graph --repeats 1
python -m bench.rollout --prompts 256 --max-tokens 384 --dtype bfloat16 --engines graph --repeats 2
# 3. One GRPO update at configs/gpu.yaml's shape, split into its parts, and its 25 costliest kernels.
python -m bench.update --tasks 16 --k 8 --max-tokens 384 --micro-batch 64 --dtype bfloat16 --engine graph --updates 6 --profile 25
# 4. SFT throughput at the headline recipe's batch (the issue's 0.33 s/step was measured at 64),
#    and the 25 costliest kernels of two steps.
python -m bench.sft_speed --batch-size 64 --dtype bfloat16 --profile 25
# 5. TRL's GRPOTrainer at the same shape, in the same run.
python -m bench.vs_trl --tasks 16 --k 8 --max-tokens 384 --micro-batch 64 --dtype bfloat16 --engine graph --updates 3
# 6. The decode step compiled by Inductor before capture (rollout.graph_compile), beside the plain
#    graph engine: tokens/s, its compile time (warm-up s), and an update at the gpu.yaml shape.
python -m bench.rollout --prompts 128 --max-tokens 384 --dtype bfloat16 --engines graph graph-compile --repeats 1
python -m bench.update --tasks 16 --k 8 --max-tokens 384 --micro-batch 64 --dtype bfloat16 --engine graph-compile --updates 6
# 7. SFT with the forward compiled (sft.compile) beside eager, its compile apart (rewrites step 4's file, all rows in it).
python -m bench.sft_speed --batch-size 64 --dtype bfloat16 --profile 25 --compile
python -m bench.table
