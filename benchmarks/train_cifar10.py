"""A ~10-minute standalone DDPM training run on CIFAR-10 (the standalone launcher, no Ray,
no MLflow), reading compressed WebDataset shards from a directory.

Make the shards once (about 16 MB gzipped, under the 64 MiB sent to the GPU machine)::

    prism data ingest ../shared/data/cifar10/train.tar data/cifar10 --gzip

Run on the GPU (bf16 autocast, torch.compile, channels_last come on by themselves on CUDA)::

    python benchmarks/train_cifar10.py --shards data/cifar10 --minutes 10
    python benchmarks/train_cifar10.py --smoke      # CPU, generated data, a few steps

Writes to $OUT (default ./outputs/bench): ``train_cifar10.json`` (loss curve, images/s,
config, command, date), ``train_cifar10_samples.png`` (64 EMA samples, 100 DDIM steps) and the
run directory ``train_cifar10_run/`` (checkpoints, model/). A table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.run_config import load_config  # noqa: E402
from training.callbacks import Callback  # noqa: E402
from training.launch import run_local  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Curve(Callback):
    """Collects the metrics records (the loss curve)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, **metrics})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", default="data/cifar10", help="directory of CIFAR-10 shards")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=8, help="data loader workers")
    ap.add_argument("--smoke", action="store_true", help="CPU, generated 16x16 data, 6 steps")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override")
    ap.add_argument("--config", default=None,
                    help="training config (default training/configs/cifar10-ddpm-eps.yaml)")
    ap.add_argument("--tag", default="train_cifar10",
                    help="name of the outputs: TAG.json, TAG_samples.png, TAG_run/")
    ap.add_argument("--run-root", default=None, help="where the run directory goes "
                    "(default $OUT/TAG_run)")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "outputs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    run_root = Path(args.run_root) if args.run_root else out / f"{args.tag}_run"
    if args.smoke:
        path = ROOT / "training" / "configs" / "debug.yaml"
        sets = ["train.total_images=48", "sampling.num_images=4", "sampling.steps=4"]
    else:
        path = Path(args.config) if args.config else (
            ROOT / "training" / "configs" / "cifar10-ddpm-eps.yaml")
        sets = [f"data.url={args.shards}", f"data.num_workers={args.workers}",
                f"train.time_limit_s={args.minutes * 60}", "train.total_images=100000000",
                "optim.warmup_images=128000", "train.log_every_images=25600",
                "checkpoint.every_images=2560000", "sampling.every_images=0",
                "sampling.num_images=64", "sampling.steps=100"]
    sets += [f"run.output_dir={run_root}", "run.name=cifar10", "tracking.enabled=false",
             "checkpoint.resume=false", *args.sets]
    cfg = load_config(path, sets)
    shutil.rmtree(run_root / "cifar10", ignore_errors=True)
    curve = Curve()
    t0 = time.perf_counter()
    result = run_local(cfg, [curve])
    wall = time.perf_counter() - t0
    grids = sorted((run_root / "cifar10" / "samples").glob("*.png"))
    if grids:
        shutil.copy(grids[-1], out / f"{args.tag}_samples.png")
    steady = [r["images_per_second"] for r in curve.rows[2:]] or \
        [r["images_per_second"] for r in curve.rows]
    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
               "wall_s": wall, "steps": result["step"], "images_seen": result["images_seen"],
               "final_loss": result.get("loss"),
               "median_images_per_second": sorted(steady)[len(steady) // 2] if steady else None,
               "config": cfg.model_dump(mode="json"), "curve": curve.rows}
    (out / f"{args.tag}.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'steps':>8} {'images':>10} {'wall s':>8} {'img/s':>8} {'loss first':>10} "
          f"{'loss last':>10}")
    first = curve.rows[0]["loss"] if curve.rows else float("nan")
    print(f"{result['step']:>8} {result['images_seen']:>10} {wall:>8.0f} "
          f"{summary['median_images_per_second'] or 0:>8.0f} {first:>10.4f} "
          f"{result.get('loss', float('nan')):>10.4f}")


if __name__ == "__main__":
    main()
