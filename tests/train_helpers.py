"""Helpers shared by the tests/training/test_train_*.py files (not a test module)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from common.run_config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "training" / "configs" / "debug.yaml"
QUIET = ["tracking.enabled=false", "sampling.num_images=0"]


def debug_config(out: Path, *sets: str) -> Config:
    """The shipped debug preset, writing under ``out``, MLflow and sample grids off."""
    return load_config(DEBUG, [f"run.output_dir={out}", *QUIET, *sets])


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def write_shards(root: Path, sizes: list[int], resolution: int = 16, seed: int = 0,
                 classes: int = 4) -> list[str]:
    """Uneven PNG shards through the data pipeline's writer; returns all keys."""
    from common.shards import ShardWriter, shard_name

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys = []
    for s, n in enumerate(sizes):
        w = ShardWriter(root / shard_name("test", s))
        for i in range(n):
            img = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            key = f"s{s:02d}-{i:04d}"
            w.write(key, "png", buf.getvalue(), int(rng.integers(classes)), {"key": key})
            keys.append(key)
        w.close()
    return keys

