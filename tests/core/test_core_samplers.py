"""Samplers against the exact answer: Gaussian data and its analytic optimal denoiser."""

from __future__ import annotations

import pytest
import torch

from components.analytic import GaussianDenoiser, gaussian_w2, stationary_covariance
from components.diffusion import Cond
from components.samplers import (
    SAMPLERS,
    generators_from_seeds,
    get_sampler,
    lambda_grid,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
)
from components.schedules import CosineSchedule, EDMSchedule, ddpm_linear

SHAPE = (1, 4, 4)
D = 16


@pytest.fixture(scope="module")
def gauss() -> GaussianDenoiser:
    mu = torch.linspace(-0.4, 0.6, D, dtype=torch.float64)
    return GaussianDenoiser(mu, stationary_covariance(4, 4, length=1.2, var=0.3), SHAPE)


def _affine_map(sampler, den, lams, **kw):
    """Deterministic samplers are affine in x_init for a Gaussian denoiser: x -> A x + b.
    Returns the exact output mean and covariance for x_init ~ N(0, I) (no sampling error)."""
    basis = torch.cat([torch.zeros(1, D), torch.eye(D)]).to(torch.float64).reshape(-1, *SHAPE)
    out = sampler(den, basis, lams, Cond(), **kw).reshape(D + 1, D)
    b = out[0]
    a = (out[1:] - b).T  # column j = A e_j
    return b, a @ a.T


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.reshape(x.shape[0], -1)
    return x.mean(0), x.T.cov()


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_deterministic_samplers_converge_exactly(gauss, name):
    lams = lambda_grid(CosineSchedule(), 200)
    mean, cov = _affine_map(get_sampler(name), gauss, lams)
    assert (mean - gauss.mu).abs().max() < 2e-3
    assert gaussian_w2(mean, cov, gauss.mu, gauss.cov) < 1e-3


def test_dpmpp_20_steps_closer_than_ddim_20_steps(gauss):
    lams = lambda_grid(CosineSchedule(), 20)
    errs = {}
    for name in ("ddim", "dpmpp_2m"):
        mean, cov = _affine_map(get_sampler(name), gauss, lams)
        errs[name] = gaussian_w2(mean, cov, gauss.mu, gauss.cov)
    assert errs["dpmpp_2m"] < 0.5 * errs["ddim"], errs
    # the order shows: 2M's error falls much faster with steps than DDIM's
    mean, cov = _affine_map(sample_dpmpp_2m, gauss, lambda_grid(CosineSchedule(), 40))
    assert gaussian_w2(mean, cov, gauss.mu, gauss.cov) < 0.5 * errs["dpmpp_2m"]


@pytest.mark.parametrize("name,steps", [("ddim", 60), ("ddpm", 100), ("dpmpp_2m", 25)])
def test_samplers_reproduce_mean_and_covariance(gauss, name, steps):
    n = 2000
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    gens = generators_from_seeds(range(n)) if name == "ddpm" else None
    out = SAMPLERS[name](gauss, x, lambda_grid(CosineSchedule(), steps), Cond(), gens)
    mean, cov = _moments(out)
    se = (gauss.cov.diagonal() / n).sqrt()
    assert ((mean - gauss.mu).abs() / se).max() < 4.5, "mean outside sampling error"
    ref_mean, ref_cov = _moments(gauss.sample(n, torch.Generator().manual_seed(7)))
    ref_err = gaussian_w2(ref_mean, ref_cov, gauss.mu, gauss.cov)
    assert gaussian_w2(mean, cov, gauss.mu, gauss.cov) < 2.5 * ref_err + 1e-3


def test_same_seed_same_sample_alone_and_in_batch(gauss):
    lams = lambda_grid(ddpm_linear(), 15)
    seeds = [10, 11, 12, 13]
    x = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + s),
                                 dtype=torch.float64) for s in seeds])
    for name in ("ddpm", "ddim"):
        kw = {"eta": 0.7} if name == "ddim" else {}
        batch = SAMPLERS[name](gauss, x, lams, Cond(), generators_from_seeds(seeds), **kw)
        alone = SAMPLERS[name](gauss, x[2:3], lams, Cond(), generators_from_seeds(seeds[2:3]),
                               **kw)
        assert torch.allclose(batch[2:3], alone, atol=1e-10), name
        other = SAMPLERS[name](gauss, x[2:3], lams, Cond(), generators_from_seeds([99]), **kw)
        assert not torch.allclose(other, alone), f"{name}: noise does not depend on the seed"


def test_ddpm_equals_ddim_eta_one(gauss):
    lams = lambda_grid(CosineSchedule(), 12)
    x = torch.randn(5, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a = sample_ddpm(gauss, x, lams, Cond(), generators_from_seeds(range(5)))
    b = sample_ddim(gauss, x, lams, Cond(), generators_from_seeds(range(5)), eta=1.0)
    assert torch.allclose(a, b, atol=1e-10)


def test_per_image_grids_and_denoise_final(gauss):
    s = CosineSchedule()
    x = torch.randn(2, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    g1, g2 = lambda_grid(s, 10), lambda_grid(EDMSchedule(), 10)
    both = sample_dpmpp_2m(gauss, x, torch.stack([g1, g2], dim=1), Cond())
    assert torch.allclose(both[0], sample_dpmpp_2m(gauss, x[:1], g1, Cond())[0], atol=1e-10)
    assert torch.allclose(both[1], sample_dpmpp_2m(gauss, x[1:], g2, Cond())[0], atol=1e-10)
    calls = gauss.calls
    state = sample_ddim(gauss, x, g1, Cond(), denoise_final=False)
    assert gauss.calls - calls == 10  # N steps, no final denoising evaluation
    assert not torch.allclose(state, sample_ddim(gauss, x, g1, Cond()))


def test_bad_grids_raise(gauss):
    x = torch.zeros(2, *SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match="strictly increasing"):
        sample_ddim(gauss, x, torch.tensor([1.0, 0.0, 2.0]), Cond())
    with pytest.raises(ValueError, match=r"\(N\+1, B=2\)"):
        sample_ddim(gauss, x, torch.zeros(3, 5), Cond())
    with pytest.raises(ValueError, match="one generator per image"):
        sample_ddpm(gauss, x, torch.tensor([0.0, 1.0]), Cond(), generators_from_seeds([1]))
    with pytest.raises(ValueError, match="t_end"):
        lambda_grid(CosineSchedule(), 10, t_start=0.2, t_end=0.5)
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("euler_magic")


def _diffusers_dpmpp_2m(den, x, steps: int):
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, linear betas, x0 output)
    run on the Gaussian denoiser; returns its sample and its log-SNR grid."""
    diffusers = pytest.importorskip("diffusers", reason="the reference is diffusers' scheduler")
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", algorithm_type="dpmsolver++",
        solver_order=2, prediction_type="sample")
    sched.set_timesteps(steps)
    ab = sched.alphas_cumprod.double()
    lams = torch.stack([torch.log(ab[t]) - torch.log1p(-ab[t]) for t in sched.timesteps.tolist()])
    for t, lam in zip(sched.timesteps, lams, strict=True):
        x = sched.step(den(x, lam.expand(x.shape[0]), Cond()), t, x).prev_sample
    return x, lams


def test_dpmpp_2m_full_is_diffusers_dpm_solver_and_the_default_differs_on_the_last_step(gauss):
    x_init = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    ref, lams = _diffusers_dpmpp_2m(gauss, x_init.clone(), 20)
    full = SAMPLERS["dpmpp_2m_full"](gauss, x_init.clone(), lams, Cond())
    default = SAMPLERS["dpmpp_2m"](gauss, x_init.clone(), lams, Cond())
    assert float((full - ref).abs().max()) < 1e-5  # diffusers' float32 sigmas
    assert float((default - ref).abs().max()) > 1e-2  # first order on the last grid step
