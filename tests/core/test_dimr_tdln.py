"""TD-LN: plain norms at init, the time formula after perturbation, optimizer groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components.networks import dimr, dit
from components.networks.tdln import (
    TDLayerNorm,
    TDRMSNorm,
    TimeDependentParameter,
    param_groups,
    time_coordinate,
)


def test_time_coordinate_is_the_cosine_time_of_the_log_snr() -> None:
    lam = torch.tensor([-40.0, -4.0, 0.0, 4.0, 40.0])
    c = time_coordinate((lam / 15)[:, None])
    # c = 2 t - 1 where the cosine schedule has log-SNR lambda at time t: +1 at high noise
    t = torch.tensor([1.0, 0.91436, 0.5, 0.08564, 0.0])
    torch.testing.assert_close(c, 2 * t - 1, atol=1e-4, rtol=0)
    assert bool((c[:-1] > c[1:]).all())  # strictly decreasing in lambda
    with pytest.raises(ValueError, match="c_noise"):
        time_coordinate(torch.zeros(4))


def test_td_norms_equal_plain_norms_at_init() -> None:
    torch.manual_seed(0)
    x, c = torch.randn(5, 7, 24) * 3 + 1, torch.rand(5) * 2 - 1
    rms, ln = TDRMSNorm(24), TDLayerNorm(24)
    torch.testing.assert_close(rms(x, c), nn.RMSNorm(24, eps=1e-6)(x))
    torch.testing.assert_close(ln(x, c), nn.LayerNorm(24, eps=1e-6)(x))
    # channels-last feature maps (B, H, W, d) too
    x4 = torch.randn(5, 3, 4, 24)
    torch.testing.assert_close(ln(x4, c), F.layer_norm(x4, (24,), eps=1e-6))


def _perturb(p: TimeDependentParameter, gen: torch.Generator) -> None:
    with torch.no_grad():
        for t in (p.p0, p.w_time, p.b_time):
            t.add_(torch.randn(t.shape, generator=gen))


def test_td_norms_follow_the_formula_after_perturbation() -> None:
    gen = torch.Generator().manual_seed(1)
    rms, ln = TDRMSNorm(16), TDLayerNorm(16)
    for p in (rms.scale, ln.scale, ln.bias):
        _perturb(p, gen)
    x = torch.randn(4, 9, 16, generator=gen)
    c = torch.tensor([-1.0, -0.3, 0.4, 1.0])

    def td(p: TimeDependentParameter) -> torch.Tensor:  # s p0 + (1 - s) p1, by hand
        s = torch.sigmoid((1 + p.w_time)[None] * c[:, None] + p.b_time[None])
        return (s * p.p0 + (1 - s) * p.p1)[:, None, :]  # (B, 1, d)

    with torch.no_grad():
        torch.testing.assert_close(rms(x, c), F.rms_norm(x, (16,), eps=1e-6) * td(rms.scale))
        want = F.layer_norm(x, (16,), eps=1e-6) * td(ln.scale) + td(ln.bias)
        torch.testing.assert_close(ln(x, c), want)
        # the same input at two times gives different outputs
        xs = x[:1].expand(2, -1, -1)
        y = ln(xs, torch.tensor([-1.0, 1.0]))
        assert (y[0] - y[1]).abs().max() > 1e-2


def _names(model: nn.Module, groups: list[dict]) -> tuple[set[str], set[str]]:
    ids = {id(p): n for n, p in model.named_parameters()}
    decay = {ids[id(p)] for p in groups[0]["params"]}
    no_decay = {ids[id(p)] for p in groups[1]["params"]}
    return decay, no_decay


def test_param_groups_exempt_td_parameters_from_decay() -> None:
    model = dimr.build(**dimr.PRESETS["dimr-debug"])
    groups = model.param_groups(0.03)
    assert [g["weight_decay"] for g in groups] == [0.03, 0.0]
    decay, no_decay = _names(model, groups)
    all_names = {n for n, _ in model.named_parameters()}
    assert decay | no_decay == all_names and not decay & no_decay  # each parameter once
    td = {n for n in all_names if n.endswith((".w_time", ".b_time"))}
    assert len(td) > 10 and td <= no_decay
    assert {n for n in all_names if n.endswith((".p0", ".p1"))} <= no_decay
    assert "class_embed.weight" in no_decay and "branches.0.pos_embed" in no_decay
    assert "branches.0.stack.blocks.0.attn.qkv.weight" in decay
    assert "branches.1.stack.blocks.0.dwconv.weight" in decay
    assert "cascades.0.linear.weight" in decay and "cascades.0.linear.bias" in no_decay
    opt = torch.optim.AdamW(groups, lr=1e-3)  # the groups are valid optimizer input
    assert len(opt.param_groups) == 2
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, -1.0)


def test_dit_param_groups() -> None:
    model = dit.build(**dit.PRESETS["dit-debug"])
    decay, no_decay = _names(model, model.param_groups(0.1))
    assert "blocks.0.adaln.weight" in decay and "blocks.0.adaln.bias" in no_decay
    assert "class_embed.weight" in no_decay
