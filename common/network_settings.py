"""Typed settings of each network family, one pydantic model per family.

Each model lists the keyword arguments of its family's ``build`` in
``components.networks.registry`` (``UNet``, ``FlexiUNet``, ``DiMRConfig``, ``DiTConfig``):
the same names and defaults, with types and bounds, so that a bad value fails at config load
naming the field. ``tests/training/test_typed_configs.py`` checks every constructor parameter
against its field, so the two cannot drift apart. ``NetworkSettings`` is their union,
discriminated by ``family``; ``NETWORK_SETTINGS`` maps a family to its model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FamilySettings(_Settings):
    family: str

    def kwargs(self) -> dict[str, Any]:
        """The family ``build``'s keyword arguments (plain data, as saved in config.json)."""
        return self.model_dump(exclude={"family"})


class UNetSettings(FamilySettings):
    """``components.networks.unet.UNet``: the ADM / DDPM UNet."""

    family: Literal["unet"] = "unet"
    resolution: int = Field(32, gt=0)
    in_channels: int = Field(3, gt=0)
    out_channels: int | None = Field(None, gt=0)  # None: in_channels
    model_channels: int = Field(128, gt=0)
    channel_mult: tuple[int, ...] = Field((1, 2, 2, 2), min_length=1)  # width per level
    num_res_blocks: int = Field(2, gt=0)
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sides with self-attention
    dropout: float = Field(0.1, ge=0, lt=1)
    num_classes: int = Field(0, ge=0)  # 0: unconditional
    n_cond: int = Field(1, ge=1)  # c_noise columns: 1, or 3 with per-image spectral bounds
    num_heads: int = Field(1, gt=0)
    head_channels: int = -1  # > 0: heads of this width instead of num_heads
    scale_shift: bool = False  # ADM's AdaGN: GN(h) (1 + scale) + shift instead of GN(h) + e


class FlexiUNetSettings(UNetSettings):
    """``components.networks.flexi_unet.FlexiUNet``: the Scale Space Diffusion UNet."""

    family: Literal["flexi_unet"] = "flexi_unet"  # type: ignore[assignment]
    mode: Literal["flexi", "full"] = "flexi"  # full: the whole UNet at the output size


class BranchSettings(_Settings):
    """``components.networks.dimr.BranchConfig``: one DiMR resolution branch."""

    kind: Literal["transformer", "convnext"]
    dim: int = Field(gt=0)
    depth: int = Field(gt=0)  # number of blocks (odd: U-ViT in/middle/out)
    num_heads: int = Field(0, ge=0)  # attention heads (transformer only)
    hidden_dim: int = Field(0, ge=0)  # GEGLU hidden width; 0 means 2 dim
    downsample: int = Field(1, ge=1)  # area-downsampling of the input
    patch: int = Field(1, ge=1)  # patchify conv kernel and stride
    kernel_size: int = Field(7, ge=1)  # ConvNeXt depthwise kernel
    out_kernel_size: int = Field(3, ge=1)  # output head conv kernel


class DiMRSettings(FamilySettings):
    """``components.networks.dimr.DiMRConfig``: DiMR, branches from coarse to fine."""

    family: Literal["dimr"] = "dimr"
    branches: tuple[BranchSettings, ...] = Field(min_length=1)
    in_channels: int = Field(3, gt=0)
    resolution: int = Field(32, gt=0)
    num_classes: int = Field(0, ge=0)  # 0: unconditional
    n_cond: Literal[1, 3] = 1
    time_norm: Literal["td", "ada_zero"] = "td"  # ada_zero: the adaLN-Zero ablation


class DiTSettings(FamilySettings):
    """``components.networks.dit.DiTConfig``: the pixel DiT with adaLN-Zero."""

    family: Literal["dit"] = "dit"
    in_channels: int = Field(3, gt=0)
    resolution: int = Field(32, gt=0)
    num_classes: int = Field(0, ge=0)  # 0: unconditional
    n_cond: int = Field(1, ge=1, le=3)
    patch: int = Field(2, ge=1)
    dim: int = Field(768, gt=0)
    depth: int = Field(12, gt=0)
    num_heads: int = Field(12, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    freq_dim: int = Field(256, gt=0)  # sinusoidal features per c_noise column


NetworkSettings = Annotated[UNetSettings | FlexiUNetSettings | DiMRSettings | DiTSettings,
                            Field(discriminator="family")]

# family name (``components.networks.registry.FAMILIES``) -> its settings model
NETWORK_SETTINGS: dict[str, type[FamilySettings]] = {
    "unet": UNetSettings,
    "flexi_unet": FlexiUNetSettings,
    "dimr": DiMRSettings,
    "dit": DiTSettings,
}
