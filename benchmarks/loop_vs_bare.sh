#!/usr/bin/env bash
# The whole training loop against the bare step, one GPU, one call (about 9 minutes).
#
#   bash benchmarks/loop_vs_bare.sh [loop seconds per model, default 150] [models, default dit,dimr] \
#       [compile mode, default "default"]
#   bash benchmarks/loop_vs_bare.sh 150 unet reduce-overhead   # the UNet with CUDA graphs
#   bash benchmarks/loop_vs_bare.sh 150 unet graphs   # the loop's eager step recorded as CUDA
#       graphs (run.compile=off, run.cuda_graphs=on) against the bare step with torch.compile's
#       graphs (reduce-overhead), the fastest bare step
#
# Bare step: benchmarks/dimr_throughput.py (noise, forward, loss, backward, clip, fused AdamW on
# synthetic batches; batch 128, bf16, compiled). Loop: `prism train` of the same recipe as S4's
# arms (`prism experiment run dimr-vs-dit --setting gpu --set stop_after_training=true`:
# streamed gzip CIFAR-10 shards, 6 loader workers, EMA, logging every 6,400 images, checkpoints,
# FLOP-mark snapshots), for the given seconds on the loop's clock, with `run.sync_debug=warn`
# (each place where a step waits for the GPU is printed once). The table compares images/s
# over the whole run and in the median logging window with the bare step, and counts those
# places.
#
# Carry .whl (../shared/tools/gpu-wheels --no-ray) and .gpudata/cifar10-{train,test} (see
# benchmarks/experiments_gpu.sh). Results: $OUT/loop_vs_bare.json, the table printed last.
set -uo pipefail
secs=${1:-150}
models=${2:-dit,dimr}
mode=${3:-default}  # torch.compile's mode in both: --compile-mode / run.compile_mode; or graphs
if [ "$mode" = graphs ]; then
  bare_mode=reduce-overhead loop_sets="run.compile=off, run.cuda_graphs=on"
else
  bare_mode=$mode loop_sets="run.compile_mode=$mode"
fi
arm_sets=$(python3 -c "import sys; print('{' + ', '.join(f'{a}: [{sys.argv[2]}, run.sync_debug=warn]' for a in sys.argv[1].split(',')) + '}')" "$models" "$loop_sets")
source benchmarks/gpu_env.sh
work=/tmp/lvb
rm -rf $work  # a fresh loop: an earlier call's runs on a warm machine would be read as this one's
python3 benchmarks/dimr_throughput.py --batch 128 --steps 30 --warmup 5 --models "$models" \
    --compile-mode "$bare_mode" > "$OUT/bare.log" 2>&1 || { tail -n 20 "$OUT/bare.log"; exit 1; }
cp "$OUT/dimr_throughput.json" "$OUT/bare.json"
python3 -m prism_cli experiment run dimr-vs-dit --setting gpu --set stop_after_training=true \
    --set "arms=[$models]" --set time_limit_s="$secs" --set work_dir=$work --set mlflow=false \
    --set 'flop_marks=[1e15]' --set "arm_sets=$arm_sets" --out $work/out > "$OUT/loop.log" 2>&1 \
    || { tail -n 30 "$OUT/loop.log"; exit 1; }
for f in $work/references/*/metrics.jsonl; do cp "$f" "$OUT/$(basename "$(dirname "$f")")-metrics.jsonl"; done
cp $work/references/*.log "$OUT/"  # the training logs: where a step waited, if anywhere
python3 - "$OUT" "$work" "$secs" "$mode" <<'EOF'
import glob, json, statistics, sys
from pathlib import Path
out, work, secs = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
bare = json.loads((out / "bare.json").read_text())
rows = {}
for d in sorted(glob.glob(f"{work}/references/*/")):
    arm = Path(d).name.rsplit("-", 1)[0]
    recs = [json.loads(x) for x in Path(d, "metrics.jsonl").read_text().splitlines() if x.strip()]
    prog = json.loads(Path(d, "model", "progress.json").read_text())
    windows = [r["images_per_second"] for r in recs[1:] if r.get("images_per_second")]
    b = bare["models"][arm]
    rows[arm] = {"bare_images_per_s": b["images_per_s"], "bare_of_matmul": b["fraction_of_matmul"],
                 "bare_peak_gib": b["peak_mem_gib"],
                 "loop_images_seen": prog["images_seen"], "loop_train_seconds": prog["train_seconds"],
                 "loop_images_per_s": prog["images_seen"] / prog["train_seconds"],
                 "loop_median_window": statistics.median(windows),
                 "loop_min_window": min(windows),
                 "loop_peak_gib": max(r.get("memory_gib", 0) for r in recs),
                 "loop_sync_places": Path(d.rstrip("/") + ".log").read_text().count(
                     "called a synchronizing CUDA operation")}
    r = rows[arm]
    r["loop_over_bare"] = r["loop_images_per_s"] / r["bare_images_per_s"]
report = {"device": bare["device"], "matmul_tflops": bare["matmul_tflops"], "seconds": secs,
          "compile_mode": sys.argv[4],
          "models": rows}
(out / "loop_vs_bare.json").write_text(json.dumps(report, indent=2))
print(f"{bare['device']}, bf16 matmul {bare['matmul_tflops']:.1f} TFLOP/s, loop {secs:.0f} s, "
      f"compile mode {sys.argv[4]}")
print("| model | bare img/s | loop img/s (whole run) | loop / bare | median window | slowest window | peak GiB loop / bare | places a step waits |")
print("|---|---|---|---|---|---|---|---|")
for a, r in rows.items():
    print(f"| {a} | {r['bare_images_per_s']:,.0f} | {r['loop_images_per_s']:,.0f} | "
          f"{r['loop_over_bare']:.2f} | {r['loop_median_window']:,.0f} | {r['loop_min_window']:,.0f} | "
          f"{r['loop_peak_gib']:.1f} / {r['bare_peak_gib']:.1f} | {r['loop_sync_places']} |")
EOF
