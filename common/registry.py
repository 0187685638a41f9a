"""The MLflow side every platform folder shares: where the tracking store is, registering a
model directory as a new model version (only when its weights changed), and the experiment
and logging settings that keep MLflow's UI and output readable.

Training registers what it trained (``training/tracking.py``), the register stage finds or
re-registers the evaluated models (``pipelines/evaluation/register.py``), serving resolves
``models:/NAME@ALIAS`` (``common/models.py``): all through these functions.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from common.pyfunc import no_progress_bars, save_mlflow_model
from components.metrics.inception import sha256_file

DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """``configured``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; a local
    SQLite file is made absolute (Ray workers run in other directories)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def registered_name(project: str, run_name: str, register_name: str | None = None) -> str:
    """The registered model's name: ``register_name``, else ``<project>-<run name>``."""
    return register_name or f"{project}-{run_name}"


def git_commit() -> str:
    """The checkout's commit (empty outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def quiet_mlflow() -> None:
    """MLflow's INFO lines (database set-up, "experiment does not exist, creating", system
    metrics started/stopped) are not the user's business inside a training log: warnings and
    errors only, unless a more detailed level was asked for (``MLFLOW_LOGGING_LEVEL=DEBUG``)."""
    for name in ("mlflow", "alembic"):
        log = logging.getLogger(name)
        if log.level in (logging.NOTSET, logging.INFO):
            log.setLevel(logging.WARNING)


def mark_model_development(experiment: Any) -> None:
    """Tag the experiment as model development (``mlflow.experimentKind``), so that the MLflow
    UI opens it on its runs rather than on the GenAI overview (traces, assistant)."""
    if "mlflow.experimentKind" not in (experiment.tags or {}):
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id,
                                                 "mlflow.experimentKind",
                                                 "custom_model_development")


def register_model(name: str, alias: str, run_id: str, model_dir: Path) -> str:
    """Log the prism model directory ``model_dir`` as the active run ``run_id``'s ``model/``
    artifact, an MLflow Model (``common.pyfunc``: the python_function flavour over the
    safetensors + JSON files, with signature and input example), register it as a version of
    ``name`` and point ``alias`` at it; returns the version. Weights identical to the run's
    last registered ones (same sha256) register nothing new: their version is returned."""
    client = mlflow.MlflowClient()
    digest = sha256_file(model_dir / "model.safetensors")
    tags = client.get_run(run_id).data.tags
    if tags.get("prism.weights_sha256") == digest and tags.get("prism.model_version"):
        return tags["prism.model_version"]
    with tempfile.TemporaryDirectory() as tmp, no_progress_bars():
        mlflow.log_artifacts(str(save_mlflow_model(model_dir, Path(tmp) / "model")),
                             artifact_path="model")
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    mv = client.create_model_version(name, source, run_id=run_id,
                                     tags={"git_commit": git_commit(),
                                           "weights_sha256": digest})
    client.set_registered_model_alias(name, alias, mv.version)
    mlflow.set_tags({"registered_model": f"{name}/{mv.version}@{alias}",
                     "prism.weights_sha256": digest, "prism.model_version": str(mv.version)})
    return str(mv.version)
