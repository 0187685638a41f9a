"""Plain checks for the networks' config dataclasses (``DiMRConfig``, ``DiTConfig``).

The typed, user-facing validation of network settings is ``common.network_settings``; these
checks keep a network built straight from keyword arguments (a saved ``config.json``, a test)
from starting with a setting its layers cannot honour, and name the setting.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_kwargs(cls: type[T], kwargs: dict[str, Any]) -> T:
    """``cls(**kwargs)`` for a config dataclass; unknown keys raise ValueError naming them."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    extra = sorted(set(kwargs) - names)
    if extra:
        raise ValueError(f"{cls.__name__}: extra settings {extra}; expected {sorted(names)}")
    return cls(**kwargs)


def check_at_least(config: object, **minimum: int) -> None:
    """Raise ValueError naming every field of ``config`` below its ``minimum``."""
    low = [f"{name} = {getattr(config, name)} (must be >= {lo})"
           for name, lo in minimum.items() if getattr(config, name) < lo]
    if low:
        raise ValueError(f"{type(config).__name__}: " + ", ".join(low))
