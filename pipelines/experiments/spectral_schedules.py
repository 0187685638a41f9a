"""S1: spectrally guided per-image noise schedules against SiD2 (Esteves & Makadia).

The claim (SCIENCE.md section 4): per-image schedules bounded by each image's power spectrum,
with the network conditioned on the schedule's end points and schedules drawn from a fitted
mixture at sampling time, give about 15% better FID than the SiD2 baseline at few steps (32),
slightly worse at many.

The setting: two references trained on the same data for the same images from the same seed,
differing only in the schedule (``training/configs/cifar10-sid2.yaml``: shifted cosine at
d = 32 against d_ref = 64, sigmoid weighting; ``cifar10-spectral.yaml``: ``per_instance:
mixed``, the same weighting). Both are sampled with DDIM and DPM-Solver++(2M) at each step
count on the same seeds and measured against held-out real images: FD-prism, KID,
precision/recall, SWD, log-RAPSD distance, each beside the real-vs-real floor at the same n,
and the paired bootstrap difference spectral - SiD2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator

from common.models import load_model
from components.generate import image_grid, to_uint8
from components.metrics.spectral import log_rapsd_profile
from pipelines.config import DemoConfig, IngestConfig
from pipelines.data.demo import build_demo
from pipelines.data.ingest import ingest
from pipelines.data.schedule_model import fit_schedule_model
from pipelines.data.spectra_job import run_spectra
from pipelines.experiments.common import (
    ExperimentSettings,
    Log,
    ReferenceSpec,
    Timer,
    as_float,
    ensure_feature_net,
    environment,
    fd_key,
    feature_space,
    measure,
    paired_difference,
    real_floors,
    real_images,
    sample_uint8,
    save_samples,
    saved_samples,
    slim,
    status,
    train_references,
)

NAME = "spectral-schedules"
CLAIM = ("Spectrally guided per-image schedules give about 15% better FID than SiD2's shifted "
         "cosine at few sampling steps (32), slightly worse at many (Esteves & Makadia).")
SAMPLERS = ("ddim", "dpmpp_2m")


class Settings(ExperimentSettings):
    """S1's settings (``prism experiment show spectral-schedules``)."""

    train_data: str | None = None  # shards; None: the embedded demo corpus, built in work_dir
    real_data: str | None = None  # held-out images; None: the training data
    floor_data: str | None = None  # a second real set for the floors; None: train_data
    spectral_stats: str | None = None  # per-image parameters (Parquet); None: the spectra job
    schedule_model: str | None = None  # fitted schedule mixture (JSON); None: fitted here
    training_images: int = Field(4096, ge=1)
    reference_sets: list[str] = Field(default_factory=list)  # overrides for both models
    feature_net: str | None = None  # weights; None: trained on train_data (feature_recipe)
    feature_recipe: dict[str, Any] = Field(default_factory=dict)
    steps: list[int] = Field(default_factory=lambda: [8, 16, 32, 64])
    samplers: list[str] = Field(default_factory=lambda: list(SAMPLERS))
    n_images: int = Field(5000, ge=2)
    n_images_at: dict[int, int] = Field(default_factory=lambda: {32: 10000})
    claim_steps: list[int] = Field(default_factory=lambda: [8, 16, 32])
    grid_images: int = Field(64, ge=1)
    stop_after_training: bool = False  # train (or resume) the references, then stop

    @field_validator("steps", "claim_steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v or any(s < 1 for s in v):
            raise ValueError(f"step counts must be positive integers, got {v}")
        return sorted(set(v))

    @field_validator("samplers")
    @classmethod
    def _samplers(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in SAMPLERS]
        if not v or bad:
            raise ValueError(f"samplers must be among {list(SAMPLERS)}, got {v}")
        return v

    def n_at(self, steps: int) -> int:
        return self.n_images_at.get(steps, self.n_images)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU, a minute: the demo corpus (32x32 photographs), 0.9M-parameter UNets
    "small": {
        "training_images": 2048, "n_images": 48, "n_images_at": {4: 64}, "steps": [2, 4],
        "claim_steps": [4], "grid_images": 16, "batch_size": 64,
        "feature_recipe": {"width": 4, "epochs": 1, "batch_size": 32, "compile": False},
        "reference_sets": ["model.preset=unet-debug", "model.overrides.resolution=32",
                           "model.overrides.channel_mult=[1, 2, 2]",
                           "model.overrides.attention_resolutions=[]", "optim.lr=0.002",
                           "optim.warmup_images=256", "optim.ema_decay=0.99",
                           "train.batch_size=16", "train.log_every_images=256",
                           "checkpoint.every_images=1024", "sampling.num_images=0",
                           "data.num_workers=0"],
        "metrics": {"swd_patches_per_image": 16, "swd_directions": 64, "swd_repeats": 1,
                    "kid_subset_size": 16, "kid_subsets": 10, "bootstrap": 10},
    },
    # one H200: CIFAR-10 shards made with `prism data ingest` (see docs/science/s1)
    "gpu": {
        "train_data": ".gpudata/cifar10-train", "real_data": ".gpudata/cifar10-test",
        "spectral_stats": ".gpudata/cifar10-params.parquet",
        "schedule_model": ".gpudata/cifar10-schedule.json",
        "training_images": 460800, "parallel_training": True, "batch_size": 1000,
        "reference_sets": ["optim.warmup_images=64000", "checkpoint.every_images=128000",
                           "sampling.num_images=0", "data.num_workers=6"],
    },
}


def _data(s: Settings, work: Path, log: Log) -> tuple[str, str, str]:
    """(train shards, spectral stats, schedule model), made here where not given."""
    train = s.train_data
    if train is None:
        corpus = Path(s.work_dir) / "data" / "demo-corpus"
        shards = Path(s.work_dir) / "data" / "demo-shards"
        if not (shards / "manifest.parquet").exists():
            build_demo(corpus, DemoConfig(size=32, per_class=32), log=log)
            ingest(str(corpus), str(shards), IngestConfig(size=32, shard_size=128, gzip=True),
                   log=log)
        train = str(shards)
    stats = s.spectral_stats
    if stats is None:
        stats = str(work / "spectra")
        if not any(Path(stats).glob("*.parquet")):
            log(f"spectral statistics of {train} (Ray tasks) -> {stats}")
            run_spectra(train, stats, progress=False)
    schedule = s.schedule_model
    if schedule is None:
        schedule = str(work / "schedule.json")
        if not Path(schedule).exists():
            fit_schedule_model(stats, schedule, log=log)
    return train, stats, schedule


def references(s: Settings, train: str, stats: str, schedule: str) -> dict[str, ReferenceSpec]:
    common = [f"data.url={train}", f"train.total_images={s.training_images}",
              f"run.seed={s.seed}", *s.reference_sets]
    return {"sid2": ReferenceSpec(config="cifar10-sid2", sets=common),
            "spectral": ReferenceSpec(config="cifar10-spectral", sets=[
                *common, f"data.spectral_stats={stats}", f"sampling.schedule_model={schedule}"])}


def run(s: Settings, out: Path, log: Log = status) -> dict[str, Any]:
    """Train (or reuse) both references, sample, measure; returns the results dict."""
    timer = Timer()
    device = s.resolved_device()
    work = Path(s.work_dir) / NAME
    work.mkdir(parents=True, exist_ok=True)
    with timer("data"):
        train, stats, schedule = _data(s, work, log)
    with timer("training"):
        refs = train_references(references(s, train, stats, schedule), s, NAME, log)
    if s.stop_after_training:
        return {"experiment": NAME, "claim": CLAIM, "settings": s.model_dump(mode="json"),
                "references": refs, "environment": environment(), "seconds": timer.seconds}
    real_src = s.real_data or train
    with timer("feature_net"):
        fnet = s.feature_net or ensure_feature_net(train, s.real_data, s, s.feature_recipe, log)
    spaces = feature_space(fnet, device)
    sizes = sorted({s.n_at(k) for k in s.steps})
    real, _ = real_images(real_src, None, s.seed)
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    with timer("floors"):
        floors = real_floors(s.floor_data or train, real_src, real, sizes, spaces, s.metrics,
                             s.seed, device)
    models = {label: load_model(info["model_dir"], device) for label, info in refs.items()}
    for label, model in models.items():
        for sampler in s.samplers:
            for steps in s.steps:
                n = s.n_at(steps)
                tag = f"{label}-{sampler}-{steps}"
                saved = saved_samples(out, tag, n)
                if saved is None:
                    with timer("sampling"):
                        t0 = timer.seconds.get("sampling", 0.0)
                        images = sample_uint8(
                            model, list(range(s.seed, s.seed + n)), device=device,
                            batch_size=s.batch_size, steps=steps, sampler=sampler, desc=tag,
                            schedule="spectral" if label == "spectral" else "model")
                    sample_s = timer.seconds["sampling"] - t0
                    path = save_samples(out, tag, images, sample_s)
                else:
                    images, sample_s = saved
                    path = f"samples/{tag}.npy"
                    log(f"{tag}: reusing {n} saved samples")
                with timer("metrics"):
                    row, det = measure(images, real, spaces, s.metrics, device)
                row = {"tag": tag, "model": label, "sampler": sampler, "steps": steps, "n": n,
                       **row, "sample_seconds": sample_s}
                rows.append(row)
                details[tag] = {**det, "samples": path}
                log(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                for k, v in row.items()}))
    comparisons = _compare(s, details, rows)
    results = {
        "experiment": NAME, "claim": CLAIM, "settings": s.model_dump(mode="json"),
        "references": refs, "feature_net": fnet, "real_data": real_src, "n_real": len(real),
        "floors": floors, "rows": rows, "comparisons": comparisons,
        "verdict": verdict(comparisons, s.claim_steps),
        "details": {k: slim(v) for k, v in details.items()},
        "environment": environment(), "seconds": timer.seconds}
    figures(results, out, models, s, real)
    (out / "details.json").write_text(json.dumps(
        {k: v for k, v in details.items()}, default=float))  # with bootstrap replicates
    return results


def _compare(s: Settings, details: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict]:
    """Paired differences spectral - SiD2 per sampler and step count, for FD-prism (or SWD
    when there is no feature network) and SWD."""
    if not rows:
        return []
    fd = fd_key(rows[0])
    metrics = [m for m in (fd, "swd_x1e3", "log_rapsd_l1") if m]
    out = []
    for sampler in s.samplers:
        for steps in s.steps:
            a, b = details[f"sid2-{sampler}-{steps}"], details[f"spectral-{sampler}-{steps}"]
            if "intervals" not in a:
                continue
            out.append({"sampler": sampler, "steps": steps, **{
                m: paired_difference(a, b, m) for m in metrics}})
    return out


def verdict(comparisons: list[dict[str, Any]], claim_steps: list[int]) -> dict[str, Any]:
    """The rule, fixed before measuring: at the claim's step counts, for every sampler, the
    paired 95% interval of FD-prism(spectral) - FD-prism(SiD2) (SWD without a feature network).
    Reproduced: every interval below 0. Contradicted: every interval above 0. No difference:
    every interval contains 0. Otherwise: inconclusive."""
    cells = [c for c in comparisons if c["steps"] in claim_steps]
    if not cells:
        return {"verdict": "inconclusive", "reason": "no bootstrap intervals were computed"}
    metric = next((k for k in cells[0] if k.startswith("FD-prism")), "swd_x1e3")
    below = [c[metric]["hi"] < 0 for c in cells]
    above = [c[metric]["lo"] > 0 for c in cells]
    rel = [c[metric]["relative"] for c in cells]
    if all(below):
        v = "reproduced"
    elif all(above):
        v = "contradicted"
    elif not any(below) and not any(above):
        v = "no difference"
    else:
        v = "inconclusive"
    return {"verdict": v, "metric": metric, "steps": claim_steps,
            "relative_differences": rel, "rule": verdict.__doc__.split("\n", 1)[1].strip()}


def figures(results: dict[str, Any], out: Path, models: dict[str, Any], s: Settings,
            real: torch.Tensor) -> None:
    """metrics_vs_steps.png, grid_<steps>.png (SiD2 | spectral, same seeds), rapsd.png."""
    # deferred: matplotlib (~0.4 s to import) only for the figures, not for `experiment list`
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fd = fd_key(rows[0]) if rows else None
    metrics = [m for m in (fd, "swd_x1e3", "log_rapsd_l1", "precision", "recall") if m
               and m in rows[0]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for label, ls in (("sid2", "-"), ("spectral", "--")):
            for sampler, color in zip(s.samplers, ("C0", "C3"), strict=False):
                pts = [(r["steps"], r[m], r.get(f"{m}_se", 0.0)) for r in rows
                       if r["model"] == label and r["sampler"] == sampler]
                if pts:
                    x, y, e = map(np.array, zip(*pts, strict=True))
                    ax.errorbar(x, y, yerr=1.96 * e, ls=ls, color=color, marker="o", ms=3,
                                capsize=2, label=f"{label}, {sampler}")
        floor = results["floors"].get(str(s.n_images), {}).get(m)
        if floor is not None:
            ax.axhline(floor, color="0.5", ls=":", label=f"real vs real (n={s.n_images})")
        ax.set(xscale="log", xlabel="sampling steps", title=m)
        ax.set_xticks(s.steps, [str(k) for k in s.steps])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "metrics_vs_steps.png", dpi=110)
    plt.close(fig)
    steps = 32 if 32 in s.steps else s.steps[-1]
    sampler = s.samplers[0]
    k = min(s.grid_images, s.n_at(steps))
    panels = []
    for label in ("sid2", "spectral"):
        x = np.load(out / "samples" / f"{label}-{sampler}-{steps}.npy")[:k]
        panels.append(to_uint8(image_grid(as_float(torch.from_numpy(x)))).numpy())
    gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([panels[0], gap, panels[1]], axis=1)).save(
        out / f"grid_{sampler}_{steps}.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    prof = log_rapsd_profile(real).numpy()
    f = np.arange(1, len(prof) + 1)
    ax.loglog(f, np.exp(prof), "k-", lw=2, label="real")
    for label, ls in (("sid2", "-"), ("spectral", "--")):
        x = as_float(torch.from_numpy(np.load(out / "samples" / f"{label}-{sampler}-{steps}.npy")))
        ax.loglog(f, np.exp(log_rapsd_profile(x).numpy()), ls=ls, label=f"{label} ({sampler}, "
                  f"{steps} steps)")
    ax.set(xlabel="radial frequency (cycles / image)", ylabel="RAPSD (luminance, geometric mean)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "rapsd.png", dpi=110)
    plt.close(fig)
    results["figures"] = ["metrics_vs_steps.png", f"grid_{sampler}_{steps}.png", "rapsd.png"]
