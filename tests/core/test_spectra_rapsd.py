"""RAPSD, fits, octave energies and bounds (components/spectra.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.spectra import (
    LAMBDA_QUANT,
    SpectraParams,
    gaussian_random_field,
    image_statistics,
    luminance,
    power_law_fit,
    rapsd,
    schedule_bounds,
    uint8_to_unit,
)
from components.spectral_bins import bin_frequencies


@pytest.mark.parametrize("size", [32, 64, 33])
@pytest.mark.parametrize("s", [0.5, 2.0])
def test_white_noise_is_flat_at_its_variance(size: int, s: float) -> None:
    x = np.random.default_rng(0).normal(0.0, s, (400, size, size))
    spec = rapsd(x).mean(0)  # (n_bins,)
    assert spec.shape == (size // 2,)
    # every bin within 10% of s^2 (the r = 1 bin holds 8 frequencies x 400 images)
    np.testing.assert_allclose(spec, s**2, rtol=0.1)
    assert abs(spec.mean() / s**2 - 1) < 0.01


@pytest.mark.parametrize("beta", [1.0, 1.5, 2.0, 2.5, 3.0])
@pytest.mark.parametrize("size", [32, 64])
def test_power_law_field_gives_beta_back(beta: float, size: int) -> None:
    g = gaussian_random_field(32, size, beta, seed=3)
    _, b_mean, _ = power_law_fit(rapsd(g).mean(0))
    assert abs(float(b_mean) - beta) < 0.1
    _, b_each, res = power_law_fit(rapsd(g))  # per image
    assert abs(float(b_each.mean()) - beta) < 0.1
    assert (res < 1.5).all()


def test_power_law_fit_exact_on_exact_power_law() -> None:
    f = bin_frequencies(16)
    s = 3.0 * f**-2.3
    log_a, beta, res = power_law_fit(s)
    assert abs(beta - 2.3) < 1e-12 and abs(log_a - math.log(3.0)) < 1e-12 and res < 1e-12


def test_numpy_and_torch_agree() -> None:
    rng = np.random.default_rng(1)
    im = rng.uniform(-1, 1, (6, 3, 32, 32))
    a = image_statistics(im)
    b = image_statistics(torch.tensor(im))
    c = image_statistics(torch.tensor(im, dtype=torch.float32))
    assert set(a) == set(b)
    for k in a:
        assert isinstance(b[k], torch.Tensor)
        np.testing.assert_allclose(b[k].numpy(), a[k], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(c[k].numpy(), a[k], rtol=2e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_numpy_and_cuda_agree() -> None:
    im = np.random.default_rng(1).uniform(-1, 1, (4, 3, 32, 32))
    a = image_statistics(im)
    b = image_statistics(torch.tensor(im, device="cuda"))
    for k in a:
        np.testing.assert_allclose(b[k].cpu().numpy(), a[k], rtol=1e-8, atol=1e-10)


def test_parseval_octaves_plus_dc_is_mean_square() -> None:
    im = np.random.default_rng(2).uniform(-1, 1, (5, 3, 32, 32))
    st = image_statistics(im)
    y = luminance(im)
    total = st["octave_energy"].sum(1) + st["dc_power"] / (32 * 32)
    np.testing.assert_allclose(total, (y**2).mean((1, 2)), rtol=1e-10)
    np.testing.assert_allclose(st["dc_power"], 32 * 32 * y.mean((1, 2)) ** 2, rtol=1e-10)
    assert st["octave_energy"].shape == (5, 5)  # {1},{2},{3,4},{5..8},{9..16 + corners}


def test_bounds_follow_the_formulas() -> None:
    s = np.array([[10.0, 1.0, 0.1, 0.001], [1e-3, 1e-4, 1e-7, 1e-9]])
    lo, hi = schedule_bounds(s, eps_lo=0.01, eps_hi=10.0)
    np.testing.assert_allclose(lo[0], math.log(0.01) - math.log(10.0))
    np.testing.assert_allclose(hi[0], math.log(10.0) - math.log(0.001))
    assert hi[1] == pytest.approx(LAMBDA_QUANT)  # the 8-bit quantisation floor caps it
    assert LAMBDA_QUANT == pytest.approx(-math.log((2 / 255) ** 2 / 12))
    flat = np.zeros((1, 4))  # a constant image: still a valid span
    lo, hi = schedule_bounds(flat, min_span=1.0)
    assert hi[0] - lo[0] == pytest.approx(1.0)


def test_luminance_rec601_and_uint8_mapping() -> None:
    u = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    u[..., 0] = 255
    x = uint8_to_unit(u)
    assert x.shape == (1, 3, 4, 4) and x[0, 0].min() == 1.0 and x[0, 1].max() == -1.0
    np.testing.assert_allclose(luminance(x), 0.299 - 0.587 - 0.114)


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="at least 4x4"):
        rapsd(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        rapsd(np.full((8, 8), np.nan))
    with pytest.raises(TypeError, match="float"):
        rapsd(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        rapsd(np.zeros(8))
    with pytest.raises(ValueError, match="RGB"):
        luminance(np.zeros((2, 4, 8, 8)))
    with pytest.raises(ValueError, match="eps_lo < eps_hi"):
        schedule_bounds(np.ones((1, 4)), eps_lo=1.0, eps_hi=0.5)
    with pytest.raises(ValueError, match="f_lo"):
        power_law_fit(np.ones((1, 8)), f_lo=5, f_hi=3)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        image_statistics(np.zeros((3, 8, 8)), SpectraParams())
