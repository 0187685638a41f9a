"""uint8_statistics: the numba pass and the torch fallback equal the reference and each other."""

from __future__ import annotations

import numpy as np
import pytest

from components import spectra, spectral_bins
from components.spectra import image_statistics, uint8_statistics, uint8_to_unit

pytest.importorskip("numba")

RTOL = 2e-5  # float32 FFTs of two libraries (pocketfft vs torch): float32 rounding
LOG_FIELDS = ("log_A", "beta", "fit_residual", "lambda_min", "lambda_max")  # atol, log units
SHAPES = [(70, 32, 32), (20, 64, 64), (5, 33, 20), (4, 31, 48)]  # >1 chunk at 32x32 and 64x64


def _images(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Smooth ramps + noise (a steep spectrum with structure at every scale), uint8 NHWC."""
    rng = np.random.default_rng(seed)
    n, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    base = (yy[None, :, :, None] * rng.uniform(0.5, 3, (n, 1, 1, 3))
            + xx[None, :, :, None] * rng.uniform(0.5, 3, (n, 1, 1, 3)))
    return np.clip(base + rng.normal(0, 8, (n, h, w, 3)), 0, 255).astype(np.uint8)


def _assert_close(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, ref in want.items():
        assert got[name].shape == ref.shape, name
        assert got[name].dtype == np.float32 or name in LOG_FIELDS, name
        atol = 1e-5 if name in LOG_FIELDS else 1e-6 * float(np.abs(ref).max()) + 1e-12
        np.testing.assert_allclose(got[name], ref, rtol=RTOL, atol=atol, err_msg=name)


def _both_paths(u8: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    monkeypatch.delenv("PRISM_SPECTRA_NUMBA", raising=False)
    assert spectra._spectra_kernel() is not None  # numba installed: the fused pass runs
    fused = uint8_statistics(u8)
    monkeypatch.setenv("PRISM_SPECTRA_NUMBA", "0")
    assert spectra._spectra_kernel() is None
    fallback = uint8_statistics(u8)
    return fused, fallback


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[1]}x{s[2]}")
def test_both_paths_equal_reference_and_each_other(
    shape: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    u8 = _images(shape, seed=shape[1] * 100 + shape[2])
    fused, fallback = _both_paths(u8, monkeypatch)
    ref = image_statistics(uint8_to_unit(u8))
    _assert_close(fused, ref)
    _assert_close(fallback, ref)
    _assert_close(fused, fallback)


def test_constant_images_and_a_single_image(monkeypatch: pytest.MonkeyPatch) -> None:
    u8 = np.stack([np.full((16, 16, 3), v, np.uint8) for v in (0, 127, 128, 255)])
    fused, fallback = _both_paths(u8, monkeypatch)
    _assert_close(fused, fallback)
    assert float(np.abs(fused["lum_rapsd"]).max()) < 1e-9  # no power off DC
    np.testing.assert_allclose(fused["dc_power"][[0, 3]], 256.0, rtol=1e-6)  # H W mean^2
    one = _images((1, 64, 64), seed=3)
    _assert_close(*_both_paths(one, monkeypatch))


def test_bad_input_is_named_on_the_numba_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRISM_SPECTRA_NUMBA", raising=False)
    with pytest.raises(ValueError, match="at least 4x4"):
        uint8_statistics(np.zeros((1, 3, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        uint8_statistics(np.zeros((2, 8, 8, 3), np.float32))


def test_pooling_tables_reject_overlapping_bins() -> None:
    from components._spectra_kernel import pooling_tables

    avg, oct_sum, _ = spectral_bins.bin_matrices(8, 8)
    bad = avg.copy()
    bad[1, :2] = 0.5  # one frequency in two bins
    with pytest.raises(ValueError, match="more than one bin"):
        pooling_tables(bad, oct_sum, 1.0)
