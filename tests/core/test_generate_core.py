"""``components.generate``: per-seed reproducibility, resolutions, guidance options, checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from components.generate import GenerativeModel, generate, image_grid, to_uint8
from components.networks.registry import build_network
from components.options import OptionError
from components.schedules import CosineSchedule
from serving.memory import memory_estimate_bytes

STEPS = 4
torch.set_num_threads(1)  # 2 shared cores: oversubscribed threads make convs 100x slower


def debug_model(num_classes: int = 4, n_cond: int = 1, spectral=None, seed: int = 0,
                prediction: str = "x0"):
    torch.manual_seed(seed)
    net = build_network("unet-debug", num_classes=num_classes, n_cond=n_cond).eval()
    for p in net.parameters():  # the zero-initialised head would predict x0 = 0 everywhere
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    return GenerativeModel(net=net, prediction=prediction, n_cond=n_cond, resolution=16,
                           in_channels=3, num_classes=num_classes, schedule=CosineSchedule(),
                           spectral=spectral)


@pytest.fixture(scope="module")
def model() -> GenerativeModel:
    return debug_model()


def test_shape_range_and_seed_dependence(model):
    x = generate(model, seeds=[0, 1, 2], steps=STEPS)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert not torch.allclose(x[0], x[1])
    again = generate(model, seeds=[0, 1, 2], steps=STEPS)
    assert torch.equal(x, again)
    # an unnamed sampler is DDIM's
    assert torch.equal(x, generate(model, seeds=[0, 1, 2], steps=STEPS, sampler="ddim"))


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0),
                                         ("dpmpp_2m", 0.0)])
def test_image_depends_only_on_its_seed(model, sampler, eta):
    """The same seed alone and in a batch (at another position) gives the same image."""
    alone = generate(model, seeds=[11], steps=STEPS, sampler=sampler, eta=eta,
                     class_labels=[2])
    batch = generate(model, seeds=[3, 7, 11, 5], steps=STEPS, sampler=sampler, eta=eta,
                     class_labels=[0, 1, 2, 3])
    torch.testing.assert_close(batch[2], alone[0], atol=1e-4, rtol=0)


def test_upsample_guidance_doubles_resolution_and_is_batch_independent(model):
    x = generate(model, seeds=[4, 9], steps=STEPS, resolution=32, ug_theta=1.3, ug_eta=0.5)
    assert x.shape == (2, 3, 32, 32)
    alone = generate(model, seeds=[9], steps=STEPS, resolution=32, ug_theta=1.3, ug_eta=0.5)
    # float32 kernels differ between batch sizes by ~1e-6 per call; over the guided steps
    # (three network calls each) a pixel may drift by ~1e-4; another image's would be O(1)
    torch.testing.assert_close(x[1], alone[0], atol=5e-4, rtol=0)
    plain = generate(model, seeds=[4, 9], steps=STEPS, resolution=32, ug_theta=0.0)
    assert not torch.allclose(x, plain, atol=1e-3)  # the guidance term changes the result


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_bf16_autocast_keeps_the_sampler_state_float32(prediction):
    """Under bf16 autocast (the service on CUDA) the network's bf16 output must not leak into
    the sampler's float32 state: upsample guidance and CFG once failed mixing the two."""
    m = debug_model(prediction=prediction)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # two steps: bf16 is slow on some CPUs
        x = generate(m, seeds=[4, 9], steps=2, resolution=32, ug_theta=1.3, ug_eta=0.5,
                     class_labels=[0, 1], cfg_scale=2.0)
        y = generate(m, seeds=[4], steps=2, sampler="dpmpp_2m")
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_clip_denoised_bounds_the_x0_estimates(sampler):
    """On by default; off gives the unclamped chain (an eps-network's x0 at high noise is
    its error over alpha: far outside [-1, 1] for a random network)."""
    m = debug_model(prediction="eps")
    clipped = generate(m, seeds=[1, 2], steps=STEPS, sampler=sampler)
    assert torch.equal(clipped, generate(m, seeds=[1, 2], steps=STEPS, sampler=sampler,
                                         clip_denoised=True))
    free = generate(m, seeds=[1, 2], steps=STEPS, sampler=sampler, clip_denoised=False)
    assert not torch.allclose(clipped, free, atol=1e-3)
    up = generate(m, seeds=[1], steps=STEPS, sampler=sampler, resolution=32, upscale="cascade",
                  clip_denoised=False)
    assert up.shape == (1, 3, 32, 32)


def test_cascade_upscaling(model):
    x = generate(model, seeds=[1, 2], steps=STEPS, resolution=32, upscale="cascade")
    assert x.shape == (2, 3, 32, 32)
    alone = generate(model, seeds=[2], steps=STEPS, resolution=32, upscale="cascade")
    torch.testing.assert_close(x[1], alone[0], atol=1e-4, rtol=0)


def test_cfg_and_time_aware(model):
    base = generate(model, seeds=[1, 2], steps=STEPS, class_labels=[0, 1])
    cfg = generate(model, seeds=[1, 2], steps=STEPS, class_labels=[0, 1], cfg_scale=3.0)
    assert not torch.allclose(base, cfg, atol=1e-4)
    # switching to the same class changes nothing
    same = generate(model, seeds=[1], steps=STEPS, class_labels=[0], time_aware=(0, 0.5))
    torch.testing.assert_close(same[0], base[0], atol=1e-4, rtol=0)
    switched = generate(model, seeds=[1], steps=STEPS, class_labels=[0], time_aware=(3, 0.5))
    assert not torch.allclose(switched[0], base[0], atol=1e-4)
    other = generate(model, seeds=[1], steps=STEPS, class_labels=[1], time_aware=(3, "auto"))
    assert other.shape == (1, 3, 16, 16)
    ug_cfg = generate(model, seeds=[1], steps=STEPS, class_labels=[1], cfg_scale=2.0,
                      resolution=32, ug_order="cfg_high_only")
    assert ug_cfg.shape == (1, 3, 32, 32)


def test_spectral_schedule_per_image():
    from components.spectral_schedules import ScheduleModel

    rng = np.random.default_rng(0)
    params = np.stack([rng.normal(0, 1, 200), rng.normal(2, 0.2, 200),
                       rng.normal(-8, 1, 200), rng.normal(8, 1, 200)], axis=1)
    dist = ScheduleModel.fit(params, n_components=2)
    model = debug_model(n_cond=3, spectral=dist.to_json())
    batch = generate(model, seeds=[5, 6, 7], steps=STEPS, schedule="spectral")
    alone = generate(model, seeds=[6], steps=STEPS, schedule="spectral")
    torch.testing.assert_close(batch[1], alone[0], atol=1e-4, rtol=0)
    # the same spectrally conditioned network also samples on its global schedule (a sweep
    # over schedules compares both), with the global end points as its (lambda(0), lambda(1))
    on_global = generate(model, seeds=[5, 6, 7], steps=STEPS, schedule="model")
    assert on_global.shape == batch.shape and not torch.allclose(on_global, batch)
    with pytest.raises(ValueError, match="spectral"):
        generate(debug_model(), seeds=[0], steps=STEPS, schedule="spectral")


def test_spectral_kind_picks_the_per_image_schedule():
    """The model's spectral_kind maps a drawn schedule to its grid; unset means "mixed"."""
    from components.generate import GenerateOptions, sampling_grid
    from components.spectral_schedules import ScheduleModel

    rng = np.random.default_rng(0)
    params = np.stack([rng.normal(0, 1, 200), rng.normal(0.5, 0.05, 200),  # beta != 1
                       rng.normal(-8, 1, 200), rng.normal(8, 1, 200)], axis=1)
    model = debug_model(n_cond=3, spectral=ScheduleModel.fit(params, n_components=1).to_json())
    opts = GenerateOptions(steps=STEPS, schedule="spectral")
    grids = {kind: sampling_grid(dataclasses.replace(model, spectral_kind=kind), opts, [3, 4],
                                 None)[0] for kind in (None, "mixed", "frequency", "power")}
    torch.testing.assert_close(grids[None], grids["mixed"], atol=0, rtol=0)
    assert not torch.allclose(grids["frequency"], grids["power"])


@pytest.mark.parametrize("kwargs,field,word", [
    (dict(resolution=24), "resolution", "multiple"),
    (dict(steps=0), "steps", ">= 1"),
    (dict(cfg_scale=2.0), "class_labels", "cfg_scale"),  # the missing field
    (dict(time_aware=(1, 0.5)), "class_labels", "time_aware"),
    (dict(class_labels=[9]), "class_labels", "out of range"),
    (dict(class_labels=[1], time_aware=(1, 1.5)), "time_aware", "switch"),
    (dict(class_labels=[1], time_aware=(7, 0.5)), "time_aware", "second class"),
    (dict(sampler="euler"), "sampler", "ddim"),
    (dict(sampler="dpmpp_2m", eta=0.5), "eta", "dpmpp_2m"),  # DDIM's alone, never ignored
    (dict(sampler="ddpm", eta=1.0), "eta", "ancestral"),
    (dict(seeds=[-1]), "seeds", "seeds"),
    (dict(schedule="spectral"), "schedule", "spectral schedule model"),
    (dict(upscale="nearest"), "upscale", "cascade"),
    (dict(ug_order="both"), "ug_order", "cfg_of_ug"),
])
def test_bad_arguments_name_the_problem(model, kwargs, field, word):
    """The check names the field itself (the service's 422 reports ``err.field``)."""
    args = dict(seeds=[0], steps=STEPS) | kwargs
    with pytest.raises(OptionError, match=word) as err:
        generate(model, **args)
    assert err.value.field == field


def test_memory_estimate_scales(model):
    params = sum(p.numel() * 4 for p in model.net.parameters())
    one = memory_estimate_bytes(model, n_images=1) - params
    four = memory_estimate_bytes(model, n_images=4) - params
    assert one > 0 and four == pytest.approx(4 * one, rel=0.01)
    cfg = memory_estimate_bytes(model, n_images=4, cfg_scale=2.0) - params
    assert cfg > 1.8 * four
    big = memory_estimate_bytes(model, n_images=1, resolution=64) - params
    assert big > 16 * one  # at least linear in pixels, plus attention's quadratic term


def test_image_grid_and_uint8():
    imgs = torch.linspace(-1, 1, 5).reshape(5, 1, 1, 1).expand(5, 3, 4, 4)
    grid = image_grid(imgs, nrow=3, padding=1)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 5 + 1)
    torch.testing.assert_close(grid[:, 1:5, 6:10], imgs[1])
    assert float(grid[0, 0, 0]) == 1.0  # padding
    u = to_uint8(imgs)
    assert u.shape == (5, 4, 4, 3) and u.dtype == torch.uint8
    assert int(u[0, 0, 0, 0]) == 0 and int(u[-1, 0, 0, 0]) == 255
