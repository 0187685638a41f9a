"""Request and response models of the HTTP API (pydantic, ``extra="forbid"``).

Validation that needs only the request happens here (pydantic -> 422 naming the field); the
closed sets of values and the seed range are ``components.options``'s, and
:meth:`GenerateRequest.options` turns a request into the ``GenerateOptions`` the sampler takes.
Validation that needs the model (``components.options.check_options``: resolution multiple of
native, class range; the memory cap, ``serving.memory``) happens in :mod:`serving.jobs` and
comes back as a ``ServiceError`` naming the field the check named.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from components.options import (
    DEFAULT_STEPS,
    MAX_SEED,
    SAMPLER_NAMES,
    GenerateOptions,
    SamplerName,
    ScheduleName,
    UgOrder,
    Upscale,
)

__all__ = ["GenerateRequest", "MAX_SEED", "SAMPLER_NAMES"]

MAX_IMAGES = 64  # per request
MAX_STEPS = 1000
MAX_RESOLUTION = 4096
_MODEL_RE = re.compile(
    r"^(models:/)?[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}([@/][A-Za-z0-9_.\-]{1,64})?$")


class TimeAware(BaseModel):
    """Time-aware conditioning: the coarse layout follows ``class_labels``, the detail
    ``second_class``, switching at ``switch_t`` (t = 1 noise, t = 0 clean)."""

    model_config = ConfigDict(extra="forbid")
    second_class: int = Field(ge=0, le=1_000_000)
    switch_t: float = Field(gt=0.0, lt=1.0)


class TimeAwareAuto(BaseModel):
    """Time-aware conditioning with the switch time chosen from the chromatogram."""

    model_config = ConfigDict(extra="forbid")
    second_class: int = Field(ge=0, le=1_000_000)
    switch_t: Literal["auto"] = "auto"


class GenerateRequest(BaseModel):
    """``POST /v1/generate``."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Registered model: NAME@ALIAS, NAME/VERSION or models:/...; "
        "default: the model the service was started with.")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES)
    seeds: list[int] | None = Field(
        None, min_length=1, max_length=MAX_IMAGES,
        description="One seed per image (then num_images is their count).")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Base seed: image i gets seed + i.")
    steps: int = Field(DEFAULT_STEPS, ge=1, le=MAX_STEPS)
    sampler: SamplerName | None = Field(
        None, description="Unset: the model's own (DDIM for a denoiser; a Scale Space "
        "Diffusion model's posterior chain, which takes no other).")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM stochasticity (the ddim "
                       "sampler only).")
    schedule: ScheduleName = "model"
    cfg_scale: float = Field(1.0, ge=0.0, le=20.0, description="Classifier-free guidance.")
    class_labels: list[int] | int | None = Field(
        None, description="One class for all images, or one per image.")
    resolution: int | None = Field(
        None, ge=1, le=MAX_RESOLUTION, description="Output side, a multiple of the native one.")
    upscale: Upscale = "ug"
    ug_theta: float = Field(1.3, ge=0.0, le=10.0)
    ug_eta: float = Field(1.0, ge=0.0, le=1.0)
    ug_order: UgOrder = "ug_of_cfg"
    time_aware: TimeAware | TimeAwareAuto | None = None
    clip_denoised: bool = Field(
        True, description="Clamp each step's x0 estimate to the data range [-1, 1].")
    format: Literal["png", "grid", "json"] = "json"

    @field_validator("model")
    @classmethod
    def _model_ref(cls, v: str | None) -> str | None:
        if v is not None and not _MODEL_RE.match(v):
            raise ValueError("model must look like NAME@ALIAS, NAME/VERSION or models:/NAME@ALIAS")
        return v

    @field_validator("seeds")
    @classmethod
    def _seed_range(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(s < 0 or s > MAX_SEED for s in v):
            raise ValueError(f"seeds must be in [0, {MAX_SEED}]")
        return v

    @field_validator("class_labels")
    @classmethod
    def _label_range(cls, v: list[int] | int | None) -> list[int] | int | None:
        labels = [v] if isinstance(v, int) else (v or [])
        if any(c < 0 or c > 1_000_000 for c in labels):
            raise ValueError("class labels must be >= 0 (the null class is internal)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> GenerateRequest:
        if self.seeds is not None:
            if "num_images" in self.model_fields_set and self.num_images != len(self.seeds):
                raise ValueError(f"num_images ({self.num_images}) != len(seeds) "
                                 f"({len(self.seeds)})")
            self.num_images = len(self.seeds)
        if isinstance(self.class_labels, list) and len(self.class_labels) != self.num_images:
            raise ValueError(f"class_labels has {len(self.class_labels)} entries for "
                             f"{self.num_images} images: give one, or one per image")
        if self.format == "png" and self.num_images != 1:
            raise ValueError("format 'png' returns one image: use 'grid' or 'json' for more")
        return self

    def options(self) -> GenerateOptions:
        """The request's generation settings, the object the sampler takes."""
        ta = None if self.time_aware is None else (self.time_aware.second_class,
                                                   self.time_aware.switch_t)
        return GenerateOptions(
            steps=self.steps, sampler=self.sampler, eta=self.eta, cfg_scale=self.cfg_scale,
            resolution=self.resolution, upscale=self.upscale, ug_theta=self.ug_theta,
            ug_eta=self.ug_eta, ug_order=self.ug_order, schedule=self.schedule, time_aware=ta,
            clip_denoised=self.clip_denoised)

    def image_seeds(self) -> list[int]:
        """The seed of each image."""
        if self.seeds is not None:
            return list(self.seeds)
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_images)]

    def image_labels(self) -> list[int] | None:
        if self.class_labels is None:
            return None
        if isinstance(self.class_labels, int):
            return [self.class_labels] * self.num_images
        return list(self.class_labels)


class Timings(BaseModel):
    queue_s: float
    generate_s: float
    total_s: float


class ImageOut(BaseModel):
    seed: int
    class_label: int | None
    png_base64: str


class GenerateResponse(BaseModel):
    """JSON response of ``POST /v1/generate`` (``format="json"``)."""

    model: str
    model_version: str
    resolution: int
    images: list[ImageOut]
    seeds: list[int]
    timings: Timings
    batch_requests: int = Field(description="Requests run together in this batch.")
    batch_images: int = Field(description="Images generated together in this batch.")


class ModelInfo(BaseModel):
    name: str
    uri: str
    version: str
    loaded: bool
    kind: str | None = None
    resolution: int | None = None
    in_channels: int | None = None
    num_classes: int | None = None
    prediction: str | None = None
    device: str | None = None
    cuda_graphs: bool | None = None


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class ErrorBody(BaseModel):
    """Every 4xx answer: ``detail`` a message (or pydantic's list of errors, each with
    ``loc``, ``msg``, ``type``), ``fields`` the request fields at fault (empty when the
    request as a whole is refused)."""

    detail: str | list[dict[str, Any]]
    fields: list[str] = Field(default_factory=list)
