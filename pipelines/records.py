"""Stage outputs -> the flat files that ``dvc metrics`` and ``dvc plots`` read.

DVC plots want a JSON list of records (one object per x value, one field per series); DVC
metrics want a JSON mapping of numbers, and ``dvc metrics show`` prints one row per file with
the union of every file's keys as columns. The stages write richer JSON (columns, nested
settings); each function here reads one of those and returns the flat form:

=============  ============================================  ===================================
kind           source                                        result
=============  ============================================  ===================================
loss           ``runs/<name>/metrics.jsonl`` (training)      [{step, images_seen, loss, lr, ...}]
rapsd          ``stats/summary.json`` (prism data spectra)   [{frequency, mean, q05, q50, q95}]
chromatogram   ``prism science chromatogram`` JSON           [{t, lambda, tau, level_0, ...}]
schedules      ``prism science schedules`` JSON              [{t, cosine, sid2_32, ...}] (lambda)
eval           ``metrics_table.json`` (prism eval run)       a directory: one
                                                             ``<schedule>-<steps>.json`` per row
                                                             with the headline metrics (the
                                                             same columns for every model)
eval-steps     ``metrics_table.json``                        [{steps, schedule, metric: x, ...}]
register       ``register.json`` (prism pipeline promote)    {best, value, threshold, passed}
=============  ============================================  ===================================

So ``dvc metrics show`` is a table of one row per (model, schedule, steps) with eight columns;
standard errors, timings (not reproducible) and the promotion's comparisons stay in the
stages' own files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

Records = list[dict[str, Any]]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _need(doc: dict[str, Any], keys: tuple[str, ...], path: Path) -> None:
    missing = [k for k in keys if k not in doc]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v: Any) -> Any:
    """A finite number, else None (JSON has no infinities: lambda(0), lambda(1) can be +-inf)."""
    return v if _finite(v) else None


def loss_records(path: Path) -> Records:
    """Training log lines (JSONL) -> one record per logged step (numeric fields only)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    out: Records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not JSON: {exc}") from None
        if "step" in row and "loss" in row:
            out.append({k: v for k, v in row.items() if _finite(v)})
    if not out:
        raise ValueError(f"{path}: no line with both 'step' and 'loss'")
    return out


def rapsd_records(path: Path) -> Records:
    """Corpus RAPSD (mean and quantiles per radial frequency) -> one record per frequency."""
    doc = _read_json(path)
    if "rapsd" not in doc:
        raise ValueError(f"{path}: no 'rapsd' (a summary.json of prism data spectra?)")
    r = doc["rapsd"]
    _need(r, ("frequency", "mean"), path)
    quant = r.get("quantiles", {})
    out: Records = []
    for i, f in enumerate(r["frequency"]):
        rec = {"frequency": f, "mean": r["mean"][i]}
        rec.update({f"q{float(q) * 100:02.0f}": v[i] for q, v in quant.items()})
        out.append(rec)
    return out


def chromatogram_records(path: Path) -> Records:
    """Chromatogram curves: signal fraction a_k(t) of pyramid level k (k = 0 finest), lambda(t)
    and the time map tau(t), one record per t."""
    doc = _read_json(path)
    _need(doc, ("t", "lambda", "a"), path)
    out: Records = []
    for i, t in enumerate(doc["t"]):
        rec = {"t": t, "lambda": _num(doc["lambda"][i])}
        if "tau" in doc:
            rec["tau"] = _num(doc["tau"][i])
        rec.update({f"level_{k}": _num(a[i]) for k, a in enumerate(doc["a"])})
        out.append(rec)
    return out


def schedules_records(path: Path) -> Records:
    """The compared schedules: lambda(t) of each, one record per t (one field per schedule)."""
    doc = _read_json(path)
    _need(doc, ("t", "schedules"), path)
    out: Records = []
    for i, t in enumerate(doc["t"]):
        rec: dict[str, Any] = {"t": t}
        for name, s in doc["schedules"].items():
            rec[name] = _num(s["lambda"][i])
        out.append(rec)
    return out


def _eval_rows(path: Path) -> Records:
    rows = _read_json(path)
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty list of rows (metrics_table.json)")
    for r in rows:
        _need(r, ("schedule", "steps"), path)
    return rows


def _headline(key: str) -> str | None:
    """The metrics column of a metrics_table key, or None for one left out of ``dvc metrics``
    (standard errors, timings); FD-prism's feature-network hash is dropped from the name so
    that every model's rows share one column."""
    if key.endswith(("_se", "_seconds")) or key in ("schedule", "sampler"):
        return None
    return "fd_prism" if key.startswith("FD-prism-") else key


def eval_metrics(path: Path) -> dict[str, dict[str, float]]:
    """Evaluate table -> ``{"<schedule>-<steps>": {metric: value}}``, one file each."""
    out = {}
    for r in _eval_rows(path):
        row = {}
        for k, v in r.items():
            name = _headline(k)
            if name is not None and _finite(v):
                row[name] = v
        out[f"{r['schedule']}-{r['steps']}"] = row
    return out


def register_metrics(path: Path) -> dict[str, Any]:
    """register.json -> the promotion's summary (the chosen model, its score, the gate)."""
    doc = _read_json(path)
    _need(doc, ("best", "value", "threshold", "passed"), path)
    return {"metric": doc.get("metric"), "best": doc["best"], "value": doc["value"],
            "threshold": doc["threshold"], "passed": doc["passed"]}


def eval_step_records(path: Path) -> Records:
    """Evaluate table -> records ordered by steps (metrics against sampling steps)."""
    rows = sorted(_eval_rows(path), key=lambda r: (r["schedule"], r["steps"]))
    return [{k: v for k, v in r.items() if _finite(v) or k == "schedule"} for r in rows]


KINDS: dict[str, Callable[[Path], Any]] = {
    "loss": loss_records, "rapsd": rapsd_records, "chromatogram": chromatogram_records,
    "schedules": schedules_records, "eval": eval_metrics, "eval-steps": eval_step_records,
    "register": register_metrics,
}
DIRECTORY_KINDS = ("eval",)  # written as one file per entry into the destination directory


def write_records(kind: str, src: str | Path, dest: str | Path) -> int:
    """Convert ``src`` by ``kind`` (see the module table), write JSON to ``dest``; returns the
    number of records (or metric groups)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {sorted(KINDS)}")
    data = KINDS[kind](Path(src))
    dest = Path(dest)
    if kind in DIRECTORY_KINDS:
        if dest.suffix == ".json":
            raise ValueError(f"records {kind} writes a directory (one file per entry); "
                             f"got {dest}")
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.glob("*.json"):  # entries of an earlier run that this one lacks
            old.unlink()
        for name, entry in data.items():
            (dest / f"{name}.json").write_text(json.dumps(entry, indent=1))
        return len(data)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(data, indent=1))
    return len(data)
