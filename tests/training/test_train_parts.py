"""Objective, data streams and the spectral join: fast checks, no full training run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from train_helpers import debug_config, write_shards  # noqa: E402, F401

from components.diffusion import convert  # noqa: E402
from components.objectives import DiffusionObjective, loss_weight  # noqa: E402
from components.schedules import CosineSchedule  # noqa: E402
from training.streams import iter_stream, list_shard_urls  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lam_min = -12 + 6 * torch.rand(n, generator=g)
    lam_max = lam_min + 2 + 14 * torch.rand(n, generator=g)
    beta = 1 + 2 * torch.rand(n, generator=g)
    return torch.stack([torch.zeros(n), beta, lam_min, lam_max], 1)


@pytest.mark.parametrize("kind", ["frequency", "power", "mixed"])
def test_per_instance_lambdas_stay_within_each_images_bounds(kind):
    obj = DiffusionObjective(per_instance=kind, n_cond=3)
    params = _params(4096)
    torch.manual_seed(0)
    lam, bounds = obj.sample_lambda({"spectral_params": params}, 4096, torch.device("cpu"))
    assert bool((lam <= params[:, 3] + 1e-5).all()) and bool((lam >= params[:, 2] - 1e-5).all())
    torch.testing.assert_close(bounds, torch.stack([params[:, 3], params[:, 2]], 1))
    # the draws fill the range: some near each end
    frac = (lam - params[:, 2]) / (params[:, 3] - params[:, 2])
    assert float(frac.min()) < 0.05 and float(frac.max()) > 0.95


def test_network_sees_lambda_t_and_its_bounds():
    seen = {}

    def net(x, c_noise, labels):
        seen["c"] = c_noise
        return torch.zeros_like(x)

    obj = DiffusionObjective(per_instance="mixed", n_cond=3)
    params = _params(8)
    obj(net, {"images": torch.zeros(8, 3, 8, 8), "labels": None, "spectral_params": params})
    c = seen["c"] * 15.0  # c_noise = (lambda(t), lambda(0), lambda(1)) / 15
    torch.testing.assert_close(c[:, 1:], torch.stack([params[:, 3], params[:, 2]], 1))
    assert bool((c[:, 0] <= c[:, 1] + 1e-4).all()) and bool((c[:, 0] >= c[:, 2] - 1e-4).all())


def test_per_instance_without_params_is_a_clear_error():
    obj = DiffusionObjective(per_instance="mixed", n_cond=3)
    with pytest.raises(ValueError, match="spectral_params"):
        obj(lambda x, c, y: x, {"images": torch.zeros(2, 3, 4, 4), "labels": None})
    with pytest.raises(ValueError, match="n_cond must be 3"):
        DiffusionObjective(per_instance="mixed", n_cond=1)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_sigmoid_weighting_is_the_eps_loss_in_every_parameterisation(prediction):
    """w_x0 |x0 err|^2 (and w_v |v err|^2) equals sigmoid(b - lambda) |eps err|^2."""
    torch.manual_seed(0)
    x0, eps, pred = torch.randn(3, 6, 3, 8, 8).unbind(0)
    lam = torch.linspace(-10, 10, 6)
    from components.diffusion import q_sample

    x = q_sample(x0, lam, eps).float()
    true = convert(x0, x, lam, "x0", prediction)
    err_p = (pred - true).square().mean((1, 2, 3)) * loss_weight(lam, "sigmoid", prediction,
                                                                 bias=1.0)
    pred_eps = convert(pred, x, lam, prediction, "eps")
    err_eps = (pred_eps - eps).square().mean((1, 2, 3)) * loss_weight(lam, "sigmoid", "eps",
                                                                      bias=1.0)
    torch.testing.assert_close(err_p, err_eps.float(), rtol=1e-3, atol=1e-5)


def test_label_dropout_rate_and_null_class():
    obj = DiffusionObjective(schedule=CosineSchedule(), label_dropout=0.25)
    torch.manual_seed(0)
    out = obj.drop_labels(torch.full((20000,), 3))
    assert set(out.unique().tolist()) == {-1, 3}
    assert abs(float((out == -1).float().mean()) - 0.25) < 0.02


@pytest.mark.parametrize("world, workers", [(3, 2), (2, 1), (1, 1)])
def test_streams_cover_each_epoch_once_and_never_run_dry(tmp_path, world, workers):
    keys = write_shards(tmp_path, [7, 3, 12, 5, 9])  # uneven shards
    shards = list_shard_urls(str(tmp_path))
    n_streams = world * workers
    epoch0: list[str] = []
    for g in range(n_streams):
        got = []
        for sample, _, pos in iter_stream(shards, g, n_streams, 0, [0, 0, 0], flip=False):
            if pos[0] == 0:
                epoch0.append(sample["key"])
            got.append(sample["key"])
            if len(got) == 80:  # well past one epoch: the stream goes on
                break
        assert len(got) == 80
    assert sorted(epoch0) == sorted(keys)  # disjoint and complete


def test_spectral_parquet_is_joined_by_key(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.data import ShardData

    keys = write_shards(tmp_path / "shards", [6, 5])
    params = _params(len(keys), seed=3).numpy()
    table = {"key": keys, **{n: params[:, i].astype(np.float64) for i, n in
                             enumerate(("log_A", "beta", "lambda_min", "lambda_max"))}}
    pq.write_table(pa.table(table), tmp_path / "stats.parquet")
    cfg = debug_config(tmp_path, "data.source=shards", f"data.url={tmp_path / 'shards'}",
                       f"data.spectral_stats={tmp_path / 'stats.parquet'}",
                       "objective.per_instance=mixed", "sampling.schedule_model=x.json")
    batch = ShardData(cfg, 0, 1, 4, torch.device("cpu")).batch(0, 0)
    for key, row in zip(batch["keys"], batch["spectral_params"], strict=True):
        np.testing.assert_allclose(row.numpy(), params[keys.index(key)], rtol=1e-6)
    torch.testing.assert_close(batch["lambda_bounds"], batch["spectral_params"][:, [3, 2]])


def test_stream_batches_are_mean_downsampled_to_the_training_resolution():
    from training.data import to_batch

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    full = to_batch(images, None, None, ["a", "b", "c"], torch.device("cpu"), 0, 64)["images"]
    half = to_batch(images, None, None, ["a", "b", "c"], torch.device("cpu"), 0, 32)["images"]
    assert half.shape == (3, 3, 32, 32)
    want = full.reshape(3, 3, 32, 2, 32, 2).mean((3, 5))
    assert torch.allclose(half, want, atol=1e-6)
    with pytest.raises(ValueError, match="data.resolution is 48 but the shards hold 64x64"):
        to_batch(images, None, None, ["a", "b", "c"], torch.device("cpu"), 0, 48)


def test_a_label_outside_the_models_classes_is_refused_on_the_host():
    """The networks check labels on the CPU only (on the GPU a check would sync every step and
    break the compiled graph), so a batch is checked before it moves to the device."""
    from training.data import to_batch

    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    ok = to_batch(images, np.array([0, 9, -1]), None, ["a", "b", "c"], torch.device("cpu"), 10)
    assert ok["labels"].tolist() == [0, 9, -1]
    with pytest.raises(ValueError, match="label 10 of b is outside"):
        to_batch(images, np.array([0, 10, 1]), None, ["a", "b", "c"], torch.device("cpu"), 10)


def test_a_corpus_with_more_classes_than_the_model_is_refused_before_training(tmp_path):
    import json

    from training.data import ShardData

    write_shards(tmp_path / "shards", [4])
    (tmp_path / "shards" / "ingest.json").write_text(
        json.dumps({"classes": [f"c{i}" for i in range(6)]}))
    ok = debug_config(tmp_path, "data.source=shards", f"data.url={tmp_path / 'shards'}",
                      "data.num_classes=6")
    ShardData(ok, 0, 1, 4, torch.device("cpu"))
    few = debug_config(tmp_path, "data.source=shards", f"data.url={tmp_path / 'shards'}",
                       "data.num_classes=4")
    with pytest.raises(ValueError, match="has 6 classes .* set data.num_classes=6"):
        ShardData(few, 0, 1, 4, torch.device("cpu"))


def test_logged_sample_grids_are_enlarged_and_captioned():
    import numpy as np

    from training.tracking import readable

    grid = np.random.default_rng(0).integers(0, 255, (136, 136, 3), dtype=np.uint8)
    out = readable(grid, "samples, step 20")
    assert out.shape == (136 * 4 + 22, 136 * 4, 3)  # an integer factor: pixels stay pixels
    np.testing.assert_array_equal(out[22::4, ::4], grid)
    assert (out[:22] < 128).any()  # the caption is drawn
