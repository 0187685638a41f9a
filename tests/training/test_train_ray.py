"""The same loop on Ray Train: DDP gradient averaging, and recovery from a killed worker."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from train_helpers import debug_config  # noqa: E402

from training.launch import run_local, run_ray  # noqa: E402

pytestmark = pytest.mark.ray





def test_two_ray_workers_average_gradients_like_one_worker(ray_local, tmp_path):
    """2 DDP workers x 4 images == 1 process with the same global batch of 8 (twice a
    worker's batch, as two micro-batches of 4: the noise of a micro-batch is seeded by its
    place in the global batch, so both runs see the same images and noise)."""
    sets = ["train.batch_size=8", "train.total_images=24", "checkpoint.every_images=24",
            "run.name=ddp"]
    ray_cfg = debug_config(tmp_path / "ray", *sets)
    result = run_ray(ray_cfg, workers=2, storage_path=str(tmp_path / "storage"))
    assert result["images_seen"] == 24 and result["step"] == 3
    one = debug_config(tmp_path / "one", *sets, "train.grad_accum=2")
    run_local(one)
    a = load_file(str(tmp_path / "ray" / "ddp" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "ddp" / "model" / "model.safetensors"))
    for k in a:
        # Adam normalises tiny gradients of zero-initialised layers: 1e-4 absorbs reduction order
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=k)
    ra = [json.loads(x)["loss"] for x in (tmp_path / "ray" / "ddp" / "metrics.jsonl")
          .read_text().splitlines()]
    rb = [json.loads(x)["loss"] for x in (tmp_path / "one" / "ddp" / "metrics.jsonl")
          .read_text().splitlines()]
    assert ra == pytest.approx(rb, abs=1e-5)


@pytest.mark.slow
def test_killed_worker_is_replaced_and_the_run_finishes(ray_local, tmp_path):
    cfg = debug_config(tmp_path, "run.name=fault", "train.total_images=480",
                       "checkpoint.every_images=32", "checkpoint.keep_last=2")
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(run_ray(
        cfg, workers=2, storage_path=str(tmp_path / "storage"), max_failures=2)))
    t.start()
    rank1 = tmp_path / "fault" / "workers" / "rank-1.json"
    ckpts = tmp_path / "storage" / "fault"
    deadline = time.time() + 300
    killed = None
    while time.time() < deadline and killed is None:
        time.sleep(0.5)
        snapshot = ckpts / "checkpoint_manager_snapshot.json"  # checkpoints Ray registered
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"] or {}
        except (OSError, ValueError):
            continue
        if rank1.is_file() and latest.get("metrics", {}).get("step", 0) >= 8:
            killed = json.loads(rank1.read_text())["pid"]
            os.kill(killed, signal.SIGKILL)
    assert killed is not None, "the run made no checkpoint to recover from"
    t.join(timeout=600)
    assert not t.is_alive()
    assert out["images_seen"] == 480 and out["step"] == 60
    restarted = json.loads(rank1.read_text())
    assert restarted["pid"] != killed and restarted["start_step"] >= 8
