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

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.diffusion import Cond, NetworkDenoiser, noise_conditioning, q_sample
from components.schedules import Schedule


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

    schedule: the global training schedule; ``t ~ U(0, 1)``, ``lambda = schedule.lambda_(t)``.
    coefficients: ``c_b`` per branch, coarse to fine (default :func:`default_coefficients`).
    label_dropout: probability of replacing a label by the null class ``-1`` (classifier-free
        guidance); 0 if the training loop drops labels itself.
    n_cond: the network's noise-conditioning width (1, or 3 for spectral schedules). With a
        batch's ``lambda_bounds`` (B, 2) = (lambda(0), lambda(1)) the noise level of each image
        is ``lambda(0) + t (lambda(1) - lambda(0))`` (linear in lambda between its bounds), or
        ``sample_lambda(t, lambda_bounds)`` if given.
    The network is called as ``net(x_t, c_noise, labels, return_all=True)`` (list of eps, coarse
    to fine); the branch factors ``k_b`` are read from the outputs' sizes.
    """

    def __init__(
        self,
        schedule: Schedule,
        coefficients: Sequence[float] | None = None,
        label_dropout: float = 0.0,
        n_cond: int = 1,
        sample_lambda: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        if coefficients is not None and (
                not len(coefficients) or any(not c >= 0 for c in coefficients)):
            raise ValueError(f"coefficients must be a non-empty list of numbers >= 0, "
                             f"got {coefficients}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        if n_cond not in (1, 3):
            raise ValueError(f"n_cond must be 1 or 3, got {n_cond}")
        self.schedule, self.label_dropout, self.n_cond = schedule, label_dropout, n_cond
        self.coefficients = None if coefficients is None else [float(c) for c in coefficients]
        self.sample_lambda = sample_lambda

    def _lambda(self, t: Tensor, bounds: Tensor | None) -> Tensor:
        if bounds is None:
            return self.schedule.lambda_(t).float()
        if self.sample_lambda is not None:
            return self.sample_lambda(t, bounds).float()
        lam0, lam1 = bounds[:, 0].float(), bounds[:, 1].float()
        return lam0 + t * (lam1 - lam0)

    def __call__(self, net: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        x0 = batch["images"]
        labels, bounds = batch.get("labels"), batch.get("lambda_bounds")
        B = x0.shape[0]
        if self.n_cond == 3 and bounds is None:
            raise ValueError("n_cond=3 needs batch['lambda_bounds'] (spectral schedules)")
        t = torch.rand(B, device=x0.device)  # t ~ U(0, 1), global RNG (exact resume)
        lam = self._lambda(t, bounds if self.n_cond == 3 or self.sample_lambda else None)
        eps = torch.randn_like(x0)
        x_t = q_sample(x0, lam, eps).to(x0.dtype)
        if labels is not None and self.label_dropout > 0:
            drop = torch.rand(B, device=x0.device) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, -1), labels)
        c_noise = noise_conditioning(lam, Cond(labels, bounds), self.n_cond)
        preds = _backbone(net)(x_t, c_noise, labels, return_all=True)
        coeffs = self.coefficients or default_coefficients(len(preds))
        if len(coeffs) != len(preds):
            raise ValueError(f"{len(coeffs)} loss coefficients for {len(preds)} branches")
        factors = [x0.shape[-1] // p.shape[-1] for p in preds]
        targets = multiscale_targets(eps, factors)
        loss = x0.new_zeros(())
        logs: dict[str, float] = {}
        for b, (pred, target, c_b) in enumerate(zip(preds, targets, coeffs, strict=True)):
            mse = F.mse_loss(pred.float(), target.float())  # mean over (B, C, g, g)
            loss = loss + c_b * mse
            logs[f"loss_branch{b}"] = float(mse.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs

