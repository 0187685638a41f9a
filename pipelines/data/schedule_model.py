"""``prism data schedules STATS OUT``: fit the schedule mixture to per-image parameters.

Reads every ``*.parquet`` statistics file under STATS (written by the spectra job), fits
``components.spectral_schedules.ScheduleModel`` (a Gaussian mixture over
(log_A, beta, lambda_min, lambda_max), optionally per class) and writes it as JSON to OUT
(a file path or URL ending in .json, or a directory that gets ``schedule.json``).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from common import storage
from components.spectral_schedules import PARAM_NAMES, ScheduleModel
from pipelines.config import SchedulesConfig, SpectraJobConfig
from pipelines.data.spectra_summary import read_stats

_log = logging.getLogger(__name__)


def stats_urls(stats: str) -> list[str]:
    urls = [u for u in storage.list_files(stats, (".parquet",))
            if not u.rsplit("/", 1)[-1].startswith(".")]
    if not urls:
        raise FileNotFoundError(f"no statistics .parquet files under {stats}")
    return urls


def fit_schedule_model(stats: str, out: str, cfg: SchedulesConfig | None = None,
                       log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """Fit and save; returns the saved JSON dict."""
    cfg = cfg or SchedulesConfig()
    storage.check_access(out)
    urls = stats_urls(stats)
    table = read_stats(urls, ["label", *PARAM_NAMES])
    params = np.stack([table[c].to_numpy() for c in PARAM_NAMES], axis=1)
    labels = table["label"].to_numpy()

    meta_raw = pq.read_schema(io.BytesIO(storage.read_bytes(urls[0]))).metadata or {}
    spectra_cfg = json.loads(meta_raw.get(b"prism.spectra", b"{}"))
    meta = {"images": int(len(params)), "stats": stats, "kind": cfg.kind,
            "spectra": spectra_cfg, "schedules": cfg.model_dump()}
    min_span = float(spectra_cfg.get("min_span", SpectraJobConfig().min_span))
    model = ScheduleModel.fit(params, labels, cfg.n_components, cfg.per_class, cfg.seed,
                              min_span, meta)
    doc = model.to_json()
    url = out if out.endswith(".json") else storage.join(out, "schedule.json")
    storage.write_bytes(url, json.dumps(doc, indent=1).encode())
    log(f"schedule model: {len(params)} images, {len(model.global_mixture.weights)} components"
        f", {len(model.per_class)} classes -> {url}")
    return doc
