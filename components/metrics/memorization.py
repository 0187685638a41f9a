"""Nearest-training-image memorisation check.

For each generated image x, with d1 and d2 the distances to its nearest and second-nearest
training images (in pixel space, or any feature space), the ratio ``d1 / d2`` is small when x
is a near copy of one training image rather than a point between many. An image counts as
memorised when ``d1 / d2 < threshold`` (1/3 following Yoon et al. 2023, "Diffusion
probabilistic models generalize when they fail to memorize"). The training set is scanned in
blocks, keeping a running top-2, so it need not fit in memory twice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from components.metrics.prd import _pairwise


def nearest_two(queries: Tensor, train: Tensor, block: int = 4096) -> tuple[Tensor, Tensor]:
    """Distances (Q, 2) to the two nearest training points and their indices (Q, 2)."""
    q = queries.reshape(queries.shape[0], -1)
    best_d = torch.full((q.shape[0], 2), float("inf"), dtype=torch.float64, device=q.device)
    best_i = torch.full((q.shape[0], 2), -1, dtype=torch.long, device=q.device)
    for s in range(0, train.shape[0], block):
        t = train[s : s + block].reshape(-1, q.shape[1]).to(q.device)
        d = _pairwise(q, t)  # (Q, b)
        kk = min(2, d.shape[1])
        dv, di = d.topk(kk, dim=1, largest=False)
        cand_d = torch.cat([best_d, dv], 1)
        cand_i = torch.cat([best_i, di + s], 1)
        order = cand_d.argsort(dim=1)[:, :2]
        best_d, best_i = cand_d.gather(1, order), cand_i.gather(1, order)
    return best_d, best_i


def memorization(generated: Tensor, train: Tensor, *, threshold: float = 1 / 3,
                 block: int = 4096) -> dict[str, object]:
    """Ratio d1/d2 per generated image and the fraction below ``threshold``.

    generated (N, ...) and train (M, ...) must have the same per-item shape, M >= 2.
    """
    if train.shape[0] < 2:
        raise ValueError(f"memorisation needs at least 2 training items, got {train.shape[0]}")
    if generated.shape[1:] != train.shape[1:]:
        raise ValueError(f"shapes differ: generated {tuple(generated.shape[1:])} vs train "
                         f"{tuple(train.shape[1:])}")
    d, idx = nearest_two(generated, train, block)
    ratio = d[:, 0] / d[:, 1].clamp_min(1e-12)
    flagged = ratio < threshold
    return {
        "fraction_memorized": flagged.double().mean().item(),
        "ratio_mean": ratio.mean().item(),
        "ratio_min": ratio.min().item(),
        "threshold": threshold,
        "flagged_indices": flagged.nonzero().flatten().tolist()[:100],
        "nearest_index": idx[:, 0].tolist(),
        "ratio": ratio.tolist(),
    }
