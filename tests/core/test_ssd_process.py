"""SSD resolution schedules, the one-level reduction to DDPM-x0, and the objective's batches."""

from __future__ import annotations

import math

import pytest
import torch

from components import degradation as dg
from components.networks.unet import build as build_unet
from components.ssd import (
    SSDObjective,
    SSDProcess,
    level_resolutions,
    resolution_schedule,
    respaced_steps,
)


def runs(rs: list[int]) -> list[tuple[int, int, int]]:
    """(resolution, first step, last step) of each run of equal resolutions."""
    out = []
    for k, r in enumerate(rs):
        if out and out[-1][0] == r:
            out[-1] = (r, out[-1][1], k)
        else:
            out.append((r, k, k))
    return out


def test_convex_schedule_64px_4_levels_matches_the_paper():
    rs = resolution_schedule(64, 4, T=1000, kind="convex", gamma=0.5)
    assert runs(rs) == [(64, 0, 437), (32, 438, 749), (16, 750, 936), (8, 937, 999)]


def test_equal_schedule_and_other_bases():
    assert runs(resolution_schedule(32, 2, T=10, kind="equal")) == [(32, 0, 4), (16, 5, 9)]
    assert level_resolutions(128, 3) == [32, 64, 128]
    rs = resolution_schedule(256, 6, T=1000, kind="convex", gamma=0.5)
    assert [r for r, _, _ in runs(rs)] == [256, 128, 64, 32, 16, 8]
    assert resolution_schedule(64, 1, T=20) == [64] * 20


@pytest.mark.parametrize("kw, match", [
    (dict(base_resolution=40, levels=5), "divisible"),
    (dict(base_resolution=64, levels=0), "levels"),
    (dict(base_resolution=64, levels=2, kind="cubic"), "resolution_schedule"),
    (dict(base_resolution=64, levels=2, gamma=0.0), "gamma"),
])
def test_bad_schedule_settings_name_the_problem(kw, match):
    with pytest.raises(ValueError, match=match):
        resolution_schedule(**kw)


def test_one_level_is_ddpm_x0():
    p = SSDProcess(16, levels=1, T=1000)
    assert set(p.resolutions) == {16} and len(p.segments) == 1
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    x_k = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    z = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    for k in (1, 10, 500, 999):  # 0-based state k = DDPM's 1-based t = k + 1
        mean_ref, var_ref = dg.ddpm_posterior(x_k, x0, p.alpha_bar, k + 1)
        torch.testing.assert_close(p.posterior_step(x_k, x0, k - 1, k, None), mean_ref,
                                   atol=1e-10, rtol=0)
        torch.testing.assert_close(p.posterior_step(x_k, x0, k - 1, k, z), mean_ref
                                   + math.sqrt(var_ref) * z, atol=1e-10, rtol=0)
    # the last step returns the x0 prediction (DDPM's x_0 = mean at t = 1 with x0 known)
    torch.testing.assert_close(p.posterior_step(x_k, x0, -1, 0, z), x0)


def test_one_level_objective_is_the_min_snr_x0_loss():
    torch.manual_seed(0)
    p = SSDProcess(16, levels=1, T=1000)
    net = build_unet(resolution=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(), dropout=0.0)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    torch.manual_seed(3)
    loss, logs = SSDObjective(p)(net, {"images": x0, "labels": None})
    # replay the same draws by hand: the x0 loss weighted by min(SNR, 5)
    torch.manual_seed(3)
    torch.randint(p.T, ())
    k = torch.randint(0, p.T, (4,))
    eps = torch.randn(4, 3, 16, 16)
    ab = p.alpha_bar[k].float()[:, None, None, None]
    x_k = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    lam = (ab.log() - (1 - ab).log()).flatten()
    out = net(x_k, lam[:, None] / 15, None)
    ref = (lam.exp().clamp(max=5) * (out - x0).square().mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert logs["resolution_in"] == logs["resolution_out"] == 16


def test_batch_time_sampling_shares_one_resolution_pair():
    p = SSDProcess(64, levels=4, T=1000)
    obj = SSDObjective(p)
    torch.manual_seed(0)
    seen = {}
    for _ in range(400):
        k = obj.sample_steps(8)
        pairs = {(p.res(int(i) - 1), p.res(int(i))) for i in k}
        assert len(pairs) == 1
        pair = pairs.pop()
        seen[pair] = seen.get(pair, 0) + 1
    # the big segments are visited in proportion to their length (64 px: 438 of 1000 steps)
    assert abs(seen[(64, 64)] / 400 - 0.437) < 0.08
    assert (32, 16) in seen or (64, 32) in seen or len(seen) >= 4


def test_respaced_steps():
    assert respaced_steps(1000, None) == list(range(1000))
    s = respaced_steps(1000, 50)
    assert s[0] == 0 and s[-1] == 999 and len(s) == 50 and s == sorted(s)
    with pytest.raises(ValueError, match="steps"):
        respaced_steps(1000, 1)


def test_respaced_transition_satisfies_psd_condition():
    p = SSDProcess(32, levels=3, T=1000)
    s = respaced_steps(1000, 10)
    for j, k in zip(s[:-1], s[1:], strict=True):
        x = torch.zeros(1, 3, p.res(j), p.res(j))
        assert dg.check_psd(p.transition(j, k), x.shape[1:], p.sigma(j), p.sigma(k), k) >= 0


def test_objective_rejects_wrong_image_size():
    with pytest.raises(ValueError, match="32 px"):
        SSDObjective(SSDProcess(32, levels=2))(None, {"images": torch.zeros(1, 3, 16, 16)})
