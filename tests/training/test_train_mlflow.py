"""Tracking against a real ``mlflow server`` on loopback (SQLite backend, artifacts in tmp)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from train_helpers import DEBUG  # noqa: E402, F401

from common.models import load_model  # noqa: E402
from common.run_config import load_config  # noqa: E402
from training.launch import run_local  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` as a separate process on 127.0.0.1, stopped after the module."""
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(exe), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                break
        except requests.RequestException:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.mark.slow
def test_run_is_tracked_registered_and_loadable(tmp_path, mlflow_server, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = load_config(DEBUG, [f"run.output_dir={tmp_path}", "run.name=tracked",
                              "run.project=prism-test", "train.total_images=32",
                              "sampling.num_images=4", "sampling.steps=4",
                              "sampling.every_images=16", "data.version=demo-v1"])
    result = run_local(cfg)
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("prism-test")
    [run] = client.search_runs([exp.experiment_id], "tags.`prism.run_name` = 'tracked'")
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001"
    assert run.data.params["model.preset"] == "unet-debug"
    assert run.data.tags["data_version"] == "demo-v1" and len(run.data.tags["git_commit"]) >= 7
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    for key in ("lr", "images_per_second", "grad_norm", "memory_gib"):
        assert client.get_metric_history(run.info.run_id, key)
    samples = [f.path for f in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == ["samples/samples-00000002.png", "samples/samples-00000004.png"]
    # an MLflow Model over the prism model directory (common/pyfunc.py)
    model_files = {f.path for f in client.list_artifacts(run.info.run_id, "model/artifacts/prism")}
    assert model_files == {f"model/artifacts/prism/{f}" for f in (
        "model.safetensors", "config.json", "schedule.json", "progress.json")}
    assert "model/MLmodel" in {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    mv = client.get_model_version_by_alias("prism-test-tracked", "candidate")
    assert mv.run_id == run.info.run_id
    # the registered model loads back with the same weights
    model = load_model("models:/prism-test-tracked@candidate")
    local = load_file(str(Path(result["model_dir"]) / "model.safetensors"))
    for k, v in model.net.state_dict().items():
        torch.testing.assert_close(v, local[k], atol=0, rtol=0)


@pytest.mark.slow
def test_rerun_and_extension_continue_one_run_and_version_only_new_weights(
        tmp_path, mlflow_server, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    base = [f"run.output_dir={tmp_path}", "run.name=again", "run.project=prism-rerun",
            "sampling.num_images=0"]
    run_local(load_config(DEBUG, [*base, "train.total_images=32"]))
    run_local(load_config(DEBUG, [*base, "train.total_images=32"]))  # nothing left to train
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("prism-rerun")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "a re-run opened a second MLflow run"
    versions = client.search_model_versions("name = 'prism-rerun-again'")
    assert [v.version for v in versions] == ["1"], "identical weights were registered again"
    run_local(load_config(DEBUG, [*base, "train.total_images=64"]))  # extended: new weights
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    versions = sorted(v.version for v in client.search_model_versions(
        "name = 'prism-rerun-again'"))
    assert versions == ["1", "2"]
    assert client.get_model_version_by_alias("prism-rerun-again", "candidate").version == "2"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert steps == list(range(1, 9)), "the loss curve is split or repeated across runs"


@pytest.mark.slow
def test_run_carries_its_dataset_and_the_experiment_opens_on_runs(
        tmp_path, mlflow_server, monkeypatch):
    import mlflow
    from train_helpers import write_shards

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    write_shards(tmp_path / "shards", [12, 12], resolution=16)
    run_local(load_config(DEBUG, [
        f"run.output_dir={tmp_path}", "run.name=withdata", "run.project=prism-data",
        "data.source=shards", f"data.url={tmp_path / 'shards'}", "data.version=v7",
        "train.total_images=16", "sampling.num_images=0"]))
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("prism-data")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    [run] = client.search_runs([exp.experiment_id])
    [inp] = run.inputs.dataset_inputs
    assert inp.dataset.name == "v7"
    assert str(tmp_path / "shards") in inp.dataset.source
    assert [t.value for t in inp.tags if t.key == "mlflow.data.context"] == ["training"]
