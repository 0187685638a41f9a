"""The model artifact: ``model.safetensors`` + ``config.json`` + ``schedule.json``; loading it
back as a :class:`components.generate.GenerativeModel` (safetensors and JSON only, no pickle).

The codec is part of the science core: training writes it, and serving, evaluation and the
experiments read it through ``common.models.load_model`` (which also resolves MLflow URIs).

Layout of a model directory (also the MLflow artifact path ``model/`` of a training run)::

    model.safetensors   EMA weights of the backbone
    config.json         {"format": "prism.model", "version": 2, "family", "net_kwargs",
                         "prediction", "n_cond", "resolution", "in_channels", "num_classes",
                         "kind", "extra", "training": <the full resolved training config>}
    schedule.json       {"name", "kwargs": the global schedule (build_schedule),
                         "spectral": the fitted spectral schedule model JSON or null,
                         "spectral_kind": "frequency" | "power" | "mixed" | null}
    progress.json       written by the training loop: {"step", "images_seen",
                         "train_seconds", "first_step_s", "train_flops", "flops_per_image"}
                         (how far training had come; not read when loading)

Every field of ``config.json`` and ``schedule.json`` is a field of the ``GenerativeModel``
that :func:`load_dir` returns, so ``save_model(other, load_dir(d))`` writes the same files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from components.generate import GenerativeModel
from components.networks.registry import build_family
from components.schedules import build_schedule

FORMAT = "prism.model"
VERSION = 2
# Version 2 changed how these families read their conditioning (the UNet's ResBlock adds the
# embedding after its norm; DiMR's TD-LN time coordinate is the cosine time of the log-SNR):
# their version-1 weights would load and silently compute something else.
CHANGED_IN_2 = {"unet": "the UNet's ResBlock dropped its noise-level and class embedding "
                        "at widths of 32 channels or fewer",
                "flexi_unet": "the UNet's ResBlock dropped its noise-level and class embedding "
                              "at widths of 32 channels or fewer",
                "dimr": "DiMR's TD-LN read the noise level through a coordinate that hardly "
                        "varied over the trained range"}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def save_model(directory: str | Path, model: GenerativeModel, *,
               training: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a model directory (see the module doc); returns its path.

    ``training`` is the resolved training config to record in ``config.json`` (None: the
    model's own ``training``). The model must say how to rebuild it: ``family`` and
    ``net_kwargs`` for the network, ``schedule_name`` and ``schedule_kwargs`` for its schedule
    (checked against ``model.schedule``, so that ``schedule.json`` is what sampling used).
    """
    if model.family is None or model.schedule_name is None:
        raise ValueError("save_model: the model needs its family and schedule_name (how "
                         "load_dir rebuilds its network and schedule)")
    _check_schedule(model)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.net.state_dict().items()}
    save_file(weights, str(d / "model.safetensors"))
    config = {"format": FORMAT, "version": VERSION, "family": model.family,
              "net_kwargs": _jsonable(model.net_kwargs), "prediction": model.prediction,
              "n_cond": model.n_cond, "resolution": model.resolution,
              "in_channels": model.in_channels, "num_classes": model.num_classes,
              "kind": model.kind, "extra": _jsonable(model.extra),
              "training": model.training if training is None else training}
    (d / "config.json").write_text(json.dumps(config, indent=1))
    schedule = {"name": model.schedule_name, "kwargs": dict(model.schedule_kwargs),
                "spectral": model.spectral, "spectral_kind": model.spectral_kind}
    (d / "schedule.json").write_text(json.dumps(schedule, indent=1))
    return d


def _check_schedule(model: GenerativeModel) -> None:
    """Raise unless ``schedule_name(**schedule_kwargs)`` has the model schedule's lambda(t)."""
    named = build_schedule(str(model.schedule_name), **model.schedule_kwargs)
    t = torch.linspace(0.0, 1.0, 33, dtype=torch.float64)
    lam_named = named.lambda_(t).double()
    lam_model = model.schedule.lambda_(t).double()
    if not torch.allclose(lam_named, lam_model, rtol=1e-6, atol=1e-6):
        raise ValueError(f"save_model: model.schedule is not the schedule "
                         f"{model.schedule_name!r} with kwargs {model.schedule_kwargs}")


def load_dir(d: str | Path, device: str | torch.device = "cpu") -> GenerativeModel:
    """A model directory (see the module doc) as a :class:`GenerativeModel` on ``device`` in
    eval mode. Only safetensors and JSON are read: loading never executes code."""
    d = Path(d)
    missing = [f for f in ("model.safetensors", "config.json", "schedule.json")
               if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{d} is not a prism model directory: missing {missing}")
    config = json.loads((d / "config.json").read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{d / 'config.json'}: not a prism model (format "
                         f"{config.get('format')!r})")
    version = int(config.get("version", 1))
    if version > VERSION:
        raise ValueError(f"{d}: model format version {version} is newer than this prism "
                         f"reads ({VERSION}); upgrade prism")
    if version < 2 and config.get("family") in CHANGED_IN_2:
        raise ValueError(f"{d}: a version-{version} {config['family']} model, trained before "
                         f"a fix ({CHANGED_IN_2[config['family']]}); its weights do not fit "
                         "the current network: retrain it")
    schedule = json.loads((d / "schedule.json").read_text())
    net = build_family(config["family"], **config["net_kwargs"])
    net.load_state_dict(load_file(str(d / "model.safetensors"), device="cpu"))
    net.to(device).train(False)
    kwargs = dict(schedule.get("kwargs", {}))
    return GenerativeModel(
        net=net, prediction=config["prediction"], n_cond=int(config["n_cond"]),
        resolution=int(config["resolution"]), in_channels=int(config["in_channels"]),
        num_classes=int(config["num_classes"]),
        schedule=build_schedule(schedule["name"], **kwargs),
        kind=config.get("kind", "standard"), spectral=schedule.get("spectral"),
        extra=dict(config.get("extra", {})), family=config["family"],
        net_kwargs=dict(config["net_kwargs"]), schedule_name=schedule["name"],
        schedule_kwargs=kwargs, spectral_kind=schedule.get("spectral_kind"),
        training=dict(config.get("training", {})),
    )
