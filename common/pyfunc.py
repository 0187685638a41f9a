"""A prism model as an MLflow Model: the ``python_function`` flavour over the safetensors +
JSON artifact, logged as models-from-code (nothing pickled, neither code nor weights).

The MLflow Model directory (a run's ``model/`` artifact and every registered version) holds::

    MLmodel, requirements.txt, python_env.yaml, conda.yaml   MLflow's own files
    pyfunc_entry.py                                          the model's code: set_model(...)
    artifacts/prism/                                         the prism model directory
        model.safetensors, config.json, schedule.json, progress.json

so ``mlflow.pyfunc.load_model("models:/NAME@champion").predict(...)`` returns images, and
prism's own loader (``common.models.load_model``, which ``prism serve`` uses) loads the same
model through this flavour. The model's code imports prism's ``components`` package, so prism
must be installed where the model is loaded.

``predict(model_input, params)``: ``model_input`` is a table with one row per image, column
``seed`` (int) and, for a class-conditional model, ``class_label`` (int); ``params`` are the
generation options of ``components.options.GenerateOptions`` (``steps``, ``sampler``,
``cfg_scale``, ``resolution`` with 0 for native, ...). The result is uint8 (N, H, W, C): the
same images as ``prism sample --local`` and the service at those seeds and options.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from components.artifact import load_dir
from components.generate import generate_with, to_uint8
from components.model import GenerativeModel
from components.options import DEFAULT_STEPS, GenerateOptions

ENTRY = Path(__file__).with_name("pyfunc_entry.py")
_PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
ARTIFACT = "prism"  # the prism model directory is artifacts/prism inside the MLflow Model
# GenerateOptions fields that are request parameters (time_aware is a pair: not offered here)
_PARAM_TYPES = {int: "long", float: "double", str: "string", bool: "boolean"}


def _param_specs() -> list[ParamSpec]:
    specs = []
    for f in dataclasses.fields(GenerateOptions):
        if f.name == "time_aware":
            continue
        default = DEFAULT_STEPS if f.name == "steps" else f.default
        if f.name == "resolution":
            default = 0  # 0: the model's native resolution
        if f.name == "sampler":
            default = ""  # "": the model's own (GenerateOptions' None)
        specs.append(ParamSpec(f.name, _PARAM_TYPES[type(default)], default))
    return specs


def signature(num_classes: int, in_channels: int) -> ModelSignature:
    """Rows of ``seed`` (and ``class_label``) in, uint8 images out, options as params."""
    cols = [ColSpec("long", "seed")]
    if num_classes:
        cols.append(ColSpec("long", "class_label"))
    return ModelSignature(inputs=Schema(cols),
                          outputs=Schema([TensorSpec(np.dtype(np.uint8),
                                                     (-1, -1, -1, in_channels))]),
                          params=ParamSchema(_param_specs()))


def options_from_params(params: dict[str, Any] | None) -> GenerateOptions:
    """``predict``'s params -> GenerateOptions (unknown names refused, 0 resolution native,
    an empty sampler the model's own)."""
    p = dict(params or {})
    names = {f.name for f in dataclasses.fields(GenerateOptions)} - {"time_aware"}
    unknown = sorted(set(p) - names)
    if unknown:
        raise ValueError(f"unknown generation parameters {unknown}: expected {sorted(names)}")
    p.setdefault("steps", DEFAULT_STEPS)
    if not p.get("resolution"):
        p["resolution"] = None
    if not p.get("sampler"):
        p["sampler"] = None
    return GenerateOptions(**p)


class PrismModel(mlflow.pyfunc.PythonModel):
    """The pyfunc: loads the prism model directory on the device of ``model_config``
    (``{"device": "cuda"}``; default CPU) and generates one image per input row."""

    model: GenerativeModel

    def load_context(self, context: Any) -> None:
        device = (context.model_config or {}).get("device", "cpu")
        self.model = load_dir(context.artifacts[ARTIFACT], device)
        self.device = device

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> np.ndarray:
        frame = pd.DataFrame(model_input)
        if "seed" not in frame:
            raise ValueError("model_input needs a 'seed' column: one row per image")
        seeds = [int(s) for s in frame["seed"]]
        labels = ([int(c) for c in frame["class_label"]] if "class_label" in frame
                  and self.model.num_classes else None)
        with torch.inference_mode():
            images = generate_with(self.model, options_from_params(params), seeds, labels,
                                   self.device)
        return to_uint8(images).numpy()


def _requirements() -> list[str]:
    """The installed versions of what the model's code needs besides prism itself."""
    out = []
    for dist in ("torch", "numpy", "safetensors", "scipy", "kornia", "pandas", "mlflow"):
        try:
            out.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return out


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar for every artifact copy or upload, in carriage returns that
    end up in training logs; copying a local model directory into an MLflow Model and logging
    it need none."""
    old = os.environ.get(_PROGRESS_ENV)
    os.environ[_PROGRESS_ENV] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_PROGRESS_ENV, None)
        else:
            os.environ[_PROGRESS_ENV] = old


def save_mlflow_model(model_dir: str | Path, dst: str | Path) -> Path:
    """Write the MLflow Model of the prism model directory ``model_dir`` to ``dst`` (which
    must not exist): the layout of the module doc, with signature and input example."""
    model_dir, dst = Path(model_dir), Path(dst)
    config = json.loads((model_dir / "config.json").read_text())  # the weights stay unread
    num_classes, in_channels = int(config.get("num_classes", 0)), int(config.get("in_channels", 3))
    example = pd.DataFrame({"seed": [0, 1]})
    if num_classes:
        example["class_label"] = [0, min(1, num_classes - 1)]
    with tempfile.TemporaryDirectory() as tmp, no_progress_bars():
        staged = Path(tmp) / ARTIFACT
        shutil.copytree(model_dir, staged)
        mlflow.pyfunc.save_model(str(dst), python_model=str(ENTRY),
                                 artifacts={ARTIFACT: str(staged)},
                                 signature=signature(num_classes, in_channels),
                                 input_example=(example, {"steps": 2}),
                                 pip_requirements=_requirements())
    return dst


def load_pyfunc(inner: str | Path, device: str | torch.device = "cpu") -> PrismModel:
    """The pyfunc of an MLflow Model's prism directory ``inner`` (see :func:`prism_dir`),
    loaded as MLflow loads it (``load_context``) but from this installation's code."""
    model = PrismModel()
    model.load_context(mlflow.pyfunc.PythonModelContext(
        artifacts={ARTIFACT: str(inner)}, model_config={"device": str(device)}))
    return model


def prism_dir(local: str | Path) -> Path | None:
    """The prism model directory inside a downloaded MLflow Model, or None if ``local`` is
    not one (a run's loose model files, as logged before the MLflow Model layout)."""
    local = Path(local)
    inner = local / "artifacts" / ARTIFACT
    return inner if (local / "MLmodel").is_file() and inner.is_dir() else None
