"""The exact optimal denoiser for Gaussian data: ground truth for samplers and guidance.

For data ``x0 ~ N(mu, Sigma)`` (flattened dimension d) and ``x = alpha x0 + sigma eps``:

    E[x0 | x] = mu + Sigma alpha (alpha^2 Sigma + sigma^2 I)^{-1} (x - alpha mu)
              = mu + V diag(alpha s / (alpha^2 s + sigma^2)) V^T (x - alpha mu)

with ``Sigma = V diag(s) V^T``. Any sampler that integrates the reverse process exactly
reproduces ``N(mu, Sigma)``; ``D_m`` maps it to ``N(D mu, D Sigma D^T)`` (also Gaussian), so
the low-resolution model of upsample guidance is analytic as well.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from components.diffusion import Cond
from components.scale import downsample_mean
from components.schedules import alpha_sigma
from components.ssd import SSDProcess


class GaussianDenoiser:
    """``D(x, lam, cond) -> x0`` for data N(mu, Sigma) of image shape (C, H, W)."""

    prediction = "x0"

    def __init__(self, mu: Tensor, cov: Tensor, shape: tuple[int, int, int]) -> None:
        d = math.prod(shape)
        if mu.shape != (d,) or cov.shape != (d, d):
            raise ValueError(f"GaussianDenoiser: need mu ({d},) and cov ({d}, {d}) for image "
                             f"shape {shape}, got {tuple(mu.shape)} and {tuple(cov.shape)}")
        self.shape = tuple(shape)
        self.mu = mu.to(torch.float64)
        self.cov = 0.5 * (cov + cov.T).to(torch.float64)
        s, v = torch.linalg.eigh(self.cov)
        if float(s.min()) < -1e-8 * float(s.max()):
            raise ValueError("GaussianDenoiser: covariance is not positive semi-definite")
        self.eigval, self.eigvec = s.clamp(min=0.0), v
        self.calls = 0

    def __call__(self, x: Tensor, lam: Tensor, cond: Cond) -> Tensor:
        self.calls += 1
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"GaussianDenoiser: expected images {self.shape}, got "
                             f"{tuple(x.shape[1:])}")
        alpha, sigma = alpha_sigma(torch.as_tensor(lam, dtype=torch.float64).expand(x.shape[0]))
        xf = x.reshape(x.shape[0], -1).to(torch.float64)  # (B, d)
        a, s2 = alpha[:, None], (sigma ** 2)[:, None]
        gain = a * self.eigval / (a ** 2 * self.eigval + s2)  # (B, d) Wiener gain per eigvec
        z = (xf - a * self.mu) @ self.eigvec  # coordinates in the eigenbasis
        x0 = self.mu + (gain * z) @ self.eigvec.T
        return x0.reshape(x.shape).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact samples (n, C, H, W), float64."""
        z = torch.randn(n, len(self.mu), generator=generator, dtype=torch.float64)
        x = self.mu + (z * self.eigval.sqrt()) @ self.eigvec.T
        return x.reshape(n, *self.shape)

    def downsampled(self, m: int) -> GaussianDenoiser:
        """The exact model of ``D_m[x0]``: N(D mu, D Sigma D^T)."""
        c, h, w = self.shape
        d_mat = downsample_matrix(self.shape, m)  # (d_low, d)
        return GaussianDenoiser(d_mat @ self.mu, d_mat @ self.cov @ d_mat.T, (c, h // m, w // m))


class SSDGaussianDenoiser:
    """The exact x0-denoiser of a Scale Space Diffusion process (``components.ssd``) for
    N(mu, Sigma) images of one channel at the process's base resolution.

    With ``x_k = a_k R x0 + sigma_k eps`` and ``R = R_{0:k}`` (the resizes down to r(k)), it
    returns ``R_{0:j} E[x0 | x_k]`` at the resolution ``cond.out_resolution`` asks for:

        E[x0 | x_k] = mu + Sigma R^T a_k (a_k^2 R Sigma R^T + sigma_k^2 I)^{-1} (x_k - a_k R mu).

    The state k is the one whose log-SNR is ``lam`` (``SSDProcess.state_of``). Driving
    ``ssd_chain`` with it measures what the chain itself does to a distribution.
    """

    prediction = "x0"

    def __init__(self, process: SSDProcess, mu: Tensor, cov: Tensor) -> None:
        d = process.base_resolution ** 2
        if mu.shape != (d,) or cov.shape != (d, d):
            raise ValueError(f"SSDGaussianDenoiser: need mu ({d},) and cov ({d}, {d}) for "
                             f"{process.base_resolution} px images, got {tuple(mu.shape)} and "
                             f"{tuple(cov.shape)}")
        self.process, self.mu, self.cov = process, mu.double(), cov.double()
        self._gains: dict[int, tuple[Tensor, Tensor]] = {}
        self._down: dict[int, Tensor] = {}

    def down(self, r: int) -> Tensor:
        """``R_{0:r}`` as a (r^2, base^2) matrix on flattened images."""
        if r not in self._down:
            A = self.process.matrix(self.process.base_resolution, r, "cpu", torch.float64)
            self._down[r] = torch.kron(A, A)
        return self._down[r]

    def _gain(self, k: int) -> tuple[Tensor, Tensor]:
        if k not in self._gains:
            p = self.process
            R, a, s = self.down(p.res(k)), p.a(k), p.sigma(k)
            C = a * a * R @ self.cov @ R.T + s * s * torch.eye(R.shape[0], dtype=torch.float64)
            self._gains[k] = (torch.linalg.solve(C, a * R @ self.cov).T, a * R @ self.mu)
        return self._gains[k]

    def __call__(self, x: Tensor, lam: Tensor, cond: Cond) -> Tensor:
        k = self.process.state_of(lam)
        if x.shape[1] != 1 or x.shape[-1] != self.process.res(k):
            raise ValueError(f"SSDGaussianDenoiser: expected (B, 1, {self.process.res(k)}, "
                             f"{self.process.res(k)}) at state {k}, got {tuple(x.shape)}")
        gain, mean_k = self._gain(k)
        x0 = self.mu + (x.reshape(x.shape[0], -1).double() - mean_k) @ gain.T
        r = cond.out_resolution or self.process.base_resolution
        return (x0 @ self.down(r).T).reshape(x.shape[0], 1, r, r).to(x.dtype)


def downsample_matrix(shape: tuple[int, int, int], m: int) -> Tensor:
    """``D_m`` as a (d/m^2, d) matrix for images of ``shape`` (C, H, W)."""
    d = math.prod(shape)
    eye = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
    return downsample_mean(eye, m).reshape(d, -1).T.contiguous()


def stationary_covariance(h: int, w: int, length: float = 1.5, var: float = 1.0,
                          beta: float | None = None) -> Tensor:
    """Covariance (h w, h w) of a periodic stationary field (one channel), built from its
    spectrum so that it is positive definite: Gaussian spectrum with correlation length
    ``length`` pixels, or a power law ``|f|^-beta`` (natural-image-like) when ``beta`` is set.
    Normalised to per-pixel variance ``var``.
    """
    if length <= 0 or var <= 0:
        raise ValueError(f"stationary_covariance: length and var must be > 0, got {length}, {var}")
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(w, dtype=torch.float64)[None, :]
    f2 = fy ** 2 + fx ** 2  # (h, w), cycles per pixel squared
    if beta is None:
        spec = torch.exp(-2.0 * (math.pi * length) ** 2 * f2)
    else:
        f2 = f2.clone()
        f2[0, 0] = float(f2.flatten()[1:].min())  # finite DC power
        spec = f2 ** (-0.5 * beta)
    kernel = torch.fft.ifft2(spec).real  # c(dy, dx), real since spec is even
    kernel = var * kernel / kernel[0, 0]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dy = (yy.flatten()[:, None] - yy.flatten()[None, :]) % h
    dx = (xx.flatten()[:, None] - xx.flatten()[None, :]) % w
    return kernel[dy, dx] + 1e-6 * var * torch.eye(h * w, dtype=torch.float64)


def gaussian_w2(mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor) -> float:
    """Squared 2-Wasserstein (Frechet) distance between two Gaussians."""
    def _sqrtm(c: Tensor) -> Tensor:
        s, v = torch.linalg.eigh(0.5 * (c + c.T))
        return (v * s.clamp(min=0).sqrt()) @ v.T
    ra = _sqrtm(cov_a)
    cross = _sqrtm(ra @ cov_b @ ra)
    return float(((mean_a - mean_b) ** 2).sum() + torch.trace(cov_a + cov_b - 2 * cross))
