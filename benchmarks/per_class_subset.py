"""A class-balanced subset of an image tar: the first N images of every class folder.

    python3 benchmarks/per_class_subset.py SRC.tar DST.tar --per-class 150

An image's class is its parent folder (``train/<class>/<name>.JPEG``, the layout of the shared
Tiny-ImageNet and CIFAR-10 tars); images are taken in name order within each class, and every
other member (``wnids.txt``, ``words.txt``) is kept. Written for experiments whose training set
must travel in one device call with the wheels (S3: 150 of Tiny-ImageNet's 200 images per class,
about 46 MB of shards); ``prism data ingest DST.tar ...`` then shards it as usual.
"""

from __future__ import annotations

import argparse
import tarfile
from collections import defaultdict
from pathlib import PurePosixPath

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def subset(src: str, dst: str, per_class: int) -> dict[str, int]:
    """Write ``dst`` with at most ``per_class`` images of each class of ``src``; returns the
    counts (classes, images kept, images left out, other members kept)."""
    with tarfile.open(src) as tin:
        members = [m for m in tin.getmembers() if m.isfile()]
        by_class: dict[str, list[tarfile.TarInfo]] = defaultdict(list)
        others = []
        for m in members:
            path = PurePosixPath(m.name)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                by_class[str(path.parent)].append(m)
            else:
                others.append(m)
        keep = [m for ms in by_class.values()
                for m in sorted(ms, key=lambda x: x.name)[:per_class]]
        with tarfile.open(dst, "w") as tout:
            for m in sorted(others + keep, key=lambda x: x.name):
                tout.addfile(m, tin.extractfile(m))
    images = sum(len(ms) for ms in by_class.values())
    return {"classes": len(by_class), "images": len(keep), "left_out": images - len(keep),
            "other_members": len(others)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--per-class", type=int, required=True)
    args = ap.parse_args()
    if args.per_class < 1:
        ap.error("--per-class must be at least 1")
    print(subset(args.src, args.dst, args.per_class))


if __name__ == "__main__":
    main()
