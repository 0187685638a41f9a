"""A pixel DiT with adaLN-Zero (Peebles & Xie 2023): the baseline that TD-LN replaces.

Patchify (p x p stride conv) -> fixed 2-D sin-cos position embedding -> N blocks -> adaLN final
layer -> unpatchify. The conditioning vector ``y = MLP(sinusoid(c_noise)) + class_embed``
modulates every block: ``Linear(d -> 6 d)`` gives (shift, scale, gate) for attention and MLP,
zero-initialised so each block starts as the identity (adaLN-Zero). The model predicts eps
(no learned variance). Label ``-1`` is the null class for classifier-free guidance.
Presets are matched to the DiMR pixel presets in training FLOPs (see ``PRESETS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.networks.blocks import init_linear, zero_init
from components.networks.checks import check_at_least, config_from_kwargs
from components.networks.dimr import class_index
from components.networks.tdln import fourier_embed, param_groups


@dataclass(frozen=True)
class DiTConfig:
    """Pixel DiT hyper-parameters."""

    in_channels: int = 3
    resolution: int = 32
    num_classes: int = 0  # 0: unconditional
    n_cond: int = 1
    patch: int = 2
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    freq_dim: int = 256  # sinusoidal features per c_noise column

    def __post_init__(self) -> None:
        check_at_least(self, in_channels=1, resolution=1, num_classes=0, n_cond=1, patch=1,
                       dim=1, depth=1, num_heads=1, freq_dim=1)
        if self.n_cond > 3 or self.mlp_ratio <= 0:
            raise ValueError(f"DiTConfig: need n_cond <= 3 and mlp_ratio > 0, got "
                             f"n_cond={self.n_cond}, mlp_ratio={self.mlp_ratio}")


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (grid grid, dim): half the channels per axis."""
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for a 2-D sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    ang = pos[:, None] * omega  # (grid, dim/4)
    emb = torch.cat([ang.sin(), ang.cos()], dim=1)  # (grid, dim/2)
    yy = emb[:, None, :].expand(grid, grid, dim // 2)  # row coordinate
    xx = emb[None, :, :].expand(grid, grid, dim // 2)  # column coordinate
    return torch.cat([yy, xx], dim=-1).reshape(grid * grid, dim).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x (1 + scale) + shift`` with per-sample (B, d) shift and scale over tokens (B, N, d)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class DiTBlock(nn.Module):
    """adaLN-Zero block: ``x + g1 Attn(mod(LN x))``, ``x + g2 MLP(mod(LN x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        hidden = int(dim * mlp_ratio)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.adaln = zero_init(nn.Linear(dim, 6 * dim))  # adaLN-Zero modulation
        for layer in (self.qkv, self.proj, self.fc1, self.fc2):
            init_linear(layer)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        B, N, D = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.adaln(F.silu(y)).chunk(6, dim=-1)  # 6 x (B, D)
        h = modulate(F.layer_norm(x, (D,), eps=1e-6), sh1, sc1)
        q, k, v = self.qkv(h).view(B, N, 3, self.num_heads, D // self.num_heads).permute(
            2, 0, 3, 1, 4)  # 3 x (B, nh, N, hd)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + g1[:, None] * self.proj(a)
        h = modulate(F.layer_norm(x, (D,), eps=1e-6), sh2, sc2)
        return x + g2[:, None] * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class DiT(nn.Module):
    """Pixel DiT with adaLN-Zero; ``net(x, c_noise, class_labels) -> eps`` (B, C, H, W)."""

    COMPILE_UNITS = (DiTBlock,)  # run.compile_scope=blocks compiles these on their own

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        if cfg.resolution % cfg.patch:
            raise ValueError(f"resolution {cfg.resolution} not divisible by patch {cfg.patch}")
        self.cfg, d, p = cfg, cfg.dim, cfg.patch
        self.in_channels, self.num_classes, self.n_cond = (
            cfg.in_channels, cfg.num_classes, cfg.n_cond)
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, p, stride=p)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(d, -1))
        nn.init.zeros_(self.patch_embed.bias)
        grid = cfg.resolution // p
        self.register_buffer("pos_embed", sincos_2d(d, grid)[None], persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(cfg.freq_dim * cfg.n_cond, d), nn.SiLU(),
                                   nn.Linear(d, d))
        for layer in (self.t_mlp[0], self.t_mlp[2]):
            init_linear(layer)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes else None
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        self.blocks = nn.ModuleList(
            DiTBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_adaln = zero_init(nn.Linear(d, 2 * d))
        self.final = zero_init(nn.Linear(d, p * p * cfg.in_channels))

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), c_noise (B, n_cond), class_labels (B,) or None -> eps (B, C, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if c_noise.ndim != 2 or c_noise.shape[1] != self.n_cond:
            raise ValueError(f"c_noise must be (B, {self.n_cond}), got {tuple(c_noise.shape)}")
        B, C, H, W = x.shape
        p, D = self.cfg.patch, self.cfg.dim
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        pos = self.pos_embed
        if pos.shape[1] != h.shape[1]:  # another resolution (square grids only)
            pos = sincos_2d(D, H // p)[None].to(h.device)
        h = h + pos.to(h.dtype)
        y = self.t_mlp(fourier_embed(c_noise, self.cfg.freq_dim // 2))  # (B, D)
        if self.class_embed is not None:
            labels = class_labels
            if labels is None:
                labels = torch.full((B,), -1, dtype=torch.long, device=x.device)
            y = y + self.class_embed(class_index(labels, self.num_classes, B))
        for block in self.blocks:
            h = block(h, y)
        shift, scale = self.final_adaln(F.silu(y)).chunk(2, dim=-1)
        h = self.final(modulate(F.layer_norm(h, (D,), eps=1e-6), shift, scale))  # (B, N, p p C)
        # unpatchify: (B, h, w, p, p, C) -> (B, C, h p, w p)
        h = h.view(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(B, C, H, W)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups; norms, biases and embeddings are not decayed."""
        return param_groups(self, weight_decay)


def adaln_params_per_block(dim: int) -> int:
    """adaLN-Zero's parameter cost in one block: ``Linear(d -> 6 d)`` = 6 d^2 + 6 d."""
    return 6 * dim * dim + 6 * dim


PRESETS: dict[str, dict[str, Any]] = {
    # DiT-B/2 on CIFAR-10 (256 tokens): matched to dimr-32-2r in training FLOPs.
    "dit-b2-32": dict(in_channels=3, resolution=32, num_classes=10, patch=2,
                      dim=768, depth=12, num_heads=12),
    # DiT-B/4 at 64x64 (256 tokens): matched to dimr-64-3r in training FLOPs.
    "dit-b4-64": dict(in_channels=3, resolution=64, num_classes=0, patch=4,
                      dim=768, depth=12, num_heads=12),
    "dit-debug": dict(in_channels=3, resolution=16, num_classes=10, patch=2,
                      dim=32, depth=2, num_heads=2),
}


def build(**kwargs: Any) -> DiT:
    """Build a DiT from ``DiTConfig`` fields (as in ``PRESETS`` or a saved config.json)."""
    return DiT(config_from_kwargs(DiTConfig, kwargs))

