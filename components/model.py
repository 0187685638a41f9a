"""The trained model as sampling sees it: a backbone and what is needed to drive it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from components.diffusion import Prediction
from components.schedules import Schedule


@dataclass
class GenerativeModel:
    """Everything needed to sample from a trained network, with no platform code.

    net: the backbone ``net(x, c_noise, class_labels)``, in eval mode.
    prediction: what the backbone predicts (eps, x0, v).
    n_cond: 1 (lambda) or 3 (lambda, lambda(0), lambda(1): spectral schedules).
    resolution, in_channels, num_classes: native image size and channels; 0 classes means
        unconditional; class ``-1`` is the null class for classifier-free guidance.
    schedule: the global schedule the model was trained with (used for sampling grids).
    kind: ``"standard"`` (any sampler, guidance wrappers apply) or ``"ssd"`` (Scale Space
        Diffusion: its own sampler over the resolution schedule, see ``components.ssd``).
    spectral: the fitted spectral schedule model as saved in ``schedule.json`` (or None);
        sampling with ``schedule="spectral"`` draws per-image schedules from it.
    extra: family-specific settings saved with the model (for example the SSD levels).
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
