"""Helpers shared by the tests/e2e/test_infra_*.py files (not a test module): free ports,
waiting for a server, a real ``mlflow server`` on loopback, and stopping process groups we
started."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    """Poll ``url`` until it answers (any HTTP status); fail with the log's tail if ``proc``
    exits or the time runs out."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout_s:.0f} s: "
                       f"{log.read_text()[-3000:]}")


def start_group(cmd: list[str], log: Path, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session (so that :func:`stop_group` ends exactly its tree)."""
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            env=env, cwd=cwd, start_new_session=True)


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop ``proc`` (which we started with :func:`start_group`): SIGTERM to it, so that it
    shuts its children down itself, then SIGKILL to whatever is left of its process group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1: SQLite backend and proxied artifacts under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    log = root / "mlflow.log"
    proc = start_group(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, log, 120, "mlflow server")
    except RuntimeError:
        stop_group(proc)
        raise
    return proc, url


@contextlib.contextmanager
def mlflow_tracking(url: str) -> Iterator[None]:
    """Point this process's MLflow client at ``url`` and restore the previous setting after.

    ``mlflow.set_tracking_uri`` (called by the training loop's logger too) is process-global
    and also writes MLFLOW_TRACKING_URI; without the restore, a later test would talk to a
    server that is gone."""
    from mlflow.tracking._tracking_service import utils

    old_uri, old_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    utils.set_tracking_uri(url)
    try:
        yield
    finally:
        utils.set_tracking_uri(old_uri)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
