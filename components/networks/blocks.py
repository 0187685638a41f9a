"""DiMR's blocks: pre-norm self-attention, GEGLU MLP, Transformer and ConvNeXt blocks.

All tensors are channels-last: tokens (B, N, d) or feature maps (B, H, W, d). Every block takes
the time coordinate ``c`` (B,) for its TD-RMSNorms, the only time input (``tdln.py``).
Speed: one fused qkv projection, ``F.scaled_dot_product_attention`` (flash kernels on GPU),
one fused GEGLU input projection, and the depthwise conv reads a channels-last view without a
copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.networks.adaln import AdaRMSNorm, Gate
from components.networks.tdln import TDRMSNorm


def rms_norm(dim: int, emb_dim: int) -> nn.Module:
    """TD-RMSNorm, or with ``emb_dim`` > 0 the adaLN-Zero ablation's RMS norm (``adaln.py``);
    either is called as ``norm(x, c)`` with c the time coordinate (B,) or embedding (B, E)."""
    return AdaRMSNorm(dim, emb_dim) if emb_dim else TDRMSNorm(dim)


def _gate(dim: int, emb_dim: int) -> Gate | None:
    return Gate(dim, emb_dim) if emb_dim else None


def init_linear(layer: nn.Linear | nn.Conv2d, std: float = 0.02) -> None:
    """Truncated-normal weights (std 0.02), zero bias."""
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def zero_init(layer: nn.Module) -> nn.Module:
    """Zero every parameter of ``layer`` (output heads start at 0)."""
    for p in layer.parameters():
        nn.init.zeros_(p)
    return layer


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention: ``proj(SDPA(qkv(TDRMSNorm(x, c))))``."""

    def __init__(self, dim: int, num_heads: int, emb_dim: int = 0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.norm = rms_norm(dim, emb_dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        init_linear(self.qkv), init_linear(self.proj)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(self.norm(x, c))  # (B, N, 3 D)
        # (B, N, 3, nh, hd) -> (3, B, nh, N, hd): one permute, no copy until SDPA
        q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hd)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class GEGLUMLP(nn.Module):
    """Pre-norm GEGLU MLP: ``w2(gelu(w0 h) * w1 h)``, ``h = TDRMSNorm(x, c)``, hidden 2d."""

    def __init__(self, dim: int, hidden_dim: int, emb_dim: int = 0) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.norm = rms_norm(dim, emb_dim)
        self.w01 = nn.Linear(dim, 2 * hidden_dim)  # [w0; w1] fused into one matmul
        self.w2 = nn.Linear(hidden_dim, dim)
        init_linear(self.w01), init_linear(self.w2)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        gate, value = self.w01(self.norm(x, c)).chunk(2, dim=-1)  # 2 x (..., hidden)
        return self.w2(F.gelu(gate) * value)  # (..., dim)


class TransformerBlock(nn.Module):
    """``x + Attn(x)``, then ``x + MLP(x)``; tokens (B, N, d)."""

    def __init__(self, dim: int, num_heads: int, hidden_dim: int, emb_dim: int = 0) -> None:
        super().__init__()
        self.attn = SelfAttention(dim, num_heads, emb_dim)
        self.mlp = GEGLUMLP(dim, hidden_dim, emb_dim)
        self.gate_attn, self.gate_mlp = _gate(dim, emb_dim), _gate(dim, emb_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        y = self.attn(x, c)
        x = x + (y if self.gate_attn is None else self.gate_attn(y, c))
        y = self.mlp(x, c)
        return x + (y if self.gate_mlp is None else self.gate_mlp(y, c))


class ConvNeXtBlock(nn.Module):
    """``x + DWConv_k(x)``, then ``x + MLP(x)``; feature maps (B, H, W, d) channels-last."""

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int = 7, emb_dim: int = 0
                 ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.mlp = GEGLUMLP(dim, hidden_dim, emb_dim)
        self.gate_conv, self.gate_mlp = _gate(dim, emb_dim), _gate(dim, emb_dim)
        init_linear(self.dwconv)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        # (B, H, W, d) -> NCHW view with channels_last strides: the conv reads it in place
        y = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + (y if self.gate_conv is None else self.gate_conv(y, c))
        y = self.mlp(x, c)
        return x + (y if self.gate_mlp is None else self.gate_mlp(y, c))


class UViTStack(nn.Module):
    """U-ViT long skips over an odd number of blocks: N//2 in, 1 middle, N//2 out.

    Each out-block is preceded by ``Linear(2d -> d)`` on ``[x, skip]``. ``forward`` returns the
    final features and the list [input, every block output] for the feature cascade.
    """

    def __init__(self, blocks: list[nn.Module], dim: int) -> None:
        super().__init__()
        if len(blocks) % 2 != 1:
            raise ValueError(f"a U-ViT stack needs an odd number of blocks, got {len(blocks)}")
        self.blocks = nn.ModuleList(blocks)
        self.skip_proj = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(len(blocks) // 2))
        for layer in self.skip_proj:
            init_linear(layer)

    def forward(self, x: Tensor, c: Tensor) -> tuple[Tensor, list[Tensor]]:
        n_in = len(self.blocks) // 2
        feats, skips = [x], []
        for block in self.blocks[:n_in]:
            x = block(x, c)
            feats.append(x), skips.append(x)
        x = self.blocks[n_in](x, c)  # middle block
        feats.append(x)
        for proj, block in zip(self.skip_proj, self.blocks[n_in + 1 :], strict=True):
            x = block(proj(torch.cat([x, skips.pop()], dim=-1)), c)
            feats.append(x)
        return x, feats
