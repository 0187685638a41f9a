"""The CUDA-graph wrapper of the sampling network: where it must stay out of the way (this
machine has no GPU: the recording and replay paths run in benchmarks/sample_graphs.py on the
GPU machine, which compares the images with eager sampling)."""

from __future__ import annotations

import pytest
import torch

from components.cuda_graphs import GraphedBackbone, use_cuda_graphs
from components.generate import GenerativeModel, generate
from components.networks.registry import build_network
from components.schedules import CosineSchedule
from serving.memory import memory_estimate_bytes


def _model(net) -> GenerativeModel:
    return GenerativeModel(net=net, prediction="x0", n_cond=1, resolution=16, in_channels=3,
                           num_classes=4, schedule=CosineSchedule())


def test_off_the_gpu_the_wrapper_is_the_network_itself():
    torch.manual_seed(0)
    net = build_network("unet-debug", num_classes=4).train(False)
    wrapped = use_cuda_graphs(net)
    assert isinstance(wrapped, GraphedBackbone) and use_cuda_graphs(wrapped) is wrapped
    assert wrapped.unwrapped is net and wrapped.num_classes == net.num_classes  # attributes pass
    a = generate(_model(net), seeds=[1, 2], steps=3, class_labels=[0, 3])
    b = generate(_model(wrapped), seeds=[1, 2], steps=3, class_labels=[0, 3])
    assert torch.equal(a, b) and wrapped.graphs == 0  # CPU: nothing recorded
    # the memory estimate profiles the network itself, not the wrapper
    assert memory_estimate_bytes(_model(wrapped), n_images=4) == \
        memory_estimate_bytes(_model(net), n_images=4)
    x, c = torch.randn(2, 3, 16, 16, requires_grad=True), torch.zeros(2, 1)
    wrapped(x, c, torch.tensor([0, 1])).sum().backward()  # with gradients: plain calls
    assert x.grad is not None


def test_bucket_sizes_are_checked():
    net = build_network("unet-debug", num_classes=4)
    for bad in ((), (0, 4), (8, 4), (4, 4)):
        with pytest.raises(ValueError, match="buckets"):
            GraphedBackbone(net, buckets=bad)
