"""Metric identities and sanity: SWD, spectral distance, FD, KID, precision/recall, memorisation."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

from components.metrics.feature_net import FeatureNet, extract_features
from components.metrics.frechet import feature_stats, frechet_distance, frechet_distance_from_stats
from components.metrics.kid import kid, mmd2_unbiased
from components.metrics.memorization import memorization
from components.metrics.prd import precision_recall
from components.metrics.spectral import (
    high_frequency_outliers,
    high_frequency_share,
    spectral_distance,
)
from components.metrics.swd import laplacian_pyramid, swd
from components.spectra import gaussian_random_field

SWD_FAST = dict(patches_per_image=16, directions=64, repeats=1)


def structured_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Colour images with natural-image statistics: 1/f^2 random fields, mixed into RGB."""
    fields = gaussian_random_field(3 * n, size, beta=2.0, seed=seed).reshape(n, 3, size, size)
    mix = np.array([[0.8, 0.15, 0.05], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])
    rgb = np.einsum("ij,njhw->nihw", mix, fields)
    return torch.from_numpy(np.tanh(0.7 * rgb)).float()  # (n, 3, size, size) in (-1, 1)


def cifar_test_images(root, n: int) -> torch.Tensor:
    """The first n images of each of the first classes of the CIFAR-10 test tar, shuffled."""
    out = []
    with tarfile.open(root / "cifar10" / "test.tar") as tar:
        for m in tar:
            if m.isfile() and m.name.endswith(".jpg"):
                im = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                out.append(np.asarray(im))
                if len(out) >= n:
                    break
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x[torch.randperm(n, generator=torch.Generator().manual_seed(0))]


def gaussian_blur(x: torch.Tensor, s: float) -> torch.Tensor:
    """Separable Gaussian blur of std ``s`` pixels (7 taps, reflect padding)."""
    k = torch.exp(-torch.arange(-3, 4).float() ** 2 / (2 * s * s))
    k = k / k.sum()
    b, c, h, w = x.shape
    y = F.conv2d(F.pad(x.reshape(-1, 1, h, w), (3, 3, 0, 0), mode="reflect"), k.view(1, 1, 1, 7))
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="reflect"), k.view(1, 1, 7, 1))
    return y.view(b, c, h, w)


@pytest.fixture(scope="module", params=["structured", "cifar10"])
def image_set(request) -> torch.Tensor:
    if request.param == "structured":
        return structured_images(128)
    return cifar_test_images(request.getfixturevalue("shared_data"), 128)


@pytest.fixture(scope="module")
def random_features_net() -> FeatureNet:
    torch.manual_seed(0)
    return FeatureNet(num_classes=10, width=8).eval()


def _noisy(x: torch.Tensor, s: float) -> torch.Tensor:
    return x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))


def _increasing(v: list[float]) -> bool:
    return all(b > a for a, b in zip(v, v[1:], strict=False))


def test_laplacian_pyramid_inverts() -> None:
    from components.metrics.swd import _upsample

    x = structured_images(2)
    bands = laplacian_pyramid(x, 3)
    assert [b.shape[-1] for b in bands] == [32, 16, 8]
    g = bands[-1]
    for band in reversed(bands[:-1]):
        g = band + _upsample(g, band.shape[-2:])
    torch.testing.assert_close(g, x, atol=1e-5, rtol=0)


def test_swd_zero_on_itself_and_grows_with_noise_and_blur(image_set) -> None:
    x = image_set
    assert swd(x, x, **SWD_FAST)["mean"] == pytest.approx(0.0, abs=1e-9)
    noise = [swd(x, _noisy(x, s), **SWD_FAST)["mean"] for s in (0.05, 0.15, 0.4)]
    blur = [swd(x, gaussian_blur(x, s), **SWD_FAST)["mean"] for s in (0.5, 1.0, 2.0)]
    assert noise[0] > 1.0 and _increasing(noise), noise
    assert blur[0] > 1.0 and _increasing(blur), blur


def test_swd_is_scale_invariant_and_reports_levels() -> None:
    x = structured_images(64)
    y = _noisy(x, 0.1)
    a, b = swd(x, y, **SWD_FAST), swd(3 * x, 3 * y, **SWD_FAST)
    assert a["resolutions"] == [32, 16] and len(a["per_level"]) == 2
    assert a["mean"] == pytest.approx(b["mean"], rel=1e-3)
    with pytest.raises(ValueError, match="image shapes differ"):
        swd(x, x[:, :, :16, :16])


def test_fd_zero_on_itself_and_grows_with_noise_and_blur(image_set, random_features_net) -> None:
    x = image_set
    f = extract_features(random_features_net, x)
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-9)
    noise = [frechet_distance(f, extract_features(random_features_net, _noisy(x, s)))
             for s in (0.05, 0.15, 0.4)]
    blur = [frechet_distance(f, extract_features(random_features_net, gaussian_blur(x, s)))
            for s in (0.5, 1.0, 2.0)]
    assert _increasing(noise), noise
    assert _increasing(blur), blur


def test_fd_matches_closed_form_for_gaussians() -> None:
    gen = torch.Generator().manual_seed(0)
    d = 6
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    b = torch.randn(d, d, generator=gen, dtype=torch.float64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(d), b @ b.T + 0.1 * torch.eye(d)
    mu1, mu2 = torch.randn(d, dtype=torch.float64, generator=gen), torch.zeros(d)
    # closed form with SciPy's general matrix square root as the independent reference
    ref = float(((mu1 - mu2) ** 2).sum() + torch.trace(s1 + s2)
                - 2 * np.trace(scipy.linalg.sqrtm(s1.numpy() @ s2.numpy())).real)
    assert frechet_distance_from_stats(mu1, s1, mu2, s2.double()) == pytest.approx(ref, rel=1e-9)
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    v1, v2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.25])
    m1, m2 = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 2.0, 0.0])
    exact = float(((m1 - m2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum())
    got = frechet_distance_from_stats(m1, torch.diag(v1), m2, torch.diag(v2))
    assert got == pytest.approx(exact, rel=1e-12)
    # from samples: converges to the closed form
    n = 200_000
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64) * v1.sqrt() + m1
    y = torch.randn(n, 3, generator=gen, dtype=torch.float64) * v2.sqrt() + m2
    assert frechet_distance(x, y) == pytest.approx(exact, rel=0.02)


def test_fd_handles_singular_covariances() -> None:
    # fewer samples than dimensions: rank-deficient covariance, still finite and >= 0
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(1))
    st = feature_stats(x)
    assert torch.linalg.matrix_rank(st.sigma) < 64
    fd = frechet_distance(x, x + 0.5)
    assert np.isfinite(fd) and fd == pytest.approx(64 * 0.25, rel=1e-6)


def test_kid_unbiased_on_disjoint_halves() -> None:
    gen = torch.Generator().manual_seed(2)
    scale = torch.linspace(0.5, 2, 16)
    # the estimator's expectation over independent draws of one distribution is 0 ...
    vals, biased = [], []
    for _ in range(120):
        x = torch.randn(60, 16, generator=gen, dtype=torch.float64) * scale + 0.3
        y = torch.randn(60, 16, generator=gen, dtype=torch.float64) * scale + 0.3
        vals.append(mmd2_unbiased(x, y))
        k = lambda a, b: (a @ b.T / 16 + 1) ** 3  # noqa: E731
        biased.append(float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()))
    v = torch.tensor(vals)
    se = v.std() / np.sqrt(len(vals))
    assert abs(v.mean()) < 4 * se
    assert np.mean(biased) > v.mean() + 20 * se  # the V-statistic is biased upwards
    # ... and KID of two disjoint halves of one set is ~0 next to a real difference
    feats = torch.randn(2000, 32, generator=gen) * torch.linspace(0.5, 2, 32) + 0.3
    same = kid(feats[:1000], feats[1000:], subsets=20, subset_size=500)
    shifted = kid(feats[:1000], feats[1000:] + 0.2, subsets=20, subset_size=500)
    assert shifted["mean"] > 10 * abs(same["mean"]) and shifted["mean"] > 5 * shifted["std"]


def test_precision_recall_identical_and_disjoint() -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(400, 16, generator=gen)
    pr = precision_recall(a, a.clone())
    assert pr["precision"] == 1.0 and pr["recall"] == 1.0
    b = torch.randn(400, 16, generator=gen)
    pr2 = precision_recall(a, b)
    assert pr2["precision"] > 0.6 and pr2["recall"] > 0.6
    far = precision_recall(a, b + 50.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # mode dropping: generated covers half the real modes -> high precision, low recall
    half = precision_recall(torch.cat([a, a + 50]), torch.cat([b, b]))
    assert half["precision"] > 0.6 and half["recall"] < 0.55


def test_memorization_flags_copies_only() -> None:
    train = structured_images(100, seed=4)
    fresh = structured_images(20, seed=5)
    copies = train[:5] + 0.001 * torch.randn(5, 3, 32, 32)
    out = memorization(torch.cat([copies, fresh]), train)
    assert out["flagged_indices"] == [0, 1, 2, 3, 4]
    assert out["nearest_index"][:5] == [0, 1, 2, 3, 4]
    assert out["fraction_memorized"] == pytest.approx(5 / 25)


def test_spectral_distance_detects_blur_and_slope() -> None:
    x = structured_images(64)
    same = spectral_distance(x, x)
    assert same["log_rapsd_l1"] == pytest.approx(0.0, abs=1e-12)
    assert same["slope_real"] == pytest.approx(same["slope_generated"])
    blur = spectral_distance(gaussian_blur(x, 1.0), x)
    d = np.array(blur["log_rapsd_per_frequency"])
    assert len(d) == 16 and d[-1] < d[0] - 1.0  # blur removes high frequencies
    assert blur["slope_difference"] > 0.5  # steeper spectrum for blurred images
    noisy = spectral_distance(_noisy(x, 0.2), x)
    assert noisy["slope_difference"] < 0 and noisy["log_rapsd_l1"] > 0.1


def test_high_frequency_outliers_count_the_noisy_minority_that_set_spectra_miss() -> None:
    real, x = structured_images(400, seed=6), structured_images(400, seed=7)
    flat = torch.zeros(2, 3, 32, 32)
    assert high_frequency_share(flat).tolist() == [0.0, 0.0]
    share = high_frequency_share(x)
    assert share.shape == (400,) and bool(((share > 0) & (share < 1)).all())
    assert (high_frequency_share(_noisy(x, 0.2)) > share).all()  # white noise: flat spectrum
    floor = high_frequency_outliers(x, real)["fraction"]
    assert floor <= 0.04  # real against real: about 1 - quantile
    # a tenth of the images left noisy: counted image by image
    mixed = torch.cat([_noisy(x[:40], 0.5), x[40:]])
    out = high_frequency_outliers(mixed, real)
    clean_above = int((share[40:] > out["threshold"]).sum())
    assert out["fraction"] == pytest.approx((40 + clean_above) / 400)
    assert out["fraction"] >= 0.1 > floor
    assert out["median_generated"] == pytest.approx(out["median_real"], rel=0.2)
    assert high_frequency_outliers(gaussian_blur(x, 1.0), real)["fraction"] == 0.0
    with pytest.raises(ValueError, match="quantile"):
        high_frequency_outliers(x, real, quantile=1.0)


def test_swd_replicates_identity_row_is_swd_and_resamples_differ() -> None:
    from components.metrics.swd import swd_replicates

    a, b = structured_images(12, seed=1), structured_images(24, seed=2)
    index = torch.stack([torch.arange(12), torch.randint(12, (12,),
                                                         generator=torch.Generator().manual_seed(0))])
    reps = swd_replicates(a, b, index, min_resolution=16, seed=3, **SWD_FAST)
    assert reps[0] == pytest.approx(swd(a, b, min_resolution=16, seed=3, **SWD_FAST)["mean"],
                                    rel=1e-9)
    assert reps[1] != pytest.approx(reps[0], rel=1e-3)


def test_bootstrap_intervals_narrow_with_more_images_and_separate_worse_sets() -> None:
    from pipelines.evaluation.metrics import MetricSettings, compute_metrics

    s = MetricSettings(bootstrap=20, swd_patches_per_image=16, swd_directions=64, swd_repeats=1)
    real = structured_images(64, seed=10)
    small = compute_metrics(structured_images(16, seed=11), real, settings=s)["intervals"]
    large = compute_metrics(structured_images(64, seed=11), real, settings=s)["intervals"]
    for k in ("swd_x1e3", "log_rapsd_l1"):
        m = large["metrics"][k]
        assert len(m["replicates"]) == 20 and m["lo"] < m["estimate"] < m["hi"]
        assert m["se"] < small["metrics"][k]["se"], k
    # a visibly worse set (blurred) lies outside the good set's interval
    blurred = F.avg_pool2d(structured_images(64, seed=11), 3, 1, 1)
    worse = compute_metrics(blurred, real, settings=s)["intervals"]["metrics"]
    assert worse["log_rapsd_l1"]["lo"] > large["metrics"]["log_rapsd_l1"]["hi"]
    assert worse["swd_x1e3"]["estimate"] > large["metrics"]["swd_x1e3"]["hi"]


def test_intervals_without_swd_keep_its_point_value_and_the_other_intervals() -> None:
    """swd_bootstrap off: SWD keeps its point value (the same as with intervals) but has no
    interval; log-RAPSD's interval is unchanged."""
    from pipelines.evaluation.metrics import MetricSettings, compute_metrics

    kw = {"bootstrap": 10, "swd_patches_per_image": 16, "swd_directions": 64,
          "swd_repeats": 1}
    real, gen = structured_images(32, seed=10), structured_images(16, seed=11)
    full = compute_metrics(gen, real, settings=MetricSettings(**kw))
    lean = compute_metrics(gen, real, settings=MetricSettings(**kw, swd_bootstrap=False))
    assert "swd_x1e3" in full["intervals"]["metrics"]
    assert "swd_x1e3" not in lean["intervals"]["metrics"]
    assert lean["swd"]["mean"] == full["swd"]["mean"]
    assert lean["intervals"]["metrics"]["log_rapsd_l1"] == \
        full["intervals"]["metrics"]["log_rapsd_l1"]
