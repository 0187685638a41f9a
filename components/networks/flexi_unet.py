"""Flexi-UNet (Scale Space Diffusion): a UNet that runs only the parts a resolution needs.

Called as ``net(x, c_noise, class_labels, out_resolution=None)``. With the UNet's levels
``i = 0..L-1`` at ``resolution / 2**i``:

- an input at ``resolution / 2**i`` enters encoder level i (level 0 through ``conv_in``,
  deeper levels through a 1x1 adapter to that level's input channels);
- the middle block always runs;
- the decoder runs from level L-1 up to the output level j <= i (``out_resolution``,
  default the input's): at a resolution-increasing step (j < i) the extra up-stages get zero
  skips where encoder blocks were skipped;
- the output of level j > 0 enters the shared head through a 1x1 adapter.

``mode="full"`` (the comparison): the input is upsampled (nearest) to ``out_resolution`` and
the whole UNet runs at that size. The SSD settings of each preset are in ``SSD_SETTINGS``
(read them with :func:`ssd_settings`; they are saved in ``GenerativeModel.extra``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from components.networks.unet import PRESETS as UNET_PRESETS
from components.networks.unet import UNet

PRESETS: dict[str, dict] = {
    "ssd-64-4l": dict(UNET_PRESETS["unet-64"]),
    "ssd-64-2l": dict(UNET_PRESETS["unet-64"]),
    "ssd-32-3l": dict(UNET_PRESETS["ddpm-cifar10"]),
    "ssd-debug": dict(resolution=16, model_channels=32, channel_mult=(1, 2, 2),
                      num_res_blocks=1, attention_resolutions=(4,), dropout=0.0),
}

# preset -> the SSD process settings (components.ssd.SSDProcess keyword arguments)
SSD_SETTINGS: dict[str, dict[str, Any]] = {
    "ssd-64-4l": dict(levels=4, resolution_schedule="convex", gamma=0.5, T=1000),
    "ssd-64-2l": dict(levels=2, resolution_schedule="convex", gamma=0.5, T=1000),
    "ssd-32-3l": dict(levels=3, resolution_schedule="convex", gamma=0.5, T=1000),
    "ssd-debug": dict(levels=3, resolution_schedule="convex", gamma=0.5, T=1000),
}

# the DDPM-x0 baseline (a `unet` preset of the same width) of each SSD preset
BASELINES: dict[str, str] = {
    "ssd-64-4l": "ddpm-x0-64", "ssd-64-2l": "ddpm-x0-64", "ssd-32-3l": "ddpm-x0-32",
    "ssd-debug": "ddpm-x0-debug",
}


def ssd_settings(preset: str) -> dict[str, Any]:
    """The SSD process settings of a Flexi-UNet preset."""
    if preset not in SSD_SETTINGS:
        raise ValueError(f"unknown SSD preset {preset!r}: expected one of {sorted(SSD_SETTINGS)}")
    return dict(SSD_SETTINGS[preset])


class FlexiUNet(UNet):
    """A :class:`UNet` with per-level 1x1 input and output adapters (see module docstring)."""

    def __init__(self, mode: str = "flexi", **unet_kwargs: Any) -> None:
        super().__init__(**unet_kwargs)
        if mode not in ("flexi", "full"):
            raise ValueError(f"mode must be 'flexi' or 'full', got {mode!r}")
        self.mode = mode
        c_head = self.level_out_channels[0]
        self.in_adapters = nn.ModuleList(
            [nn.Identity()] + [nn.Conv2d(self.in_channels, self.level_in_channels[i], 1)
                               for i in range(1, self.num_levels)]
        )
        self.out_adapters = nn.ModuleList(
            [nn.Identity()] + [nn.Conv2d(self.level_out_channels[i], c_head, 1)
                               for i in range(1, self.num_levels)]
        )

    def level_of(self, size: int, what: str) -> int:
        """UNet level i with ``resolution / 2**i == size``."""
        ratio = self.resolution / size
        i = round(math.log2(ratio)) if ratio >= 1 else -1
        if not 0 <= i < self.num_levels or self.resolution != size * 2**i:
            valid = [self.resolution // 2**i for i in range(self.num_levels)]
            raise ValueError(f"{what} {size} is not a level of this Flexi-UNet: expected one "
                             f"of {valid}")
        return i

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
                out_resolution: int | None = None) -> Tensor:
        """(B, C, r_in, r_in) -> (B, C_out, r_out, r_out), r_out >= r_in (default r_in)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"x must be square (B, {self.in_channels}, H, H), "
                             f"got {tuple(x.shape)}")
        r_out = x.shape[-1] if out_resolution is None else int(out_resolution)
        i, j = self.level_of(x.shape[-1], "input size"), self.level_of(r_out, "out_resolution")
        if j > i:
            raise ValueError(f"out_resolution {r_out} is below the input size {x.shape[-1]}")
        if self.mode == "full":
            if j < i:
                x = F.interpolate(x, size=(r_out, r_out), mode="nearest")
            return super().forward(x, c_noise, class_labels)
        emb = self.embed(c_noise, class_labels)  # (B, 4 ch)
        h = self.conv_in(x) if i == 0 else self.in_adapters[i](x)  # (B, C_i, r_in, r_in)
        skips: list[Tensor | None] = []
        for level in range(j, i):  # levels the encoder skips: zero skips, popped last
            skips.extend([None] * len(self.skip_channels[level]))
        for level in range(i, self.num_levels):
            h = self.encode_level(level, h, emb, skips)  # type: ignore[arg-type]
        h = self.middle(h, emb)
        for level in reversed(range(j, self.num_levels)):
            h = self._decode(level, h, emb, skips, upsample=level > j)
        return self.head(self.out_adapters[j](h))

    def _decode(self, level: int, h: Tensor, emb: Tensor, skips: list[Tensor | None],
                upsample: bool) -> Tensor:
        """Decoder level with zero skips (None) where the encoder did not run."""
        for block, c in zip(self.up[level], reversed(self.skip_channels[level]), strict=True):
            s = skips.pop()
            if s is None:  # (B, c, H, W) zeros, in h's memory format
                s = torch.zeros_like(h[:, :1]).expand(-1, c, -1, -1)
            h = block(torch.cat([h, s], dim=1), emb)
        return self.upsample[level](h) if upsample else h


def build(**kwargs: Any) -> FlexiUNet:
    """Build a Flexi-UNet from constructor keyword arguments (see ``PRESETS``)."""
    return FlexiUNet(**kwargs)


def forward_flops(net: nn.Module, in_resolution: int, out_resolution: int | None = None,
                  batch_size: int = 1) -> int:
    """FLOPs of one forward pass (``torch.utils.flop_counter``) at (in, out) resolutions."""
    p = next(net.parameters())
    x = torch.zeros(batch_size, net.in_channels, in_resolution, in_resolution,
                    device=p.device, dtype=p.dtype)
    c = torch.zeros(batch_size, net.n_cond, device=p.device, dtype=p.dtype)
    kw = {} if out_resolution is None else {"out_resolution": out_resolution}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, c, None, **kw)
    return int(counter.get_total_flops())
