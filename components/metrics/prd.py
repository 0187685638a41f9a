"""Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

Each set's manifold is the union of balls around its points, of radius the distance to the
point's k-th nearest neighbour in its own set (self excluded). Precision is the fraction of
generated points inside the real manifold; recall the fraction of real points inside the
generated manifold. Distances are Euclidean, computed in blocks (memory O(block * N)).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _pairwise(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances a (n, D), b (m, D) -> (n, m), float64 accumulation."""
    a, b = a.double(), b.double()
    d2 = a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None]
    return d2.clamp_min(0).sqrt()


def knn_radii(features: Tensor, k: int = 3, block: int = 2048) -> Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set (self excluded)."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    out = []
    for s in range(0, n, block):
        d = _pairwise(features[s : s + block], features)  # (b, n), self distance 0 first
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def _coverage(queries: Tensor, points: Tensor, radii: Tensor, block: int) -> float:
    """Fraction of queries within radii[j] of some points[j]."""
    inside = 0
    for s in range(0, queries.shape[0], block):
        d = _pairwise(queries[s : s + block], points)  # (b, m)
        inside += int((d <= radii[None]).any(1).sum())
    return inside / queries.shape[0]


def precision_recall(real: Tensor, generated: Tensor, *, k: int = 3,
                     block: int = 2048) -> dict[str, float]:
    """Improved precision and recall of ``generated`` (M, D) against ``real`` (N, D)."""
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D: {tuple(real.shape)} vs "
                         f"{tuple(generated.shape)}")
    r_real = knn_radii(real, k, block)
    r_gen = knn_radii(generated, k, block)
    return {"precision": _coverage(generated, real, r_real, block),
            "recall": _coverage(real, generated, r_gen, block), "k": k}
