"""Per-image spectral statistics over WebDataset shards, as Ray tasks.

``prism data spectra SHARDS OUT``: one Parquet file per shard, ``OUT/<shard stem>.parquet``,
one row per image, keyed by the sample key. Schema (``STATS_SCHEMA``; the spectra parameters
are in the file's key-value metadata under ``prism.spectra``):

    key string, label int32, height int32, width int32,
    lum_rapsd list<float32>  (n_bins = min(H, W) // 2; entry r - 1 is radius r, luminance)
    rapsd_r, rapsd_g, rapsd_b list<float32>  (the same for each channel)
    dc_power float64 (luminance |X_0|^2), octave_energy list<float32> (luminance, mean-square
    units: octaves {1}, {2}, {3,4}, ..., last with the corners)
    log_A, beta, fit_residual float64 (luminance power-law fit S ~ A f^-beta, natural logs)
    lambda_min, lambda_max float64 (bounds; with log_A and beta the schedule parameters)

Tasks take ``shards_per_task`` shards, are retried (``max_retries``), and a rerun skips shards
whose output exists and was computed with the same settings (``eps_lo``, ``eps_hi``,
``min_span``) from a shard of the same size; an output made otherwise makes the rerun refuse,
naming the difference (``fresh=True``, ``prism data spectra --fresh``, recomputes it). Then
``summary.json``, ``rapsd.png`` and ``histograms.png`` are written.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import storage
from common.progress import progress_bar
from common.ray_local import init_ray
from common.shards import decode_rgb, iter_records, list_shards
from components.spectra import SpectraParams, uint8_statistics
from pipelines.config import SpectraJobConfig
from pipelines.data.spectra_summary import write_summary

STATS_SCHEMA = pa.schema([
    ("key", pa.string()), ("label", pa.int32()), ("height", pa.int32()), ("width", pa.int32()),
    ("lum_rapsd", pa.list_(pa.float32())), ("rapsd_r", pa.list_(pa.float32())),
    ("rapsd_g", pa.list_(pa.float32())), ("rapsd_b", pa.list_(pa.float32())),
    ("dc_power", pa.float64()), ("octave_energy", pa.list_(pa.float32())),
    ("log_A", pa.float64()), ("beta", pa.float64()), ("fit_residual", pa.float64()),
    ("lambda_min", pa.float64()), ("lambda_max", pa.float64()),
])
_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
            "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def spectra_params(cfg: SpectraJobConfig) -> SpectraParams:
    return SpectraParams(eps_lo=cfg.eps_lo, eps_hi=cfg.eps_hi, min_span=cfg.min_span)


def output_url(out: str, shard_url: str) -> str:
    base = shard_url.rsplit("/", 1)[-1]
    stem = base[: -len(".tar.gz")] if base.endswith(".tar.gz") else base[: -len(".tar")]
    return storage.join(out, stem + ".parquet")


def _lists(a: np.ndarray) -> pa.Array:
    """(N, L) -> list<float32> array."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    offsets = np.arange(0, a.size + 1, max(a.shape[1], 1), dtype=np.int32)[: len(a) + 1]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(a.ravel()))


def images_statistics_table(keys: list[str], labels: list[int], images: np.ndarray,
                            params: SpectraParams, batch_size: int = 1024) -> pa.Table:
    """Statistics of same-size uint8 images (N, H, W, 3) as a table with ``STATS_SCHEMA``.

    ``uint8_statistics`` works in cache-sized chunks itself; ``batch_size`` only bounds how
    many images one call holds as float intermediates.
    """
    parts = [uint8_statistics(images[s : s + batch_size], params)
             for s in range(0, len(images), batch_size)]
    st = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    n, h, w = len(images), images.shape[1], images.shape[2]
    cols = {
        "key": pa.array(keys, pa.string()), "label": pa.array(labels, pa.int32()),
        "height": pa.array(np.full(n, h, np.int32)), "width": pa.array(np.full(n, w, np.int32)),
        "lum_rapsd": _lists(st["lum_rapsd"]), "rapsd_r": _lists(st["rgb_rapsd"][:, 0]),
        "rapsd_g": _lists(st["rgb_rapsd"][:, 1]), "rapsd_b": _lists(st["rgb_rapsd"][:, 2]),
        "dc_power": pa.array(st["dc_power"]), "octave_energy": _lists(st["octave_energy"]),
    }
    for name in ("log_A", "beta", "fit_residual", "lambda_min", "lambda_max"):
        cols[name] = pa.array(st[name].astype(np.float64))
    return pa.Table.from_pydict(cols, schema=STATS_SCHEMA)


def shard_statistics(shard_url: str, params: SpectraParams, batch_size: int = 1024) -> pa.Table:
    """Decode one shard and compute every image's statistics (grouped by image size)."""
    groups: dict[tuple[int, ...], tuple[list[str], list[int], list[np.ndarray]]] = {}
    for rec in iter_records(shard_url):
        img = decode_rgb(rec["data"])
        g = groups.setdefault(img.shape, ([], [], []))
        g[0].append(rec["key"])
        g[1].append(rec["label"])
        g[2].append(img)
    tables = [images_statistics_table(k, lab, np.stack(ims), params, batch_size)
              for _, (k, lab, ims) in sorted(groups.items())]
    return pa.concat_tables(tables) if tables else STATS_SCHEMA.empty_table()


def process_shards(shard_urls: list[str], out: str, cfg_json: str,
                   env: dict[str, str]) -> list[tuple[str, int]]:
    """Ray task body: statistics of a few shards, each written atomically; (url, images)."""
    os.environ.update(env)  # the driver's storage settings (not logged)
    cfg = SpectraJobConfig.model_validate_json(cfg_json)
    params = spectra_params(cfg)
    done = []
    for url in shard_urls:
        table = shard_statistics(url, params, cfg.batch_size)
        meta = {b"prism.spectra": json.dumps(cfg.model_dump()).encode(), b"prism.shard":
                url.encode(), b"prism.shard_bytes": str(storage.size(url)).encode()}
        table = table.replace_schema_metadata(meta)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(output_url(out, url), buf.getvalue())
        done.append((url, table.num_rows))
    return done


def _init_ray() -> Any:
    # deferred: ray (~0.3 s to import) only when the job starts; the per-shard functions are
    # used without Ray too (benchmarks, tests)
    import ray

    if os.environ.get("RAY_ADDRESS"):
        init_ray(log_to_driver=False)
    else:
        init_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def _chunks(items: list[str], n: int) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


RESULT_SETTINGS = ("eps_lo", "eps_hi", "min_span")  # the settings the numbers depend on


def stale_reason(out_url: str, shard_url: str, cfg: SpectraJobConfig) -> str | None:
    """Why an existing output does not belong to this run (settings or shard changed), or
    None when it does."""
    meta = pq.read_schema(io.BytesIO(storage.read_bytes(out_url))).metadata or {}
    made = json.loads(meta.get(b"prism.spectra", b"{}"))
    now = cfg.model_dump()
    diffs = [f"{k} {made.get(k)!r} -> {now[k]!r}" for k in RESULT_SETTINGS
             if made.get(k) != now[k]]
    size = meta.get(b"prism.shard_bytes")
    if size is None:
        diffs.append("no record of its shard (an older prism)")
    elif int(size) != storage.size(shard_url):
        diffs.append(f"its shard changed ({int(size)} -> {storage.size(shard_url)} bytes)")
    return "; ".join(diffs) or None


def run_spectra(shards: str, out: str, cfg: SpectraJobConfig | None = None,
                progress: bool = True, summary: bool = True,
                fresh: bool = False) -> dict[str, Any]:
    """Run the job over every shard under SHARDS; returns counts and timings."""
    cfg = cfg or SpectraJobConfig()
    storage.check_access(shards)
    storage.check_access(out)
    urls = list_shards(shards)
    todo, stale = [], []
    for u in urls:
        o = output_url(out, u)
        if not storage.exists(o):
            todo.append(u)
        elif (why := stale_reason(o, u, cfg)) is not None:
            stale.append(f"{o}: {why}")
            todo.append(u)
    if stale and not fresh:
        raise ValueError(
            f"{len(stale)} existing outputs under {out} were made otherwise: "
            + "; ".join(stale[:3]) + (" ..." if len(stale) > 3 else "")
            + ". Mixing them would give statistics under the wrong settings: run again with "
            "--fresh to recompute them, or use another output folder.")
    ray = _init_ray()
    task = ray.remote(process_shards).options(
        num_cpus=1, max_retries=cfg.max_retries, retry_exceptions=True)
    env = {k: os.environ[k] for k in _AWS_ENV if k in os.environ}
    in_flight_max = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending, queue, images = [], list(_chunks(todo, cfg.shards_per_task)), 0
    t0 = time.perf_counter()
    bar = progress_bar(len(urls), "spectra", "shard", initial=len(urls) - len(todo),
                       enabled=progress)  # a bar on a terminal only: no \r-lines in logs
    cfg_json = cfg.model_dump_json()
    while queue or pending:
        while queue and len(pending) < in_flight_max:
            pending.append(task.remote(queue.pop(0), out, cfg_json, env))
        ready, pending = ray.wait(pending, num_returns=1)
        for url_count in ray.get(ready[0]):
            images += url_count[1]
            bar.update(1)
        bar.set_postfix(images_per_s=f"{images / (time.perf_counter() - t0):.0f}")
    bar.close()
    wall = time.perf_counter() - t0
    result = {"shards": len(urls), "shards_done_now": len(todo), "images_now": images,
              "wall_s": wall, "images_per_s": images / wall if wall > 0 else 0.0}
    if summary:
        result["summary"] = write_summary(out, [output_url(out, u) for u in urls], cfg)
    return result
