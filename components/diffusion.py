"""Parameterisation of the variance-preserving process and the one denoiser contract.

``x_t = alpha x0 + sigma eps`` with ``alpha^2 = sigmoid(lambda)``, ``sigma^2 = sigmoid(-lambda)``.
``v = alpha eps - sigma x0`` (Salimans & Ho 2022). All eps / x0 / v conversions live here.

The denoiser contract (STYLE.md principle 1): a denoiser is called as
``D(x, lam, cond) -> prediction`` where ``x`` is (B, C, H, W) in the diffusion state space,
``lam`` is the per-image log-SNR (B,) (the time coordinate: any schedule's ``t`` is turned
into ``lambda(t)`` by the caller), and ``cond`` is a :class:`Cond`. Its attribute
``prediction`` names what it returns (``"eps"``, ``"x0"`` or ``"v"``). Samplers and guidance
wrappers talk only to this contract and convert with :func:`convert`.

A denoiser whose output size differs from its input's (the Flexi-UNet of Scale Space
Diffusion predicts the clean image at r(t-1) from a state at r(t)) reads that size from
``cond.out_resolution``: the output size is part of what the step conditions on, so it
passes through every guidance wrapper that forwards ``cond``. Left None, the output has the
input's size, which is what every other denoiser and :func:`convert` assume.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from components.schedules import alpha_sigma

Prediction = Literal["eps", "x0", "v"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v")

# Network noise-conditioning coordinate: c_noise = lambda / LAMBDA_SCALE, about [-1, 1]
# for the usual schedules (lambda in [-15, 15]).
LAMBDA_SCALE = 15.0


def check_prediction(prediction: str) -> Prediction:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}: expected eps, x0 or v")
    return prediction  # type: ignore[return-value]


def _bcast(a: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-image (B,) or scalar coefficient against x (B, ...)."""
    a = torch.as_tensor(a, device=x.device, dtype=x.dtype)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


def q_sample(x0: Tensor, lam: Tensor, eps: Tensor) -> Tensor:
    """Noise x0 to log-SNR lam: ``alpha x0 + sigma eps``."""
    alpha, sigma = alpha_sigma(torch.as_tensor(lam, dtype=torch.float64))
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps


def convert(
    pred: Tensor, x: Tensor, lam: Tensor, source: Prediction, target: Prediction
) -> Tensor:
    """Convert a prediction of kind ``source`` at state ``x`` and log-SNR ``lam`` to ``target``.

    eps = (x - alpha x0) / sigma;  x0 = (x - sigma eps) / alpha;
    from v: x0 = alpha x - sigma v, eps = sigma x + alpha v.
    """
    check_prediction(source), check_prediction(target)
    if source == target:
        return pred
    alpha, sigma = alpha_sigma(torch.as_tensor(lam, dtype=torch.float64))
    a, s = _bcast(alpha, x), _bcast(sigma, x)
    if source == "eps":
        eps, x0 = pred, (x - s * pred) / a
    elif source == "x0":
        eps, x0 = (x - a * pred) / s, pred
    else:  # v
        eps, x0 = s * x + a * pred, a * x - s * pred
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    return a * eps - s * x0


def v_target(x0: Tensor, eps: Tensor, lam: Tensor) -> Tensor:
    """``v = alpha eps - sigma x0``."""
    alpha, sigma = alpha_sigma(torch.as_tensor(lam, dtype=torch.float64))
    return _bcast(alpha, x0) * eps - _bcast(sigma, x0) * x0


@dataclass(frozen=True)
class Cond:
    """What a denoiser is conditioned on besides the state and the noise level.

    class_labels: (B,) long, or None for unconditional; ``-1`` or ``num_classes`` marks the
        null class used by classifier-free guidance (networks map -1 to their null index).
    lambda_bounds: (B, 2) float: per-image ``(lambda(0), lambda(1))`` of a spectral
        schedule (SCIENCE.md section 4), or None for a global schedule.
    out_resolution: side in pixels of the prediction, for a denoiser that can change
        resolution (a Flexi-UNet in a Scale Space Diffusion chain, where a step predicts x0
        at r(t-1)); one value for the batch, since a batch is one tensor. None: the input's.
    """

    class_labels: Tensor | None = None
    lambda_bounds: Tensor | None = None
    out_resolution: int | None = None

    def with_labels(self, class_labels: Tensor | None) -> Cond:
        return replace(self, class_labels=class_labels)

    def index(self, idx: Tensor | slice) -> Cond:
        """The condition of a sub-batch."""
        return replace(
            self,
            class_labels=None if self.class_labels is None else self.class_labels[idx],
            lambda_bounds=None if self.lambda_bounds is None else self.lambda_bounds[idx],
        )

    def repeat(self, n: int) -> Cond:
        """The condition of n stacked copies of the batch (``torch.cat([x] * n)``)."""
        return replace(
            self,
            class_labels=None if self.class_labels is None else self.class_labels.repeat(n),
            lambda_bounds=None if self.lambda_bounds is None else self.lambda_bounds.repeat(n, 1),
        )


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, lam, cond) -> prediction`` with ``prediction`` in eps / x0 / v."""

    prediction: Prediction

    def __call__(self, x: Tensor, lam: Tensor, cond: Cond) -> Tensor: ...


def noise_conditioning(lam: Tensor, cond: Cond, n_cond: int) -> Tensor:
    """The network's noise-conditioning input, (B, n_cond), about [-1, 1].

    n_cond = 1: ``lambda / 15``. n_cond = 3 (spectral schedules):
    ``(lambda(t), lambda(0), lambda(1)) / 15``.
    """
    c = (lam / LAMBDA_SCALE).reshape(-1, 1)
    if n_cond == 1:
        return c
    if n_cond == 3:
        if cond.lambda_bounds is None:
            raise ValueError("this network is conditioned on (lambda(t), lambda(0), lambda(1)): "
                             "cond.lambda_bounds is required")
        bounds = cond.lambda_bounds.to(c) / LAMBDA_SCALE
        return torch.cat([c, bounds], dim=1)
    raise ValueError(f"n_cond must be 1 or 3, got {n_cond}")


class NetworkDenoiser(nn.Module):
    """Adapts a backbone ``net(x, c_noise, class_labels) -> out`` to the denoiser contract.

    The backbone never sees lambda directly, only ``c_noise`` from :func:`noise_conditioning`
    (EDM's preconditioning idea: the wrapper owns the noise-level coordinate). Where
    ``cond.out_resolution`` asks for a size other than the input's, the backbone is called
    with ``out_resolution=`` (the Flexi-UNet's keyword); only an x0 prediction can change size.
    """

    def __init__(self, net: nn.Module, prediction: Prediction, n_cond: int = 1) -> None:
        super().__init__()
        self.net = net
        self.prediction = check_prediction(prediction)
        self.n_cond = n_cond

    def forward(self, x: Tensor, lam: Tensor, cond: Cond) -> Tensor:
        lam = torch.as_tensor(lam, device=x.device, dtype=torch.float32)
        if lam.ndim == 0:
            lam = lam.expand(x.shape[0])
        c_noise = noise_conditioning(lam, cond, self.n_cond)
        r_out = cond.out_resolution
        kw = {} if r_out is None or r_out == x.shape[-1] else {"out_resolution": int(r_out)}
        if kw and self.prediction != "x0":
            raise ValueError(f"a {self.prediction} prediction cannot change resolution "
                             f"({x.shape[-1]} -> {r_out} px): only x0 is defined there")
        # the sampler's state keeps its dtype: a bf16 output under autocast comes back as x's
        return self.net(x, c_noise, cond.class_labels, **kw).to(x.dtype)


def as_prediction(
    denoiser: Denoiser, x: Tensor, lam: Tensor, cond: Cond, target: Prediction
) -> Tensor:
    """Call ``denoiser`` and convert its output to ``target``."""
    lam = torch.as_tensor(lam, device=x.device)
    if lam.ndim == 0:
        lam = lam.expand(x.shape[0])
    return convert(denoiser(x, lam, cond), x, lam, denoiser.prediction, target)


def check_image_range(x: Tensor, name: str = "image", tol: float = 1e-3) -> None:
    """Raise if ``x`` is not in [-1, 1] (the data convention)."""
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - tol or hi > 1 + tol:
        raise ValueError(f"{name} must be in [-1, 1] (float NCHW), got range [{lo:.3g}, {hi:.3g}]")
