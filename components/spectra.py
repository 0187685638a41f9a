"""Image power spectra and per-image schedule bounds (SCIENCE.md section 4, reconstruction).

Conventions
- Images are float NCHW in [-1, 1]; a *plane* is one (H, W) array (a channel or luminance).
- Luminance is Rec.601 luma, ``Y = 0.299 R + 0.587 G + 0.114 B`` (on [-1, 1] values): kornia's
  ``rgb_to_grayscale`` for tensors, with these weights. The spectrum paths mix the
  complex channel spectra with the same weights instead (the DFT is linear), which no colour
  conversion routine does.
- Orthonormal 2-D DFT, ``X = F x / sqrt(H W)``, so white noise of variance s^2 has flat power
  ``E|X_k|^2 = s^2`` and the per-frequency SNR at log-SNR lambda is ``e^lambda S(f)``.
- Radial bins of integer radius ``r = round(sqrt(ky^2 + kx^2))`` with ``k`` the integer
  frequency (cycles per image). The RAPSD ``S`` has ``n_bins = min(H, W) // 2`` entries, for
  ``r = 1 .. n_bins`` (index ``r - 1``); the DC term (r = 0) is returned separately as
  ``dc_power = |X_0|^2 = H W mean(x)^2``; the corner frequencies ``r > n_bins`` enter only the
  last octave of the energy (so that octave energies + DC add up to ``mean(x^2)``, Parseval).
- Every function accepts NumPy arrays or torch tensors (CPU or GPU) and returns the same kind;
  both paths compute in float64 (NumPy) / the input's float dtype promoted to at least float32
  (torch) with the same bin matrices, so they agree to float precision.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import numpy as np
import scipy.fft
import torch
from kornia.color import rgb_to_grayscale

from components.spectral_bins import bin_frequencies, bin_matrices, chunk_size

Array = np.ndarray | torch.Tensor

LUMA_REC601 = (0.299, 0.587, 0.114)
# variance of uniform 8-bit quantisation noise on [-1, 1]: step 2/255, var = step^2 / 12
QUANT_NOISE_VAR = (2.0 / 255.0) ** 2 / 12.0
LAMBDA_QUANT = -math.log(QUANT_NOISE_VAR)  # about 12.18: no schedule needs more signal than this
POWER_FLOOR = 1e-12  # power values are floored here before logs (constant images)


def _check_planes(x: Array) -> None:
    if x.ndim < 2:
        raise ValueError(f"RAPSD needs (..., H, W) planes, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if min(h, w) < 4:
        raise ValueError(f"RAPSD needs planes of at least 4x4 pixels, got {h}x{w}")
    finite = torch.isfinite(x).all() if isinstance(x, torch.Tensor) else np.isfinite(x).all()
    if not bool(finite):
        raise ValueError("RAPSD input contains NaN or infinite values")


# --------------------------------------------------------------------------- spectra


def _rfft2(x: Array) -> Array:
    """Orthonormal rfft2 over the last two axes; single precision stays single (NumPy)."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"RAPSD needs a float tensor, got {x.dtype}")
        return torch.fft.rfft2(x.to(torch.promote_types(x.dtype, torch.float32)), norm="ortho")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"RAPSD needs a float array, got {x.dtype}")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    return scipy.fft.rfft2(x, norm="ortho", workers=1)


def _abs2(f: Array) -> Array:
    return f.real.square() + f.imag.square() if isinstance(f, torch.Tensor) else \
        f.real**2 + f.imag**2


def power_half(x: Array) -> Array:
    """|rfft2(x, ortho)|^2 flattened: (..., H, W) -> (..., H * (W // 2 + 1))."""
    _check_planes(x)
    p = _abs2(_rfft2(x))
    return p.reshape(*p.shape[:-2], -1)


def _matmul(p: Array, m: np.ndarray) -> Array:
    """(..., K) @ (K, M) -> (..., M), as one 2-D matrix product."""
    lead = p.shape[:-1]
    flat = p.reshape(-1, p.shape[-1])
    if isinstance(p, torch.Tensor):
        out = flat @ torch.as_tensor(m, dtype=p.dtype, device=p.device)
    else:
        out = flat @ m.astype(p.dtype, copy=False)
    return out.reshape(*lead, m.shape[1])


def rapsd(x: Array) -> Array:
    """Radially averaged power spectral density of planes: (..., H, W) -> (..., n_bins).

    Entry ``r - 1`` is the mean of ``|X_k|^2`` over frequencies of integer radius r
    (r = 1 .. min(H, W) // 2); DC excluded (see ``dc_power``).
    """
    _check_planes(x)
    h, w = x.shape[-2:]
    return _matmul(power_half(x), bin_matrices(h, w)[0])


def luminance(images: Array) -> Array:
    """Rec.601 luma of RGB images: (..., 3, H, W) -> (..., H, W).

    Tensors go through kornia's ``rgb_to_grayscale`` (integer tensors as float32, not
    kornia's rounded uint8 grey); NumPy arrays are mixed here with the same weights.
    """
    if images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"luminance needs (..., 3, H, W) RGB images, got {tuple(images.shape)}")
    if isinstance(images, torch.Tensor):
        x = images if images.is_floating_point() else images.float()
        return rgb_to_grayscale(x, torch.tensor(LUMA_REC601, dtype=torch.float64)).squeeze(-3)
    r, g, b = images[..., 0, :, :], images[..., 1, :, :], images[..., 2, :, :]
    return LUMA_REC601[0] * r + LUMA_REC601[1] * g + LUMA_REC601[2] * b


def uint8_to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1]."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
    return images.transpose(0, 3, 1, 2).astype(np.float32) * (2.0 / 255.0) - 1.0


# --------------------------------------------------------------------------- fits and bounds


def power_law_fit(s: Array, f_lo: int = 1, f_hi: int | None = None) -> tuple[Array, Array, Array]:
    """Least-squares fit ``log S(f) = log A - beta log f`` over bins f_lo..f_hi.

    s: (..., n_bins). Returns (log_A, beta, residual), each (...): natural logs; residual is
    the RMS of the log-space residual.
    """
    n_bins = s.shape[-1]
    f_hi = n_bins if f_hi is None else f_hi
    if not 1 <= f_lo < f_hi <= n_bins:
        raise ValueError(f"power_law_fit: need 1 <= f_lo < f_hi <= {n_bins}, got {f_lo}, {f_hi}")
    u = np.log(bin_frequencies(n_bins)[f_lo - 1 : f_hi])  # (n,)
    u_c = u - u.mean()
    torch_in = isinstance(s, torch.Tensor)
    lib = torch if torch_in else np
    y = lib.log(lib.clip(s[..., f_lo - 1 : f_hi], POWER_FLOOR, None))  # (..., n)
    uc = torch.as_tensor(u_c, dtype=y.dtype, device=y.device) if torch_in else u_c
    y_mean = y.mean(-1)
    slope = (y * uc).sum(-1) / float((u_c**2).sum())  # = -beta
    log_a = y_mean - slope * float(u.mean())
    fit = log_a[..., None] + slope[..., None] * (uc + float(u.mean()))
    residual = lib.sqrt(((y - fit) ** 2).mean(-1))
    return log_a, -slope, residual


def schedule_bounds(
    s: Array, eps_lo: float = 0.01, eps_hi: float = 10.0, min_span: float = 1.0
) -> tuple[Array, Array]:
    """Per-image log-SNR bounds from the RAPSD ``s`` (..., n_bins) (SCIENCE.md section 4).

    lambda_min = log(eps_lo) - log max_f S(f)       (noise swamps the strongest component)
    lambda_max = min(log(eps_hi) - log min_f S(f), -log((2/255)^2 / 12))
    A featureless image (lambda_min > lambda_max - min_span) gets lambda_min = lambda_max -
    min_span, so that every image has a valid, strictly decreasing schedule.
    """
    if not 0 < eps_lo < eps_hi:
        raise ValueError(f"schedule_bounds: need 0 < eps_lo < eps_hi, got {eps_lo}, {eps_hi}")
    if min_span <= 0:
        raise ValueError(f"schedule_bounds: min_span must be > 0, got {min_span}")
    lib = torch if isinstance(s, torch.Tensor) else np
    s = lib.clip(s, POWER_FLOOR, None)
    s_max = s.max(-1).values if lib is torch else s.max(-1)
    s_min = s.min(-1).values if lib is torch else s.min(-1)
    lam_min = math.log(eps_lo) - lib.log(s_max)
    lam_max = lib.clip(math.log(eps_hi) - lib.log(s_min), None, LAMBDA_QUANT)
    lam_min = lib.minimum(lam_min, lam_max - min_span)
    return lam_min, lam_max


# --------------------------------------------------------------------------- per-image stats


@dataclass(frozen=True)
class SpectraParams:
    """Choices recorded with every run: thresholds, fit range, channel weights."""

    eps_lo: float = 0.01
    eps_hi: float = 10.0
    min_span: float = 1.0
    fit_f_lo: int = 1
    fit_f_hi: int | None = None  # None: up to n_bins


def image_statistics(images: Array, params: SpectraParams | None = None) -> dict[str, Array]:
    """All per-image spectral statistics of RGB images (B, 3, H, W) in [-1, 1].

    Returns a dict of arrays (same kind as the input):
      lum_rapsd (B, n_bins), rgb_rapsd (B, 3, n_bins), dc_power (B,) of luminance,
      octave_energy (B, n_oct) of luminance (mean-square units), log_A, beta, fit_residual
      (B,) of the luminance power-law fit, lambda_min, lambda_max (B,).
    """
    p = params or SpectraParams()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"image_statistics needs (B, 3, H, W), got {tuple(images.shape)}")
    _check_planes(images)
    h, w = images.shape[-2:]
    avg, oct_sum, _ = bin_matrices(h, w)
    # the DFT is linear: the luminance spectrum is the luma mix of the channel spectra,
    # so three FFTs serve four planes
    f_rgb = _rfft2(images)  # (B, 3, H, W // 2 + 1) complex
    f_lum = LUMA_REC601[0] * f_rgb[:, 0] + LUMA_REC601[1] * f_rgb[:, 1] \
        + LUMA_REC601[2] * f_rgb[:, 2]  # (B, H, W // 2 + 1)
    p_lum = _abs2(f_lum).reshape(f_lum.shape[0], -1)  # (B, h*wr)
    p_rgb = _abs2(f_rgb).reshape(*f_rgb.shape[:2], -1)  # (B, 3, h*wr)
    lum = _matmul(p_lum, avg)  # (B, n_bins)
    log_a, beta, res = power_law_fit(lum, p.fit_f_lo, p.fit_f_hi)
    lam_min, lam_max = schedule_bounds(lum, p.eps_lo, p.eps_hi, p.min_span)
    return {
        "lum_rapsd": lum,
        "rgb_rapsd": _matmul(p_rgb, avg),
        "dc_power": p_lum[:, 0],  # the (0, 0) frequency is the first rfft2 entry
        "octave_energy": _matmul(p_lum, oct_sum),
        "log_A": log_a,
        "beta": beta,
        "fit_residual": res,
        "lambda_min": lam_min,
        "lambda_max": lam_max,
    }


@lru_cache(maxsize=32)
def _pool_matrices(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooling matrices for the interleaved squares of an unnormalised rfft2 of 255/2 x.

    Returns (lum (2 K, n_bins + n_oct), rgb (2 K, n_bins)) float32, K = h * (w // 2 + 1).
    A row pair (re^2, im^2) of one frequency shares the ``bin_matrices`` row, so
    ``squares @ M`` sums re^2 + im^2 = |X|^2 inside the product. The factor
    (2/255)^2 / (h w) turns the power of ``rfft2(u8 - 127.5)`` into that of the orthonormal
    transform of ``x = u8 * 2/255 - 1`` (the two planes differ by the factor 2/255 only).
    """
    avg, oct_sum, _ = bin_matrices(h, w)
    scale = (2.0 / 255.0) ** 2 / (h * w)
    lum = np.repeat(np.concatenate([avg, oct_sum], axis=1) * scale, 2, axis=0)
    rgb = np.repeat(avg * scale, 2, axis=0)
    return (torch.from_numpy(lum.astype(np.float32)), torch.from_numpy(rgb.astype(np.float32)))


def uint8_statistics(images: np.ndarray, params: SpectraParams | None = None) -> dict[str, Array]:
    """``image_statistics(uint8_to_unit(images))`` for uint8 (B, H, W, 3), fast and equal.

    Per cache-sized chunk: the planes ``u8 - 127.5`` (exact in float32; = 255/2 x), three
    real FFTs (torch/MKL), the luminance spectrum by linearity (F(Y) = sum_c l_c F(X_c)),
    the squares of the spectra in place, and the pooling of all radial bins (and the
    luminance octaves) by a matrix product over the interleaved (re^2, im^2) half plane,
    with the half-plane multiplicities and the normalisation folded into the matrix.
    No per-image Python, no float64. Results equal ``image_statistics`` to float32
    rounding. Runs in the caller's thread settings: limit BLAS/torch threads to one per
    process when several run in parallel (``pipelines/data/spectra_job.py`` does).

    Where numba imports, the post-FFT work is one fused compiled pass instead
    (``components/_spectra_kernel.py``; same results to float32 rounding, ~1/3 less time at
    64x64); ``PRISM_SPECTRA_NUMBA=0`` in the environment forces the torch path.
    """
    p = params or SpectraParams()
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
    h, w = images.shape[1:3]
    if min(h, w) < 4:
        raise ValueError(f"RAPSD needs planes of at least 4x4 pixels, got {h}x{w}")
    kernel = _spectra_kernel()
    pool = _pool_torch if kernel is None else kernel.pool_uint8
    lum, rgb, octave, dc = pool(images)
    log_a, beta, res = power_law_fit(lum, p.fit_f_lo, p.fit_f_hi)
    lam_min, lam_max = schedule_bounds(lum, p.eps_lo, p.eps_hi, p.min_span)
    return {"lum_rapsd": lum, "rgb_rapsd": rgb, "dc_power": dc, "octave_energy": octave,
            "log_A": log_a, "beta": beta, "fit_residual": res, "lambda_min": lam_min,
            "lambda_max": lam_max}


@lru_cache(maxsize=1)
def _load_kernel() -> ModuleType | None:
    try:
        # deferred: the kernel needs numba, an optional dependency (~0.1 s to import, then
        # compiling): loaded on first use, never with PRISM_SPECTRA_NUMBA=0
        from components import _spectra_kernel
    except ImportError:  # numba absent: the torch path
        return None
    except RuntimeError as err:  # numba present but unusable (e.g. no writable cache dir)
        warnings.warn(f"numba kernel unavailable, using the torch path: {err}", stacklevel=3)
        return None
    return _spectra_kernel


def _spectra_kernel() -> ModuleType | None:
    """The numba kernel module, or None (not installed, or ``PRISM_SPECTRA_NUMBA=0``)."""
    if os.environ.get("PRISM_SPECTRA_NUMBA", "1").strip() == "0":
        return None
    return _load_kernel()


def _pool_torch(images: np.ndarray) -> tuple[np.ndarray, ...]:
    """(lum (B, n_bins), rgb (B, 3, n_bins), octaves (B, n_oct), dc (B,)) float32, torch."""
    n_img, h, w = images.shape[:3]
    m_lum, m_rgb = _pool_matrices(h, w)
    n_bins, k2, step = m_rgb.shape[1], m_rgb.shape[0], chunk_size(h, w)  # k2 = 2 H (W//2+1)
    lum_out = torch.empty((n_img, m_lum.shape[1]))  # luminance bins, then octaves
    rgb_out = torch.empty((n_img, 3, n_bins))
    dc = torch.empty(n_img)
    x = np.empty((min(step, n_img), h, w, 3), np.float32)  # reused NHWC float buffer
    f_lum = torch.empty((len(x), h, w // 2 + 1), dtype=torch.complex64)
    for s in range(0, n_img, step):
        u8 = images[s : s + step]
        n = len(u8)
        np.subtract(u8, np.float32(127.5), out=x[:n], dtype=np.float32)  # 255/2 x, exact
        # (n, 3, H, W//2+1); torch packs the NHWC view into planes for MKL
        f = torch.fft.rfft2(torch.from_numpy(x[:n]).permute(0, 3, 1, 2))
        fl = f_lum[:n]
        torch.mul(f[:, 0], LUMA_REC601[0], out=fl)
        fl.add_(f[:, 1], alpha=LUMA_REC601[1]).add_(f[:, 2], alpha=LUMA_REC601[2])
        sq_lum = torch.view_as_real(fl).square_().reshape(n, k2)  # (re^2, im^2) interleaved
        sq_rgb = torch.view_as_real(f).square_().reshape(3 * n, k2)
        torch.matmul(sq_lum, m_lum, out=lum_out[s : s + n])
        torch.matmul(sq_rgb, m_rgb, out=rgb_out[s : s + n].view(3 * n, n_bins))
        dc[s : s + n] = sq_lum[:, 0] + sq_lum[:, 1]  # (0, 0) frequency, unnormalised
    dc *= (2.0 / 255.0) ** 2 / (h * w)
    lum = lum_out.numpy()
    return lum[:, :n_bins], rgb_out.numpy(), lum[:, n_bins:], dc.numpy()


def gaussian_random_field(
    n: int, size: int, beta: float, seed: int = 0, variance: float = 1.0
) -> np.ndarray:
    """Isotropic Gaussian random fields with power spectrum ~ f^-beta: (n, size, size) float64.

    White Gaussian noise filtered by ``f^(-beta/2)`` in the Fourier domain (DC set to zero),
    rescaled to the given pixel variance. Used by tests and demos.
    """
    if n < 1 or size < 4:
        raise ValueError(f"gaussian_random_field: need n >= 1 and size >= 4, got {n}, {size}")
    rng = np.random.default_rng(seed)
    white = rng.standard_normal((n, size, size))
    ky = np.fft.fftfreq(size, 1.0 / size)[:, None]
    kx = np.fft.fftfreq(size, 1.0 / size)[None, :]
    f = np.sqrt(ky**2 + kx**2)
    amp = np.zeros_like(f)
    amp[f > 0] = f[f > 0] ** (-beta / 2.0)
    field = np.fft.ifft2(np.fft.fft2(white) * amp).real
    field /= field.std(axis=(-2, -1), keepdims=True)
    return field * math.sqrt(variance)
