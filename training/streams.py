"""Infinite deterministic shard streams: no hang on uneven shards, exact resume.

There are ``G = world * workers`` streams; stream ``g = rank * workers + w`` belongs to loader
worker ``w`` of ``rank``. In epoch ``e`` the shards are permuted by ``(seed, e)``:

* ``n_shards >= G``: stream g reads shards ``perm[g::G]`` (some streams get one more);
* ``n_shards <  G``: stream g reads shard ``perm[g mod n]`` and keeps the samples whose index
  is ``r mod c`` (``c`` streams share that shard, g is the r-th of them).

Every stream then moves on to epoch ``e + 1``: a stream never ends, so every rank takes the
same number of steps. Within a shard the samples are permuted (and flipped) by
``(seed, e, shard, g)``. A stream's position is ``(epoch, shard position, sample position)``;
each batch carries the position after it, so the trainer knows where every stream stands.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common import storage
from common.shards import decode_rgb, iter_records, list_shards
from components.spectral_schedules import PARAM_NAMES

# --------------------------------------------------------------------------- shard access


def list_shard_urls(url: str) -> list[str]:
    """Shards under a local directory or ``s3://`` prefix (``common.shards``), sorted."""
    return sorted(str(s) for s in list_shards(url))


def read_shard(url: str, mod: int = 1, res: int = 0) -> list[dict[str, Any]]:
    """The samples of one shard whose index is ``res`` mod ``mod``, undecoded: dicts of key,
    image bytes (``data``) and label. :func:`iter_stream` decodes each image as it yields it:
    decoding a whole shard on opening it (4.4 s for 10,000 CIFAR-10 PNGs) stalled the
    trainer, which waits on that loader worker, once per shard."""
    return [r for i, r in enumerate(iter_records(url)) if i % mod == res]


def check_class_count(url: str, num_classes: int) -> None:
    """Refuse a corpus whose ingest record names more classes than ``data.num_classes``.

    Without this the first out-of-range label surfaces as a model error after compilation;
    a corpus without ``ingest.json`` (hand-made shards) is not checked.
    """
    record = storage.join(url, "ingest.json")
    if num_classes <= 0 or not storage.exists(record):
        return
    classes = json.loads(storage.read_bytes(record)).get("classes") or []
    if len(classes) > num_classes:
        raise ValueError(f"the corpus at {url} has {len(classes)} classes (its ingest.json) "
                         f"but data.num_classes is {num_classes}: set "
                         f"data.num_classes={len(classes)}")


def load_spectral_params(path: str) -> dict[str, np.ndarray]:
    """Per-image spectral parameters ``(log_A, beta, lambda_min, lambda_max)`` (4,) float32
    keyed by sample key, from the data pipeline's spectral statistics Parquet (a file or a
    directory of files)."""
    columns = ["key", *PARAM_NAMES]
    if path.startswith("s3://"):
        files = storage.list_files(path, (".parquet",)) if not path.endswith(".parquet") \
            else [path]
        table = pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(f)),
                                                columns=columns) for f in files])
    elif os.path.isdir(path):  # the spectra stage's folder also holds summary.json and PNGs
        files = sorted(glob.glob(os.path.join(path, "*.parquet")))
        if not files:
            raise FileNotFoundError(f"no .parquet files in {path}")
        table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    else:
        table = pq.read_table(path, columns=columns)
    keys = table.column("key").to_pylist()
    cols = np.stack([table.column(c).to_numpy() for c in PARAM_NAMES], axis=1)
    return {k: row.astype(np.float32) for k, row in zip(keys, cols, strict=True)}


# --------------------------------------------------------------------------- streams


def stream_plan(n_shards: int, n_streams: int, g: int, seed: int,
                epoch: int) -> list[tuple[int, int, int]]:
    """Stream g's shards in ``epoch``: list of (shard index, modulus, residue)."""
    perm = np.random.default_rng([seed, 11, epoch]).permutation(n_shards)
    if n_shards >= n_streams:
        return [(int(s), 1, 0) for s in perm[g::n_streams]]
    users = [h for h in range(n_streams) if h % n_shards == g % n_shards]
    return [(int(perm[g % n_shards]), len(users), users.index(g))]


def iter_stream(shards: list[str], g: int, n_streams: int, seed: int, start: list[int],
                flip: bool) -> Iterator[tuple[dict[str, Any], bool, list[int]]]:
    """Yield (sample, flip flag, position after it) forever, from position ``start``.

    A shard's records are read whole (0.3 s for 10,000 CIFAR-10 images) and each image is
    decoded as it is yielded, so that opening a shard costs the stream far less than the
    loader's prefetched batches cover.
    """
    epoch, shard_pos, sample_pos = start
    while True:
        plan = stream_plan(len(shards), n_streams, g, seed, epoch)
        got = 0
        for sp in range(shard_pos, len(plan)):
            s, mod, res = plan[sp]
            samples = read_shard(shards[s], mod, res)
            rng = np.random.default_rng([seed, 13, epoch, s, g])
            order, flips = rng.permutation(len(samples)), rng.random(len(samples)) < 0.5
            for k in range(sample_pos, len(order)):
                got += 1
                rec = samples[order[k]]
                sample = {"key": rec["key"], "image": decode_rgb(rec["data"]),
                          "label": rec["label"]}
                yield sample, bool(flip and flips[order[k]]), [epoch, sp, k + 1]
            sample_pos = 0
        if got == 0 and shard_pos == 0:
            raise RuntimeError(f"stream {g} of {n_streams} found no samples in a whole epoch: "
                               f"too few samples in {len(shards)} shards for that many ranks "
                               "and loader workers")
        epoch, shard_pos = epoch + 1, 0


class ShardStreamDataset(torch.utils.data.IterableDataset):
    """One rank's streams as batches; loader worker ``w`` serves stream ``rank * W + w``."""

    def __init__(self, url: str, seed: int, rank: int, world: int, workers: int,
                 micro_batch: int, flip: bool, params: dict[str, np.ndarray] | None) -> None:
        super().__init__()
        self.shards = list_shard_urls(url)
        self.seed, self.rank, self.world, self.workers = seed, rank, world, workers
        self.micro_batch, self.flip, self.params = micro_batch, flip, params
        self.positions: dict[int, list[int]] = {}
        self.rotation = 0

    def resume(self, positions: dict[int, list[int]], rotation: int) -> None:
        """Start each stream at its saved position; the DataLoader asks physical worker 0
        first, so worker p plays logical worker ``(p + rotation) mod W``."""
        self.positions, self.rotation = dict(positions), rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        phys = 0 if info is None else info.id
        w = (phys + self.rotation) % self.workers
        if info is None and self.workers > 1:
            raise ValueError("several streams per rank need data.num_workers loader workers")
        g = self.rank * self.workers + w
        start = self.positions.get(g, [0, 0, 0])
        it = iter_stream(self.shards, g, self.world * self.workers, self.seed, start, self.flip)
        while True:
            items = [next(it) for _ in range(self.micro_batch)]
            yield self._collate(items, g)

    def _collate(self, items: list[tuple[dict[str, Any], bool, list[int]]],
                 g: int) -> dict[str, Any]:
        imgs = np.stack([x["image"][:, ::-1] if f else x["image"] for x, f, _ in items])
        keys = [str(x["key"]) for x, _, _ in items]
        params = None
        if self.params is not None:
            missing = [k for k in keys if k not in self.params]
            if missing:
                raise KeyError(f"spectral statistics have no row for sample keys {missing[:3]}")
            params = torch.from_numpy(np.stack([self.params[k] for k in keys]))
        return {"images": torch.from_numpy(np.ascontiguousarray(imgs)),
                "labels": torch.tensor([int(x["label"]) for x, _, _ in items]),
                "params": params, "keys": keys, "stream": g, "state": items[-1][2]}
