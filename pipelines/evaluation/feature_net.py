"""Training stage of the in-house feature network (``prism eval feature-net``).

The recipe (fixed, recorded in the weights' sidecar; Page's fast ResNet-9 CIFAR-10 recipe):
SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 512, one-cycle learning rate (peak
0.4, 25% warm-up, cosine annealing), label smoothing 0.2, random crops from 4-pixel reflect
padding and horizontal flips, 24 epochs. On CUDA: bf16 autocast, channels_last, optional
torch.compile. All randomness (init, shuffling, augmentation) comes from ``seed`` through
CPU generators, so on CPU the same recipe gives the same weights hash twice.

Runs standalone (no Ray, no MLflow): ``python benchmarks/train_feature_net.py`` on a GPU host.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from components.metrics.feature_net import FeatureNet, accuracy, save_feature_net
from pipelines.evaluation.data import ImageSet, load_images

_log = logging.getLogger(__name__)
Log = Callable[[str], None]


class FeatureNetRecipe(BaseModel):
    """The training recipe; every field is recorded with the weights."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(64, ge=1)
    epochs: int = Field(24, ge=1)
    batch_size: int = Field(512, ge=2)
    lr_max: float = Field(0.4, gt=0)
    pct_start: float = Field(0.25, gt=0, lt=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.2, ge=0, lt=1)
    crop_padding: int = Field(4, ge=0)
    flip: bool = True
    seed: int = 0
    max_train_images: int | None = Field(None, ge=2)
    compile: bool = True  # CUDA only
    bf16: bool = True  # CUDA only


DEBUG_RECIPE = FeatureNetRecipe(width=4, epochs=1, batch_size=32, max_train_images=128,
                                compile=False)


def augment(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crops (reflect padding) and horizontal flips of x (B, C, H, W); CPU-drawn offsets.

    Every draw comes from ``gen`` (seeded by the recipe), so the feature network depends on
    the recipe alone; ``kornia.augmentation`` draws from torch's global generator and takes
    none, which is why these two operations are written out here.
    """
    b, _, h, w = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B,1,H,1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B,1,1,W)
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = xp[bi, ci, rows, cols]  # (B, C, H, W)
    if flip:
        m = (torch.rand(b, generator=gen) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(m, x.flip(-1), x)
    return x


def _to_device(s: ImageSet, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC -> uint8 NCHW on device (converted to float per batch), labels on CPU."""
    x = torch.from_numpy(np.ascontiguousarray(s.images)).permute(0, 3, 1, 2).contiguous()
    return x.to(device), torch.from_numpy(s.labels)


def train_feature_net(train: ImageSet, test: ImageSet | None, recipe: FeatureNetRecipe,
                      device: str | torch.device = "cpu",
                      log: Log = _log.info) -> tuple[FeatureNet, dict[str, Any]]:
    """Train the classifier on ``train``; returns (net in eval mode, results dict)."""
    device = torch.device(device)
    if (train.labels < 0).any():
        raise ValueError(f"{train.source}: the feature network needs class labels for every "
                         "training image")
    if recipe.max_train_images:
        train = train.subset(np.arange(min(len(train), recipe.max_train_images)))
    num_classes = int(train.labels.max()) + 1
    res = train.images.shape[1]
    torch.manual_seed(recipe.seed)
    net = FeatureNet(num_classes, width=recipe.width, resolution=res).to(device)
    cuda = device.type == "cuda"
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    model = torch.compile(net) if (cuda and recipe.compile) else net
    decay, no_decay = [], []
    for p in net.parameters():
        (no_decay if p.ndim == 1 else decay).append(p)  # no decay on BN scales and shifts
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr_max,
                          momentum=recipe.momentum, nesterov=True)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    # a warm-up of exactly one step (pct_start x steps == 1) makes OneCycleLR divide by zero;
    # a hair more keeps the same schedule (initial lr at step 0, the peak from step 1 on)
    pct = recipe.pct_start
    if float(pct * (recipe.epochs * steps_per_epoch)) == 1.0:  # torch's own product
        pct *= 1.0 + 1e-6
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr_max, epochs=recipe.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=pct, anneal_strategy="cos", cycle_momentum=False)
    gen = torch.Generator().manual_seed(recipe.seed)
    x_all, y_all = _to_device(train, device)
    t0 = time.perf_counter()
    for epoch in range(recipe.epochs):
        net.train()
        perm = torch.randperm(len(train), generator=gen)
        total, seen = torch.zeros((), device=device), 0
        for s in range(0, len(train), recipe.batch_size):
            idx = perm[s : s + recipe.batch_size]
            if len(idx) < 2:
                continue  # batch norm needs two images
            x = x_all[idx.to(device)].float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
            x = augment(x, recipe.crop_padding, recipe.flip, gen)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y_all[idx].to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and recipe.bf16):
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + loss.detach() * len(idx), seen + len(idx)  # no sync per step
        log(f"epoch {epoch + 1}/{recipe.epochs} loss {float(total) / max(seen, 1):.4f} "
            f"({time.perf_counter() - t0:.1f} s)")
    train_s = time.perf_counter() - t0
    net.train(False)
    # unit mean-square features on (up to 5,000 of) the training images: KID's cubic kernel
    # and FD then see features of the scale they were designed for
    calib = train.subset(np.arange(min(len(train), 5000))).as_float()
    scale = net.calibrate_feature_scale(calib)
    results: dict[str, Any] = {"train_seconds": train_s, "train_images": len(train),
                               "feature_scale": scale,
                               "num_classes": num_classes, "resolution": res,
                               "device": str(device)}
    if test is not None:
        dropped = int((test.labels < 0).sum())  # classes unknown to the training set
        test = test.subset(np.flatnonzero(test.labels >= 0))
        results["test_unlabelled_dropped"] = dropped
    if test is not None and len(test):
        xt = test.as_float()
        results["test_images"] = len(test)
        results["test_accuracy"] = accuracy(net, xt, torch.from_numpy(test.labels))
        results["test_accuracy_flip_tta"] = accuracy(net, xt, torch.from_numpy(test.labels),
                                                     flip_tta=True)
    return net, results


def run_feature_net_stage(train_src: str, test_src: str | None, out_dir: str | Path,
                          recipe: FeatureNetRecipe, device: str = "cpu",
                          name: str = "feature_net", log: Log = _log.info) -> dict[str, Any]:
    """Read the data, train, write ``<out>/<name>.safetensors`` + ``.json``; returns the sidecar."""
    train = load_images(train_src)
    test = load_images(test_src, class_names=train.class_names or None) if test_src else None
    if test is not None and test.class_names and train.class_names \
            and test.class_names != train.class_names:
        raise ValueError(f"class names differ between {train_src} and {test_src}")
    net, results = train_feature_net(train, test, recipe, device, log)
    return save_trained(net, results, recipe, train, test, out_dir, name, log)


def save_trained(net: FeatureNet, results: dict[str, Any], recipe: FeatureNetRecipe,
                 train: ImageSet, test: ImageSet | None, out_dir: str | Path,
                 name: str = "feature_net", log: Log = _log.info) -> dict[str, Any]:
    """Write the weights and the sidecar (recipe, classes, sources, accuracy, SHA-256)."""
    names = train.class_names or (test.class_names if test is not None else [])
    meta = {"recipe": recipe.model_dump(), "class_names": names, "train_source": train.source,
            "test_source": test.source if test is not None else None, **results}
    sidecar = save_feature_net(net, Path(out_dir) / f"{name}.safetensors", meta)
    log(json.dumps({k: sidecar[k] for k in ("metric_name", "sha256") if k in sidecar}))
    return sidecar
