"""Model presets: one registry of one-line factories across network families.

Each family module (``components.networks.<family>``) exposes ``PRESETS: dict[str, dict]``
(preset name -> constructor keyword arguments) and ``build(**kwargs) -> nn.Module``.
A backbone is called as ``net(x, c_noise, class_labels)`` (see ``components.diffusion``).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

FAMILIES: dict[str, str] = {
    "unet": "components.networks.unet",
    "flexi_unet": "components.networks.flexi_unet",
    "dimr": "components.networks.dimr",
    "dit": "components.networks.dit",
}


def _module(family: str) -> Any:
    if family not in FAMILIES:
        raise ValueError(f"unknown network family {family!r}: expected one of {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[family])


def list_presets() -> dict[str, str]:
    """Preset name -> family, for every family that is installed."""
    out: dict[str, str] = {}
    for family in FAMILIES:
        try:
            mod = _module(family)
        except ModuleNotFoundError:
            continue
        for name in getattr(mod, "PRESETS", {}):
            out[name] = family
    return out


def preset_kwargs(name: str) -> tuple[str, dict[str, Any]]:
    """(family, constructor kwargs) of a preset."""
    presets = list_presets()
    if name not in presets:
        raise ValueError(f"unknown model preset {name!r}: expected one of {sorted(presets)}")
    family = presets[name]
    return family, dict(_module(family).PRESETS[name])


def build_network(name: str, **overrides: Any) -> nn.Module:
    """Build the backbone of preset ``name``, with constructor keyword overrides."""
    family, kwargs = preset_kwargs(name)
    kwargs.update(overrides)
    return _module(family).build(**kwargs)


def build_family(family: str, **kwargs: Any) -> nn.Module:
    """Build a backbone of ``family`` from explicit constructor kwargs (as saved in config.json)."""
    return _module(family).build(**kwargs)
