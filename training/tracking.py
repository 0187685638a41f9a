"""MLflow tracking as a loop callback: experiment per project, run per training.

What a run holds: the full resolved config as params (``section.key``); metrics loss, lr,
images_per_second, grad_norm, memory_gib, images_seen (per step); sample grids as images
(``samples/samples-<step>.png`` and the ``samples`` image series); system metrics where psutil
is installed; tags ``git_commit``, ``data_version``, ``prism.run_name``. At the end the model
directory (``model.safetensors``, ``config.json``, ``schedule.json``) is logged under
``model/``, registered as ``tracking.register_name`` (default ``<project>-<run name>``) and
given the alias ``tracking.alias`` (default ``candidate``).

Tracking URI: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in
the working directory.

One MLflow run per training run, across resumes: the run id is kept in ``<run_dir>/mlflow.json``
and a restarted or extended run (``--set train.total_images=...``) continues that MLflow run,
finished or not; without the file, a run with the same name that did not finish is continued.
A model version is registered only when the weights changed: the run carries the sha256 of
the registered ``model.safetensors`` (tag ``prism.weights_sha256``), and a re-run whose weights
hash the same registers nothing new.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException
from PIL import Image, ImageDraw

from common.registry import (
    git_commit,
    mark_model_development,
    quiet_mlflow,
    register_model,
    registered_name,
    resolve_tracking_uri,
)
from common.run_config import Config
from training.callbacks import Callback


def tracking_uri(cfg: Config) -> str:
    """The run's tracking URI (``common.registry.resolve_tracking_uri``)."""
    return resolve_tracking_uri(cfg.tracking.uri)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"optim.lr": "0.0002", ...} (MLflow params are strings)."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def model_name(cfg: Config) -> str:
    return registered_name(cfg.run.project, cfg.run.name, cfg.tracking.register_name)


class MLflowLogger(Callback):
    """Logs a training run to MLflow (rank 0 only)."""

    def __init__(self) -> None:
        self.active = False
        self.cfg: Config | None = None
        self.run_id: str | None = None
        self.version: str | None = None
        self.record: Path | None = None

    def on_start(self, cfg: Config, info: dict[str, Any]) -> None:
        self.active = info["rank"] == 0 and cfg.tracking.enabled
        if not self.active:
            return
        quiet_mlflow()
        self.cfg = cfg
        self.record = Path(info["run_dir"]) / "mlflow.json" if info.get("run_dir") else None
        mlflow.set_tracking_uri(tracking_uri(cfg))
        exp = mlflow.set_experiment(cfg.run.project)
        previous = self._previous_run(exp.experiment_id, cfg)
        system = cfg.tracking.system_metrics and _has_psutil()
        run = mlflow.start_run(run_id=previous, run_name=None if previous else cfg.run.name,
                               log_system_metrics=system)
        self.run_id = run.info.run_id
        if self.record is not None:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            self.record.write_text(json.dumps({"run_id": self.run_id,
                                               "experiment_id": exp.experiment_id}))
        if not previous:  # params are immutable: log them once
            mlflow.log_params(flatten(cfg.public_dump()))
            log_dataset(cfg)
        mark_model_development(exp)
        mlflow.set_tags({"prism.run_name": cfg.run.name, "git_commit": git_commit(),
                         "data_version": cfg.data.version or cfg.data.url or cfg.data.source,
                         "model_family": info.get("family", ""),
                         "parameters": str(info.get("parameters", ""))})
        if info.get("start_step"):
            mlflow.set_tag("resumed_at_step", str(info["start_step"]))

    def _previous_run(self, experiment_id: str, cfg: Config) -> str | None:
        """The MLflow run this training run continues: the one recorded in its run folder
        (when it still exists in this tracking store), else an unfinished run of its name."""
        if self.record is not None and self.record.exists():
            try:
                rec = json.loads(self.record.read_text())
                run = mlflow.MlflowClient().get_run(rec["run_id"])
                if run.info.experiment_id == experiment_id \
                        and run.info.lifecycle_stage == "active":
                    return run.info.run_id
            except (MlflowException, KeyError, ValueError):
                pass  # another store, or a deleted run: a new MLflow run
        found = mlflow.search_runs(
            [experiment_id], filter_string=f"tags.`prism.run_name` = '{cfg.run.name}' "
            "and attributes.status != 'FINISHED'", output_format="list", max_results=1)
        return found[0].info.run_id if found else None

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.active:
            mlflow.log_metrics(metrics, step=step)

    def on_images(self, step: int, name: str, image: np.ndarray) -> None:
        if self.active:
            caption = name
            if self.cfg:
                sc = self.cfg.sampling
                caption = (f"{name}, step {step}: EMA weights, seeds {sc.seed}.., "
                           f"{sc.sampler or 'own sampler'} {sc.steps} steps")
            image = readable(image, caption)
            mlflow.log_image(image, artifact_file=f"samples/{name}-{step:08d}.png")
            mlflow.log_image(image, key=name, step=step)

    def on_end(self, result: dict[str, Any], model_dir: Path | None) -> None:
        if not self.active:
            return
        try:
            if model_dir is not None:
                self.version = register_model(model_name(self.cfg), self.cfg.tracking.alias,  # type: ignore
                                              self.run_id, model_dir)
        finally:
            mlflow.end_run()


def readable(image: np.ndarray, caption: str, min_side: int = 512) -> np.ndarray:
    """A sample grid as a person looks at it in the MLflow UI: enlarged by an integer factor
    (nearest neighbour, pixels stay pixels) to at least ``min_side`` wide, under a caption."""
    h, w = image.shape[:2]
    k = max(1, -(-min_side // w))
    grid = Image.fromarray(image).convert("RGB").resize((w * k, h * k), Image.NEAREST)
    canvas = Image.new("RGB", (w * k, h * k + 22), "white")
    canvas.paste(grid, (0, 22))
    ImageDraw.Draw(canvas).text((6, 5), caption, fill="black")
    return np.asarray(canvas)


def log_dataset(cfg: Config) -> None:
    """The training data as the run's dataset input (the runs table's Dataset column): name
    and digest from ``data.version`` (else the location), source the shards' folder or S3
    prefix. In-memory synthetic data has no source and is not logged."""
    if cfg.data.source == "synthetic" or not cfg.data.url:
        return
    url = cfg.data.url if "://" in cfg.data.url else str(Path(cfg.data.url).resolve())
    digest = hashlib.sha256((cfg.data.version or url).encode()).hexdigest()[:12]
    name = cfg.data.version or Path(url.rstrip("/")).name
    try:  # MLflow registers its local-file source twice and warns that a path is ambiguous
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*interpreted in multiple ways")
            source = resolve_dataset_source(url)
    except MlflowException:  # a scheme MLflow has no dataset source for: not logged
        source = None
    if source is not None:
        mlflow.log_input(MetaDataset(source, name=name, digest=digest), context="training")


def _has_psutil() -> bool:
    """Whether psutil, which MLflow's system metrics need, is installed."""
    return importlib.util.find_spec("psutil") is not None
