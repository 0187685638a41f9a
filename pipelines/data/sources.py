"""Enumerating ingest inputs: a folder (flat or one subfolder per class), a tar of images,
an ``.npz`` of uint8 arrays (``x`` (N, H, W[, 3]), optional ``y`` (N,)), WebDataset shards, or
a directory of tars. Local paths or s3:// (tars and shards).

Every input with an image extension is one ``SourceItem``; problems found before decoding
(an unsafe tar member name, a duplicate key) are recorded on the item as ``error``.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from common import storage
from common.shards import IMAGE_EXTS, SHARD_SUFFIXES, split_member

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass
class SourceItem:
    """One input. ``load()`` returns encoded bytes or a uint8 array."""

    source: str
    key: str
    load: Callable[[], bytes | np.ndarray]
    class_name: str | None = None
    label: int | None = None  # given directly (npz, shards); else from class_name
    error: str | None = None


def make_key(rel: str) -> str:
    """A WebDataset-safe key from a relative source path: no extension, no dots or slashes."""
    stem = str(PurePosixPath(rel).with_suffix(""))
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem.replace("/", "_"))


def printable(name: str) -> str:
    """A file name as text that can be written anywhere (JSON, Parquet, logs): bytes that are not
    UTF-8 (which Python keeps as surrogate escapes) become ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _unsafe(name: str) -> bool:
    return name.startswith("/") or ".." in PurePosixPath(name).parts


def _from_folder(root: Path) -> list[SourceItem]:
    """Image files under ``root``; a symbolic link that leads outside it is an error record
    (not read: a folder of images must not reach into the rest of the file system)."""
    items = []
    top = root.resolve()
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = printable(p.relative_to(root).as_posix())
        parts = PurePosixPath(rel).parts
        item = SourceItem(rel, make_key(rel), p.read_bytes,
                          class_name=parts[0] if len(parts) > 1 else None)
        if not p.resolve().is_relative_to(top):
            item.error = f"symbolic link to a file outside the source folder: {rel!r}"
        items.append(item)
    return items


class _TarFile:
    """A tar read without holding it in memory: an uncompressed local copy (the file itself, or
    a temporary one for ``.tar.gz`` and ``s3://``), its member headers, and each member's
    bytes read from their offset when an item is loaded. Memory stays that of the headers
    (bounded by the member count, not the tar's size); random access serves the shuffled
    ingest order. The temporary copies go when the last item that reads them does."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._temps: list[Any] = []
        path = None if storage.is_s3(url) else Path(url)
        if path is None:
            path = self._temp()
            storage.download(url, path)
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        if gzipped:  # decompressed in blocks to a plain tar beside it
            plain = self._temp()
            with gzip.open(path) as z, open(plain, "wb") as out:
                shutil.copyfileobj(z, out, 1 << 20)
            path = plain
        self.path = path
        with tarfile.open(path, mode="r:") as tar:
            everything = list(tar)  # headers only
        self.members = [m for m in everything if m.isfile()]
        self.links = [m for m in everything if m.issym() or m.islnk()]

    def _temp(self) -> Path:
        t = tempfile.NamedTemporaryFile(prefix="prism-tar-", suffix=".tar")
        self._temps.append(t)
        return Path(t.name)

    def reader(self, member: tarfile.TarInfo) -> Callable[[], bytes]:
        """``load()`` of one member: its bytes, read from the local copy."""
        def read(path: Path = self.path, offset: int = member.offset_data,
                 size: int = member.size, owner: _TarFile = self) -> bytes:
            del owner  # bound above so that the temporary copies live as long as this reader
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(size)
        return read


def _from_tar(url: str) -> list[SourceItem]:
    tar = _TarFile(url)
    if any(split_member(m.name)[1] == "cls" for m in tar.members):
        return _from_shard(url, tar)
    items = []
    for m in tar.members:
        if PurePosixPath(m.name).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        name = printable(m.name)
        parent = PurePosixPath(name).parent.name or None
        item = SourceItem(f"{url}:{name}", make_key(name.lstrip("/")), tar.reader(m),
                          class_name=parent)
        if _unsafe(name):
            item.error = f"unsafe path in tar member name: {name!r}"
        items.append(item)
    for m in tar.links:  # recorded, not followed
        name = printable(m.name)
        if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES:
            kind = "symbolic" if m.issym() else "hard"
            items.append(SourceItem(f"{url}:{name}", make_key(name.lstrip("/")), bytes,
                                    class_name=PurePosixPath(name).parent.name or None,
                                    error=f"tar {kind} link to {printable(m.linkname)!r}: "
                                          "links are not followed"))
    if len({i.class_name for i in items}) <= 1:  # one folder: no classes
        for i in items:
            i.class_name = None
    return items


def _from_shard(url: str, tar: _TarFile | None = None) -> list[SourceItem]:
    """Samples of a shard in prism's format (members grouped by key: an image, ``.cls``,
    ``.json``), read lazily like any tar. Their keys become member names of the output tars, so
    a key that names a path outside the tar (absolute, ``..``) is an error and any other is
    made safe with ``make_key``."""
    tar = tar or _TarFile(url)
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    for m in tar.members:
        key, ext = split_member(m.name)
        groups.setdefault(key, {})[ext] = m
    items = []
    for key, members in groups.items():
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            continue
        label = -1
        if "cls" in members:
            label = int(tar.reader(members["cls"])().decode().strip() or -1)
        elif "json" in members:
            label = int(json.loads(tar.reader(members["json"])()).get("label", -1))
        raw = printable(key)
        item = SourceItem(f"{url}:{raw}", make_key(raw), tar.reader(members[ext]), label=label)
        if _unsafe(raw):
            item.error = f"unsafe path in shard key: {raw!r}"
        items.append(item)
    return items


def _from_npz(path: str) -> list[SourceItem]:
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
        if "x" not in z:
            raise ValueError(f"{path}: an .npz input needs an array 'x' (N, H, W[, 3]) uint8")
        x = z["x"]
        y = z["y"] if "y" in z else None
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ValueError(f"{path}: 'x' must be uint8 (N, H, W[, 3]), got {x.dtype} {x.shape}")
    if y is not None and len(y) != len(x):
        raise ValueError(f"{path}: 'y' has {len(y)} labels for {len(x)} images")
    stem = make_key(PurePosixPath(path).name.split(".")[0])
    return [SourceItem(f"{path}[{i}]", f"{stem}_{i:06d}", (lambda a=x[i]: a),
                       label=None if y is None else int(y[i])) for i in range(len(x))]


def enumerate_source(src: str) -> tuple[list[SourceItem], list[str]]:
    """All inputs of SRC (sorted, duplicates flagged) and the sorted class names."""
    if src.endswith(".npz"):
        items = _from_npz(src)
    elif src.endswith(SHARD_SUFFIXES):
        items = _from_tar(src)
    elif storage.is_s3(src) or (Path(src).is_dir() and _has_tars(Path(src))):
        items = [i for u in storage.list_files(src, SHARD_SUFFIXES) for i in _from_tar(u)]
    elif Path(src).is_dir():
        items = _from_folder(Path(src))
    else:
        raise FileNotFoundError(f"ingest source not found or not supported: {src} "
                                "(a folder, .tar[.gz], .npz, or a folder/prefix of shards)")
    if not items:
        raise FileNotFoundError(f"no images found in {src} (extensions {IMAGE_SUFFIXES})")
    seen: set[str] = set()
    for item in items:
        if item.key in seen and item.error is None:
            item.error = f"duplicate key: {item.key!r} already taken by an earlier input"
        seen.add(item.key)
    names = sorted({i.class_name for i in items if i.class_name is not None})
    return items, names


def _has_tars(root: Path) -> bool:
    """A folder with .tar / .tar.gz files at its top level is a folder of tars or shards."""
    return any(p.is_file() and p.name.endswith(SHARD_SUFFIXES) and not p.name.startswith(".")
               for p in root.iterdir())
