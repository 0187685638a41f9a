"""The multi-scale eps loss of DiMR (SCIENCE.md section 5).

Every branch b of a multi-resolution network predicts eps at its own grid ``H / k_b``; its
target is the area-downsampled noise ``k_b D_{k_b}[eps]`` (``D_m`` = mean over m x m blocks,
variance ``1/m^2`` for white noise, so ``m D_m[eps]`` has unit variance):

    L = sum_b c_b  mean || eps_b(x_t) - k_b D_{k_b}[eps] ||^2,

``c = [1/4, 1]`` for two branches, ``[1/16, 1/4, 1]`` for three (``c_b = (k_b / k_last)^-2``
in general). ``D_m`` is ``F.avg_pool2d(x, m)`` (the same operator as
``components.scale.downsample_mean``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.diffusion import Cond, NetworkDenoiser, noise_conditioning, q_sample
from components.objectives import DiffusionObjective
from components.schedules import Schedule, build_schedule


def multiscale_targets(eps: Tensor, factors: Sequence[int]) -> list[Tensor]:
    """``[k D_k[eps] for k in factors]``: unit-variance noise targets at each branch's grid."""
    out = []
    for k in factors:
        if eps.shape[-1] % k or eps.shape[-2] % k:
            raise ValueError(f"image size {tuple(eps.shape[-2:])} is not divisible by {k}")
        out.append(eps if k == 1 else k * F.avg_pool2d(eps, k))
    return out


def default_coefficients(n_branches: int) -> list[float]:
    """``[1/4, 1]`` (2 branches), ``[1/16, 1/4, 1]`` (3): ``c_b = 4^-(n - 1 - b)``."""
    return [4.0 ** -(n_branches - 1 - b) for b in range(n_branches)]


def _backbone(net: nn.Module) -> nn.Module:
    """The multi-resolution backbone (unwraps a NetworkDenoiser; keeps DDP/compile wrappers)."""
    return net.net if isinstance(net, NetworkDenoiser) else net


class MultiScaleObjective:
    """``objective(net, batch) -> (loss, logs)`` for eps-predicting multi-resolution networks.

    schedule: the global training schedule (a ``Schedule``, or a ``build_schedule`` name with
        ``schedule_kwargs``, so that ``training`` can build it from JSON options);
        ``t ~ U(0, 1)``, ``lambda = schedule.lambda_(t)``.
    coefficients: ``c_b`` per branch, coarse to fine (default :func:`default_coefficients`).
    label_dropout: probability of replacing a label by the null class ``-1`` (CFG training).
    n_cond, per_instance: as ``components.objectives.DiffusionObjective`` (per-image spectral
        schedules need ``n_cond = 3``); lambda sampling and label dropout are delegated to it.
    The network is called as ``net(x_t, c_noise, labels, return_all=True)`` (list of eps, coarse
    to fine); the branch factors ``k_b`` are read from the outputs' sizes.
    """

    def __init__(
        self,
        schedule: Schedule | str | None = "cosine",
        coefficients: Sequence[float] | None = None,
        label_dropout: float = 0.0,
        n_cond: int = 1,
        per_instance: str | None = None,
        schedule_kwargs: dict[str, float] | None = None,
    ) -> None:
        if coefficients is not None and (
                not len(coefficients) or any(not c >= 0 for c in coefficients)):
            raise ValueError(f"coefficients must be a non-empty list of numbers >= 0, "
                             f"got {coefficients}")
        if isinstance(schedule, str):
            schedule = build_schedule(schedule, **dict(schedule_kwargs or {}))
        self.coefficients = None if coefficients is None else [float(c) for c in coefficients]
        self.base = DiffusionObjective(
            schedule=None if per_instance else schedule, prediction="eps", n_cond=n_cond,
            label_dropout=label_dropout, per_instance=per_instance, name="dimr_multiscale")

    def __call__(self, net: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        x0 = batch["images"]  # (B, C, H, W) in [-1, 1]
        lam, bounds = self.base.sample_lambda(batch, x0.shape[0], x0.device)  # (B,), (B, 2)?
        eps = torch.randn_like(x0)
        x_t = q_sample(x0, lam, eps).to(x0.dtype)
        cond = Cond(self.base.drop_labels(batch.get("labels")),
                    None if bounds is None else bounds.to(x0.device, torch.float32))
        c_noise = noise_conditioning(lam, cond, self.base.n_cond)  # (B, n_cond)
        preds = _backbone(net)(x_t, c_noise, cond.class_labels, return_all=True)
        coeffs = self.coefficients or default_coefficients(len(preds))
        if len(coeffs) != len(preds):
            raise ValueError(f"{len(coeffs)} loss coefficients for {len(preds)} branches")
        targets = multiscale_targets(eps, [x0.shape[-1] // p.shape[-1] for p in preds])
        loss = x0.new_zeros((), dtype=torch.float32)
        logs: dict[str, Tensor] = {}
        for b, (pred, target, c_b) in enumerate(zip(preds, targets, coeffs, strict=True)):
            mse = F.mse_loss(pred.float(), target.float())  # mean over (B, C, g_b, g_b)
            loss = loss + c_b * mse
            logs[f"mse_branch{b}"] = mse.detach()
        # detached 0-d tensors, as components.objectives: the loop makes floats when it logs
        logs["loss"] = loss.detach()
        logs["lambda_mean"] = lam.mean().detach()
        return loss, logs
