"""Ingest to and spectra from a real S3-protocol server (moto_server on loopback)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from common import storage
from common.shards import iter_samples, list_shards
from pipelines.config import IngestConfig
from pipelines.data.ingest import ingest
from pipelines.data.schedule_model import fit_schedule_model
from pipelines.data.spectra_job import run_spectra

pytestmark = pytest.mark.s3


def _folder(root: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"k{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_ingest_to_s3_spectra_from_s3(s3_server: str, ray_local, tmp_path: Path) -> None:
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="prism-test")
    r = ingest(str(_folder(tmp_path / "src")), "s3://prism-test/corpus",
               IngestConfig(shard_size=10, gzip=True))
    assert r.written == 24
    shards = list_shards("s3://prism-test/corpus")
    assert [s.rsplit("/", 1)[1] for s in shards] == [f"shard-{i:06d}.tar.gz" for i in range(3)]
    assert storage.exists("s3://prism-test/corpus/manifest.parquet")
    assert sum(1 for _ in iter_samples(shards[2])) == 4
    again = ingest(str(tmp_path / "src"), "s3://prism-test/corpus",
                   IngestConfig(shard_size=10, gzip=True))
    assert again.skipped_shards == 3
    res = run_spectra("s3://prism-test/corpus", "s3://prism-test/stats", progress=False)
    assert res["images_now"] == 24
    summary = json.loads(storage.read_bytes("s3://prism-test/stats/summary.json"))
    assert summary["images"] == 24
    assert storage.exists("s3://prism-test/stats/rapsd.png")
    doc = fit_schedule_model("s3://prism-test/stats", "s3://prism-test/model/schedule.json")
    assert json.loads(storage.read_bytes("s3://prism-test/model/schedule.json")) == doc
    # credentials never reach the outputs
    written = storage.read_bytes("s3://prism-test/corpus/ingest.json").decode()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in written


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    t0 = time.perf_counter()
    with pytest.raises(storage.StorageError, match="unreachable"):
        ingest(str(_folder(tmp_path / "src", 2)), "s3://nowhere/x")
    assert time.perf_counter() - t0 < 20


def test_wrong_credentials_give_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second moto_server with authentication on: an unknown key id is refused."""
    import subprocess
    import sys

    port = _closed_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
        with pytest.raises(storage.StorageError, match="access denied|wrong credentials") as e:
            storage.check_access("s3://bucket/prefix")
        assert "wrong-secret-value" not in str(e.value)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
