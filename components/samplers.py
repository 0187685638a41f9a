"""Samplers as pure functions of (denoiser, initial state, log-SNR grid) (STYLE.md 2).

Contract (CONVENTIONS.md): ``sample_xxx(denoiser, x_init, lambdas, cond, generators=None,
**opts) -> x0``.

- ``x_init`` (B, C, H, W): the state at ``lambdas[0]`` (for generation from scratch pass
  N(0, I) noise: at the usual lambda(1) ~ -10..-15 the VP marginal is N(0, I) to within
  alpha^2 < 5e-5; for SDEdit pass a noised image).
- ``lambdas`` (N+1,) or (N+1, B): log-SNR, strictly increasing (decreasing noise);
  ``lambdas[0]`` the noisiest. Per-image columns allow per-image (spectral) schedules.
- ``generators``: one ``torch.Generator`` per image for the fresh noise, so that a sample
  never depends on the batch it is in; None uses the global RNG.
- After the N steps, a final denoising evaluation at ``lambdas[-1]`` returns the
  x0-prediction (``denoise_final=False`` returns the state at ``lambdas[-1]`` instead, for
  hand-offs such as cascaded upscaling). N steps therefore cost N+1 evaluations (N without
  the final denoise).

Notation: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda); s the current (noisier)
level, t the next one; ``r = e^{lambda_s - lambda_t} = SNR_s / SNR_t`` in (0, 1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from components.diffusion import Cond, Denoiser, as_prediction
from components.schedules import Schedule, alpha_sigma

Callback = Callable[[int, Tensor, Tensor], None]  # (step, x, x0_hat)


# --------------------------------------------------------------------------- helpers


def _check_grid(x: Tensor, lambdas: Tensor) -> Tensor:
    """Validate the grid; return it as float64 (N+1, B)."""
    lambdas = torch.as_tensor(lambdas, dtype=torch.float64, device=x.device)
    if lambdas.ndim == 1:
        lambdas = lambdas[:, None].expand(-1, x.shape[0])
    if lambdas.ndim != 2 or lambdas.shape[1] != x.shape[0] or lambdas.shape[0] < 1:
        raise ValueError(f"lambdas must be (N+1,) or (N+1, B={x.shape[0]}), got "
                         f"{tuple(lambdas.shape)}")
    if not bool(torch.isfinite(lambdas).all()):
        raise ValueError("lambdas must be finite (the final step to x0 is the denoise_final "
                         "evaluation)")
    if lambdas.shape[0] > 1 and not bool((lambdas[1:] > lambdas[:-1]).all()):
        raise ValueError("lambdas must be strictly increasing (lambdas[0] the noisiest)")
    return lambdas


def _coef(c: Tensor, x: Tensor) -> Tensor:
    """(B,) float64 coefficient -> (B, 1, 1, 1) in x's dtype."""
    return c.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def randn_per_image(x: Tensor, generators: Sequence[torch.Generator] | None) -> Tensor:
    """N(0, I) noise shaped like x, drawn image by image from ``generators`` (or global RNG)."""
    if generators is None:
        return torch.randn_like(x)
    if len(generators) != x.shape[0]:
        raise ValueError(f"need one generator per image: got {len(generators)} for batch "
                         f"{x.shape[0]}")
    return torch.stack([
        torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device)
        for g in generators
    ])


def generators_from_seeds(seeds: Sequence[int], device: str | torch.device = "cpu"
                          ) -> list[torch.Generator]:
    """One seeded generator per image."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _x0(denoiser: Denoiser, x: Tensor, lam: Tensor, cond: Cond, clip: bool) -> Tensor:
    x0 = as_prediction(denoiser, x, lam.to(x.dtype), cond, "x0")
    return x0.clamp(-1.0, 1.0) if clip else x0


def _finish(denoiser, x, lam, cond, denoise_final, clip, callback, n):
    if not denoise_final:
        return x
    x0 = _x0(denoiser, x, lam, cond, clip)  # final step to x0: E[x0 | x at lambdas[-1]]
    if callback is not None:
        callback(n, x, x0)
    return x0


# --------------------------------------------------------------------------- samplers


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser, x_init: Tensor, lambdas: Tensor, cond: Cond | None = None,
    generators: Sequence[torch.Generator] | None = None, eta: float = 0.0,
    clip_denoised: bool = False, denoise_final: bool = True, callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021) with stochasticity ``eta`` (0: deterministic ODE, 1: DDPM)."""
    if eta < 0:
        raise ValueError(f"DDIM eta must be >= 0, got {eta}")
    cond = cond if cond is not None else Cond()
    lams = _check_grid(x_init, lambdas)
    x = x_init
    for i in range(lams.shape[0] - 1):
        ls, lt = lams[i], lams[i + 1]
        (a_s, s_s), (a_t, s_t) = alpha_sigma(ls), alpha_sigma(lt)
        x0 = _x0(denoiser, x, ls, cond, clip_denoised)
        eps = (x - _coef(a_s, x) * x0) / _coef(s_s, x)  # eps_hat = (x_s - alpha_s x0_hat) / sigma_s
        # posterior variance sigma_t^2 (1 - r), r = SNR_s / SNR_t; DDIM noise = eta^2 of it
        var = (eta ** 2) * s_t ** 2 * -torch.expm1(ls - lt)
        # x_t = alpha_t x0_hat + sqrt(sigma_t^2 - var) eps_hat + sqrt(var) z      (DDIM eq. 12)
        x = _coef(a_t, x) * x0 + _coef((s_t ** 2 - var).clamp(min=0).sqrt(), x) * eps
        if eta > 0:
            x = x + _coef(var.sqrt(), x) * randn_per_image(x, generators)
        if callback is not None:
            callback(i, x, x0)
    return _finish(denoiser, x, lams[-1], cond, denoise_final, clip_denoised, callback,
                   lams.shape[0] - 1)


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser, x_init: Tensor, lambdas: Tensor, cond: Cond | None = None,
    generators: Sequence[torch.Generator] | None = None, clip_denoised: bool = False,
    denoise_final: bool = True, callback: Callback | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020) on an arbitrary log-SNR grid: draw from the
    posterior ``q(x_t | x_s, x0 = x0_hat)``."""
    cond = cond if cond is not None else Cond()
    lams = _check_grid(x_init, lambdas)
    x = x_init
    for i in range(lams.shape[0] - 1):
        ls, lt = lams[i], lams[i + 1]
        (a_s, _), (a_t, s_t) = alpha_sigma(ls), alpha_sigma(lt)
        x0 = _x0(denoiser, x, ls, cond, clip_denoised)
        r = torch.exp(ls - lt)  # SNR_s / SNR_t
        # mu = r (alpha_t / alpha_s) x_s + alpha_t (1 - r) x0_hat;  var = sigma_t^2 (1 - r)
        mean = _coef(r * a_t / a_s, x) * x + _coef(a_t * -torch.expm1(ls - lt), x) * x0
        std = (s_t ** 2 * -torch.expm1(ls - lt)).sqrt()
        x = mean + _coef(std, x) * randn_per_image(x, generators)
        if callback is not None:
            callback(i, x, x0)
    return _finish(denoiser, x, lams[-1], cond, denoise_final, clip_denoised, callback,
                   lams.shape[0] - 1)


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser, x_init: Tensor, lambdas: Tensor, cond: Cond | None = None,
    generators: Sequence[torch.Generator] | None = None, clip_denoised: bool = False,
    denoise_final: bool = True, callback: Callback | None = None, lower_order_final: bool = True,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep second order.

    In DPM-Solver's half-log-SNR ``l = lambda / 2``, step ``h = l_t - l_s``:
    ``x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) D``, with ``D = x0_hat_s`` on the
    first step and ``D = (1 + 1/(2 q)) x0_hat_s - 1/(2 q) x0_hat_prev``, ``q = h_prev / h``,
    afterwards; ``lower_order_final``: first order on the last step (stabler on grids whose
    last step is much longer than the previous one, as uniform-t cosine grids at t -> 0).
    Deterministic (``generators`` unused, kept for the common signature).

    Two named variants (``SAMPLERS``): ``dpmpp_2m``, prism's default, with
    ``lower_order_final``; ``dpmpp_2m_full``, second order up to the last grid point and then
    the final denoise (the first-order step to sigma = 0): diffusers' and k-diffusion's
    DPM-Solver++(2M) (``tests/core/test_core_samplers.py`` matches diffusers' scheduler).
    """
    del generators
    cond = cond if cond is not None else Cond()
    lams = _check_grid(x_init, lambdas)
    x, x0_prev, h_prev = x_init, None, None
    for i in range(lams.shape[0] - 1):
        ls, lt = lams[i], lams[i + 1]
        (_, s_s), (a_t, s_t) = alpha_sigma(ls), alpha_sigma(lt)
        h = 0.5 * (lt - ls)  # (B,)
        x0 = _x0(denoiser, x, ls, cond, clip_denoised)
        last = i == lams.shape[0] - 2
        if x0_prev is None or (lower_order_final and last):
            d = x0  # first order (DDIM) on the first (and optionally the last) step
        else:
            q = h_prev / h
            d = _coef(1 + 0.5 / q, x) * x0 - _coef(0.5 / q, x) * x0_prev
        x = _coef(s_t / s_s, x) * x - _coef(a_t * torch.expm1(-h), x) * d
        x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, x, x0)
    return _finish(denoiser, x, lams[-1], cond, denoise_final, clip_denoised, callback,
                   lams.shape[0] - 1)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_full": functools.partial(sample_dpmpp_2m, lower_order_final=False),
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """Sampler function by name (``ddim``, ``ddpm``, ``dpmpp_2m``, ``dpmpp_2m_full``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


# --------------------------------------------------------------------------- grids


def lambda_grid(schedule: Schedule, steps: int, t_start: float = 1.0, t_end: float = 0.0
                ) -> Tensor:
    """``steps + 1`` log-SNR values of ``schedule`` at t uniform from t_start to t_end
    (float64, strictly increasing)."""
    if steps < 1:
        raise ValueError(f"lambda_grid: steps must be >= 1, got {steps}")
    if not 0.0 <= t_end < t_start <= 1.0:
        raise ValueError(f"lambda_grid: need 0 <= t_end < t_start <= 1, got t_start={t_start}, "
                         f"t_end={t_end}")
    t = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    return schedule.lambda_(t).to(torch.float64)
