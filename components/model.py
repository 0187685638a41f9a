"""The trained model as sampling sees it: a backbone and what is needed to drive it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from components.diffusion import Prediction
from components.schedules import Schedule


@dataclass
class GenerativeModel:
    """Everything needed to sample from a trained network, and to write it back as a model
    directory (``components.artifact``), with no platform code.

    net: the backbone ``net(x, c_noise, class_labels)``, in eval mode.
    prediction: what the backbone predicts (eps, x0, v).
    n_cond: 1 (lambda) or 3 (lambda, lambda(0), lambda(1): spectral schedules).
    resolution, in_channels, num_classes: native image size and channels; 0 classes means
        unconditional; class ``-1`` is the null class for classifier-free guidance.
    schedule: the global schedule the model was trained with (used for sampling grids).
    kind: the chain that drives the network's denoiser (``components.generate.CHAINS``):
        ``"standard"`` (any sampler over a log-SNR grid) or ``"ssd"`` (Scale Space Diffusion:
        the posterior chain over the resolution schedule, see ``components.ssd``); guidance
        wrappers apply to both.
    spectral: the fitted spectral schedule model as saved in ``schedule.json`` (or None);
        sampling with ``schedule="spectral"`` draws per-image schedules from it.
    extra: family-specific settings saved with the model (for example the SSD levels).

    What rebuilds the model from JSON (a model built in memory for sampling alone may leave
    these at their defaults; ``save_model`` needs ``family`` and ``schedule_name``):

    family, net_kwargs: the network family and the constructor keyword arguments of ``net``
        (``components.networks.registry.build_family(family, **net_kwargs)``).
    schedule_name, schedule_kwargs: ``schedule`` as
        ``components.schedules.build_schedule(schedule_name, **schedule_kwargs)``.
    spectral_kind: how a drawn spectral schedule maps t to lambda (``"frequency"``,
        ``"power"`` or ``"mixed"``; None: ``"mixed"``).
    training: the resolved training configuration the model came from (provenance only).
    """

    net: nn.Module
    prediction: Prediction
    n_cond: int
    resolution: int
    in_channels: int
    num_classes: int
    schedule: Schedule
    kind: str = "standard"
    spectral: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    family: str | None = None
    net_kwargs: dict[str, Any] = field(default_factory=dict)
    schedule_name: str | None = None
    schedule_kwargs: dict[str, float] = field(default_factory=dict)
    spectral_kind: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
