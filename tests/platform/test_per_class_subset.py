"""benchmarks/per_class_subset.py: the first N images of every class folder, other members
kept, bad counts refused."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 255 - value, value // 2)).save(buf, "JPEG")
    return buf.getvalue()


def test_subset_keeps_the_first_images_of_each_class(tmp_path):
    files = {f"train/{c}/{c}_{i}.JPEG": _jpeg(40 * i + (100 if c == "b" else 0))
             for c in ("a", "b") for i in (3, 1, 2)}
    files["wnids.txt"] = b"a\nb\n"
    src, dst = tmp_path / "src.tar", tmp_path / "dst.tar"
    _tar(src, files)
    got = subprocess.run([sys.executable, str(ROOT / "benchmarks/per_class_subset.py"),
                          str(src), str(dst), "--per-class", "2"], capture_output=True,
                         text=True, check=True)
    assert "'images': 4" in got.stdout and "'left_out': 2" in got.stdout
    with tarfile.open(dst) as t:
        names = sorted(t.getnames())
        assert names == ["train/a/a_1.JPEG", "train/a/a_2.JPEG", "train/b/b_1.JPEG",
                         "train/b/b_2.JPEG", "wnids.txt"]
        assert t.extractfile("train/b/b_2.JPEG").read() == files["train/b/b_2.JPEG"]
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks/per_class_subset.py"),
                          str(src), str(dst), "--per-class", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "at least 1" in bad.stderr
