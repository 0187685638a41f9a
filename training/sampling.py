"""Sample grids during training: fixed seeds, the EMA network, ``components.generate``."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from common.run_config import Config
from components.generate import GenerativeModel, generate, image_grid, to_uint8
from components.spectral_schedules import ScheduleModel
from training.build import n_cond_of, network_spec, schedule_of, ssd_settings_of


def generative_model(cfg: Config, net: torch.nn.Module, spectral: dict[str, Any] | None
                     ) -> GenerativeModel:
    """The GenerativeModel of a network being trained (for sampling and export)."""
    kind = "ssd" if cfg.objective.name == "ssd" else "standard"
    extra: dict[str, Any] = ssd_settings_of(cfg) if kind == "ssd" else {}  # process settings
    if cfg.objective.per_instance:
        # per-instance exports carry the kind in config.json's extra as well as schedule.json
        extra["spectral_kind"] = cfg.objective.per_instance
    family, net_kwargs = network_spec(cfg)
    return GenerativeModel(
        net=net, prediction=cfg.objective.prediction, n_cond=n_cond_of(cfg),
        resolution=cfg.data.resolution, in_channels=cfg.data.channels,
        num_classes=cfg.data.num_classes, schedule=schedule_of(cfg), kind=kind,
        spectral=spectral, extra=extra, family=family, net_kwargs=net_kwargs,
        schedule_name=cfg.objective.schedule,
        schedule_kwargs=dict(cfg.objective.schedule_kwargs),
        spectral_kind=cfg.objective.per_instance)


def load_schedule_model(cfg: Config, train_params: np.ndarray | None) -> dict[str, Any] | None:
    """The spectral schedule model JSON of a per-instance run: ``sampling.schedule_model``,
    else a mixture fitted on the training set's parameters (in-memory data)."""
    if not cfg.objective.per_instance:
        return None
    if cfg.sampling.schedule_model:
        with open(cfg.sampling.schedule_model) as f:
            return json.load(f)
    if train_params is None:
        raise ValueError("objective.per_instance: set sampling.schedule_model (the fitted "
                         "schedule model JSON)")

    n_comp = max(1, min(4, len(train_params) // 20))
    return ScheduleModel.fit(train_params.astype(np.float64), n_components=n_comp,
                             seed=cfg.run.seed).to_json()


@torch.no_grad()
def sample_grid(cfg: Config, model: GenerativeModel, device: torch.device) -> np.ndarray:
    """``sampling.num_images`` samples at fixed seeds -> one uint8 (H, W, 3) grid."""
    n = cfg.sampling.num_images
    seeds = [cfg.sampling.seed + i for i in range(n)]
    labels = [i % model.num_classes for i in range(n)] if model.num_classes else None
    was_training = model.net.training
    model.net.train(False)
    x = generate(model, seeds=seeds, steps=cfg.sampling.steps, sampler=cfg.sampling.sampler,
                 class_labels=labels, device=device,
                 schedule="spectral" if cfg.objective.per_instance else "model")
    model.net.train(was_training)
    return to_uint8(image_grid(x.float().cpu())).numpy()
