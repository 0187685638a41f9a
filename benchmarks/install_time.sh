#!/usr/bin/env bash
# How long a fresh environment takes to install: from requirements.lock (what `make venv` does)
# against resolving pyproject.toml's ranges (`pip install -e '.[test,prod]'`), each in a new
# venv under $OUT with the pip cache as it is (run once before to warm it). Prints a table last.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/bench}/install
mkdir -p "$OUT"
PY=${PY:-python3}

timed() {  # name, then the install steps after the venv and pip upgrade
  local name=$1 venv=$OUT/venv-$1 start end
  shift
  rm -rf "$venv"
  start=$(date +%s.%N)
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q torch==2.13.0
  "$@" "$venv/bin/pip"
  end=$(date +%s.%N)
  "$venv/bin/python" -c "import prism_cli, common.pyfunc, ray, mlflow, dvc, webdataset"
  echo "$name $(echo "$end - $start" | bc)" >> "$OUT/times.txt"
  rm -rf "$venv"
}
lock() { "$1" install -q -r requirements.lock && "$1" install -q --no-deps -e .; }
ranges() { "$1" install -q -e '.[test,prod]'; }

: > "$OUT/times.txt"
timed lock lock
timed ranges ranges
echo
echo "| install | seconds |"
echo "|---|---|"
while read -r name secs; do printf "| %s | %.1f |\n" "$name" "$secs"; done < "$OUT/times.txt"
