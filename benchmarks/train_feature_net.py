"""Train prism's in-house feature network (the FD-prism classifier) standalone, on GPU or CPU.

    python benchmarks/train_feature_net.py --train SHARDS_OR_TAR --test SHARDS_OR_TAR
    python benchmarks/train_feature_net.py --smoke          # tiny CPU run (< 1 minute)

SRC: WebDataset shards (.tar / .tar.gz, a folder of them), a tar of ``<split>/<class>/*.jpg``
(the CIFAR-10 tars), a folder or an .npz. Writes to $OUT (default ./outputs/bench):
``feature_net.safetensors``, ``feature_net.json`` (recipe, classes, test accuracy, SHA-256)
and ``train_feature_net.json`` (timings). Needs no Ray and no MLflow. On CUDA the recipe uses
bf16 autocast, channels_last and torch.compile (``--no-compile`` to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.evaluation.data import ImageSet, load_images  # noqa: E402
from pipelines.evaluation.feature_net import (  # noqa: E402
    DEBUG_RECIPE,
    FeatureNetRecipe,
    save_trained,
    train_feature_net,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _smoke_sets() -> tuple[ImageSet, ImageSet]:
    """The lossless CIFAR-100 sample (1,000 images, 10 classes): even / odd indices."""
    full = load_images(str(SHARED / "cifar100-lossless-1k.npz"))
    return full.subset(np.arange(0, len(full), 2)), full.subset(np.arange(1, len(full), 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", help="training images (shards, tar, folder, npz)")
    ap.add_argument("--test", help="test images (same forms)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="feature_net")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run on the shared npz")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "./outputs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    recipe = DEBUG_RECIPE.model_copy(update={"max_train_images": 256}) \
        if args.smoke else FeatureNetRecipe()
    upd = {k: v for k, v in (("epochs", args.epochs), ("width", args.width)) if v is not None}
    recipe = recipe.model_copy(update={**upd, "seed": args.seed,
                                       "compile": recipe.compile and not args.no_compile})
    recipe = FeatureNetRecipe(**recipe.model_dump())  # re-validate
    t0 = time.perf_counter()
    if args.train:
        train = load_images(args.train)
        test = load_images(args.test, class_names=train.class_names or None) \
            if args.test else None
    elif args.smoke:
        train, test = _smoke_sets()
    else:
        ap.error("--train is required (or --smoke)")
    load_s = time.perf_counter() - t0
    net, results = train_feature_net(train, test, recipe, device)
    sidecar = save_trained(net, results, recipe, train, test, out, args.name)
    summary = {"device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
               "torch": torch.__version__, "load_seconds": load_s, **results,
               "sha256": sidecar["sha256"], "metric_name": sidecar["metric_name"],
               "recipe": recipe.model_dump()}
    (out / "train_feature_net.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'metric':<24}{'value':>28}")
    for k in ("device", "train_images", "test_images", "train_seconds", "test_accuracy",
              "test_accuracy_flip_tta", "metric_name"):
        v = summary.get(k)
        print(f"{k:<24}{(f'{v:.4f}' if isinstance(v, float) else str(v)):>28}")


if __name__ == "__main__":
    main()
