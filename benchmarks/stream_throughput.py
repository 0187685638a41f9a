"""Throughput of the training shard stream on CPU: this tree's against a git revision's.

Both arms run in one process, alternating (ABBA), with the same shards, loader workers and
micro-batch, the way :class:`training.data.ShardData` reads them: samples per second from
creating the DataLoader (workers start, each opens its first shard) to the last of
``--samples`` samples, and the longest wait for one batch. The baseline arm is
``training/streams.py`` and ``common/shards.py`` (the shard reader) as they were at
``--against``.

Usage::

    python -m prism_cli data ingest ../shared/data/cifar10/train.tar /tmp/wds-c10 \\
        --size 32 --shard-size 10000 --gzip
    python benchmarks/stream_throughput.py /tmp/wds-c10 --against HEAD~1 \\
        [--samples 20000] [--workers 2] [--batch 100] [--repeats 6]
    python benchmarks/stream_throughput.py --smoke --against HEAD~1   # made-up shards

Results: ``$OUT/stream_throughput.json`` (default ./outputs/bench), a line per arm last.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common.shards  # noqa: E402
import training.streams  # noqa: E402
from common.shards import ShardWriter, shard_name  # noqa: E402


def _module_at(rev: str, path: str, name: str) -> ModuleType:
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    file = Path(tempfile.mkdtemp(prefix="prism-bench-")) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module  # loader workers unpickle its classes
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def streams_at(rev: str) -> ModuleType:
    """``training/streams.py`` as it was at git revision ``rev``, with the shard reader
    (``common/shards.py``) of that revision, imported under other names."""
    shards = _module_at(rev, "common/shards.py", "shards_at_rev")
    sys.modules["common.shards"] = shards  # what the old streams module binds on import
    try:
        return _module_at(rev, "training/streams.py", "streams_at_rev")
    finally:
        sys.modules["common.shards"] = common.shards


def smoke_shards(root: Path, shards: int = 4, per_shard: int = 1500) -> str:
    """Made-up gzip shards of 32x32 JPEGs, as ingest writes them."""
    rng = np.random.default_rng(0)
    for s in range(shards):
        w = ShardWriter(root / shard_name("smoke", s, gzip=True), gzip=True)
        for i in range(per_shard):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                buf, format="JPEG", quality=75)
            key = f"s{s}-{i:05d}"
            w.write(key, "jpg", buf.getvalue(), i % 10, {"key": key})
        w.close()
    return str(root)


def read(streams: ModuleType, url: str, samples: int, workers: int,
         batch: int) -> dict[str, float]:
    """Read ``samples`` samples (rounded up to whole batches) from a fresh loader."""
    dataset = streams.ShardStreamDataset(url, seed=0, rank=0, world=1, workers=workers,
                                         micro_batch=batch, flip=True, params=None)
    t0 = last = time.perf_counter()
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    got, longest = 0, 0.0
    for b in loader:
        now = time.perf_counter()
        got, longest, last = got + len(b["keys"]), max(longest, now - last), now
        if got >= samples:
            break
    seconds = time.perf_counter() - t0
    del loader
    return {"samples_per_second": got / seconds, "longest_wait_ms": 1e3 * longest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", nargs="?", help="a shard directory (local or s3://)")
    ap.add_argument("--against", default="HEAD", help="git revision of the baseline stream")
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--smoke", action="store_true", help="made-up shards, 2 repeats")
    args = ap.parse_args()
    if args.smoke:
        args.url = smoke_shards(Path(tempfile.mkdtemp(prefix="prism-bench-")))
        args.samples, args.repeats = 4000, 2
    elif not args.url:
        ap.error("a shard directory is needed (or --smoke)")
    torch.set_num_threads(1)
    base_name = f"streams@{args.against}"
    arms = {base_name: streams_at(args.against), "this tree": training.streams}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    for r in range(args.repeats):  # alternate (ABBA), so that load from other jobs and
        order = list(arms.items())      # warm caches favour neither arm
        for name, module in order if r % 2 == 0 else order[::-1]:
            m = read(module, args.url, args.samples, args.workers, args.batch)
            runs[name].append(m)
            print(f"repeat {r}  {name:24s} {m['samples_per_second']:9.0f} samples/s, "
                  f"longest wait {m['longest_wait_ms']:6.0f} ms", flush=True)
    median = {name: {k: statistics.median(m[k] for m in ms) for k in ms[0]}
              for name, ms in runs.items()}
    ratio = median["this tree"]["samples_per_second"] / median[base_name]["samples_per_second"]
    out = Path(os.environ.get("OUT", "./outputs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "stream_throughput.json").write_text(json.dumps(
        {"args": vars(args), "median": median, "ratio": ratio, "runs": runs}, indent=1))
    print(f"\nmedian of {args.repeats} ({args.samples} samples, {args.workers} workers, "
          f"batch {args.batch}):")
    for name, m in median.items():
        print(f"  {name:24s} {m['samples_per_second']:9.0f} samples/s, "
              f"longest wait {m['longest_wait_ms']:6.0f} ms")
    print(f"  ratio this tree / {base_name}: {ratio:.3f}")


if __name__ == "__main__":
    main()
