"""Time-dependent layer normalisation (TD-LN, Liu et al. 2024, DiMR) and optimizer groups.

A time-dependent parameter interpolates between two learned endpoints with a per-channel
sigmoid gate of the time coordinate ``c`` in [-1, 1] (SCIENCE.md section 5):

    p(c) = s p0 + (1 - s) p1,    s = sigmoid((1 + w') c + b')

At initialisation ``p0 = p1`` and ``w' = b' = 0``, so ``p(c) = p0`` for every ``c`` and a TD norm
is exactly the plain norm. ``w'`` and ``b'`` are exempt from weight decay
(:func:`param_groups`). TD-RMSNorm has a time-dependent scale; TD-LayerNorm a time-dependent
scale and bias. TD-LN is the network's only time input: no timestep embedding, no adaLN MLP.

Time coordinate (ours, documented): backbones receive ``c_noise = lambda / 15`` (B, n_cond).
The paper's ``c`` is affine in the timestep; prism's networks see log-SNR, so ``c`` is the
cosine schedule's time of that log-SNR mapped to [-1, 1]:

    c = 2 t_cos(lambda) - 1,    t_cos(lambda) = (2 / pi) arctan(exp(-lambda / 2))

``c = +1`` at high noise and ``-1`` at low noise (the orientation of the public DiMR code,
whose ``c`` rises with the timestep), 0 at lambda = 0. The map is fixed (it does not depend on
the schedule a model is trained with) and spreads the log-SNRs that training visits over the
gate's range: lambda in [-4, 4] gives c in [-0.83, 0.83]. (A linear ``-lambda / 15`` squeezed
them into [-0.27, 0.27], where ``sigmoid(c)`` moves by 0.13 and a trained DiMR barely told
noise levels apart.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# c_noise = lambda / LAMBDA_SCALE (components.diffusion; not imported: networks stand alone)
LAMBDA_SCALE = 15.0


def time_coordinate(c_noise: Tensor) -> Tensor:
    """``c = (4 / pi) arctan(exp(-lambda / 2)) - 1`` with ``lambda = 15 c_noise[:, 0]``: (B,)
    float32 in [-1, 1], +1 at high noise, -1 at low noise (module docstring)."""
    if c_noise.ndim != 2:
        raise ValueError(f"c_noise must be (B, n_cond), got shape {tuple(c_noise.shape)}")
    lam = c_noise[:, 0].float() * LAMBDA_SCALE
    return torch.atan(torch.exp(-0.5 * lam)) * (4.0 / math.pi) - 1.0


def fourier_embed(c: Tensor, n_freq: int = 64, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of each column of c (B, k) -> (B, 2 k n_freq), scaled by ``scale``."""
    freqs = torch.exp(-math.log(1e4) * torch.arange(n_freq, device=c.device) / n_freq)
    arg = (scale * c.float())[..., None] * freqs  # (B, k, n_freq)
    return torch.cat([arg.cos(), arg.sin()], dim=-1).flatten(1)



class TimeDependentParameter(nn.Module):
    """A per-channel parameter vector that depends on the time coordinate ``c`` (B,).

    Learned: ``p0``, ``p1`` (the endpoints, both initialised to ``init``), ``w_time`` (w') and
    ``b_time`` (b'), both zero (never weight-decayed). Returns (B, dim).
    """

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.p0 = nn.Parameter(torch.full((dim,), float(init)))
        self.p1 = nn.Parameter(torch.full((dim,), float(init)))
        self.w_time = nn.Parameter(torch.zeros(dim))
        self.b_time = nn.Parameter(torch.zeros(dim))

    def forward(self, c: Tensor) -> Tensor:
        # s = sigmoid((1 + w') c + b'): (B, 1) * (dim,) -> (B, dim)
        s = torch.sigmoid(c[:, None].to(self.p0.dtype) * (1.0 + self.w_time) + self.b_time)
        # p = s p0 + (1 - s) p1 = p1 + s (p0 - p1)
        return torch.addcmul(self.p1, s, self.p0 - self.p1)


def _per_sample(p: Tensor, x: Tensor) -> Tensor:
    """(B, d) -> (B, 1, ..., 1, d) to broadcast over a channels-last x (B, ..., d)."""
    return p.view(p.shape[0], *([1] * (x.ndim - 2)), p.shape[1])


class TDRMSNorm(nn.Module):
    """RMS norm over the last dim with a time-dependent scale: ``x / rms(x) * g(c)``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.scale = TimeDependentParameter(dim, 1.0)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, ..., dim) channels-last, c (B,) -> same shape as x."""
        y = F.rms_norm(x, (self.dim,), eps=self.eps)
        return y * _per_sample(self.scale(c), x).to(y.dtype)


class TDLayerNorm(nn.Module):
    """Layer norm over the last dim with time-dependent scale and bias: ``LN(x) g(c) + b(c)``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.scale = TimeDependentParameter(dim, 1.0)
        self.bias = TimeDependentParameter(dim, 0.0)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, ..., dim) channels-last, c (B,) -> same shape as x."""
        y = F.layer_norm(x, (self.dim,), eps=self.eps)
        g, b = _per_sample(self.scale(c), x), _per_sample(self.bias(c), x)
        return torch.addcmul(b.to(y.dtype), y, g.to(y.dtype))


# -- optimizer groups ------------------------------------------------------------------------

NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, TimeDependentParameter)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters exempt from weight decay.

    Exempt: TD-LN's w', b' (and its endpoints p0, p1: they are norm parameters), every other
    norm parameter, biases, embeddings (``nn.Embedding`` weights and any parameter whose name
    contains ``pos_embed`` or ``token``), i.e. every parameter with fewer than 2 dims plus
    embeddings. Everything else (Linear and Conv weights) is decayed.
    """
    names: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, NO_DECAY_MODULES):
            names.update(f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters())
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim < 2 or "pos_embed" in leaf or "token" in leaf:
            names.add(name)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``[{decayed, weight_decay}, {exempt, weight_decay=0}]``.

    Each group carries a ``"name"`` ("decay" / "no_decay"); shared parameters appear once.
    """
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    exempt = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # named_parameters() de-duplicates shared tensors
        if p.requires_grad:
            (no_decay if name in exempt else decay).append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
