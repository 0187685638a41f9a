"""The pipeline with `s3://` paths end to end against a real S3-protocol server (moto_server on
loopback), through the CLI as users run it: demo corpus -> ingest to s3:// -> spectra s3:// to
s3:// -> schedule model on s3:// -> a per-image-schedule training on Ray Train streaming its
shards and spectral statistics from s3:// with its checkpoints on s3:// -> a model that loads
and samples. And a DVC remote on the same S3 server: push and pull a tracked file."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch
from safetensors.torch import load, load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from infra_helpers import ROOT  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.s3]
BIN = Path(sys.executable).parent
BUCKET = "prism-e2e"


def _prism(*args: str, timeout_s: float = 240) -> str:
    """Run ``prism ARGS`` with the S3 settings of the environment (the s3_server fixture's)."""
    out = subprocess.run([str(BIN / "prism"), *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout_s, env={**os.environ, "MPLBACKEND": "Agg"})
    assert out.returncode == 0, f"prism {' '.join(args)}:\n{(out.stdout + out.stderr)[-4000:]}"
    return out.stdout


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_pipeline_on_s3_end_to_end(s3_server: str, tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=BUCKET)
    url = f"s3://{BUCKET}"

    # data: demo corpus (local images) -> shards, spectra, schedule model, all on S3
    _prism("data", "demo", str(tmp_path / "demo"), "--size", "16", "--per-class", "8")
    _prism("data", "ingest", str(tmp_path / "demo"), f"{url}/shards", "--size", "16",
           "--shard-size", "24")
    shards = [k for k in _keys(s3, "shards/") if k.endswith(".tar")]
    assert len(shards) == 3  # 64 images in shards of 24
    _prism("data", "spectra", f"{url}/shards", f"{url}/stats")
    summary = json.loads(s3.get_object(Bucket=BUCKET, Key="stats/summary.json")["Body"].read())
    assert summary["images"] == 64
    _prism("data", "schedules", f"{url}/stats", f"{url}/schedule.json")
    schedule = s3.get_object(Bucket=BUCKET, Key="schedule.json")["Body"].read()
    # training reads sampling.schedule_model from a local path (training/sampling.py)
    (tmp_path / "schedule.json").write_bytes(schedule)

    # training: shards and spectral statistics streamed from S3, Ray Train checkpoints to S3
    cfg = {
        "run": {"name": "e2e-s3", "output_dir": str(tmp_path / "runs")},
        "data": {"source": "shards", "url": f"{url}/shards", "resolution": 16,
                 "num_classes": 8, "spectral_stats": f"{url}/stats"},
        "model": {"preset": "unet-debug"},
        "objective": {"per_instance": "mixed", "label_dropout": 0.1},
        "optim": {"lr": 1e-3, "warmup_images": 16},
        "train": {"total_images": 96, "batch_size": 8, "log_every_images": 8},
        "checkpoint": {"every_images": 48, "keep_last": 2},
        "sampling": {"num_images": 4, "steps": 4,
                     "schedule_model": str(tmp_path / "schedule.json")},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "train.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    out = _prism("train", str(tmp_path / "train.yaml"), "--ray", "--workers", "1",
                 "--storage", f"{url}/ray", timeout_s=300)
    lines = out.splitlines()  # the CLI's last output is the result as indented JSON
    result = json.loads("\n".join(lines[max(i for i, x in enumerate(lines) if x == "{"):]))
    assert result["step"] == 12 and result["images_seen"] == 96

    # the checkpoints are on S3 (the last keep_last=2 of them), complete
    ckpt_files = [k for k in _keys(s3, "ray/e2e-s3/checkpoint_") if k.count("/") == 3]
    ckpts = sorted({k.split("/")[2] for k in ckpt_files})
    assert len(ckpts) == 2, ckpt_files
    for c in ckpts:
        names = {k.rsplit("/", 1)[1] for k in ckpt_files if k.split("/")[2] == c}
        assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors",
                "state.json"} <= names
    last = max(ckpts, key=lambda c: json.loads(s3.get_object(
        Bucket=BUCKET, Key=f"ray/e2e-s3/{c}/state.json")["Body"].read())["step"])
    assert result["checkpoint"].endswith(last)
    state = json.loads(s3.get_object(Bucket=BUCKET, Key=f"ray/e2e-s3/{last}/state.json")
                       ["Body"].read())
    assert state["step"] == 12
    ema = load(s3.get_object(Bucket=BUCKET, Key=f"ray/e2e-s3/{last}/ema.safetensors")
               ["Body"].read())

    # the exported model is the last checkpoint's EMA, loads, and samples with its schedules
    from common.models import load_model
    from components.generate import generate

    model_dir = Path(result["model_dir"])
    exported = load_file(str(model_dir / "model.safetensors"))
    assert set(exported) == set(ema)
    for k, v in exported.items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=0, msg=k)
    model = load_model(model_dir)
    assert model.spectral is not None and model.num_classes == 8
    images = generate(model, seeds=[0, 1], steps=4, class_labels=[0, 1], schedule="spectral")
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def _dvc(repo: Path, *args: str) -> str:
    """``dvc ARGS`` in ``repo`` with no S3 endpoint in the environment: the remote's
    ``endpointurl`` is what points it at the server."""
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL",
                                                            "AWS_ENDPOINT_URL_S3")}
    out = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, f"dvc {' '.join(args)}:\n{(out.stdout + out.stderr)[-3000:]}"
    return out.stdout


def test_dvc_remote_on_s3_push_and_pull(s3_server: str, tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="prism-dvc")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    payload = os.urandom(4096)
    (repo / "data.bin").write_bytes(payload)
    _dvc(repo, "add", "-q", "data.bin")
    _dvc(repo, "remote", "add", "-d", "store", "s3://prism-dvc/dvcstore")
    _dvc(repo, "remote", "modify", "store", "endpointurl", s3_server)
    _dvc(repo, "push")
    pushed = [o["Key"] for o in s3.list_objects_v2(Bucket="prism-dvc")["Contents"]]
    md5 = next(line.split(":")[1].strip() for line in (repo / "data.bin.dvc").read_text()
               .splitlines() if line.strip().startswith("- md5:"))
    assert pushed == [f"dvcstore/files/md5/{md5[:2]}/{md5[2:]}"]
    body = s3.get_object(Bucket="prism-dvc", Key=pushed[0])["Body"]
    assert io.BytesIO(body.read()).getvalue() == payload
    # a fresh checkout: no cache, no file; pull brings it back from S3
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "data.bin").unlink()
    _dvc(repo, "pull")
    assert (repo / "data.bin").read_bytes() == payload
