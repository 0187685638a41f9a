"""Ingest: a folder / tar / .npz / WebDataset shards of images -> WebDataset shards + manifest.

Output under DEST (a local directory or ``s3://bucket/prefix``):

    <name>-000000.tar[.gz] ...   samples <key>.{jpg|png}, <key>.cls, <key>.json (see shards.py)
    manifest.parquet             key, shard, label, size (bytes), checksum (sha256), width,
                                 height, source
    errors.parquet               source, key, reason: every input not written
    ingest.json                  counts (inputs = written + errors), classes, config
    _parts/<shard>.parquet       per-shard rows; a shard with its part is done (reruns skip it)
    _parts/plan.json             what the shards are made of: the settings and a digest of the
                                 ordered inputs

Re-runs: a run into a DEST that holds finished shards resumes only when the plan is the same
(same inputs in the same order, same settings): then every finished shard is exactly what this
run would write. When the inputs or settings changed, it refuses and names what changed;
``fresh=True`` (``prism data ingest --fresh``) deletes the earlier shards and starts over.

Images already at the target size (and RGB JPEG/PNG) keep their original bytes; converted,
center-cropped or resized (Lanczos, anti-aliased) images are stored as lossless PNG.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import storage
from common.progress import progress_bar
from common.shards import ShardWriter, shard_name
from pipelines.config import IngestConfig
from pipelines.data.images import BadImage, prepare_image
from pipelines.data.sources import SourceItem, enumerate_source

PART_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("label", pa.int32()), ("size", pa.int64()),
    ("checksum", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("source", pa.string()), ("reason", pa.string()),  # reason null: written
])
_log = logging.getLogger(__name__)
Log = Callable[[str], None]


@dataclass
class IngestResult:
    inputs: int
    written: int
    errors: int
    shards: list[str] = field(default_factory=list)
    skipped_shards: int = 0
    classes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"inputs = written + errors: {self.inputs} = {self.written} + {self.errors} "
                f"({len(self.shards)} shards, {self.skipped_shards} already done)")


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PART_SCHEMA)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _write_item(item: SourceItem, cfg: IngestConfig, writer: ShardWriter, shard: str,
                label: int, seen: dict[str, str]) -> dict[str, Any]:
    """Write one input; ``seen`` maps the checksum of every image written so far to its source
    (a byte-identical later input is recorded as a duplicate, not written twice)."""
    row = {"key": item.key, "shard": shard, "label": label, "source": item.source}
    if item.error is not None:
        return {**row, "reason": item.error}
    try:
        ext, data, w, h = prepare_image(item.load(), cfg.size, cfg.max_pixels, cfg.small)
    except BadImage as exc:
        return {**row, "reason": str(exc)}
    checksum = hashlib.sha256(data).hexdigest()
    if checksum in seen:
        return {**row, "reason": f"duplicate content: the same image as {seen[checksum]!r}"}
    seen[checksum] = item.source
    writer.write(item.key, ext, data, label,
                 {"key": item.key, "label": label, "source": item.source, "width": w, "height": h})
    return {**row, "size": len(data), "checksum": checksum, "width": w, "height": h,
            "reason": None}


def _full(writer: ShardWriter, cfg: IngestConfig) -> bool:
    if cfg.shard_size is not None:
        return writer.count >= cfg.shard_size
    return writer.nbytes >= (cfg.shard_bytes or 0)


class PlanChanged(ValueError):
    """DEST holds shards made from other inputs or settings."""


def _plan(items: list[SourceItem], cfg: IngestConfig) -> dict[str, Any]:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.source.encode("utf-8", "backslashreplace") + b"\0")
    plan: dict[str, Any] = {"inputs": len(items), "inputs_sha256": digest.hexdigest(),
                            "config": cfg.model_dump(mode="json")}
    if len(items) <= 200_000:  # to say what was added or removed (bounded file size)
        plan["sources"] = [i.source for i in items]
    return plan


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two plans, in words."""
    out = [f"setting {k}: {old['config'].get(k)!r} -> {v!r}"
           for k, v in new["config"].items() if old["config"].get(k) != v]
    if old["inputs_sha256"] != new["inputs_sha256"]:
        if "sources" in old and "sources" in new:
            before, after = set(old["sources"]), set(new["sources"])
            added, removed = len(after - before), len(before - after)
            how = f" ({added} added, {removed} removed" + \
                (", order changed)" if not added and not removed else ")")
        else:
            how = " (other files)"
        out.append(f"inputs: {old['inputs']} -> {new['inputs']}{how}")
    return out


def _check_plan(dest: str, plan: dict[str, Any], fresh: bool, log: Log) -> None:
    """Refuse to resume from shards of another plan; with ``fresh``, delete them first."""
    parts = storage.join(dest, "_parts")
    done = [u for u in _listing(parts) if u.endswith(".parquet")]
    plan_url = storage.join(parts, "plan.json")
    old = json.loads(storage.read_bytes(plan_url)) if storage.exists(plan_url) else None
    if done and not fresh and (old is None or _changes(old, plan)):
        what = _changes(old, plan) if old else ["no plan.json: made by an older prism"]
        raise PlanChanged(
            f"{dest} holds {len(done)} finished shards made from other inputs or settings: "
            + "; ".join(what) + ". Resuming would mix them (images lost or written twice). "
            "Run again with --fresh to delete them and start over, or use another destination.")
    if fresh and (done or old):
        shards = [u for u in _listing(dest) if u.rsplit("/", 1)[-1].endswith((".tar", ".tar.gz"))]
        for url in done + shards + [plan_url]:
            storage.delete(url)
        log(f"--fresh: deleted {len(shards)} shards and {len(done)} part files under {dest}")
    storage.write_bytes(plan_url, json.dumps(plan, indent=1).encode())


def _listing(url: str) -> list[str]:
    try:
        return storage.list_files(url)
    except storage.StorageError:  # no such directory yet
        return []


def ingest(src: str, dest: str, cfg: IngestConfig | None = None, log: Log = _log.info,
           fresh: bool = False) -> IngestResult:
    """Turn SRC into shards under DEST (see module docstring); returns the counts.

    ``log`` takes the status lines: what ``--fresh`` deleted, the rejections by reason; the
    counts themselves are the result (``IngestResult.line()``)."""
    cfg = cfg or IngestConfig()
    storage.check_access(dest)
    items, classes = enumerate_source(src)
    order = np.random.default_rng(cfg.seed).permutation(len(items)) if cfg.shuffle \
        else np.arange(len(items))
    items = [items[i] for i in order]
    _check_plan(dest, _plan(items, cfg), fresh, log)
    class_index = {c: i for i, c in enumerate(classes)}
    rows: list[dict[str, Any]] = []
    shards: list[str] = []
    skipped, pos, index = 0, 0, 0
    seen: dict[str, str] = {}  # checksum -> source of every image written
    with storage.LocalStaging() as stage, progress_bar(len(items), "ingest", "img",
                                                       log=_log) as bar:
        while pos < len(items):
            name = shard_name(cfg.name, index, cfg.gzip)
            shard_url, part_url = storage.join(dest, name), storage.join(dest, "_parts",
                                                                         name + ".parquet")
            if storage.exists(part_url) and storage.exists(shard_url):  # done by an earlier run
                part = pq.read_table(io.BytesIO(storage.read_bytes(part_url))).to_pylist()
                seen.update((r["checksum"], r["source"]) for r in part if r["reason"] is None)
                rows += part
                pos += len(part)
                skipped += 1
                bar.update(len(part))
            else:
                writer, part = ShardWriter(stage / name, cfg.gzip), []
                while pos < len(items) and not _full(writer, cfg):
                    item = items[pos]
                    label = item.label if item.label is not None else \
                        class_index.get(item.class_name or "", -1)
                    part.append(_write_item(item, cfg, writer, name, label, seen))
                    pos += 1
                    bar.update()
                writer.close()
                if writer.count == 0 and pos >= len(items) and shards:
                    rows += [{**r, "shard": shards[-1]} for r in part]  # only errors left over
                    _append_part(dest, shards[-1], part)
                    break
                storage.put_file(stage / name, shard_url)  # atomic; then the part marks it done
                storage.write_bytes(part_url, _parquet_bytes(_table(part)))
                (stage / name).unlink()
                rows += part
                _log.debug("wrote %s: %d inputs, %d images", shard_url, len(part), writer.count)
            shards.append(name)
            index += 1
    return _finish(dest, rows, shards, skipped, classes, cfg, src, log)


def _append_part(dest: str, shard: str, extra: list[dict[str, Any]]) -> None:
    """Leftover error rows after the last shard go into that shard's part file."""
    url = storage.join(dest, "_parts", shard + ".parquet")
    old = pq.read_table(io.BytesIO(storage.read_bytes(url))).to_pylist()
    extra = [{**r, "shard": shard} for r in extra]
    storage.write_bytes(url, _parquet_bytes(_table(old + extra)))


def _finish(dest: str, rows: list[dict[str, Any]], shards: list[str], skipped: int,
            classes: list[str], cfg: IngestConfig, src: str, log: Log) -> IngestResult:
    table = _table(rows)
    ok = [r for r in rows if r["reason"] is None]
    bad = [{"source": r["source"], "key": r["key"], "reason": r["reason"]}
           for r in rows if r["reason"] is not None]
    manifest = _table(ok).drop_columns(["reason"])
    storage.write_bytes(storage.join(dest, "manifest.parquet"), _parquet_bytes(manifest))
    err_schema = pa.schema([("source", pa.string()), ("key", pa.string()),
                            ("reason", pa.string())])
    storage.write_bytes(storage.join(dest, "errors.parquet"),
                        _parquet_bytes(pa.Table.from_pylist(bad, schema=err_schema)))
    result = IngestResult(len(table), len(ok), len(bad), shards, skipped, classes)
    assert result.inputs == result.written + result.errors
    summary = {"inputs": result.inputs, "written": result.written, "errors": result.errors,
               "shards": shards, "classes": classes, "source": _redact(src),
               "config": cfg.model_dump(),
               "error_reasons": _reason_counts(bad)}
    storage.write_bytes(storage.join(dest, "ingest.json"),
                        json.dumps(summary, indent=2).encode())
    if bad:  # why, grouped by reason, with an example and where the full list is
        for reason, n in sorted(summary["error_reasons"].items(), key=lambda kv: -kv[1]):
            example = next(r for r in bad if r["reason"].split(":")[0] == reason)
            log(f"rejected {n}: {reason} (e.g. {example['source']}: {example['reason']})")
        log(f"every rejection: {storage.join(dest, 'errors.parquet')}")
    return result


def _reason_counts(bad: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in bad:
        kind = r["reason"].split(":")[0]
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items()))


def _redact(url: str) -> str:
    """Strip anything credential-like from a URL before it is written out."""
    return re.sub(r"//[^/@]*@", "//", url)

