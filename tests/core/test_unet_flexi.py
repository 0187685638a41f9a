"""Flexi-UNet: shapes at every (input, output) resolution pair, FLOPs per level, full mode."""

from __future__ import annotations

import pytest
import torch

from components.networks import flexi_unet
from components.networks.registry import build_network, list_presets, preset_kwargs
from components.ssd import SSDProcess

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomised(net: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for p in net.parameters():  # leave the zero init so outputs depend on the inputs
        torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def test_presets_are_registered_with_ssd_settings():
    presets = list_presets()
    for name in ("ssd-64-4l", "ssd-64-2l", "ssd-32-3l", "ssd-debug"):
        assert presets[name] == "flexi_unet"
        s = flexi_unet.ssd_settings(name)
        # the UNet has at least as many levels as SSD has resolutions
        kw = flexi_unet.PRESETS[name]
        assert len(kw["channel_mult"]) >= s["levels"]
        SSDProcess(kw["resolution"], **s)
        baseline = flexi_unet.BASELINES[name]
        assert presets[baseline] == "unet"
        assert preset_kwargs(baseline)[1] == kw  # the same UNet width and layout
    with pytest.raises(ValueError, match="unknown SSD preset"):
        flexi_unet.ssd_settings("nope")


@pytest.mark.parametrize("mode", ["flexi", "full"])
def test_output_shape_at_every_resolution_pair(mode):
    net = _randomised(build_network("ssd-debug", mode=mode))  # 16 px, levels 16, 8, 4
    res = [16, 8, 4]
    with torch.no_grad():
        for r_in in res:
            for r_out in res:
                x = torch.randn(2, 3, r_in, r_in)
                if r_out < r_in:
                    with pytest.raises(ValueError, match="below the input"):
                        net(x, torch.zeros(2, 1), None, out_resolution=r_out)
                    continue
                out = net(x, torch.zeros(2, 1), None, out_resolution=r_out)
                assert out.shape == (2, 3, r_out, r_out)
                assert torch.isfinite(out).all() and out.abs().sum() > 0
        with pytest.raises(ValueError, match="not a level"):
            net(torch.randn(1, 3, 12, 12), torch.zeros(1, 1), None)


def test_full_resolution_flexi_equals_the_plain_unet():
    net = _randomised(build_network("ssd-debug"))
    x, c = torch.randn(2, 3, 16, 16), torch.rand(2, 1)
    with torch.no_grad():
        a = net(x, c, None)
        b = flexi_unet.UNet.forward(net, x, c, None)
    torch.testing.assert_close(a, b)


def test_low_resolution_path_skips_the_top_encoder_and_gets_gradients():
    net = build_network("ssd-debug")
    torch.nn.init.normal_(net.head.conv.weight, std=0.05)
    out = net(torch.randn(2, 3, 8, 8), torch.zeros(2, 1), None, out_resolution=16)
    out.square().mean().backward()
    assert net.in_adapters[1].weight.grad.abs().sum() > 0
    assert net.conv_in.weight.grad is None  # the 16 px encoder level did not run
    assert net.down[0][0].res.conv1.weight.grad is None
    assert net.up[0][0].res.conv2.weight.grad.abs().sum() > 0  # the extra up-stage ran


def test_fewer_flops_at_low_resolution_per_level():
    """FLOPs per step at each SSD level of ssd-64-4l (64 -> 8 px), counted on the meta device."""
    with torch.device("meta"):
        net = build_network("ssd-64-4l")
    pairs = [(64, 64), (32, 64), (32, 32), (16, 32), (16, 16), (8, 16), (8, 8)]
    flops = {p: flexi_unet.forward_flops(net, *p) for p in pairs}
    print("\nssd-64-4l GFLOPs per step (batch 1):")
    for (r_in, r_out), f in flops.items():
        print(f"  {r_in:>2} -> {r_out:>2}: {f / 1e9:7.2f}")
    equal = [flops[(r, r)] for r in (64, 32, 16, 8)]
    assert all(a > 1.5 * b for a, b in zip(equal, equal[1:], strict=False))
    for r in (32, 16, 8):  # a resolution-increasing step costs between its two levels
        assert flops[(r, r)] < flops[(r, 2 * r)] < flops[(2 * r, 2 * r)]
    # whole 1000-step SSD-4L chain against 1000 full-resolution steps: at least 1.5x fewer
    p = SSDProcess(64, levels=4)
    total = sum(flops[(p.res(k), p.res(k - 1))] for k in range(p.T))
    assert 1000 * flops[(64, 64)] / total > 1.5
