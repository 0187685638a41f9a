"""The shard reader's own tar header parser agrees with ``tarfile`` member for member, and
hands archives it does not handle to ``tarfile``."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from common.shards import ShardWriter, tar_members


def _reference(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _tar(members: list[tuple[str, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        d = tarfile.TarInfo("folder")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [("k1.png", b"\x89PNG" + bytes(700)), ("k1.cls", b"3"), ("k1.json", b"{}"),
           ("sub/" + "x" * 150 + ".png", b"long name " * 60),  # GNU long name / ustar prefix
           ("empty.txt", b""), ("k2.png", bytes(range(256)) * 3)]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_fast_reader_matches_tarfile(fmt):
    members = MEMBERS if fmt == tarfile.GNU_FORMAT else [
        m for m in MEMBERS if len(m[0]) < 100] + [("p" * 90 + "/" + "q" * 60 + ".png", b"u")]
    raw = _tar(members, fmt)
    assert tar_members(raw) == _reference(raw) == members
    assert tar_members(gzip.compress(raw)) == members


def test_pax_archives_go_through_tarfile():
    raw = _tar([("ключ.png", b"pax needs a header for this name"), ("k.cls", b"1")],
               tarfile.PAX_FORMAT)
    assert tar_members(raw) == _reference(raw)
    assert [n for n, _ in tar_members(raw)] == ["ключ.png", "k.cls"]


def test_a_damaged_header_is_an_error_not_a_shorter_shard():
    raw = bytearray(_tar(MEMBERS, tarfile.GNU_FORMAT))
    raw[512 + 130] ^= 0x01  # a size digit of the first file's header: checksum mismatch
    assert len(_reference(bytes(raw))) < len(MEMBERS)  # tarfile stops there, silently
    with pytest.raises(tarfile.ReadError, match="checksum at byte 512"):
        tar_members(bytes(raw))


def test_shard_writer_output_reads_back(tmp_path: Path):
    w = ShardWriter(tmp_path / "s.tar.gz", gzip=True)
    for i in range(50):
        w.write(f"key-{i:03d}", "png", bytes([i]) * (i + 1), i % 7, {"key": f"key-{i:03d}"})
    w.close()
    raw = (tmp_path / "s.tar.gz").read_bytes()
    assert tar_members(raw) == _reference(raw)
    assert len(tar_members(raw)) == 150


def test_shards_are_webdatasets_own_format(tmp_path: Path):
    """A shard written by prism (through ``webdataset.TarWriter``) reads back with a plain
    ``wds.WebDataset(urls)``, sample for sample, and through prism's fast header reader (no
    fall-back to ``tarfile``); writing the same samples twice gives the same bytes."""
    import webdataset as wds

    from common.shards import _fast_members, iter_records

    def write(path: Path) -> bytes:
        w = ShardWriter(path, gzip=True)
        for i in range(20):
            w.write(f"img-{i:03d}", "png", bytes([i, 255 - i]) * (i + 3), i % 5,
                    {"key": f"img-{i:03d}", "label": i % 5})
        w.close()
        return path.read_bytes()

    raw = write(tmp_path / "a-000000.tar.gz")
    assert write(tmp_path / "b-000000.tar.gz") == raw
    assert len(_fast_members(gzip.decompress(raw))) == 60
    samples = list(wds.WebDataset(str(tmp_path / "a-000000.tar.gz"), shardshuffle=False))
    ours = list(iter_records(str(tmp_path / "a-000000.tar.gz")))
    assert [s["__key__"] for s in samples] == [r["key"] for r in ours]
    for s, r in zip(samples, ours, strict=True):
        assert s["png"] == r["data"] and int(s["cls"]) == r["label"]
        assert set(s) >= {"__key__", "png", "cls", "json"}


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_expand_tars_gives_webdatasets_tar_expansion(fmt):
    """``expand_tars`` is a drop-in for webdataset's ``tar_file_expander`` (the training stream's
    tar expansion stage): the same file records, end-of-shard markers and skipped metadata
    members, for plain and gzip shards, on the fast path and through ``tarfile``."""
    from webdataset.tariterators import tar_file_expander

    from common.shards import expand_tars

    members = [*MEMBERS, ("__index__", b"metadata"), ("k3.png", b"three")]
    if fmt == tarfile.PAX_FORMAT:
        members.append(("ключ.png", b"pax header"))
    raw = _tar(members, fmt)
    for data in (raw, gzip.compress(raw)):
        sources = [{"url": f"s{i}", "stream": io.BytesIO(data)} for i in range(2)]
        ours = list(expand_tars(sources))
        for s in sources:
            s["stream"].seek(0)
        assert ours == list(tar_file_expander(sources))
        assert ours.count({}) == 2 and {"fname": "k3.png", "data": b"three",
                                        "__url__": "s1"} in ours
