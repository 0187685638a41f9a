"""Training data: deterministic, resumable batches for every rank.

Two sources behind one interface (``batch(step, slot) -> dict``, ``state_dict``,
``load_state_dict``):

* :class:`MemoryData` (generated images, an ``.npz``): random access, so the order is a
  function of the *global* sample position only: micro-batch ``slot`` (``rank * grad_accum +
  micro_step``) of step ``s`` holds the samples at positions ``s * B + slot * b + i`` of the
  epoch permutations. The result does not depend on how the global batch is split over ranks.
* :class:`ShardData` (WebDataset shards, local or ``s3://``): each rank and loader worker reads
  an infinite deterministic stream (see :mod:`training.streams`), so every rank takes the same
  number of steps however uneven the shards are; the position of every stream is part of the
  checkpoint. A checkpoint resumes exactly on the same world size and loader workers, and on
  others (more or fewer GPUs) from the start of the earliest unfinished epoch.

``load_state_dict(states, rank)`` takes the data states of every rank of the checkpoint and
returns a note for the log when the position could not be kept exactly (else None).

Batches are dicts: ``images`` (b, C, H, W) float in [-1, 1] on the device, ``labels`` (b,)
long or None, ``lambda_bounds`` (b, 2) = (lambda(0), lambda(1)) or None, ``keys`` list[str].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.run_config import Config
from components.devices import to_device
from components.spectra import gaussian_random_field, image_statistics
from components.spectral_schedules import check_params, lambda_bounds, params_from_stats
from training.streams import ShardStreamDataset, check_class_count, load_spectral_params


def to_batch(images: np.ndarray | torch.Tensor, labels: np.ndarray | None,
             params: np.ndarray | torch.Tensor | None, keys: list[str], device: torch.device,
             num_classes: int, resolution: int | None = None) -> dict[str, Any]:
    """uint8 (b, H, W, C) -> float (b, C, H, W) in [-1, 1] on ``device`` (converted there).

    With ``resolution`` (``data.resolution``) images larger by an integer factor f are
    mean-downsampled f x f (the box pyramid of SCIENCE.md, so that one set of shards trains
    models at several resolutions); any other size is refused.
    """
    x = torch.as_tensor(images).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if resolution is not None and x.shape[-1] != resolution:
        side = x.shape[-1]
        if side % resolution or x.shape[-2] != side:
            raise ValueError(f"data.resolution is {resolution} but the shards hold "
                             f"{x.shape[-2]}x{side} images: ingest at --size {resolution} or "
                             f"a multiple of it")
        x = torch.nn.functional.avg_pool2d(x, side // resolution)
    y = None
    if num_classes > 0 and labels is not None:
        lab = np.asarray(labels)  # checked here, on the host: the networks do not check
        bad = (lab < -1) | (lab >= num_classes)  # labels on the GPU (a sync every step)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"label {int(lab[i])} of {keys[i] if i < len(keys) else i} is "
                             f"outside [-1, {num_classes}) (data.num_classes={num_classes})")
        # queued, not waited for: a DataLoader with pin_memory left these page-locked
        y = to_device(torch.as_tensor(labels, dtype=torch.long), device)
    out = {"images": x, "labels": y, "lambda_bounds": None, "spectral_params": None,
           "keys": list(keys)}
    if params is not None:  # (b, 4) = (log_A, beta, lambda_min, lambda_max)
        p = torch.as_tensor(params, dtype=torch.float32)
        check_params(p.numpy())  # on the host, where reading the values costs no device sync
        bounds = lambda_bounds(p, check=False)
        out["spectral_params"], out["lambda_bounds"] = to_device(p, device), to_device(bounds,
                                                                                        device)
    return out


# --------------------------------------------------------------------------- in memory


def synthetic_images(n: int, size: int, num_classes: int, seed: int) -> tuple[np.ndarray, ...]:
    """Generated RGB images with natural-image statistics: (n, size, size, 3) uint8, labels (n,).

    Each image is a Gaussian random field with power spectrum ~ f^-beta (beta in [1.5, 2.5])
    per channel plus a class-dependent mean colour, so that a model has structure to learn.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, max(num_classes, 1), size=n)
    palette = np.random.default_rng(seed + 1).uniform(-0.5, 0.5, size=(max(num_classes, 1), 3))
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        beta = float(rng.uniform(1.5, 2.5))
        field = gaussian_random_field(3, size, beta, seed=int(rng.integers(2**31)), variance=0.1)
        x = np.clip(field.transpose(1, 2, 0) + palette[labels[i]], -1, 1)  # (H, W, 3)
        out[i] = np.round((x + 1) * 127.5).astype(np.uint8)
    return out, labels.astype(np.int64)


def spectral_params_of(images: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n, 4) spectral parameters (log_A, beta, lambda_min, lambda_max)."""
    x = images.transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1.0
    return params_from_stats(image_statistics(x)).astype(np.float32)


class MemoryData:
    """Random-access data with a global, world-size independent order (see module doc)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, keys: list[str],
                 params: np.ndarray | None, cfg: Config, micro_batch: int,
                 device: torch.device) -> None:
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} "
                             f"{images.shape}")
        self.images, self.labels, self.keys, self.params = images, labels, keys, params
        self.cfg, self.micro_batch, self.device = cfg, micro_batch, device
        self._perm: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation, flip flags) of one epoch, from (seed, epoch) only."""
        if epoch not in self._perm:
            rng = np.random.default_rng([self.cfg.run.seed, 7, epoch])
            perm = rng.permutation(len(self.images))
            flips = rng.random(len(self.images)) < 0.5
            self._perm = {epoch: (perm, flips)}  # keep one epoch cached
        return self._perm[epoch]

    def batch(self, step: int, slot: int) -> dict[str, Any]:
        """Micro-batch ``slot`` of optimizer step ``step``."""
        n, b = len(self.images), self.micro_batch
        start = step * self.cfg.train.batch_size + slot * b
        idx, flip = np.empty(b, dtype=np.int64), np.empty(b, dtype=bool)
        for i, pos in enumerate(range(start, start + b)):
            perm, flips = self._epoch(pos // n)
            idx[i], flip[i] = perm[pos % n], flips[pos % n]
        imgs = self.images[idx]
        if self.cfg.data.random_flip:
            imgs = np.where(flip[:, None, None, None], imgs[:, :, ::-1], imgs)
        return to_batch(imgs, None if self.labels is None else self.labels[idx],
                        None if self.params is None else self.params[idx],
                        [self.keys[i] for i in idx], self.device, self.cfg.data.num_classes)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "memory"}  # the position is a function of the step

    def load_state_dict(self, states: list[dict[str, Any]], rank: int) -> str | None:
        """Nothing to restore: the position is the step's, whatever the world size."""
        del rank
        if any(s.get("kind") != "memory" for s in states):
            raise ValueError(f"data state of kind {states[0].get('kind')!r} cannot resume "
                             "in-memory data")
        return None


# --------------------------------------------------------------------------- shards


class ShardData:
    """A rank's view of streamed shards through a torch DataLoader (``num_workers`` streams)."""

    def __init__(self, cfg: Config, rank: int, world: int, micro_batch: int,
                 device: torch.device) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.workers = max(cfg.data.num_workers, 1)
        check_class_count(cfg.data.url or "", cfg.data.num_classes)
        self.params = load_spectral_params(cfg.data.spectral_stats) \
            if cfg.data.spectral_stats and cfg.objective.per_instance else None
        self.dataset = ShardStreamDataset(cfg.data.url or "", cfg.run.seed, rank, world,
                                          self.workers, micro_batch, cfg.data.random_flip,
                                          self.params)
        self.batches = 0  # batches taken by this rank
        self.streams: dict[int, list[int]] = {}  # logical stream -> (epoch, shard, sample)
        self._it = None

    def _loader(self):
        self.dataset.resume(self.streams, rotation=self.batches % self.workers)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.cfg.data.num_workers > 0,
            # four batches a worker: slack for a worker that is opening a shard
            prefetch_factor=4 if self.cfg.data.num_workers > 0 else None,
            generator=torch.Generator().manual_seed(self.cfg.run.seed),  # not the global RNG
        )
        return iter(loader)

    def batch(self, step: int, slot: int) -> dict[str, Any]:
        if self._it is None:
            self._it = self._loader()
        raw = next(self._it)
        self.batches += 1
        self.streams[int(raw["stream"])] = [int(v) for v in raw["state"]]
        return to_batch(raw["images"], raw["labels"], raw["params"], raw["keys"], self.device,
                        self.cfg.data.num_classes, self.cfg.data.resolution)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "shards", "world": self.world, "workers": self.workers,
                "batches": self.batches, "streams": {str(k): v for k, v in self.streams.items()}}

    def load_state_dict(self, states: list[dict[str, Any]], rank: int) -> str | None:
        """Resume from every rank's data state. Saved with this world size and loader workers:
        each stream continues exactly where it stood. Saved with others (resumed on more or
        fewer GPUs): the streams are not the same streams, so each restarts at the beginning
        of the earliest epoch a saved stream had not finished; samples of that epoch seen
        before the checkpoint are seen again (at most one epoch's worth), none is skipped."""
        if any(s.get("kind") != "shards" for s in states):
            raise ValueError(f"data state of kind {states[0].get('kind')!r} cannot resume "
                             "shards")
        self._it = None
        if len(states) == self.world and all(
                (s["world"], s["workers"]) == (self.world, self.workers) for s in states):
            self.batches = int(states[rank]["batches"])
            self.streams = {int(k): list(v) for k, v in states[rank]["streams"].items()}
            return None
        started = all(len(s["streams"]) == s["workers"] for s in states)
        epoch = min((int(v[0]) for s in states for v in s["streams"].values()), default=0) \
            if started else 0
        self.batches = 0
        mine = range(self.rank * self.workers, (self.rank + 1) * self.workers)
        self.streams = {g: [epoch, 0, 0] for g in mine}
        return (f"data saved with world {states[0]['world']} x {states[0]['workers']} loader "
                f"workers, resumed on {self.world} x {self.workers}: the shard streams "
                f"restart at epoch {epoch}")


# --------------------------------------------------------------------------- factory


def build_data(cfg: Config, rank: int, world: int, micro_batch: int,
               device: torch.device) -> MemoryData | ShardData:
    """The data source of ``cfg.data`` for this rank."""
    d = cfg.data
    if d.source == "shards":
        return ShardData(cfg, rank, world, micro_batch, device)
    if d.source == "synthetic":
        images, labels = synthetic_images(d.synthetic_size, d.resolution, d.num_classes,
                                          seed=1000 + cfg.run.seed)
        keys = [f"synthetic-{i:06d}" for i in range(len(images))]
    else:  # npz with x (N, H, W, C) uint8 and optional y
        with np.load(d.url) as f:  # type: ignore[arg-type]
            if "x" not in f:
                raise ValueError(f"data.url {d.url}: the .npz must hold an array 'x' "
                                 "(N, H, W, C) uint8")
            images = f["x"]
            labels = f["y"].astype(np.int64) if "y" in f else None
        keys = [f"npz-{i:06d}" for i in range(len(images))]
    if images.shape[1] != d.resolution:
        raise ValueError(f"data.resolution is {d.resolution} but the images are "
                         f"{images.shape[1]}x{images.shape[2]}")
    params = None
    if cfg.objective.per_instance:
        if d.spectral_stats:
            table = load_spectral_params(d.spectral_stats)
            missing = [k for k in keys if k not in table]
            if missing:
                raise KeyError(f"spectral statistics have no row for sample keys {missing[:3]}")
            params = np.stack([table[k] for k in keys]).astype(np.float32)
        else:
            params = spectral_params_of(images)
    return MemoryData(images, labels, keys, params, cfg, micro_batch, device)
