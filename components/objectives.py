"""The standard diffusion training objective (a loss callable, EDM style).

``objective(net, batch) -> (loss, logs)`` with ``batch = {"images": (B, C, H, W) in [-1, 1],
"labels": (B,) long or None, "lambda_bounds": (B, 2) or None}``. Randomness comes from torch's
global RNG: the training loop seeds it per step, which makes resume exact.

One step of the objective (SCIENCE.md section 1):

    t ~ U(0, 1),  lambda = lambda(t)            (global schedule, or the image's own schedule)
    eps ~ N(0, I),  x_t = alpha x0 + sigma eps
    loss = mean_b  w(lambda_b) * mean_chw (F(x_t, c_noise, y) - target)^2

where ``target`` is eps, x0 or v, ``c_noise`` the network's noise conditioning
(``components.diffusion.noise_conditioning``) and ``w`` the weighting (uniform, min-SNR, sigmoid).

Per-instance (spectral) schedules (SCIENCE.md section 4): the batch carries each image's
spectral parameters ``spectral_params`` (B, 4) = (log_A, beta, lambda_min, lambda_max)
(``components.spectral_schedules``); t ~ U(0, 1) goes through the image's own schedule
(``spectral_lambda``, kind frequency / power / mixed), so lambda stays within the image's
bounds, and the network sees ``(lambda(t), lambda(0), lambda(1)) / 15`` (``n_cond = 3``).
With only ``lambda_bounds`` (B, 2) in the batch, kinds ``cosine`` / ``linear`` place the SiD2
cosine (or a linear-in-lambda) schedule exactly between the bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from components.diffusion import (
    Cond,
    check_prediction,
    noise_conditioning,
    q_sample,
    v_target,
)
from components.schedules import Schedule, min_snr_weight, sigmoid_weight
from components.spectral_schedules import lambda_bounds, spectral_lambda

Weighting = Literal["uniform", "min_snr", "sigmoid"]
PerInstance = Literal["frequency", "power", "mixed", "cosine", "linear"]
WEIGHTINGS: tuple[str, ...] = ("uniform", "min_snr", "sigmoid")
SPECTRAL_KINDS: tuple[str, ...] = ("frequency", "power", "mixed")  # need spectral_params
PER_INSTANCE_KINDS: tuple[str, ...] = (*SPECTRAL_KINDS, "cosine", "linear")


def bounded_lambda(t: Tensor, bounds: Tensor, kind: str = "cosine",
                   check: bool = True) -> Tensor:
    """Each image's own schedule at its own t, within its bounds.

    t: (B,) in [0, 1]; bounds: (B, 2) = (lambda(0), lambda(1)) = (lambda_max, lambda_min).
    cosine: ``lambda(t) = -2 log tan(u_0 + t (u_1 - u_0))``, ``u_i = atan(exp(-lambda_i / 2))``
    (the SiD2 cosine clipped to the image's bounds); linear: linear in lambda.
    Returns (B,) float32 with ``lambda_min <= lambda <= lambda_max`` exactly. ``check=False``
    skips reading the bounds (checked on the host already: no device sync).
    """
    b = bounds.to(torch.float64)
    lam0, lam1 = b[:, 0], b[:, 1]  # lambda(0) = lambda_max > lambda(1) = lambda_min
    if check and not bool((lam0 > lam1).all()):
        raise ValueError("lambda_bounds must be (lambda(0), lambda(1)) with lambda(0) > lambda(1)")
    t64 = t.to(torch.float64)
    if kind == "cosine":
        u0, u1 = torch.atan(torch.exp(-0.5 * lam0)), torch.atan(torch.exp(-0.5 * lam1))
        lam = -2.0 * torch.log(torch.tan(u0 + t64 * (u1 - u0)))
    elif kind == "linear":
        lam = lam0 + t64 * (lam1 - lam0)
    else:
        raise ValueError(f"unknown bounded schedule {kind!r}: expected cosine or linear")
    return torch.minimum(torch.maximum(lam, lam1), lam0).to(torch.float32)


def loss_weight(lam: Tensor, weighting: str, prediction: str, gamma: float = 5.0,
                bias: float = 0.0) -> Tensor:
    """Per-image weight (B,) of the squared error of ``prediction``.

    min_snr: Min-SNR-gamma for the loss on ``prediction``. sigmoid: SiD2's
    ``sigmoid(b - lambda)`` is defined on the eps loss; an x0 error is ``SNR``-times smaller
    in eps units and a v error ``alpha^2 = sigmoid(lambda)`` times, so the weight carries that
    factor (``||eps err||^2 = SNR ||x0 err||^2 = alpha^2 ||v err||^2`` at fixed x_t).
    """
    lam = lam.to(torch.float32)
    if weighting == "uniform":
        return torch.ones_like(lam)
    if weighting == "min_snr":
        return min_snr_weight(lam, gamma, prediction)
    if weighting == "sigmoid":
        w_eps = sigmoid_weight(lam, bias)
        if prediction == "eps":
            return w_eps
        if prediction == "x0":
            return w_eps * torch.exp(lam)  # sigmoid(b - lam) e^lam <= e^b: no overflow
        return w_eps * torch.sigmoid(lam)
    raise ValueError(f"unknown loss weighting {weighting!r}: expected one of {WEIGHTINGS}")


@dataclass
class DiffusionObjective:
    """Denoising loss on eps, x0 or v with a global or per-instance noise schedule.

    schedule: the global schedule ``lambda(t)``; None with ``per_instance`` set.
    per_instance: ``frequency`` / ``power`` / ``mixed`` (the image's spectral schedule from
        ``batch["spectral_params"]``) or ``cosine`` / ``linear`` (between
        ``batch["lambda_bounds"]``); needs ``n_cond = 3``.
    label_dropout: probability of replacing a label by the null class ``-1`` (CFG training).
    """

    schedule: Schedule | None = None
    prediction: str = "eps"
    weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    sigmoid_bias: float = 0.0
    n_cond: int = 1
    label_dropout: float = 0.0
    per_instance: str | None = None
    name: str = "diffusion"

    def __post_init__(self) -> None:
        check_prediction(self.prediction)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.weighting!r}: "
                             f"expected one of {WEIGHTINGS}")
        if (self.schedule is None) == (self.per_instance is None):
            raise ValueError("DiffusionObjective: give exactly one of schedule or per_instance")
        if self.per_instance is not None and self.per_instance not in PER_INSTANCE_KINDS:
            raise ValueError(f"unknown per-instance schedule {self.per_instance!r}: expected "
                             f"one of {PER_INSTANCE_KINDS}")
        if self.per_instance is not None and self.n_cond != 3:
            raise ValueError("per-instance schedules condition the network on (lambda(t), "
                             "lambda(0), lambda(1)): n_cond must be 3")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")

    def sample_lambda(self, batch: dict[str, Any], n: int,
                      device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Draw t ~ U(0, 1) per image; return lambda (B,) float32 and the per-image
        ``lambda_bounds`` (B, 2) of per-instance schedules (else the batch's, or None)."""
        t = torch.rand(n, device=device, dtype=torch.float32)
        if self.per_instance is None:
            lam = self.schedule.lambda_(t.to(torch.float64)).to(torch.float32)
            return lam, batch.get("lambda_bounds")
        if self.per_instance in SPECTRAL_KINDS:
            params = batch.get("spectral_params")
            if params is None:
                raise ValueError(f"per-instance schedule {self.per_instance!r}: the batch has no "
                                 "'spectral_params' (join the spectral statistics in the data "
                                 "config)")
            params = params.to(device, torch.float64)  # checked on the host (data.to_batch)
            lam = spectral_lambda(t, params, self.per_instance, check=False).to(torch.float32)
            return lam, lambda_bounds(params, check=False).to(torch.float32)
        bounds = batch.get("lambda_bounds")
        if bounds is None:
            raise ValueError("per-instance schedule: the batch has no 'lambda_bounds' "
                             "(join the spectral statistics in the data config)")
        bounds = bounds.to(device)  # checked on the host (data.to_batch)
        return bounded_lambda(t, bounds, self.per_instance, check=False), bounds

    def drop_labels(self, labels: Tensor | None) -> Tensor | None:
        """Replace each label by the null class -1 with probability ``label_dropout``."""
        if labels is None or self.label_dropout == 0.0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
        return torch.where(drop, torch.full_like(labels, -1), labels)

    def __call__(self, net: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        x0 = batch["images"]  # (B, C, H, W) in [-1, 1]
        n = x0.shape[0]
        lam, bounds = self.sample_lambda(batch, n, x0.device)  # (B,), (B, 2) or None
        eps = torch.randn_like(x0)
        x_t = q_sample(x0, lam, eps).to(x0.dtype)
        cond = Cond(self.drop_labels(batch.get("labels")),
                    None if bounds is None else bounds.to(x0.device, torch.float32))
        c_noise = noise_conditioning(lam, cond, self.n_cond)  # (B, n_cond)
        out = net(x_t, c_noise, cond.class_labels).float()  # (B, C, H, W)
        if self.prediction == "eps":
            target = eps
        elif self.prediction == "x0":
            target = x0
        else:
            target = v_target(x0, eps, lam).to(x0.dtype)
        err = (out - target.float()).square().mean(dim=(1, 2, 3))  # (B,)
        w = loss_weight(lam, self.weighting, self.prediction, self.min_snr_gamma,
                        self.sigmoid_bias)
        loss = (w * err).mean()
        # logs are detached 0-d tensors: the loop turns them into floats only when it logs
        return loss, {"loss": loss.detach(), "mse": err.mean().detach(),
                      "lambda_mean": lam.mean().detach()}
