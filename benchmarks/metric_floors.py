"""Real-vs-real floors of every quality metric (CIFAR-10 by default).

A model's number means little without the value the metric takes between two samples of the
real distribution. This script measures, with the evaluate stage's own code
(``pipelines.evaluation.metrics.compute_metrics``):

- ``train_vs_test``: n random training images against n random test images;
- ``test_half_vs_half``: two disjoint random halves of the test images (n/2 each);
- the memorisation floor: held-out test images against the training images (pixel space).

    python benchmarks/metric_floors.py [--train SRC] [--test SRC] [--n 10000]
        [--feature-net feature_net.safetensors] [--inception pt_inception-2015-12-05.pth]
    python benchmarks/metric_floors.py --smoke     # 200 images, light settings, CPU

Network-free metrics (SWD, log-RAPSD distance, slope) run anywhere; feature metrics run in the
spaces given by path (FD-prism from the in-house network; standard FID only with the real
InceptionV3 weights). On CUDA: features under bf16 autocast with torch.compile. Results go to
$OUT/metric_floors.json (default ./outputs/bench); a short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.metrics.feature_net import FeatureNet  # noqa: E402
from components.metrics.memorization import memorization  # noqa: E402
from pipelines.evaluation.data import load_images  # noqa: E402
from pipelines.evaluation.metrics import (  # noqa: E402
    MetricSettings,
    compute_metrics,
    feature_spaces,
    summary_row,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _compile(spaces: list[Any]) -> None:
    for s in spaces:
        if isinstance(s.net, FeatureNet):
            s.net.features = torch.compile(s.net.features)
        else:
            s.net = torch.compile(s.net)


def _pick(n_total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n_total, size=min(n, n_total), replace=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", default=str(SHARED / "cifar10" / "train.tar"))
    ap.add_argument("--test", default=str(SHARED / "cifar10" / "test.tar"))
    ap.add_argument("--n", type=int, default=10000, help="images per side")
    ap.add_argument("--memorization-train", type=int, default=50000,
                    help="training images searched by the memorisation floor")
    ap.add_argument("--feature-net", default=None)
    ap.add_argument("--inception", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "./outputs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    settings = MetricSettings(seed=args.seed)
    if args.smoke:
        args.n, args.memorization_train = 200, 500
        settings = MetricSettings(seed=args.seed, swd_patches_per_image=16, swd_directions=64,
                                  swd_repeats=1, kid_subsets=10)
    t0 = time.perf_counter()
    train_set = load_images(args.train)
    test_set = load_images(args.test)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    tr = train_set.subset(_pick(len(train_set), args.n, rng)).as_float().to(device)
    te_idx = _pick(len(test_set), args.n, rng)
    te = test_set.subset(te_idx).as_float().to(device)
    spaces, fid_status = feature_spaces(args.feature_net, args.inception, device)
    if device == "cuda":
        _compile(spaces)
    results: dict[str, Any] = {"device": device, "train": args.train, "test": args.test,
                               "n": len(te), "load_seconds": load_s, "standard_fid": fid_status,
                               "feature_spaces": {s.name: s.info for s in spaces},
                               "settings": settings.model_dump()}
    # random halves: the test set is stored class by class, so a sorted split would compare
    # five classes against the other five
    half = len(te) // 2
    perm = torch.from_numpy(rng.permutation(len(te))).to(te.device)
    halves = (te[perm[:half]], te[perm[half:2 * half]])
    for name, (a, b) in {"train_vs_test": (tr, te), "test_half_vs_half": halves}.items():
        t1 = time.perf_counter()
        m = compute_metrics(a, b, settings=settings, spaces=spaces, real_key=None)
        m["seconds"] = time.perf_counter() - t1
        results[name] = m
        print(f"{name}: {json.dumps(summary_row(m))} ({m['seconds']:.1f} s)", flush=True)
    mem_train = train_set.subset(_pick(len(train_set), args.memorization_train, rng))
    t1 = time.perf_counter()
    mem = memorization(te, mem_train.as_float().to(device), threshold=settings.
                       memorization_threshold)
    results["memorization_test_vs_train"] = {
        k: mem[k] for k in ("fraction_memorized", "ratio_mean", "ratio_min", "threshold",
                            "flagged_indices")} | {"n_train": len(mem_train),
                                                   "seconds": time.perf_counter() - t1}
    (out / "metric_floors.json").write_text(json.dumps(results, indent=1))
    rows = {k: summary_row(results[k]) for k in ("train_vs_test", "test_half_vs_half")}
    rows["train_vs_test"]["memorized"] = results["memorization_test_vs_train"][
        "fraction_memorized"]
    keys = [k for k in rows["train_vs_test"]]
    print(f"\n{'metric':<26}{'train_vs_test':>16}{'test_half_vs_half':>20}")
    for k in keys:
        v1, v2 = rows["train_vs_test"].get(k), rows["test_half_vs_half"].get(k)
        f = (lambda v: f"{v:.5g}" if isinstance(v, float) else "")  # noqa: E731
        print(f"{k:<26}{f(v1):>16}{f(v2):>20}")
    print(f"standard FID: {'measured' if fid_status['available'] else 'unavailable'}; "
          f"device {device}; n {len(te)}")


if __name__ == "__main__":
    main()
