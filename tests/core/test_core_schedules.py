"""Schedules and parameterisation: identities that every later part relies on."""

from __future__ import annotations

import math

import pytest
import torch

from components.diffusion import check_image_range, convert, q_sample
from components.schedules import (
    CosineSchedule,
    EDMSchedule,
    LinearLambdaSchedule,
    build_schedule,
    ddpm_linear,
    sd_scaled_linear,
)

SCHEDULES = {
    "cosine": CosineSchedule(),
    "sid2_shifted_32": CosineSchedule.shifted(32, 64),
    "sid2_interpolated": build_schedule("sid2_interpolated", d=64),
    "ddpm_linear": ddpm_linear(),
    "sd_scaled_linear": sd_scaled_linear(),
    "edm": EDMSchedule(),
    "linear_lambda": LinearLambdaSchedule(-12.0, 9.0),
}
T_GRID = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_strictly_decreasing(name):
    lam = SCHEDULES[name].lambda_(T_GRID)
    assert torch.isfinite(lam).all(), name
    assert (lam[1:] < lam[:-1]).all(), f"{name} is not strictly decreasing"


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_inverse(name):
    s = SCHEDULES[name]
    t_back = s.t_of_lambda(s.lambda_(T_GRID))
    assert (t_back - T_GRID).abs().max() < 1e-5, name


def test_sid2_shift_is_exactly_two_log_ratio():
    base = CosineSchedule()
    for d, d_ref in [(32, 64), (64, 64), (128, 64), (256, 32)]:
        diff = CosineSchedule.shifted(d, d_ref).lambda_(T_GRID) - base.lambda_(T_GRID)
        assert torch.allclose(diff, torch.full_like(diff, 2 * math.log(d_ref / d)), atol=1e-12)


def test_discrete_schedule_index_conversions():
    s = sd_scaled_linear()
    n = torch.arange(s.T)
    assert torch.equal(s.index_of_t(s.t_of_index(n)), n)
    lam = s.lambda_of_index(n)
    assert torch.allclose(s.lambda_(s.t_of_index(n)), lam, atol=1e-10)
    # alpha_bar of SD's last step is about 0.0047 (published value)
    assert abs(float(s.alpha_bar[-1]) - 0.0047) < 2e-4


@pytest.mark.parametrize("source", ["eps", "x0", "v"])
@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_conversions_round_trip(source, target):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    lam = torch.tensor([-8.0, -1.0, 2.0, 9.0], dtype=torch.float64)
    x = q_sample(x0, lam, eps)
    truth = {"eps": eps, "x0": x0, "v": convert(eps, x, lam, "eps", "v")}
    out = convert(truth[source], x, lam, source, target)
    assert torch.allclose(out, truth[target], atol=1e-6 if target == "x0" else 1e-9)
    back = convert(out, x, lam, target, source)
    assert torch.allclose(back, truth[source], atol=1e-6)


def test_bad_schedule_parameters_raise_with_names():
    with pytest.raises(ValueError, match="lambda_min"):
        CosineSchedule(lambda_min=5.0, lambda_max=-5.0)
    with pytest.raises(ValueError, match="beta_start"):
        ddpm_linear(beta_start=0.5, beta_end=0.1)
    with pytest.raises(ValueError, match="sigma_min"):
        EDMSchedule(sigma_min=10.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        build_schedule("nope")


def test_image_range_check_names_the_problem():
    check_image_range(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        check_image_range(torch.full((1, 3, 4, 4), 3.0), "images")


def test_squaredcos_cap_v2_is_the_improved_ddpm_cosine_with_its_cap():

    from components.schedules import DiscreteSchedule, build_schedule

    sched = build_schedule("squaredcos_cap_v2", T=1000)
    assert isinstance(sched, DiscreteSchedule) and sched.T == 1000
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = 1 - sched.alpha_bar[1:] / sched.alpha_bar[:-1]
    assert float(betas[0]) == pytest.approx(1 - f(2 / 1000) / f(1 / 1000), rel=1e-9)
    assert float(betas[-1]) == pytest.approx(0.999)  # the cap: f(1) = 0 would give beta = 1
    assert float(sched.alpha_bar[0]) == pytest.approx(f(1 / 1000) / f(0), rel=1e-12)


def test_squaredcos_cap_v2_matches_diffusers():
    diffusers = pytest.importorskip("diffusers", reason="the reference is diffusers' scheduler")
    from components.schedules import build_schedule

    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    ours = build_schedule("squaredcos_cap_v2").alpha_bar
    # diffusers computes in float32
    torch.testing.assert_close(ours, ref.alphas_cumprod.double(), rtol=2e-5, atol=1e-6)
