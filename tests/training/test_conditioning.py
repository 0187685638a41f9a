"""Every network sees every conditioning input: behaviour that a dead path cannot fake.

A model blind to its noise level or class still trains, samples and passes shape tests (the
demo's model did, at widths where GroupNorm subtracted the embedding). These tests measure the
behaviour instead:

- sensitivity: with randomised weights, changing one conditioning input (each c_noise column,
  the class, the null class) moves the output by more than ``MIN_RESPONSE`` of its size, for
  every family at its debug size and at a narrow width (16 channels);
- a ResBlock passes its embedding through at every width and group count;
- a narrow UNet and a DiMR, trained for seconds on the synthetic palette data,
  denoise far better when told the true noise level than a wrong one, and their
  class-conditional samples carry their class's colour, more strongly with CFG.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from train_helpers import debug_config  # noqa: E402

from common.models import load_model  # noqa: E402
from components.diffusion import LAMBDA_SCALE, convert, q_sample  # noqa: E402
from components.generate import generate  # noqa: E402
from components.networks.registry import build_network  # noqa: E402
from components.networks.unet import ResBlock  # noqa: E402
from training.data import synthetic_images  # noqa: E402
from training.launch import run_local  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# A change of 0.5 in one c_noise column (7.5 in log-SNR) or one class step must move the output
# of a randomised network by at least 1% of its norm. Measured at the debug sizes: 2.7% (DiMR's
# bound columns) to 119% (DiT's class); a network whose norm removes the embedding: 5e-7.
MIN_RESPONSE = 0.01

# A narrow UNet (the demo's width before the fix): 16 and 32 channels, one channel per group of
# a 32-group norm, where an embedding added before the norm vanished entirely.
NARROW = dict(model_channels=16)


def randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """Replace zero and near-constant initialisations by random weights of the usual scale:
    Linear/Conv weights N(0, 1/fan_in), embeddings N(0, 1), every other parameter (norm scales,
    biases, TD-LN endpoints and gates, position tables) perturbed by N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            for name, p in m.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(m, nn.Embedding):
                    p.copy_(noise)
                elif isinstance(m, (nn.Linear, nn.Conv2d)) and name == "weight":
                    p.copy_(noise / math.sqrt(p[0].numel()))
                else:
                    p.add_(0.2 * noise)
    return net.eval()


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def responses(net: nn.Module, size: int, n_cond: int, num_classes: int,
              **kw) -> dict[str, float]:
    """Relative output change for each conditioning input, around c_noise = 0, class 0."""
    torch.manual_seed(1)
    x = torch.randn(4, 3, size, size)
    c = torch.zeros(4, n_cond)
    labels = torch.zeros(4, dtype=torch.long) if num_classes else None
    out: dict[str, float] = {}
    with torch.no_grad():
        base = net(x, c, labels, **kw)
        for k in range(n_cond):
            lo, hi = c.clone(), c.clone()
            lo[:, k], hi[:, k] = -0.25, 0.25
            out[f"c_noise[{k}]"] = relative_change(net(x, lo, labels, **kw),
                                                   net(x, hi, labels, **kw))
        if num_classes:
            out["class"] = relative_change(base, net(x, c, labels + 1, **kw))
            out["null class"] = relative_change(base, net(x, c, labels - 1, **kw))
    return out


CASES = {
    "unet-debug": ("unet-debug", dict(num_classes=4, n_cond=3)),
    "unet-debug-narrow": ("unet-debug", dict(num_classes=8, resolution=32,
                                             attention_resolutions=[], **NARROW)),
    "ddpm-x0-debug": ("ddpm-x0-debug", dict(num_classes=4, n_cond=3)),
    "dimr-debug": ("dimr-debug", dict(n_cond=3)),
    "dit-debug": ("dit-debug", dict(n_cond=3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_conditioning_input_moves_the_output(case):
    preset, kw = CASES[case]
    net = randomise(build_network(preset, **kw))
    cfg = getattr(net, "cfg", None)
    size = cfg.resolution if cfg is not None else net.resolution
    got = responses(net, size, net.n_cond, net.num_classes)
    assert len(got) == net.n_cond + (2 if net.num_classes else 0)
    dead = {k: v for k, v in got.items() if not v > MIN_RESPONSE}
    assert not dead, f"{case}: inputs without effect (relative change): {dead}; all: {got}"


@pytest.mark.parametrize("in_size", [16, 8, 4])
def test_flexi_unet_sees_its_conditioning_at_every_level(in_size):
    # ssd-debug: levels at 16, 8, 4; a coarse input runs only the deep levels (64 channels).
    net = randomise(build_network("ssd-debug", num_classes=4, n_cond=3, model_channels=16))
    for out_size in (in_size, 16):
        got = responses(net, in_size, 3, 4, out_resolution=out_size)
        dead = {k: v for k, v in got.items() if not v > MIN_RESPONSE}
        assert not dead, f"input {in_size} -> {out_size}: {dead}; all: {got}"


@pytest.mark.parametrize("width", [8, 16, 32, 48, 64, 128])
@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_passes_its_embedding_at_every_width(width, scale_shift):
    # The embedding's share of the block's residual branch must not depend on how many
    # channels share a norm group (one per group at <= 32 channels, several above).
    block = randomise(ResBlock(width, width, emb_dim=64, scale_shift=scale_shift))
    torch.manual_seed(0)
    x, e1, e2 = torch.randn(4, width, 8, 8), torch.randn(4, 64), torch.randn(4, 64)
    with torch.no_grad():
        branch1, branch2 = block(x, e1) - block.skip(x), block(x, e2) - block.skip(x)
    assert relative_change(branch1, branch2) > 0.1


# --------------------------------------------------------------------------- trained models

CLASSES = 4


def _palette(cfg) -> np.ndarray:
    """The synthetic data's class colours (training/data.py: seed 1000 + run.seed, + 1)."""
    return np.random.default_rng(1000 + cfg.run.seed + 1).uniform(-0.5, 0.5, (CLASSES, 3))


def _train(out: Path, preset: str, images: int, *sets: str):
    cfg = debug_config(out, f"model.preset={preset}", f"train.total_images={images}",
                       "train.batch_size=32", "objective.prediction=v", "optim.lr=2e-3",
                       "optim.warmup_images=256", "optim.ema_decay=0.99",
                       "train.log_every_images=1024", "checkpoint.every_images=1000000",
                       "data.synthetic_size=512", f"data.num_classes={CLASSES}",
                       "run.name=trained", *sets)
    run_local(cfg)
    return cfg, load_model(out / "trained" / "model")


@pytest.fixture(scope="module")
def trained_unet(tmp_path_factory):
    # 16 channels: on the pre-fix UNet this model saw neither its noise level nor its class
    return _train(tmp_path_factory.mktemp("unet"), "unet-debug", 4096,
                  "model.overrides.model_channels=16")


@pytest.fixture(scope="module")
def trained_dimr(tmp_path_factory):
    # the class enters DiMR only as a token of its Transformer branch
    return _train(tmp_path_factory.mktemp("dimr"), "dimr-debug", 16384)


def _x0_errors(model, cfg, lam: float, c_noise: float) -> float:
    """x0 mean squared error on noised training images at log-SNR ``lam``, telling the network
    the noise level ``c_noise`` (the true one is lam / 15)."""
    images, labels = synthetic_images(256, cfg.data.resolution, CLASSES, seed=1000 + cfg.run.seed)
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    lam_t = torch.full((x0.shape[0],), lam)
    xt = q_sample(x0, lam_t, eps).float()
    with torch.no_grad():
        pred = model.net(xt, torch.full((x0.shape[0], 1), c_noise), torch.from_numpy(labels))
    x0_hat = convert(pred, xt, lam_t, model.prediction, "x0").float()
    return float((x0_hat - x0).square().mean())


@pytest.mark.parametrize("which", ["trained_unet", "trained_dimr"])
def test_trained_model_denoises_by_its_noise_level(which, request):
    cfg, model = request.getfixturevalue(which)
    true = {lam: _x0_errors(model, cfg, lam, lam / LAMBDA_SCALE) for lam in (-4.0, -2.0, 4.0)}
    # far lower error at low noise than at high noise
    assert true[4.0] < 0.2 * true[-4.0], true
    # told a wrong noise level (the mirror image in log-SNR), it denoises clearly worse; a
    # network blind to its noise level gives the same error. Measured (UNet, DiMR): 4.3, 2.1 at
    # -4 and 2.8, 1.6 at -2; the pre-fix UNet 1.00 and the pre-fix DiMR time coordinate 1.04.
    # (At low noise x0 is mostly the input itself and the network matters little.)
    for lam, factor in ((-4.0, 1.5), (-2.0, 1.2)):
        wrong = _x0_errors(model, cfg, lam, -lam / LAMBDA_SCALE)
        assert wrong > factor * true[lam], (lam, true[lam], wrong)


def _class_colours(model, cfg_scale: float) -> np.ndarray:
    """Mean colour of 8 class-conditional samples per class (CLASSES, 3)."""
    seeds = list(range(8 * CLASSES))
    labels = [s % CLASSES for s in seeds]
    x = generate(model, seeds=seeds, steps=16, class_labels=labels, cfg_scale=cfg_scale)
    colours = x.mean((2, 3)).numpy()
    return np.stack([colours[np.array(labels) == k].mean(0) for k in range(CLASSES)])


def _spread(colours: np.ndarray) -> float:
    return float(np.linalg.norm(colours - colours.mean(0), axis=1).mean())


@pytest.mark.parametrize("which", ["trained_unet", "trained_dimr"])
def test_trained_model_samples_carry_their_class(which, request):
    cfg, model = request.getfixturevalue(which)
    palette = _palette(cfg)
    plain, guided = _class_colours(model, 1.0), _class_colours(model, 3.0)
    # the classes' sample colours follow the palette (a class-blind model: r about 0)
    r = np.corrcoef((plain - plain.mean(0)).ravel(), (palette - palette.mean(0)).ravel())[0, 1]
    assert r > 0.8, (r, plain, palette)
    assert _spread(plain) > 0.5 * _spread(palette), (plain, palette)
    # classifier-free guidance pushes the classes further apart
    assert _spread(guided) > 1.05 * _spread(plain), (_spread(plain), _spread(guided))


def test_a_model_saved_before_the_fix_is_refused(trained_unet, tmp_path):
    import json
    import shutil

    cfg, _ = trained_unet
    old = shutil.copytree(Path(cfg.run.output_dir) / "trained" / "model", tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "version": 1}))
    with pytest.raises(ValueError, match="retrain"):
        load_model(old)
