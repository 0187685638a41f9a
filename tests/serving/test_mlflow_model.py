"""A registered prism model is an MLflow Model: ``mlflow.pyfunc.load_model`` on it returns
images, the same as ``prism sample --local``; nothing is pickled; prism's own loader reads it.
Against a real SQLite tracking store and registry (the production server: the slow
``test_infra_mlflow_prod``)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from infra_helpers import free_ports, mlflow_tracking, start_group, stop_group, wait_http  # noqa: E402
from test_serve_app import debug_model_dir  # noqa: E402

from common.models import load_model  # noqa: E402
from common.registry import register_model  # noqa: E402
from prism_cli import app  # noqa: E402

NAME = "prism-pyfunc-test"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    model_dir = debug_model_dir(root / "model", num_classes=4, seed=3)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with mlflow_tracking(uri):
        mlflow.set_experiment("pyfunc")
        with mlflow.start_run() as run:
            version = register_model(NAME, "candidate", run.info.run_id, model_dir)
        mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", version)
        yield {"uri": uri, "model_dir": model_dir, "run_id": run.info.run_id,
               "version": version, "root": root}


def test_the_registered_version_is_an_mlflow_model_without_pickles(registered, tmp_path):
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion",
                                                     dst_path=str(tmp_path)))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "pyfunc_entry.py", "artifacts/prism/model.safetensors",
            "artifacts/prism/config.json", "artifacts/prism/schedule.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert "python_function" in info.flavors
    assert info.flavors["python_function"].get("model_code_path")  # models-from-code
    sig = info.signature
    assert [c.name for c in sig.inputs.inputs] == ["seed", "class_label"]
    assert {p.name for p in sig.params.params} >= {"steps", "sampler", "cfg_scale",
                                                   "resolution", "schedule"}
    assert (local / "input_example.json").is_file()


def test_pyfunc_predict_returns_the_images_of_prism_sample_local(registered, tmp_path):
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    rows = pd.DataFrame({"seed": [3, 4, 5], "class_label": [0, 2, 2]})
    images = model.predict(rows, params={"steps": 4})
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    # every input matters: another seed, another class, more steps give other images
    assert not np.array_equal(images[1], images[2])
    other = model.predict(pd.DataFrame({"seed": [3], "class_label": [1]}), params={"steps": 4})
    assert not np.array_equal(other[0], images[0])
    longer = model.predict(rows.iloc[:1], params={"steps": 8})
    assert not np.array_equal(longer[0], images[0])
    doubled = model.predict(rows.iloc[:1], params={"steps": 4, "resolution": 32})
    assert doubled.shape == (1, 32, 32, 3)
    r = CliRunner().invoke(app, ["sample", "--local", "--model", f"models:/{NAME}@champion",
                                 "--n", "3", "--seed", "3", "--steps", "4",
                                 "--class-label", "0,2,2", "--out", str(tmp_path / "png")])
    assert r.exit_code == 0, r.output
    for i, seed in enumerate((3, 4, 5)):
        png = np.asarray(Image.open(io.BytesIO((tmp_path / "png" / f"seed_{seed}.png")
                                               .read_bytes())))
        np.testing.assert_array_equal(png, images[i])


def test_bad_predict_input_is_refused_by_name(registered):
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    with pytest.raises(Exception, match="class_labels"):
        model.predict(pd.DataFrame({"seed": [0], "class_label": [9]}), params={"steps": 2})
    with pytest.raises(Exception, match="sampler"):
        model.predict(pd.DataFrame({"seed": [0], "class_label": [0]}),
                      params={"steps": 2, "sampler": "euler"})


def test_prisms_loader_reads_the_mlflow_model_with_the_trained_weights(registered):
    from safetensors.torch import load_file

    model = load_model(f"models:/{NAME}@champion")
    local = load_file(str(registered["model_dir"] / "model.safetensors"))
    for k, v in model.net.state_dict().items():
        torch.testing.assert_close(v, local[k], atol=0, rtol=0)
    assert load_model(f"runs:/{registered['run_id']}/model").num_classes == 4


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_same_images(registered, tmp_path):
    """MLflow's own REST server (``mlflow models serve``, the environment as it is) on the
    registered version answers /invocations with the images of ``predict``."""
    import os

    import mlflow.pyfunc
    import requests

    [port] = free_ports(1)
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
               MLFLOW_TRACKING_URI=registered["uri"])
    log = tmp_path / "serve.log"
    proc = start_group([str(Path(bindir) / "mlflow"), "models", "serve", "-m",
                        f"models:/{NAME}@champion", "--env-manager", "local",
                        "-h", "127.0.0.1", "-p", str(port)], log, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log, 120, "mlflow models serve")
        r = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=120, json={
            "dataframe_split": {"columns": ["seed", "class_label"], "data": [[3, 0], [4, 2]]},
            "params": {"steps": 4}})
        assert r.status_code == 200, r.text[:500]
        served = np.asarray(r.json()["predictions"], dtype=np.uint8)
    finally:
        stop_group(proc)
    want = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(
        pd.DataFrame({"seed": [3, 4], "class_label": [0, 2]}), params={"steps": 4})
    np.testing.assert_array_equal(served, want)


def test_building_the_mlflow_model_draws_no_progress_bar(registered, tmp_path, capfd):
    """MLflow's artifact progress bars are carriage-return noise in a training log."""
    from common.pyfunc import save_mlflow_model

    save_mlflow_model(registered["model_dir"], tmp_path / "mlmodel")
    out, err = capfd.readouterr()
    assert "Downloading artifacts" not in out + err
    assert (tmp_path / "mlmodel" / "MLmodel").is_file()


def test_loading_from_the_registry_draws_no_progress_bar_off_a_terminal(registered, capfd):
    """A service replica loads its model with stderr in a log file: no carriage-return bar."""
    from common.models import load_model

    with mlflow_tracking(registered["uri"]):
        model = load_model(f"models:/{NAME}@champion")
    out, err = capfd.readouterr()
    assert "Downloading artifacts" not in out + err
    assert model.num_classes == 4
