"""Frechet distance between Gaussians fitted to two feature sets (FID's formula).

``FD = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2})``

The trace term uses ``tr((S_1 S_2)^{1/2}) = tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2})``: the
product ``S_1^{1/2} S_2 S_1^{1/2}`` is symmetric positive semi-definite, so both square roots
come from symmetric eigendecompositions (``eigh``), with negative round-off eigenvalues
clamped to 0. Everything is float64; no complex parts, no iterative sqrtm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GaussianStats:
    """Mean (D,) and unbiased covariance (D, D) of a feature set, float64, with its size."""

    mu: Tensor
    sigma: Tensor
    n: int


def feature_stats(features: Tensor) -> GaussianStats:
    """Fit a Gaussian to features (N, D): mean and covariance with 1/(N-1), in float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got {tuple(features.shape)}")
    f = features.double()
    mu = f.mean(0)
    c = f - mu
    sigma = c.T @ c / (f.shape[0] - 1)
    return GaussianStats(mu=mu, sigma=sigma, n=f.shape[0])


def _sqrt_psd(m: Tensor) -> Tensor:
    """Symmetric PSD square root by eigendecomposition, m (D, D) float64."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def trace_sqrt_product(sigma1: Tensor, sigma2: Tensor) -> Tensor:
    """``tr((S_1 S_2)^{1/2})`` for symmetric PSD S_1, S_2 (float64 scalar tensor)."""
    s1 = _sqrt_psd(sigma1.double())
    m = s1 @ sigma2.double() @ s1  # symmetric PSD, same spectrum as S_1 S_2
    w = torch.linalg.eigvalsh((m + m.T) / 2)
    return w.clamp_min(0).sqrt().sum()


def frechet_distance_from_stats(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """FD between N(mu1, sigma1) and N(mu2, sigma2) (see the module doc)."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}")
    if sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"sigma must be (D, D) for mu (D,): {tuple(sigma1.shape)}")
    mu1, mu2 = mu1.double(), mu2.double()
    diff = (mu1 - mu2).square().sum()
    tr = sigma1.double().trace() + sigma2.double().trace()
    return float(diff + tr - 2 * trace_sqrt_product(sigma1, sigma2))


def frechet_distance(features1: Tensor, features2: Tensor) -> float:
    """FD between the Gaussians fitted to two feature sets (N1, D) and (N2, D)."""
    a, b = feature_stats(features1), feature_stats(features2)
    return frechet_distance_from_stats(a.mu, a.sigma, b.mu, b.sigma)
