"""The in-house feature network (deterministic recipe, artifacts) and the FID InceptionV3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.metrics.feature_net import FeatureNet, extract_features, load_feature_net
from components.metrics.inception import FIDInceptionV3, load_fid_inception
from pipelines.evaluation.data import ImageSet
from pipelines.evaluation.feature_net import DEBUG_RECIPE, save_trained, train_feature_net


def _toy_set(n: int = 64, seed: int = 0) -> ImageSet:
    """Two classes that a classifier can separate: reddish vs bluish noise images."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    base = rng.integers(0, 128, (n, 32, 32, 3))
    base[labels == 0, :, :, 0] += 127
    base[labels == 1, :, :, 2] += 127
    return ImageSet(base.astype(np.uint8), labels.astype(np.int64), ["red", "blue"], "toy")


def test_recipe_is_deterministic_on_cpu(tmp_path) -> None:
    train, test = _toy_set(64, 0), _toy_set(32, 1)
    hashes = []
    for run in range(2):
        net, res = train_feature_net(train, test, DEBUG_RECIPE, "cpu", log=lambda *_: None)
        side = save_trained(net, res, DEBUG_RECIPE, train, test, tmp_path / str(run),
                            log=lambda *_: None)
        hashes.append(side["sha256"])
        assert 0.0 <= side["test_accuracy"] <= 1.0
        assert side["metric_name"] == f"FD-prism-{side['sha256'][:8]}"
        assert side["recipe"]["seed"] == 0 and side["class_names"] == ["red", "blue"]
    assert hashes[0] == hashes[1]
    other = DEBUG_RECIPE.model_copy(update={"seed": 1})
    net, res = train_feature_net(train, None, other, "cpu", log=lambda *_: None)
    side = save_trained(net, res, other, train, None, tmp_path / "seed1", log=lambda *_: None)
    assert side["sha256"] != hashes[0]


def test_artifact_roundtrip_and_tamper_check(tmp_path) -> None:
    train = _toy_set(32)
    net, res = train_feature_net(train, None, DEBUG_RECIPE, "cpu", log=lambda *_: None)
    side = save_trained(net, res, DEBUG_RECIPE, train, None, tmp_path, log=lambda *_: None)
    loaded, meta = load_feature_net(tmp_path / "feature_net.safetensors")
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(extract_features(loaded, x), extract_features(net.eval(), x))
    assert meta["sha256"] == side["sha256"] and extract_features(loaded, x).shape == (5, 32)
    # features are calibrated to unit mean square on the training images (KID's kernel scale)
    f_train = extract_features(loaded, train.as_float())
    assert f_train.square().mean().item() == pytest.approx(1.0, rel=1e-4)
    assert meta["feature_scale"] == pytest.approx(float(loaded.feature_scale))
    raw = bytearray((tmp_path / "feature_net.safetensors").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "feature_net.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="SHA-256"):
        load_feature_net(tmp_path / "feature_net.safetensors")


def test_feature_net_rejects_unlabelled_and_bad_resolution() -> None:
    s = _toy_set(8)
    s.labels[:] = -1
    with pytest.raises(ValueError, match="class labels"):
        train_feature_net(s, None, DEBUG_RECIPE, "cpu")
    with pytest.raises(ValueError, match="resolution 32 or 64"):
        FeatureNet(10, resolution=48)
    assert FeatureNet(10, width=4, resolution=64).features(torch.zeros(2, 3, 64, 64)).shape \
        == (2, 32)


def test_fid_inception_builds_and_loads_a_state_dict(tmp_path) -> None:
    # The real pt_inception-2015-12-05 weights are absent on these machines (they cannot be
    # downloaded here): the architecture is checked on random weights, with the parameter
    # count of the FID graph (23,850,960 with the 1008-way classifier) and a strict load.
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    state = {k: v for k, v in net.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "pt_inception-2015-12-05-random.pth")
    loaded = load_fid_inception(tmp_path / "pt_inception-2015-12-05-random.pth")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        f = loaded(x)
        assert f.shape == (1, 2048) and torch.isfinite(f).all()
        torch.testing.assert_close(f, net(x))
    state.pop("Mixed_7c.branch_pool.conv.weight")
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing"):
        load_fid_inception(tmp_path / "broken.pth")
    with pytest.raises(FileNotFoundError):
        load_fid_inception(tmp_path / "absent.pth")


def test_shards_and_folder_give_the_same_labelled_images(tmp_path) -> None:
    """The GPU path reads gzip shards made by ingest; labels must match the class folders."""
    from PIL import Image

    from pipelines.config import IngestConfig
    from pipelines.data.ingest import ingest
    from pipelines.evaluation.data import load_images

    rng = np.random.default_rng(0)
    for cls in ("cat", "ant", "bee"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "src" / cls / f"{i}.png")
    ingest(str(tmp_path / "src"), str(tmp_path / "shards"),
           IngestConfig(gzip=True, shard_size=5), log=lambda *_: None)
    folder = load_images(str(tmp_path / "src"))
    shards = load_images(str(tmp_path / "shards"))
    assert folder.class_names == ["ant", "bee", "cat"] and len(shards) == 12

    def key(s: ImageSet) -> list:
        return sorted((int(lab), img.tobytes()) for img, lab in zip(s.images, s.labels,
                                                                    strict=True))

    assert key(folder) == key(shards)


def test_a_one_step_warm_up_trains() -> None:
    # pct_start 0.25 x 4 steps = a one-step warm-up, on which OneCycleLR divides by zero (the
    # debug recipe at its 128-image cap with batches of 32 crashed so)
    recipe = DEBUG_RECIPE.model_copy(update={"batch_size": 32})  # 128 / 32 = 4 steps
    net, res = train_feature_net(_toy_set(160), None, recipe, "cpu", log=lambda *_: None)
    assert res["train_images"] == 128 and all(torch.isfinite(p).all() for p in net.parameters())
