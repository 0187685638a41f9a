"""Shared fixtures: where the shared data lives, and a real S3 server on loopback.

The tests are grouped by layer, one folder each: ``core/`` (the science core), ``data/``,
``training/``, ``evaluation/`` (evaluate, register, experiments), ``serving/``, ``e2e/`` (fresh
clones, Ray jobs, production MLflow, S3 end to end) and ``platform/`` (layers, manifests, CLI
help, benchmark smoke runs). Their helpers (``train_helpers``, ``infra_helpers``,
``e2e_clone``) and the golden records stay here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers, for every subfolder
SHARED_DATA = Path(os.environ.get("PRISM_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: many tiny ops oversubscribe OpenMP on a busy 2-core
    machine, and the training goldens were recorded with one thread. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only shared data folder; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set PRISM_SHARED_DATA)")
    return SHARED_DATA


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto_server) on 127.0.0.1, started and stopped here.

    Yields the endpoint URL and sets AWS_ENDPOINT_URL and dummy credentials, so that the
    project's boto3 code path talks to it exactly as it would to AWS.
    """
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe) if exe.exists() else "moto_server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start within 30 s")
    old = {k: os.environ.get(k) for k in
           ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the whole session (2 CPUs)."""
    ray = pytest.importorskip("ray")
    from common.ray_local import init_ray

    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
