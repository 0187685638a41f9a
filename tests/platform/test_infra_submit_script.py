"""infra/submit_train.sh refuses bad input before contacting any cluster, naming the problem
(the real submission is tested in test_infra_ray_job.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "submit_train.sh"


def _run(*args: str, address: str | None = "http://127.0.0.1:9", cwd: Path = ROOT):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if address:
        env["RAY_ADDRESS"] = address
    # RAY_BIN=false: should a case get past the checks, it "fails to submit" instead of hanging
    env["RAY_BIN"] = "false"
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize(("args", "address", "message"), [
    ((), "http://x:8265", "usage:"),
    (("training/configs/nope.yaml",), "http://x:8265", "config not found: training/configs/nope"),
    (("training/configs/debug.yaml", "two"), "http://x:8265", "WORKERS must be a positive"),
    (("training/configs/debug.yaml", "0"), "http://x:8265", "WORKERS must be a positive"),
    (("training/configs/debug.yaml", "2"), None, "set RAY_ADDRESS"),
])
def test_bad_input_is_named(args, address, message):
    out = _run(*args, address=address)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def test_config_outside_the_checkout_is_refused(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("run: {name: x}\n")
    out = _run(str(cfg), "2")
    assert out.returncode == 2 and "must lie inside the checkout" in out.stderr


def test_submission_is_assembled_from_a_relative_config(tmp_path):
    """From another directory, a config inside the checkout reaches the job relative to the
    checkout (the job's working directory); tracking variables travel, credentials do not.
    RAY_BIN is a recorder here: the real submission is test_infra_ray_job.py's."""
    record = tmp_path / "argv.json"
    fake = tmp_path / "ray"
    fake.write_text(f"#!/usr/bin/env python3\nimport json, sys\n"
                    f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    rel = os.path.relpath(ROOT / "training" / "configs" / "debug.yaml", tmp_path)
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:9", "RAY_BIN": str(fake),
           "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
           "AWS_SECRET_ACCESS_KEY": "do-not-ship", "PRISM_GPU": "1"}
    out = subprocess.run(["bash", str(SCRIPT), rel, "3", "--", "--set", "train.total_images=8"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    argv = json.loads(record.read_text())
    assert argv[:3] == ["job", "submit", "--address"] and argv[3] == "http://127.0.0.1:9"
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env["working_dir"] == "." and "/.venv" in runtime_env["excludes"]
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert "do-not-ship" not in json.dumps(argv)
    assert argv[argv.index("--") + 1:] == [
        "python", "-m", "prism_cli", "train", "training/configs/debug.yaml", "--ray",
        "--workers", "3", "--gpu", "--set", "train.total_images=8"]
