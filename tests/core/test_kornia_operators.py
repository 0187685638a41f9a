"""The kornia operators of the science core compute what the definitions say: each is checked
against a small reference implementation of the definition (plain torch convolutions and
arithmetic), on random inputs of several sizes and dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kornia.geometry.transform import pyrdown

from components import scale
from components.metrics import swd
from components.spectra import LUMA_REC601, luminance

SIZES = [(3, 3), (3, 8), (4, 4), (7, 5), (16, 16), (33, 64), (64, 64)]
TINY = [(1, 1), (1, 7), (2, 2), (2, 9)]  # below reflect padding's 3 pixels
ATOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def binomial5(dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=dtype) / 16.0


def ref_blur_2d(x: torch.Tensor) -> torch.Tensor:
    """SWD's blur: depthwise 5x5 binomial, reflect padding, (B, C, H, W)."""
    k1 = binomial5(x.dtype)
    k2 = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k2, groups=x.shape[1])


def ref_blur_separable(x: torch.Tensor) -> torch.Tensor:
    """The scale pyramid's blur: rows then columns, reflect (replicate below 3 pixels)."""
    k = binomial5(x.dtype)
    mode = "reflect" if min(x.shape[-2:]) > 2 else "replicate"
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode=mode), k.reshape(1, 1, 1, 5))
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode=mode), k.reshape(1, 1, 5, 1))


def ref_laplacian_swd(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """PGGAN's Laplacian pyramid: blur + every second pixel; zero insertion + 4 blur."""
    g = [x]
    for _ in range(levels - 1):
        g.append(ref_blur_2d(g[-1])[..., ::2, ::2])
    out = []
    for fine, coarse in zip(g[:-1], g[1:], strict=True):
        up = torch.zeros_like(fine)
        up[..., ::2, ::2] = coarse
        out.append(fine - 4.0 * ref_blur_2d(up))
    return out + [g[-1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", SIZES)
def test_swd_blur_is_the_reference_blur(size, dtype) -> None:
    x = torch.randn(3, 2, *size, generator=torch.Generator().manual_seed(0), dtype=dtype)
    torch.testing.assert_close(swd._blur(x), ref_blur_2d(x), atol=ATOL[dtype], rtol=0)


def test_swd_laplacian_pyramid_is_the_reference_pyramid() -> None:
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for got, want in zip(swd.laplacian_pyramid(x, 3), ref_laplacian_swd(x, 3), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", SIZES + TINY)
def test_scale_blur_is_the_reference_blur(size, dtype) -> None:
    x = torch.randn(5, 1, *size, generator=torch.Generator().manual_seed(2), dtype=dtype)
    torch.testing.assert_close(scale._blur_binomial(x), ref_blur_separable(x),
                               atol=ATOL[dtype], rtol=0)


def test_scale_gaussian_pyramid_is_blur_then_decimate() -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    pyr = scale.gaussian_pyramid(x, 6, kind="gaussian")  # down to 1x1: the tiny-image padding
    for fine, coarse in zip(pyr[:-1], pyr[1:], strict=True):
        want = ref_blur_separable(fine.reshape(-1, 1, *fine.shape[-2:]))[..., ::2, ::2]
        torch.testing.assert_close(coarse, want.reshape(coarse.shape), atol=1e-6, rtol=0)


def test_kornia_pyrdown_is_not_the_pyramid_reduction() -> None:
    """kornia's pyrdown averages 2 x 2 blocks of the blurred image instead of decimating it,
    which is why the pyramids keep their own decimation."""
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    blurred = ref_blur_2d(x)
    torch.testing.assert_close(pyrdown(x), F.avg_pool2d(blurred, 2), atol=1e-6, rtol=0)
    assert (pyrdown(x) - blurred[..., ::2, ::2]).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_luminance_is_rec601(dtype) -> None:
    x = torch.rand(4, 3, 17, 9, generator=torch.Generator().manual_seed(5), dtype=dtype) * 2 - 1
    r, g, b = x.unbind(-3)
    want = LUMA_REC601[0] * r + LUMA_REC601[1] * g + LUMA_REC601[2] * b
    got = luminance(x)
    assert got.dtype == dtype and got.shape == (4, 17, 9)
    torch.testing.assert_close(got, want, atol=ATOL[dtype], rtol=0)
    np.testing.assert_allclose(luminance(x.numpy()), want.numpy(), atol=ATOL[dtype], rtol=0)


def test_luminance_of_integer_tensors_is_float() -> None:
    """Integer images are mixed in float32 (kornia's own uint8 path would round to uint8)."""
    x = torch.randint(0, 256, (2, 3, 5, 5), generator=torch.Generator().manual_seed(6),
                      dtype=torch.uint8)
    got = luminance(x)
    assert got.dtype == torch.float32
    r, g, b = x.float().unbind(-3)
    want = LUMA_REC601[0] * r + LUMA_REC601[1] * g + LUMA_REC601[2] * b
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
