"""S3: Scale Space Diffusion against DDPM at equal training compute (Mukhopadhyay et al.).

The claim (SCIENCE.md section 6): diffusing in scale space, where the state shrinks as noise
grows and one Flexi-UNet serves every resolution, matches DDPM's quality at lower training
and sampling cost (paper: 2 levels, FID 2.14 against 2.22 at 0.89x the training time).

The setting: unconditional Tiny-ImageNet at 64x64, where SSD's savings are large. Arms, each
trained under the same budget (``pipelines.experiments.arms``): ``ssd4`` (``training/configs/
ssd-64-4l.yaml``: levels 8/16/32/64), ``ssd2`` (the same with 2 levels, 32/64) and ``ddpm``
(``ddpm-x0-64.yaml``: the same UNet width at full resolution with the same x0 prediction,
DDPM linear betas and min(SNR, 5) weighting: SSD with one level). Same seed, data order, batch and
optimiser. Every arm trains for the same seconds on the loop's clock (SSD's later resolution
pairs compile inside that time when compiled, which is why the SSD arms run eager by
default: ``ssd_compile``) and exports EMA snapshots at shared image marks. Rows:

- ``<arm>@time``: each arm's final model (equal GPU time);
- ``<arm>@images``: each arm's snapshot at the largest image mark every arm reached (equal
  images seen, the same data);

sampled at the same seeds with the same number of steps (SSD's respaced chain, DDIM for the
DDPM arm), measured against Tiny-ImageNet's validation images beside the real-vs-real floor,
with paired bootstrap differences ssd - ddpm and the sampling seconds per image.
"""

from __future__ import annotations

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

NAME = "ssd-vs-ddpm"
CLAIM = ("Scale Space Diffusion (a Flexi-UNet over a shrinking state) matches DDPM's quality "
         "at lower training and sampling cost (Mukhopadhyay et al.: 2 levels, FID 2.14 "
         "against 2.22 at 0.89x the training time).")
ARMS: dict[str, ReferenceSpec] = {
    "ssd4": ReferenceSpec(config="ssd-64-4l"),
    "ssd2": ReferenceSpec(config="ssd-64-4l", sets=[
        "model.preset=ssd-64-2l", "objective.options.levels=2"]),
    "ddpm": ReferenceSpec(config="ddpm-x0-64"),
}
MARGIN = 0.05  # "matches": FD-prism within 5% of DDPM's (a non-inferiority margin)
RULE = ("ssd4@time and ssd4@images against ddpm at the same budget, paired bootstrap of "
        "FD-prism over the same seeds: 'reproduced' (SSD matches DDPM) when both 95% "
        "intervals of ssd4 - ddpm end below 5% of DDPM's FD-prism, 'not reproduced' when "
        "either lies wholly above 0, else 'inconclusive'.")


class Settings(ExperimentSettings):
    """S3's settings (``prism experiment show ssd-vs-ddpm``)."""

    train_data: str | None = None  # shards; None: the embedded demo corpus, built in work_dir
    real_data: str | None = None  # held-out images; None: the training data
    floor_data: str | None = None
    resolution: int = Field(64, ge=8)
    arms: list[str] = Field(default_factory=lambda: list(ARMS))
    time_limit_s: float = Field(480.0, gt=0)  # training seconds per arm (the loop's clock)
    image_marks: list[int] = Field(
        default_factory=lambda: [64000, 128000, 256000, 384000, 512000])
    ssd_compile: bool = False  # compile the SSD arms (one graph per resolution pair)
    reference_sets: list[str] = Field(default_factory=list)  # overrides for every arm
    arm_sets: dict[str, list[str]] = Field(default_factory=dict)  # per-arm overrides
    feature_net: str | None = None
    feature_recipe: dict[str, Any] = Field(default_factory=dict)
    steps: int = Field(100, ge=1)  # sampling steps of every arm
    ddpm_sampler: str = "ddim"
    n_images: int = Field(5000, ge=2)
    n_curve: int = Field(1000, ge=2)
    grid_images: int = Field(16, ge=1)
    stop_after_training: bool = False
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

    @field_validator("image_marks")
    @classmethod
    def _marks(cls, v: list[int]) -> list[int]:
        if any(m <= 0 for m in v):
            raise ValueError(f"image_marks must be positive, got {v}")
        return sorted(set(v))


PRESETS: dict[str, dict[str, Any]] = {
    # CPU, a minute: the demo corpus at 32x32, debug-sized networks (ssd: 3 levels)
    "small": {
        "resolution": 32, "time_limit_s": 4.0, "image_marks": [64, 128], "n_images": 24,
        "n_curve": 16, "steps": 8, "grid_images": 8, "batch_size": 32,
        "feature_recipe": {"width": 4, "epochs": 1, "batch_size": 32, "compile": False},
        "reference_sets": ["data.resolution=32", "model.overrides.resolution=32",
                           "optim.warmup_images=64",
                           "optim.ema_decay=0.99", "optim.lr=0.001", "train.batch_size=16",
                           "train.log_every_images=32", "checkpoint.every_images=100000",
                           "sampling.num_images=0", "data.num_workers=0", "run.compile=off"],
        "arm_sets": {
            "ssd4": ["model.preset=ssd-debug", "objective.options.levels=3"],
            "ssd2": ["model.preset=ssd-debug", "objective.options.levels=2"],
            "ddpm": ["model.preset=unet-debug", "model.overrides.channel_mult=[1, 2, 2]",
                     "model.overrides.attention_resolutions=[]"]},
        "metrics": {"swd_patches_per_image": 16, "swd_directions": 64, "swd_repeats": 1,
                    "kid_subset_size": 8, "kid_subsets": 10, "bootstrap": 10},
    },
    # one GPU: Tiny-ImageNet at 64x64, 150 images of each class (what one device call
    # carries with the wheels; docs/science/s3-ssd-vs-ddpm.md); an arm trains and samples
    # its models in one 10-minute call (benchmarks/experiments_gpu.sh s3-arm)
    "gpu": {
        "train_data": ".gpudata/tin64-s3", "real_data": ".gpudata/tin64-val",
        "batch_size": 500, "time_limit_s": 330.0, "n_images": 1000, "n_curve": 1000,
        "reference_sets": ["optim.warmup_images=64000", "checkpoint.every_images=640000",
                           "checkpoint.keep_last=1", "sampling.num_images=0",
                           "data.num_workers=6"],
    },
}


def _data(s: Settings, log: Log) -> tuple[str, str]:
    if s.train_data is not None:
        return s.train_data, s.real_data or s.train_data

    size = s.resolution
    root = Path(s.work_dir) / "data"
    shards = root / f"demo-shards-{size}"
    if not (shards / "manifest.parquet").exists():
        corpus = root / f"demo-corpus-{size}"
        build_demo(corpus, DemoConfig(size=size, per_class=32), log=log)
        ingest(str(corpus), str(shards), IngestConfig(size=size, shard_size=128, gzip=True),
               log=log)
    return str(shards), s.real_data or str(shards)


def references(s: Settings, train: str) -> dict[str, ReferenceSpec]:
    """Every arm named in ``s.arms`` under the shared budget, on the same data and seed."""
    budget = A.arm_sets(s.time_limit_s, image_marks=s.image_marks)
    out = {}
    for a in s.arms:
        compile_off = ["run.compile=off"] if a.startswith("ssd") and not s.ssd_compile else []
        out[a] = ReferenceSpec(config=ARMS[a].config, sets=[
            f"data.url={train}", f"run.seed={s.seed}", "data.num_classes=0",
            *ARMS[a].sets, *budget, *compile_off, *s.reference_sets, *s.arm_sets.get(a, [])])
    return out


def run(s: Settings, out: Path, log: Log = status) -> dict[str, Any]:
    """Train (or reuse) the arms, evaluate their final models, snapshots at the common image
    mark and the curves; returns the results."""
    timer = Timer()
    device = s.resolved_device()
    if s.stop_after_sampling:
        A.check_portable(out, s.work_dir)
    with timer("data"):
        train, real_src = _data(s, log)
    with timer("training"):
        refs = train_references(references(s, train), s, NAME, log)
    for a, r in refs.items():
        r["budget"] = b = A.accounting(r["run_dir"])
        log(f"{a}: {b['images_seen']} images, {b['train_seconds']:.1f} s, "
            f"{(b['flops_per_image'] or 0) / 1e9:.2f} GFLOP/image (expected over pairs)")
    if s.stop_after_training:
        return {"experiment": NAME, "claim": CLAIM, "settings": s.model_dump(mode="json"),
                "references": refs, "environment": environment(), "seconds": timer.seconds}

    def samples(arm: str, key: str, model_dir: str, n: int) -> tuple[torch.Tensor, float]:
        kw = {"steps": s.steps} if arm.startswith("ssd") else \
            {"steps": s.steps, "sampler": s.ddpm_sampler}
        with timer("sampling"):
            return A.model_samples(key, model_dir, list(range(s.seed, s.seed + n)), None, out,
                                   device, s.batch_size, kw)

    if s.stop_after_sampling:
        return A.sampled_results(NAME, CLAIM, s, refs, A.sample_arms(
            refs, s.n_images, samples, out, s.work_dir, log), timer.seconds)

    with timer("feature_net"):
        fnet = s.feature_net or ensure_feature_net(train, None, s, s.feature_recipe, log)
    spaces = feature_space(fnet, device)
    real, _ = real_images(real_src, None, s.seed, resolution=s.resolution)
    with timer("floors"):
        floors = real_floors(s.floor_data or real_src, real_src, real,
                             sorted({s.n_images, s.n_curve}), spaces, s.metrics, s.seed, device)

    def evaluate(arm: str, key: str, model_dir: str, n: int, intervals: bool
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
        images, seconds = samples(arm, key, model_dir, n)
        with timer("metrics"):
            return A.measured(key, images, seconds, real, spaces, s.metrics, device, log,
                              intervals)

    rows, details, curves, mark = A.evaluate_arms(refs, s.image_marks, "images_seen",
                                                  "images", evaluate, s.n_images, s.n_curve)
    comparisons = A.paired(details, [(f"ddpm@{b}", f"{arm}@{b}", b) for b in ("time", "images")
                                     for arm in ("ssd4", "ssd2")])
    results = {
        "experiment": NAME, "claim": CLAIM, "settings": s.model_dump(mode="json"),
        "references": refs, "feature_net": fnet, "real_data": real_src, "n_real": len(real),
        "floors": floors, "image_mark": mark, "rows": rows, "curves": curves,
        "comparisons": comparisons, "verdict": verdict(comparisons, rows, A.chips(refs)),
        "details": {k: slim(v) for k, v in details.items()},
        "environment": environment(), "seconds": timer.seconds}
    results["figures"] = figures(results, out, s)
    return results


def verdict(comparisons: list[dict[str, Any]], rows: list[dict[str, Any]],
            apart: str | None = None) -> dict[str, Any]:
    """The rule, fixed before measuring (``RULE``); ``apart``: why the arms' seconds do not
    compare (:func:`arms.chips`), which leaves the rule's equal-time half unmet."""
    if apart:
        return {"verdict": "inconclusive", "rule": RULE, "reason": apart}
    cells = [c for c in comparisons if c["a"].startswith("ddpm@") and c["b"].startswith("ssd4@")]
    metric = next((k for c in cells for k in c if k.startswith("FD-prism")), None)
    if len(cells) < 2 or metric is None:
        return {"verdict": "inconclusive", "rule": RULE,
                "reason": "ssd4 and ddpm were not both measured at both budgets with "
                          "bootstrap intervals"}
    ddpm = {r["budget"]: r[metric] for r in rows if r["arm"] == "ddpm"}
    within = [c[metric]["hi"] < MARGIN * ddpm[c["budget"]] for c in cells]
    worse = [c[metric]["lo"] > 0 for c in cells]
    v = "not reproduced" if any(worse) else "reproduced" if all(within) else "inconclusive"
    return {"verdict": v, "rule": RULE, "metric": metric, "margin": MARGIN,
            "ssd4_minus_ddpm": {c["budget"]: c[metric] for c in cells}}


def figures(results: dict[str, Any], out: Path, s: Settings) -> list[str]:
    """curves.png (FD-prism along the run against time and FLOPs), grid.png (one row per
    arm's final model, same seeds), loss.png."""
    rows = results["rows"]
    metric = (fd_key(rows[0]) if rows else None) or "swd_x1e3"
    floor = results["floors"].get(str(s.n_curve), {}).get(metric)
    A.curve_figure(results["curves"], metric, floor, out / "curves.png")
    grid = A.grid_figure(out, [r for r in rows if r["budget"] == "time"],
                         min(s.grid_images, s.n_images))
    A.loss_figure(results["references"], out / "loss.png")
    return ["curves.png", *grid, "loss.png"]
