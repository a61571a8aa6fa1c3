#!/usr/bin/env bash
# One GPU session, in order of value, keeping what each step made:
#   1. the headline run: `picorl train --config configs/gpu.yaml` (Prefect flow, MLflow), then
#      `picorl export --fresh 128 --mlflow` into results/<date>-smollm2-curriculum and
#      `python -m bench.table --write` (the README's headline row);
#   2. the CUDA tests; 3. one update at the gpu.yaml shape with its 25 costliest kernels;
#   4. the rest of bench/gpu.sh.
# A step that fails is logged and the script goes on to the next one that does not need it
# (export needs the run; the table needs the export); the exit status counts the failures.
#
#   bash bench/gpu_session.sh 2>&1 | tee gpu-session.log      # on the GPU machine
#   bash bench/gpu_session.sh --dry-run                        # on a CPU: configs/smoke.yaml and the
#                                                              # tiny model, into a temp folder; step 4 printed
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ $DRY = 1 ]; then
  CONFIG=configs/smoke.yaml
  WORK=$(mktemp -d)
  RESULT=$WORK/results/smoke-export
  UPDATE_SHAPE=(--model tiny-random-llama --tasks 2 --k 2 --max-tokens 8 --micro-batch 4 --updates 2 --profile 5)
else
  CONFIG=configs/gpu.yaml
  WORK=$PWD/outputs/gpu-session
  RESULT=results/$(date +%Y-%m-%d)-smollm2-curriculum
  UPDATE_SHAPE=(--tasks 16 --k 8 --max-tokens 384 --micro-batch 64 --dtype bfloat16 --engine graph --updates 6 --profile 25)
fi
mkdir -p "$WORK"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$WORK/mlflow.db}
FAILED=0

step() {  # step NAME COMMAND...: run it, say how it ended, never stop the script
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  if "$@"; then
    echo "=== $name: ok ($((SECONDS - t0)) s)"
    return 0
  fi
  echo "=== $name: FAILED ($((SECONDS - t0)) s); going on with what does not need it"
  FAILED=$((FAILED + 1))
  return 1
}

# 1. The headline run, its export and the table.
if step train $PY -m cli train --config "$CONFIG" --set "run.output_dir=$WORK/runs"; then
  RUN=$(ls -td "$WORK"/runs/*/ | head -1)
  if [ -e "$RESULT" ]; then RESULT=$RESULT-$(date +%H%M%S); fi
  if step export $PY -m cli export --run-dir "$RUN" --out "$RESULT" --fresh 128 --mlflow; then
    if [ $DRY = 1 ]; then
      step table $PY -m bench.table  # prints; the README's table is for real exports only
    else
      step table $PY -m bench.table --write
    fi
  fi
fi

# 2. The CUDA tests (skipped, not failed, without a GPU).
step cuda-tests $PY -m pytest -q -m cuda tests/

# 3. One update at the gpu.yaml shape, split into its parts, and its costliest kernels.
step update-profile $PY -m bench.update "${UPDATE_SHAPE[@]}"

# 4. The rest of the GPU figures (bench/gpu.sh minus what ran above).
REST=$(grep -E '^python -m bench\.' bench/gpu.sh | grep -v -e 'bench.update .*--engine graph --updates 6 --profile 25' -e '^python -m bench.table')
while IFS= read -r cmd; do
  [ -z "$cmd" ] && continue
  if [ $DRY = 1 ]; then
    echo "=== would run: $cmd"
  else
    # shellcheck disable=SC2086
    step "${cmd#python -m }" $PY ${cmd#python }
  fi
done <<< "$REST"

[ $DRY = 1 ] || step tables $PY -m bench.table --write
echo "=== done: $FAILED step(s) failed; run folders under $WORK, export at $RESULT"
[ $DRY = 1 ] && echo "=== dry run: nothing under results/ or bench/results/ was written ($WORK holds it all)"
exit $FAILED
