"""Each network family traces as one graph under torch.compile, class labels included: a host
read inside the forward (a label range check on the GPU, a ``.item()``) would break the graph
and sync the host every training step. Dynamo alone (``backend="eager"``), so it runs on CPU."""

from __future__ import annotations

import pytest
import torch

from components.networks.registry import build_network


@pytest.mark.parametrize("preset", ["unet-debug", "dit-debug", "dimr-debug"])
def test_the_training_forward_and_backward_are_one_graph(preset):
    torch.manual_seed(0)
    torch._dynamo.reset()
    net = build_network(preset, num_classes=4, resolution=16)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    c, labels = torch.rand(2, 1), torch.tensor([1, -1])
    want = net(x, c, labels)
    compiled = torch.compile(net, backend="eager", fullgraph=True)  # raises at a graph break
    got = compiled(x, c, labels)
    torch.testing.assert_close(got, want)
    got.square().mean().backward()
    labels_in = [p for n, p in net.named_parameters() if "class_embed" in n]
    assert x.grad is not None and labels_in and all(p.grad is not None for p in labels_in)
