"""Scale Space Diffusion models sample through the denoiser contract: ``Cond.out_resolution``,
the one ``base_denoiser``, the guidance wrappers, the chain table and the options it refuses."""

from __future__ import annotations

import pytest
import torch

from components.diffusion import Cond, Denoiser, NetworkDenoiser
from components.generate import CHAINS, GenerativeModel, base_denoiser, generate
from components.guidance import ClassifierFreeGuidance, TimeAwareConditioning
from components.networks import flexi_unet
from components.networks.registry import build_network
from components.options import OptionError
from components.schedules import ddpm_linear
from components.ssd import SSDProcess

torch.set_num_threads(1)  # 2 shared cores: oversubscribed threads make convs 100x slower


class Recorder:
    """An x0-denoiser that records the conditions it is called with; returns x0 = 0 at the
    requested size."""

    prediction = "x0"

    def __init__(self) -> None:
        self.conds: list[Cond] = []

    def __call__(self, x: torch.Tensor, lam: torch.Tensor, cond: Cond) -> torch.Tensor:
        self.conds.append(cond)
        r = cond.out_resolution or x.shape[-1]
        return x.new_zeros(x.shape[0], x.shape[1], r, r)


def ssd_model(num_classes: int = 3) -> GenerativeModel:
    torch.manual_seed(0)
    net = build_network("ssd-debug", num_classes=num_classes).eval()
    for p in net.parameters():  # the zero-initialised head would predict x0 = 0 everywhere
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    process = SSDProcess(16, **flexi_unet.ssd_settings("ssd-debug"))
    return GenerativeModel(net=net, prediction="x0", n_cond=1, resolution=16, in_channels=3,
                           num_classes=num_classes, schedule=ddpm_linear(), kind="ssd",
                           extra=process.settings())


@pytest.fixture(scope="module")
def model() -> GenerativeModel:
    return ssd_model()


def test_out_resolution_survives_every_cond_operation():
    cond = Cond(torch.tensor([0, 1]), torch.zeros(2, 2), out_resolution=8)
    assert cond.repeat(2).out_resolution == 8
    assert cond.index(torch.tensor([1])).out_resolution == 8
    assert cond.with_labels(None).out_resolution == 8
    assert Cond().out_resolution is None


def test_guidance_wrappers_forward_the_output_size():
    inner = Recorder()
    cond = Cond(torch.tensor([0, 1]), out_resolution=8)
    late = Cond(torch.tensor([2, 2]))
    den = TimeAwareConditioning(ClassifierFreeGuidance(inner, 3.0), late, lambda_switch=0.0)
    assert isinstance(den, Denoiser)
    out = den(torch.zeros(2, 3, 4, 4), torch.tensor([-1.0, 1.0]), cond)
    assert out.shape == (2, 3, 8, 8)
    (seen,) = inner.conds  # CFG: one call on the stacked (conditional, null) batch
    assert seen.out_resolution == 8
    assert seen.class_labels.tolist() == [0, 2, -1, -1]  # image 2 switched to the late class


def test_network_denoiser_passes_the_output_size_only_where_it_changes(model):
    den = base_denoiser(model)
    x, lam, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.0, 1.0]), torch.tensor([0, 1])
    with torch.no_grad():
        same = den(x, lam, Cond(labels, out_resolution=8))
        assert torch.equal(same, den(x, lam, Cond(labels)))
        up = den(x, lam, Cond(labels, out_resolution=16))
        ref = model.net(x, (lam / 15).reshape(-1, 1), labels, out_resolution=16)
    assert up.shape == (2, 3, 16, 16)
    torch.testing.assert_close(up, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="eps prediction cannot change resolution"):
        NetworkDenoiser(model.net, "eps")(x, lam, Cond(labels, out_resolution=16))


def test_every_kind_has_one_chain():
    assert set(CHAINS) == {"standard", "ssd"}


def test_ssd_samples_with_every_wrapper_and_its_seed_alone(model):
    kw = dict(steps=6, class_labels=[0, 2])
    plain = generate(model, seeds=[3, 4], **kw)
    assert plain.shape == (2, 3, 16, 16) and torch.isfinite(plain).all()
    cfg = generate(model, seeds=[3, 4], cfg_scale=2.5, **kw)
    alone = generate(model, seeds=[4], steps=6, class_labels=[2], cfg_scale=2.5)
    # batches of 1 and 4 (with CFG's unconditional half) may take different BLAS kernels
    # (8e-5 apart after six steps on one AMD CPU); a wrong seed or label differs by O(1)
    torch.testing.assert_close(alone[0], cfg[1], atol=1e-3, rtol=0)
    assert not torch.allclose(cfg, plain, atol=1e-3)
    aware = generate(model, seeds=[3, 4], time_aware=(1, 0.5), **kw)
    assert not torch.allclose(aware, plain, atol=1e-3)
    # a switch to the class an image already has changes nothing
    same = generate(model, seeds=[3], steps=6, class_labels=[1], time_aware=(1, 0.5))
    torch.testing.assert_close(same, generate(model, seeds=[3], steps=6, class_labels=[1]),
                               atol=0, rtol=0)


def test_ssd_honours_clip_denoised(model):
    clipped = generate(model, seeds=[5], steps=6, class_labels=[0])
    free = generate(model, seeds=[5], steps=6, class_labels=[0], clip_denoised=False)
    assert not torch.allclose(clipped, free, atol=1e-4)


@pytest.mark.parametrize("kwargs,field,word", [
    (dict(resolution=32), "resolution", "no level above"),
    (dict(resolution=32, upscale="cascade"), "resolution", "cascade"),
    (dict(schedule="spectral"), "schedule", "spectral schedules do not apply"),
    (dict(steps=1), "steps", "steps >= 2"),
])
def test_ssd_refuses_what_its_chain_cannot_honour(model, kwargs, field, word):
    args = dict(seeds=[0], steps=4) | kwargs
    with pytest.raises(OptionError, match=word) as err:
        generate(model, **args)
    assert err.value.field == field
    assert "Scale Space Diffusion" in str(err.value)
