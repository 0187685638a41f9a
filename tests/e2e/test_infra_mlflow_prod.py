"""The production-shaped MLflow stack (infra/mlflow/stack.py): PostgreSQL (Debian's package) as
the backend store, S3 (moto_server) as the artifact store, `mlflow server` proxying artifacts.
A real training run of the debug preset logs to it and registers its model; the registry
alias loads the same weights; the rows are in PostgreSQL and the files in the bucket."""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from infra_helpers import ROOT, mlflow_tracking  # noqa: E402

pytestmark = pytest.mark.slow
STACK = ROOT / "infra" / "mlflow" / "stack.py"


def _has_postgres() -> bool:
    return bool(shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


@pytest.fixture()
def stack():
    """`stack.py up` in a fresh directory under /tmp (PostgreSQL's user must reach it);
    `stack.py down` after."""
    if not _has_postgres():
        pytest.skip("PostgreSQL's binaries (initdb, pg_ctl) are absent: "
                    "apt-get install -y postgresql (.ci/run does it)")
    pytest.importorskip("psycopg2", reason="psycopg2 is missing: pip install -e '.[prod]'")
    root = Path(tempfile.mkdtemp(prefix="prism-mlflow-", dir="/tmp"))
    try:
        up = subprocess.run([sys.executable, str(STACK), "up", "--dir", str(root)],
                            capture_output=True, text=True, timeout=240)
        assert up.returncode == 0, up.stderr[-3000:]
        info = json.loads((root / "stack.json").read_text())
        exports = dict(line.removeprefix("export ").split("=", 1)
                       for line in up.stdout.strip().splitlines())
        assert exports["MLFLOW_TRACKING_URI"] == info["MLFLOW_TRACKING_URI"]
        assert exports["MLFLOW_TRACKING_PASSWORD"] not in (root / "stack.json").read_text()
        assert (root / "credentials.env").stat().st_mode & 0o077 == 0
        yield {**info, **exports}
    finally:
        subprocess.run([sys.executable, str(STACK), "down", "--dir", str(root)], timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_the_server_refuses_requests_without_its_credentials(stack):
    import requests

    url = f"{stack['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search"
    body = {"max_results": 10}
    assert requests.get(f"{stack['MLFLOW_TRACKING_URI']}/health", timeout=10).ok
    assert requests.post(url, json=body, timeout=10).status_code == 401
    wrong = (stack["MLFLOW_TRACKING_USERNAME"], "not-the-password")
    assert requests.post(url, json=body, auth=wrong, timeout=10).status_code == 401
    right = (stack["MLFLOW_TRACKING_USERNAME"], stack["MLFLOW_TRACKING_PASSWORD"])
    assert requests.post(url, json=body, auth=right, timeout=10).status_code == 200


def test_training_run_logs_and_registers_in_postgres_and_s3(stack, tmp_path, monkeypatch):
    import boto3
    import mlflow
    import psycopg2

    from common.models import load_model
    from common.run_config import load_config
    from training.launch import run_local

    url = stack["MLFLOW_TRACKING_URI"]
    assert stack["backend_store_uri"].startswith("postgresql+psycopg2://")
    # the client has no S3 settings at all: the server proxies the artifacts
    for k in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(k, raising=False)
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # the server's users
        monkeypatch.setenv(k, stack[k])
    with mlflow_tracking(url):  # through MLFLOW_TRACKING_URI, as a user would
        cfg = load_config(ROOT / "training" / "configs" / "debug.yaml",
                          [f"run.output_dir={tmp_path}", "run.name=prod", "sampling.num_images=4"])
        assert cfg.tracking.uri is None
        run_local(cfg)
        # the registry alias gives back exactly the exported EMA weights
        model = load_model("models:/prism-prod@candidate")

    client = mlflow.MlflowClient(url)
    mv = client.get_model_version_by_alias("prism-prod", "candidate")
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 20
    local = load_file(str(tmp_path / "prod" / "model" / "model.safetensors"))
    state = model.net.state_dict()
    assert set(state) == set(local)
    for k, v in local.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)

    # the backend store really is PostgreSQL
    conn = psycopg2.connect(host="127.0.0.1", port=stack["pg_port"], user="mlflow",
                            dbname="mlflow")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
            assert cur.fetchone() == ("FINISHED",)
            cur.execute("SELECT name FROM registered_models")
            assert ("prism-prod",) in cur.fetchall()
    finally:
        conn.close()

    # the artifacts really are in the bucket, byte for byte
    s3 = boto3.client("s3", endpoint_url=stack["s3_endpoint"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack["bucket"],
                                                 Prefix="mlflow/")["Contents"]]
    ours = [k for k in keys if f"/{run.info.run_id}/artifacts/" in k]
    names = {k.rsplit("/", 1)[1] for k in ours}
    assert {"model.safetensors", "config.json", "schedule.json", "MLmodel"} <= names, keys
    assert any(k.endswith(".png") and "/samples/" in k for k in ours), keys
    weights_key = next(k for k in ours if k.endswith("model/artifacts/prism/model.safetensors"))
    body = s3.get_object(Bucket=stack["bucket"], Key=weights_key)["Body"].read()
    assert body == (tmp_path / "prod" / "model" / "model.safetensors").read_bytes()
