"""ADM / DDPM-style UNet backbone (Ho et al. 2020; Dhariwal & Nichol 2021).

Called as ``net(x, c_noise, class_labels) -> out`` (docs/CONVENTIONS.md):
``x`` (B, C_in, H, W), ``c_noise`` (B, n_cond) about [-1, 1], ``class_labels`` (B,) long or
None; label ``-1`` (or ``num_classes``) is the null class of classifier-free guidance.

Layout, for ``L = len(channel_mult)`` levels (level ``i`` works at ``resolution / 2**i``)::

    conv_in -> [level i: num_res_blocks x (ResBlock [+ Attention]), Downsample (i < L-1)]
            -> middle: ResBlock, Attention, ResBlock
            -> [level i reversed: (num_res_blocks + 1) x (concat skip, ResBlock [+ Attention]),
                Upsample (i > 0)] -> head: GroupNorm, SiLU, conv3x3

The building blocks (``ResBlock``, ``Attention``, ``Downsample``, ``Upsample``,
``NoiseEmbedding``, ``Head``) are reused by ``components.networks.flexi_unet``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# c_noise (about [-1, 1]) is scaled up before the sinusoidal embedding (CONVENTIONS.md), so
# that the frequencies 1 .. 1/10000 resolve the noise-level range like DDPM's step index.
C_NOISE_SCALE = 1000.0

PRESETS: dict[str, dict] = {
    # DDPM CIFAR-10 (Ho et al. 2020, appendix B): 35.7M parameters.
    "ddpm-cifar10": dict(
        resolution=32, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
        attention_resolutions=(16,), dropout=0.1,
    ),
    # A 64x64 UNet of the same width (4 levels: 64, 32, 16, 8).
    "unet-64": dict(
        resolution=64, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
        attention_resolutions=(16,), dropout=0.1,
    ),
    # The DDPM-x0 baseline of Scale Space Diffusion: same width as the ssd-64-* presets.
    "ddpm-x0-64": dict(
        resolution=64, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
        attention_resolutions=(16,), dropout=0.1,
    ),
    # The DDPM-x0 baseline of ssd-32-3l (= ddpm-cifar10).
    "ddpm-x0-32": dict(
        resolution=32, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
        attention_resolutions=(16,), dropout=0.1,
    ),
    # The DDPM-x0 baseline of ssd-debug (same width).
    "ddpm-x0-debug": dict(
        resolution=16, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
        attention_resolutions=(4,), dropout=0.0,
    ),
    # Tiny: trains 20 steps on CPU in seconds.
    "unet-debug": dict(
        resolution=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(8,), dropout=0.0,
    ),
}


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (the largest divisor of ``channels`` not above 32)."""
    groups = max(g for g in range(1, max_groups + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (ADM: last conv of each residual branch starts at zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def sinusoidal(c: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of a (B,) coordinate -> (B, dim): [cos(c f_k), sin(c f_k)]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=c.device, dtype=torch.float32) / half
    )  # (half,) from 1 down to 1/max_period
    args = c.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class NoiseEmbedding(nn.Module):
    """(B, n_cond) c_noise [+ class labels] -> (B, emb_dim) conditioning vector.

    Each c_noise column (x 1000) gets its own sinusoidal embedding of ``model_channels``
    dims; they are concatenated and passed through Linear, SiLU, Linear (DDPM's temb MLP).
    Classes add a learned embedding; index ``num_classes`` is the null class.
    """

    def __init__(self, model_channels: int, emb_dim: int, n_cond: int = 1,
                 num_classes: int = 0) -> None:
        super().__init__()
        self.model_channels, self.n_cond, self.num_classes = model_channels, n_cond, num_classes
        self.mlp = nn.Sequential(
            nn.Linear(n_cond * model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

    def forward(self, c_noise: Tensor, class_labels: Tensor | None) -> Tensor:
        if c_noise.ndim == 1:
            c_noise = c_noise[:, None]
        if c_noise.ndim != 2 or c_noise.shape[1] != self.n_cond:
            raise ValueError(
                f"c_noise must have shape (B, {self.n_cond}), got {tuple(c_noise.shape)}"
            )
        emb = torch.cat(
            [sinusoidal(c_noise[:, k] * C_NOISE_SCALE, self.model_channels)
             for k in range(self.n_cond)], dim=1,
        )  # (B, n_cond * model_channels)
        emb = self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, emb_dim)
        if self.class_embed is not None:
            emb = emb + self.class_embed(self._class_index(class_labels, c_noise))
        return emb

    def _class_index(self, labels: Tensor | None, c_noise: Tensor) -> Tensor:
        """Labels (B,) with -1 for the null class -> embedding indices in [0, num_classes]."""
        n = self.num_classes
        if labels is None:  # no labels given: the null class for every image
            return torch.full((c_noise.shape[0],), n, dtype=torch.long, device=c_noise.device)
        labels = labels.long()
        # the range is checked for CPU labels outside compilation, as DiT's and DiMR's
        # (networks.dimr.class_index): on the GPU it would sync the host every step and break
        # the compiled graph; the training batches are checked on the host before they move
        # (training.data.to_batch), the sampler's labels where it makes them
        check = labels.device.type == "cpu" and not torch.compiler.is_compiling()
        if check and labels.numel() and (int(labels.min()) < -1 or int(labels.max()) > n):
            raise ValueError(
                f"class_labels must be in [-1, {n}] (-1 or {n} = null class), got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        return torch.where(labels < 0, torch.full_like(labels, n), labels)


class ResBlock(nn.Module):
    """Residual block: GN, SiLU, conv3x3, GN, + emb projection, SiLU, dropout, conv3x3.

    The embedding (noise level, class) enters **after** the second GroupNorm, as a per-channel
    shift ``GN(h) + e``, or with ``scale_shift`` (ADM's AdaGN) as ``GN(h) (1 + scale) + shift``.

    Why after the norm: DDPM adds ``e`` before it (``GN(h + e)``). A per-(sample, channel)
    constant is then removed by the group mean except for its deviation within each group, so
    with one channel per group (32 channels or fewer under 32 groups) the block cannot see the
    embedding at all, and with two per group half of it is lost. Added after the norm, nothing
    subtracts it, at any width and group count. The shift keeps DDPM's parameter count and FLOPs
    (the ``ddpm-*`` presets stay 35.7M parameters and comparable with diffusers' UNet); AdaGN
    doubles ``emb_proj`` and is the stronger option at large scale (Dhariwal & Nichol 2021).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0,
                 scale_shift: bool = False) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch * (2 if scale_shift else 1))
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        e = self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, out or 2 out, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h) + e
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions (scaled_dot_product_attention).

    ``num_heads`` heads, or ``head_channels`` channels per head when given (ADM uses 64).
    """

    def __init__(self, channels: int, num_heads: int = 1, head_channels: int = -1) -> None:
        super().__init__()
        if head_channels > 0:
            num_heads = max(1, channels // head_channels)
        if channels % num_heads:
            raise ValueError(f"attention: {channels} channels not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    """Strided 3x3 convolution: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest 2x then 3x3 convolution: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Head(nn.Module):
    """Output head: GN, SiLU, zero-initialised conv3x3 to ``out_channels``."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.conv = zero_(nn.Conv2d(channels, out_channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.silu(self.norm(x)))


class Block(nn.Module):
    """One ResBlock, optionally followed by attention."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, attn: bool,
                 num_heads: int, head_channels: int, scale_shift: bool) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout, scale_shift)
        self.attn = Attention(out_ch, num_heads, head_channels) if attn else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x)


class UNet(nn.Module):
    """ADM/DDPM UNet; see the module docstring for the layout.

    Attributes used by subclasses: ``down[i]`` (ModuleList of Blocks of level i),
    ``downsample[i]`` (Downsample or Identity), ``mid``, ``up[i]`` (Blocks of decoder
    level i, consuming skips), ``upsample[i]``, ``skip_channels[i]`` (channels of the
    skips pushed at level i, in order: level input, then each block output), ``head``.
    """

    COMPILE_UNITS = (Block,)  # run.compile_scope=blocks compiles these on their own

    def __init__(
        self,
        resolution: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_classes: int = 0,
        n_cond: int = 1,
        num_heads: int = 1,
        head_channels: int = -1,
        scale_shift: bool = False,
    ) -> None:
        super().__init__()
        if resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(
                f"resolution {resolution} is not divisible by 2**{len(channel_mult) - 1} "
                f"(channel_mult has {len(channel_mult)} levels)"
            )
        if num_res_blocks < 1 or model_channels < 1 or not channel_mult:
            raise ValueError(
                "num_res_blocks and model_channels must be >= 1 and channel_mult non-empty"
            )
        self.resolution, self.in_channels = resolution, in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes, self.n_cond = num_classes, n_cond
        self.num_levels = len(channel_mult)
        emb_dim = 4 * model_channels
        blk = dict(emb_dim=emb_dim, dropout=dropout, num_heads=num_heads,
                   head_channels=head_channels, scale_shift=scale_shift)
        self.embed = NoiseEmbedding(model_channels, emb_dim, n_cond, num_classes)
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)

        # ---- encoder: record the channels of every skip, level by level
        ch = model_channels
        self.level_in_channels: list[int] = []  # channels entering level i
        self.skip_channels: list[list[int]] = []
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i, mult in enumerate(channel_mult):
            attn = resolution // 2**i in attention_resolutions
            self.level_in_channels.append(ch)
            skips, blocks = [ch], nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(Block(ch, model_channels * mult, attn=attn, **blk))
                ch = model_channels * mult
                skips.append(ch)
            self.down.append(blocks)
            self.skip_channels.append(skips)
            self.downsample.append(Downsample(ch) if i < self.num_levels - 1 else nn.Identity())

        # ---- middle
        self.mid = nn.ModuleList(
            [Block(ch, ch, attn=True, **blk), Block(ch, ch, attn=False, **blk)]
        )

        # ---- decoder: level i consumes its skips in reverse order
        self.level_out_channels: list[int] = [0] * self.num_levels
        up: list[nn.ModuleList] = [nn.ModuleList() for _ in channel_mult]
        ups: list[nn.Module] = [nn.Identity() for _ in channel_mult]
        for i in reversed(range(self.num_levels)):
            out = model_channels * channel_mult[i]
            attn = resolution // 2**i in attention_resolutions
            for skip in reversed(self.skip_channels[i]):
                up[i].append(Block(ch + skip, out, attn=attn, **blk))
                ch = out
            self.level_out_channels[i] = ch
            ups[i] = Upsample(ch) if i > 0 else nn.Identity()
        self.up, self.upsample = nn.ModuleList(up), nn.ModuleList(ups)
        self.head = Head(ch, self.out_channels)

    # ------------------------------------------------------------------ pieces for subclasses
    def encode_level(self, i: int, h: Tensor, emb: Tensor, skips: list[Tensor]) -> Tensor:
        """Run encoder level i on its input h (pushed as the first skip); return the input of
        level i+1 (or of the middle block)."""
        skips.append(h)
        for block in self.down[i]:
            h = block(h, emb)
            skips.append(h)
        return self.downsample[i](h)

    def decode_level(self, i: int, h: Tensor, emb: Tensor, skips: list[Tensor],
                     upsample: bool) -> Tensor:
        """Run decoder level i, popping its skips; optionally upsample to level i-1."""
        for block in self.up[i]:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.upsample[i](h) if upsample else h

    def middle(self, h: Tensor, emb: Tensor) -> Tensor:
        for block in self.mid:
            h = block(h, emb)
        return h

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """(B, C_in, H, W), (B, n_cond), (B,) or None -> (B, C_out, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        div = 2 ** (self.num_levels - 1)
        if x.shape[-1] % div or x.shape[-2] % div:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be divisible by {div}")
        emb = self.embed(c_noise, class_labels)  # (B, 4 ch)
        h, skips = self.conv_in(x), []
        for i in range(self.num_levels):
            h = self.encode_level(i, h, emb, skips)
        h = self.middle(h, emb)
        for i in reversed(range(self.num_levels)):
            h = self.decode_level(i, h, emb, skips, upsample=i > 0)
        return self.head(h)


def build(**kwargs) -> UNet:
    """Build a UNet from constructor keyword arguments (see ``PRESETS``)."""
    return UNet(**kwargs)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
