"""Typed parameters of each noise schedule, one pydantic model per schedule name.

Each model lists the keyword arguments of the schedule's factory in
``components.schedules.SCHEDULES`` with the same names and defaults, typed and bounded, so
that ``objective.schedule_kwargs`` fails at config load naming the bad parameter.
``tests/training/test_typed_configs.py`` checks every factory parameter against its field.
``ScheduleParams`` is their union, discriminated by ``name``; ``SCHEDULE_PARAMS`` maps a
schedule name to its model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ScheduleParamsModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str

    def kwargs(self) -> dict[str, Any]:
        """The factory's keyword arguments: ``build_schedule(p.name, **p.kwargs())``."""
        return self.model_dump(exclude={"name"})


class _LambdaRange(ScheduleParamsModel):
    """A continuous schedule clipped to [lambda_min, lambda_max] in log-SNR."""

    lambda_min: float = -15.0
    lambda_max: float = 15.0

    @model_validator(mode="after")
    def _ordered(self) -> _LambdaRange:
        if not self.lambda_min < self.lambda_max:
            raise ValueError(f"lambda_min ({self.lambda_min}) must be < lambda_max "
                             f"({self.lambda_max})")
        return self


class CosineParams(_LambdaRange):
    """``cosine``: ``lambda(t) = -2 log tan(...) + shift``."""

    name: Literal["cosine"] = "cosine"
    shift: float = 0.0


class SiD2ShiftedParams(_LambdaRange):
    """``sid2_shifted``: the cosine shifted by ``2 log(d_ref / d)`` for images of side d."""

    name: Literal["sid2_shifted"] = "sid2_shifted"
    d: int = Field(gt=0)
    d_ref: int = Field(64, gt=0)


class SiD2InterpolatedParams(_LambdaRange):
    """``sid2_interpolated``: the shift moves from ``d_ref_hi`` (t = 0) to ``d_ref_lo``."""

    name: Literal["sid2_interpolated"] = "sid2_interpolated"
    d: int = Field(gt=0)
    d_ref_lo: float = Field(32, gt=0)
    d_ref_hi: float = Field(256, gt=0)


class _Betas(ScheduleParamsModel):
    """A discrete schedule of ``T`` betas from ``beta_start`` to ``beta_end``."""

    T: int = Field(1000, ge=2)
    beta_start: float
    beta_end: float

    @model_validator(mode="after")
    def _ordered(self) -> _Betas:
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, "
                             f"{self.beta_end}")
        return self


class DDPMLinearParams(_Betas):
    """``ddpm_linear``: DDPM's linear betas."""

    name: Literal["ddpm_linear"] = "ddpm_linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02


class SDScaledLinearParams(_Betas):
    """``sd_scaled_linear``: Stable Diffusion's betas, linear in sqrt."""

    name: Literal["sd_scaled_linear"] = "sd_scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012


class SquaredCosCapV2Params(ScheduleParamsModel):
    """``squaredcos_cap_v2``: the improved-DDPM cosine as discrete betas."""

    name: Literal["squaredcos_cap_v2"] = "squaredcos_cap_v2"
    T: int = Field(1000, ge=2)
    s: float = Field(0.008, ge=0)
    max_beta: float = Field(0.999, gt=0, lt=1)


class EDMParams(ScheduleParamsModel):
    """``edm``: the rho-warped sigma from ``sigma_min`` (t = 0) to ``sigma_max`` (t = 1)."""

    name: Literal["edm"] = "edm"
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = 80.0
    rho: float = Field(7.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> EDMParams:
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be < sigma_max "
                             f"({self.sigma_max})")
        return self


ScheduleParams = Annotated[
    CosineParams | SiD2ShiftedParams | SiD2InterpolatedParams | DDPMLinearParams
    | SDScaledLinearParams | SquaredCosCapV2Params | EDMParams,
    Field(discriminator="name"),
]

# schedule name (``components.schedules.SCHEDULES``) -> its parameters model
SCHEDULE_PARAMS: dict[str, type[ScheduleParamsModel]] = {
    "cosine": CosineParams,
    "sid2_shifted": SiD2ShiftedParams,
    "sid2_interpolated": SiD2InterpolatedParams,
    "ddpm_linear": DDPMLinearParams,
    "sd_scaled_linear": SDScaledLinearParams,
    "squaredcos_cap_v2": SquaredCosCapV2Params,
    "edm": EDMParams,
}
