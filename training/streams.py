"""Infinite deterministic shard streams through webdataset: no hang on uneven shards, exact
resume.

There are ``G = world * workers`` streams; stream ``g = rank * workers + w`` belongs to loader
worker ``w`` of ``rank``. In epoch ``e`` the shards are permuted by ``(seed, e)``:

* ``n_shards >= G``: stream g reads shards ``perm[g::G]`` (some streams get one more);
* ``n_shards <  G``: stream g reads shard ``perm[g mod n]`` and keeps the samples whose index
  is ``r mod c`` (``c`` streams share that shard, g is the r-th of them).

Every stream then moves on to epoch ``e + 1``: a stream never ends, so every rank takes the
same number of steps. Within a shard the samples are permuted (and flipped) by
``(seed, e, shard, g)``. A stream's position is ``(epoch, shard position, sample position)``;
each batch carries the position after it, so the trainer knows where every stream stands.

The horizontal flip is the stream's only augmentation, applied to the uint8 array as the batch
is collated, its flag drawn from the position's key. GPU augmentation (``kornia.augmentation``)
is not used: it draws from torch's global generator rather than from the stream position, so a
resumed run would augment differently, and any augmentation beyond a horizontal flip (crops,
colour jitter) would change the images that the per-image spectral statistics were measured on
(a horizontal flip leaves the radially averaged power spectrum unchanged).

A stream is a ``wds.DataPipeline`` (:func:`stream_pipeline`), one per loader worker::

    EpochShardList    every stream's shard entries, epoch after epoch, forever   (source)
    split_workers     this loader worker's share                                 (worker split)
    split_ranks       this rank's share: stream g's shards                       (node split)
    resume_at         skips what a resumed stream had read
    read_shards       common.storage -> tar expansion -> wds group_by_keys
    shard_order       the permutation and flips within a shard; positions
    wds.decode        each image as it is yielded
    wds.map           training_sample
    wds.batched       micro-batches (ShardStreamDataset)

webdataset groups tar members into samples, decodes, maps and batches; the stages defined here
are the stream's bookkeeping, which webdataset has no stage for (each docstring says why).
"""

from __future__ import annotations

import functools
import glob
import io
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys

from common import storage
from common.shards import IMAGE_EXTS, decode_rgb, expand_tars, list_shards
from components.spectral_schedules import PARAM_NAMES

# --------------------------------------------------------------------------- shard access


def list_shard_urls(url: str) -> list[str]:
    """Shards under a local directory or ``s3://`` prefix (``common.shards``), sorted."""
    return sorted(str(s) for s in list_shards(url))


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


# --------------------------------------------------------------------------- the plan


def epoch_tasks(n_shards: int, n_streams: int, seed: int, epoch: int) -> list[dict | None]:
    """Every stream's shards in ``epoch``, as one list whose entry i belongs to stream i mod G.

    An entry is ``{shard, epoch, slot, mod, res, last}``: stream g reads shard ``shard`` as the
    ``slot``-th of its epoch, keeps the samples whose index is ``res`` mod ``mod``, and
    ``last`` marks its epoch's last shard. The list is padded with None to a multiple of
    ``G = n_streams``, so that in the endless sequence of epochs stream g's entries are
    ``islice(., g, None, G)``: what the worker and rank splitters take.
    """
    perm = np.random.default_rng([seed, 11, epoch]).permutation(n_shards)
    if n_shards >= n_streams:  # stream g reads perm[g::G]
        tasks: list[dict | None] = [
            {"shard": int(s), "epoch": epoch, "slot": i // n_streams, "mod": 1, "res": 0,
             "last": i + n_streams >= n_shards} for i, s in enumerate(perm)]
        return tasks + [None] * (-n_shards % n_streams)
    # fewer shards than streams: the c streams g = j, j + n, j + 2n... share shard perm[j]
    return [{"shard": int(perm[g % n_shards]), "epoch": epoch, "slot": 0,
             "mod": len(range(g % n_shards, n_streams, n_shards)), "res": g // n_shards,
             "last": True} for g in range(n_streams)]


def stream_plan(n_shards: int, n_streams: int, g: int, seed: int,
                epoch: int) -> list[tuple[int, int, int]]:
    """Stream g's shards in ``epoch``: list of (shard index, modulus, residue)."""
    return [(t["shard"], t["mod"], t["res"])
            for t in epoch_tasks(n_shards, n_streams, seed, epoch)[g::n_streams] if t]


# --------------------------------------------------------------------------- pipeline stages
# webdataset's own stages do the tar expansion, the grouping of members into samples, the
# decoding, the mapping and the batching. The stages below are the stream's bookkeeping,
# which webdataset has no stage for: which shards a stream reads in which epoch, where a
# resumed stream stands, and a full, position-addressable permutation within each shard.


class EpochShardList(torch.utils.data.IterableDataset):
    """The shard list of every stream, epoch after epoch from ``first_epoch``, forever.

    The source of the pipeline in the place of ``wds.SimpleShardList`` (one pass over a
    fixed list) or ``wds.ResampledShards`` (shards drawn with replacement, so not every
    sample once an epoch): it yields webdataset's ``dict(url=...)`` shard entries with the
    plan of :func:`epoch_tasks` (and its None padding) added.
    """

    def __init__(self, urls: list[str], n_streams: int, seed: int, first_epoch: int) -> None:
        super().__init__()
        self.urls, self.n_streams, self.seed = urls, n_streams, seed
        self.first_epoch = first_epoch

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        for epoch in itertools.count(self.first_epoch):
            for t in epoch_tasks(len(self.urls), self.n_streams, self.seed, epoch):
                yield None if t is None else {"url": self.urls[t["shard"]], **t}


def _split_workers(src: Iterable[Any], worker: int, workers: int) -> Iterator[Any]:
    """Loader worker ``worker``'s share of the shard list (``wds.split_by_worker``'s slice).

    Not ``wds.split_by_worker``: that takes the DataLoader's worker id, and a resumed loader
    asks physical worker 0 for the first batch, so the worker that continues the stream due
    next plays a rotated logical worker (:meth:`ShardStreamDataset.resume`). Splitting by
    worker before rank makes the stream ``g = rank * workers + worker`` read ``perm[g::G]``.
    """
    yield from itertools.islice(src, worker, None, workers)


def _split_ranks(src: Iterable[Any], rank: int, world: int) -> Iterator[Any]:
    """Rank ``rank``'s share (``wds.split_by_node``'s slice), with the rank the training loop
    passes: ``wds.split_by_node`` reads it from the environment or the default process
    group, which a single-process test of rank 1 of 2 does not have."""
    yield from itertools.islice(src, rank, None, world)


def _resume_at(src: Iterable[dict | None], start: list[int]) -> Iterator[dict]:
    """Drop the padding and what a stream resumed at ``start = (epoch, slot, sample)`` had
    read: the earlier shards of that epoch, and the first ``sample`` samples of its shard.
    Each entry gets ``first`` (its first sample) and ``whole`` (its epoch is read from the
    start)."""
    epoch, slot, sample = start
    for task in src:
        if task is None or (task["epoch"] == epoch and task["slot"] < slot):
            continue
        first = sample if (task["epoch"], task["slot"]) == (epoch, slot) else 0
        yield {**task, "first": first, "whole": task["epoch"] > epoch or slot == sample == 0}


def _read_shards(src: Iterable[dict], expand: Callable[..., Iterator[dict]]) -> Iterator[dict]:
    """Each shard's samples that the stream keeps, undecoded (``task["samples"]``).

    The shard is read through ``common.storage`` (local paths, and ``s3://`` with the
    project's endpoint, credentials, timeouts and error messages; ``wds.url_opener`` would
    go through ``wds.gopen``, which has no boto3 S3), expanded by ``expand`` and grouped into
    samples by ``wds``'s ``group_by_keys``. A sample without an image member is skipped.
    """
    for task in src:
        with storage.open_read(task["url"]) as stream:
            files = expand([{"url": task["url"], "stream": stream}])
            samples = [s for s in group_by_keys(files) if any(e in s for e in IMAGE_EXTS)]
        yield {**task, "samples": samples[task["res"]::task["mod"]]}


def _shard_order(src: Iterable[dict], seed: int, g: int, flip: bool) -> Iterator[dict]:
    """Stream g's samples of each shard in the permutation of ``(seed, epoch, shard, g)``,
    each with its flip flag (``__flip__``) and the stream's position after it
    (``__position__ = [epoch, slot, k + 1]``).

    Not ``wds.shuffle``: its buffer mixes samples across shard boundaries and its random
    state follows every sample drawn, so a stream could only resume by replaying from its
    beginning; a whole-shard permutation keyed by the shard is addressable by position.
    """
    got = 0  # samples of the stream's current epoch
    for task in src:
        samples = task["samples"]
        rng = np.random.default_rng([seed, 13, task["epoch"], task["shard"], g])
        order = rng.permutation(len(samples)).tolist()
        flips = (rng.random(len(samples)) < 0.5).tolist()
        for k in range(task["first"], len(order)):
            got += 1
            yield {**samples[order[k]], "__flip__": flip and flips[order[k]],
                   "__position__": [task["epoch"], task["slot"], k + 1]}
        if task["last"]:
            if task["whole"] and got == 0:  # else the stream would read empty epochs forever
                raise RuntimeError(f"stream {g} found no samples in a whole epoch: too few "
                                   "samples in the shards for that many ranks and loader "
                                   "workers")
            got = 0


split_workers = wds.pipelinefilter(_split_workers)
split_ranks = wds.pipelinefilter(_split_ranks)
resume_at = wds.pipelinefilter(_resume_at)
read_shards = wds.pipelinefilter(_read_shards)
shard_order = wds.pipelinefilter(_shard_order)


def decode_image(key: str, data: bytes) -> np.ndarray | None:
    """A ``wds.decode`` handler: an image member (``key`` is ``.png``, ``.jpg``...) -> uint8
    (H, W, 3) RGB; None leaves any other member to the next handler."""
    return decode_rgb(data) if key[1:] in IMAGE_EXTS else None


def training_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A decoded webdataset sample -> key, image uint8 (H, W, 3), label (the ``.cls``, else
    the ``.json``'s ``label``, else -1), flip flag and position."""
    image = sample[next(e for e in IMAGE_EXTS if e in sample)]
    if "cls" in sample:
        label = int(sample["cls"])
    else:
        label = int(json.loads(sample["json"]).get("label", -1)) if "json" in sample else -1
    return {"key": sample["__key__"], "image": image, "label": label,
            "flip": sample["__flip__"], "position": sample["__position__"]}


# --------------------------------------------------------------------------- streams


def stream_pipeline(shards: list[str], seed: int, rank: int, world: int, worker: int,
                    workers: int, start: list[int], flip: bool,
                    expand: Callable[..., Iterator[dict]] = expand_tars,
                    ) -> wds.DataPipeline:
    """The samples of stream ``g = rank * workers + worker`` of ``G = world * workers``,
    forever, from position ``start``, as dicts of :func:`training_sample`.

    A shard's members are read whole (the permutation needs them all) and each image is
    decoded as it is yielded, so opening a shard costs the stream far less than the loader's
    prefetched batches cover. ``expand`` is the tar expansion stage:
    ``common.shards.expand_tars``, or ``webdataset.tariterators.tar_file_expander`` (the same
    samples, at half the throughput on CIFAR-10 shards).
    """
    return wds.DataPipeline(
        EpochShardList(shards, world * workers, seed, start[0]),  # {url, epoch, slot...}|None
        split_workers(worker, workers),  # splitting by worker, then by rank, leaves
        split_ranks(rank, world),        # stream g's entries: i = g mod G
        resume_at(start),
        read_shards(expand),  # + samples: the shard's {__key__, jpg|png..., cls, json}
        shard_order(seed, rank * workers + worker, flip),  # one sample at a time
        wds.decode(decode_image, only=IMAGE_EXTS, pre=[], post=[]),  # image: uint8 (H, W, 3)
        wds.map(training_sample),
    )


def iter_stream(shards: list[str], g: int, n_streams: int, seed: int, start: list[int],
                flip: bool) -> Iterator[tuple[dict[str, Any], bool, list[int]]]:
    """Yield (sample, flip flag, position after it) of stream g forever, from ``start``."""
    for s in stream_pipeline(shards, seed, g, n_streams, 0, 1, start, flip):
        yield {"key": s["key"], "image": s["image"], "label": s["label"]}, s["flip"], \
            s["position"]


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
        pipeline = stream_pipeline(self.shards, self.seed, self.rank, self.world, w,
                                   self.workers, self.positions.get(g, [0, 0, 0]), self.flip)
        pipeline.append(wds.batched(self.micro_batch, partial=False,
                                    collation_fn=functools.partial(self._collate, g=g)))
        return iter(pipeline)

    def _collate(self, items: list[dict[str, Any]], g: int) -> dict[str, Any]:
        imgs = np.stack([x["image"][:, ::-1] if x["flip"] else x["image"] for x in items])
        keys = [str(x["key"]) for x in items]
        params = None
        if self.params is not None:
            missing = [k for k in keys if k not in self.params]
            if missing:
                raise KeyError(f"spectral statistics have no row for sample keys {missing[:3]}")
            params = torch.from_numpy(np.stack([self.params[k] for k in keys]))
        return {"images": torch.from_numpy(np.ascontiguousarray(imgs)),
                "labels": torch.tensor([int(x["label"]) for x in items]),
                "params": params, "keys": keys, "stream": g, "state": items[-1]["position"]}
