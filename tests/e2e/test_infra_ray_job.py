"""infra/submit_train.sh against a real Ray cluster: `ray start --head` (own ports, own temp
dir, dashboard + Jobs API on loopback, token authentication on), a real `mlflow server`, the
debug preset submitted as a Ray job on 2 Ray Train workers; the run and its registered model
land in MLflow, and the uploaded working directory holds the code and nothing heavy.

The cluster is stopped by signalling the `ray start --block` process group this test started
(not `ray stop`, which would stop every Ray instance on the machine, other users' included).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from infra_helpers import (  # noqa: E402
    ROOT,
    free_ports,
    mlflow_tracking,
    start_group,
    start_mlflow_server,
    stop_group,
)

BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _cluster_env(token: str) -> dict[str, str]:
    """An activated environment (jobs run `python` from PATH, as on the cluster image) with
    token authentication and no inherited Ray address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # stop at once on SIGTERM
    return env


@pytest.fixture()
def ray_head():
    """A one-node Ray cluster with the dashboard (Jobs API) on a free loopback port."""
    token = secrets.token_hex(32)
    gcs, dash, client, nm, om, agent, agent_grpc, rt_env, metrics = free_ports(9)
    # a short temp dir: Ray's Unix sockets live under it (path length limit ~107)
    temp_dir = Path(tempfile.mkdtemp(prefix="prj", dir="/tmp"))
    log = temp_dir / "ray-start.log"
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--num-cpus", "2", "--num-gpus", "0",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
           "--node-manager-port", str(nm), "--object-manager-port", str(om),
           "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(rt_env), "--metrics-export-port", str(metrics),
           "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    env = _cluster_env(token)
    proc = start_group(cmd, log, env=env, cwd=temp_dir)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray start failed: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        # the Jobs API answers (401 without the token: authentication is really on)
        assert requests.get(f"{address}/api/jobs/", timeout=10).status_code == 401
        yield {"address": address, "env": env, "temp_dir": temp_dir}
    finally:
        stop_group(proc, grace_s=30)


def _job_package(temp_dir: Path) -> Path:
    """The working directory the Jobs API unpacked on the node."""
    files = temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
    pkgs = [p for p in files.glob("_ray_pkg_*") if p.is_dir()]
    assert len(pkgs) == 1, pkgs
    return pkgs[0]


def test_submit_train_runs_on_the_cluster_and_registers(ray_head, tmp_path):
    import mlflow

    mlflow_proc, mlflow_url = start_mlflow_server(tmp_path / "mlflow")
    try:
        env = {**ray_head["env"], "RAY_ADDRESS": ray_head["address"],
               "MLFLOW_TRACKING_URI": mlflow_url}
        t0 = time.time()
        out = subprocess.run(
            ["bash", "infra/submit_train.sh", "training/configs/debug.yaml", "2", "--",
             "--set", "run.name=rayjob", "--set", "sampling.num_images=0"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-4000:]
        assert "succeeded" in log, log[-4000:]
        print(f"job took {time.time() - t0:.0f} s")

        # the upload: the code, nothing heavy or machine-local
        pkg = _job_package(ray_head["temp_dir"])
        assert (pkg / "prism_cli.py").is_file() and (pkg / "training" / "loop.py").is_file()
        for heavy in (".venv", ".git", "mlruns", ".whl", ".whlray", ".gpudata"):
            assert not (pkg / heavy).exists(), f"{heavy} was uploaded with the job"
        code_files = [p for p in pkg.rglob("*") if p.is_file() and "runs" not in p.parts]
        assert sum(p.stat().st_size for p in code_files) < 20 * 2**20

        # the run and its registered model in MLflow
        client = mlflow.MlflowClient(mlflow_url)
        exp = client.get_experiment_by_name("prism")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1
        run = runs[0]
        assert run.info.status == "FINISHED" and run.data.tags["prism.run_name"] == "rayjob"
        assert run.data.params["train.total_images"] == "160"
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 20
        mv = client.get_model_version_by_alias("prism-rayjob", "candidate")
        assert mv.run_id == run.info.run_id

        # the registered weights are the ones the job's rank 0 exported
        from common.models import load_model

        with mlflow_tracking(mlflow_url):
            model = load_model("models:/prism-rayjob@candidate")
        trained = load_file(str(pkg / "runs" / "rayjob" / "model" / "model.safetensors"))
        state = model.net.state_dict()
        assert set(state) == set(trained)
        for k, v in trained.items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    finally:
        stop_group(mlflow_proc)
