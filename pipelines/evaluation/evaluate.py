"""The evaluate stage (``prism eval run MODEL``): sample at fixed seeds, measure, record.

For every (schedule, steps) of the sweep: ``n_images`` images at seeds ``seed .. seed + n - 1``
(class labels ``i mod num_classes`` for class-conditional models) through
``components.generate.generate``; generated images are quantised to 8 bits as if saved, then
compared with the held-out real images by every metric (``pipelines.evaluation.metrics``).

Outputs in ``out_dir``::

    metrics.json           model, real set, settings, standard-FID status, one entry per setting
    metrics_table.json|md  one row per (schedule, steps): the headline numbers
    <schedule>-<steps>/    metrics.json (all numbers), samples.png, rapsd.png

When the model came from MLflow (``runs:/...`` or ``models:/...``) the headline numbers and
the output folder are logged to the model's training run (``eval/...``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.models import load_model
from common.progress import progress_bar
from components.generate import generate
from pipelines.evaluation.data import load_images
from pipelines.evaluation.metrics import (
    MetricSettings,
    compute_metrics,
    feature_spaces,
    markdown_table,
    save_plots,
    summary_row,
)

_log = logging.getLogger(__name__)


class EvalConfig(BaseModel):
    """Settings of one evaluate run (one pydantic section: ``eval`` in params.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    real: str
    out_dir: str = "outputs/eval"
    n_images: int = Field(1000, ge=2)
    seed: int = Field(0, ge=0)
    sampler: str | None = None  # None: the model's own (DDIM; SSD: its posterior chain)
    steps: list[int] = Field(default_factory=lambda: [32])
    schedules: list[str] = Field(default_factory=lambda: ["model"])
    eta: float = Field(0.0, ge=0)
    cfg_scale: float = Field(1.0, ge=0)
    batch_size: int = Field(250, ge=1)
    device: str = "cpu"
    max_real: int | None = Field(None, ge=2)
    feature_net: str | None = None
    inception: str | None = None
    train_images: str | None = None  # memorisation reference (pixel space)
    max_train: int | None = Field(10000, ge=2)
    mlflow: bool = True
    metrics: MetricSettings = Field(default_factory=MetricSettings)

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v or any(s < 1 for s in v):
            raise ValueError(f"steps must be a non-empty list of positive integers, got {v}")
        return v

    @field_validator("schedules")
    @classmethod
    def _schedules(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in ("model", "spectral")]
        if not v or bad:
            raise ValueError(f"schedules must be 'model' and/or 'spectral', got {v}")
        return v


def sample_images(model: Any, cfg: EvalConfig, schedule: str, steps: int) -> torch.Tensor:
    """n_images samples at the fixed seeds, 8-bit quantised: (N, C, H, W) in [-1, 1] on CPU."""
    seeds = list(range(cfg.seed, cfg.seed + cfg.n_images))
    out = []
    with progress_bar(len(seeds), f"sample {schedule}-{steps}", "img", log=_log) as bar:
        for s in range(0, len(seeds), cfg.batch_size):
            batch = seeds[s : s + cfg.batch_size]
            labels = [i % model.num_classes for i in batch] if model.num_classes else None
            x = generate(model, seeds=batch, steps=steps, sampler=cfg.sampler, eta=cfg.eta,
                         class_labels=labels, cfg_scale=cfg.cfg_scale, schedule=schedule,
                         device=cfg.device)
            out.append(((x.float().cpu().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1.0)
            bar.update(len(batch))
    return torch.cat(out)


def mlflow_run_id(model_uri: str) -> str | None:
    """The training run behind ``runs:/ID/...`` or ``models:/NAME@ALIAS|/VERSION``, else None."""
    if model_uri.startswith("runs:/"):
        return model_uri[len("runs:/"):].split("/")[0]
    if not model_uri.startswith("models:/"):
        return None
    # deferred: mlflow (~1 s to import) only for registry models and --mlflow
    from mlflow import MlflowClient

    ref = model_uri[len("models:/"):].strip("/")
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias).run_id
    name, version = ref.rsplit("/", 1)
    return client.get_model_version(name, version).run_id


def log_to_mlflow(run_id: str, rows: list[dict[str, Any]], out_dir: Path) -> None:
    """Headline numbers as ``eval/<schedule>-<steps>/<metric>`` and the folder as artifacts."""
    import mlflow

    with mlflow.start_run(run_id=run_id):
        for r in rows:
            tag = f"eval/{r['schedule']}-{r['steps']}"
            mlflow.log_metrics({f"{tag}/{k.replace('-', '_')}": float(v) for k, v in r.items()
                                if isinstance(v, (int, float)) and k != "steps"})
        mlflow.log_artifacts(str(out_dir), artifact_path="eval")


def run_evaluate(cfg: EvalConfig, log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """Run the stage (see the module doc); returns the top-level metrics.json dict. ``log``
    takes the status lines (the real set, each setting's headline numbers)."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.model, cfg.device)
    real_set = load_images(cfg.real, resolution=model.resolution)
    if cfg.max_real and len(real_set) > cfg.max_real:  # a seeded random subset, all classes
        g = torch.Generator().manual_seed(cfg.seed)
        real_set = real_set.subset(torch.randperm(len(real_set), generator=g)[:cfg.max_real]
                                   .sort().values.numpy())
    real = real_set.as_float()
    train = None
    if cfg.train_images:
        train = load_images(cfg.train_images, limit=cfg.max_train,
                            resolution=model.resolution).as_float()
    spaces, fid_status = feature_spaces(cfg.feature_net, cfg.inception, cfg.device)
    fid = "yes" if fid_status["available"] else \
        "unavailable (give Inception weights: --inception PATH, docs/guide/evaluation.md)"
    log(f"real images: {len(real_set)} from {cfg.real}; feature spaces: "
        f"{[s.name for s in spaces] or 'none'}; standard FID: {fid}")
    rows, details = [], []
    for schedule in cfg.schedules:
        for steps in cfg.steps:
            t0 = time.perf_counter()
            gen = sample_images(model, cfg, schedule, steps)
            sample_s = time.perf_counter() - t0
            # metrics on the sampling device (GPU sorts and distances when there is one)
            m = compute_metrics(gen.to(cfg.device), real.to(cfg.device), settings=cfg.metrics,
                                spaces=spaces, train=None if train is None
                                else train.to(cfg.device))
            m.update(schedule=schedule, steps=steps, sampler=cfg.sampler,
                     sample_seconds=sample_s, images_per_second=len(gen) / sample_s)
            sub = out_dir / f"{schedule}-{steps}"
            save_plots(sub, gen, m["spectral"], title=f"{schedule}, {steps} steps")
            (sub / "metrics.json").write_text(json.dumps(m, indent=1))
            row = {"schedule": schedule, "steps": steps, "sampler": cfg.sampler,
                   **summary_row(m), "sample_seconds": sample_s}
            rows.append(row)
            details.append(m)
            log(json.dumps({k: (round(v, 5) if isinstance(v, float) else v)
                            for k, v in row.items()}))
    top = {"model": cfg.model, "real": cfg.real, "n_real": len(real_set),
           "config": cfg.model_dump(), "standard_fid": fid_status,
           "feature_spaces": {s.name: s.info for s in spaces}, "settings": rows}
    (out_dir / "metrics.json").write_text(json.dumps(top, indent=1))
    (out_dir / "metrics_table.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "metrics_table.md").write_text(markdown_table(rows))
    run_id = mlflow_run_id(cfg.model) if cfg.mlflow else None
    if run_id:
        log_to_mlflow(run_id, rows, out_dir)
        top["mlflow_run_id"] = run_id
    return top
