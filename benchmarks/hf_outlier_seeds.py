"""Which generated images are high-frequency outliers: by class and by seed across models.

``hf_outliers`` (``components.metrics.spectral``) counts the images whose share of luminance
power above 0.375 cycles per pixel exceeds the real images' 99th percentile. This script asks
where they are, from an experiment's saved samples (``<out>/samples/<arm>@<images>.npy``,
seeds from 0 on, class = seed mod ``--classes``): the fraction in each class, and, for a second
model of the same seeds, how many of the first model's outlier seeds it shares.

    python benchmarks/hf_outlier_seeds.py SAMPLES.npy --real .gpudata/cifar10-test \
        [--earlier EARLIER.npy] [--classes 10]

Prints a short table; no GPU, Ray or MLflow needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.metrics.spectral import high_frequency_share  # noqa: E402
from pipelines.experiments.common import real_images  # noqa: E402


def outliers(path: str, threshold: float, cutoff: float) -> np.ndarray:
    """Boolean (N,): the images of a saved uint8 sample file above ``threshold``."""
    x = torch.from_numpy(np.load(path)).float() / 127.5 - 1
    return (high_frequency_share(x, cutoff=cutoff) > threshold).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("samples", help="a saved sample file (N, 3, H, W) uint8")
    ap.add_argument("--real", required=True, help="real images (shards, tar, folder, npz)")
    ap.add_argument("--earlier", help="another model's samples at the same seeds")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--cutoff", type=float, default=0.375)
    ap.add_argument("--quantile", type=float, default=0.99)
    args = ap.parse_args()
    first = np.load(args.samples, mmap_mode="r")
    real, _ = real_images(args.real, None, 0, resolution=first.shape[-1])
    threshold = torch.quantile(high_frequency_share(real, cutoff=args.cutoff),
                               args.quantile).item()
    now = outliers(args.samples, threshold, args.cutoff)
    labels = np.arange(len(now)) % args.classes
    report = {"samples": args.samples, "threshold": threshold, "fraction": float(now.mean()),
              "per_class": [float(now[labels == c].mean()) for c in range(args.classes)]}
    if args.earlier:
        before = outliers(args.earlier, threshold, args.cutoff)[: len(now)]
        report |= {"earlier": args.earlier, "outliers": int(now.sum()),
                   "earlier_outliers": int(before.sum()),
                   "shared_seeds": int((now & before).sum())}
    print(json.dumps(report, indent=1))
    print(f"\nhf outliers {report['fraction']:.3f} (threshold {threshold:.4f}); per class: "
          + " ".join(f"{f:.3f}" for f in report["per_class"]))
    if args.earlier:
        print(f"{report['shared_seeds']} of {report['outliers']} outlier seeds were outliers "
              f"in the earlier model too (it had {report['earlier_outliers']})")


if __name__ == "__main__":
    main()
