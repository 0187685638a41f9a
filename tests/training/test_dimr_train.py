"""Debug presets of DiMR (multi-scale loss) and DiT (eps loss) train on CPU and sample."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from components.diffusion import Cond, NetworkDenoiser
from components.multiscale import MultiScaleObjective
from components.networks.registry import build_network
from components.objectives import DiffusionObjective
from components.samplers import SAMPLERS, generators_from_seeds, get_sampler, lambda_grid
from components.schedules import build_schedule

STEPS = 30


def _images(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth structured images in [-1, 1] (gradients + a class-dependent colour)."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n,), generator=gen)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    colour = torch.linspace(-0.8, 0.8, 10)[labels][:, None, None, None]
    img = 0.5 * torch.stack([xx, yy, xx * yy])[None] + 0.5 * colour
    return img.clamp(-1, 1).expand(n, -1, -1, -1).contiguous(), labels


def _train(net: nn.Module, objective) -> list[float]:
    images, labels = _images()
    opt = torch.optim.AdamW(net.param_groups(0.01), lr=3e-3)
    losses = []
    for step in range(STEPS):
        torch.manual_seed(1000 + step)  # the loop seeds the global RNG per step
        loss, logs = objective(net, {"images": images, "labels": labels, "lambda_bounds": None})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(logs["loss"]))
    return losses


@pytest.mark.parametrize("preset", ["dimr-debug", "dit-debug"])
def test_debug_preset_trains_and_samples(preset: str) -> None:
    torch.manual_seed(0)
    net = build_network(preset)
    schedule = build_schedule("cosine")
    if preset.startswith("dimr"):
        objective = MultiScaleObjective(schedule, label_dropout=0.1)
    else:
        objective = DiffusionObjective(schedule=schedule, label_dropout=0.1)
    losses = _train(net, objective)
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.5 * first, (first, last)

    net.eval()
    denoiser = NetworkDenoiser(net, "eps")
    cond = Cond(torch.tensor([1, 5, -1]))
    lambdas = lambda_grid(schedule, 5)
    for name in SAMPLERS:
        x_init = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
        out = get_sampler(name)(denoiser, x_init, lambdas, cond, generators_from_seeds([1, 2, 3]))
        assert out.shape == (3, 3, 16, 16) and torch.isfinite(out).all(), name
    # a sample does not depend on its batch (per-image generators, no batch statistics)
    x_init = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    ddpm = get_sampler("ddpm")
    full = ddpm(denoiser, x_init, lambdas, cond, generators_from_seeds([1, 2, 3]))
    one = ddpm(denoiser, x_init[1:2], lambdas, cond.index(slice(1, 2)), generators_from_seeds([2]))
    torch.testing.assert_close(full[1:2], one, atol=2e-3, rtol=2e-3)  # float batching noise
