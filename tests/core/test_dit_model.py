"""DiT with adaLN-Zero: identity at init, shapes, conditioning, the published size."""

from __future__ import annotations

import pytest
import torch

from components.networks import dit
from components.networks.tdln import count_parameters


def test_dit_xl2_has_the_published_parameter_count() -> None:
    with torch.device("meta"):
        net = dit.build(in_channels=4, resolution=32, num_classes=1000, patch=2,
                        dim=1152, depth=28, num_heads=16)
    n = count_parameters(net)
    assert abs(n - 675.1e6) / 675.1e6 < 0.001, n  # DiT-XL/2: 675M (ours predicts no variance)


def test_adaln_zero_starts_at_zero_and_learns_conditioning() -> None:
    torch.manual_seed(0)
    net = dit.build(**dit.PRESETS["dit-debug"])
    x, c = torch.randn(3, 3, 16, 16), torch.tensor([[0.3], [0.3], [-0.3]])
    y = torch.tensor([2, -1, 2])
    with torch.no_grad():
        assert net(x, c, y).abs().max() == 0  # zero-initialised final layer
        gen = torch.Generator().manual_seed(1)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        same = x[:1].expand(3, -1, -1, -1)
        out = net(same, c, y)
        assert out.shape == (3, 3, 16, 16)
        assert (out[0] - out[1]).abs().max() > 1e-4  # class 2 vs null
        assert (out[0] - out[2]).abs().max() > 1e-4  # two noise levels
        torch.testing.assert_close(net(x, c, None), net(x, c, torch.full((3,), -1)))


def test_sincos_position_embedding() -> None:
    pe = dit.sincos_2d(16, 4)
    assert pe.shape == (16, 16)
    # each axis: [sin(4 freqs), cos(4 freqs)], so sin^2 + cos^2 = 1
    assert torch.allclose(pe[:, :4].square() + pe[:, 4:8].square(), torch.ones(16, 4))
    # rows share the first half (row coordinate), columns the second half
    assert torch.equal(pe[0, :8], pe[1, :8]) and torch.equal(pe[0, 8:], pe[4, 8:])
    with pytest.raises(ValueError, match="divisible by 4"):
        dit.sincos_2d(18, 4)


def test_dit_bad_inputs_raise() -> None:
    net = dit.build(**dit.PRESETS["dit-debug"])
    with pytest.raises(ValueError, match="c_noise"):
        net(torch.randn(1, 3, 16, 16), torch.zeros(1, 3), None)
    with pytest.raises(ValueError, match="class labels"):
        net(torch.randn(1, 3, 16, 16), torch.zeros(1, 1), torch.tensor([11]))
    with pytest.raises(ValueError, match="not divisible"):
        dit.build(**{**dit.PRESETS["dit-debug"], "resolution": 15})
