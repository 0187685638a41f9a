"""The multi-scale loss: unit-variance targets, coefficients, and its decomposition."""

from __future__ import annotations

import pytest
import torch

from components.multiscale import MultiScaleObjective, default_coefficients, multiscale_targets
from components.networks import dimr
from components.scale import downsample_mean


def test_targets_have_unit_variance_and_are_block_means() -> None:
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(64, 3, 32, 32, generator=gen)
    targets = multiscale_targets(eps, [4, 2, 1])
    assert [t.shape[-1] for t in targets] == [8, 16, 32]
    for t in targets:
        assert abs(float(t.var()) - 1.0) < 0.03
        assert abs(float(t.mean())) < 0.02
    # without the factor k the pooled noise has variance 1/k^2: the correction matters
    assert abs(float(downsample_mean(eps, 4).var()) - 1 / 16) < 0.005
    torch.testing.assert_close(targets[0], 4 * downsample_mean(eps, 4))
    with pytest.raises(ValueError, match="not divisible"):
        multiscale_targets(torch.randn(1, 3, 10, 10), [4])


def test_default_coefficients() -> None:
    assert default_coefficients(2) == [0.25, 1.0]
    assert default_coefficients(3) == [1 / 16, 1 / 4, 1.0]


def test_loss_is_the_weighted_sum_of_branch_mses() -> None:
    net = dimr.build(**dimr.PRESETS["dimr-debug"])
    batch = {"images": torch.rand(4, 3, 16, 16) * 2 - 1, "labels": torch.arange(4),
             "lambda_bounds": None}
    torch.manual_seed(3)
    loss, logs = MultiScaleObjective("cosine", coefficients=[0.5, 2.0])(net, batch)
    want = 0.5 * logs["mse_branch0"] + 2.0 * logs["mse_branch1"]
    torch.testing.assert_close(loss.detach(), want)
    # zero-initialised heads predict 0: each branch mse is the target's second moment, ~1
    assert abs(float(logs["mse_branch0"]) - 1) < 0.2 and abs(float(logs["mse_branch1"]) - 1) < 0.2
    with pytest.raises(ValueError, match="2 branches"):
        MultiScaleObjective("cosine", coefficients=[1.0, 1.0, 1.0])(net, batch)
    with pytest.raises(ValueError, match="coefficients"):
        MultiScaleObjective("cosine", coefficients=[-1.0, 1.0])


def test_spectral_schedules_condition_on_three_columns() -> None:
    net = dimr.build(**{**dimr.PRESETS["dimr-debug"], "n_cond": 3})
    obj = MultiScaleObjective(None, n_cond=3, per_instance="cosine")
    bounds = torch.tensor([[8.0, -6.0], [5.0, -10.0]])
    batch = {"images": torch.zeros(2, 3, 16, 16), "labels": None, "lambda_bounds": bounds}
    loss, logs = obj(net, batch)
    assert torch.isfinite(loss)
    lam = float(logs["lambda_mean"])
    assert -10.0 <= lam <= 8.0
