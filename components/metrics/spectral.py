"""Spectral agreement between generated and real images: log-RAPSD distance and slope difference.

Spectra come from :mod:`components.spectra` (orthonormal DFT, integer radial bins, DC
excluded), computed on Rec.601 luminance by default (the shared CIFAR-10 files are JPEG q75:
their chroma spectra are damaged, their luminance spectra are not; see the data README).

For each set, the *log-RAPSD profile* is the mean over images of ``log S_i(f)`` (a geometric
mean of the spectra, robust to a few very bright images). With
``d(f) = logS_gen(f) - logS_real(f)`` (natural logs):

- ``log_rapsd_l1``   = mean_f |d(f)|   (the headline number; 0 for identical spectra)
- ``log_rapsd_rms``  = sqrt(mean_f d(f)^2)
- ``log_rapsd_per_frequency`` = d(f) for f = 1 .. n_bins (positive: too much power)
- ``slope_difference`` = beta_gen - beta_real of the power-law fits ``S ~ A f^-beta`` to the
  two profiles (positive: generated images are too smooth).

Set-level spectra average over images, so a minority of images left noisy by a sampler hides
among smooth ones. Per image, :func:`high_frequency_share` is the share of its luminance power
(mean removed) above ``cutoff`` cycles per pixel; :func:`high_frequency_outliers` is the
fraction of generated images whose share exceeds the real set's ``quantile`` (real against
real: about ``1 - quantile``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from components.spectra import POWER_FLOOR, luminance, power_half, power_law_fit, rapsd
from components.spectral_bins import high_band_matrix


def log_rapsd_profiles(images: Tensor, *, channel: str = "luminance",
                       batch_size: int = 1024) -> Tensor:
    """Log-RAPSD of each image (N, C, H, W) in [-1, 1] -> (N, n_bins) float64.

    channel: ``"luminance"`` (RGB only) or ``"mean"`` (mean of the per-channel log spectra).
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch, "
                         f"got {tuple(images.shape)}")
    if channel not in ("luminance", "mean"):
        raise ValueError(f"channel must be 'luminance' or 'mean', got {channel!r}")
    parts = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].double()
        planes = luminance(x) if channel == "luminance" else x  # (B, H, W) or (B, C, H, W)
        logs = torch.log(rapsd(planes).clamp_min(POWER_FLOOR))
        parts.append(logs if channel == "luminance" else logs.mean(1))
    return torch.cat(parts)


def log_rapsd_profile(images: Tensor, *, channel: str = "luminance",
                      batch_size: int = 1024) -> Tensor:
    """Mean log-RAPSD of images (N, C, H, W) in [-1, 1] -> (n_bins,) float64 (the mean of
    ``log_rapsd_profiles``)."""
    return log_rapsd_profiles(images, channel=channel, batch_size=batch_size).mean(0)


def spectral_distance(generated: Tensor, real: Tensor, *, channel: str = "luminance",
                      fit_f_lo: int = 1, fit_f_hi: int | None = None) -> dict[str, object]:
    """Log-RAPSD distance and slope difference between two image sets (see the module doc).

    Both sets must have the same spatial size. Returns floats and the per-frequency list.
    """
    if generated.shape[-2:] != real.shape[-2:]:
        raise ValueError(f"spatial sizes differ: {tuple(generated.shape[-2:])} vs "
                         f"{tuple(real.shape[-2:])}")
    pg = log_rapsd_profile(generated, channel=channel).cpu()
    pr = log_rapsd_profile(real, channel=channel).cpu()
    d = pg - pr  # (n_bins,)
    # power_law_fit takes linear spectra: exp of the geometric-mean profile
    _, beta_g, _ = power_law_fit(torch.exp(pg), fit_f_lo, fit_f_hi)
    _, beta_r, _ = power_law_fit(torch.exp(pr), fit_f_lo, fit_f_hi)
    return {
        "log_rapsd_l1": d.abs().mean().item(),
        "log_rapsd_rms": d.square().mean().sqrt().item(),
        "log_rapsd_per_frequency": d.tolist(),
        "slope_generated": float(beta_g),
        "slope_real": float(beta_r),
        "slope_difference": float(beta_g - beta_r),
        "profile_generated": pg.tolist(),
        "profile_real": pr.tolist(),
        "channel": channel,
    }


def high_frequency_share(images: Tensor, *, cutoff: float = 0.375,
                         batch_size: int = 1024) -> Tensor:
    """Each image's share of its luminance power above ``cutoff`` cycles per pixel (radial
    frequency of the DFT grid; DC, the image mean, left out): (N, C, H, W) in [-1, 1] -> (N,)
    float64 in [0, 1]. A flat image has share 0."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch, "
                         f"got {tuple(images.shape)}")
    if not 0 < cutoff < 0.5 * 2**0.5:
        raise ValueError(f"cutoff must lie in (0, 0.707) cycles per pixel, got {cutoff}")
    h, w = images.shape[-2:]
    band = torch.as_tensor(high_band_matrix(h, w, cutoff), dtype=torch.float64,
                           device=images.device)
    parts = []
    for start in range(0, images.shape[0], batch_size):
        # the orthonormal half-spectrum of components.spectra; DC left out of both sums
        total, above = (power_half(luminance(images[start : start + batch_size].double()))
                        @ band).unbind(-1)
        parts.append(torch.where(total > 0, above / total.clamp_min(1e-300),
                                 torch.zeros_like(total)))
    return torch.cat(parts).cpu()


def high_frequency_outliers(generated: Tensor, real: Tensor, *, cutoff: float = 0.375,
                            quantile: float = 0.99) -> dict[str, object]:
    """The fraction of generated images whose high-frequency share
    (:func:`high_frequency_share`) exceeds the real set's ``quantile``, with the threshold and
    both sets' median shares."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    g = high_frequency_share(generated, cutoff=cutoff)
    r = high_frequency_share(real, cutoff=cutoff)
    threshold = torch.quantile(r, quantile).item()
    return {"fraction": (g > threshold).double().mean().item(), "threshold": threshold,
            "median_generated": g.median().item(), "median_real": r.median().item(),
            "cutoff": cutoff, "quantile": quantile}
