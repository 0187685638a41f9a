"""Experiments: one re-runnable command per claim of a seed paper.

``prism experiment run NAME --setting small|gpu [--set key=value ...]`` trains or reuses the
reference models the claim needs (``prism train`` with shipped configs), samples at fixed seeds,
measures against real images with the metrics of ``prism eval``, and writes
``<work_dir>/<NAME>/<setting>/results.json`` with its figures; the run is logged to the MLflow
experiment NAME. Each experiment has a ``small`` setting (CPU, a minute; the tests run it end
to end) and a ``gpu`` setting (the recorded results, docs/science/).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipelines.experiments import (
    chromatogram,
    dimr_vs_dit,
    spectral_schedules,
    ssd_vs_ddpm,
    upsample_guidance,
)
from pipelines.experiments.common import (
    ExperimentSettings,
    Log,
    environment,
    log_to_mlflow,
    status,
)


@dataclass(frozen=True)
class Experiment:
    name: str
    claim: str
    settings: type[ExperimentSettings]
    presets: dict[str, dict[str, Any]]
    run: Callable[..., dict[str, Any]]
    doc: str


EXPERIMENTS: dict[str, Experiment] = {
    m.NAME: Experiment(m.NAME, m.CLAIM, m.Settings, m.PRESETS, m.run, m.__doc__ or "")
    for m in (spectral_schedules, upsample_guidance, ssd_vs_ddpm, dimr_vs_dit,
              chromatogram)
}


class ExperimentError(ValueError):
    """An unknown experiment or setting, or settings that do not validate."""


def get(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ExperimentError(f"unknown experiment {name!r}: choose one of "
                              f"{', '.join(sorted(EXPERIMENTS))} (prism experiment list)")
    return EXPERIMENTS[name]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


def resolve(name: str, setting: str, overrides: dict[str, Any] | None = None
            ) -> ExperimentSettings:
    """The typed settings of ``name`` in preset ``setting`` with ``overrides`` applied."""
    exp = get(name)
    if setting not in exp.presets:
        raise ExperimentError(f"unknown setting {setting!r} for {name}: choose one of "
                              f"{', '.join(exp.presets)}")
    raw = _merge(exp.presets[setting], overrides or {})
    try:
        return exp.settings.model_validate(raw)
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc'])) or '(settings)'}: {e['msg']}"
                 for e in err.errors()]
        raise ExperimentError(f"bad settings for {name} ({setting}):\n" + "\n".join(lines)) \
            from None


def run(name: str, setting: str, overrides: dict[str, Any] | None = None,
        out_dir: str | None = None, log: Log = status) -> dict[str, Any]:
    """Run one experiment; writes ``results.json`` (and figures) to the output folder and
    returns the results."""
    exp = get(name)
    s = resolve(name, setting, overrides)
    out = Path(out_dir) if out_dir else Path(s.work_dir) / name / setting
    out.mkdir(parents=True, exist_ok=True)
    log(f"experiment {name} ({setting}) -> {out}")
    results = exp.run(s, out, log=log)
    results.setdefault("environment", environment())
    results["setting"] = setting
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    if s.mlflow:
        results["mlflow_run_id"] = log_to_mlflow(name, out, results, log)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    return results


def log_results(out_dir: str, log: Log = status) -> str | None:
    """Log an existing results folder (made where MLflow was absent) to MLflow."""
    results = json.loads((Path(out_dir) / "results.json").read_text())
    return log_to_mlflow(results["experiment"], Path(out_dir), results, log)
