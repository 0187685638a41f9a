"""Resolution operators (SCIENCE.md section 1): ``D_m``, ``U_m``, the anti-aliased resize
``R`` with its exact transpose, and Gaussian / Laplacian pyramids.

All functions take batches ``(..., H, W)`` (usually (B, C, H, W)) on any device and dtype.

- ``downsample_mean`` = ``D_m``: mean over m x m blocks. ``D_m[N(0, I)]`` has variance 1/m^2.
- ``upsample_nearest`` = ``U_m``: nearest upsampling by m. ``D_m U_m = I`` and
  ``U_m^T = m^2 D_m``, so ``U_m D_m`` is an orthogonal projection (the "coarse part").
- ``resize`` = ``R``: anti-aliased bilinear resize (torch ``antialias=True``), a linear map;
  ``resize_transpose`` = ``R^T``, its vector-Jacobian product (exact by construction).
- Pyramids: ``kind="box"`` uses D_2 / U_2 (bands are mutually orthogonal, so band energies
  add up to the image energy: what the measured chromatogram needs); ``kind="gaussian"``
  uses a 5-tap binomial blur before decimation and bilinear expansion (Burt & Adelson).
  Both reconstruct exactly from the Laplacian pyramid.

The binomial blur is kornia's separable filter with kornia's Pascal (binomial) kernel: the
same padding and convolutions as the definition, so the same values. ``R`` stays on torch's
anti-aliased bilinear kernel: kornia's ``resize(antialias=True)`` pre-blurs with a Gaussian
instead, a different operator from the one whose transpose Scale Space Diffusion uses.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from kornia.filters import filter2d_separable
from kornia.filters.kernels import get_pascal_kernel_1d
from torch import Tensor

from components.devices import cached_on

PyramidKind = Literal["box", "gaussian"]


def _check_factor(x: Tensor, m: int, op: str) -> tuple[int, int]:
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"{op}: factor m must be a positive int, got {m!r}")
    if x.ndim < 2:
        raise ValueError(f"{op}: expected a tensor (..., H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    return h, w


def downsample_mean(x: Tensor, m: int) -> Tensor:
    """``D_m``: mean over non-overlapping m x m blocks, (..., H, W) -> (..., H/m, W/m)."""
    h, w = _check_factor(x, m, "downsample_mean (D_m)")
    if h % m or w % m:
        raise ValueError(
            f"downsample_mean (D_m): image size {h}x{w} is not divisible by m={m}"
        )
    lead = x.shape[:-2]
    # (..., H/m, m, W/m, m) -> mean over the two block axes
    return x.reshape(*lead, h // m, m, w // m, m).mean(dim=(-3, -1))


def upsample_nearest(x: Tensor, m: int) -> Tensor:
    """``U_m``: nearest upsampling by m, (..., h, w) -> (..., m h, m w)."""
    h, w = _check_factor(x, m, "upsample_nearest (U_m)")
    lead = x.shape[:-2]
    # (..., h, 1, w, 1) -> (..., h, m, w, m) -> (..., m h, m w)
    out = x.reshape(*lead, h, 1, w, 1).expand(*lead, h, m, w, m)
    return out.reshape(*lead, h * m, w * m)


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"resize: target size must be positive, got {size}")
    return h, w


def _as4d(x: Tensor, op: str) -> tuple[Tensor, torch.Size]:
    if x.ndim < 2:
        raise ValueError(f"{op}: expected a tensor (..., H, W), got shape {tuple(x.shape)}")
    lead = x.shape[:-2]
    return x.reshape(-1, 1, *x.shape[-2:]), lead


def _interp(x4: Tensor, h: int, w: int, antialias: bool) -> Tensor:
    """Bilinear (N, 1, H, W) -> (N, 1, h, w). torch 2.13's anti-aliased CPU kernel is wrong
    for an output width of 1 with height > 1, so that case runs transposed."""
    if w == 1 and h > 1:
        y = F.interpolate(x4.transpose(-1, -2), size=(1, h), mode="bilinear",
                          align_corners=False, antialias=antialias)
        return y.transpose(-1, -2)
    return F.interpolate(x4, size=(h, w), mode="bilinear", align_corners=False,
                         antialias=antialias)


def resize(x: Tensor, size: int | tuple[int, int], antialias: bool = True) -> Tensor:
    """``R``: bilinear resize of (..., H, W) to (..., h, w), anti-aliased when shrinking.

    A linear map (align_corners=False, half-pixel centres). Its exact transpose is
    :func:`resize_transpose`.
    """
    h, w = _size2(size)
    x4, lead = _as4d(x, "resize")
    if x4.shape[-2:] == (h, w):
        return x.clone()
    return _interp(x4, h, w, antialias).reshape(*lead, h, w)


def resize_transpose(y: Tensor, size: int | tuple[int, int], antialias: bool = True) -> Tensor:
    """``R^T``: the transpose of :func:`resize` from ``size`` to ``y``'s size, applied to y.

    Computed as the vector-Jacobian product of the (linear) resize, so that
    ``<R x, y> = <x, R^T y>`` holds to rounding error for any sizes.
    y: (..., h, w) -> (..., H, W) with (H, W) = size.
    """
    h_in, w_in = _size2(size)
    y4, lead = _as4d(y, "resize_transpose")
    if y4.shape[-2:] == (h_in, w_in):
        return y.clone()
    with torch.enable_grad():
        x = torch.zeros(y4.shape[0], 1, h_in, w_in, dtype=y.dtype, device=y.device,
                        requires_grad=True)
        out = _interp(x, *y4.shape[-2:], antialias)
        (g,) = torch.autograd.grad(out, x, grad_outputs=y4.detach())
    return g.reshape(*lead, h_in, w_in)


def resize_matrix(n_in: int, n_out: int, antialias: bool = True,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """The 1-D resize matrix A (n_out, n_in): ``R x = A_h x A_w^T`` (the resize is separable).

    Useful where ``R^T R`` is needed explicitly (Scale Space Diffusion's posterior noise).
    """
    # basis images (n_in, 1, n_in, 2), constant along a width of 2 (the identity resize in
    # width; torch's anti-aliased kernel mishandles width-1 images)
    eye = torch.eye(n_in, dtype=dtype).reshape(n_in, 1, n_in, 1).expand(-1, -1, -1, 2)
    cols = F.interpolate(eye, size=(n_out, 2), mode="bilinear", align_corners=False,
                         antialias=antialias)  # (n_in, 1, n_out, 2)
    return cols[..., 0].reshape(n_in, n_out).T.contiguous()


# --------------------------------------------------------------------------- pyramids

@functools.cache
def _binomial_5() -> Tensor:
    """[1 4 6 4 1]/16 as (1, 5), on the host (exact in float32)."""
    return get_pascal_kernel_1d(5, norm=True)[None]


_BINOMIAL_ON: dict[str, Tensor] = {}  # the kernel, one copy per device (not one per call)


def _blur_binomial(x: Tensor) -> Tensor:
    """Separable 5-tap binomial blur [1 4 6 4 1]/16 with reflect padding, (N, 1, H, W).

    Reflect padding by 2 needs at least 3 pixels along each side; smaller images (the last
    levels of a deep pyramid) are padded by replication instead.
    """
    k = cached_on(_binomial_5(), x.device, _BINOMIAL_ON).to(x.dtype)  # (1, 5)
    border = "reflect" if min(x.shape[-2:]) > 2 else "replicate"
    return filter2d_separable(x, k, k, border_type=border)


def pyramid_down(x: Tensor, kind: PyramidKind = "box") -> Tensor:
    """One pyramid reduction by 2: ``D_2`` (box) or blur-then-decimate (gaussian).

    The gaussian reduction keeps every second pixel of the blurred image (Burt & Adelson).
    kornia's ``pyrdown`` resamples the blurred image bilinearly instead, which at a factor of 2
    averages 2 x 2 blocks: a further blur, so it is not used here.
    """
    if kind == "box":
        return downsample_mean(x, 2)
    if kind == "gaussian":
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            raise ValueError(f"pyramid_down: image size {h}x{w} is not divisible by m=2")
        x4, lead = _as4d(x, "pyramid_down")
        y = _blur_binomial(x4)[..., ::2, ::2]
        return y.reshape(*lead, h // 2, w // 2)
    raise ValueError(f"unknown pyramid kind {kind!r}: expected 'box' or 'gaussian'")


def pyramid_up(x: Tensor, kind: PyramidKind = "box") -> Tensor:
    """The expansion matching :func:`pyramid_down`: ``U_2`` (box) or bilinear x2 (gaussian)."""
    if kind == "box":
        return upsample_nearest(x, 2)
    if kind == "gaussian":
        h, w = x.shape[-2:]
        return resize(x, (2 * h, 2 * w))
    raise ValueError(f"unknown pyramid kind {kind!r}: expected 'box' or 'gaussian'")


def _check_levels(x: Tensor, levels: int) -> None:
    if levels < 1:
        raise ValueError(f"pyramid: levels must be >= 1, got {levels}")
    h, w = x.shape[-2:]
    m = 2 ** (levels - 1)
    if h % m or w % m:
        raise ValueError(f"pyramid: image size {h}x{w} is not divisible by m={m} "
                         f"(2^(levels-1) for levels={levels})")


def gaussian_pyramid(x: Tensor, levels: int, kind: PyramidKind = "box") -> list[Tensor]:
    """``[G_0 = x, G_1, ..., G_{levels-1}]``, each half the size of the previous one."""
    _check_levels(x, levels)
    pyr = [x]
    for _ in range(levels - 1):
        pyr.append(pyramid_down(pyr[-1], kind))
    return pyr


def laplacian_pyramid(x: Tensor, levels: int, kind: PyramidKind = "box") -> list[Tensor]:
    """``[L_0, ..., L_{levels-2}, G_{levels-1}]`` with ``L_k = G_k - up(G_{k+1})``."""
    g = gaussian_pyramid(x, levels, kind)
    bands = [g[k] - pyramid_up(g[k + 1], kind) for k in range(levels - 1)]
    return bands + [g[-1]]


def laplacian_reconstruct(bands: list[Tensor], kind: PyramidKind = "box") -> Tensor:
    """Invert :func:`laplacian_pyramid` exactly: ``G_k = L_k + up(G_{k+1})``."""
    if not bands:
        raise ValueError("laplacian_reconstruct: empty pyramid")
    x = bands[-1]
    for band in reversed(bands[:-1]):
        x = band + pyramid_up(x, kind)
    return x


def band_energies(x: Tensor, levels: int, kind: PyramidKind = "box") -> Tensor:
    """Energy of each Laplacian band per full-resolution pixel, (B, levels).

    Each band is lifted back to full resolution (U_2^k) before squaring, so with
    ``kind="box"`` the energies add up to the mean square of x (orthogonal bands).
    """
    bands = laplacian_pyramid(x, levels, kind)
    # mean over a band at level k equals the mean of its nearest lift to full resolution
    out = [b.pow(2).flatten(1).mean(1) for b in bands]
    return torch.stack(out, dim=1)
