"""From a config to the parts of a run: network, schedule, objective, optimizer groups.

The objective registry maps ``objective.name`` to its class: ``diffusion``
(``components.objectives.DiffusionObjective``), ``ssd`` (``components.ssd.SSDObjective``),
``dimr_multiscale`` (``components.multiscale.MultiScaleObjective``).

The family objectives take the config's own fields where they apply (``ssd``: the Flexi-UNet
preset's process settings, ``min_snr_gamma``, ``label_dropout``; ``dimr_multiscale``: the
schedule, ``label_dropout``, ``per_instance``); ``options`` adds the rest (SSD settings, loss
coefficients), typed at config load (``common.objective_settings``), where a setting the
family objective cannot honour fails too, naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from common.run_config import Config
from components.multiscale import MultiScaleObjective
from components.networks.flexi_unet import SSD_SETTINGS
from components.networks.registry import build_family
from components.objectives import DiffusionObjective
from components.schedules import Schedule, build_schedule
from components.ssd import SSDObjective

OBJECTIVES: dict[str, type] = {
    "diffusion": DiffusionObjective,
    "ssd": SSDObjective,
    "dimr_multiscale": MultiScaleObjective,
}


def n_cond_of(cfg: Config) -> int:
    """1 (lambda) for a global schedule, 3 (lambda(t), lambda(0), lambda(1)) per instance."""
    return 3 if cfg.objective.per_instance else 1


def schedule_of(cfg: Config) -> Schedule:
    """The global schedule (also the sampling grid's schedule for per-instance runs)."""
    params = cfg.objective.schedule_params
    return build_schedule(params.name, **params.kwargs())


def network_spec(cfg: Config) -> tuple[str, dict[str, Any]]:
    """(family, constructor kwargs) of the run's network: the preset, the data's classes and
    channels, the conditioning width, then the config's overrides, validated again as the
    family's typed settings."""
    network = cfg.model.network
    # every backbone family takes these (the backbone contract of CONVENTIONS.md)
    data = dict(num_classes=cfg.data.num_classes, n_cond=n_cond_of(cfg),
                in_channels=cfg.data.channels)
    settings = type(network).model_validate({**network.model_dump(), **data,
                                             **cfg.model.overrides})
    res = settings.resolution
    if res != cfg.data.resolution and cfg.objective.name == "diffusion":
        raise ValueError(f"model.preset {cfg.model.preset!r} is built for {res}x{res} images "
                         f"but data.resolution is {cfg.data.resolution}")
    return settings.family, settings.kwargs()


def build_model(cfg: Config) -> tuple[nn.Module, str, dict[str, Any]]:
    """(network, family, constructor kwargs)."""
    family, kwargs = network_spec(cfg)
    return build_family(family, **kwargs), family, kwargs


def build_objective(cfg: Config) -> Callable:
    """The loss callable ``objective(net, batch) -> (loss, logs)`` named by the config."""
    o = cfg.objective
    cls: Any = OBJECTIVES[o.name]
    if o.name == "ssd":
        return cls.from_settings(cfg.data.resolution, ssd_settings_of(cfg),
                                 min_snr_gamma=o.min_snr_gamma, label_dropout=o.label_dropout)
    if o.name == "dimr_multiscale":
        return cls(schedule=None if o.per_instance else schedule_of(cfg),
                   label_dropout=o.label_dropout, n_cond=n_cond_of(cfg),
                   per_instance=o.per_instance, **o.options)
    return cls(
        schedule=None if o.per_instance else schedule_of(cfg),
        prediction=o.prediction, weighting=o.weighting, min_snr_gamma=o.min_snr_gamma,
        sigmoid_bias=o.sigmoid_bias, n_cond=n_cond_of(cfg), label_dropout=o.label_dropout,
        per_instance=o.per_instance, **o.options,
    )


def ssd_settings_of(cfg: Config) -> dict[str, Any]:
    """The ``components.ssd.SSDProcess`` settings of an ``ssd`` run (saved in the model's
    ``extra``): the Flexi-UNet preset's (``flexi_unet.SSD_SETTINGS``), DDPM's ``T``,
    ``beta_start``, ``beta_end`` from ``objective.schedule_kwargs``, then ``objective.options``."""
    settings: dict[str, Any] = dict(SSD_SETTINGS.get(cfg.model.preset, {}))
    kw = cfg.objective.schedule_kwargs
    settings.update({k: int(kw[k]) if k == "T" else float(kw[k])
                     for k in ("T", "beta_start", "beta_end") if k in kw})
    settings.update(cfg.objective.options)
    return settings


def param_groups(net: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The model's own groups (``param_groups(weight_decay)``, e.g. TD-LN exempt from decay),
    else decay on weights of rank >= 2 and none on biases and norms."""
    if hasattr(net, "param_groups"):
        return net.param_groups(weight_decay)
    decay, no_decay = [], []
    for p in net.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
