"""Generalised linear degradations (SCIENCE.md section 6; Scale Space Diffusion).

A forward process of linear operators ``M_t`` with exact transposes:

    x_t = M_t x_{t-1} + noise_t,      marginal   x_t = M_{1:t} x0 + sigma_t eps,

where ``M_{1:t} = M_t ... M_1`` and ``sigma_t`` is the marginal noise level. The step noise
has covariance ``sigma_t^2 I - sigma_{t-1}^2 M_t M_t^T``, which must be PSD (the *PSD
condition*, :func:`check_psd`). Gaussian conditioning gives the posterior (the DDPM
posterior when ``M_t = sqrt(alpha_t / alpha_{t-1}) I``):

    mu    = mu_{t-1} + (sigma_{t-1}^2 / sigma_t^2) M_t^T (x_t - M_t mu_{t-1}),
    Sigma = sigma_{t-1}^2 I - (sigma_{t-1}^4 / sigma_t^2) M_t^T M_t,   mu_{t-1} = M_{1:t-1} x0.

Operators act on batches (B, ...) image-wise; ``apply`` maps the space of x_{t-1} to the
space of x_t and ``transpose`` back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Apply = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LinearOp:
    """A linear operator ``M`` with its exact transpose, acting image-wise on (B, ...)."""

    apply: Apply
    transpose: Apply

    def gram(self, x: Tensor) -> Tensor:
        """``M^T M x``."""
        return self.transpose(self.apply(x))


def scaled_identity(c: float) -> LinearOp:
    """``M = c I`` (DDPM: ``c = sqrt(alpha_t)``)."""
    return LinearOp(lambda x: c * x, lambda y: c * y)


def compose(ops: Sequence[LinearOp]) -> LinearOp:
    """``M_{1:t} = M_t ... M_1`` for ``ops = [M_1, ..., M_t]`` (identity when empty)."""
    ops = list(ops)

    def apply(x: Tensor) -> Tensor:
        for op in ops:
            x = op.apply(x)
        return x

    def transpose(y: Tensor) -> Tensor:
        for op in reversed(ops):
            y = op.transpose(y)
        return y

    return LinearOp(apply, transpose)


def ddpm_ops(alpha_bar: Tensor) -> list[LinearOp]:
    """DDPM as a linear degradation: ``M_t = sqrt(alpha_bar_t / alpha_bar_{t-1}) I``.

    Step t = 1..T uses ``alpha_bar[t-1]`` (0-based array as in DDPM code), alpha_bar_0 = 1.
    """
    ab = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar.to(torch.float64)])
    return [scaled_identity(float((ab[t] / ab[t - 1]).sqrt())) for t in range(1, len(ab))]


def marginal(x0: Tensor, ops: Sequence[LinearOp], sigma_t: float, eps: Tensor) -> Tensor:
    """``x_t = M_{1:t} x0 + sigma_t eps`` with ``ops = [M_1, ..., M_t]``."""
    return compose(ops).apply(x0) + sigma_t * eps


def posterior_mean(x_t: Tensor, mu_prev: Tensor, op: LinearOp, sigma_prev: float,
                   sigma_t: float) -> Tensor:
    """``mu = mu_{t-1} + rho M_t^T (x_t - M_t mu_{t-1})``, ``rho = sigma_{t-1}^2 / sigma_t^2``.

    x_t: state at t (space of M_t's output); mu_prev = M_{1:t-1} x0 (space of x_{t-1}).
    """
    rho = sigma_prev**2 / sigma_t**2
    return mu_prev + rho * op.transpose(x_t - op.apply(mu_prev))


def posterior_cov_apply(v: Tensor, op: LinearOp, sigma_prev: float, sigma_t: float) -> Tensor:
    """``Sigma v = sigma_{t-1}^2 v - (sigma_{t-1}^4 / sigma_t^2) M_t^T M_t v``."""
    return sigma_prev**2 * v - (sigma_prev**4 / sigma_t**2) * op.gram(v)


def gram_lambda_max(op: LinearOp, shape: Sequence[int], iters: int = 50,
                    dtype: torch.dtype = torch.float64, seed: int = 0) -> float:
    """Largest eigenvalue of ``M^T M`` on inputs of ``shape`` (power iteration, 1 image)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn((1, *shape), generator=g, dtype=dtype)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        w = op.gram(v)
        lam = float((v * w).sum())  # Rayleigh quotient
        n = float(w.norm())
        if n == 0.0:
            return 0.0
        v = w / n
    return lam


def check_psd(op: LinearOp, shape: Sequence[int], sigma_prev: float, sigma_t: float,
              step: int | str = "?", tol: float = 1e-6) -> float:
    """Check the PSD condition ``sigma_{t-1}^2 lambda_max(M_t^T M_t) <= sigma_t^2``.

    Equivalent to both the step noise covariance and the posterior covariance being PSD.
    Returns the margin ``1 - sigma_{t-1}^2 lambda_max / sigma_t^2``; raises ValueError
    naming the step where it fails.
    """
    if sigma_t <= 0:
        raise ValueError(f"step {step}: sigma_t must be > 0, got {sigma_t}")
    lam = gram_lambda_max(op, shape)
    margin = 1.0 - sigma_prev**2 * lam / sigma_t**2
    if margin < -tol:
        raise ValueError(
            f"step {step}: degradation violates the PSD condition: sigma_prev^2 "
            f"lambda_max(M^T M) = {sigma_prev**2 * lam:.6g} > sigma_t^2 = {sigma_t**2:.6g}"
        )
    return margin


def lanczos_sqrt_apply(matvec: Apply, b: Tensor, iters: int = 40) -> Tensor:
    """``A^{1/2} b`` for a symmetric PSD operator A (one vector b, any shape), by Lanczos.

    Builds the Krylov basis Q (full reorthogonalisation) and the tridiagonal T = Q^T A Q,
    then ``A^{1/2} b ~= |b| Q T^{1/2} e_1``; exact once iters reaches the Krylov dimension.
    """
    shape, b = b.shape, b.reshape(-1)
    nrm = b.norm()
    if float(nrm) == 0.0:
        return torch.zeros(shape, dtype=b.dtype, device=b.device)
    qs, alphas, betas = [b / nrm], [], []
    for _ in range(min(iters, b.numel())):
        z = matvec(qs[-1].reshape(shape)).reshape(-1)
        alphas.append(torch.dot(qs[-1], z))
        Q = torch.stack(qs, dim=1)  # (D, m)
        z = z - Q @ (Q.T @ z)  # full reorthogonalisation
        z = z - Q @ (Q.T @ z)
        beta = z.norm()
        if float(beta) <= 1e-12 * float(nrm):
            break
        betas.append(beta)
        qs.append(z / beta)
    m = len(alphas)
    T = torch.diag(torch.stack(alphas))
    if m > 1:
        off = torch.stack(betas[: m - 1])
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    evals, V = torch.linalg.eigh(T)
    coeffs = V @ (evals.clamp_min(0).sqrt() * V[0])  # T^{1/2} e_1, (m,)
    return (nrm * torch.stack(qs[:m], dim=1) @ coeffs).reshape(shape)


def posterior_noise_lanczos(z: Tensor, op: LinearOp, sigma_prev: float, sigma_t: float,
                            iters: int = 40) -> Tensor:
    """Noise with covariance Sigma (the posterior's) from standard normals z (B, ...):
    ``Sigma^{1/2} z`` per image, by Lanczos (generic; slow, for any operator)."""
    def matvec(v: Tensor) -> Tensor:
        return posterior_cov_apply(v[None], op, sigma_prev, sigma_t)[0]

    return torch.stack([lanczos_sqrt_apply(matvec, zi, iters) for zi in z])


def ddpm_posterior(x_t: Tensor, x0: Tensor, alpha_bar: Tensor, t: int) -> tuple[Tensor, float]:
    """DDPM's closed-form posterior q(x_{t-1} | x_t, x0) for 1-based step t >= 2
    (Ho et al. eq. 7): mean and the variance ``beta_tilde``; a reference for tests."""
    ab_t, ab_prev = float(alpha_bar[t - 1]), float(alpha_bar[t - 2])
    beta_t = 1.0 - ab_t / ab_prev
    mean = (math.sqrt(ab_prev) * beta_t / (1 - ab_t)) * x0 + (
        math.sqrt(1 - beta_t) * (1 - ab_prev) / (1 - ab_t)
    ) * x_t
    return mean, (1 - ab_prev) / (1 - ab_t) * beta_t
