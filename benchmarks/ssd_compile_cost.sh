#!/usr/bin/env bash
# SSD's compile cost against eager for a run of a given length, one GPU.
#
#   bash benchmarks/ssd_compile_cost.sh [MODE=SECONDS,...] [config] [--set k=v ...]
#   bash benchmarks/ssd_compile_cost.sh eager=60,compiled=360           # one device call
#   bash benchmarks/ssd_compile_cost.sh compiled-cached=120             # the next, same machine
#   bash benchmarks/ssd_compile_cost.sh eager=60,compiled-blocks=240    # blocks compiled alone
#   bash benchmarks/ssd_compile_cost.sh eager=60,graphs=120             # eager CUDA graphs
#
# `prism train` of the config (default training/configs/ssd-64-4l.yaml: one graph per
# (input, output) resolution pair, compiled as each pair first occurs) on synthetic batches:
# `eager` (`run.compile=off`), `compiled` (`run.compile=on`, default mode, on an empty Inductor
# cache: what a fresh machine pays) and `compiled-cached` (compiled again on the cache that
# `compiled` left: what a re-run on the same machine pays) and `compiled-blocks`
# (`run.compile_scope=blocks`: each UNet block compiled on its own, shared by every resolution
# pair that runs it, on an empty cache of its own) and `graphs` (`run.cuda_graphs=on`: the eager
# step recorded as CUDA graphs per resolution pair, no compilation), each for its seconds on the loop's
# clock. Runs live in /tmp/ssdcc and a mode already run is not run again, so the modes can be
# spread over calls to one warm machine. A run's wall time is its first step (compilation
# included) plus the loop's clock; the later resolution pairs compile inside the loop's clock,
# so the steady rate is the median of the windows at or above half the fastest one (a window
# with a compilation in it is many times slower), and a run's offset is
# wall - images / steady rate: all its compilation, whenever it happened. The compiled run needs
# seconds beyond its compilation (more than 260 s for ssd-64-4l on an H200). The table gives the
# offsets, the steady rates and the run length (wall seconds) beyond which compiling pays.
#
# Carry .whl (../shared/tools/gpu-wheels --no-ray). Results: $OUT/ssd_compile_cost.json, the
# table printed last. The CPU smoke (tests/platform/test_bench_smoke.py) runs it on the 16 px
# debug Flexi-UNet for a few seconds a mode.
set -uo pipefail
modes=${1:-eager=60,compiled=360,compiled-cached=120}
config=${2:-training/configs/ssd-64-4l.yaml}
extra=("${@:3}")
if [ -d .whl ]; then source benchmarks/gpu_env.sh; else export OUT=${OUT:-$PWD/outputs/bench}; fi
mkdir -p "$OUT"
work=${SSDCC_WORK:-/tmp/ssdcc}
mkdir -p "$work"
cache=$work/inductor  # empty before `compiled`: that run pays the whole compilation
train() {  # name compile seconds [--set k=v ...]
  local name=$1 comp=$2 secs=$3 dir=$cache; shift 3
  if [ -f "$work/$name/model/progress.json" ]; then echo "$name: already run"; return; fi
  rm -rf "${work:?}/$name"  # a run cut off is run again from the start
  [ "$name" = compiled ] && rm -rf "$cache"
  [ "$name" = compiled-blocks ] && dir=$work/inductor-blocks && rm -rf "$dir"
  echo "$name: $secs s on the loop's clock"
  TORCHINDUCTOR_CACHE_DIR=$dir python3 -m prism_cli train "$config" \
      --set data.source=synthetic --set run.compile="$comp" --set train.time_limit_s="$secs" \
      --set train.total_images=1000000000000 --set tracking.enabled=false \
      --set sampling.num_images=0 --set checkpoint.every_images=1000000000000 \
      --set run.output_dir="$work" --set run.name="$name" "$@" "${extra[@]}" \
      > "$OUT/ssd_compile_$name.log" 2>&1 || { tail -n 30 "$OUT/ssd_compile_$name.log"; exit 1; }
  cp "$work/$name/metrics.jsonl" "$OUT/ssd_compile_$name-metrics.jsonl"
}
for m in ${modes//,/ }; do
  name=${m%%=*} secs=${m#*=}
  case $name in
    eager) train eager off "$secs" ;;
    compiled|compiled-cached)
      if [ "$name" = compiled-cached ] && [ ! -d "$cache" ]; then
        echo "compiled-cached needs the cache of a compiled run first"; exit 2; fi
      train "$name" on "$secs" ;;
    compiled-blocks) train "$name" on "$secs" --set run.compile_scope=blocks ;;
    graphs) train "$name" off "$secs" --set run.cuda_graphs=on ;;
    *) echo "unknown mode $name (eager, compiled, compiled-cached, compiled-blocks, graphs)"
       exit 2 ;;
  esac
done
python3 - "$OUT" "$work" "$config" <<'EOF'
import json, statistics, sys
from pathlib import Path
out, work, config = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rows = {}
for name in ("eager", "compiled", "compiled-cached", "compiled-blocks", "graphs"):
    if not (work / name / "metrics.jsonl").exists():
        continue
    recs = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()
            if x.strip()]
    recs = [r for r in recs if "train_seconds" in r]
    first = next((r["first_step_s"] for r in recs if "first_step_s" in r), 0.0)
    windows = [r["images_per_second"] for r in recs]
    steady = statistics.median([w for w in windows if w >= 0.5 * max(windows)])
    images, clock = recs[-1]["images_seen"], recs[-1]["train_seconds"]
    wall = first + clock
    rows[name] = {"first_step_s": first, "loop_seconds": clock, "images": images,
                  "wall_s": wall, "steady_images_per_s": steady,
                  "offset_s": wall - images / steady,
                  "peak_gib": max(r.get("memory_gib", 0) for r in recs)}
e = rows.get("eager")
for name in ("compiled", "compiled-cached", "compiled-blocks", "graphs"):
    if e is None or name not in rows:
        continue
    c = rows[name]
    # images(t) = rate * (t - offset): the wall time where both runs have seen the same images
    gain = c["steady_images_per_s"] - e["steady_images_per_s"]
    c["speedup"] = c["steady_images_per_s"] / e["steady_images_per_s"]
    c["pays_after_wall_s"] = ((c["steady_images_per_s"] * c["offset_s"]
                               - e["steady_images_per_s"] * e["offset_s"]) / gain
                              if gain > 0 else None)
report = {"config": config, "rows": rows}
try:
    import torch
    report["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report["torch"] = torch.__version__
except Exception:
    pass
(out / "ssd_compile_cost.json").write_text(json.dumps(report, indent=1))
print(f"\n{config}, {report.get('device')}")
print("| run | loop s | first step s | offset s (all compilation) | steady img/s | vs eager | "
      "compiling pays after (wall s) | peak GiB |")
print("|---|---|---|---|---|---|---|---|")
for name, r in rows.items():
    pays = r.get("pays_after_wall_s")
    print(f"| {name} | {r['loop_seconds']:.0f} | {r['first_step_s']:.1f} | {r['offset_s']:.1f} | "
          f"{r['steady_images_per_s']:,.0f} | {r.get('speedup', 1.0):.2f}x | "
          f"{'-' if name == 'eager' else ('never' if pays is None else f'{pays:.0f}')} | "
          f"{r['peak_gib']:.1f} |")
EOF
