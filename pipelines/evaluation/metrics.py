"""All quality metrics of one image set against a reference set, in one call.

Used by the evaluate stage (generated vs held-out real) and by the floors benchmark (real vs
real). Network-free metrics always run (SWD, log-RAPSD distance and slope); feature metrics run
in each feature space that is given: the in-house network (``FD-prism-<hash>``: FD, KID,
precision/recall) and, only when the user supplies its weights, the standard FID InceptionV3
(``FID``, ``KID-inception``). Without those weights standard FID is reported as unavailable,
never replaced by another number under its name. No Ray / MLflow imports.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from components.generate import image_grid, to_uint8
from components.metrics.feature_net import extract_features, load_feature_net
from components.metrics.frechet import frechet_distance
from components.metrics.inception import FID_WEIGHTS_NAME, load_fid_inception, sha256_file
from components.metrics.kid import kid
from components.metrics.memorization import memorization
from components.metrics.prd import precision_recall
from components.metrics.spectral import (
    high_frequency_outliers,
    log_rapsd_profile,
    log_rapsd_profiles,
    spectral_distance,
)
from components.metrics.swd import swd, swd_replicates


class MetricSettings(BaseModel):
    """Metric parameters (recorded with every result)."""

    model_config = ConfigDict(extra="forbid")

    swd_patches_per_image: int = Field(64, ge=1)
    swd_directions: int = Field(512, ge=1)
    swd_repeats: int = Field(4, ge=1)
    swd_min_resolution: int = Field(16, ge=8)
    spectral_channel: str = Field("luminance", pattern="^(luminance|mean)$")
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    pr_k: int = Field(3, ge=1)
    memorization_threshold: float = Field(1 / 3, gt=0, lt=1)
    hf_cutoff: float = Field(0.375, gt=0, lt=0.7, description="cycles per pixel above which "
                             "an image's power counts as high-frequency (hf_outliers)")
    hf_quantile: float = Field(0.99, gt=0, lt=1, description="hf_outliers: the fraction of "
                               "generated images above this quantile of the real images' "
                               "high-frequency share")
    seed: int = 0
    feature_batch_size: int = Field(500, ge=1)
    bootstrap: int = Field(50, ge=0, description="bootstrap resamples of the generated set "
                           "for the intervals (0: no intervals)")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="interval coverage")
    swd_bootstrap: bool = Field(True, description="SWD among the bootstrapped metrics (off: "
                                "its point value alone; on a CPU its replicates, a sort of "
                                "every resample's projections, take most of the time)")


@dataclass
class FeatureSpace:
    """A feature network with its reported name and provenance."""

    name: str  # "FD-prism-xxxxxxxx" or "FID"
    net: nn.Module
    info: dict[str, Any]
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def features(self, images: torch.Tensor, key: str | None, batch_size: int) -> torch.Tensor:
        """Features of images (N, 3, H, W) in [-1, 1]; cached under ``key`` when given."""
        if key is not None and key in self.cache:
            return self.cache[key]
        f = extract_features(self.net, images, batch_size=batch_size)
        if key is not None:
            self.cache[key] = f
        return f


def feature_spaces(feature_net: str | None, inception: str | None,
                   device: str) -> tuple[list[FeatureSpace], dict[str, Any]]:
    """Load the feature networks that were given; returns them and the standard-FID status."""
    spaces = []
    if feature_net:
        net, meta = load_feature_net(feature_net, device)
        spaces.append(FeatureSpace(meta["metric_name"], net, {
            "path": str(feature_net), "sha256": meta["sha256"],
            "test_accuracy": meta.get("test_accuracy"), "class_names": meta.get("class_names"),
            "train_source": meta.get("train_source")}))
    if inception:
        digest = sha256_file(inception)
        spaces.append(FeatureSpace("FID", load_fid_inception(inception, device), {
            "path": str(inception), "sha256": digest}))
        status = {"available": True, "network": f"InceptionV3 {FID_WEIGHTS_NAME} (FID graph)",
                  "weights_sha256": digest}
    else:
        status = {"available": False, "reason": "standard FID needs the InceptionV3 FID "
                  f"weights ({FID_WEIGHTS_NAME}*.pth), which were not given (--inception PATH)"}
    return spaces, status


def _feature_metrics(space: FeatureSpace, fg: torch.Tensor, fr: torch.Tensor,
                     s: MetricSettings) -> dict[str, Any]:
    out: dict[str, Any] = {"name": space.name, "fd": frechet_distance(fg, fr),
                           "kid": kid(fg, fr, subsets=s.kid_subsets,
                                      subset_size=s.kid_subset_size, seed=s.seed)}
    if space.name != "FID":  # precision/recall in the in-house space (cheap, 8w-d)
        out.update(precision_recall(fr.float(), fg.float(), k=s.pr_k))
    out["network"] = space.info
    return out


def compute_metrics(generated: torch.Tensor, real: torch.Tensor, *, settings: MetricSettings,
                    spaces: list[FeatureSpace] = (), real_key: str | None = "real",
                    train: torch.Tensor | None = None) -> dict[str, Any]:
    """Every metric of ``generated`` against ``real``, both (N, 3, H, W) in [-1, 1].

    ``real_key`` caches the real features across calls (sweeps); ``train`` (M, 3, H, W)
    enables the pixel-space memorisation check.
    """
    if generated.shape[1:] != real.shape[1:]:
        raise ValueError(f"generated images {tuple(generated.shape[1:])} and real images "
                         f"{tuple(real.shape[1:])} differ in shape")
    s = settings
    out: dict[str, Any] = {"n_generated": generated.shape[0], "n_real": real.shape[0]}
    t0 = time.perf_counter()
    out["swd"] = swd(generated, real, min_resolution=min(s.swd_min_resolution, real.shape[-1]),
                     patches_per_image=s.swd_patches_per_image, directions=s.swd_directions,
                     repeats=s.swd_repeats, seed=s.seed)
    out["spectral"] = spectral_distance(generated, real, channel=s.spectral_channel)
    out["hf_outliers"] = high_frequency_outliers(generated, real, cutoff=s.hf_cutoff,
                                                 quantile=s.hf_quantile)
    features = {}
    for space in spaces:
        key = "fid" if space.name == "FID" else "fd_prism"
        features[space.name] = (space.features(generated, None, s.feature_batch_size),
                                space.features(real, real_key, s.feature_batch_size))
        out[key] = _feature_metrics(space, *features[space.name], s)
    if train is not None:
        m = memorization(generated, train, threshold=s.memorization_threshold)
        out["memorization"] = {k: m[k] for k in ("fraction_memorized", "ratio_mean",
                                                 "ratio_min", "threshold", "flagged_indices")}
        out["memorization"]["space"] = "pixels"
    if s.bootstrap:
        out["intervals"] = bootstrap_intervals(generated, real, out, features, s)
    out["metric_seconds"] = time.perf_counter() - t0
    return out


def bootstrap_index(n: int, s: MetricSettings) -> torch.Tensor:
    """(resamples, n) image indices drawn with replacement from ``s.seed``: the same rows for
    every model evaluated with the same settings and image count, so two models' replicates
    are paired (their samples share seeds and labels, image by image)."""
    g = torch.Generator().manual_seed(s.seed + 7919)
    return torch.randint(n, (s.bootstrap, n), generator=g)


def bootstrap_intervals(generated: torch.Tensor, real: torch.Tensor, point: dict[str, Any],
                        features: dict[str, tuple[torch.Tensor, torch.Tensor]],
                        s: MetricSettings) -> dict[str, Any]:
    """Confidence intervals of the headline metrics over the generated set's sampling noise.

    The generated images are resampled with replacement (``bootstrap_index``) and every metric
    recomputed against the fixed real set; the interval is the point estimate +- z se, with se
    the replicates' standard deviation (normal approximation: resampling with replacement
    duplicates images, which biases distances upwards, so the replicates' percentiles would not
    bracket the estimate; their spread is what is used). The replicates are kept: the register
    stage compares two models by the paired differences of theirs.
    """
    index = bootstrap_index(generated.shape[0], s)
    reps: dict[str, list[float]] = {"log_rapsd_l1": []}
    est = {"log_rapsd_l1": point["spectral"]["log_rapsd_l1"]}
    if s.swd_bootstrap:
        reps["swd_x1e3"] = swd_replicates(
            generated, real, index, patches_per_image=s.swd_patches_per_image,
            directions=s.swd_directions, repeats=s.swd_repeats, seed=s.seed,
            min_resolution=min(s.swd_min_resolution, real.shape[-1]))
        est["swd_x1e3"] = point["swd"]["mean"]
    for name, (fg, fr) in features.items():
        reps[name] = [frechet_distance(fg[i.to(fg.device)], fr) for i in index]
        est[name] = point["fid" if name == "FID" else "fd_prism"]["fd"]
    # the log-RAPSD profile is a mean over images: each image's profile once, then means
    per_image = log_rapsd_profiles(generated, channel=s.spectral_channel).cpu()
    real_profile = log_rapsd_profile(real, channel=s.spectral_channel).cpu()
    reps["log_rapsd_l1"] = [float((per_image[i].mean(0) - real_profile).abs().mean())
                            for i in index]
    z = statistics.NormalDist().inv_cdf(0.5 + s.confidence / 2)
    metrics = {}
    for k, r in reps.items():
        se = statistics.stdev(r) if len(r) > 1 else 0.0
        metrics[k] = {"estimate": est[k], "se": se, "lo": est[k] - z * se,
                      "hi": est[k] + z * se, "replicates": r}
    return {"method": "bootstrap over generated images, normal approximation",
            "resamples": s.bootstrap, "confidence": s.confidence, "seed": s.seed,
            "n_generated": int(generated.shape[0]), "metrics": metrics}


def summary_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one result (one table row)."""
    row: dict[str, Any] = {"swd_x1e3": metrics["swd"]["mean"],
                           "log_rapsd_l1": metrics["spectral"]["log_rapsd_l1"],
                           "slope_diff": metrics["spectral"]["slope_difference"]}
    if "hf_outliers" in metrics:  # results made before the metric existed lack it
        row["hf_outliers"] = metrics["hf_outliers"]["fraction"]
    if "fd_prism" in metrics:
        fp = metrics["fd_prism"]
        row.update({fp["name"]: fp["fd"], "kid_prism_x1e3": 1e3 * fp["kid"]["mean"],
                    "precision": fp["precision"], "recall": fp["recall"]})
    if "fid" in metrics:
        row.update({"FID": metrics["fid"]["fd"], "kid_inception_x1e3":
                    1e3 * metrics["fid"]["kid"]["mean"]})
    if "memorization" in metrics:
        row["memorized"] = metrics["memorization"]["fraction_memorized"]
    for k, v in metrics.get("intervals", {}).get("metrics", {}).items():
        row[f"{k}_se"] = v["se"]  # the interval is value +- z se (metrics.json: intervals)
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of equal or differing keys -> one Markdown table (missing cells blank)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def save_plots(out_dir: Path, generated: torch.Tensor, spectral: dict[str, Any],
               title: str = "") -> list[Path]:
    """``samples.png`` (a grid of up to 64 images) and ``rapsd.png`` (generated vs real)."""
    # deferred: matplotlib (~0.4 s to import) only for the plots
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    grid = to_uint8(image_grid(generated[:64])).numpy()
    Image.fromarray(grid).save(out_dir / "samples.png")
    f = np.arange(1, len(spectral["profile_real"]) + 1)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.loglog(f, np.exp(spectral["profile_real"]), "k-", label="real")
    ax.loglog(f, np.exp(spectral["profile_generated"]), "r--", label="generated")
    ax.set_xlabel("radial frequency (cycles / image)")
    ax.set_ylabel(f"RAPSD ({spectral['channel']}, geometric mean)")
    # the level as well as the slope: a model can match the slope with twice the power
    ratio = float(np.exp(np.mean(np.asarray(spectral["profile_generated"])
                                 - np.asarray(spectral["profile_real"]))))
    ax.set_title(f"{title}\nslope diff {spectral['slope_difference']:+.3f}, "
                 f"power generated / real {ratio:.2f}x", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "rapsd.png", dpi=100)
    plt.close(fig)
    return [out_dir / "samples.png", out_dir / "rapsd.png"]
