"""The fast uint8 path of the per-image statistics equals the reference float path."""

from __future__ import annotations

import numpy as np
import pytest

from components.spectra import (
    SpectraParams,
    image_statistics,
    uint8_statistics,
    uint8_to_unit,
)
from components.spectral_bins import chunk_size

# float32 FFTs from two libraries (pocketfft vs torch/MKL): equal to float32 rounding
RTOL = 2e-5
LOG_FIELDS = ("log_A", "beta", "fit_residual", "lambda_min", "lambda_max")  # atol in log units


def _compare(u8: np.ndarray, params: SpectraParams | None = None) -> None:
    ref = image_statistics(uint8_to_unit(u8), params)
    fast = uint8_statistics(u8, params)
    assert sorted(fast) == sorted(ref)
    for name, want in ref.items():
        got = fast[name]
        assert got.shape == want.shape, name
        atol = 1e-5 if name in LOG_FIELDS else 1e-6 * float(np.abs(want).max()) + 1e-12
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol, err_msg=name)


def test_equal_over_several_chunks_of_photo_like_images() -> None:
    rng = np.random.default_rng(0)
    n = 2 * chunk_size(64, 64) + 3  # three chunks, the last one partial
    # smooth ramps + noise: a steep spectrum with structure at every scale
    yy, xx = np.mgrid[0:64, 0:64]
    base = (yy[None, :, :, None] * rng.uniform(0.5, 3, (n, 1, 1, 3))
            + xx[None, :, :, None] * rng.uniform(0.5, 3, (n, 1, 1, 3)))
    u8 = np.clip(base + rng.normal(0, 8, (n, 64, 64, 3)), 0, 255).astype(np.uint8)
    _compare(u8)


@pytest.mark.parametrize("shape", [(5, 33, 20), (3, 4, 4), (2, 31, 48)])
def test_equal_on_odd_and_non_square_sizes(shape: tuple[int, int, int]) -> None:
    u8 = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    _compare(u8, SpectraParams(eps_lo=0.05, eps_hi=4.0, fit_f_lo=1, fit_f_hi=2))


def test_constant_and_extreme_images() -> None:
    u8 = np.stack([np.full((16, 16, 3), v, np.uint8) for v in (0, 127, 128, 255)])
    _compare(u8)
    st = uint8_statistics(u8)
    # a constant image: no power off DC, DC = H W mean^2, the featureless-bounds rule
    assert float(np.abs(st["lum_rapsd"]).max()) < 1e-9
    np.testing.assert_allclose(st["dc_power"][[0, 3]], 256.0, rtol=1e-6)
    np.testing.assert_allclose(st["lambda_max"] - st["lambda_min"], 1.0, rtol=1e-6)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="uint8"):
        uint8_statistics(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        uint8_statistics(np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="at least 4x4"):
        uint8_statistics(np.zeros((1, 3, 8, 3), np.uint8))
