"""adaLN-Zero norms for DiMR's ablation: the time as an embedding that modulates every norm
and gates every residual branch (DiT's conditioning), in place of TD-LN (``tdln.py``).

``DiMRConfig(time_norm="ada_zero")`` builds every block with these. The time coordinate ``c``
(the same as TD-LN's, ``tdln.time_coordinate``) is embedded once per forward,

    e = SiLU(MLP(fourier(c)))                                   (B, E)

and each norm maps ``e`` through its own zero-initialised Linear to a scale (and a shift for
the layer norm): ``norm(x) (1 + scale(e)) + shift(e)``. Each residual branch is multiplied by
a zero-initialised gate ``gate(e)``, so every block starts as the identity (the "Zero"). The
cost is parameters, not FLOPs: one ``E x d`` matrix per norm and gate, against TD-LN's four
vectors of ``d``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from components.networks.tdln import fourier_embed


def _per_sample(p: Tensor, x: Tensor) -> Tensor:
    """(B, d) -> (B, 1, ..., 1, d) to broadcast over a channels-last x (B, ..., d)."""
    return p.view(p.shape[0], *([1] * (x.ndim - 2)), p.shape[1])


def _zero_linear(emb_dim: int, out: int) -> nn.Linear:
    layer = nn.Linear(emb_dim, out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class AdaRMSNorm(nn.Module):
    """RMS norm over the last dim scaled by ``1 + Linear(e)`` (zero at init: the plain norm)."""

    def __init__(self, dim: int, emb_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.scale = _zero_linear(emb_dim, dim)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x (B, ..., dim) channels-last, e (B, E) -> same shape as x."""
        y = F.rms_norm(x, (self.dim,), eps=self.eps)
        return y * (1 + _per_sample(self.scale(e), x)).to(y.dtype)


class AdaLayerNorm(nn.Module):
    """Layer norm over the last dim: ``LN(x) (1 + scale(e)) + shift(e)``, zero at init."""

    def __init__(self, dim: int, emb_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.mod = _zero_linear(emb_dim, 2 * dim)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        y = F.layer_norm(x, (self.dim,), eps=self.eps)
        scale, shift = _per_sample(self.mod(e), x).to(y.dtype).chunk(2, dim=-1)
        return y * (1 + scale) + shift


class Gate(nn.Module):
    """A residual branch's gate ``Linear(e)`` (zero at init), broadcast over positions."""

    def __init__(self, dim: int, emb_dim: int) -> None:
        super().__init__()
        self.gate = _zero_linear(emb_dim, dim)

    def forward(self, y: Tensor, e: Tensor) -> Tensor:
        return y * _per_sample(self.gate(e), y).to(y.dtype)


class TimeEmbedding(nn.Module):
    """``e = SiLU(Linear(SiLU(Linear(fourier(c)))))``: the time coordinate c (B,) -> (B, E)."""

    def __init__(self, emb_dim: int, n_freq: int = 64) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(2 * n_freq, emb_dim), nn.SiLU(),
                                 nn.Linear(emb_dim, emb_dim), nn.SiLU())

    def forward(self, c: Tensor) -> Tensor:
        return self.mlp(fourier_embed(c[:, None], self.n_freq))
