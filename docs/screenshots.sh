#!/usr/bin/env bash
# Screenshots of the MLflow UI for the README: the run list and one run's metric charts.
# Usage: docs/screenshots.sh [MLFLOW_DB] [RUN_ID]   (needs Debian's chromium)
set -euo pipefail
db=${1:-mlruns/mlflow.db}
port=${PORT:-5077}
.venv/bin/mlflow ui --backend-store-uri "sqlite:///$(realpath "$db")" --host 127.0.0.1 --port "$port" >/tmp/mlflow-ui.log 2>&1 &
ui=$!
trap 'kill $ui' EXIT
for _ in $(seq 60); do curl -fs "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
exp=$(.venv/bin/python - "$db" <<'PY'
import sys
from mlflow.tracking import MlflowClient
c = MlflowClient(f"sqlite:///{sys.argv[1]}")
print(c.get_experiment_by_name("picorl").experiment_id)
PY
)
run=${2:-$(.venv/bin/python - "$db" "$exp" <<'PY'
import sys
from mlflow.tracking import MlflowClient
c = MlflowClient(f"sqlite:///{sys.argv[1]}")
print(c.search_runs([sys.argv[2]], filter_string="tags.`picorl.parent` = 'true'", order_by=["start_time DESC"])[0].info.run_id)
PY
)}
shot() {
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --hide-scrollbars \
    --window-size=1600,1000 --virtual-time-budget=20000 --screenshot="$1" "$2" 2>/dev/null
}
shot docs/mlflow-runs.png "http://127.0.0.1:$port/#/experiments/$exp/runs?workflowType=machine_learning"
shot docs/mlflow-metrics.png "http://127.0.0.1:$port/#/experiments/$exp/runs/$run/model-metrics?workflowType=machine_learning"
echo "wrote docs/mlflow-runs.png docs/mlflow-metrics.png (experiment $exp, run $run)"
