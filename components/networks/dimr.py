"""DiMR: the multi-resolution diffusion network with TD-LN (Liu et al. 2024; SCIENCE.md sec. 5).

Branches run from coarse to fine. Branch b area-downsamples the input by ``downsample``,
patchifies with a ``patch`` x ``patch`` stride conv to a grid ``g_b = H / (downsample patch)``,
adds a learned position embedding, adds the cascade from branch b-1, and runs a U-ViT stack of
Transformer blocks (the coarsest branch, with a conditioning token: the class, null class for
CFG) or ConvNeXt blocks. Its head (TD-LayerNorm, 3x3 conv) predicts eps at ``g_b``: the target is
``k_b D_{k_b}[eps]`` with ``k_b = H / g_b`` (``components.multiscale``).

Feature cascade b -> b+1 (r = g_{b+1} / g_b):
    [input embedding, every block output] (B, g, g, d_b (depth_b + 1)) -> TD-LayerNorm
    -> Linear(d_b (depth_b + 1) -> d_{b+1} r^2) -> PixelShuffle(r) -> TD-LayerNorm
    -> added to branch b+1's input embedding (gradients flow through).

Time enters only through TD-LN, via ``c = tdln.time_coordinate(c_noise)`` in [-1, 1]. With
``n_cond = 3`` (spectral schedules) the extra columns ``(lambda(0), lambda(1)) / 15`` are
embedded (sinusoidal, x1000) and added to the conditioning token through a zero-initialised
Linear (ours, documented): at initialisation the network ignores them.

``net(x, c_noise, class_labels)`` returns the finest branch's eps (B, C, H, W);
``net.forward_all(...)`` (= ``net(..., return_all=True)``) returns every branch, coarse to fine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.networks.adaln import AdaLayerNorm, TimeEmbedding
from components.networks.blocks import (
    ConvNeXtBlock,
    TransformerBlock,
    UViTStack,
    init_linear,
    zero_init,
)
from components.networks.checks import check_at_least, config_from_kwargs
from components.networks.tdln import (
    TDLayerNorm,
    fourier_embed,
    param_groups,
    time_coordinate,
)


@dataclass(frozen=True)
class BranchConfig:
    """One resolution branch."""

    kind: Literal["transformer", "convnext"]
    dim: int
    depth: int  # number of blocks (odd: U-ViT in/middle/out)
    num_heads: int = 0  # attention heads (transformer only)
    hidden_dim: int = 0  # GEGLU hidden width; 0 means 2 dim
    downsample: int = 1  # area-downsampling of the input
    patch: int = 1  # patchify conv kernel and stride
    kernel_size: int = 7  # ConvNeXt depthwise kernel
    out_kernel_size: int = 3  # output head conv kernel

    def __post_init__(self) -> None:
        if self.kind not in ("transformer", "convnext"):
            raise ValueError(f"branch kind must be 'transformer' or 'convnext', got {self.kind!r}")
        check_at_least(self, dim=1, depth=1, num_heads=0, hidden_dim=0, downsample=1, patch=1,
                       kernel_size=1, out_kernel_size=1)


@dataclass(frozen=True)
class DiMRConfig:
    """The whole network; ``branches`` from coarse to fine (``BranchConfig`` or its fields)."""

    branches: tuple[BranchConfig, ...]
    in_channels: int = 3
    resolution: int = 32
    num_classes: int = 0  # 0: unconditional
    n_cond: Literal[1, 3] = 1
    # "td": TD-LN, the paper's network; "ada_zero": the ablation, adaLN-Zero norms and gates
    # from a time embedding of the coarsest branch's width (``adaln.py``)
    time_norm: Literal["td", "ada_zero"] = "td"

    def __post_init__(self) -> None:
        branches = tuple(b if isinstance(b, BranchConfig) else config_from_kwargs(BranchConfig, b)
                         for b in self.branches)
        object.__setattr__(self, "branches", branches)  # frozen: set once, here
        if not branches:
            raise ValueError("DiMRConfig needs at least one branch")
        check_at_least(self, in_channels=1, resolution=1, num_classes=0)
        if self.n_cond not in (1, 3):
            raise ValueError(f"n_cond must be 1 or 3, got {self.n_cond}")
        if self.time_norm not in ("td", "ada_zero"):
            raise ValueError(f"time_norm must be 'td' or 'ada_zero', got {self.time_norm!r}")


def class_index(labels: Tensor, num_classes: int, batch: int) -> Tensor:
    """Embedding index of class labels (B,): label -1 (null class, for CFG) -> ``num_classes``.

    Range is checked for CPU labels outside compilation (a check on GPU would sync the host).
    """
    if labels.shape != (batch,):
        raise ValueError(f"class_labels must be ({batch},), got {tuple(labels.shape)}")
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(((labels < -1) | (labels >= num_classes)).any()):
            raise ValueError(f"class labels must be in [-1, {num_classes}), -1 is the null class")
    return torch.where(labels < 0, num_classes, labels)


def pixel_shuffle_last(x: Tensor, r: int) -> Tensor:
    """(B, h, w, r r d) -> (B, h r, w r, d), channels-last PixelShuffle."""
    B, h, w, C = x.shape
    x = x.view(B, h, w, r, r, C // (r * r)).permute(0, 1, 3, 2, 4, 5)  # (B, h, r, w, r, d)
    return x.reshape(B, h * r, w * r, C // (r * r))


def layer_norm(dim: int, emb_dim: int) -> nn.Module:
    """TD-LayerNorm, or with ``emb_dim`` > 0 the adaLN-Zero ablation's layer norm."""
    return AdaLayerNorm(dim, emb_dim) if emb_dim else TDLayerNorm(dim)


class Cascade(nn.Module):
    """TD-LN -> Linear(d_in -> d_out r^2) -> PixelShuffle(r) -> TD-LN."""

    def __init__(self, d_in: int, d_out: int, r: int, emb_dim: int = 0) -> None:
        super().__init__()
        self.r = r
        self.norm_in = layer_norm(d_in, emb_dim)
        self.linear = nn.Linear(d_in, d_out * r * r)
        self.norm_out = layer_norm(d_out, emb_dim)
        init_linear(self.linear)

    def forward(self, feats: Tensor, c: Tensor) -> Tensor:
        y = self.linear(self.norm_in(feats, c))  # (B, g, g, d_out r^2)
        return self.norm_out(pixel_shuffle_last(y, self.r), c)  # (B, g r, g r, d_out)


class Branch(nn.Module):
    """One resolution: input embedding, (cascade), U-ViT stack, eps head at grid ``g``."""

    def __init__(self, cfg: BranchConfig, in_channels: int, grid: int, emb_dim: int = 0
                 ) -> None:
        super().__init__()
        self.cfg, self.grid = cfg, grid
        d, hidden = cfg.dim, cfg.hidden_dim or 2 * cfg.dim
        self.patch_embed = nn.Conv2d(in_channels, d, cfg.patch, stride=cfg.patch)
        init_linear(self.patch_embed)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, d))
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        if cfg.kind == "transformer":
            if cfg.num_heads < 1:
                raise ValueError("a transformer branch needs num_heads >= 1")
            blocks = [TransformerBlock(d, cfg.num_heads, hidden, emb_dim)
                      for _ in range(cfg.depth)]
        else:
            blocks = [ConvNeXtBlock(d, hidden, cfg.kernel_size, emb_dim)
                      for _ in range(cfg.depth)]
        self.stack = UViTStack(blocks, d)
        self.head_norm = layer_norm(d, emb_dim)
        k = cfg.out_kernel_size
        self.head = zero_init(nn.Conv2d(d, in_channels, k, padding=k // 2))

    def embed(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> input embedding (B, g, g, d)."""
        if self.cfg.downsample > 1:  # area downsampling D_m
            x = F.avg_pool2d(x, self.cfg.downsample)
        h = self.patch_embed(x).permute(0, 2, 3, 1)  # (B, g, g, d)
        pos = self.pos_embed
        if pos.shape[1:3] != h.shape[1:3]:  # another resolution: resize the table
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=h.shape[1:3], mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1)
        return h + pos

    def forward(
        self, x: Tensor, c: Tensor, lowres: Tensor | None, tokens: Tensor | None, head: bool,
        cascade: bool = True,
    ) -> tuple[Tensor | None, Tensor | None]:
        """-> (eps at grid g (B, C, g, g) if ``head``, cascade features
        (B, g, g, d (depth+1)) if ``cascade``)."""
        h = self.embed(x)  # (B, g, g, d)
        if lowres is not None:
            h = h + lowres
        B, g1, g2, d = h.shape
        if self.cfg.kind == "transformer":
            seq = h.reshape(B, g1 * g2, d)
            if tokens is not None:
                seq = torch.cat([tokens, seq], dim=1)  # (B, T + g g, d)
            out, feats = self.stack(seq, c)
            t = 0 if tokens is None else tokens.shape[1]
            out = out[:, t:].reshape(B, g1, g2, d)
            feats = [f[:, t:].reshape(B, g1, g2, d) for f in feats] if cascade else feats
        else:
            out, feats = self.stack(h, c)
        eps = self.head(self.head_norm(out, c).permute(0, 3, 1, 2)) if head else None
        return eps, torch.cat(feats, dim=-1) if cascade else None


class DiMR(nn.Module):
    """Multi-resolution network with TD-LN; see the module docstring."""

    # run.compile_scope=blocks compiles these on their own
    COMPILE_UNITS = (TransformerBlock, ConvNeXtBlock)

    def __init__(self, cfg: DiMRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_channels, self.num_classes, self.n_cond = (
            cfg.in_channels, cfg.num_classes, cfg.n_cond)
        grids = []
        for b in cfg.branches:
            step = b.downsample * b.patch
            if cfg.resolution % step:
                raise ValueError(f"resolution {cfg.resolution} is not divisible by "
                                 f"downsample x patch = {step} of a {b.kind} branch")
            grids.append(cfg.resolution // step)
        if cfg.branches[0].kind != "transformer" or any(
                b.kind != "convnext" for b in cfg.branches[1:]):
            raise ValueError("branches must be one transformer branch then convnext branches")
        if any(g2 % g1 or g2 <= g1 for g1, g2 in zip(grids, grids[1:], strict=False)):
            raise ValueError(f"branch grids must grow by integer factors, got {grids}")
        self.grids = grids
        d0 = cfg.branches[0].dim
        # conditioning token: class embedding (index num_classes = null class) or a learned token
        self.class_embed = nn.Embedding(cfg.num_classes + 1, d0) if cfg.num_classes else None
        self.cond_token = None if cfg.num_classes else nn.Parameter(torch.zeros(1, 1, d0))
        if self.class_embed is not None:
            nn.init.trunc_normal_(self.class_embed.weight, std=0.02, a=-0.04, b=0.04)
        self.bounds_proj = None
        if cfg.n_cond == 3:  # (lambda(0), lambda(1)) -> token offset, zero at init
            self.bounds_proj = zero_init(nn.Linear(2 * 2 * 64, d0))
        emb = d0 if cfg.time_norm == "ada_zero" else 0
        self.time_embed = TimeEmbedding(emb) if emb else None
        self.branches = nn.ModuleList(
            Branch(b, cfg.in_channels, g, emb) for b, g in zip(cfg.branches, grids, strict=True))
        self.cascades = nn.ModuleList(
            Cascade(b.dim * (b.depth + 1), nb.dim, g2 // g1, emb) for b, nb, g1, g2 in zip(
                cfg.branches, cfg.branches[1:], grids, grids[1:], strict=False))

    def _tokens(self, c_noise: Tensor, class_labels: Tensor | None, B: int) -> Tensor:
        """The Transformer branch's conditioning token (B, 1, d0)."""
        if self.class_embed is not None:
            if class_labels is None:  # no labels given: the null class
                class_labels = torch.full((B,), -1, dtype=torch.long, device=c_noise.device)
            tok = self.class_embed(class_index(class_labels, self.num_classes, B))[:, None]
        else:
            tok = self.cond_token.expand(B, -1, -1)
        if self.bounds_proj is not None:
            tok = tok + self.bounds_proj(fourier_embed(c_noise[:, 1:3]))[:, None]
        return tok

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
                return_all: bool = False) -> Tensor | list[Tensor]:
        """x (B, C, H, W), c_noise (B, n_cond), class_labels (B,) or None.

        Returns the finest branch's eps (B, C, H, W), or with ``return_all`` the list of every
        branch's eps (B, C, g_b, g_b), coarse to fine.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if c_noise.ndim != 2 or c_noise.shape[1] != self.n_cond:
            raise ValueError(f"c_noise must be (B, {self.n_cond}), got {tuple(c_noise.shape)}")
        c = time_coordinate(c_noise)  # (B,) in [-1, 1]
        if self.time_embed is not None:  # the adaLN-Zero ablation: norms read an embedding
            c = self.time_embed(c)  # (B, E)
        tokens = self._tokens(c_noise, class_labels, x.shape[0])
        outs, lowres = [], None
        last = len(self.branches) - 1
        for i, branch in enumerate(self.branches):
            eps, feats = branch(x, c, lowres, tokens if i == 0 else None,
                                head=return_all or i == last, cascade=i < last)
            outs.append(eps)
            if i < last:
                lowres = self.cascades[i](feats, c)  # (B, g_{i+1}, g_{i+1}, d_{i+1})
        return outs if return_all else outs[-1]

    def forward_all(self, x: Tensor, c_noise: Tensor,
                    class_labels: Tensor | None = None) -> list[Tensor]:
        """Every branch's eps, coarse to fine (for the multi-scale loss)."""
        return self(x, c_noise, class_labels, return_all=True)

    @property
    def branch_factors(self) -> list[int]:
        """``k_b = H / g_b``: the downsampling factor of each branch's eps target."""
        return [self.cfg.resolution // g for g in self.grids]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups; TD-LN's w', b', norms, biases and embeddings are not decayed."""
        return param_groups(self, weight_decay)


def _xl_2r() -> dict[str, Any]:
    # Published DiMR-XL/2R (latent 32x32x4, 1000 classes): Transformer branch at 16x16
    # (patch 2, 39 blocks, width 960, 16 heads), ConvNeXt branch at 32x32 (21 blocks, 480).
    return dict(in_channels=4, resolution=32, num_classes=1000, branches=[
        dict(kind="transformer", dim=960, depth=39, num_heads=16, patch=2),
        dict(kind="convnext", dim=480, depth=21),
    ])


PRESETS: dict[str, dict[str, Any]] = {
    "dimr-xl-2r": _xl_2r(),
    # CIFAR-10: Transformer at 16x16 (patch 2, DiT-B width) + ConvNeXt at 32x32;
    # 141 GFLOP per training image (fwd + bwd), matched to dit-b2-32 (138 GFLOP).
    "dimr-32-2r": dict(in_channels=3, resolution=32, num_classes=10, branches=[
        dict(kind="transformer", dim=768, depth=9, num_heads=12, patch=2),
        dict(kind="convnext", dim=192, depth=7),
    ]),
    # 64x64: Transformer at 16x16 (area /2, patch 2), ConvNeXt at 32x32 and 64x64;
    # matched in training FLOPs to dit-b4-64.
    "dimr-64-3r": dict(in_channels=3, resolution=64, num_classes=0, branches=[
        dict(kind="transformer", dim=768, depth=9, num_heads=12, downsample=2, patch=2),
        dict(kind="convnext", dim=192, depth=5, downsample=2),
        dict(kind="convnext", dim=64, depth=3),
    ]),
    "dimr-debug": dict(in_channels=3, resolution=16, num_classes=10, branches=[
        dict(kind="transformer", dim=32, depth=3, num_heads=2, patch=2),
        dict(kind="convnext", dim=16, depth=1),
    ]),
}


def build(**kwargs: Any) -> DiMR:
    """Build a DiMR from ``DiMRConfig`` fields (as in ``PRESETS`` or a saved config.json)."""
    return DiMR(config_from_kwargs(DiMRConfig, kwargs))
