#!/usr/bin/env bash
# Submit a prism training run to a Ray cluster through the Jobs API.
#
#   RAY_ADDRESS=http://127.0.0.1:8265 infra/submit_train.sh CONFIG [WORKERS] [-- extra prism train args]
#
# RAY_ADDRESS is the cluster's dashboard/Jobs address (http://HEAD:8265). The job runs
# `prism train CONFIG --ray --workers N` on the cluster, with this checkout as its working
# directory (infra/ray/runtime_env.yaml says what is left out). MLFLOW_TRACKING_URI, if set
# here, is passed to the job so its run lands in the same tracking server.
# Set PRISM_GPU=1 to train on GPU workers. Set PRISM_NO_WAIT=1 to return after submitting.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: RAY_ADDRESS=http://HEAD:8265 $0 CONFIG [WORKERS] [-- extra args]" >&2
  exit 2
fi
config=$1; shift
workers=${1:-2}; [ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster Jobs address, e.g. http://127.0.0.1:8265}"
[ -f "$config" ] || { echo "config not found: $config" >&2; exit 2; }
ray_bin=${RAY_BIN:-$(command -v ray || echo .venv/bin/ray)}
py=${PRISM_JOB_PYTHON:-python}
gpu_flag=(); [ "${PRISM_GPU:-0}" = "1" ] && gpu_flag=(--gpu)
wait_flag=(); [ "${PRISM_NO_WAIT:-0}" = "1" ] && wait_flag=(--no-wait)
host_py=${PRISM_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# The runtime environment: infra/ray/runtime_env.yaml plus the tracking/storage variables set here.
runtime_env_json=$("$host_py" -c '
import json, os, yaml
env = yaml.safe_load(open("infra/ray/runtime_env.yaml"))
keys = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
env.setdefault("env_vars", {}).update({k: os.environ[k] for k in keys if k in os.environ})
print(json.dumps(env))
')
exec "$ray_bin" job submit --address "$RAY_ADDRESS" "${wait_flag[@]}" \
  --runtime-env-json "$runtime_env_json" \
  -- "$py" -m prism_cli train "$config" --ray --workers "$workers" "${gpu_flag[@]}" "$@"
