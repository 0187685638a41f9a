"""Per-image spectral schedules and the schedule mixture model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from components.spectra import gaussian_random_field, image_statistics
from components.spectral_schedules import (
    KINDS,
    PARAM_NAMES,
    ScheduleModel,
    lambda_bounds,
    params_from_stats,
    spectral_lambda,
    spectral_lambda_grid,
)

P = torch.tensor([[0.0, 2.0, -6.0, 9.0], [1.0, 1.0, -5.0, 10.0], [-1.0, 3.2, -9.0, 12.0],
                  [0.5, 0.3, -12.0, 12.1], [0.0, 2.0000001, -3.0, 3.0]], dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_end_points_and_strict_decrease(kind: str) -> None:
    lam0 = spectral_lambda(torch.zeros(len(P)), P, kind)
    lam1 = spectral_lambda(torch.ones(len(P)), P, kind)
    torch.testing.assert_close(lam0, P[:, 3])
    torch.testing.assert_close(lam1, P[:, 2])
    grid = spectral_lambda_grid(P, 200, kind)  # (201, B), noisiest first
    assert grid.shape == (201, len(P))
    assert torch.isfinite(grid).all()
    assert (grid[1:] > grid[:-1]).all()  # lambda increases as t goes 1 -> 0


def test_power_focused_is_linear_for_beta_two_and_mixed_is_the_average() -> None:
    p = torch.tensor([[0.0, 2.0, -6.0, 10.0]], dtype=torch.float64)
    t = torch.tensor([0.25])
    assert spectral_lambda(t, p, "power").item() == pytest.approx(10.0 - 0.25 * 16.0)
    for tt in (0.1, 0.5, 0.9):
        t3 = torch.full((len(P),), tt)
        avg = 0.5 * (spectral_lambda(t3, P, "frequency") + spectral_lambda(t3, P, "power"))
        torch.testing.assert_close(spectral_lambda(t3, P, "mixed"), avg)


def test_frequency_focused_sweeps_the_snr1_frequency_linearly() -> None:
    log_a, beta, lo, hi = 0.7, 2.5, -6.0, 9.0
    p = torch.tensor([[log_a, beta, lo, hi]], dtype=torch.float64)
    ts = torch.linspace(0, 1, 11, dtype=torch.float64)
    lam = torch.stack([spectral_lambda(t, p, "frequency")[0] for t in ts])
    f_c = torch.exp((log_a + lam) / beta)  # A e^lambda f^-beta = 1
    d = f_c[1:] - f_c[:-1]
    torch.testing.assert_close(d, d.mean().expand_as(d))


def test_bad_params_and_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        spectral_lambda(torch.zeros(1), P[:1], "cosine")
    with pytest.raises(ValueError, match="lambda_max"):
        spectral_lambda(torch.zeros(1), torch.tensor([[0.0, 2.0, 5.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        spectral_lambda(torch.zeros(1), torch.tensor([[0.0, float("nan"), -5.0, 1.0]]))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        spectral_lambda(torch.zeros(1), torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        spectral_lambda(torch.full((1,), 1.5), P[:1])
    with pytest.raises(ValueError, match="steps"):
        spectral_lambda_grid(P, 0)
    with pytest.raises(ValueError, match="format"):
        ScheduleModel.from_json({"global": {}})


def test_bounds_for_cond() -> None:
    b = lambda_bounds(P)
    torch.testing.assert_close(b[:, 0], P[:, 3])
    torch.testing.assert_close(b[:, 1], P[:, 2])


def _two_cluster_params(n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.normal([0.0, 2.0, -6.0, 9.0], [0.3, 0.2, 0.5, 0.5], (n, 4))
    b = rng.normal([2.0, 1.2, -4.0, 7.0], [0.3, 0.1, 0.4, 0.4], (n, 4))
    return np.concatenate([a, b]), np.repeat([0, 1], n)


def test_mixture_recovers_clusters_and_round_trips_json() -> None:
    x, y = _two_cluster_params()
    model = ScheduleModel.fit(x, y, n_components=2, per_class=True, seed=0, meta={"eps_lo": 0.01})
    means = model.global_mixture.means[np.argsort(model.global_mixture.means[:, 0])]
    np.testing.assert_allclose(means, [[0.0, 2.0, -6.0, 9.0], [2.0, 1.2, -4.0, 7.0]], atol=0.1)
    loaded = ScheduleModel.from_json(json.loads(json.dumps(model.to_json())))
    assert loaded.meta == {"eps_lo": 0.01} and sorted(loaded.per_class) == [0, 1]
    s1 = loaded.sample(4000, seed=5)
    s2 = model.sample(4000, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(s1, s2)
    assert s1.shape == (4000, len(PARAM_NAMES)) and s1.dtype == torch.float32
    np.testing.assert_allclose(s1.mean(0).numpy(), x.mean(0), atol=0.1)
    c1 = loaded.sample(2000, seed=1, class_labels=torch.ones(2000, dtype=torch.long))
    np.testing.assert_allclose(c1.mean(0).numpy(), [2.0, 1.2, -4.0, 7.0], atol=0.1)
    # every sample is a valid schedule
    grid = spectral_lambda_grid(s1[:256], 16)
    assert (grid[1:] > grid[:-1]).all()


def test_params_from_image_statistics() -> None:
    g = gaussian_random_field(16, 32, 2.0, seed=0, variance=0.1)
    im = np.repeat(g[:, None], 3, axis=1)
    p = params_from_stats(image_statistics(im))
    assert p.shape == (16, 4)
    assert abs(p[:, 1].mean() - 2.0) < 0.1
    assert (p[:, 3] > p[:, 2]).all()
    lam = spectral_lambda(torch.rand(16), torch.tensor(p))
    assert ((lam >= torch.tensor(p[:, 2]) - 1e-9) & (lam <= torch.tensor(p[:, 3]) + 1e-9)).all()


def test_a_flat_or_rising_spectrum_gets_the_flattest_falling_schedule():
    # a star field or noise measures beta <= 0: training must not fail on it
    from components.spectral_schedules import BETA_MIN, lambda_bounds, spectral_lambda

    p = torch.tensor([[0.0, -0.4, -10.0, 8.0], [0.0, 0.0, -10.0, 8.0], [0.0, BETA_MIN, -10.0, 8.0]],
                     dtype=torch.float64)
    torch.testing.assert_close(lambda_bounds(p)[:, 0], p[:, 3])
    t = torch.full((3,), 0.3, dtype=torch.float64)
    lam = spectral_lambda(t, p)
    assert torch.isfinite(lam).all() and float(lam[0]) == float(lam[2]) == float(lam[1])
