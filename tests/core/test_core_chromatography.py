"""Resolution chromatography: P, tau (continuous and discrete), chromatograms, measurement."""

from __future__ import annotations

import math

import pytest
import torch

from components.analytic import GaussianDenoiser, stationary_covariance
from components.chromatography import (
    band_prediction,
    band_snr,
    chromatogram,
    crossing_time,
    dominant_level,
    lambda_of_level,
    measured_chromatogram,
    noise_band_energies,
    paper_emergence,
    plot_chromatogram,
    power,
    predicted_emergence,
    signal_fraction,
    tau,
    tau_discrete,
)
from components.diffusion import q_sample
from components.scale import band_energies, downsample_mean
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


def test_crossing_time_interpolates_the_latest_crossing():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    e = torch.tensor([[1.0, 0.8, 0.6, 0.2, 0.0],   # crosses 1/2 between 0.5 and 0.75
                      [1.0, 0.9, 0.8, 0.7, 0.6],   # above at the largest t
                      [0.4, 0.3, 0.2, 0.1, 0.0],   # never
                      [0.2, 0.6, 0.4, 0.5, 0.3]])  # the latest crossing counts: 0.75 -> 1.0
    got = crossing_time(t, e)
    assert got[0].item() == pytest.approx(0.5 + 0.25 * 0.1 / 0.4)
    assert got[1].item() == 1.0
    assert math.isnan(got[2].item())
    assert got[3].item() == pytest.approx(0.75)
    assert crossing_time(t.flip(0), e.flip(1))[0].item() == pytest.approx(got[0].item())


@pytest.mark.parametrize("kind", ["box", "gaussian"])
def test_noise_band_energies_match_white_noise(kind):
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(4000, 1, 16, 16, generator=g, dtype=torch.float64)
    measured = band_energies(eps, 3, kind).mean(0)
    exact = noise_band_energies(3, kind, size=16)
    assert torch.allclose(measured, exact, rtol=0.03)
    if kind == "box":
        assert exact.tolist() == pytest.approx([3 / 4, 3 / 16, 1 / 16])
        assert exact.sum().item() == pytest.approx(1.0)


def _gaussian_field(mu: torch.Tensor | None = None, size: int = 32):
    """The |f|^-2 field (variance 0.09) of ``science chromatogram``, measured with its exact
    denoiser on a cosine schedule: (measurement, band statistics)."""
    cov = stationary_covariance(size, size, beta=2.0, var=0.09)
    mu = torch.zeros(size * size, dtype=torch.float64) if mu is None else mu
    den = GaussianDenoiser(mu, cov, (1, size, size))
    g = torch.Generator().manual_seed(0)
    images = den.sample(64, generator=g).clamp(-1, 1)
    out = measured_chromatogram(den, images, torch.linspace(0.0, 1.0, 26), CosineSchedule(),
                                levels=4, generator=g)
    return out, band_snr(images, 4)


def test_band_snr_explains_the_measured_emergence():
    """Each band emerges where its own SNR is 1 (lambda = -ln rho_k), not at -k ln 4."""
    s = CosineSchedule()
    out, stats = _gaussian_field()
    measured = out["emergence_interp"]
    ours = predicted_emergence(s, stats)
    paper = paper_emergence(s, 4)
    assert (ours - measured).abs().max() < 0.1, (ours.tolist(), measured.tolist())
    assert (paper[0] - measured[0]).abs() > 0.25
    assert ((paper - measured).abs() > (ours - measured).abs()).all()
    # the closed form is where the predicted curve crosses 1/2
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    assert torch.allclose(crossing_time(t, band_prediction(s, stats, t)), ours, atol=1e-3)
    # octave spacing ln(rho_{k+1} / rho_k) ~ beta ln 2 = ln 4 for beta = 2, not the scale
    assert (stats["rho"][1:] / stats["rho"][:-1]).log()[:2].sub(math.log(4)).abs().max() < 0.4


def test_a_data_mean_needs_the_m_term():
    size = 32
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    # a fine checkerboard (band 0 only) and 8x8 blocks (the coarsest band only)
    mu = 0.08 * (-1.0) ** (xx + yy) + 0.12 * (-1.0) ** (xx // 8 + yy // 8)
    s = CosineSchedule()
    out, stats = _gaussian_field(mu.double().flatten(), size)
    measured = out["emergence_interp"]
    assert stats["m"][0] > 0.15 and stats["m"][3] > 0.15
    with_mean = predicted_emergence(s, stats)
    without = predicted_emergence(s, {"rho": stats["E"] / stats["N"],
                                      "m": torch.zeros_like(stats["m"])})
    err_with, err_without = (with_mean - measured).abs(), (without - measured).abs()
    assert err_with.max() < 0.1, (with_mean.tolist(), measured.tolist())
    assert err_without.max() > 0.1  # without m_k the same criterion fails
    assert (err_with[[0, 3]] < err_without[[0, 3]]).all()
