"""Loading a trained model from wherever it is: a local model directory or an MLflow URI.

The artifact's format is ``components.artifact``; this adds the platform's side (MLflow's
artifact store), so that training, evaluation, serving and the experiments share one loader.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import torch

from components.artifact import load_dir
from components.generate import GenerativeModel


def _download(uri: str, dst: Path) -> Path:
    """``runs:/ID/path``, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or any MLflow
    artifact URI -> a local directory (MLflow's client, honouring MLFLOW_TRACKING_URI).
    MLflow's download progress bar is drawn only on a terminal: elsewhere (a service's log, a
    pipeline stage's) its carriage returns are noise."""
    # deferred: mlflow (~1 s to import; also through common.pyfunc) only for MLflow URIs
    import mlflow

    from common.pyfunc import no_progress_bars

    bars = contextlib.nullcontext() if sys.stderr.isatty() else no_progress_bars()
    with bars:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def load_model(uri_or_dir: str | Path, device: str | torch.device = "cpu") -> GenerativeModel:
    """Load a trained model for sampling.

    ``load_model(uri_or_dir: str | Path, device: str | torch.device = "cpu") -> GenerativeModel``

    ``uri_or_dir``: a local model directory (``model.safetensors``, ``config.json``,
    ``schedule.json``), or an MLflow URI: ``runs:/<run id>/model``, ``models:/<name>@<alias>``
    (e.g. ``models:/prism-debug@candidate``) or ``models:/<name>/<version>``; MLflow URIs are
    downloaded to a temporary directory first (tracking server from MLFLOW_TRACKING_URI).
    A registered model is an MLflow Model (``common.pyfunc``) and loads through its
    python_function class (this installation's, not the model's code file). Returns the
    network on ``device`` in eval mode, with its prediction type, conditioning width, native
    resolution, channels, classes, global schedule, kind and spectral model. Only safetensors
    and JSON are read: loading never executes code that came with the model.
    """
    src = str(uri_or_dir)
    if "://" in src.split("/")[0] or src.startswith(("runs:/", "models:/")):
        with tempfile.TemporaryDirectory() as tmp:
            local = _download(src, Path(tmp))
            return _load_downloaded(local, device)
    return load_dir(Path(src), device)


def _load_downloaded(local: Path, device: str | torch.device) -> GenerativeModel:
    """An MLflow Model (``common.pyfunc``) loads through its python_function class, as
    ``mlflow.pyfunc.load_model`` loads it, but with this installation's code: the model's own
    code file is not executed, so a registry entry cannot run code in a service. Loose model
    files (runs logged before the MLflow Model layout) load directly."""
    from common.pyfunc import load_pyfunc, prism_dir

    inner = prism_dir(local)
    return load_dir(local, device) if inner is None else load_pyfunc(inner, device).model
