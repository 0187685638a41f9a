"""Guidance wrappers and upscaling procedures, checked against analytic Gaussian models."""

from __future__ import annotations

import math

import pytest
import torch

from components.analytic import GaussianDenoiser, gaussian_w2, stationary_covariance
from components.chromatography import lambda_of_level
from components.diffusion import Cond, as_prediction
from components.guidance import (
    ClassifierFreeGuidance,
    CountingDenoiser,
    TimeAwareConditioning,
    UpsampleGuidance,
    cascaded_upscale,
    guided_denoiser,
    sdedit_upscale,
)
from components.samplers import generators_from_seeds, lambda_grid, sample_ddim, sample_ddpm
from components.scale import downsample_mean
from components.schedules import CosineSchedule, sd_scaled_linear

F64 = torch.float64


class MultiRes:
    """One 'model' answering at two resolutions (like a convolutional network)."""

    prediction = "x0"

    def __init__(self, *models: GaussianDenoiser) -> None:
        self.by_size = {m.shape[-1]: m for m in models}

    def __call__(self, x, lam, cond):
        return self.by_size[x.shape[-1]](x, lam, cond)


class ClassGauss:
    """Class-conditional Gaussian x0-denoiser: class c has mean c * 0.2, null (-1) mean 0."""

    prediction = "x0"

    def __init__(self, n: int = 16) -> None:
        cov = stationary_covariance(4, 4, 1.0, var=0.2)
        self.models = {c: GaussianDenoiser(torch.full((n,), 0.2 * c, dtype=F64) if c >= 0
                                           else torch.zeros(n, dtype=F64), cov, (1, 4, 4))
                       for c in (-1, 0, 1, 2)}
        self.seen: list[tuple[float, list[int]]] = []

    def __call__(self, x, lam, cond):
        labels = cond.class_labels
        self.seen.append((float(lam.flatten()[0]), labels.tolist()))
        out = torch.empty_like(x)
        for c, model in self.models.items():
            mask = labels == c
            if mask.any():
                out[mask] = model(x[mask], lam[mask], cond.index(mask))
        return out


def _moments(x):
    x = x.reshape(x.shape[0], -1)
    return x.mean(0), x.T.cov()


@pytest.fixture(scope="module")
def ug_models():
    ell = 1.5
    low = GaussianDenoiser(torch.zeros(16, dtype=F64), stationary_covariance(4, 4, ell), (1, 4, 4))
    high = GaussianDenoiser(torch.zeros(64, dtype=F64), stationary_covariance(8, 8, ell),
                            (1, 8, 8))
    return low, high


def test_ug_theta_zero_leaves_denoiser_unchanged(ug_models):
    low, high = ug_models
    den = MultiRes(low, high)
    x = torch.randn(6, 1, 8, 8, dtype=F64)
    lam = torch.linspace(-6, 6, 6, dtype=F64)
    ref = as_prediction(den, x, lam, Cond(), "eps")
    ug = UpsampleGuidance(den, m=2, theta=0.0)
    assert torch.equal(ug(x, lam, Cond()), ref)
    assert ug.stats["low_evals"] == 0
    # an inactive window leaves it unchanged as well, image by image
    ug = UpsampleGuidance(den, m=2, theta=1.0, lambda_active_max=0.0)
    out = ug(x, lam, Cond())
    inactive = lam > 0
    assert torch.equal(out[inactive], ref[inactive])
    assert not torch.allclose(out[~inactive], ref[~inactive])
    assert ug.stats["low_pixels"] == int((~inactive).sum()) * 16


def test_ug_downsampled_samples_match_low_res_model(ug_models):
    """A model of the 4x4 statistics, applied at 8x8: with UG, D_2 of its samples follows the
    4x4 model much better than without."""
    low, high = ug_models
    den = MultiRes(low, high)
    n, lams = 1500, lambda_grid(CosineSchedule(), 30)
    x = torch.randn(n, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    errs = {}
    for theta in (0.0, 1.0):
        out = sample_ddim(UpsampleGuidance(den, m=2, theta=theta), x, lams, Cond())
        errs[theta] = gaussian_w2(*_moments(downsample_mean(out, 2)), low.mu, low.cov)
    ref = gaussian_w2(*_moments(low.sample(n, torch.Generator().manual_seed(1))), low.mu, low.cov)
    assert errs[0.0] > 20 * ref  # without guidance the coarse statistics are clearly wrong
    assert errs[1.0] < 0.1 * errs[0.0], (errs, ref)


def test_ug_extra_cost_counted_only_while_active(ug_models):
    den = MultiRes(*ug_models)
    s = CosineSchedule()
    ug = UpsampleGuidance.from_eta(den, s, eta=0.5, m=2, theta=1.3)
    steps = 20
    sample_ddim(ug, torch.randn(3, 1, 8, 8, dtype=F64), lambda_grid(s, steps), Cond())
    t_eval = torch.linspace(1, 0, steps + 1)  # steps + final denoise evaluate at these t
    active = int((t_eval >= 0.5 - 1e-9).sum())
    assert ug.stats["high_evals"] == steps + 1
    assert ug.stats["low_evals"] == active
    assert ug.extra_cost == pytest.approx(active / (steps + 1) / 4)
    assert ug.extra_cost <= 0.5 / 4 + 1 / (4 * (steps + 1))
    with pytest.raises(ValueError, match="eta"):
        UpsampleGuidance.from_eta(den, s, eta=1.5)
    with pytest.raises(ValueError, match="m must be"):
        UpsampleGuidance(den, m=1)


def test_cfg_matches_its_formula_and_scale_one_is_conditional():
    den = ClassGauss()
    x = torch.randn(4, 1, 4, 4, dtype=F64)
    lam = torch.full((4,), -1.0, dtype=F64)
    cond = Cond(class_labels=torch.tensor([0, 1, 2, 1]))
    c = den(x, lam, cond)
    u = den(x, lam, cond.with_labels(torch.full((4,), -1)))
    assert torch.allclose(ClassifierFreeGuidance(den, 3.0)(x, lam, cond), u + 3.0 * (c - u))
    assert torch.equal(ClassifierFreeGuidance(den, 1.0)(x, lam, cond), c)
    with pytest.raises(ValueError, match="class_labels"):
        ClassifierFreeGuidance(den, 2.0)(x, lam, Cond())


def test_ug_cfg_orders():
    """Constant scales: UG(CFG) == CFG(UG) exactly (linearity); 'cfg_high_only' differs and
    costs one evaluation less per step."""
    base = ClassGauss()

    class Up:  # the same class-conditional model at 8x8 (block-constant means)
        prediction = "x0"

        def __call__(self, x, lam, cond):
            if x.shape[-1] == 4:
                return base(x, lam, cond)
            return _as8(x, lam, cond)

    def _as8(x, lam, cond):  # a simple 8x8 model: per-pixel Wiener towards the class mean
        mean = 0.2 * cond.class_labels.clamp(min=0).to(F64).reshape(-1, 1, 1, 1)
        a2 = torch.sigmoid(lam).reshape(-1, 1, 1, 1)
        a, s2 = a2.sqrt(), 1 - a2
        return mean + a * 0.2 / (a2 * 0.2 + s2) * (x - a * mean)

    den = CountingDenoiser(Up())
    x = torch.randn(3, 1, 8, 8, dtype=F64)
    lam = torch.tensor([-3.0, -1.0, 0.5], dtype=F64)
    cond = Cond(class_labels=torch.tensor([0, 2, 1]))
    outs = {o: guided_denoiser(den, cfg_scale=2.5, ug_theta=1.2, order=o)(x, lam, cond)
            for o in ("ug_of_cfg", "cfg_of_ug", "cfg_high_only")}
    assert torch.allclose(outs["ug_of_cfg"], outs["cfg_of_ug"], atol=1e-10)
    assert not torch.allclose(outs["ug_of_cfg"], outs["cfg_high_only"], atol=1e-6)
    with pytest.raises(ValueError, match="order"):
        guided_denoiser(den, 2.0, 1.0, order="sideways")


def test_time_aware_conditioning_switches_at_lambda():
    den = ClassGauss()
    s = CosineSchedule()
    lam_switch = lambda_of_level(1.0)  # dominant level crosses 1
    ta = TimeAwareConditioning.auto(den, Cond(class_labels=torch.tensor([2, 2])), level=1.0)
    assert ta.lambda_switch == pytest.approx(-math.log(4.0))
    sample_ddim(ta, torch.randn(2, 1, 4, 4, dtype=F64), lambda_grid(s, 10),
                Cond(class_labels=torch.tensor([0, 1])))
    for lam, labels in den.seen:
        assert labels == ([2, 2] if lam >= lam_switch else [0, 1]), (lam, labels)
    assert {tuple(lb) for _, lb in den.seen} == {(0, 1), (2, 2)}
    # blend: between the two predictions
    blend = TimeAwareConditioning(den, Cond(class_labels=torch.tensor([2])), 0.0, blend_width=1.0)
    x, lam = torch.randn(1, 1, 4, 4, dtype=F64), torch.zeros(1, dtype=F64)
    early = den(x, lam, Cond(class_labels=torch.tensor([0])))
    late = den(x, lam, Cond(class_labels=torch.tensor([2])))
    assert torch.allclose(blend(x, lam, Cond(class_labels=torch.tensor([0]))), 0.5 * (early + late))
    with pytest.raises(ValueError, match="outermost"):
        ta(torch.randn(3, 1, 4, 4, dtype=F64), torch.zeros(3, dtype=F64),
           Cond(class_labels=torch.tensor([0, 1, 2])))


def test_cascaded_upscale_with_exact_models():
    """Low-res model = the exact D_2 marginal of the high-res one. The hand-off drops the
    fine signal alpha (x0 - U D x0), so the cascade is close to direct sampling when it
    hands over early (where the chromatogram says fine levels carry little signal) and
    degrades when it hands over late; early steps cost a quarter of the pixels."""
    high = GaussianDenoiser(torch.zeros(64, dtype=F64), stationary_covariance(8, 8, 2.0),
                            (1, 8, 8))
    low = high.downsampled(2)
    den = CountingDenoiser(MultiRes(low, high))
    n, s = 1000, CosineSchedule()
    lams = lambda_grid(s, 40)

    def gens():  # fresh per-image generators for every run (they are stateful)
        return generators_from_seeds(range(n))
    x_low = torch.randn(n, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(n, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    direct = sample_ddpm(den, x, lams, Cond(), gens())
    err_direct = gaussian_w2(*_moments(direct), high.mu, high.cov)
    den.pixels = 0
    out = cascaded_upscale(den, x_low, lams, Cond(), m=2, sampler="ddpm", generators=gens())
    assert out.shape == (n, 1, 8, 8)
    assert den.pixels < 0.85 * 41 * n * 64, den.pixels  # early steps: a quarter of the pixels
    err = gaussian_w2(*_moments(out), high.mu, high.cov)
    late = cascaded_upscale(den, x_low, lams, Cond(), m=2, sampler="ddpm", generators=gens(),
                            handoff=30)
    err_late = gaussian_w2(*_moments(late), high.mu, high.cov)
    assert err < 2.5 * err_direct, (err, err_direct)
    assert err_late > 1.3 * err, (err_late, err)
    # a sample does not depend on its batch
    one = cascaded_upscale(den, x_low[5:6], lams, Cond(), m=2, sampler="ddpm",
                           generators=generators_from_seeds([5]))
    assert torch.allclose(one, out[5:6], atol=1e-10)
    with pytest.raises(ValueError, match="handoff"):
        cascaded_upscale(den, x_low[:2], lams, Cond(), handoff=99)


def test_sdedit_upscale_shapes_and_seed():
    high = GaussianDenoiser(torch.zeros(64, dtype=F64), stationary_covariance(8, 8, 2.0),
                            (1, 8, 8))
    x_low = torch.rand(2, 1, 4, 4, dtype=F64) * 2 - 1
    lams = lambda_grid(CosineSchedule(), 10, t_start=0.5)
    a = sdedit_upscale(high, x_low, lams, Cond(), generators=generators_from_seeds([1, 2]))
    b = sdedit_upscale(high, x_low[1:], lams, Cond(), generators=generators_from_seeds([2]))
    assert a.shape == (2, 1, 8, 8) and torch.allclose(a[1:], b, atol=1e-10)


def test_diffusers_adapter_if_available():
    diffusers = pytest.importorskip("diffusers")
    from components.guidance import DiffusersUNetDenoiser

    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3,
                                 layers_per_block=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    den = DiffusersUNetDenoiser(unet.eval(), sd_scaled_linear())
    ug = UpsampleGuidance(den, m=2, theta=1.0)
    with torch.no_grad():
        out = ug(torch.randn(2, 3, 16, 16), torch.tensor([-2.0, 1.0]), Cond())
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_diffusers_adapter_takes_classifier_free_guidance_with_its_null_label():
    diffusers = pytest.importorskip("diffusers")
    from components.guidance import ClassifierFreeGuidance, DiffusersUNetDenoiser

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3,
                                 layers_per_block=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 num_class_embeds=5)  # classes 0..3, 4 = "no class"
    den = DiffusersUNetDenoiser(unet.eval(), sd_scaled_linear())
    x, lam = torch.randn(2, 3, 8, 8), torch.tensor([-1.0, 2.0])
    cond = Cond(class_labels=torch.tensor([1, 2]))
    with torch.no_grad():
        plain = den(x, lam, cond)
        null = den(x, lam, Cond(class_labels=torch.tensor([4, 4])))
        guided = ClassifierFreeGuidance(den, 3.0, null_label=4)(x, lam, cond)
        with pytest.raises(ValueError, match="null_label"):
            ClassifierFreeGuidance(den, 3.0)(x, lam, cond)  # -1: not a class of the UNet
    torch.testing.assert_close(guided, null + 3.0 * (plain - null), rtol=1e-4, atol=1e-5)
