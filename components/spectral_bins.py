"""The frequency bins every spectral statistic shares: radial bins and octave bands of the
rfft2 half-spectrum, and the chunk size of the uint8 path.

``components/spectra.py`` (the torch path) and ``components/_spectra_kernel.py`` (the fused
numba pass) both pool through these definitions, so the two paths agree bin for bin.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


def _half_spectrum(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ky (h, 1), kx (1, wr), multiplicity (h*wr,)) of the rfft2 half-spectrum: integer
    frequencies, and 2 for a column that stands for two conjugate frequencies, else 1."""
    ky = np.fft.fftfreq(h, 1.0 / h)[:, None]  # integer frequencies (h, 1)
    kx = np.arange(w // 2 + 1)[None, :]  # (1, wr)
    mult = np.full((h, w // 2 + 1), 2.0)
    mult[:, 0] = 1.0
    if w % 2 == 0:
        mult[:, -1] = 1.0  # the Nyquist column is its own conjugate
    return ky, kx, mult.ravel()


@lru_cache(maxsize=32)
def high_band_matrix(h: int, w: int, cutoff: float) -> np.ndarray:
    """(h*wr, 2) pooling of the half-spectrum: column 0 sums every frequency but DC, column 1
    those above ``cutoff`` cycles per pixel (radius ``sqrt((ky/h)^2 + (kx/w)^2)``), each with
    its conjugate multiplicity, so ``power_half @ M`` equals the full-spectrum sums."""
    ky, kx, mult = _half_spectrum(h, w)
    radius = np.sqrt((ky / h) ** 2 + (kx / w) ** 2).ravel()
    m = np.zeros((radius.size, 2))
    m[1:, 0] = mult[1:]  # index 0 is DC
    high = radius > cutoff
    m[high, 1] = mult[high]
    return m


@lru_cache(maxsize=32)
def bin_matrices(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Averaging matrices over the rfft2 half-spectrum of an (h, w) plane.

    Returns (avg (h*wr, n_bins), octave_sum (h*wr, n_oct), dc_weight (h*wr,)) with
    wr = w // 2 + 1. Columns of the half-spectrum that stand for two conjugate frequencies
    get weight 2, so ``power_half @ M`` equals the same sum over the full spectrum.
    """
    n_bins = min(h, w) // 2
    ky, kx, mult = _half_spectrum(h, w)
    r = np.rint(np.sqrt(ky**2 + kx**2)).astype(np.int64).ravel()  # (h*wr,)
    avg = np.zeros((r.size, n_bins))
    inside = (r >= 1) & (r <= n_bins)
    avg[np.flatnonzero(inside), r[inside] - 1] = mult[inside]
    avg /= avg.sum(axis=0, keepdims=True)  # mean over the bin's full-spectrum frequencies
    # octaves: {1}, {2}, {3,4}, {5..8}, ..., the last one also takes the corners r > n_bins
    n_oct = n_octaves(n_bins)
    octave = np.zeros(r.size, dtype=np.int64)
    nz = r >= 1
    octave[nz] = np.minimum(np.ceil(np.log2(np.maximum(r[nz], 1))).astype(np.int64), n_oct - 1)
    oct_sum = np.zeros((r.size, n_oct))
    oct_sum[np.flatnonzero(nz), octave[nz]] = mult[nz] / (h * w)  # mean-square units
    dc = np.zeros(r.size)
    dc[0] = 1.0
    return avg, oct_sum, dc


def n_octaves(n_bins: int) -> int:
    """Number of octave bands {1}, {2}, {3,4}, ... covering radii 1..n_bins."""
    return int(math.ceil(math.log2(n_bins))) + 1 if n_bins >= 1 else 0


@lru_cache(maxsize=32)
def bin_frequencies(n_bins: int) -> np.ndarray:
    """Radial frequency of each RAPSD entry (cycles per image), (n_bins,).

    The mean exact radius ``sqrt(ky^2 + kx^2)`` of the frequencies in each integer-radius bin
    of a (2 n_bins)-square plane (about r; 1.21 for r = 1). Power-law fits use these values,
    which removes most of the rounding bias of integer bins at low frequencies.
    """
    size = 2 * n_bins
    k = np.fft.fftfreq(size, 1.0 / size)
    rad = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2).ravel()
    r = np.rint(rad).astype(np.int64)
    sums = np.bincount(r, weights=rad, minlength=n_bins + 1)[1 : n_bins + 1]
    counts = np.bincount(r, minlength=n_bins + 1)[1 : n_bins + 1]
    return sums / counts


def chunk_size(h: int, w: int) -> int:
    """Images per chunk of the uint8 path: about 2^16 pixels (64 images at 32x32, 16 at
    64x64), so that a chunk's float planes and spectra (~1 MiB) stay in a core's L2 cache."""
    return max(1, (1 << 16) // (h * w))
