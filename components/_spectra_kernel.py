"""Fused post-FFT pass of ``uint8_statistics`` (optional; needs numba).

After the three real FFTs of a chunk, the torch path makes four passes over the spectra
(luminance mix, squares, two pooling matrix products). Every frequency belongs to at most one
radial bin and one octave, so the pooling matrices are one weighted entry per row: this
kernel reads each frequency's three complex channel values once, forms the luminance value by
linearity (F(Y) = sum_c l_c F(X_c)), and adds the four powers into their bin and the luminance
power into its octave, in one pass with float64 accumulators.

``pooling_tables`` turns the ``bin_matrices`` of ``components/spectral_bins.py`` into those
per-frequency indices and weights (with the normalisation folded in), so both paths share the
definition of the bins. The compiled kernel is cached on disk (``cache=True``: next to this
file in ``__pycache__``, or under ``NUMBA_CACHE_DIR``), so later processes load it instead of
compiling; it releases the GIL (``nogil=True``).
"""

from __future__ import annotations

from functools import lru_cache

import numba
import numpy as np
import torch

from components.spectral_bins import bin_matrices, chunk_size, n_octaves

_L0, _L1, _L2 = 0.299, 0.587, 0.114  # Rec.601 luma (spectra.LUMA_REC601)


def pool_uint8(images: np.ndarray) -> tuple[np.ndarray, ...]:
    """uint8 (B, H, W, 3) -> (lum (B, n_bins), rgb (B, 3, n_bins), octaves (B, n_oct), dc (B,)).

    float32, the same quantities and chunking as ``spectra._pool_torch`` (input checked there).
    """
    n_img, h, w = images.shape[:3]
    n_bins = min(h, w) // 2
    lum = np.empty((n_img, n_bins), np.float32)
    rgb = np.empty((n_img, 3, n_bins), np.float32)
    octave = np.empty((n_img, n_octaves(n_bins)), np.float32)
    dc = np.empty(n_img, np.float32)
    scale = (2.0 / 255.0) ** 2 / (h * w)  # power of rfft2(u8 - 127.5) -> orthonormal of x
    tables, step = _tables(h, w), chunk_size(h, w)
    x = np.empty((min(step, n_img), 3, h, w), np.float32)  # reused channel-plane buffer
    for s in range(0, n_img, step):
        u8 = images[s : s + step]
        n = len(u8)
        to_planes(u8, x[:n])  # 255/2 x, exact, as contiguous planes (the FFT is faster on them)
        f = torch.fft.rfft2(torch.from_numpy(x[:n]))  # (n, 3, H, W//2+1)
        spec = np.ascontiguousarray(torch.view_as_real(f).numpy()).reshape(n, 3, -1, 2)
        pool_chunk(spec, *tables, scale, lum[s : s + n], rgb[s : s + n], octave[s : s + n],
                   dc[s : s + n])
    return lum, rgb, octave, dc


@lru_cache(maxsize=32)
def _tables(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    avg, oct_sum, _ = bin_matrices(h, w)
    return pooling_tables(avg, oct_sum, (2.0 / 255.0) ** 2 / (h * w))


def pooling_tables(
    avg: np.ndarray, oct_sum: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-frequency (bin, weight, octave, weight) from pooling matrices with <= 1 entry a row.

    avg (K, n_bins), oct_sum (K, n_oct) -> bin_idx (K,) int64 (-1: no bin), bin_w (K,)
    float64, oct_idx (K,) int64 (-1: none), oct_w (K,) float64; weights times ``scale``.
    """
    if (np.count_nonzero(avg, axis=1) > 1).any() or (np.count_nonzero(oct_sum, axis=1) > 1).any():
        raise ValueError("pooling_tables: a frequency falls in more than one bin or octave")
    bin_idx = np.where(avg.any(axis=1), avg.argmax(axis=1), -1).astype(np.int64)
    oct_idx = np.where(oct_sum.any(axis=1), oct_sum.argmax(axis=1), -1).astype(np.int64)
    bin_w = avg.max(axis=1) * scale
    oct_w = oct_sum.max(axis=1) * scale
    return bin_idx, bin_w, oct_idx, oct_w


@numba.njit(cache=True, nogil=True)
def to_planes(u8: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """uint8 (n, H, W, 3) -> float32 planes (n, 3, H, W) of ``u8 - 127.5`` (exact)."""
    n, h, w = u8.shape[0], u8.shape[1], u8.shape[2]
    for i in range(n):
        for c in range(3):
            for y in range(h):
                for x in range(w):
                    out[i, c, y, x] = np.float32(u8[i, y, x, c]) - np.float32(127.5)


@numba.njit(cache=True, nogil=True)
def pool_chunk(
    spec: np.ndarray,
    bin_idx: np.ndarray,
    bin_w: np.ndarray,
    oct_idx: np.ndarray,
    oct_w: np.ndarray,
    scale: float,
    lum_out: np.ndarray,
    rgb_out: np.ndarray,
    oct_out: np.ndarray,
    dc_out: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """Pool one chunk of channel spectra into its output rows.

    spec (n, 3, K, 2) float32: (re, im) of the unnormalised rfft2 of each channel, K = H (W//2+1)
    flattened; writes lum_out (n, n_bins), rgb_out (n, 3, n_bins), oct_out (n, n_oct),
    dc_out (n,) (float32 views of the caller's result rows).
    """
    n, k_len = spec.shape[0], spec.shape[2]
    n_bins, n_oct = rgb_out.shape[2], oct_out.shape[1]
    acc = np.zeros((4, n_bins))  # luminance, R, G, B bins (float64)
    acc_oct = np.zeros(n_oct)
    for i in range(n):
        acc[:] = 0.0
        acc_oct[:] = 0.0
        for k in range(k_len):
            r0, i0 = np.float64(spec[i, 0, k, 0]), np.float64(spec[i, 0, k, 1])
            r1, i1 = np.float64(spec[i, 1, k, 0]), np.float64(spec[i, 1, k, 1])
            r2, i2 = np.float64(spec[i, 2, k, 0]), np.float64(spec[i, 2, k, 1])
            yr = _L0 * r0 + _L1 * r1 + _L2 * r2  # F(Y) = sum_c l_c F(X_c)
            yi = _L0 * i0 + _L1 * i1 + _L2 * i2
            p_lum = yr * yr + yi * yi
            b = bin_idx[k]
            if b >= 0:
                wb = bin_w[k]
                acc[0, b] += wb * p_lum
                acc[1, b] += wb * (r0 * r0 + i0 * i0)
                acc[2, b] += wb * (r1 * r1 + i1 * i1)
                acc[3, b] += wb * (r2 * r2 + i2 * i2)
            o = oct_idx[k]
            if o >= 0:
                acc_oct[o] += oct_w[k] * p_lum
            if k == 0:
                dc_out[i] = p_lum * scale  # the (0, 0) frequency
        for b in range(n_bins):
            lum_out[i, b] = acc[0, b]
            rgb_out[i, 0, b] = acc[1, b]
            rgb_out[i, 1, b] = acc[2, b]
            rgb_out[i, 2, b] = acc[3, b]
        for o in range(n_oct):
            oct_out[i, o] = acc_oct[o]
