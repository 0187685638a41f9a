"""The SSD chain, driven by the Bayes-optimal x0-denoiser of Gaussian data, returns that data.

Gaussian images x0 ~ N(mu, S) at 8 px (one channel) have an exact denoiser at every state
(``components.analytic.SSDGaussianDenoiser``), so the chain's samples can be compared with the
data's own mean and covariance: what the sampler loses is the sampler's, not a network's. S
has a strong constant component (an image's mean colour), which is where a sampler that
shrinks the coarse levels' variance shows first.
"""

from __future__ import annotations

import pytest
import torch

from components.analytic import SSDGaussianDenoiser
from components.diffusion import Cond
from components.ssd import SSDProcess, ssd_chain

F64 = torch.float64
N_SAMPLES = 4000  # sampling error of a variance: sqrt(2 / 4000) = 2.2%


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 64
    B = torch.randn(n, 6, dtype=F64, generator=g)
    S = 0.25 * torch.ones(n, n, dtype=F64) + 0.03 * B @ B.T + 0.01 * torch.eye(n, dtype=F64)
    return torch.full((n,), 0.1, dtype=F64), S


def chain_statistics(levels: int, mu: torch.Tensor, S: torch.Tensor) -> dict[str, float]:
    p = SSDProcess(8, levels=levels)
    x = ssd_chain(SSDGaussianDenoiser(p, mu, S), p, N_SAMPLES, torch.Generator().manual_seed(1),
                  Cond(), channels=1, clip=False).reshape(N_SAMPLES, -1).double()
    one = torch.full((64,), 1 / 64, dtype=F64)
    C = torch.cov(x.T)
    return {"mean_error": float((x.mean(0) - mu).abs().max()),
            "mean_colour_variance": float(x.mean(1).var() / (one @ S @ one)),
            "covariance_error": float((C - S).norm() / S.norm())}


@pytest.mark.parametrize("levels", [1, 2])
def test_chain_returns_the_data_distribution(data, levels):
    """DDPM (one level) and two levels: the data's mean, mean-colour variance and covariance
    within sampling error (measured: variance ratios 0.995 and 0.98, covariance errors 0.019
    and 0.023)."""
    stats = chain_statistics(levels, *data)
    assert stats["mean_error"] < 0.05, stats
    assert 0.93 < stats["mean_colour_variance"] < 1.07, stats
    assert stats["covariance_error"] < 0.05, stats


def test_three_levels_lose_a_tenth_of_the_variance_at_the_late_resolution_jump(data):
    """With three levels (2, 4, 8 px) the 4 -> 8 px step comes at a = 0.21, where the x0
    estimate the posterior step is given stands in for an x0 it is still uncertain about:
    the chain returns about 0.92 of the mean-colour variance and a 7.6% covariance error
    with 1000 steps (0.90 and 10% with 3000: not a step-size effect). A bound, so that a
    change that makes it worse is seen."""
    stats = chain_statistics(3, *data)
    assert 0.8 < stats["mean_colour_variance"] < 1.0, stats
    assert stats["covariance_error"] < 0.12, stats


def test_the_exact_denoiser_refuses_what_it_cannot_denoise(data):
    p = SSDProcess(8, levels=2)
    with pytest.raises(ValueError, match="need mu"):
        SSDGaussianDenoiser(p, torch.zeros(16, dtype=F64), torch.eye(16, dtype=F64))
    d = SSDGaussianDenoiser(p, *data)
    lam = p.lambda_(torch.tensor([p.T - 1]))  # the last state is at 4 px
    with pytest.raises(ValueError, match="expected"):
        d(torch.zeros(2, 1, 8, 8), lam, Cond(out_resolution=4))
    assert d(torch.zeros(2, 1, 4, 4), lam, Cond(out_resolution=8)).shape == (2, 1, 8, 8)
