# Source on the GPU machine: installs the carried wheels (.whl/, see ../shared/tools/gpu-wheels;
# .whl-hf/ too where carried: diffusers and its dependencies for the reference rows, the recipe
# in benchmarks/results/training.md; .whl-test/ where carried: pytest for the tests that need a
# GPU, `pip download --no-deps ... -d .whl-test` of requirements.lock's pytest, pluggy,
# iniconfig, packaging and pygments) into /tmp/site and prints what the machine is.
# Usage: source benchmarks/gpu_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site $(ls .whl/*.whl .whl-hf/*.whl .whl-test/*.whl 2>/dev/null) >/dev/null 2>&1 \
  || echo "wheel install failed" >&2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg RAY_USAGE_STATS_ENABLED=0
export OUT=${OUT:-$PWD/outputs/bench}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
# run NAME TIMEOUT_S CMD...: one benchmark, its log under $OUT, never stops the suite
run() { local name=$1 t=$2; shift 2; echo "=== $name"; timeout "$t" "$@" > "$OUT/$name.log" 2>&1; \
  echo "rc=$?"; tail -n 14 "$OUT/$name.log"; }
