#!/usr/bin/env bash
# Submit a prism training run to a Ray cluster through the Jobs API.
#
#   RAY_ADDRESS=http://HEAD:8265 infra/submit_train.sh CONFIG [WORKERS] [-- extra prism train args]
#
# e.g.  RAY_ADDRESS=http://127.0.0.1:8265 infra/submit_train.sh training/configs/debug.yaml 2
#       PRISM_GPU=1 infra/submit_train.sh training/configs/cifar10-ddpm-eps.yaml 8 -- \
#         --storage s3://my-bucket/prism-ray --set train.total_images=2000000
#
# RAY_ADDRESS is the cluster's dashboard / Jobs address (http://HEAD:8265). The job runs
# `python -m prism_cli train CONFIG --ray --workers N` on the cluster, with this checkout as its
# working directory (infra/ray/runtime_env.yaml lists what is left out of the upload). CONFIG
# must lie inside the checkout. These variables, when set here, are passed on to the job:
# MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, MLFLOW_S3_ENDPOINT_URL, AWS_ENDPOINT_URL,
# AWS_DEFAULT_REGION, AWS_REGION (never credentials: the cluster's nodes have their own).
# Options: PRISM_GPU=1 trains on GPU workers; PRISM_NO_WAIT=1 returns after submitting (then
# `ray job logs --follow ID`); PRISM_JOB_PYTHON is the job's Python (default `python`, the
# image's); RAY_BIN the local `ray` CLI (default: on PATH, else .venv/bin/ray).
# Ray token authentication: when RAY_AUTH_MODE is unset and a token is at hand (RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), the token is sent (RAY_AUTH_MODE=token).
set -euo pipefail
usage="usage: RAY_ADDRESS=http://HEAD:8265 $0 CONFIG [WORKERS] [-- extra prism train args]"
if [ $# -lt 1 ]; then echo "$usage" >&2; exit 2; fi
config=$1; shift
workers=2
if [ $# -gt 0 ] && [ "$1" != "--" ]; then workers=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
if ! [[ "$workers" =~ ^[1-9][0-9]*$ ]]; then
  echo "WORKERS must be a positive integer, got '$workers'" >&2; echo "$usage" >&2; exit 2
fi
[ -f "$config" ] || { echo "config not found: $config" >&2; exit 2; }
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster Jobs address, e.g. http://127.0.0.1:8265}"

repo=$(cd "$(dirname "$0")/.." && pwd -P)
config_abs=$(cd "$(dirname "$config")" && pwd -P)/$(basename "$config")
case "$config_abs" in
  "$repo"/*) config_rel=${config_abs#"$repo"/} ;;
  *) echo "config must lie inside the checkout ($repo) to reach the job: $config" >&2; exit 2 ;;
esac
cd "$repo"

ray_bin=${RAY_BIN:-$(command -v ray || echo .venv/bin/ray)}
host_py=${PRISM_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
py=${PRISM_JOB_PYTHON:-python}
gpu_flag=(); [ "${PRISM_GPU:-0}" = "1" ] && gpu_flag=(--gpu)
wait_flag=(); [ "${PRISM_NO_WAIT:-0}" = "1" ] && wait_flag=(--no-wait)
if [ -z "${RAY_AUTH_MODE:-}" ] && { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] \
    || [ -f "$HOME/.ray/auth_token" ]; }; then
  export RAY_AUTH_MODE=token
fi

# The runtime environment: infra/ray/runtime_env.yaml plus the tracking/storage variables set here.
runtime_env_json=$("$host_py" -c '
import json, os, yaml
env = yaml.safe_load(open("infra/ray/runtime_env.yaml"))
keys = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL",
        "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")
env.setdefault("env_vars", {}).update({k: os.environ[k] for k in keys if os.environ.get(k)})
print(json.dumps(env))
')
exec "$ray_bin" job submit --address "$RAY_ADDRESS" "${wait_flag[@]}" \
  --runtime-env-json "$runtime_env_json" \
  -- "$py" -m prism_cli train "$config_rel" --ray --workers "$workers" "${gpu_flag[@]}" "$@"
