"""Sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018, PGGAN, app. D).

Needs no trained network. For each level of a Laplacian pyramid (finest first, down to
``min_resolution``), ``patches_per_image`` random 7x7 neighbourhoods are drawn from every
image; each set's descriptors are normalised per level and per channel (zero mean, unit std
over that set), and the distance between the two descriptor sets is the sliced Wasserstein
distance: the mean over random unit directions of the 1-D Wasserstein-1 distance between the
projections. Reported per level (finest first, times 1e3 as in the paper) and averaged.

All randomness (patch positions, directions) comes from ``seed``, so two calls with the same
inputs agree exactly.

The pyramid is the paper's: a 5x5 binomial blur with reflect padding (kornia's ``filter2d``
with kornia's Pascal kernel), then every second pixel. kornia's ``pyrdown`` and ``pyrup`` are
not used: they resample bilinearly (at a factor of 2, ``pyrdown`` averages 2 x 2 blocks of the
blurred image, and ``pyrup`` interpolates instead of inserting zeros), which changes the bands
and with them the distance.
"""

from __future__ import annotations

import math

import torch
from kornia.filters import filter2d
from kornia.filters.kernels import get_pascal_kernel_2d
from torch import Tensor


def _blur(x: Tensor) -> Tensor:
    """Depthwise 5x5 binomial blur, [1 4 6 4 1]^T [1 4 6 4 1] / 256, with reflect padding,
    x (B, C, H, W) with H, W >= 3 (the separable Gaussian of the paper's pyramid)."""
    k = get_pascal_kernel_2d(5, norm=True, device=x.device, dtype=x.dtype)[None]  # (1, 5, 5)
    return filter2d(x, k, border_type="reflect")


def gaussian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """``levels`` images: G_0 = x, G_{i+1} = downsample_2(blur(G_i))."""
    out = [x]
    for _ in range(levels - 1):
        out.append(_blur(out[-1])[..., ::2, ::2])
    return out


def _upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-insertion upsampling by 2 followed by 4 * blur (the pyramid's expand operator)."""
    up = torch.zeros(x.shape[0], x.shape[1], size[0], size[1], dtype=x.dtype, device=x.device)
    up[..., ::2, ::2] = x
    return 4.0 * _blur(up)


def laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """Band-pass levels L_i = G_i - expand(G_{i+1}) and the low-pass residual L_{n-1} = G_{n-1}.

    Exactly invertible: G_i = L_i + expand(G_{i+1}).
    """
    g = gaussian_pyramid(x, levels)
    lap = [g[i] - _upsample(g[i + 1], g[i].shape[-2:]) for i in range(levels - 1)]
    return lap + [g[-1]]


def num_levels(resolution: int, min_resolution: int = 16) -> int:
    """Number of pyramid levels from ``resolution`` down to ``min_resolution`` (both included)."""
    if resolution < min_resolution:
        raise ValueError(f"resolution {resolution} is below min_resolution {min_resolution}")
    return int(math.log2(resolution // min_resolution)) + 1


def _patches(level: Tensor, per_image: int, size: int, gen: torch.Generator) -> Tensor:
    """Random ``size`` x ``size`` patches: level (B, C, H, W) -> (B * per_image, C * size^2)."""
    b, c, h, w = level.shape
    if h < size or w < size:
        raise ValueError(f"pyramid level {h}x{w} is smaller than the {size}x{size} patch")
    ys = torch.randint(0, h - size + 1, (b, per_image), generator=gen).to(level.device)
    xs = torch.randint(0, w - size + 1, (b, per_image), generator=gen).to(level.device)
    d = torch.arange(size, device=level.device)
    rows = (ys[..., None] + d)[..., :, None]  # (B, P, size, 1)
    cols = (xs[..., None] + d)[..., None, :]  # (B, P, 1, size)
    bi = torch.arange(b, device=level.device)[:, None, None, None]
    patches = level.permute(0, 2, 3, 1)[bi, rows, cols]  # (B, P, size, size, C)
    return patches.permute(0, 1, 4, 2, 3).reshape(b * per_image, c * size * size)


def raw_descriptors(
    images: Tensor,
    *,
    min_resolution: int = 16,
    patches_per_image: int = 128,
    patch_size: int = 7,
    seed: int = 0,
    batch_size: int = 256,
) -> list[Tensor]:
    """Per-level patch descriptors of ``images`` (N, C, H, W) before normalisation, finest level
    first: a list of (N * patches_per_image, C, patch_size^2) float32 tensors, image by image
    (rows ``j * P .. (j + 1) * P - 1`` are image j's patches)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    levels = num_levels(min(images.shape[-2:]), min_resolution)
    gen = torch.Generator().manual_seed(seed)
    per_level: list[list[Tensor]] = [[] for _ in range(levels)]
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].float()
        for i, lvl in enumerate(laplacian_pyramid(batch, levels)):
            per_level[i].append(_patches(lvl, patches_per_image, patch_size, gen))
    c = images.shape[1]
    return [torch.cat(chunks).view(-1, c, patch_size * patch_size) for chunks in per_level]


def normalise_descriptors(desc: Tensor) -> Tensor:
    """(M, C, K) -> (M, C K), zero mean and unit std per channel over the set (the paper's
    ``finalize_descriptors``; moments accumulated in float64)."""
    n = desc[:, 0].numel()
    mean = desc.sum(dim=(0, 2), keepdim=True, dtype=torch.float64) / n
    sq = desc.square().sum(dim=(0, 2), keepdim=True, dtype=torch.float64) / n
    std = (sq - mean.square()).clamp_min(1e-24).sqrt()
    return ((desc - mean.float()) / std.float()).reshape(desc.shape[0], -1)


def pyramid_descriptors(images: Tensor, **kw: int) -> list[Tensor]:
    """Per-level normalised patch descriptors of ``images`` (N, C, H, W), finest level first:
    (N * patches_per_image, C * patch_size^2) float32 tensors (``raw_descriptors``' keywords)."""
    return [normalise_descriptors(d) for d in raw_descriptors(images, **kw)]


def _sorted_rows(p: Tensor) -> Tensor:
    """Projections p (K, M) -> each direction's values sorted along M.

    On CPU NumPy's contiguous row sort is an order of magnitude faster than torch.sort.
    """
    rows = p.contiguous()
    if rows.device.type == "cpu":
        arr = rows.numpy()
        arr.sort(axis=1)  # in place: rows is a fresh product, nobody else holds it
        return rows
    return torch.sort(rows, dim=1).values


def _quantiles(sorted_x: Tensor, n: int) -> Tensor:
    """Empirical quantile function at (i + 0.5) / n, per row: sorted_x (K, M) -> (K, n)."""
    m = sorted_x.shape[1]
    if m == n:
        return sorted_x
    pos = ((torch.arange(n, device=sorted_x.device, dtype=torch.float64) + 0.5) * m / n - 0.5)
    pos = pos.clamp(0, m - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=m - 1)
    frac = (pos - lo).to(sorted_x.dtype)
    return sorted_x[:, lo] * (1 - frac) + sorted_x[:, hi] * frac


def _unit_directions(gen: torch.Generator, dim: int, k: int, like: Tensor) -> Tensor:
    """(dim, k) random unit directions (drawn on the CPU from ``gen``), on ``like``'s device."""
    u = torch.randn(dim, k, generator=gen).to(like.device, like.dtype)
    return u / u.norm(dim=0, keepdim=True)


def sliced_wasserstein(
    a: Tensor, b: Tensor, *, directions: int = 512, repeats: int = 4, seed: int = 0
) -> float:
    """Sliced W1 between descriptor sets a (Na, D) and b (Nb, D).

    For unit directions u: W1(a u, b u) = mean_i |sort(a u)_i - sort(b u)_i| (quantile grid of
    min(Na, Nb) points when the sizes differ); averaged over ``directions * repeats`` directions.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"descriptor sets must be (N, D) with equal D: {a.shape} vs {b.shape}")
    gen = torch.Generator().manual_seed(seed)
    n = min(a.shape[0], b.shape[0])
    total = 0.0
    for _ in range(repeats):
        u = _unit_directions(gen, a.shape[1], directions, a)  # (D, K)
        pa = _quantiles(_sorted_rows(u.T @ a.T), n)  # (K, n)
        pb = _quantiles(_sorted_rows(u.T @ b.T), n)
        total += ((pa - pb).abs().sum(dtype=torch.float64) / pa.numel()).item()
    return total / repeats


def swd(
    images_a: Tensor,
    images_b: Tensor,
    *,
    min_resolution: int = 16,
    patches_per_image: int = 128,
    directions: int = 512,
    repeats: int = 4,
    seed: int = 0,
) -> dict[str, object]:
    """SWD between two image sets (N, C, H, W), any common scale (normalised per level).

    Returns ``{"per_level": [finest .. coarsest] (x1e3), "mean": average (x1e3),
    "resolutions": [...]}``.
    """
    if images_a.shape[1:] != images_b.shape[1:]:
        raise ValueError(f"image shapes differ: {tuple(images_a.shape)} vs {tuple(images_b.shape)}")
    kw = dict(min_resolution=min_resolution, patches_per_image=patches_per_image)
    da = pyramid_descriptors(images_a, seed=seed, **kw)
    db = pyramid_descriptors(images_b, seed=seed, **kw)  # common random positions
    per_level = [
        1e3 * sliced_wasserstein(x, y, directions=directions, repeats=repeats, seed=seed + 2)
        for x, y in zip(da, db, strict=True)
    ]
    res = min(images_a.shape[-2:])
    return {
        "per_level": per_level,
        "mean": sum(per_level) / len(per_level),
        "resolutions": [res >> i for i in range(len(per_level))],
    }


def swd_replicates(
    images_a: Tensor,
    images_b: Tensor,
    index: Tensor,
    *,
    min_resolution: int = 16,
    patches_per_image: int = 128,
    directions: int = 512,
    repeats: int = 4,
    seed: int = 0,
) -> list[float]:
    """SWD (x1e3, mean over levels) of resampled copies of ``images_a`` against ``images_b``.

    ``index`` (R, Na) holds one resample per row (image indices into ``images_a``, with
    repeats: a bootstrap). Each replicate equals ``swd(images_a[row], images_b, ...)["mean"]``
    up to which patches an image contributes (here, always the ones the full set drew: the
    identity row gives exactly ``swd``'s value). Written separately because the descriptors,
    directions and ``images_b``'s sorted projections are computed once, not once per resample.
    """
    if index.ndim != 2:
        raise ValueError(f"index must be (resamples, N), got shape {tuple(index.shape)}")
    kw = dict(min_resolution=min_resolution, patches_per_image=patches_per_image)
    raw_a = raw_descriptors(images_a, seed=seed, **kw)
    desc_b = pyramid_descriptors(images_b, seed=seed, **kw)
    p = patches_per_image
    rows = (index[:, :, None].long() * p + torch.arange(p)).reshape(index.shape[0], -1)
    totals = torch.zeros(index.shape[0], dtype=torch.float64)
    for a, b in zip(raw_a, desc_b, strict=True):
        gen = torch.Generator().manual_seed(seed + 2)  # sliced_wasserstein's directions
        n = min(rows.shape[1], b.shape[0])
        level = torch.zeros(index.shape[0], dtype=torch.float64)
        for _ in range(repeats):
            u = _unit_directions(gen, b.shape[1], directions, b)
            pb = _quantiles(_sorted_rows(u.T @ b.T), n)
            for r in range(index.shape[0]):
                da = normalise_descriptors(a[rows[r].to(a.device)])
                pa = _quantiles(_sorted_rows(u.T @ da.T), n)
                level[r] += (pa - pb).abs().sum(dtype=torch.float64).item() / pa.numel()
        totals += 1e3 * level / repeats
    return (totals / len(raw_a)).tolist()
