"""The evaluate stage end to end on CPU with a debug model (local folder and MLflow run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from components.artifact import save_model
from components.model import GenerativeModel
from components.networks.registry import build_network, preset_kwargs
from components.schedules import CosineSchedule
from pipelines.evaluation.data import ImageSet
from pipelines.evaluation.evaluate import EvalConfig, run_evaluate
from pipelines.evaluation.feature_net import DEBUG_RECIPE, save_trained, train_feature_net
from prism_cli import app


def _model_dir(path, num_classes: int = 2):
    """A debug UNet bundle at 32x32 through the artifact contract (untrained weights)."""
    torch.manual_seed(0)
    kwargs = dict(preset_kwargs("unet-debug")[1], resolution=32, num_classes=num_classes)
    net = build_network("unet-debug", **kwargs)
    for p in net.parameters():
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    model = GenerativeModel(net=net, prediction="x0", n_cond=1, resolution=32, in_channels=3,
                            num_classes=num_classes, schedule=CosineSchedule(), family="unet",
                            net_kwargs=kwargs, schedule_name="cosine")
    return save_model(path, model)


def _real_npz(path, n: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    x[: n // 2, :, :, 0] //= 3  # two visibly different classes
    y = (np.arange(n) >= n // 2).astype(np.int64)
    np.savez(path, x=x, y=y)
    return path


def _feature_net(tmp_path, real):
    with np.load(real) as z:
        s = ImageSet(z["x"], z["y"], ["a", "b"], str(real))
    net, res = train_feature_net(s, s, DEBUG_RECIPE, "cpu", log=lambda *_: None)
    return save_trained(net, res, DEBUG_RECIPE, s, s, tmp_path / "fnet", log=lambda *_: None)


def test_eval_run_cli_end_to_end(tmp_path) -> None:
    model = _model_dir(tmp_path / "model")
    real = _real_npz(tmp_path / "real.npz")
    side = _feature_net(tmp_path, real)
    out = tmp_path / "eval"
    r = CliRunner().invoke(app, [
        "eval", "run", str(model), "--real", str(real), "--out", str(out), "--n", "12",
        "--steps", "2,3", "--feature-net", str(tmp_path / "fnet" / "feature_net.safetensors"),
        "--train-images", str(real), "--batch-size", "5", "--no-mlflow"])
    assert r.exit_code == 0, r.output
    top = json.loads((out / "metrics.json").read_text())
    assert top["standard_fid"]["available"] is False
    assert "not given" in top["standard_fid"]["reason"]
    rows = json.loads((out / "metrics_table.json").read_text())
    assert [(x["schedule"], x["steps"]) for x in rows] == [("model", 2), ("model", 3)]
    name = side["metric_name"]
    for row in rows:
        assert row["swd_x1e3"] > 0 and np.isfinite(row[name]) and row[name] > 0
        assert 0 <= row["precision"] <= 1 and 0 <= row["memorized"] <= 1
        assert "FID" not in row  # never a stand-in under the standard name
    md = (out / "metrics_table.md").read_text()
    assert md.startswith("| schedule | steps |") and name in md
    detail = json.loads((out / "model-2" / "metrics.json").read_text())
    assert detail["n_generated"] == 12
    assert len(detail["spectral"]["log_rapsd_per_frequency"]) == 16
    assert detail["fd_prism"]["network"]["sha256"] == side["sha256"]
    for f in ("samples.png", "rapsd.png"):
        assert (out / "model-3" / f).stat().st_size > 500
    # same seeds, same samples: a rerun reproduces the numbers exactly
    r2 = CliRunner().invoke(app, ["eval", "run", str(model), "--real", str(real), "--out",
                                  str(tmp_path / "eval2"), "--n", "12", "--steps", "2",
                                  "--batch-size", "5", "--no-mlflow"])
    assert r2.exit_code == 0, r2.output
    again = json.loads((tmp_path / "eval2" / "model-2" / "metrics.json").read_text())
    assert again["swd"]["mean"] == pytest.approx(detail["swd"]["mean"], rel=1e-9)
    assert again["spectral"]["log_rapsd_l1"] == pytest.approx(detail["spectral"]["log_rapsd_l1"])


@pytest.mark.parametrize("args,word", [
    (["--steps", "0"], "steps"),
    (["--schedules", "sid3"], "schedules"),
    (["--steps", "a,b"], "--steps"),
])
def test_eval_run_bad_input_is_a_clear_error(tmp_path, args, word) -> None:
    r = CliRunner().invoke(app, ["eval", "run", str(tmp_path), "--real", "x.npz",
                                 "--no-mlflow", *args])
    assert r.exit_code == 2 and word in r.output, r.output


def test_eval_run_rejects_wrong_resolution(tmp_path) -> None:
    model = _model_dir(tmp_path / "model")
    np.savez(tmp_path / "small.npz", x=np.zeros((4, 16, 16, 3), np.uint8))
    cfg = EvalConfig(model=str(model), real=str(tmp_path / "small.npz"), mlflow=False,
                     out_dir=str(tmp_path / "o"), n_images=2, steps=[1])
    with pytest.raises(ValueError, match="expected 32x32"):
        run_evaluate(cfg, log=lambda *_: None)


def test_eval_logs_to_the_models_mlflow_run(tmp_path, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = _model_dir(tmp_path / "model")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model), artifact_path="model")
    real = _real_npz(tmp_path / "real.npz")
    cfg = EvalConfig(model=f"runs:/{run.info.run_id}/model", real=str(real),
                     out_dir=str(tmp_path / "eval"), n_images=6, steps=[2])
    top = run_evaluate(cfg, log=lambda *_: None)
    assert top["mlflow_run_id"] == run.info.run_id
    got = mlflow.get_run(run.info.run_id).data.metrics
    assert got["eval/model-2/swd_x1e3"] == pytest.approx(top["settings"][0]["swd_x1e3"])
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "eval")}
    assert {"eval/metrics.json", "eval/metrics_table.md", "eval/model-2"} <= arts
