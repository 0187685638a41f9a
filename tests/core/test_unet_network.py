"""The ADM/DDPM UNet backbone: the DDPM CIFAR-10 preset's size, shapes, gradients, classes."""

from __future__ import annotations

import pytest
import torch

from components.networks import unet
from components.networks.registry import build_network

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ddpm_cifar10_preset_has_35_7m_parameters():
    with torch.device("meta"):
        net = build_network("ddpm-cifar10")
    n = unet.count_parameters(net)
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n


@pytest.mark.parametrize("size", [32, 64])
def test_forward_backward(size):
    # Small width keeps the test fast; the layout is the ddpm-cifar10 one (4 levels, attn 16).
    kw = dict(unet.PRESETS["ddpm-cifar10"], model_channels=32, resolution=size)
    net = unet.build(**kw)
    x = torch.randn(2, 3, size, size)
    out = net(x, torch.tensor([[0.3], [-0.7]]), None)
    assert out.shape == x.shape
    # Zero-initialised head: the untrained output is exactly zero; perturb it to test grads.
    torch.nn.init.normal_(net.head.conv.weight, std=0.02)
    out = net(x, torch.tensor([[0.3], [-0.7]]), None)
    out.square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:5])
    assert net.conv_in.weight.grad.abs().sum() > 0
    assert torch.isfinite(net.conv_in.weight.grad).all()


def test_full_preset_forward_at_32():
    net = build_network("ddpm-cifar10").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert net(x, torch.zeros(1, 1), None).shape == (1, 3, 32, 32)


def test_noise_level_and_class_change_the_output():
    torch.manual_seed(0)
    net = unet.build(**unet.PRESETS["unet-debug"], num_classes=3, n_cond=3)
    for p in net.parameters():  # leave the zero init so the output depends on the inputs
        torch.nn.init.normal_(p, std=0.05)
    net.eval()
    x = torch.randn(1, 3, 16, 16).repeat(2, 1, 1, 1)
    c = torch.tensor([[0.1, 0.5, -0.5], [0.2, 0.5, -0.5]])
    with torch.no_grad():
        a = net(x, c, torch.tensor([0, 0]))
        assert not torch.allclose(a[0], a[1])
        b = net(x, c[:1].repeat(2, 1), torch.tensor([1, -1]))
        assert not torch.allclose(b[0], b[1])
        # -1 and num_classes are both the null class; None means null for all.
        n1 = net(x, c, torch.tensor([-1, -1]))
        n2 = net(x, c, torch.tensor([3, 3]))
        n3 = net(x, c, None)
        torch.testing.assert_close(n1, n2)
        torch.testing.assert_close(n1, n3)


def test_bad_input_names_the_problem():
    net = unet.build(**unet.PRESETS["unet-debug"], num_classes=3)
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="c_noise"):
        net(x, torch.zeros(1, 3), None)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, torch.zeros(1, 1), torch.tensor([7]))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 3, 15, 15), torch.zeros(1, 1), None)
    with pytest.raises(ValueError, match="resolution"):
        unet.build(resolution=20, channel_mult=(1, 2, 2, 2))


def test_channels_last_matches_contiguous():
    net = unet.build(**unet.PRESETS["unet-debug"]).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 16, 16)
    c = torch.zeros(2, 1)
    with torch.no_grad():
        a = net(x, c, None)
        b = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), c)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
