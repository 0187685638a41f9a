"""Ingest of bad inputs: convertible ones converted, the rest recorded; counts reconcile."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from common.shards import iter_samples, list_shards
from pipelines.config import IngestConfig
from pipelines.data.ingest import ingest


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    data = bytearray(_png(np.zeros((8, 8, 3), np.uint8)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _cases() -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, expected error reason prefix or None when it must be written)."""
    pal = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pbuf = io.BytesIO()
    pal.save(pbuf, format="PNG")
    cmyk = io.BytesIO()
    Image.fromarray(RGB).convert("CMYK").save(cmyk, format="JPEG")
    g16 = io.BytesIO()
    Image.fromarray((RNG.integers(0, 65536, (32, 32))).astype(np.uint16)).save(g16, "PNG")
    good = _jpeg(RGB)
    return {
        "ok.jpg": (good, None),
        "truncated.jpg": (good[: len(good) // 2], "truncated or corrupt image"),
        "empty.jpg": (b"", "empty file"),
        "text.jpg": (b"this is not an image\n" * 10, "not a decodable image"),
        "gray.png": (_png(RGB[..., 0]), None),
        "rgba.png": (_png(np.dstack([RGB, RGB[..., :1]]), "RGBA"), None),
        "cmyk.jpg": (cmyk.getvalue(), None),
        "gray16.png": (g16.getvalue(), None),
        "palette.png": (pbuf.getvalue(), None),
        "small.png": (_png(RGB[:16, :16]), "smaller than target size"),
        "bomb.png": (_bomb_png(100_000, 100_000), "decompression bomb"),
        "big.png": (_png(RNG.integers(0, 256, (64, 48, 3), dtype=np.uint8)), None),
    }


def _check_counts(dest: Path, n_inputs: int) -> tuple[set[str], dict[str, str]]:
    manifest = pq.read_table(dest / "manifest.parquet").to_pylist()
    errors = pq.read_table(dest / "errors.parquet").to_pylist()
    assert len(manifest) + len(errors) == n_inputs
    return {r["key"] for r in manifest}, {r["key"]: r["reason"] for r in errors}


def test_bad_files_in_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    cases = _cases()
    for name, (data, _) in cases.items():
        (src / name).write_bytes(data)
    (src / "notes.txt").write_text("ignored: not an image extension")
    result = ingest(str(src), str(tmp_path / "out"), IngestConfig(size=32, shard_size=100))
    assert result.line().startswith(f"inputs = written + errors: {len(cases)} = ")
    written, errors = _check_counts(tmp_path / "out", len(cases))
    assert result.inputs == len(cases) == result.written + result.errors
    for name, (_, reason) in cases.items():
        key = name.split(".")[0]
        if reason is None:
            assert key in written, f"{name} should have been converted and written"
        else:
            assert errors[key].startswith(reason), (name, errors.get(key))
    samples = {s["key"]: s for s in iter_samples(list_shards(str(tmp_path / "out"))[0])}
    for s in samples.values():
        assert s["image"].shape == (32, 32, 3) and s["image"].dtype == np.uint8
    g16 = samples["gray16"]["image"]  # scaled from 16 bits, not clipped at 255
    assert 60 < g16.mean() < 200 and g16.std() > 30
    np.testing.assert_array_equal(samples["gray"]["image"][..., 0], RGB[..., 0])


def test_unsafe_tar_member_and_duplicate_keys(tmp_path: Path) -> None:
    tar_path = tmp_path / "in.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, name in enumerate(("a/x.png", "a/y.png", "../evil.png", "b/x.png", "a/x.png")):
            good = _png(RGB ^ np.uint8(i))  # distinct images (identical ones are duplicates)
            info = tarfile.TarInfo(name)
            info.size = len(good)
            tar.addfile(info, io.BytesIO(good))
    ingest(str(tar_path), str(tmp_path / "out"), IngestConfig(shard_size=10))
    written, errors = _check_counts(tmp_path / "out", 5)
    assert written == {"a_x", "a_y", "b_x"}
    reasons = sorted(errors.values())
    assert reasons[0].startswith("duplicate key") and reasons[1].startswith("unsafe path")
    assert not (tmp_path / "evil.png").exists() and not (tmp_path.parent / "evil.png").exists()


def test_bad_npz_and_missing_source(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        ingest(str(tmp_path / "bad.npz"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="not found"):
        ingest(str(tmp_path / "nothing"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="exactly one of shard_size and shard_bytes"):
        IngestConfig(shard_size=None)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    from pipelines.data.images import prepare_image

    # a 40x20 image whose left half is red, stored with "rotate 90 CW to display" (6)
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95, exif=exif)
    ext, data, w, h = prepare_image(buf.getvalue(), None, 10**8)
    up = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert (w, h) == (20, 40) and up.shape == (40, 20, 3) and ext == "png"
    assert up[:20, :, 0].mean() > 200 and up[20:, :, 0].mean() < 50  # red on top: upright


def test_resharding_does_not_copy_dangerous_keys(tmp_path: Path) -> None:
    # a hostile shard in prism's format: keys that are paths out of the tar
    shard = tmp_path / "in" / "evil-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for i, key in enumerate(("ok", "../../evil", "/abs/evil2", "dir/fine")):
            for ext, data in (("png", _png(RGB ^ np.uint8(i))), ("cls", b"0")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ingest(str(tmp_path / "in"), str(tmp_path / "out"), IngestConfig(shard_size=10))
    names = [m for s in (tmp_path / "out").glob("*.tar*") for m in tarfile.open(s).getnames()]
    assert names and not any(n.startswith("/") or ".." in n or "/" in n for n in names), names
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").column("reason").to_pylist()
    assert sorted(e.split(":")[0] for e in errors) == ["unsafe path in shard key"] * 2


def test_links_animations_and_duplicates_are_recorded_not_dropped(tmp_path: Path) -> None:
    import os

    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(RGB ^ np.uint8(7)))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(_png(RGB))
    (src / "copy_of_a.png").write_bytes(_png(RGB))  # byte-identical
    os.symlink(outside, src / "link.png")  # leads out of the folder
    frames = [Image.fromarray(RGB ^ np.uint8(k)) for k in range(3)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    ingest(str(src), str(tmp_path / "out"), IngestConfig(shard_size=10, size=None))
    written, errors = _check_counts(tmp_path / "out", 4)
    assert len(written) == 1
    reasons = sorted(r.split(":")[0].split(" (")[0] for r in errors.values())
    assert reasons == ["animated image", "duplicate content",
                       "symbolic link to a file outside the source folder"], errors
    # in a tar: link members are records too
    tar_path = tmp_path / "in.tar"
    with tarfile.open(tar_path, "w") as tar:
        data = _png(RGB)
        info = tarfile.TarInfo("img/real.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for kind, name in ((tarfile.SYMTYPE, "img/sym.png"), (tarfile.LNKTYPE, "img/hard.png")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "img/real.png"
            tar.addfile(info)
    ingest(str(tar_path), str(tmp_path / "out2"), IngestConfig(shard_size=10, size=None))
    written, errors = _check_counts(tmp_path / "out2", 3)
    assert sorted(r.split(" link")[0] for r in errors.values()) == ["tar hard", "tar symbolic"]
