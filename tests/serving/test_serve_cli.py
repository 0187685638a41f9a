"""``prism sample --local`` in-process, and ``prism serve --detach`` / ``sample --url`` /
``serve --stop`` end to end (slow: starts its own Ray and Serve)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from components.artifact import save_model
from components.model import GenerativeModel
from components.networks.registry import build_network, preset_kwargs
from components.schedules import CosineSchedule
from prism_cli import app

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


def _model_dir(path: Path) -> Path:
    torch.manual_seed(0)
    net = build_network("unet-debug", num_classes=4)
    for p in net.parameters():
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    model = GenerativeModel(net=net, prediction="x0", n_cond=1, resolution=16, in_channels=3,
                            num_classes=4, schedule=CosineSchedule(), family="unet",
                            net_kwargs=dict(preset_kwargs("unet-debug")[1], num_classes=4),
                            schedule_name="cosine")
    return save_model(path, model)


def test_sample_local_writes_pngs(tmp_path):
    model = _model_dir(tmp_path / "model")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["sample", "--local", "--model", str(model), "--n", "2",
                                 "--seed", "5", "--steps", "3", "--class-label", "1",
                                 "--resolution", "32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    pngs = sorted(out.glob("seed_*.png"))
    assert [p.name for p in pngs] == ["seed_5.png", "seed_6.png"]
    assert np.asarray(Image.open(pngs[0])).shape == (32, 32, 3)
    assert json.loads((out / "meta.json").read_text())["seeds"] == [5, 6]


@pytest.mark.parametrize("args,word", [
    (["--local"], "--model"),
    (["--local", "--model", "/nonexistent/model"], "does not exist"),
    (["--local", "--model", "MODEL", "--steps", "-2"], "steps"),
    (["--url", "http://127.0.0.1:9"], "cannot reach"),
])
def test_sample_bad_input_is_a_clear_error(tmp_path, args, word):
    args = [str(_model_dir(tmp_path / "m")) if a == "MODEL" else a for a in args]
    r = CliRunner().invoke(app, ["sample", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and word in r.output, r.output


CLI = [sys.executable, "-m", "prism_cli"]


# Ray's lines at a service's start and stop that say nothing is wrong (serving/launch.py,
# serving/serve_logs.py)
BENIGN_NOISE = ("ServeController.graceful_shutdown failed",
                "Cannot deregister autoscaling state")


@contextlib.contextmanager
def _detached(tmp_path: Path, *flags: str):
    """``prism serve --detach`` on a free port with the debug model; yields (url, port) and
    checks that ``prism serve --stop`` stops it, and that the service's output (its log) went
    on to the end of Serve's shutdown without Ray's benign start and stop warnings."""
    model = _model_dir(tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pidfile = tmp_path / "serve.pid"
    started = subprocess.run([*CLI, "serve", "--model", str(model), "--port", str(port), *flags,
                              "--detach", "--pidfile", str(pidfile)], cwd=ROOT,
                             capture_output=True, text=True, timeout=400)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        url = json.loads(started.stdout.strip().splitlines()[-1])["url"]
        assert url == f"http://127.0.0.1:{port}"
        yield url, port
    finally:
        stopped = subprocess.run([*CLI, "serve", "--stop", "--pidfile", str(pidfile)], cwd=ROOT,
                                 capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0 and not pidfile.exists(), stopped.stdout + stopped.stderr
    log = pidfile.with_suffix(".log").read_text(errors="replace")
    assert "stopping" in log, log[-3000:]
    if "Log to stderr disabled" not in log:  # Serve's logs reach it (not in throughput mode)
        assert "is stopped." in log.split("stopping", 1)[1], log[-3000:]  # its stop was logged
    assert not [n for n in BENIGN_NOISE if n in log], log[-3000:]


@pytest.mark.slow
def test_serve_detach_sample_stop(tmp_path):
    with _detached(tmp_path) as (url, _):
        out = tmp_path / "out"
        got = subprocess.run([*CLI, "sample", "--url", url, "--n", "3", "--seed", "1",
                              "--steps", "3", "--out", str(out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert got.returncode == 0, got.stdout + got.stderr
        assert len(list(out.glob("seed_*.png"))) == 3


def _listener_pids(port: int) -> set[int]:
    """The processes holding a listening TCP socket on ``port`` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":  # 0A: LISTEN
                inodes.add(f[9])
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            for fd in (proc / "fd").iterdir():
                if fd.readlink().name.removeprefix("socket:[").rstrip("]") in inodes:
                    pids.add(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_serve_direct_ingress_replicas_share_the_port_without_the_proxy(tmp_path):
    """``prism serve --direct-ingress --ingress-replicas 2``: both Ingress replicas listen on
    the port themselves (no proxy process does), answer, batch concurrent requests across
    replicas into one device call, name a bad field, and stop cleanly."""
    import requests

    with _detached(tmp_path, "--direct-ingress", "--ingress-replicas", "2") as (url, port):
        pids = _listener_pids(port)
        owners = [Path(f"/proc/{p}/cmdline").read_bytes() for p in pids]
        assert len(pids) == 2 and all(b"ServeReplica:prism:Ingress" in o for o in owners), owners
        with ThreadPoolExecutor(16) as pool:
            res = list(pool.map(lambda s: requests.post(
                f"{url}/v1/generate", json={"seeds": [s], "steps": 3}, timeout=120), range(16)))
        assert all(r.status_code == 200 for r in res), [r.text for r in res]
        assert max(r.json()["batch_images"] for r in res) > 1
        bad = requests.post(f"{url}/v1/generate", json={"steps": -1}, timeout=30)
        assert bad.status_code == 422 and bad.json()["fields"] == ["steps"]
        assert requests.get(f"{url}/docs", timeout=30).status_code == 200
        again = subprocess.run([*CLI, "serve", "--model", str(tmp_path / "model"), "--port",
                                str(port), "--direct-ingress", "--detach", "--pidfile",
                                str(tmp_path / "again.pid")], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
        assert again.returncode == 2 and "already in use" in again.stderr, again.stderr
    assert not _listener_pids(port)  # every replica let the port go


@pytest.mark.slow  # about 30 s: Serve retries the failing replica before it gives up
def test_serve_detach_with_a_model_that_fails_to_load_says_why(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pidfile = tmp_path / "serve.pid"
    started = subprocess.run([*CLI, "serve", "--model", str(tmp_path / "nothing"), "--port",
                              str(port), "--detach", "--pidfile", str(pidfile)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert started.returncode == 2, started.stdout + started.stderr
    assert "failed to load" in started.stderr and "does not exist" in started.stderr
    assert "error: error" not in started.stderr and not pidfile.exists()
    assert not _listener_pids(port)
