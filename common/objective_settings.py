"""Typed options of each training objective, one pydantic model per ``objective.name``.

A family objective takes most of its settings from the ``objective`` section itself
(``schedule``, ``label_dropout``, ...); ``objective.options`` holds the rest, and each model
here lists those keyword arguments with the same names and defaults as ``components``:

- ``ssd``: the ``components.ssd.SSDProcess`` settings that override the Flexi-UNet preset's
  (``components.networks.flexi_unet.SSD_SETTINGS``);
- ``dimr_multiscale``: ``components.multiscale.MultiScaleObjective``'s loss coefficients;
- ``diffusion``: nothing (``components.objectives.DiffusionObjective`` is built from the
  section's fields alone).

A key the config sets elsewhere fails naming where to set it, any other unknown key fails
naming the accepted ones, and a bad value fails naming the option. Each model also lists the
section's settings its objective fixes (``fixed``; SCIENCE.md sections 5 and 6).
``tests/training/test_typed_configs.py`` checks every constructor parameter against these
models, the section's fields and ``elsewhere``. ``OBJECTIVE_OPTIONS`` maps a name to its model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError


class ObjectiveOptionsModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # parameters of the objective that the config sets outside the section's fields:
    # option key -> what to do instead
    elsewhere: ClassVar[dict[str, str]] = {}
    # the section's fields the objective fixes: field -> (the value it needs, why)
    fixed: ClassVar[dict[str, tuple[Any, str]]] = {}


class DiffusionOptions(ObjectiveOptionsModel):
    """``diffusion``: ``components.objectives.DiffusionObjective`` takes no options."""

    elsewhere = {"n_cond": "follows objective.per_instance (3 per image, else 1)"}


NonNegative = Annotated[float, Field(ge=0)]


class MultiScaleOptions(ObjectiveOptionsModel):
    """``dimr_multiscale``: ``components.multiscale.MultiScaleObjective``'s loss coefficients
    ``c_b`` per branch, coarse to fine (None: ``[1/4, 1]``, ``[1/16, 1/4, 1]``, ...)."""

    coefficients: Annotated[tuple[NonNegative, ...], Field(min_length=1)] | None = None

    elsewhere = DiffusionOptions.elsewhere
    fixed = {"prediction": ("eps", "the DiMR multi-scale loss predicts eps"),
             "weighting": ("uniform", "the DiMR multi-scale loss is unweighted")}


class SSDOptions(ObjectiveOptionsModel):
    """``ssd``: ``components.ssd.SSDProcess`` settings. A key given here overrides the
    Flexi-UNet preset's setting; the defaults are the process's own, which apply to a preset
    without SSD settings. The beta schedule is ``objective.schedule_kwargs``."""

    levels: int = Field(4, ge=1)  # resolutions base / 2^(levels-1) .. base
    resolution_schedule: Literal["convex", "equal"] = "convex"
    gamma: float = Field(0.5, gt=0)  # convex decay exponent

    elsewhere = {"base_resolution": "the process's base resolution is data.resolution",
                 **{k: f"set objective.schedule_kwargs.{k} instead (the ddpm_linear betas)"
                    for k in ("T", "beta_start", "beta_end")}}
    fixed = {"prediction": ("x0", "the SSD objective predicts x0 at r(t-1)"),
             "weighting": ("min_snr", "the SSD objective weights by min(SNR, min_snr_gamma)"),
             "schedule": ("ddpm_linear", "the SSD process uses DDPM's linear betas"),
             "per_instance": (None, "the SSD objective has no per-image schedules")}


# objective name (``training.build.OBJECTIVES``) -> its options model
OBJECTIVE_OPTIONS: dict[str, type[ObjectiveOptionsModel]] = {
    "diffusion": DiffusionOptions,
    "ssd": SSDOptions,
    "dimr_multiscale": MultiScaleOptions,
}


def _error(kind: str, key: str, message: str, value: Any) -> InitErrorDetails:
    # the message is context, not template: a key or value may hold braces
    return InitErrorDetails(type=PydanticCustomError(kind, "{message}", {"message": message}),
                            loc=(key,), input=value)


def _raise(title: str, errors: list[InitErrorDetails]) -> None:
    if errors:  # inside a validator, the errors are reported at loc below the field
        raise ValidationError.from_exception_data(title, errors)


def typed_options(name: str, options: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """``options`` of objective ``name`` with typed values (the keys given, no defaults).

    ``fields``: the section's own fields, which an option may not repeat. Raises a
    ``ValidationError`` with one error per bad key, at that key.
    """
    model, fields = OBJECTIVE_OPTIONS[name], set(fields)
    accepted = ", ".join(model.model_fields) or f"none (the {name} objective takes no options)"
    errors = []
    for key, value in options.items():
        if key in fields:
            errors.append(_error("set_in_section", key, f"set objective.{key} instead", value))
        elif key in model.elsewhere:
            errors.append(_error("set_elsewhere", key, model.elsewhere[key], value))
        elif key not in model.model_fields:
            errors.append(_error("unknown_option", key, f"not an option of the {name} "
                                 f"objective; accepted: {accepted}", value))
    _raise(model.__name__, errors)
    settings = model.model_validate(options)
    return {k: getattr(settings, k) for k in options}


def check_fixed(name: str, values: dict[str, Any]) -> None:
    """Refuse section settings that objective ``name`` fixes (it would silently ignore them):
    a ``ValidationError`` at each such field."""
    errors = [_error("fixed_by_objective", field, f"{why}; set {_yaml(want)}, got "
                     f"{_yaml(values[field])}", values[field])
              for field, (want, why) in OBJECTIVE_OPTIONS[name].fixed.items()
              if values[field] != want]
    _raise(f"objective {name}", errors)


def _yaml(value: Any) -> str:
    return "null" if value is None else repr(value)
