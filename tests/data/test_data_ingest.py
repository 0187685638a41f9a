"""Ingest: input layouts, shard sizes, determinism, original bytes, reruns, demo corpus."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from common.shards import iter_records, iter_samples, list_shards
from pipelines.config import DemoConfig, IngestConfig
from pipelines.data.demo import PHOTOGRAPHS, build_demo
from pipelines.data.ingest import ingest


def _images(n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _per_class_folder(root: Path, n_per_class: int = 6) -> Path:
    for c, name in enumerate(("cat", "dog", "owl")):
        (root / name).mkdir(parents=True)
        for i, im in enumerate(_images(n_per_class, seed=c)):
            Image.fromarray(im).save(root / name / f"{i}.png")
    return root


def _all(dest: Path) -> dict[str, dict]:
    return {s["key"]: s for u in list_shards(str(dest)) for s in iter_samples(u)}


def test_per_class_folder_labels_and_original_bytes(tmp_path: Path) -> None:
    src = _per_class_folder(tmp_path / "src")
    r = ingest(str(src), str(tmp_path / "out"), IngestConfig(size=32, shard_size=5))
    assert (r.inputs, r.written, r.errors, r.classes) == (18, 18, 0, ["cat", "dog", "owl"])
    shards = list_shards(str(tmp_path / "out"))
    assert [Path(s).name for s in shards] == [f"shard-{i:06d}.tar" for i in range(4)]
    samples = _all(tmp_path / "out")
    assert samples["dog_3"]["label"] == 1 and samples["owl_0"]["label"] == 2
    np.testing.assert_array_equal(samples["cat_2"]["image"], _images(6, seed=0)[2])
    # stored bytes are the original PNG bytes, checksum in the manifest
    manifest = {m["key"]: m for m in pq.read_table(tmp_path / "out/manifest.parquet").to_pylist()}
    original = (src / "cat" / "2.png").read_bytes()
    assert manifest["cat_2"]["checksum"] == hashlib.sha256(original).hexdigest()
    rec = next(r for u in shards for r in iter_records(u) if r["key"] == "cat_2")
    assert rec["data"] == original and rec["source"] == "cat/2.png"


def test_resized_images_are_lossless_png_and_antialiased(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    stripes = np.zeros((64, 96, 3), np.uint8)
    stripes[:, ::2] = 255  # Nyquist stripes: anti-aliasing must average them to grey
    Image.fromarray(stripes).save(src / "s.jpg", quality=100)
    ingest(str(src), str(tmp_path / "out"), IngestConfig(size=32, shard_size=10))
    rec = next(iter_records(list_shards(str(tmp_path / "out"))[0]))
    assert rec["ext"] == "png"
    img = np.asarray(Image.open(io.BytesIO(rec["data"])))
    assert img.shape == (32, 32, 3) and abs(float(img.mean()) - 127.5) < 12 and img.std() < 20


def test_npz_tar_gz_and_shards_input(tmp_path: Path) -> None:
    x = np.stack(_images(7))
    np.savez(tmp_path / "set.npz", x=x, y=np.arange(7) % 3)
    r = ingest(str(tmp_path / "set.npz"), str(tmp_path / "a"),
               IngestConfig(shard_size=3, gzip=True, shuffle=False))
    assert r.written == 7
    shards = list_shards(str(tmp_path / "a"))
    assert all(s.endswith(".tar.gz") for s in shards) and len(shards) == 3
    samples = _all(tmp_path / "a")
    np.testing.assert_array_equal(samples["set_000004"]["image"], x[4])
    assert samples["set_000004"]["label"] == 1
    # existing WebDataset shards as input keep keys, labels and pixels
    r2 = ingest(str(tmp_path / "a"), str(tmp_path / "b"), IngestConfig(shard_size=100))
    assert r2.written == 7
    again = _all(tmp_path / "b")
    assert set(again) == set(samples)
    np.testing.assert_array_equal(again["set_000006"]["image"], x[6])
    assert again["set_000006"]["label"] == 0
    # a tar of images, one folder per class
    with tarfile.open(tmp_path / "imgs.tar", "w") as tar:
        for i, im in enumerate(_images(4)):
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            info = tarfile.TarInfo(f"train/{'ab'[i % 2]}/{i}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    r3 = ingest(str(tmp_path / "imgs.tar"), str(tmp_path / "c"), IngestConfig())
    assert r3.classes == ["a", "b"] and _all(tmp_path / "c")["train_b_3"]["label"] == 1


def test_deterministic_shuffle_byte_shards_and_rerun(tmp_path: Path) -> None:
    src = _per_class_folder(tmp_path / "src", 10)
    cfg = IngestConfig(shard_size=None, shard_bytes=20_000, seed=3)
    ingest(str(src), str(tmp_path / "o1"), cfg)
    ingest(str(src), str(tmp_path / "o2"), cfg)
    s1, s2 = list_shards(str(tmp_path / "o1")), list_shards(str(tmp_path / "o2"))
    assert len(s1) > 2
    assert [Path(a).read_bytes() for a in s1] == [Path(b).read_bytes() for b in s2]
    for s in s1[:-1]:
        assert 20_000 <= Path(s).stat().st_size < 20_000 + 12_000
    other = ingest(str(src), str(tmp_path / "o3"), cfg.model_copy(update={"seed": 4}))
    assert Path(list_shards(str(tmp_path / "o3"))[0]).read_bytes() != Path(s1[0]).read_bytes()
    assert other.written == 30
    # rerun: finished shards are skipped (not rewritten), a missing one is rebuilt
    mtimes = [Path(s).stat().st_mtime_ns for s in s1]
    Path(s1[1]).unlink()
    r = ingest(str(src), str(tmp_path / "o1"), cfg)
    assert r.skipped_shards == len(s1) - 1 and r.written == 30
    assert Path(s1[0]).stat().st_mtime_ns == mtimes[0]
    assert Path(s1[1]).read_bytes() == Path(s2[1]).read_bytes()


def test_demo_corpus_is_deterministic(tmp_path: Path) -> None:
    n = build_demo(tmp_path / "d1", DemoConfig(per_class=4))
    build_demo(tmp_path / "d2", DemoConfig(per_class=4))
    assert n == 4 * len(PHOTOGRAPHS)
    f1 = sorted(p.relative_to(tmp_path / "d1") for p in (tmp_path / "d1").rglob("*.png"))
    assert len(f1) == n
    assert all((tmp_path / "d1" / f).read_bytes() == (tmp_path / "d2" / f).read_bytes()
               for f in f1)
    r = ingest(str(tmp_path / "d1"), str(tmp_path / "s"), IngestConfig(size=32))
    assert r.written == n and len(r.classes) == len(PHOTOGRAPHS)


def test_cifar10_subset_from_shared_data(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "cifar10" / "test.tar"
    if not src.exists():
        pytest.skip(f"{src} not present")
    small = tmp_path / "cifar_small.tar"
    with tarfile.open(src) as tin, tarfile.open(small, "w") as tout:
        n = 0
        for m in tin:
            if m.isfile() and n < 300:
                tout.addfile(m, tin.extractfile(m))
                n += 1
    r = ingest(str(small), str(tmp_path / "out"), IngestConfig(size=32, shard_size=128))
    assert r.written == 300 and r.errors == 0
    recs = [x for u in list_shards(str(tmp_path / "out")) for x in iter_records(u)]
    assert all(x["ext"] == "jpg" for x in recs)  # JPEGs at 32x32 keep their bytes


def _sources(dest: Path) -> list[str]:
    return pq.read_table(dest / "manifest.parquet").column("source").to_pylist()


def test_rerun_after_the_source_changed_refuses_then_fresh_writes_each_once(tmp_path) -> None:
    # 129 images, shards of 50; then 10 more in a subfolder (before: 9 images written twice
    # and 9 never, because finished shards were skipped by position in a re-shuffled list)
    src = tmp_path / "src"
    src.mkdir()
    for i, im in enumerate(_images(129, size=8)):
        Image.fromarray(im).save(src / f"{i:03d}.png")
    cfg, out = IngestConfig(shard_size=50, size=None), tmp_path / "out"
    ingest(str(src), str(out), cfg)
    (src / "more").mkdir()
    for i, im in enumerate(_images(10, size=8, seed=1)):
        Image.fromarray(im).save(src / "more" / f"{i}.png")
    with pytest.raises(ValueError, match=r"inputs: 129 -> 139 \(10 added, 0 removed\).*--fresh"):
        ingest(str(src), str(out), cfg)
    assert len(_sources(out)) == 129  # the earlier output is untouched
    r = ingest(str(src), str(out), cfg, fresh=True)
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png"))
    assert r.written == 139 and sorted(_sources(out)) == files  # every file exactly once
    assert len(list_shards(str(out))) == 3
    # the same inputs and settings again: resumed, nothing rewritten
    assert ingest(str(src), str(out), cfg).skipped_shards == 3


def test_rerun_with_other_settings_names_them(tmp_path) -> None:
    src = _per_class_folder(tmp_path / "src", 4)
    ingest(str(src), str(tmp_path / "out"), IngestConfig(size=None))
    with pytest.raises(ValueError, match=r"setting size: None -> 16"):
        ingest(str(src), str(tmp_path / "out"), IngestConfig(size=16))
    r = ingest(str(src), str(tmp_path / "out"), IngestConfig(size=16), fresh=True)
    sizes = pq.read_table(tmp_path / "out" / "manifest.parquet").select(["width", "height"])
    assert r.written == 12 and set(map(tuple, sizes.to_pylist()[0].items())) == {
        ("width", 16), ("height", 16)}
    assert {tuple(r.values()) for r in sizes.to_pylist()} == {(16, 16)}


def test_a_file_name_that_is_not_utf8_is_ingested(tmp_path) -> None:
    import os

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(_images(1, size=8)[0]).save(src / "ok.png")
    name = os.fsencode(str(src)) + b"/caf\xe9.png"  # Latin-1 bytes: not valid UTF-8
    with open(name, "wb") as f:
        Image.fromarray(_images(1, size=8, seed=2)[0]).save(f, format="PNG")
    r = ingest(str(src), str(tmp_path / "out"), IngestConfig(size=None))
    assert r.written == 2 and sorted(_sources(tmp_path / "out")) == ["caf\\xe9.png", "ok.png"]


_PEAK_RSS = """
import resource, sys
from pipelines.config import IngestConfig
from pipelines.data.ingest import ingest
ingest(sys.argv[1], sys.argv[2], IngestConfig(size=32, shard_size=1000), log=lambda *_: None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def _peak_rss_mib(src: Path, out: Path) -> int:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(src), str(out)], check=True,
                       capture_output=True, text=True)
    return int(r.stdout.strip().splitlines()[-1])


def test_tar_ingest_memory_does_not_grow_with_the_tar(tmp_path) -> None:
    # a 130 MB tar of incompressible 1200x1200 PNGs, against a 1-image tar: the peak memory of
    # the ingest may grow by a few images' worth, not by the tar (it grew by about 3x the tar)
    rng = np.random.default_rng(0)
    big, small = tmp_path / "big.tar", tmp_path / "small.tar"
    for path, n in ((big, 30), (small, 1)):
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (1200, 1200, 3), dtype=np.uint8)).save(
                    png, format="PNG", compress_level=0)
                data = png.getvalue()
                info = tarfile.TarInfo(f"img/{i:03d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert big.stat().st_size > 120 * 2**20
    base = _peak_rss_mib(small, tmp_path / "o1")
    peak = _peak_rss_mib(big, tmp_path / "o2")
    assert peak - base < 60, (base, peak)
    assert len(pq.read_table(tmp_path / "o2" / "manifest.parquet")) == 30


@pytest.mark.parametrize("small", ["reject", "upscale", "pad"])
def test_images_below_the_size_follow_the_policy_and_rejections_are_explained(tmp_path, small):
    src = tmp_path / "src"
    src.mkdir()
    tiny = np.full((16, 16, 3), 200, dtype=np.uint8)
    Image.fromarray(tiny).save(src / "tiny.png")
    Image.fromarray(_images(1, size=40)[0]).save(src / "big.png")
    lines: list[str] = []
    r = ingest(str(src), str(tmp_path / "out"), IngestConfig(size=32, small=small),
               log=lines.append)
    if small == "reject":
        assert r.written == 1 and r.errors == 1
        assert any("rejected 1: smaller than target size" in x and "tiny.png" in x
                   for x in lines), lines
        assert any(x.strip().startswith("every rejection:") and "errors.parquet" in x
                   for x in lines), lines
        return
    assert r.written == 2 and not any("rejected" in x for x in lines)
    out = {s["source"]: s["image"] for s in _all(tmp_path / "out").values()}
    up = out["tiny.png"]
    assert up.shape == (32, 32, 3)
    if small == "upscale":
        assert abs(float(up.mean()) - 200) < 2  # a flat image stays flat when enlarged
    else:  # centered on black, never resampled
        assert (up[8:24, 8:24] == 200).all() and up[:8].max() == 0 and up[:, 24:].max() == 0
