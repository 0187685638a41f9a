"""S5: the resolution chromatogram against a trained model (Hwang, Park & Jo).

The claim (SCIENCE.md section 2): the level-k view (mean-downsampled by 2^k) of a process with
log-SNR ``lambda(t)`` has signal fraction ``a_k(t) = sigmoid(lambda(t) + k ln 4)``, so the
coarse levels are generated first and each octave is ``ln 4`` later in log-SNR.

The measurement: noise real images to each t of a grid (one fixed eps per image), take the
trained model's x0-prediction and the energy fraction ``e_k(t) = E_k(x0_hat) / E_k(x0)`` of
each Laplacian band (box pyramid); a band *emerges* at the latest t with ``e_k >= 1/2``. Beside
it: the exact Gaussian denoiser of the images' empirical mean and covariance (the control: the
best denoiser that knows only second-order statistics), the paper's ``a_k`` and the band-SNR
prediction ``e_k = m_k + (1 - m_k) sigmoid(lambda + ln rho_k)`` (``rho_k`` the band's own SNR
at lambda = 0, ``m_k`` the share of the data mean; ``components.chromatography``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from common.models import load_model
from components.analytic import GaussianDenoiser
from components.chromatography import (
    band_prediction,
    band_snr,
    crossing_time,
    measured_chromatogram,
    paper_emergence,
    predicted_emergence,
    signal_fraction,
)
from components.generate import base_denoiser
from pipelines.experiments import spectral_schedules
from pipelines.experiments.common import (
    ExperimentSettings,
    Log,
    Timer,
    environment,
    real_images,
    status,
    train_references,
)

NAME = "chromatogram"
CLAIM = ("The paper's chromatogram says when each resolution level is generated: coarse levels "
         "first, one octave later per ln 4 in log-SNR (a_k = sigmoid(lambda + k ln 4)).")
RULE = ("explained: the band-SNR prediction is within 0.1 in t of the Gaussian control for "
        "every band, and closer than the paper's a_k to the trained model's emergence for "
        "every band; otherwise not explained")
TOLERANCE_T = 0.1


class Settings(ExperimentSettings):
    """S5's settings (``prism experiment show chromatogram``)."""

    model: str | None = None  # a model dir; None: the SiD2 reference of spectral-schedules
    reference_setting: str = "small"  # the spectral-schedules preset whose SiD2 model is used
    real_data: str | None = None  # images to noise; None: the reference's training data
    n_images: int = Field(512, ge=1)  # images noised and denoised
    covariance_images: int = Field(10000, ge=2)  # images for the Gaussian control's statistics
    levels: int = Field(4, ge=1, le=5)
    n_t: int = Field(49, ge=3)  # t grid from 0 to 1
    gaussian_control: bool = True


PRESETS: dict[str, dict[str, Any]] = {
    # CPU, a minute: the small SiD2 reference of spectral-schedules (trained there or here)
    "small": {"reference_setting": "small", "n_images": 32, "n_t": 21, "batch_size": 64},
    # one H200: the gpu SiD2 reference, CIFAR-10 test images
    "gpu": {"reference_setting": "gpu", "n_images": 512,
            "real_data": ".gpudata/cifar10-test"},
}


def reference_model(s: Settings, log: Log) -> tuple[str, str | None]:
    """(model dir, its training data): ``s.model``, or the SiD2 reference of spectral-schedules
    in preset ``s.reference_setting`` (same settings, so the same hash: reused, not retrained)."""
    if s.model is not None:
        return s.model, None
    preset = spectral_schedules.PRESETS[s.reference_setting]
    ss = spectral_schedules.Settings.model_validate({
        **preset, "work_dir": s.work_dir, "device": s.device, "mlflow": s.mlflow,
        "parallel_training": s.parallel_training,
        # the SiD2 spec ignores these; set so that _data resolves only the training shards
        "spectral_stats": "unused", "schedule_model": "unused"})
    work = Path(s.work_dir) / spectral_schedules.NAME
    train, stats, schedule = spectral_schedules._data(ss, work, log)
    spec = spectral_schedules.references(ss, train, stats, schedule)["sid2"]
    refs = train_references({"sid2": spec}, ss, spectral_schedules.NAME, log)
    return refs["sid2"]["model_dir"], train


def gaussian_control(images: torch.Tensor, device: str):
    """The exact denoiser of N(empirical mean, empirical covariance) of ``images`` (float64)."""
    x = images.double().flatten(1)  # (N, d)
    mu = x.mean(0)
    xc = x - mu
    cov = xc.T @ xc / max(len(x) - 1, 1)  # (d, d)
    den = GaussianDenoiser(mu, cov, tuple(images.shape[1:]))
    den.mu, den.eigval, den.eigvec = (v.to(device) for v in (den.mu, den.eigval, den.eigvec))
    return den


def _split(src: str, s: Settings, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images to noise, images for the statistics): a seeded random split of ``src``, disjoint
    where the set is large enough (else the statistics use every image)."""
    pool, _ = real_images(src, s.n_images + s.covariance_images, s.seed, resolution=resolution)
    idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(s.seed))
    images = pool[idx[: s.n_images]]
    rest = idx[s.n_images:]
    return images, pool[rest] if len(rest) >= 2 else pool


def model_crossing(t: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Emergence of a trained network's bands: :func:`crossing_time` on ``t <= t_floor``, the t
    where ``e_k`` is smallest. Above it the x0-prediction's energy is the network's error
    amplified by ``sigma / alpha`` (an eps-prediction at high noise), not signal. Returns
    (crossing t, t_floor), each (L,)."""
    out, floor = [], []
    for k in range(e.shape[0]):
        j = int(e[k].argmin())
        floor.append(t[j].item())
        out.append(crossing_time(t[: j + 1], e[k: k + 1, : j + 1])[0].item())
    return torch.tensor(out, dtype=torch.float64), torch.tensor(floor, dtype=torch.float64)


def run(s: Settings, out: Path, log: Log = status) -> dict[str, Any]:
    """Measure the chromatogram of the model (and the Gaussian control); returns the results."""
    timer = Timer()
    device = s.resolved_device()
    with timer("reference"):
        model_dir, train = reference_model(s, log)
    model = load_model(model_dir, device)
    if model.num_classes or model.n_cond != 1:
        raise ValueError(f"{model_dir}: the chromatogram needs an unconditional model with a "
                         f"global schedule (classes {model.num_classes}, n_cond {model.n_cond})")
    src = s.real_data or train
    if src is None:
        raise ValueError("real_data is required when model is given")
    schedule = model.schedule
    t_grid = torch.linspace(0.0, 1.0, s.n_t, dtype=torch.float64)
    images, stats_images = _split(src, s, model.resolution)
    stats = band_snr(stats_images, s.levels)
    rho, m = ([round(v, 4) for v in stats[k].tolist()] for k in ("rho", "m"))
    log(f"chromatogram of {model_dir} on {len(images)} images of {src}; band SNR rho {rho}, "
        f"m {m}")
    measured: dict[str, dict[str, torch.Tensor]] = {}
    with timer("model"):
        measured["model"] = _measure(base_denoiser(model), images, t_grid, schedule, s, device)
    raw = measured["model"]["emergence_interp"]
    measured["model"]["emergence_interp"], floor_t = model_crossing(
        t_grid, measured["model"]["energy_fraction"])
    if s.gaussian_control:
        with timer("gaussian"):
            den = gaussian_control(stats_images, device)
            measured["gaussian"] = _measure(den, images, t_grid, schedule, s, device)
    predicted = {"paper": paper_emergence(schedule, s.levels),
                 "band_prediction": predicted_emergence(schedule, stats)}
    rows = _rows(s.levels, schedule, predicted, measured, stats)
    for r, raw_t, f_t in zip(rows, raw.tolist(), floor_t.tolist(), strict=True):
        r["model_measured_raw_t"], r["model_error_floor_t"] = raw_t, f_t
    results = {
        "experiment": NAME, "claim": CLAIM, "settings": s.model_dump(mode="json"),
        "model": model_dir, "real_data": src, "n_images": len(images),
        "n_stats_images": len(stats_images), "rows": rows,
        "caveats": ([f"the Gaussian control's covariance is rank-deficient: {len(stats_images)} "
                     f"images for {stats_images[0].numel()} dimensions"]
                    if len(stats_images) <= stats_images[0].numel() else []),
        "verdict": verdict(rows, s.gaussian_control), "environment": environment(),
        "seconds": timer.seconds}
    curves = {
        "t": t_grid.tolist(), "lambda": schedule.lambda_(t_grid).double().tolist(),
        "levels": s.levels, **{f"{k}_energy_fraction": v["energy_fraction"].tolist()
                               for k, v in measured.items()},
        "band_prediction": band_prediction(schedule, stats, t_grid).tolist(),
        "paper_a": signal_fraction(schedule.lambda_(t_grid).double()[None, :],
                                   torch.arange(s.levels)[:, None]).tolist(),
        "stats": {k: v.tolist() for k, v in stats.items()}}
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    results["figures"] = figures(curves, rows, out)
    for r in rows:
        log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
    log(f"verdict: {results['verdict']['verdict']}")
    return results


def _measure(denoiser, images: torch.Tensor, t_grid: torch.Tensor, schedule, s: Settings,
             device: str) -> dict[str, torch.Tensor]:
    """measured_chromatogram on ``device`` (bf16 autocast of a network on CUDA), eps from
    ``s.seed``: the same images and noise for every denoiser."""
    g = torch.Generator().manual_seed(s.seed)
    net = isinstance(denoiser, torch.nn.Module)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=net and device.startswith("cuda")):
        return measured_chromatogram(denoiser, images.to(device), t_grid, schedule,
                                     levels=s.levels, generator=g)


def _rows(levels: int, schedule, predicted: dict[str, torch.Tensor],
          measured: dict[str, dict[str, torch.Tensor]], stats: dict[str, torch.Tensor]
          ) -> list[dict[str, Any]]:
    """One row per band: emergence t of each source, rho_k, m_k and the lambda of each t."""
    rows = []
    for k in range(levels):
        ts = {"paper_t": predicted["paper"][k].item(),
              "band_prediction_t": predicted["band_prediction"][k].item()}
        for src in ("gaussian", "model"):
            if src in measured:
                ts[f"{src}_measured_t"] = measured[src]["emergence_interp"][k].item()
        lam = {f"lambda_{key[:-2]}": _lam(schedule, v) for key, v in ts.items()}
        rows.append({"tag": f"band{k}", "band": k, **ts, "rho": stats["rho"][k].item(),
                     "m": stats["m"][k].item(), "ln_rho": math.log(stats["rho"][k].item()),
                     **lam})
    return rows


def _lam(schedule, t: float) -> float:
    return float("nan") if math.isnan(t) else float(schedule.lambda_(torch.tensor(
        t, dtype=torch.float64)))


def verdict(rows: list[dict[str, Any]], with_control: bool = True) -> dict[str, Any]:
    """The rule, fixed before measuring (``RULE``)."""
    if not with_control:
        return {"verdict": "inconclusive", "rule": RULE,
                "reason": "no Gaussian control (gaussian_control=false)"}
    near_control = [abs(r["band_prediction_t"] - r["gaussian_measured_t"]) <= TOLERANCE_T
                    for r in rows]
    closer = [abs(r["band_prediction_t"] - r["model_measured_t"])
              < abs(r["paper_t"] - r["model_measured_t"]) for r in rows]
    ok = all(near_control) and all(closer)  # NaN compares False: not explained
    return {"verdict": "explained" if ok else "not explained", "rule": RULE,
            "within_tolerance_of_control": near_control, "closer_than_paper_to_model": closer}


def figures(curves: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> list[str]:
    """chromatogram.png (e_k(t): measured, band prediction, paper a_k) and emergence.png."""
    # deferred: matplotlib (~0.4 s to import) only for the figures, not for `experiment list`
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, levels = curves["t"], curves["levels"]
    colors = plt.cm.viridis([0.9 * k / max(levels - 1, 1) for k in range(levels)])
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for k in range(levels):
        c = colors[k]
        if "model_energy_fraction" in curves:
            ax.plot(t, curves["model_energy_fraction"][k], "o", mfc="none", color=c, ms=5,
                    label=f"band {k}: model" if k == 0 else None)
        if "gaussian_energy_fraction" in curves:
            ax.plot(t, curves["gaussian_energy_fraction"][k], "s", mfc="none", color=c, ms=4,
                    label="Gaussian control" if k == 0 else None)
        ax.plot(t, curves["band_prediction"][k], "-", color=c, lw=2,
                label=f"band {k}: band-SNR prediction")
        ax.plot(t, curves["paper_a"][k], "--", color=c, lw=1.2,
                label="paper $a_k$" if k == 0 else None)
    ax.axhline(0.5, color="0.6", ls=":", lw=1)
    ax.set(xlim=(1.0, 0.0), ylim=(-0.02, 1.2), xlabel="t  (generation runs 1 \u2192 0)",
           ylabel="energy fraction $e_k(t)$ of band k in the x0-prediction",
           title="chromatogram: model (o), Gaussian (\u25a1), band SNR (\u2014), paper (--)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "chromatogram.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    k = [r["band"] for r in rows]
    for key, marker, label in (("paper_t", "x--", "paper $a_k = 1/2$"),
                               ("band_prediction_t", "D-", "band-SNR prediction"),
                               ("gaussian_measured_t", "s:", "Gaussian control (measured)"),
                               ("model_measured_t", "o-", "trained model (measured)")):
        if key in rows[0]:
            ax.plot(k, [r[key] for r in rows], marker, label=label)
    ax.set(xlabel="band k (1/2^k resolution)", ylabel="emergence t (e_k = 1/2)", ylim=(0, 1.02))
    ax.set_xticks(k)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "emergence.png", dpi=120)
    plt.close(fig)
    return ["chromatogram.png", "emergence.png", "curves.json"]
