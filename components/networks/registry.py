"""Model presets: one registry of one-line factories across network families.

Each family module (``components.networks.<family>``) exposes ``PRESETS: dict[str, dict]``
(preset name -> constructor keyword arguments) and ``build(**kwargs) -> nn.Module``.
A backbone is called as ``net(x, c_noise, class_labels)`` (see ``components.diffusion``).
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any

from torch import nn

from components.networks import dimr, dit, flexi_unet, unet

FAMILIES: dict[str, ModuleType] = {"unet": unet, "flexi_unet": flexi_unet, "dimr": dimr,
                                   "dit": dit}
# what each family's ``build(**kwargs)`` takes: a network class's constructor, or a config
# dataclass (``common.network_settings`` mirrors these field for field, checked by a test)
BUILDS_FROM: dict[str, type] = {"unet": unet.UNet, "flexi_unet": flexi_unet.FlexiUNet,
                                "dimr": dimr.DiMRConfig, "dit": dit.DiTConfig}


def _module(family: str) -> Any:
    if family not in FAMILIES:
        raise ValueError(f"unknown network family {family!r}: expected one of {sorted(FAMILIES)}")
    return FAMILIES[family]


def constructor_parameters(target: type) -> dict[str, inspect.Parameter]:
    """The keyword parameters of ``target``'s constructor, following ``**kwargs`` passed on
    to a base class (``FlexiUNet(mode, **unet_kwargs)`` takes the UNet's too)."""
    out: dict[str, inspect.Parameter] = {}
    for cls in target.__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        out.update({p.name: p for p in params if p.name != "self" and p.name not in out
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)})
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return out


def family_parameters(family: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments a family's ``build`` accepts, with their defaults."""
    _module(family)  # an unknown family: ValueError with the list
    return constructor_parameters(BUILDS_FROM[family])


def list_presets() -> dict[str, str]:
    """Preset name -> family, across every family."""
    return {name: family for family, mod in FAMILIES.items() for name in mod.PRESETS}


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
