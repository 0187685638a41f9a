"""A run resumed on another number of ranks: 1 process -> 2 (torchrun, gloo) -> 1. The shard
streams of a new layout are other streams, so they restart at the earliest unfinished epoch
(the loop says so); weights, optimizer and step carry over; the same layout resumes exactly
(tests/training/test_train_loop.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from train_helpers import DEBUG, QUIET, ROOT, debug_config, write_shards  # noqa: E402

from common.run_config import load_config  # noqa: E402
from training.data import ShardData  # noqa: E402
from training.launch import run_local  # noqa: E402
from training.streams import iter_stream, list_shard_urls  # noqa: E402


def _sets(out: Path, shards: Path, total: int) -> list[str]:
    return [f"run.output_dir={out}", *QUIET, "data.source=shards", f"data.url={shards}",
            "data.num_workers=0", "train.batch_size=8", f"train.total_images={total}",
            "train.log_every_images=8", "checkpoint.every_images=16", "run.name=ws"]


def _state(out: Path) -> dict:
    ckpts = sorted((out / "ws" / "checkpoints").glob("step-*"))
    return json.loads((ckpts[-1] / "state.json").read_text())


def test_a_run_resumes_on_two_ranks_and_back_on_one(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, [9, 7, 12, 5])
    out = tmp_path / "runs"
    run_local(load_config(DEBUG, _sets(out, shards, 16)))  # 2 steps on 1 rank
    assert _state(out)["world"] == 1
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    sets = [a for s in _sets(out, shards, 32) for a in ("--set", s)]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "prism_cli", "train", str(DEBUG), *sets],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "resumed at step 2" in two.stderr and "restart at epoch 0" in two.stderr
    state = _state(out)
    assert state["world"] == 2 and state["step"] == 4 and len(state["data"]) == 2
    back = run_local(load_config(DEBUG, _sets(out, shards, 48)))  # and back on one rank
    assert back["step"] == 6 and _state(out)["world"] == 1


def test_streams_of_a_new_layout_start_at_the_earliest_unfinished_epoch(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, [9, 7, 12, 5])
    urls = list_shard_urls(str(shards))
    cfg = debug_config(tmp_path, "data.source=shards", f"data.url={shards}",
                       "data.num_workers=0")
    saved = [{"kind": "shards", "world": 2, "workers": 1, "batches": 9,
              "streams": {str(r): [e, 1, 3]}} for r, e in ((0, 2), (1, 1))]
    one = ShardData(cfg, 0, 1, 4, torch.device("cpu"))
    note = one.load_state_dict(saved, 0)
    assert note and "restart at epoch 1" in note
    got = [k for b in (one.batch(0, 0), one.batch(1, 0)) for k in b["keys"]]
    fresh = iter_stream(urls, 0, 1, cfg.run.seed, [1, 0, 0], cfg.data.random_flip)
    assert got == [str(next(fresh)[0]["key"]) for _ in range(8)]
    same = ShardData(cfg, 1, 2, 4, torch.device("cpu"))
    assert same.load_state_dict(saved, 1) is None and same.streams == {1: [1, 1, 3]}
