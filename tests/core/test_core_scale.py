"""Resolution operators: D_m, U_m, R and R^T, pyramids."""

from __future__ import annotations

import pytest
import torch

from components.scale import (
    band_energies,
    downsample_mean,
    gaussian_pyramid,
    laplacian_pyramid,
    laplacian_reconstruct,
    resize,
    resize_matrix,
    resize_transpose,
    upsample_nearest,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("m", [2, 4])
def test_downsampled_white_noise_has_variance_one_over_m2(m):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 64, 64, generator=g)
    v = float(downsample_mean(x, m).var())
    n = 64 * 3 * (64 // m) ** 2
    assert abs(v - 1 / m**2) < 5 * (1 / m**2) * (2 / n) ** 0.5 + 1e-4


def test_down_up_identities():
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    assert torch.allclose(downsample_mean(upsample_nearest(x, 2), 2), x)
    # U^T = m^2 D: <U a, b> = m^2 <a, D b>
    a, b = torch.randn(2, 3, 4, 6, dtype=torch.float64), x
    assert torch.allclose((upsample_nearest(a, 2) * b).sum(), 4 * (a * downsample_mean(b, 2)).sum())


def test_downsample_mean_values():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    expect = torch.tensor([[2.5, 4.5], [10.5, 12.5]])
    assert torch.equal(downsample_mean(x, 2)[0, 0], expect)


def test_non_divisible_size_names_size_and_m():
    with pytest.raises(ValueError, match=r"15x16.*m=2"):
        downsample_mean(torch.zeros(1, 1, 15, 16), 2)
    with pytest.raises(ValueError, match="m=4"):
        gaussian_pyramid(torch.zeros(1, 1, 10, 10), levels=3)


@pytest.mark.parametrize("size_in,size_out", [((16, 16), (7, 9)), ((8, 10), (24, 13)),
                                              ((32, 32), (16, 16)), ((5, 7), (20, 28))])
def test_resize_transpose_adjoint(size_in, size_out):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, *size_in, generator=g, dtype=torch.float64)
    y = torch.randn(3, 2, *size_out, generator=g, dtype=torch.float64)
    lhs = (resize(x, size_out) * y).sum()
    rhs = (x * resize_transpose(y, size_in)).sum()
    assert abs(float(lhs - rhs)) <= 1e-5 * max(1.0, abs(float(lhs)))
    # float32 too (the GPU path): relative agreement
    lhs32 = (resize(x.float(), size_out) * y.float()).sum()
    rhs32 = (x.float() * resize_transpose(y.float(), size_in)).sum()
    assert abs(float(lhs32 - rhs32)) <= 1e-5 * float(x.abs().sum() * y.abs().max())


@pytest.mark.parametrize("size_in,size_out", [((16, 12), (6, 5)), ((16, 8), (6, 1)),
                                              ((16, 1), (6, 3)), ((1, 8), (3, 5)),
                                              ((9, 9), (1, 1)), ((4, 4), (9, 1))])
def test_resize_is_separable_matrix(size_in, size_out):
    """R x = A_h x A_w^T, including width-1 outputs (a torch kernel bug is worked around)."""
    x = torch.randn(1, 1, *size_in, dtype=torch.float64)
    a_h, a_w = resize_matrix(size_in[0], size_out[0]), resize_matrix(size_in[1], size_out[1])
    assert torch.allclose(resize(x, size_out)[0, 0], a_h @ x[0, 0] @ a_w.T, atol=1e-12)
    y = torch.randn(1, 1, *size_out, dtype=torch.float64)
    assert torch.allclose(resize_transpose(y, size_in)[0, 0], a_h.T @ y[0, 0] @ a_w, atol=1e-12)


def test_resize_antialiased():
    # anti-aliased shrink: a checkerboard (Nyquist) is strongly attenuated
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1.0
    small = resize(checker[None, None].double(), (4, 4))
    assert small.abs().max() < 0.2


@pytest.mark.parametrize("kind", ["box", "gaussian"])
def test_laplacian_pyramid_reconstructs_exactly(kind):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    g = gaussian_pyramid(x, 4, kind)
    assert [t.shape[-1] for t in g] == [32, 16, 8, 4]
    bands = laplacian_pyramid(x, 4, kind)
    assert torch.allclose(laplacian_reconstruct(bands, kind), x, atol=1e-12)


def test_box_bands_are_orthogonal_energy_adds_up():
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    e = band_energies(x, 4, "box")  # (B, 4)
    assert torch.allclose(e.sum(1), x.pow(2).flatten(1).mean(1), atol=1e-10)
    # white noise: band k holds (3/4) 4^-k of the energy, the top level 4^-(L-1)
    expect = torch.tensor([0.75, 0.1875, 0.046875, 0.015625], dtype=torch.float64)
    assert torch.allclose(e.mean(0) / e.mean(0).sum(), expect, rtol=0.1)


def test_operators_keep_device_and_dtype():
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    for y in (downsample_mean(x, 2), upsample_nearest(x, 2), resize(x, 5), resize_transpose(x, 4)):
        assert y.dtype == torch.float64 and y.device == x.device
