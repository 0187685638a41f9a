"""Labelled real images for evaluation and the feature network, from any corpus source.

``load_images(src)`` reads what ingest reads (``pipelines.data.sources``): a folder (flat or one
subfolder per class), a tar of images (``train/<class>/NNNN.jpg``, e.g. the CIFAR-10 tars),
an ``.npz`` (``x`` uint8 (N, H, W[, 3]), optional ``y``), WebDataset shards (``.tar`` /
``.tar.gz``, with ``.cls`` labels) or a folder / ``s3://`` prefix of shards. Returns uint8
(N, H, W, 3) and int64 labels (-1: none). Labels from class folder names are the index of
the name in the sorted list of names, which is what ingest writes into ``.cls``, so a tar and
its shards give the same labels. No Ray, MLflow or WebDataset import: runs on a bare GPU host.
"""

from __future__ import annotations

import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.shards import decode_rgb
from pipelines.data.sources import enumerate_source


@dataclass
class ImageSet:
    """uint8 images (N, H, W, 3), labels (N,) int64 (-1 unlabelled), class names (or [])."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.images)

    def as_float(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Images [start:stop] as float32 (B, 3, H, W) in [-1, 1]."""
        x = torch.from_numpy(np.ascontiguousarray(self.images[start:stop]))
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.class_names, self.source)


def _decode(data: bytes | np.ndarray) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.repeat(data[..., None], 3, -1) if data.ndim == 2 else data[..., :3]
    return decode_rgb(data)


def _annotation_labels(src: str) -> dict[str, str]:
    """File name -> class name from a ``*_annotations.txt`` inside a tar (Tiny-ImageNet val:
    ``val_0.JPEG<TAB>n03444034<TAB>...``); empty when there is none."""
    if not src.endswith((".tar", ".tar.gz")) or not Path(src).is_file():
        return {}
    with tarfile.open(src, "r:*") as tar:
        for m in tar:
            if m.isfile() and m.name.endswith("annotations.txt"):
                text = tar.extractfile(m).read().decode()  # type: ignore[union-attr]
                return {parts[0]: parts[1] for line in text.splitlines()
                        if len(parts := line.split("\t")) >= 2}
    return {}


def load_images(src: str, *, limit: int | None = None, resolution: int | None = None,
                class_names: list[str] | None = None, workers: int = 8) -> ImageSet:
    """All (or the first ``limit``, in the source's sorted order) images of ``src``.

    ``class_names``: the label order to use (e.g. the training set's), needed for a tar whose
    labels come from an annotations file (Tiny-ImageNet val). Raises ValueError when images
    differ in size or do not match ``resolution``.
    """
    items, names = enumerate_source(src)
    if not names and all(i.label is None for i in items):
        notes = _annotation_labels(src)
        if notes:
            for it in items:
                it.class_name = notes.get(it.source.rsplit("/", 1)[-1])
            names = sorted({n for n in notes.values()})
    names = class_names or names
    bad = [i for i in items if i.error]
    if bad:
        raise ValueError(f"{src}: {len(bad)} unreadable inputs, e.g. {bad[0].source}: "
                         f"{bad[0].error}")
    items = items[:limit] if limit else items
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        arrays = list(pool.map(lambda it: _decode(it.load()), items))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{src}: images of different sizes {sorted(shapes)[:4]}: ingest them "
                         "at one resolution first (prism data ingest --size)")
    (shape,) = shapes
    if resolution is not None and shape[:2] != (resolution, resolution):
        raise ValueError(f"{src}: images are {shape[0]}x{shape[1]}, expected "
                         f"{resolution}x{resolution}")
    index = {n: k for k, n in enumerate(names)}
    labels = np.array([it.label if it.label is not None else index.get(it.class_name or "", -1)
                       for it in items], dtype=np.int64)
    return ImageSet(np.stack(arrays), labels, names, src)
