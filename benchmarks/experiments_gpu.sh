#!/usr/bin/env bash
# The science experiments' GPU settings on one lent GPU machine, in stages that each fit one
# device call (10 minutes); the work folder (/tmp/px) stays on a warm machine between calls and
# every stage resumes what an earlier, interrupted one left.
#
#   bash benchmarks/experiments_gpu.sh train     # S1's two references (S5 reuses the SiD2 one)
#   bash benchmarks/experiments_gpu.sh eval      # S1 sampling + metrics, then S5
#   bash benchmarks/experiments_gpu.sh s2-train  # S2's native model (needs all of tin64-train)
#   bash benchmarks/experiments_gpu.sh s2-eval   # S2's feature network, sampling, metrics
#   bash benchmarks/experiments_gpu.sh s3-train 590 --set 'arms=[ssd4]'  # one S3 arm a call
#   bash benchmarks/experiments_gpu.sh s3-eval   # S3's feature network, rows, curves
#   bash benchmarks/experiments_gpu.sh s4-train 590 --set 'arms=[dimr]'  # one S4 arm a call
#   bash benchmarks/experiments_gpu.sh s4-eval   # S4's feature network, rows, curves
#
# Or, needing no warm machine between calls: each arm trained and sampled in one call and
# brought back without its weights (its run records and samples, in parts of 15 MiB under
# $OUT, four a call: where there are more, `more 60 TAG` on the same machine brings the next
# four), the feature network in another, and the metrics computed here:
#   bash benchmarks/experiments_gpu.sh s4-arm 590 --set 'arms=[dimr]' --set n_images=2000
#   bash benchmarks/experiments_gpu.sh fnet-cifar10          # the CIFAR-10 feature network
#   cat s4-dimr.tgz.* | tar xz -C W; cat fnet.tgz.* | tar xz -C W   # here, in a work folder W
#   prism experiment run dimr-vs-dit --setting gpu --set work_dir=W --out W/dimr-vs-dit \
#       --set train_missing=false --set feature_net=W/fnet/feature_net.safetensors \
#       --set metrics.swd_bootstrap=false ...  # and the arm calls' other --set arguments
# (SWD's bootstrap, a sort per resample, takes most of a CPU's time; off, SWD keeps its value
# without an interval). S3 likewise with s3-arm (carry .whl and .gpudata/tin64-s3: 150 images
# of each Tiny-ImageNet class, which fit one call with the wheels) and fnet-tin64:
#   python3 benchmarks/per_class_subset.py ../shared/data/tinyimagenet64/train-200per-class.tar \
#       /tmp/tin64-150.tar --per-class 150
#   prism data ingest /tmp/tin64-150.tar .gpudata/tin64-s3 --size 64 --shard-size 10000 --gzip
#   rm -r .gpudata/tin64-s3/_parts  # ingest's resume state (5 MB): 49 MB then travel
#
# Arguments after the stage and its seconds go to `prism experiment run` (for example
# --set n_images=2000 to fit a smaller device budget). A train stage keeps its arguments (all
# but `arms=`) on the machine and its eval stage applies them before its own, so both resolve
# the same references; an eval stage never trains (`train_missing=false`): a reference that
# was not trained with the same settings stops it at once, naming the settings that differ.
#
# Tiny-ImageNet's 64x64 training shards (61 MB) exceed what one call carries with the wheels,
# so they travel in two calls: carry .gpudata/tin64-a (shards 0-1 and the manifest) with
# the first call of s2-train or s3-train and .gpudata/tin64-b (shards 2-4 and the manifest) and
# .gpudata/tin64-val with a later one; each stage merges what arrived into /tmp/px/data and
# stops until all of it is there:
#   mkdir -p .gpudata/tin64-a .gpudata/tin64-b
#   cp .gpudata/tin64-train/{manifest.parquet,ingest.json} .gpudata/tin64-a/
#   cp .gpudata/tin64-train/{manifest.parquet,ingest.json} .gpudata/tin64-b/
#   mv .gpudata/tin64-train/shard-00000[01].tar.gz .gpudata/tin64-a/
#   mv .gpudata/tin64-train/shard-00000[234].tar.gz .gpudata/tin64-b/
#
# Inputs (ignored, made here and carried): .gpudata/cifar10-{train,test} from
# `prism data ingest ../shared/data/cifar10/{train,test}.tar ... --size 32 --shard-size 10000
# --gzip`, .gpudata/cifar10-params.parquet (key + schedule parameters of `prism data spectra`)
# and .gpudata/cifar10-schedule.json (`prism data schedules ... --global`); .whl from
# ../shared/tools/gpu-wheels --no-ray. Results come back under $OUT; log them to MLflow here
# with `prism experiment log DIR`.
set -uo pipefail
stage=${1:?usage: experiments_gpu.sh train|eval|s2-train|s2-eval|s3-train|s3-eval|s4-train|s4-eval|s3-arm|s4-arm|more|fnet-cifar10|fnet-tin64 [seconds [--set k=v ...]]}
budget=${2:-560}
extra=("${@:3}")
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # a later call on the warm machine may leave the wheels behind
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
fi
[ -d /tmp/site/pydantic ] || { echo "carry .whl (no wheels installed on this machine)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/px/out}
mkdir -p "$OUT" /tmp/px
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# no commit printed: the device gets the working tree, not its .git; record the commit here
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
run() {  # name setting [--set ...]
  local name=$1 setting=$2; shift 2
  local kept=/tmp/px/$name.train-args mine=("${extra[@]}")
  if [[ $stage == *train || $stage == *arm ]]; then  # kept for an eval stage, without the arms
    local i keep=()
    for ((i = 0; i < ${#mine[@]}; i++)); do
      if [ "${mine[i]}" = --set ] && [[ ${mine[i+1]:-} == arms=* ]]; then ((i++)); continue; fi
      keep+=("${mine[i]}")
    done
    : > "$kept"
    [ ${#keep[@]} -gt 0 ] && printf '%s\n' "${keep[@]}" > "$kept"
  elif [ -f "$kept" ]; then
    mapfile -t keep < "$kept"
    echo "the train stage's arguments, applied first: ${keep[*]}"
    mine=("${keep[@]}" --set train_missing=false "${mine[@]}")
  else
    mine=(--set train_missing=false "${mine[@]}")
  fi
  timeout "$(left)" python3 -m prism_cli experiment run "$name" --setting "$setting" \
      --set work_dir=/tmp/px --set mlflow=false --out "/tmp/px/$name" "$@" "${mine[@]}"
}
bring() {  # tag: the files listed in /tmp/px/<experiment>/portable.txt -> $OUT/<tag>.tgz.NN
  local list=$1/portable.txt
  [ -f "$list" ] || { echo "nothing sampled to bring back ($list absent)"; return 1; }
  rm -rf "/tmp/px/parts/$2" && mkdir -p "/tmp/px/parts/$2"
  tar czf - -C /tmp/px -T "$list" | split -b 15m -d - "/tmp/px/parts/$2/$2.tgz."
  echo "$(wc -l < "$list") files in $(ls "/tmp/px/parts/$2" | wc -l) parts"
  more "$2"
}
more() {  # the next four parts of <tag> (60 MiB: a call brings back at most 64 MiB)
  local p n=0
  for p in "/tmp/px/parts/$1"/*; do
    [ -e "$p" ] || break
    [ $n -lt 4 ] || { echo "parts left: bring them with: experiments_gpu.sh more 60 $1"; return; }
    mv "$p" "$OUT/" && n=$((n + 1))
  done
  echo "brought back the last parts of $1"
}
case $stage in
  more)  # the parts of an arm's samples left by s3-arm / s4-arm: more 60 TAG
    more "${extra[0]:?usage: experiments_gpu.sh more 60 TAG}" ;;
  s3-arm|s4-arm)  # one arm a call: trained, sampled (final model, then snapshots), brought back
    arm=$(printf '%s\n' "${extra[@]}" | sed -n 's/^arms=\[\(.*\)\]$/\1/p' | tr -d ' ,')
    name=$([ "$stage" = s3-arm ] && echo ssd-vs-ddpm || echo dimr-vs-dit)
    budget=$((budget - 20))  # kept for bringing back what was made, even when cut off
    run "$name" gpu --set stop_after_sampling=true
    for f in /tmp/px/references/*.log; do tail -n 3 "$f"; done
    bring "/tmp/px/$name" "${stage%-arm}-${arm:-arms}" ;;
  fnet-cifar10|fnet-tin64)  # a feature network (26 MB) in parts: fnet.tgz.NN (folder fnet)
    if [ "$stage" = fnet-cifar10 ]; then
      set -- --train .gpudata/cifar10-train --test .gpudata/cifar10-test
    else  # no test set travels with the training shards: its accuracy is not measured
      set -- --train .gpudata/tin64-s3
    fi
    OUT=/tmp/px/fnet python3 benchmarks/train_feature_net.py "$@" || exit 1
    tar czf - -C /tmp/px fnet | split -b 15m -d - "$OUT/fnet.tgz." ;;
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
  s4-train)  # S4's arms need .gpudata/cifar10-{train,test}; an arm cut off resumes
    run dimr-vs-dit gpu --set stop_after_training=true
    for f in /tmp/px/references/{dimr,dit,unet}-*.log; do [ -f "$f" ] && tail -n 3 "$f"; done
    for d in /tmp/px/references/{dimr,dit,unet}-*/; do
      [ -f "$d/metrics.jsonl" ] && cp "$d/metrics.jsonl" "$OUT/$(basename "$d")-metrics.jsonl"
    done ;;
  s4-eval)
    run dimr-vs-dit gpu
    tar czf "$OUT/s4.tgz" -C /tmp/px/dimr-vs-dit --exclude samples . ;;
  s2-*|s3-*)
    d=/tmp/px/data
    mkdir -p $d/tin64-train $d/tin64-val
    for part in .gpudata/tin64-a .gpudata/tin64-b; do
      [ -d "$part" ] && cp --update=none "$part"/* $d/tin64-train/
    done
    [ -d .gpudata/tin64-val ] && cp -r --update=none .gpudata/tin64-val/* $d/tin64-val/
    have=$(ls $d/tin64-train/shard-*.tar.gz 2>/dev/null | wc -l)
    echo "tin64-train shards on this machine: $have of 5"
    [ "$have" = 5 ] && [ -f $d/tin64-val/manifest.parquet ] || {
      echo "carry the missing parts (tin64-a, tin64-b, tin64-val) first"; exit 3; }
    sets=(--set train_data=$d/tin64-train --set feature_data=$d/tin64-train
          --set real_data=$d/tin64-val)
    case $stage in
      s2-train)
        run upsample-guidance gpu "${sets[@]}" --set stop_after_training=true
        for f in /tmp/px/references/native-*.log; do tail -n 4 "$f"; done ;;
      s2-eval)
        run upsample-guidance gpu "${sets[@]}"
        tar czf "$OUT/s2.tgz" -C /tmp/px/upsample-guidance --exclude samples . ;;
      s3-train)  # one arm a call: --set 'arms=[ssd4]'
        run ssd-vs-ddpm gpu "${sets[@]:0:2}" "${sets[@]:4:2}" --set stop_after_training=true
        for d2 in /tmp/px/references/{ssd4,ssd2,ddpm}-*/; do
          [ -f "$d2/metrics.jsonl" ] && cp "$d2/metrics.jsonl" "$OUT/$(basename "$d2")-metrics.jsonl"
        done ;;
      s3-eval)
        run ssd-vs-ddpm gpu "${sets[@]:0:2}" "${sets[@]:4:2}"
        tar czf "$OUT/s3.tgz" -C /tmp/px/ssd-vs-ddpm --exclude samples . ;;
      *) echo "unknown stage $stage"; exit 2 ;;
    esac ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
echo "stage $stage: $((SECONDS - start)) s"
