"""prism's in-house feature network: a small ResNet-style classifier (ResNet-9 layout).

Layout (width w, after Page's fast CIFAR-10 ResNet): ``prep`` conv(3 -> w) at full
resolution, then three stages, each conv -> BN -> ReLU -> max-pool/2, with a two-conv residual
block after stages 1 and 3; global max pool; a linear classifier scaled by 1/8. For 64x64
inputs the prep layer is followed by an extra max-pool/2 (``stem_pool``), so every resolution
reaches the classifier at 4x4. ``features(x)`` is the penultimate layer: the pooled 8w-d
vector (512-d for w = 64). Inputs are images (B, 3, H, W) in [-1, 1].

Artifacts are ``<name>.safetensors`` + ``<name>.json`` (architecture kwargs, classes,
training recipe, test accuracy, SHA-256 of the safetensors file). The metric name
``FD-prism-<sha256[:8]>`` says which network produced a number.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch import Tensor, nn


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv (no bias) -> batch norm -> ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """x + conv_bn(conv_bn(x))."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class FeatureNet(nn.Module):
    """ResNet-9-style classifier; ``features`` gives the penultimate 8w-d embedding."""

    def __init__(self, num_classes: int, width: int = 64, resolution: int = 32,
                 in_channels: int = 3) -> None:
        super().__init__()
        if resolution not in (32, 64):
            raise ValueError(f"FeatureNet supports resolution 32 or 64, got {resolution}")
        if num_classes < 2 or width < 1:
            raise ValueError(f"need num_classes >= 2 and width >= 1, got {num_classes}, {width}")
        self.config = {"num_classes": num_classes, "width": width, "resolution": resolution,
                       "in_channels": in_channels}
        w = width
        self.prep = conv_bn(in_channels, w)
        self.stem_pool = nn.MaxPool2d(2) if resolution == 64 else nn.Identity()
        self.layer1 = nn.Sequential(conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w))
        self.layer2 = nn.Sequential(conv_bn(2 * w, 4 * w), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w))
        self.fc = nn.Linear(8 * w, num_classes, bias=False)
        self.feature_dim = 8 * w
        # features() multiplies by this; set after training so that the features have unit
        # mean square on the training images (saved with the weights, covered by the hash)
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features, scaled: (B, 3, H, W) in [-1, 1] -> (B, 8w)."""
        return self._pooled(x) * self.feature_scale

    def _pooled(self, x: Tensor) -> Tensor:
        x = self.stem_pool(self.prep(x))  # (B, w, 32, 32)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 8w, 4, 4)
        return torch.amax(x, dim=(2, 3))  # global max pool, (B, 8w)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self._pooled(x)) * 0.125  # logits (B, classes)

    @torch.no_grad()
    def calibrate_feature_scale(self, images: Tensor, batch_size: int = 500) -> float:
        """Set ``feature_scale`` so that features of ``images`` have mean square 1."""
        dev = self.feature_scale.device
        sq, n = 0.0, 0
        for s in range(0, images.shape[0], batch_size):
            f = self._pooled(images[s : s + batch_size].to(dev, torch.float32)).double()
            sq, n = sq + float(f.square().sum()), n + f.numel()
        self.feature_scale.fill_((n / max(sq, 1e-30)) ** 0.5)
        return float(self.feature_scale)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def metric_name(sha256: str) -> str:
    """``FD-prism-<first 8 hex digits>``: the name under which in-house FD is reported."""
    return f"FD-prism-{sha256[:8]}"


def save_feature_net(net: FeatureNet, path: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``path`` (.safetensors) and its ``.json`` sidecar; returns the sidecar dict.

    The sidecar holds the architecture config, ``meta`` (recipe, classes, accuracy) and the
    SHA-256 of the weights file.
    """
    p = Path(path).with_suffix(".safetensors")
    p.parent.mkdir(parents=True, exist_ok=True)
    # state dict in sorted key order, contiguous CPU float32: the bytes depend only on weights
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point()
             else v.detach().contiguous().cpu() for k, v in sorted(net.state_dict().items())}
    data = save(state, metadata={"format": "prism.feature_net"})
    p.write_bytes(data)
    sidecar = {"format": "prism.feature_net", "version": 1, "arch": dict(net.config),
               **meta, "sha256": sha256_bytes(data), "metric_name": metric_name(sha256_bytes(data))}
    p.with_suffix(".json").write_text(json.dumps(sidecar, indent=1))
    return sidecar


def load_feature_net(path: str | Path, device: str | torch.device = "cpu",
                     verify: bool = True) -> tuple[FeatureNet, dict[str, Any]]:
    """Load a feature network (.safetensors + .json sidecar) in eval mode.

    With ``verify`` the file's SHA-256 must equal the sidecar's (a mismatch raises).
    """
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p.with_suffix(".safetensors")
    side = p.with_suffix(".json")
    if not p.is_file() or not side.is_file():
        raise FileNotFoundError(f"feature network needs {p} and {side}")
    data = p.read_bytes()
    meta = json.loads(side.read_text())
    if meta.get("format") != "prism.feature_net":
        raise ValueError(f"{side}: not a prism feature network (format {meta.get('format')!r})")
    digest = sha256_bytes(data)
    if verify and digest != meta.get("sha256"):
        raise ValueError(f"{p}: SHA-256 {digest[:12]} does not match its sidecar "
                         f"({str(meta.get('sha256'))[:12]})")
    net = FeatureNet(**meta["arch"])
    net.load_state_dict(load(data))
    meta["sha256"], meta["metric_name"] = digest, metric_name(digest)
    return net.to(device).train(False), meta


@torch.no_grad()
def extract_features(net: nn.Module, images: Tensor, *, batch_size: int = 500,
                     device: str | torch.device | None = None, bf16: bool = False) -> Tensor:
    """Features of images (N, 3, H, W) float in [-1, 1], computed in batches.

    Uses ``net.features`` when it exists (FeatureNet), else ``net(x)`` (FIDInceptionV3).
    Returns float64 (N, D) on the CPU. The forward pass is float32 by default (metric values
    should not move with the arithmetic); ``bf16`` runs it under CUDA bf16 autocast.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    fn = getattr(net, "features", net)
    out = []
    for s in range(0, images.shape[0], batch_size):
        x = images[s : s + batch_size].to(dev, torch.float32)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and dev.type == "cuda"):
            out.append(fn(x).float().double().cpu())
    return torch.cat(out)


def accuracy(net: FeatureNet, images: Tensor, labels: Tensor, batch_size: int = 500,
             flip_tta: bool = False) -> float:
    """Top-1 accuracy on images (N, 3, H, W) in [-1, 1] (optionally averaging a flip)."""
    dev = next(net.parameters()).device
    correct = 0
    net.train(False)
    with torch.no_grad():
        for s in range(0, images.shape[0], batch_size):
            x = images[s : s + batch_size].to(dev, torch.float32)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                logits = net(x).float()
                if flip_tta:
                    logits = logits + net(x.flip(-1)).float()
            correct += int((logits.argmax(1).cpu() == labels[s : s + batch_size]).sum())
    return correct / images.shape[0]


__all__ = ["FeatureNet", "accuracy", "extract_features", "load_feature_net",
           "metric_name", "save_feature_net"]
