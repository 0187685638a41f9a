"""Kernel Inception Distance (Binkowski et al. 2018) in any feature space.

Unbiased estimate of the squared MMD with the cubic polynomial kernel
``k(x, y) = (x . y / D + 1)^3``, over random subsets of size m from each set:

``MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
            - 2 sum_{i, j} k(x_i, y_j) / m^2``

Reported as the mean and standard deviation over subsets. Unbiased: two samples of one
distribution give 0 in expectation (single estimates may be slightly negative).
"""

from __future__ import annotations

import torch
from torch import Tensor


def polynomial_kernel(x: Tensor, y: Tensor, degree: int = 3, coef0: float = 1.0) -> Tensor:
    """``(x y^T / D + coef0)^degree``: x (n, D), y (m, D) -> (n, m)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 between x (m, D) and y (n, D) with the cubic kernel (float64)."""
    x, y = x.double(), y.double()
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least 2 samples per set, got {m} and {n}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kid(features1: Tensor, features2: Tensor, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> dict[str, float]:
    """KID mean and std over ``subsets`` random subsets of size min(subset_size, N1, N2)."""
    if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D: {tuple(features1.shape)} vs "
                         f"{tuple(features2.shape)}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(subset_size, features1.shape[0], features2.shape[0])
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        i = torch.randperm(features1.shape[0], generator=gen)[:m].to(features1.device)
        j = torch.randperm(features2.shape[0], generator=gen)[:m].to(features2.device)
        vals.append(mmd2_unbiased(features1[i], features2[j]))
    t = torch.tensor(vals, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std().item() if subsets > 1 else 0.0,
            "subset_size": m, "subsets": subsets}
