"""S4: DiMR against an adaLN-Zero DiT at equal training compute (Liu et al. 2024).

The claim (SCIENCE.md section 5): the multi-resolution network with time-dependent layer
norm (``dimr-32-2r``: a Transformer branch at 16x16 and a ConvNeXt branch at 32x32, time only
through TD-LN) gives better samples than an adaLN-Zero DiT for the same training compute
(paper, latent ImageNet 256: FID 1.70 against 2.27).

The setting: class-conditional CIFAR-10 at 32x32. Each arm is a shipped recipe trained under
the same budget (``pipelines.experiments.arms``): ``dimr`` (``training/configs/
dimr-32-2r.yaml``), ``dit`` (``dit-b2-32.yaml``, matched to it in training FLOPs per image),
``unet`` (prism's DDPM UNet, ``cifar10-ddpm-eps.yaml`` made class-conditional with the
same label dropout) as a third row, and ``dimr-adaln`` (the paper's ablation: the same DiMR
with adaLN-Zero norms and gates instead of TD-LN, ``components/networks/adaln.py``), each with
its own optimiser recipe, the same data order
and seed, the same warm-up. Every arm trains for the same seconds on the loop's clock and
exports EMA snapshots at shared training-FLOP marks. Rows:

- ``<arm>@time``: the final model of each arm (equal GPU time);
- ``<arm>@flops``: each arm's snapshot at the largest FLOP mark every arm reached (equal
  training FLOPs, as the loop measured them);

each sampled at the same seeds and labels with the same sampler and steps, measured against
CIFAR-10's test set (FD-prism, KID, precision/recall, SWD, log-RAPSD distance) beside the
real-vs-real floor, with paired bootstrap differences dimr - dit. The curves evaluate every
snapshot on a smaller sample.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from pipelines.config import DemoConfig, IngestConfig
from pipelines.data.demo import build_demo
from pipelines.data.ingest import ingest
from pipelines.experiments import arms as A
from pipelines.experiments.common import (
    ExperimentSettings,
    Log,
    ReferenceSpec,
    Timer,
    ensure_feature_net,
    environment,
    fd_key,
    feature_space,
    real_floors,
    real_images,
    slim,
    status,
    train_references,
)

NAME = "dimr-vs-dit"
CLAIM = ("DiMR (multi-resolution network, time-dependent layer norm) gives better samples "
         "than an adaLN-Zero DiT at equal training compute (Liu et al. 2024: FID 1.70 "
         "against 2.27 on latent ImageNet 256).")
# arm -> its recipe; the UNet row is made class-conditional like the other two
ARMS: dict[str, ReferenceSpec] = {
    "dimr": ReferenceSpec(config="dimr-32-2r"),
    "dit": ReferenceSpec(config="dit-b2-32"),
    "unet": ReferenceSpec(config="cifar10-ddpm-eps",
                          sets=["data.num_classes=10", "objective.label_dropout=0.1"]),
    # the paper's ablation: DiMR with adaLN-Zero in place of TD-LN, all else equal
    "dimr-adaln": ReferenceSpec(config="dimr-32-2r",
                                sets=["model.overrides.time_norm=ada_zero"]),
}
RULE = ("dimr@time and dimr@flops against dit at the same budget, paired bootstrap of "
        "FD-prism over the same seeds: 'reproduced' when both 95% intervals of dimr - dit lie "
        "below 0, 'not reproduced' when either lies above 0, else 'inconclusive'.")


class Settings(ExperimentSettings):
    """S4's settings (``prism experiment show dimr-vs-dit``)."""

    train_data: str | None = None  # shards; None: the embedded demo corpus, built in work_dir
    real_data: str | None = None  # held-out images; None: the training data
    floor_data: str | None = None  # a second real set for the floors; None: real_data halves
    arms: list[str] = Field(default_factory=lambda: list(ARMS))
    time_limit_s: float = Field(480.0, gt=0)  # training seconds per arm (the loop's clock)
    flop_marks: list[float] = Field(default_factory=lambda: [1.25e16, 2.5e16, 5e16, 7.5e16, 1e17])
    reference_sets: list[str] = Field(default_factory=list)  # overrides for every arm
    arm_sets: dict[str, list[str]] = Field(default_factory=dict)  # per-arm overrides
    feature_net: str | None = None  # weights; None: trained on train_data (feature_recipe)
    feature_recipe: dict[str, Any] = Field(default_factory=dict)
    steps: int = Field(32, ge=1)
    sampler: str = "dpmpp_2m"
    cfg_scale: float = Field(1.0, ge=0)
    n_images: int = Field(5000, ge=2)  # per row
    n_curve: int = Field(1000, ge=2)  # per snapshot on the curves
    grid_images: int = Field(16, ge=1)
    stop_after_training: bool = False  # train (or resume) the arms named, then stop
    # train (or resume) the arms named, sample n_images of each of their snapshots and
    # final models, keep the samples and run records, then stop: the metrics can then be
    # computed on another machine (train_missing=false, the same settings, these files)
    stop_after_sampling: bool = False

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in ARMS]
        if not v or bad:
            raise ValueError(f"arms must be among {list(ARMS)}, got {v}")
        return list(dict.fromkeys(v))

    @field_validator("flop_marks")
    @classmethod
    def _marks(cls, v: list[float]) -> list[float]:
        if any(m <= 0 for m in v):
            raise ValueError(f"flop_marks must be positive, got {v}")
        return sorted(set(v))


_SMALL_SETS = ["data.resolution=32", "data.num_classes=8", "optim.warmup_images=256",
               "optim.ema_decay=0.99", "train.batch_size=16", "train.log_every_images=64",
               "checkpoint.every_images=100000", "sampling.num_images=0", "data.num_workers=0",
               "run.compile=off"]
PRESETS: dict[str, dict[str, Any]] = {
    # CPU, a minute: the demo corpus (8 classes, 32x32), debug-sized networks of each family;
    # FLOP marks every arm passes twice within its 4 s even on a busy machine (DiMR's debug
    # network: 44 images)
    "small": {
        "time_limit_s": 4.0, "flop_marks": [4e9, 8e9], "n_images": 24, "n_curve": 16,
        "steps": 4, "grid_images": 8, "batch_size": 32,
        "feature_recipe": {"width": 4, "epochs": 1, "batch_size": 32, "compile": False},
        "reference_sets": _SMALL_SETS,
        "arm_sets": {
            "dimr": ["model.preset=dimr-debug", "model.overrides.resolution=32",
                     "optim.lr=0.001"],
            "dit": ["model.preset=dit-debug", "model.overrides.resolution=32",
                    "optim.lr=0.001"],
            "unet": ["model.preset=unet-debug", "model.overrides.resolution=32",
                     "model.overrides.channel_mult=[1, 2, 2]",
                     "model.overrides.attention_resolutions=[]", "optim.lr=0.002"],
            "dimr-adaln": ["model.preset=dimr-debug", "model.overrides.resolution=32",
                           "optim.lr=0.001"]},
        "metrics": {"swd_patches_per_image": 16, "swd_directions": 64, "swd_repeats": 1,
                    "kid_subset_size": 8, "kid_subsets": 10, "bootstrap": 10},
    },
    # one GPU: CIFAR-10 shards made with `prism data ingest` (docs/science/s4-dimr-vs-dit.md);
    # an arm trains and samples its 6 models in one 10-minute device call (s4-arm)
    "gpu": {
        "train_data": ".gpudata/cifar10-train", "real_data": ".gpudata/cifar10-test",
        "batch_size": 1000, "time_limit_s": 360.0, "n_images": 2000, "n_curve": 1000,
        "reference_sets": ["optim.warmup_images=64000", "train.log_every_images=6400",
                           "checkpoint.every_images=640000", "checkpoint.keep_last=1",
                           "sampling.num_images=0", "data.num_workers=6"],
    },
}


def _data(s: Settings, log: Log) -> tuple[str, str]:
    """(training shards, real images): the demo corpus at 32x32 where not given."""
    if s.train_data is not None:
        return s.train_data, s.real_data or s.train_data

    root = Path(s.work_dir) / "data"
    shards = root / "demo-shards-32"
    if not (shards / "manifest.parquet").exists():
        corpus = root / "demo-corpus-32"
        build_demo(corpus, DemoConfig(size=32, per_class=32), log=log)
        ingest(str(corpus), str(shards), IngestConfig(size=32, shard_size=128, gzip=True),
               log=log)
    return str(shards), s.real_data or str(shards)


def references(s: Settings, train: str) -> dict[str, ReferenceSpec]:
    """Every arm named in ``s.arms`` under the shared budget, on the same data and seed."""
    budget = A.arm_sets(s.time_limit_s, s.flop_marks)
    return {a: ReferenceSpec(config=ARMS[a].config, sets=[
        f"data.url={train}", f"run.seed={s.seed}", *ARMS[a].sets, *budget,
        *s.reference_sets, *s.arm_sets.get(a, [])]) for a in s.arms}


def run(s: Settings, out: Path, log: Log = status) -> dict[str, Any]:
    """Train (or reuse) the arms, evaluate their final models, snapshots at the common FLOP
    mark and the curves; returns the results."""
    timer = Timer()
    device = s.resolved_device()
    if s.stop_after_sampling:
        A.check_portable(out, s.work_dir)
    with timer("data"):
        train, real_src = _data(s, log)
    with timer("training"):
        refs = train_references(references(s, train), s, NAME, log)
    budget = {a: A.accounting(r["run_dir"]) for a, r in refs.items()}
    for a, b in budget.items():
        refs[a]["budget"] = b
        log(f"{a}: {b['images_seen']} images, {b['train_seconds']:.1f} s, "
            f"{(b['flops_per_image'] or 0) / 1e9:.2f} GFLOP/image, "
            f"{(b['train_flops'] or 0):.3g} FLOPs")
    if s.stop_after_training:
        return {"experiment": NAME, "claim": CLAIM, "settings": s.model_dump(mode="json"),
                "references": refs, "environment": environment(), "seconds": timer.seconds}

    num_classes = _num_classes(refs)
    sample_kw = {"steps": s.steps, "sampler": s.sampler, "cfg_scale": s.cfg_scale}

    def samples(arm: str, key: str, model_dir: str, n: int) -> tuple[torch.Tensor, float]:
        seeds = list(range(s.seed, s.seed + n))
        labels = [i % num_classes for i in seeds] if num_classes else None
        with timer("sampling"):
            return A.model_samples(key, model_dir, seeds, labels, out, device, s.batch_size,
                                   sample_kw)

    if s.stop_after_sampling:
        return A.sampled_results(NAME, CLAIM, s, refs, A.sample_arms(
            refs, s.n_images, samples, out, s.work_dir, log), timer.seconds)

    with timer("feature_net"):
        fnet = s.feature_net or ensure_feature_net(train, None, s, s.feature_recipe, log)
    spaces = feature_space(fnet, device)
    real, _ = real_images(real_src, None, s.seed, resolution=32)
    with timer("floors"):
        floors = real_floors(s.floor_data or real_src, real_src, real,
                             sorted({s.n_images, s.n_curve}), spaces, s.metrics, s.seed, device)

    def evaluate(arm: str, key: str, model_dir: str, n: int, intervals: bool
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
        images, seconds = samples(arm, key, model_dir, n)
        with timer("metrics"):
            return A.measured(key, images, seconds, real, spaces, s.metrics, device, log,
                              intervals)

    rows, details, curves, mark = A.evaluate_arms(refs, s.flop_marks, "train_flops", "flops",
                                                  evaluate, s.n_images, s.n_curve)
    comparisons = A.paired(details, [
        (x, y, budget) for budget in ("time", "flops")
        for x, y in [(f"dit@{budget}", f"{arm}@{budget}") for arm in ("dimr", "unet",
                                                                       "dimr-adaln")]
        + [(f"dimr@{budget}", f"dimr-adaln@{budget}")]])
    results = {
        "experiment": NAME, "claim": CLAIM, "settings": s.model_dump(mode="json"),
        "references": refs, "feature_net": fnet, "real_data": real_src, "n_real": len(real),
        "floors": floors, "flop_mark": mark, "rows": rows, "curves": curves,
        "comparisons": comparisons, "verdict": verdict(comparisons, A.chips(refs)),
        "details": {k: slim(v) for k, v in details.items()},
        "environment": environment(), "seconds": timer.seconds}
    results["figures"] = figures(results, out, s)
    return results


def _num_classes(refs: dict[str, dict[str, Any]]) -> int:
    counts = {json.loads((Path(r["model_dir"]) / "config.json").read_text())["num_classes"]
              for r in refs.values()}
    if len(counts) != 1:
        raise ValueError(f"the arms disagree on the number of classes: {sorted(counts)}")
    return counts.pop()


def verdict(comparisons: list[dict[str, Any]], apart: str | None = None) -> dict[str, Any]:
    """The rule, fixed before measuring (``RULE``); ``apart``: why the arms' seconds do not
    compare (:func:`arms.chips`), which leaves the rule's equal-time half unmet."""
    if apart:
        return {"verdict": "inconclusive", "rule": RULE, "reason": apart}
    cells = [c for c in comparisons if c["a"].startswith("dit@") and c["b"].startswith("dimr@")]
    metric = next((k for c in cells for k in c if k.startswith("FD-prism")), None)
    if len(cells) < 2 or metric is None:
        return {"verdict": "inconclusive", "rule": RULE,
                "reason": "dimr and dit were not both measured at both budgets with "
                          "bootstrap intervals"}
    below = [c[metric]["hi"] < 0 for c in cells]
    above = [c[metric]["lo"] > 0 for c in cells]
    v = "reproduced" if all(below) else "not reproduced" if any(above) else "inconclusive"
    return {"verdict": v, "rule": RULE, "metric": metric,
            "dimr_minus_dit": {c["budget"]: c[metric] for c in cells}}


def figures(results: dict[str, Any], out: Path, s: Settings) -> list[str]:
    """curves.png (FD-prism along the run against time and FLOPs), grid.png (one row per
    arm's final model, same seeds and labels), loss.png."""
    rows = results["rows"]
    metric = (fd_key(rows[0]) if rows else None) or "swd_x1e3"
    floor = results["floors"].get(str(s.n_curve), {}).get(metric)
    A.curve_figure(results["curves"], metric, floor, out / "curves.png")
    grid = A.grid_figure(out, [r for r in rows if r["budget"] == "time"],
                         min(s.grid_images, s.n_images))
    A.loss_figure(results["references"], out / "loss.png")
    return ["curves.png", *grid, "loss.png"]
