#!/usr/bin/env bash
# The science experiments' GPU settings on one lent GPU machine, in stages that each fit one
# device call (10 minutes); the work folder (/tmp/px) stays on a warm machine between calls and
# every stage resumes what an earlier, interrupted one left.
#
#   bash benchmarks/experiments_gpu.sh train   # S1's two references (S5 reuses the SiD2 one)
#   bash benchmarks/experiments_gpu.sh eval    # S1 sampling + metrics, then S5
#
# Inputs (ignored, made here and carried): .gpudata/cifar10-{train,test} from
# `prism data ingest ../shared/data/cifar10/{train,test}.tar ... --size 32 --shard-size 10000
# --gzip`, .gpudata/cifar10-params.parquet (key + schedule parameters of `prism data spectra`)
# and .gpudata/cifar10-schedule.json (`prism data schedules ... --global`); .whl from
# ../shared/tools/gpu-wheels --no-ray. Results come back under $OUT; log them to MLflow here
# with `prism experiment log DIR`.
set -uo pipefail
stage=${1:?usage: experiments_gpu.sh train|eval [seconds]}
budget=${2:-560}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/px/out}
mkdir -p "$OUT" /tmp/px
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git rev-parse --short HEAD 2>/dev/null
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
run() {  # name setting [--set ...]
  local name=$1 setting=$2; shift 2
  timeout "$(left)" python3 -m prism_cli experiment run "$name" --setting "$setting" \
      --set work_dir=/tmp/px --set mlflow=false --out "/tmp/px/$name" "$@"
}
case $stage in
  train)
    run spectral-schedules gpu --set stop_after_training=true
    for f in /tmp/px/references/*.log; do tail -n 4 "$f"; done
    for d in /tmp/px/references/*/; do
      [ -f "$d/metrics.jsonl" ] && cp "$d/metrics.jsonl" "$OUT/$(basename "$d")-metrics.jsonl"
    done ;;
  eval)
    run spectral-schedules gpu
    tar czf "$OUT/s1.tgz" -C /tmp/px/spectral-schedules --exclude samples .
    run chromatogram gpu
    tar czf "$OUT/s5.tgz" -C /tmp/px/chromatogram . ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
echo "stage $stage: $((SECONDS - start)) s"
