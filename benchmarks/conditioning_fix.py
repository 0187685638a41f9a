"""What does the conditioning fix change in a real training run? The same CIFAR-10 run with the
current networks and with those of commit 2f0214a (the UNet's ResBlock added its embedding
before GroupNorm; DiMR's TD-LN read ``-lambda / 15``), side by side.

Each variant trains in its own process (``PYTHONPATH`` = its source tree) for the same images,
seed and data order, then

- measures how much the network uses its noise level: the x0 error on held-out images noised
  to log-SNR lambda, told the true lambda and told the mirrored one (-lambda); a network blind
  to its noise level has ratio 1;
- draws ``--samples`` images at fixed seeds (classes i mod 10 when conditional) with DDIM.

The parent computes SWD and the log-RAPSD distance of both sample sets against the CIFAR-10
test images with bootstrap intervals, and the paired difference (the samples share seeds).

Make the pre-fix tree and the shards once (both ignored by git)::

    mkdir -p .old && git archive 2f0214a components training pipelines serving prism_cli.py \
        | tar -x -C .old
    prism data ingest ../shared/data/cifar10/train.tar .gpudata/cifar10-train --gzip
    prism data ingest ../shared/data/cifar10/test.tar .gpudata/cifar10-test --gzip

Run on the GPU: ``python3 benchmarks/conditioning_fix.py --config cifar10-ddpm-eps``;
``--smoke`` runs a few steps on the CPU. Writes ``$OUT/conditioning_fix_<config>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
LAMBDAS = (-4.0, -2.0, 0.0, 2.0)


def child(args: argparse.Namespace) -> None:
    """Train, probe and sample with the networks of the tree on PYTHONPATH."""
    # deferred: prism's modules come from the tree this process runs: the variant's (on
    # PYTHONPATH) in a child, ROOT in the parent once main() has put it on sys.path
    from common.models import load_model
    from common.run_config import load_config
    from components.diffusion import LAMBDA_SCALE, convert, q_sample
    from components.generate import generate
    from pipelines.evaluation.data import load_images
    from training.launch import run_local

    out = Path(args.child_out)
    sets = [f"data.url={args.shards}", f"train.total_images={args.images}",
            "optim.warmup_images=64000", "train.log_every_images=12800",
            "checkpoint.every_images=100000000", "sampling.num_images=0",
            f"run.output_dir={out}", "run.name=run", "tracking.enabled=false",
            "checkpoint.resume=false", f"data.num_workers={args.workers}", *args.sets]
    cfg = load_config(ROOT / "training" / "configs" / f"{args.config}.yaml", sets)
    t0 = time.perf_counter()
    result = run_local(cfg)
    train_s = time.perf_counter() - t0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(out / "run" / "model", device)
    real = load_images(args.real, limit=512, resolution=32).as_float().to(device)
    labels = torch.arange(len(real), device=device) % 10 if model.num_classes else None
    eps = torch.randn(real.shape, generator=torch.Generator().manual_seed(0)).to(device)
    probe = {}
    with torch.no_grad():
        for lam in LAMBDAS:
            lam_t = torch.full((len(real),), lam, device=device)
            xt = q_sample(real, lam_t, eps).float()
            err = {}
            for name, c in (("true", lam), ("mirrored", -lam)):
                c_noise = torch.full((len(real), model.n_cond), c / LAMBDA_SCALE, device=device)
                pred = model.net(xt, c_noise, labels)
                x0 = convert(pred.float(), xt, lam_t, model.prediction, "x0").float()
                err[name] = float((x0 - real).square().mean())
            probe[str(lam)] = {**err, "ratio": err["mirrored"] / err["true"]}
    seeds = list(range(args.samples))
    cls = [s % 10 for s in seeds] if model.num_classes else None
    t0 = time.perf_counter()
    chunks = []
    for i in range(0, len(seeds), 500):
        x = generate(model, seeds=seeds[i:i + 500], steps=args.steps,
                     class_labels=None if cls is None else cls[i:i + 500], device=device)
        chunks.append(((x.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    sample_s = time.perf_counter() - t0
    np.save(out / "samples.npy", torch.cat(chunks).numpy())
    (out / "child.json").write_text(json.dumps({
        "steps": result["step"], "images_seen": result["images_seen"],
        "final_loss": result.get("loss"), "images_per_second": result.get("images_per_second"),
        "train_s": train_s, "sample_s": sample_s, "noise_level_probe": probe,
        "networks_from": str(Path(sys.modules[type(model.net).__module__].__file__).parent)},
        indent=1))


def run_variant(name: str, tree: Path, args: argparse.Namespace, work: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tree), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                      if p and Path(p).resolve() != ROOT]]))
    child_out = work / name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--child-out",
           str(child_out), "--config", args.config, "--images", str(args.images),
           "--samples", str(args.samples), "--steps", str(args.steps), "--shards", args.shards,
           "--real", args.real, "--workers", str(args.workers)]
    for s in args.sets:
        cmd += ["--set", s]
    print(f"=== {name}: {tree}", flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=tree)
    return json.loads((child_out / "child.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="cifar10-ddpm-eps", help="training/configs/NAME.yaml")
    ap.add_argument("--images", type=int, default=153600, help="training images per variant")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--shards", default=".gpudata/cifar10-train")
    ap.add_argument("--real", default=".gpudata/cifar10-test")
    ap.add_argument("--old", default=".old", help="the pre-fix source tree")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--bootstrap", type=int, default=50, help="resamples for the intervals")
    ap.add_argument("--smoke", action="store_true", help="CPU: a few steps, 16 samples")
    ap.add_argument("--train-only", action="store_true",
                    help="train, probe and sample both variants; no metrics")
    ap.add_argument("--metrics-only", action="store_true",
                    help="metrics of the variants already under $OUT (e.g. on another machine)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.images, args.samples, args.steps, args.workers = 256, 16, 4, 0
        args.sets += ["train.batch_size=16", "model.overrides.model_channels=32"] \
            if "ddpm" in args.config else ["train.batch_size=16"]
    if args.child:
        return child(args)
    args.shards, args.real = str(Path(args.shards).resolve()), str(Path(args.real).resolve())
    sys.path.insert(0, str(ROOT))
    from pipelines.evaluation.data import load_images
    from pipelines.evaluation.metrics import MetricSettings, compute_metrics
    from pipelines.evaluation.register import compare

    out = Path(os.environ.get("OUT", "outputs/bench"))
    work = out / f"conditioning_fix_{args.config}_runs"
    variants = {"fixed": ROOT, "pre-fix (2f0214a)": Path(args.old).resolve()}
    if args.metrics_only:
        results = {n: json.loads((work / n.split()[0] / "child.json").read_text())
                   for n in variants}
    else:
        results = {n: run_variant(n.split()[0], t, args, work) for n, t in variants.items()}
    if args.train_only:
        return
    real = load_images(args.real, resolution=32).as_float()
    settings = MetricSettings(bootstrap=args.bootstrap if not args.smoke else 5)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    intervals = {}
    for n in variants:
        x = torch.from_numpy(np.load(work / n.split()[0] / "samples.npy")).float() / 127.5 - 1
        m = compute_metrics(x.to(device), real.to(device), settings=settings)
        results[n]["metrics"] = {k: {kk: v[kk] for kk in ("estimate", "se", "lo", "hi")}
                                 for k, v in m["intervals"]["metrics"].items()}
        intervals[n] = m["intervals"]["metrics"]
    a, b = list(variants)
    comparisons = {}
    for k in ("swd_x1e3", "log_rapsd_l1"):
        ia = {**intervals[a][k], "resamples": settings.bootstrap, "seed": settings.seed,
              "n_generated": args.samples, "confidence": settings.confidence}
        ib = {**intervals[b][k], "resamples": settings.bootstrap, "seed": settings.seed,
              "n_generated": args.samples, "confidence": settings.confidence}
        comparisons[k] = compare(ia["estimate"], ib["estimate"], ia, ib, "min")
    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "config": args.config, "images": next(iter(results.values()))["images_seen"],
           "samples": args.samples,
           "ddim_steps": args.steps, "variants": results, "fixed_minus_prefix": comparisons}
    (out / f"conditioning_fix_{args.config}.json").write_text(json.dumps(doc, indent=1))
    images = next(iter(results.values()))["images_seen"]
    print(f"\n{args.config}: {images} training images, {args.samples} samples, "
          f"{args.steps} DDIM steps")
    print(f"{'variant':<20} {'loss':>7} {'img/s':>7} " + " ".join(
        f"{'x0 ratio @' + str(int(lam)):>12}" for lam in LAMBDAS) + f" {'SWD x1e3':>16} "
          f"{'log-RAPSD L1':>16}")
    for n, r in results.items():
        ratios = " ".join(f"{r['noise_level_probe'][str(lam)]['ratio']:>12.2f}" for lam in LAMBDAS)
        m = r["metrics"]
        print(f"{n:<20} {r['final_loss']:>7.4f} {r['images_per_second'] or 0:>7.0f} {ratios} "
              f"{m['swd_x1e3']['estimate']:>8.2f} +-{1.96 * m['swd_x1e3']['se']:<6.2f} "
              f"{m['log_rapsd_l1']['estimate']:>8.3f} +-{1.96 * m['log_rapsd_l1']['se']:<6.3f}")
    for k, c in comparisons.items():
        print(f"fixed - pre-fix, {k}: {c['difference']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] "
              f"({c['method']})")


if __name__ == "__main__":
    main()
