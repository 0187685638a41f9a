"""S2: upsample guidance against naive sampling and upscaling (Hwang et al.).

The claim (SCIENCE.md section 3): a model trained at r x r samples at m r x m r without
retraining when each step is also guided by the model's prediction on the m-times downsampled
state; this beats running the model naively at m r and upscaling its r x r samples, best near
the paper's default strength.

The setting: one class-conditional reference trained at the native resolution
(``training/configs/tin32-ug.yaml``: Tiny-ImageNet at 32x32), sampled at m x native on the same
seeds and labels by every method:

- ``naive``: the network simply run at m r (upsample guidance off, theta = 0);
- ``ug-th<theta>``: upsample guidance at strength theta, active all the way (eta = 1);
- ``ug-th<theta>-eta<eta>``: at the default strength, active only in the first fraction eta
  of the trajectory (switched off at t = 1 - eta);
- ``cascade``: r x r steps, hand-off at lambda = -2 log m, m r steps (``cascaded_upscale``);
- ``sdedit``: the finished r x r sample upsampled, re-noised to lambda = -2 log m and
  denoised at m r (``sdedit_upscale``);
- ``bicubic``, ``lanczos``: the r x r samples upscaled with PIL (the classical baselines).

Each is measured against real m r images (FD-prism with a feature network trained at m r,
KID, precision/recall, SWD, log-RAPSD distance) beside the real-vs-real floor, with paired
bootstrap differences against ``naive`` and the sampling seconds per image at the same batch.
Naming: prism's ``ug_theta`` is the guidance strength (what the paper sweeps as its scale) and
``ug_eta`` the active fraction (the switch-off time is 1 - eta).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator

from common.models import load_model
from components.diffusion import Cond
from components.generate import base_denoiser, image_grid, per_image_generators, to_uint8
from components.guidance import index_at_lambda, sdedit_upscale
from components.metrics.spectral import log_rapsd_profile
from components.samplers import lambda_grid
from pipelines.config import DemoConfig, IngestConfig
from pipelines.data.demo import build_demo
from pipelines.data.ingest import ingest
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
    quantise,
    real_floors,
    real_images,
    sample_uint8,
    save_samples,
    saved_samples,
    slim,
    status,
    train_references,
)

NAME = "upsample-guidance"
CLAIM = ("Upsample guidance lets a model trained at r x r sample at 2r x 2r better than running "
         "it naively at 2r and than upscaling its r x r samples, best near its default "
         "strength (Hwang et al.).")
UPSCALERS = ("bicubic", "lanczos")
RULE = ("at the default strength (theta = default_theta, eta = 1), the paired 95% interval of "
        "FD-prism(UG) - FD-prism(baseline) for naive, bicubic and lanczos: all below 0 "
        "reproduced; any above 0 not reproduced; otherwise inconclusive (SWD without a feature "
        "network)")


class Settings(ExperimentSettings):
    """S2's settings (``prism experiment show upsample-guidance``)."""

    train_data: str | None = None  # native-resolution, labelled shards; None: the demo corpus
    real_data: str | None = None  # real m r images; None: the demo corpus at m r
    floor_data: str | None = None  # a second real set for the floors; None: halves of real_data
    feature_data: str | None = None  # m r shards for the feature network; None: real_data
    feature_net: str | None = None  # weights; None: trained on feature_data (feature_recipe)
    feature_recipe: dict[str, Any] = Field(default_factory=dict)
    reference_config: str = "tin32-ug"
    training_images: int = Field(4096, ge=1)
    reference_sets: list[str] = Field(default_factory=list)
    m: int = Field(2, ge=2, le=4)
    steps: int = Field(32, ge=2)
    sampler: str = "ddim"
    thetas: list[float] = Field(default_factory=lambda: [0.3, 0.6, 1.0, 1.3, 2.0])
    default_theta: float = 1.3
    etas: list[float] = Field(default_factory=lambda: [0.5, 0.25])
    baselines: list[str] = Field(default_factory=lambda: ["cascade", "sdedit", *UPSCALERS])
    n_images: int = Field(5000, ge=2)
    grid_images: int = Field(8, ge=1)
    stop_after_training: bool = False  # train (or resume) the native model, then stop

    @field_validator("thetas")
    @classmethod
    def _thetas(cls, v: list[float]) -> list[float]:
        if any(t <= 0 for t in v):
            raise ValueError(f"thetas must be > 0 (theta = 0 is the naive row), got {v}")
        return sorted(set(v))

    @field_validator("etas")
    @classmethod
    def _etas(cls, v: list[float]) -> list[float]:
        if any(not 0 < e < 1 for e in v):
            raise ValueError(f"etas must be in (0, 1) (eta = 1 is the thetas' rows), got {v}")
        return sorted(set(v), reverse=True)

    @field_validator("baselines")
    @classmethod
    def _baselines(cls, v: list[str]) -> list[str]:
        known = ("cascade", "sdedit", *UPSCALERS)
        bad = [b for b in v if b not in known]
        if bad:
            raise ValueError(f"baselines must be among {list(known)}, got {bad}")
        return v

    def ug_rows(self) -> list[tuple[str, float, float]]:
        """(tag, theta, eta) of every upsample-guidance row, the naive row first."""
        rows = [("naive", 0.0, 1.0)]
        thetas = sorted({*self.thetas, self.default_theta})
        rows += [(f"ug-th{t:g}", t, 1.0) for t in thetas]
        rows += [(f"ug-th{self.default_theta:g}-eta{e:g}", self.default_theta, e)
                 for e in self.etas]
        return rows


PRESETS: dict[str, dict[str, Any]] = {
    # CPU, a minute: the demo corpus (8 classes) at 16x16, sampled at 32x32
    "small": {
        "reference_config": "tin32-ug", "training_images": 2048, "n_images": 32, "steps": 4,
        "thetas": [0.6, 1.3], "etas": [0.5], "grid_images": 4, "batch_size": 16,
        "feature_recipe": {"width": 4, "epochs": 1, "batch_size": 32, "compile": False},
        "reference_sets": ["model.preset=unet-debug", "model.overrides.resolution=16",
                           "model.overrides.channel_mult=[1, 2]",
                           "model.overrides.attention_resolutions=[]", "data.resolution=16",
                           "data.num_classes=8", "objective.schedule_kwargs.d=16",
                           "objective.schedule_kwargs.d_ref=32", "optim.lr=0.002",
                           "optim.warmup_images=256", "optim.ema_decay=0.99",
                           "train.batch_size=16", "train.log_every_images=256",
                           "checkpoint.every_images=1024", "data.num_workers=0"],
        "metrics": {"swd_patches_per_image": 16, "swd_directions": 64, "swd_repeats": 1,
                    "kid_subset_size": 16, "kid_subsets": 10, "bootstrap": 10},
    },
    # one GPU: Tiny-ImageNet's 64x64 training shards (mean-downsampled to 32 for the native
    # model, at 64 for the feature network) and its validation set as the real images
    "gpu": {
        "train_data": ".gpudata/tin64-train", "real_data": ".gpudata/tin64-val",
        "feature_data": ".gpudata/tin64-train", "training_images": 460800,
        "batch_size": 500, "n_images": 5000,
        "reference_sets": ["sampling.num_images=0", "data.num_workers=6"],
    },
}


def _data(s: Settings, log: Log) -> tuple[str, str]:
    """(training shards, real m r images), the demo corpus's at m r where not given (the
    training stream mean-downsamples them to the native resolution, ``data.resolution``)."""
    if s.train_data is not None and s.real_data is not None:
        return s.train_data, s.real_data

    size = 16 * s.m  # the small setting: native 16
    root = Path(s.work_dir) / "data"
    shards = root / f"demo-shards-{size}"
    if not (shards / "manifest.parquet").exists():
        corpus = root / f"demo-corpus-{size}"
        build_demo(corpus, DemoConfig(size=size, per_class=32), log=log)
        ingest(str(corpus), str(shards), IngestConfig(size=size, shard_size=128, gzip=True),
               log=log)
    return s.train_data or str(shards), s.real_data or str(shards)


def references(s: Settings, train: str) -> dict[str, ReferenceSpec]:
    return {"native": ReferenceSpec(config=s.reference_config, sets=[
        f"data.url={train}", f"train.total_images={s.training_images}", f"run.seed={s.seed}",
        *s.reference_sets])}


def run(s: Settings, out: Path, log: Log = status) -> dict[str, Any]:
    """Train (or reuse) the native model, sample every method, measure; returns the results."""
    timer = Timer()
    device = s.resolved_device()
    with timer("data"):
        train, real_src = _data(s, log)
    with timer("training"):
        refs = train_references(references(s, train), s, NAME, log)
    if s.stop_after_training:
        return {"experiment": NAME, "claim": CLAIM, "settings": s.model_dump(mode="json"),
                "references": refs, "environment": environment(), "seconds": timer.seconds}
    model = load_model(refs["native"]["model_dir"], device)
    if not model.num_classes:
        raise ValueError(f"{refs['native']['model_dir']}: S2 needs a class-conditional model")
    res = model.resolution * s.m
    with timer("feature_net"):
        fnet = s.feature_net or ensure_feature_net(s.feature_data or real_src, None, s,
                                                   s.feature_recipe, log)
    spaces = feature_space(fnet, device)
    real, _ = real_images(real_src, None, s.seed, resolution=res)
    with timer("floors"):
        floors = real_floors(s.floor_data or real_src, real_src, real, [s.n_images], spaces,
                             s.metrics, s.seed, device)
    seeds = list(range(s.seed, s.seed + s.n_images))
    labels = [i % model.num_classes for i in seeds]
    samples, seconds = _sample_all(s, model, seeds, labels, out, device, log)
    rows, details = [], {}
    for tag, images in samples.items():
        if images.shape[-1] != res:
            continue  # the native samples: an input of the upscalers, not a row
        with timer("metrics"):
            row, det = measure(images, real, spaces, s.metrics, device)
        rows.append({"tag": tag, **_method(s, tag), "n": len(images), **row,
                     "sample_seconds": seconds[tag],
                     "cost_vs_naive": seconds[tag] / seconds["naive"]})
        details[tag] = {**det, "samples": f"samples/{tag}.npy"}
        log(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                        for k, v in rows[-1].items()}))
    comparisons = _compare(s, details, rows)
    results = {
        "experiment": NAME, "claim": CLAIM, "settings": s.model_dump(mode="json"),
        "references": refs, "feature_net": fnet, "real_data": real_src, "n_real": len(real),
        "resolution": res, "native_resolution": model.resolution,
        "native_sample_seconds": seconds["native"], "floors": floors, "rows": rows,
        "comparisons": comparisons, "verdict": verdict(s, comparisons, rows),
        "details": {k: slim(v) for k, v in details.items()},
        "environment": environment(), "seconds": timer.seconds}
    results["figures"] = figures(results, out, s, real)
    (out / "details.json").write_text(json.dumps(details, default=float))
    return results


def _method(s: Settings, tag: str) -> dict[str, Any]:
    """The row's method, theta and eta (theta, eta only for the upsample-guidance rows)."""
    for t, theta, eta in s.ug_rows():
        if t == tag:
            return {"method": "naive" if theta == 0 else "ug", "theta": theta, "eta": eta}
    return {"method": tag, "theta": None, "eta": None}


def _sample_all(s: Settings, model: Any, seeds: list[int], labels: list[int], out: Path,
                device: str, log: Log) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every method's uint8 samples (saved, reused when present) and sampling seconds."""
    res = model.resolution * s.m
    jobs: dict[str, Any] = {"native": {"resolution": model.resolution}}
    for tag, theta, eta in s.ug_rows():
        jobs[tag] = {"resolution": res, "ug_theta": theta, "ug_eta": eta}
    if "cascade" in s.baselines:
        jobs["cascade"] = {"resolution": res, "upscale": "cascade"}
    samples, seconds = {}, {}
    for tag, kw in jobs.items():
        saved = saved_samples(out, tag, len(seeds))
        if saved is None:
            t0 = _now(device)
            images = sample_uint8(model, seeds, device=device, batch_size=s.batch_size,
                                  steps=s.steps, sampler=s.sampler, class_labels=labels,
                                  desc=tag, **kw)
            saved = images, _now(device) - t0
            save_samples(out, tag, *saved)
        samples[tag], seconds[tag] = saved
        log(f"{tag}: {len(seeds)} images at {samples[tag].shape[-1]}, {seconds[tag]:.1f} s")
    native = samples["native"]
    for tag in (b for b in s.baselines if b in UPSCALERS):
        t0 = _now(device)
        samples[tag] = upscale_pil(native, s.m, tag)
        seconds[tag] = seconds["native"] + _now(device) - t0
        save_samples(out, tag, samples[tag], seconds[tag])
    if "sdedit" in s.baselines:
        saved = saved_samples(out, "sdedit", len(seeds))
        if saved is None:
            t0 = _now(device)
            images = sdedit_uint8(model, native, seeds, labels, s, device)
            saved = images, seconds["native"] + _now(device) - t0
            save_samples(out, "sdedit", *saved)
        samples["sdedit"], seconds["sdedit"] = saved
    return samples, seconds


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def upscale_pil(images: torch.Tensor, m: int, kind: str) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, C, m H, m W) with PIL's bicubic or Lanczos filter (the
    classical upscalers a user would compare against).

    PIL on the CPU for both: kornia (0.9) has no Lanczos kernel, and its bicubic ``resize`` is
    torch's (Keys kernel with a = -0.75, no rounding between the two passes), not PIL's
    (a = -0.5, rounded to uint8 after each pass); on random 16x16 images upscaled 2x the two
    differ in most pixels, by up to 27 of 255 levels. Upscaling the native samples takes
    milliseconds, so a GPU path would buy nothing and change the baseline.
    """
    method = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}[kind]
    arr = images.permute(0, 2, 3, 1).numpy()
    h, w = arr.shape[1:3]
    out = np.stack([np.asarray(Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a)
                               .resize((w * m, h * m), method)) for a in arr])
    out = out[..., None] if out.ndim == 3 else out
    return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).contiguous()


def sdedit_uint8(model: Any, native: torch.Tensor, seeds: list[int], labels: list[int],
                 s: Settings, device: str) -> torch.Tensor:
    """SDEdit from the native samples: bilinear m x upsampling, re-noised to
    lambda = -2 log m (where level log2 m is half-way), the rest of the m r grid denoised."""
    lams = lambda_grid(model.schedule, s.steps)
    lams = lams[index_at_lambda(lams, -2.0 * math.log(s.m)):]
    den = base_denoiser(model)
    chunks = []
    for i in range(0, len(seeds), s.batch_size):
        sl = slice(i, i + s.batch_size)
        x = as_float(native[sl]).to(device)
        cond = Cond(torch.tensor(labels[sl], device=device))
        gens = per_image_generators(seeds[sl])
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16,
                                             enabled=device.startswith("cuda")):
            y = sdedit_upscale(den, x, lams, cond, m=s.m, sampler=s.sampler, generators=gens,
                               clip_denoised=True)
        chunks.append(quantise(y))
    return torch.cat(chunks)


def _compare(s: Settings, details: dict[str, Any], rows: list[dict[str, Any]]
             ) -> list[dict[str, Any]]:
    """Paired differences b - a: every row against naive, and the default UG row against
    every baseline."""
    if not rows or "intervals" not in details[rows[0]["tag"]]:
        return []
    fd = fd_key(rows[0])
    metrics = [m for m in (fd, "swd_x1e3", "log_rapsd_l1") if m]
    default = f"ug-th{s.default_theta:g}"
    pairs = [("naive", t) for t in details if t != "naive"]
    pairs += [(b, default) for b in details if b not in ("naive", default)
              and not b.startswith("ug-")]
    return [{"a": a, "b": b, **{m: paired_difference(details[a], details[b], m)
                                for m in metrics}} for a, b in pairs]


def verdict(s: Settings, comparisons: list[dict[str, Any]], rows: list[dict[str, Any]]
            ) -> dict[str, Any]:
    """The rule, fixed before measuring (``RULE``), and the best strength theta."""
    default = f"ug-th{s.default_theta:g}"
    cells = [c for c in comparisons if c["b"] == default and c["a"] in ("naive", *UPSCALERS)]
    best = None
    fd = fd_key(rows[0]) if rows else None
    key = fd or "swd_x1e3"
    ug = [r for r in rows if r["method"] in ("ug", "naive") and r["eta"] == 1.0]
    if ug:
        best = min(ug, key=lambda r: r[key])["theta"]
    if not cells:
        return {"verdict": "inconclusive", "rule": RULE, "best_theta": best,
                "reason": "no bootstrap intervals were computed"}
    metric = next((k for k in cells[0] if k.startswith("FD-prism")), "swd_x1e3")
    below = [c[metric]["hi"] < 0 for c in cells]
    above = [c[metric]["lo"] > 0 for c in cells]
    v = "reproduced" if all(below) else "not reproduced" if any(above) else "inconclusive"
    return {"verdict": v, "rule": RULE, "metric": metric, "best_theta": best,
            "default_theta": s.default_theta,
            "against": {c["a"]: c[metric]["difference"] for c in cells}}


def figures(results: dict[str, Any], out: Path, s: Settings, real: torch.Tensor) -> list[str]:
    """metric_vs_theta.png, grid.png (one row per method, same seeds), rapsd.png."""
    # deferred: matplotlib (~0.4 s to import) only for the figures, not for `experiment list`
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fd = fd_key(rows[0]) if rows else None
    metrics = [m for m in (fd, "swd_x1e3", "log_rapsd_l1") if m and m in rows[0]]
    floor = results["floors"].get(str(s.n_images), {})
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        ug = sorted((r["theta"], r[m], r.get(f"{m}_se", 0.0)) for r in rows
                    if r["method"] in ("ug", "naive") and r["eta"] == 1.0)
        x, y, e = map(np.array, zip(*ug, strict=True))
        ax.errorbar(x, y, yerr=1.96 * e, marker="o", color="C0", capsize=2,
                    label="upsample guidance (eta 1)")
        for i, r in enumerate(r for r in rows if r["method"] == "ug" and r["eta"] != 1.0):
            ax.plot([r["theta"]], [r[m]], "s", color=f"C{6 + i}", label=f"eta {r['eta']:g}")
        for i, r in enumerate(r for r in rows if r["theta"] is None):
            ax.axhline(r[m], color=f"C{1 + i}", ls="--", lw=1, label=r["tag"])
        if m in floor:
            ax.axhline(floor[m], color="0.5", ls=":", label="real vs real")
        ax.set(xlabel="UG strength theta (0: naive)", title=m)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "metric_vs_theta.png", dpi=110)
    plt.close(fig)
    k = min(s.grid_images, s.n_images)
    tags = [r["tag"] for r in rows]
    strips = []
    for tag in tags:
        x = np.load(out / "samples" / f"{tag}.npy")[:k]
        strips.append(to_uint8(image_grid(as_float(torch.from_numpy(x)), nrow=k)).numpy())
    Image.fromarray(np.concatenate(strips, axis=0)).save(out / "grid.png")
    (out / "grid_rows.json").write_text(json.dumps(tags))
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    prof = log_rapsd_profile(real).numpy()
    f = np.arange(1, len(prof) + 1)
    ax.loglog(f, np.exp(prof), "k-", lw=2, label="real")
    for i, tag in enumerate(t for t in tags if t in ("naive", f"ug-th{s.default_theta:g}",
                                                       "cascade", "sdedit", "bicubic")):
        x = np.load(out / "samples" / f"{tag}.npy")
        ax.loglog(f, np.exp(log_rapsd_profile(as_float(torch.from_numpy(x))).numpy()),
                  color=f"C{i}", label=tag)
    ax.set(xlabel="radial frequency (cycles / image)", ylabel="RAPSD (luminance)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "rapsd.png", dpi=110)
    plt.close(fig)
    return ["metric_vs_theta.png", "grid.png", "grid_rows.json", "rapsd.png"]
