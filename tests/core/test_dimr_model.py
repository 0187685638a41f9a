"""DiMR network: branch resolutions, conditioning, parameter counts, FLOP matching."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from components.networks import dimr, dit
from components.networks.registry import build_network, list_presets
from components.networks.tdln import TDRMSNorm, count_parameters

DEBUG = dimr.PRESETS["dimr-debug"]
THREE = dict(in_channels=3, resolution=16, num_classes=0, branches=[
    dict(kind="transformer", dim=32, depth=3, num_heads=2, downsample=2, patch=2),
    dict(kind="convnext", dim=16, depth=1, downsample=2),
    dict(kind="convnext", dim=8, depth=1),
])


def _perturb_all(model: torch.nn.Module, seed: int = 0) -> None:
    """Move zero-initialised heads and TD parameters off their init, so outputs are not 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_each_branch_predicts_at_its_resolution() -> None:
    torch.manual_seed(0)
    x, c = torch.randn(2, 3, 16, 16), torch.rand(2, 1) * 2 - 1
    two = dimr.build(**DEBUG)
    assert [o.shape[-1] for o in two.forward_all(x, c, torch.tensor([1, 2]))] == [8, 16]
    assert two.branch_factors == [2, 1]
    three = dimr.build(**THREE)
    outs = three.forward_all(x, c, None)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 4, 4), (2, 3, 8, 8), (2, 3, 16, 16)]
    assert three.branch_factors == [4, 2, 1]


@pytest.mark.parametrize("time_norm", ["td", "ada_zero"])
def test_forward_is_the_finest_branch_and_depends_on_time_and_class(time_norm: str) -> None:
    torch.manual_seed(0)
    net = dimr.build(**DEBUG, time_norm=time_norm)
    _perturb_all(net)
    x = torch.randn(3, 3, 16, 16)
    c, y = torch.tensor([[0.5], [0.5], [-0.5]]), torch.tensor([4, -1, 4])
    with torch.no_grad():
        out = net(x, c, y)
        torch.testing.assert_close(out, net.forward_all(x, c, y)[-1])
        assert out.shape == x.shape
        # label None means the null class for every image
        torch.testing.assert_close(net(x, c, torch.full((3,), -1)), net(x, c, None))
        same_x = x[:1].expand(3, -1, -1, -1)
        o = net(same_x, c, y)
        assert (o[0] - o[1]).abs().max() > 1e-4  # class 4 vs null class
        assert (o[0] - o[2]).abs().max() > 1e-4  # time 0.5 vs -0.5


def test_spectral_bounds_enter_through_a_zero_initialised_projection() -> None:
    net = dimr.build(**{**DEBUG, "n_cond": 3})
    x = torch.randn(2, 3, 16, 16)
    c1, c2 = torch.tensor([[0.1, 0.9, -0.9]] * 2), torch.tensor([[0.1, 0.2, -0.3]] * 2)
    with torch.no_grad():
        torch.testing.assert_close(net(x, c1, None), net(x, c2, None))  # inert at init
        _perturb_all(net)
        assert (net(x, c1, None) - net(x, c2, None)).abs().max() > 1e-5


def test_bad_inputs_and_configs_raise() -> None:
    net = dimr.build(**DEBUG)
    x, c = torch.randn(2, 3, 16, 16), torch.zeros(2, 1)
    with pytest.raises(ValueError, match="class labels"):
        net(x, c, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="c_noise"):
        net(x, torch.zeros(2, 3), None)
    with pytest.raises(ValueError, match=r"x must be \(B, 3"):
        net(torch.randn(2, 1, 16, 16), c, None)
    with pytest.raises(ValueError, match="odd number of blocks"):
        dimr.build(**{**DEBUG, "branches": [{**DEBUG["branches"][0], "depth": 2}]})
    with pytest.raises(ValueError, match="not divisible"):
        dimr.build(**{**DEBUG, "resolution": 15})
    with pytest.raises(ValueError, match="extra"):
        dimr.build(**{**DEBUG, "widht": 3})


def test_other_resolution_runs_with_resized_position_tables() -> None:
    net = dimr.build(**DEBUG)
    out = net(torch.randn(1, 3, 32, 32), torch.zeros(1, 1), torch.tensor([3]))
    assert out.shape == (1, 3, 32, 32)


def test_xl_2r_parameter_count_and_td_ln_cost() -> None:
    with torch.device("meta"):
        net = build_network("dimr-xl-2r")
    n = count_parameters(net)
    assert abs(n - 505.0e6) / 505.0e6 < 0.005, n  # published 505.0M
    assert net.branches[0].cfg.depth == 39 and net.branches[1].cfg.depth == 21
    # TD-LN per Transformer block (2 TD-RMSNorms of 4 d) vs adaLN-Zero's Linear(d -> 6 d)
    block = net.branches[0].stack.blocks[0]
    td = sum(count_parameters(m) for m in block.modules() if isinstance(m, TDRMSNorm))
    ada = dit.adaln_params_per_block(960)
    assert td == 2 * 4 * 960 == 7680 and ada == 5_535_360
    assert td / ada < 0.002
    print(f"\nDiMR-XL/2R {n / 1e6:.2f}M; TD-LN per block {td} vs adaLN-Zero {ada} "
          f"({100 * td / ada:.2f}%)")


def _train_flops(name: str) -> tuple[float, int]:
    with torch.device("meta"):
        net = build_network(name)
        res = net.cfg.resolution
        x, c = torch.randn(1, 3, res, res), torch.zeros(1, 1)
        y = torch.zeros(1, dtype=torch.long) if net.num_classes else None
    with FlopCounterMode(display=False) as fc:
        net(x, c, y).sum().backward()
    return fc.get_total_flops(), count_parameters(net)


@pytest.mark.parametrize("ours,baseline", [("dimr-32-2r", "dit-b2-32"),
                                           ("dimr-64-3r", "dit-b4-64")])
def test_pixel_presets_are_flop_matched_to_dit(ours: str, baseline: str) -> None:
    f_dimr, n_dimr = _train_flops(ours)
    f_dit, n_dit = _train_flops(baseline)
    print(f"\n{ours}: {f_dimr / 1e9:.1f} GFLOP/img, {n_dimr / 1e6:.2f}M; "
          f"{baseline}: {f_dit / 1e9:.1f} GFLOP/img, {n_dit / 1e6:.2f}M")
    assert abs(f_dimr / f_dit - 1) < 0.05


def test_presets_are_registered() -> None:
    presets = list_presets()
    for name in ("dimr-xl-2r", "dimr-32-2r", "dimr-64-3r", "dimr-debug"):
        assert presets[name] == "dimr"
    for name in ("dit-b2-32", "dit-b4-64", "dit-debug"):
        assert presets[name] == "dit"


def test_ada_zero_ablation_starts_as_identity_blocks_and_costs_parameters_not_flops() -> None:
    from components.networks.adaln import AdaRMSNorm, Gate

    torch.manual_seed(0)
    td = dimr.build(**DEBUG)
    torch.manual_seed(0)
    ada = dimr.build(**DEBUG, time_norm="ada_zero")
    assert not any(isinstance(m, TDRMSNorm) for m in ada.modules())
    assert sum(isinstance(m, AdaRMSNorm) for m in ada.modules()) == sum(
        isinstance(m, TDRMSNorm) for m in td.modules())
    x, c = torch.randn(2, 3, 16, 16), torch.tensor([[0.3], [-0.3]])
    block = ada.branches[0].stack.blocks[0]
    tokens = torch.randn(2, 5, block.attn.num_heads * block.attn.head_dim)
    e = ada.time_embed(torch.tensor([0.1, -0.4]))
    torch.testing.assert_close(block(tokens, e), tokens)  # zero gates: the identity
    assert sum(isinstance(m, Gate) for m in ada.modules()) == 2 * sum(
        len(b.stack.blocks) for b in ada.branches)
    flops = []
    for net in (td, ada):
        with FlopCounterMode(display=False) as fc:
            net(x, c, torch.tensor([1, 2]))
        flops.append(fc.get_total_flops())
    assert flops[1] / flops[0] < 1.01
    assert count_parameters(ada) > count_parameters(td)
    # the time reaches the output only through the embedding: it gets a gradient in training
    _perturb_all(ada)
    ada(x, c, torch.tensor([1, 2])).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in ada.time_embed.parameters())
