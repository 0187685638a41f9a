"""The ssd-debug preset trains on CPU and samples a batch end to end (respaced and full),
through ``generate`` with guidance, as the reference posterior chain does without it."""

from __future__ import annotations

import pytest
import torch

from components.generate import GenerativeModel, generate
from components.networks import flexi_unet
from components.networks.registry import build_network
from components.schedules import ddpm_linear
from components.ssd import SSDObjective, SSDProcess, call_net, respaced_steps, ssd_sample

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int) -> torch.Tensor:
    """Smooth 16 px test images in [-1, 1] (a colour gradient with a random phase)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 16), torch.linspace(0, 3, 16), indexing="ij")
    phase = torch.rand(n, 3, 1, 1, generator=g) * 6
    return torch.sin(xx + yy + phase)


@torch.no_grad()
def reference_chain(net, process: SSDProcess, seeds: list[int], labels: list[int] | None,
                    steps: int) -> torch.Tensor:
    """The SSD posterior chain written out on the bare network, without the denoiser
    contract: x0 from ``call_net`` at r(j), clipped, then ``posterior_step``."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    ks = respaced_steps(process.T, steps)
    r = process.res(ks[-1])
    x = torch.stack([torch.randn(3, r, r, generator=g) for g in gens])
    y = None if labels is None else torch.tensor(labels)
    lams = process.lambda_(torch.tensor(ks))
    for i in reversed(range(len(ks))):
        k, j = ks[i], ks[i - 1] if i > 0 else -1
        x0_hat = call_net(net, x, lams[i].expand(len(seeds)), y, process.res(j), True).clamp(-1, 1)
        z = None
        if j >= 0:
            rj = process.res(j)
            z = torch.stack([torch.randn(3, rj, rj, generator=g) for g in gens])
        x = process.posterior_step(x, x0_hat, j, k, z)
    return x


@pytest.fixture(scope="module")
def trained(one_thread):
    torch.manual_seed(0)
    net = build_network("ssd-debug", num_classes=2)
    process = SSDProcess(16, **flexi_unet.ssd_settings("ssd-debug"))
    objective = SSDObjective(process, label_dropout=0.1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    batch = {"images": _images(8), "labels": torch.tensor([0, 1] * 4)}
    losses, pairs = [], set()
    for step in range(12):
        torch.manual_seed(100 + step)  # the loop seeds the global RNG per step
        loss, logs = objective(net, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        pairs.add((logs["resolution_in"], logs["resolution_out"]))
    return net.eval(), process, losses, pairs


def test_debug_preset_trains(trained):
    net, _, losses, pairs = trained
    assert all(torch.isfinite(torch.tensor(losses)))
    assert len(pairs) >= 2  # more than one resolution pair was trained
    assert net.in_adapters[1].weight.abs().sum() > 0


def test_training_is_reproducible_under_the_global_seed():
    process = SSDProcess(16, **flexi_unet.ssd_settings("ssd-debug"))
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        net = build_network("ssd-debug")
        torch.manual_seed(5)
        loss, _ = SSDObjective(process)(net, {"images": _images(4), "labels": None})
        out.append(float(loss.detach()))
    assert out[0] == out[1]


def test_respaced_sampling_end_to_end_and_batch_independence(trained):
    net, process, _, _ = trained
    gens = [torch.Generator().manual_seed(s) for s in (3, 4, 5)]
    labels = torch.tensor([0, 1, 0])
    x = ssd_sample(net, process, 3, gens, labels, steps=20)
    assert x.shape == (3, 3, 16, 16) and torch.isfinite(x).all()
    # image 2 alone, from the same seed, is the same image
    alone = ssd_sample(net, process, 1, [torch.Generator().manual_seed(4)], labels[1:2], steps=20)
    torch.testing.assert_close(alone[0], x[1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(x[0], x[2])


def ssd_model(net, process: SSDProcess) -> GenerativeModel:
    return GenerativeModel(net=net, prediction="x0", n_cond=1, resolution=16, in_channels=3,
                           num_classes=2, schedule=ddpm_linear(), kind="ssd",
                           extra=process.settings())


def test_generate_runs_the_same_posterior_chain(trained):
    net, process, _, _ = trained
    model = ssd_model(net, process)
    for labels in ([1, 0], None):
        a = generate(model, seeds=[7, 8], steps=10, class_labels=labels)
        ref = reference_chain(net, process, [7, 8], labels, 10).clamp(-1, 1)
        assert a.shape == (2, 3, 16, 16)
        torch.testing.assert_close(a, ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="class_labels has 1"):
        generate(model, seeds=[7, 8], steps=10, class_labels=[1])


def test_guidance_scale_and_class_labels_change_the_images(trained):
    """Classifier-free guidance on a trained class-conditional SSD model: a scale of 3 moves
    the images away from the conditional ones at the same seeds, and the class moves them."""
    net, process, _, _ = trained
    model = ssd_model(net, process)
    seeds = [11, 12, 13, 14]
    cond = generate(model, seeds=seeds, steps=10, class_labels=[0, 0, 1, 1])
    guided = generate(model, seeds=seeds, steps=10, class_labels=[0, 0, 1, 1], cfg_scale=3.0)
    swapped = generate(model, seeds=seeds, steps=10, class_labels=[1, 1, 0, 0])
    per_image = (guided - cond).abs().flatten(1).mean(1)
    assert (per_image > 0.02).all(), per_image
    per_image = (swapped - cond).abs().flatten(1).mean(1)
    assert (per_image > 0.02).all(), per_image
    # the guided images move further from the unconditional ones than the conditional do
    uncond = reference_chain(net, process, seeds, [-1] * 4, 10).clamp(-1, 1)
    assert (guided - uncond).norm() > (cond - uncond).norm()


@pytest.mark.slow
def test_full_1000_step_sampling(trained):
    net, process, _, _ = trained
    x = ssd_sample(net, process, 2, [torch.Generator().manual_seed(s) for s in (1, 2)],
                   torch.tensor([0, 1]), steps=None)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    assert x.abs().max() <= 1.0 + 1e-6
