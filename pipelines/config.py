"""Typed configuration of the data stages: one pydantic model per ``params.yaml`` section.

``params.yaml`` holds them under ``data:`` (``data.demo``, ``data.ingest``, ``data.spectra``,
``data.schedules``); ``load_section(path, "ingest")`` validates one and names a bad field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DemoConfig(_Section):
    """The embedded demo corpus: crops of scikit-image's bundled photographs."""

    size: int = Field(32, ge=8, le=256, description="side of each square crop, pixels")
    per_class: int = Field(64, ge=1, le=10_000, description="crops per source photograph")
    min_crop: float = Field(0.6, gt=0.0, le=1.0, description="smallest crop side, a fraction "
                            "of the photograph's shorter side")
    max_crop: float = Field(1.0, gt=0.0, le=1.0, description="largest crop side (fraction)")
    seed: int = 0

    @model_validator(mode="after")
    def _crop_range(self) -> DemoConfig:
        if self.min_crop > self.max_crop:
            raise ValueError(f"min_crop {self.min_crop} is above max_crop {self.max_crop}")
        return self


class IngestConfig(_Section):
    """Images -> WebDataset shards."""

    name: str = Field("shard", pattern=r"^[A-Za-z0-9_.]+$", description="shard file prefix")
    size: int | None = Field(None, ge=4, le=4096,
                             description="target side (center-crop + anti-aliased resize); "
                                         "None keeps native sizes")
    shard_size: int | None = Field(10_000, ge=1, description="samples per shard")
    shard_bytes: int | None = Field(None, ge=4096, description="bytes per shard (instead)")
    gzip: bool = False
    shuffle: bool = True
    seed: int = 0
    max_pixels: int = Field(40_000_000, ge=1, description="larger images are decompression "
                                                          "bombs and are rejected")
    small: Literal["reject", "upscale", "pad"] = Field(
        "reject", description="images whose shorter side is below `size`: reject them (an "
        "error record each), upscale (center-crop, Lanczos up), or pad (centered on a black "
        "square, never resampled)")

    @model_validator(mode="after")
    def _one_limit(self) -> IngestConfig:
        if (self.shard_size is None) == (self.shard_bytes is None):
            raise ValueError("set exactly one of shard_size and shard_bytes")
        return self


class SpectraJobConfig(_Section):
    """Per-image spectral statistics over the shards (Ray)."""

    eps_lo: float = Field(0.01, gt=0, description="SNR of the strongest component at lambda_min")
    eps_hi: float = Field(10.0, gt=0, description="SNR of the weakest component at lambda_max")
    min_span: float = Field(1.0, gt=0, description="smallest lambda_max - lambda_min")
    shards_per_task: int = Field(1, ge=1)
    workers: int | None = Field(None, ge=1, description="tasks in flight; None: cluster CPUs")
    max_retries: int = Field(3, ge=0)
    batch_size: int = Field(1024, ge=1, description="images per batched FFT")

    @model_validator(mode="after")
    def _order(self) -> SpectraJobConfig:
        if not self.eps_lo < self.eps_hi:
            raise ValueError("eps_lo must be < eps_hi")
        return self


class SchedulesConfig(_Section):
    """Gaussian mixture over per-image schedule parameters."""

    n_components: int = Field(4, ge=1, le=64)
    per_class: bool = False
    seed: int = 0
    kind: Literal["frequency", "power", "mixed"] = "mixed"


SECTIONS: dict[str, type[_Section]] = {
    "demo": DemoConfig, "ingest": IngestConfig, "spectra": SpectraJobConfig,
    "schedules": SchedulesConfig,
}


def load_section(path: str | Path | None, section: str, overrides: dict[str, Any] | None = None):
    """Validate ``data.<section>`` of a params.yaml (or defaults), with non-None overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        doc = yaml.safe_load(Path(path).read_text()) or {}
        values = dict((doc.get("data") or {}).get(section) or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return SECTIONS[section].model_validate(values)
    except ValidationError as exc:
        raise ValueError(f"invalid data.{section} config: {exc}") from None
