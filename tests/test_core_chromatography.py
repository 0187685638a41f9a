"""Resolution chromatography: P, tau (continuous and discrete), chromatograms, measurement."""

from __future__ import annotations

import math

import pytest
import torch

from components.analytic import GaussianDenoiser, stationary_covariance
from components.chromatography import (
    chromatogram,
    dominant_level,
    lambda_of_level,
    measured_chromatogram,
    plot_chromatogram,
    power,
    signal_fraction,
    tau,
    tau_discrete,
)
from components.diffusion import q_sample
from components.scale import downsample_mean
from components.schedules import CosineSchedule, alpha_sigma, ddpm_linear, sd_scaled_linear


def test_sd_discrete_time_map_matches_paper():
    s = sd_scaled_linear()
    got = tau_discrete(s, torch.tensor([999, 800, 600, 400, 200]), m=2)
    assert got.tolist() == [874, 631, 394, 204, 75]


def test_discrete_and_continuous_tau_agree():
    s = ddpm_linear()
    n = torch.arange(50, 1000, 50)
    cont = tau(s, s.t_of_index(n), 2) * s.T - 1  # continuous step index
    assert (cont - tau_discrete(s, n, 2).double()).abs().max() <= 1.0


@pytest.mark.parametrize("m", [2, 4])
def test_continuous_tau_multiplies_snr_by_m2(m):
    s = CosineSchedule()
    t = torch.linspace(0.2, 0.95, 16, dtype=torch.float64)
    lam_tau = s.lambda_(tau(s, t, m))
    assert torch.allclose(lam_tau - s.lambda_(t), torch.full_like(t, 2 * math.log(m)), atol=1e-6)
    assert (tau(s, t, m) < t).all()  # the coarse view is always less noisy


@pytest.mark.parametrize("t", [0.3, 0.55, 0.8])
def test_downsampled_state_is_a_state_at_tau(t):
    """D_m[x_t] / sqrt(P) = alpha_tau D_m[x0] + sigma_tau eps' (empirically, m = 2)."""
    m, s = 2, CosineSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    lam = s.lambda_(torch.tensor(t, dtype=torch.float64))
    reps = 400
    eps = torch.randn(reps, 8, 1, 16, 16, generator=g, dtype=torch.float64)
    x_t = q_sample(x0.expand(reps, -1, -1, -1, -1), lam, eps)  # (reps, 8, 1, 16, 16)
    y = downsample_mean(x_t, m) / power(lam, m).sqrt()
    signal = downsample_mean(x0, m)  # (8, 1, 8, 8)
    mean_y = y.mean(0)
    a_emp = float((mean_y * signal).sum() / (signal * signal).sum())  # regression slope
    s_emp = float((y - mean_y).std())
    a_tau, s_tau = alpha_sigma(s.lambda_(tau(s, torch.tensor(t, dtype=torch.float64), m)))
    assert abs(a_emp - float(a_tau)) < 0.01
    assert abs(s_emp - float(s_tau)) < 0.01 * float(s_tau)
    # and the total power of the state matches a unit-power process: a^2 + s^2 = 1
    assert abs(float(a_tau) ** 2 + float(s_tau) ** 2 - 1) < 1e-9


def test_power_and_signal_fraction_values():
    assert torch.isclose(power(torch.tensor(0.0), 2), torch.tensor(0.5 + 0.5 / 4))
    assert torch.isclose(signal_fraction(torch.tensor(-math.log(4.0)), 1), torch.tensor(0.5))
    assert float(dominant_level(torch.tensor(lambda_of_level(2.5)))) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="m must be >= 1"):
        power(torch.tensor(0.0), 0.5)


def test_chromatogram_curves():
    s = CosineSchedule()
    ch = chromatogram(s, levels=4, n_t=801)
    a, c, t = ch["a"], ch["c"], ch["t"]
    assert (c >= 0).all()  # signal is only generated as t decreases
    assert (a[1:] >= a[:-1]).all()  # coarser levels always carry more signal
    # c integrates to a(0) - a(1) (trapezoid)
    integral = torch.trapezoid(c, t, dim=1)
    assert torch.allclose(integral, a[:, 0] - a[:, -1], atol=2e-3)
    # peaks are ordered coarse-to-fine in generation: coarse levels peak at larger t
    peaks = t[c.argmax(dim=1)]
    assert (peaks[1:] > peaks[:-1]).all()
    with pytest.raises(ValueError, match="kind"):
        chromatogram(s, kind="nope")


def test_bandpass_telescopes_to_coarsest_level():
    ch = chromatogram(CosineSchedule(), levels=5, n_t=101, kind="bandpass")
    cum = chromatogram(CosineSchedule(), levels=5, n_t=101)
    assert torch.allclose(ch["a"].sum(0), cum["a"][-1], atol=1e-12)


def test_measured_chromatogram_is_coarse_to_fine():
    """With the exact denoiser of a power-law Gaussian field, coarse bands emerge first."""
    shape = (1, 16, 16)
    cov = stationary_covariance(16, 16, beta=2.5, var=0.04)
    den = GaussianDenoiser(torch.zeros(256, dtype=torch.float64), cov, shape)
    g = torch.Generator().manual_seed(0)
    images = den.sample(64, generator=g).clamp(-1, 1)
    s = CosineSchedule()
    out = measured_chromatogram(den, images, torch.linspace(0.0, 1.0, 41), s, levels=3,
                                generator=g)
    e = out["energy_fraction"]
    assert e.shape == (3, 41)
    assert (e[:, 0] > 0.9).all() and (e[:, -1] < 0.05).all()
    em = out["emergence"]
    assert not torch.isnan(em).any()
    assert em[2] > em[1] > em[0], f"emergence not coarse-to-fine: {em.tolist()}"
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        measured_chromatogram(den, images * 5, torch.linspace(0, 1, 3), s, levels=3)


def test_plot_chromatogram_writes_png(tmp_path):
    path = tmp_path / "chrom.png"
    fig = plot_chromatogram(sd_scaled_linear(), levels=4, path=str(path))
    assert path.stat().st_size > 10_000
    assert len(fig.axes) >= 3
