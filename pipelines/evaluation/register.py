"""The register stage: promote the best evaluated model to the MLflow alias ``champion``.

For every model of ``params.yaml``'s ``models:`` the evaluate stage wrote
``<eval_dir>/<name>/metrics_table.json``. The stage reads the configured metric at the
configured (schedule, steps) row, picks the best model (``mode`` min or max), and, when that
value passes ``threshold`` (``<=`` for min, ``>=`` for max) and the best model is better than
every other candidate beyond the evaluation's confidence interval (``compare``: the interval of
the difference, from the paired bootstrap replicates that evaluate stores), sets the alias on
the registered
model version whose ``model.safetensors`` is byte-identical to the DVC-tracked
``<train_dir>/<name>/model`` (training registers ``<project>-<name>`` with alias
``candidate``; a version is found by that alias first, then among all versions; if none
matches, e.g. after ``dvc pull`` into a fresh MLflow, the directory is registered anew).
Each model's evaluate table is also logged to its MLflow run (``eval/...``).
``register.json`` records the decision.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from components.metrics.inception import sha256_file
from pipelines.evaluation.evaluate import log_to_mlflow

_log = logging.getLogger(__name__)


class RegisterConfig(BaseModel):
    """The ``register:`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid")

    # a column of metrics_table.json; "fd_prism" names the FD-prism-<hash> column, whatever
    # feature network the evaluation used
    metric: str = "swd_x1e3"
    mode: Literal["min", "max"] = "min"
    schedule: str = "model"  # the evaluate row: schedule and steps
    steps: int = Field(16, ge=1)
    threshold: float | None = None  # None: always promote the best
    alias: str = Field("champion", pattern=r"^[A-Za-z0-9_-]+$")
    # promote only a model better than every other beyond the interval of the difference;
    # false: the best point estimate wins (the comparison is still recorded)
    require_significance: bool = True


def load_register_config(params: str | Path) -> tuple[RegisterConfig, list[str]]:
    """(register section, model names) of a params.yaml; bad fields are named."""
    path = Path(params)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} not found")
    doc = yaml.safe_load(path.read_text()) or {}
    models = doc.get("models")
    if not isinstance(models, dict) or not models:
        raise ValueError(f"{path}: 'models' must be a non-empty mapping of training configs")
    try:
        cfg = RegisterConfig.model_validate(doc.get("register") or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{path}: register.{field}: {err['msg']}") from None
    return cfg, list(models)


def metric_key(metric: str, keys: Any) -> str:
    """The column of ``metric``: itself, or for ``fd_prism`` the one ``FD-prism-<hash>``."""
    if metric != "fd_prism":
        return metric
    found = [k for k in keys if str(k).startswith("FD-prism-") and not str(k).endswith("_se")]
    return found[0] if len(found) == 1 else metric


def read_score(eval_dir: Path, name: str, cfg: RegisterConfig) -> float:
    """The configured metric of model ``name`` at (schedule, steps)."""
    path = eval_dir / name / "metrics_table.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the evaluate stage for {name!r}")
    rows = json.loads(path.read_text())
    for r in rows:
        if r.get("schedule") == cfg.schedule and r.get("steps") == cfg.steps:
            key = metric_key(cfg.metric, r)
            if key not in r:
                raise ValueError(f"{path}: no metric {cfg.metric!r} (have "
                                 f"{sorted(k for k in r if k not in ('schedule', 'steps'))})")
            return float(r[key])
    have = [(r.get("schedule"), r.get("steps")) for r in rows]
    raise ValueError(f"{path}: no row for schedule={cfg.schedule!r}, steps={cfg.steps} "
                     f"(register.schedule/steps; evaluated: {have})")


def read_interval(eval_dir: Path, name: str, cfg: RegisterConfig) -> dict[str, Any] | None:
    """The bootstrap interval of the configured metric (evaluate's ``metrics.json`` of the
    setting), or None when the evaluation computed none."""
    path = eval_dir / name / f"{cfg.schedule}-{cfg.steps}" / "metrics.json"
    if not path.is_file():
        return None
    iv = json.loads(path.read_text()).get("intervals")
    key = metric_key(cfg.metric, (iv or {}).get("metrics", {}))
    if not iv or key not in iv.get("metrics", {}):
        return None
    return {**iv["metrics"][key], "resamples": iv["resamples"], "seed": iv["seed"],
            "n_generated": iv["n_generated"], "confidence": iv["confidence"]}


def compare(best: float, other: float, a: dict[str, Any] | None, b: dict[str, Any] | None,
            mode: str) -> dict[str, Any]:
    """Is ``best`` better than ``other`` beyond the interval of their difference?

    Paired when both evaluations drew the same bootstrap rows (same image count, seed and
    resamples: the samples share seeds and labels image by image), so the shared part of the
    noise cancels: se = sd(replicates_a - replicates_b). Otherwise independent:
    se = sqrt(se_a^2 + se_b^2). Without intervals nothing can be claimed (``significant``
    None). The interval is the difference +- z se at the evaluations' confidence.
    """
    diff = best - other
    if a is None or b is None:
        return {"difference": diff, "lo": None, "hi": None, "method": "no intervals",
                "significant": None}
    paired = all(a[k] == b[k] for k in ("resamples", "seed", "n_generated"))
    if paired:
        d = [x - y for x, y in zip(a["replicates"], b["replicates"], strict=True)]
        se = statistics.stdev(d) if len(d) > 1 else 0.0
    else:
        se = math.hypot(a["se"], b["se"])
    z = statistics.NormalDist().inv_cdf(0.5 + a["confidence"] / 2)
    lo, hi = diff - z * se, diff + z * se
    better = hi < 0 if mode == "min" else lo > 0
    return {"difference": diff, "lo": lo, "hi": hi, "confidence": a["confidence"],
            "method": "paired bootstrap" if paired else "independent bootstrap",
            "significant": bool(better)}


def _interval(value: float, iv: dict[str, Any]) -> dict[str, float]:
    z = statistics.NormalDist().inv_cdf(0.5 + iv["confidence"] / 2)
    return {"lo": value - z * iv["se"], "hi": value + z * iv["se"], "se": iv["se"],
            "confidence": iv["confidence"]}


def passes(value: float, cfg: RegisterConfig) -> bool:
    if cfg.threshold is None:
        return True
    return value <= cfg.threshold if cfg.mode == "min" else value >= cfg.threshold


def decide(best: str, value: float, comparisons: dict[str, dict[str, Any]],
           cfg: RegisterConfig) -> tuple[bool, str]:
    """(promote?, the reason in words) for the best model (see the module doc)."""
    head = f"{best} has {cfg.metric} {value:.4g} at {cfg.schedule}-{cfg.steps}"
    if not passes(value, cfg):
        return False, f"{head}, which does not pass the threshold {cfg.threshold} ({cfg.mode})"

    def words(n: str, c: dict[str, Any]) -> str:
        if c["lo"] is None:
            return f"{n} (difference {c['difference']:+.4g}, no interval)"
        return (f"{n} (difference {c['difference']:+.4g}, {100 * c['confidence']:.0f}% "
                f"interval [{c['lo']:+.4g}, {c['hi']:+.4g}], {c['method']})")

    unclear = {n: c for n, c in comparisons.items() if not c["significant"]}
    if unclear and cfg.require_significance:
        return False, (f"{head}, not better beyond the interval than "
                       + "; ".join(words(n, c) for n, c in unclear.items()))
    if not comparisons:
        return True, f"{head}, the only candidate"
    if unclear:
        return True, (f"{head}, best by point estimate (register.require_significance is "
                      "false); not beyond the interval against "
                      + "; ".join(words(n, c) for n, c in unclear.items()))
    return True, (f"{head}, better beyond the interval than "
                  + "; ".join(words(n, c) for n, c in comparisons.items()))


def _version_sha(client: Any, mv: Any) -> str | None:
    """The sha256 of a version's weights: its ``weights_sha256`` tag (set at registration),
    else the downloaded file (an MLflow Model keeps it under ``artifacts/prism/``, loose model
    files at the top)."""
    # deferred: mlflow (~1 s to import; also through common.registry) only for the registry
    # steps, not for the decision rules that the benchmarks and tests import
    import mlflow

    if (mv.tags or {}).get("weights_sha256"):
        return mv.tags["weights_sha256"]
    with tempfile.TemporaryDirectory(prefix="prism-register-") as tmp:
        for path in ("artifacts/prism/model.safetensors", "model.safetensors"):
            try:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{mv.source}/{path}", dst_path=tmp)
            except Exception:  # noqa: BLE001 - an unreadable version simply does not match
                continue
            return sha256_file(Path(local))
    return None


def find_version(model_dir: Path) -> tuple[str, Any]:
    """(registered name, model version) holding exactly ``model_dir``'s weights; registers
    the directory (new run + version, alias candidate) when no version matches."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from common.registry import register_model, registered_name, resolve_tracking_uri

    meta = json.loads((model_dir / "config.json").read_text())
    try:  # the model's training config, as training resolved and saved it
        run, tracking = meta["training"]["run"], meta["training"]["tracking"]
        project, run_name, alias = run["project"], run["name"], tracking["alias"]
    except (KeyError, TypeError):
        raise ValueError(f"{model_dir}/config.json holds no training config (run.project, "
                         "run.name, tracking.alias): not a model written by prism train") \
            from None
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking.get("uri")))
    client = mlflow.MlflowClient()
    name = registered_name(project, run_name, tracking.get("register_name"))
    want = sha256_file(model_dir / "model.safetensors")
    candidates = []
    try:
        candidates.append(client.get_model_version_by_alias(name, alias))
    except MlflowException:
        pass
    try:
        candidates += client.search_model_versions(f"name='{name}'",
                                                   order_by=["version_number DESC"])
    except MlflowException:
        pass
    for mv in candidates:
        if _version_sha(client, mv) == want:
            return name, mv
    mlflow.set_experiment(project)
    with mlflow.start_run(run_name=f"{run_name}-import") as active:
        mlflow.set_tag("prism.imported_from", str(model_dir))
        version = register_model(name, alias, active.info.run_id, model_dir)
    return name, client.get_model_version(name, version)


def promote(params: str | Path, eval_dir: str | Path, train_dir: str | Path,
            out: str | Path, log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """Run the register stage (see the module doc); writes and returns register.json."""
    cfg, names = load_register_config(params)
    eval_dir, train_dir = Path(eval_dir), Path(train_dir)
    scores = {n: read_score(eval_dir, n, cfg) for n in names}
    best = (min if cfg.mode == "min" else max)(scores, key=scores.__getitem__)
    intervals = {n: read_interval(eval_dir, n, cfg) for n in names}
    comparisons = {n: compare(scores[best], scores[n], intervals[best], intervals[n], cfg.mode)
                   for n in names if n != best}
    ok, reason = decide(best, scores[best], comparisons, cfg)
    versions: dict[str, dict[str, str]] = {}
    for n in names:
        model_dir = train_dir / n / "model"
        if not (model_dir / "model.safetensors").is_file():
            raise FileNotFoundError(f"{model_dir}/model.safetensors not found: run the train "
                                    f"stage for {n!r}")
        reg_name, mv = find_version(model_dir)
        versions[n] = {"registered_model": reg_name, "version": str(mv.version),
                       "run_id": mv.run_id}
        rows = json.loads((eval_dir / n / "metrics_table.json").read_text())
        log_to_mlflow(mv.run_id, rows, eval_dir / n)
    result: dict[str, Any] = {
        "metric": cfg.metric, "mode": cfg.mode, "setting": f"{cfg.schedule}-{cfg.steps}",
        "threshold": cfg.threshold, "scores": scores, "best": best, "value": scores[best],
        "interval": None if intervals[best] is None else _interval(scores[best],
                                                                     intervals[best]),
        "comparisons": comparisons, "passed": ok, "reason": reason, "alias": cfg.alias,
        "promoted": None,
        "versions": {n: f"{v['registered_model']}/{v['version']}" for n, v in versions.items()},
    }
    if ok:
        import mlflow

        v = versions[best]
        mlflow.MlflowClient().set_registered_model_alias(v["registered_model"], cfg.alias,
                                                         v["version"])
        result["promoted"] = f"models:/{v['registered_model']}@{cfg.alias}"
        log(f"promoted {best} -> {v['registered_model']} version {v['version']} "
            f"@{cfg.alias}: {reason}")
    else:
        log(f"not promoted: {reason}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    return result
