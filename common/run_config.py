"""Typed training configuration: one pydantic model per YAML section (extra keys forbidden).

A config file has the sections ``run``, ``data``, ``model``, ``objective``, ``optim``,
``train``, ``checkpoint``, ``tracking`` and ``sampling``; every key has a default except
where noted. ``load_config(path, overrides)`` reads YAML, applies ``--set a.b=value``
overrides and validates; a bad value fails at load with a message naming the field
(``objective.prediction: Input should be 'eps', 'x0' or 'v'``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from common.network_settings import NETWORK_SETTINGS, FamilySettings, NetworkSettings
from common.objective_settings import check_fixed, typed_options
from common.schedule_settings import SCHEDULE_PARAMS, ScheduleParams


def _switch_value(value: Any) -> Any:
    """YAML 1.1 reads ``on``/``off`` (and ``yes``/``no``) as booleans: take them back."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


# "auto" | "on" | "off"; a YAML boolean (``compile: off``) is read as the switch it spells
Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_switch_value)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(_Section):
    """Identity of the run: the same ``name`` in the same ``output_dir`` resumes."""

    name: str = Field("debug", pattern=r"^[A-Za-z0-9_.-]+$")
    project: str = Field("prism", pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = "runs"  # local runs/<name>/ holds checkpoints, metrics.jsonl, model/
    seed: int = Field(0, ge=0, lt=2**31)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA only
    compile: Switch = "auto"  # auto: torch.compile on CUDA only
    # torch.compile's mode; "reduce-overhead" records the network's forward and backward as
    # CUDA graphs (benchmarks/train_profile.py measures the modes side by side)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"
    # what is compiled: the whole network (one graph per input shape: SSD's Flexi-UNet gets
    # one per resolution pair), or each of its repeated blocks on its own (a network's
    # COMPILE_UNITS; one graph per block shape, shared by every resolution pair that runs it)
    compile_scope: Literal["model", "blocks"] = "model"
    channels_last: Switch = "auto"
    # CUDA: every host sync inside a training step after the first (where the step waits for
    # the GPU, which then idles) is printed with its place ("warn") or stops the run ("error")
    sync_debug: Literal["off", "warn", "error"] = "off"
    # CUDA graphs of the eager network's forward and backward, one per input shape, recorded in
    # seconds (training.graphs; compile off: the graphs replace compilation, not add to it)
    cuda_graphs: Annotated[Literal["off", "on"], BeforeValidator(_switch_value)] = "off"

    @model_validator(mode="after")
    def _graphs_without_compile(self) -> RunConfig:
        if self.cuda_graphs == "on" and self.compile != "off":
            raise ValueError("run.cuda_graphs=on records the eager network: set run.compile=off "
                             "(torch.compile's own graphs: run.compile_mode=reduce-overhead)")
        return self


class DataConfig(_Section):
    """Where the images come from. ``source: shards`` streams WebDataset shards (a local
    directory, a glob or ``s3://bucket/prefix``); ``synthetic`` is an in-memory generated set."""

    source: Literal["shards", "synthetic", "npz"] = "synthetic"
    url: str | None = None  # shards: dir / s3 prefix; npz: path with x (N,H,W,C) uint8, y
    resolution: int = Field(32, ge=4, le=1024)
    channels: int = Field(3, ge=1, le=4)
    num_classes: int = Field(0, ge=0)  # 0: unconditional (labels ignored)
    synthetic_size: int = Field(512, ge=1)
    spectral_stats: str | None = None  # Parquet file/dir keyed by sample key
    num_workers: int = Field(0, ge=0, le=64)
    random_flip: bool = True
    version: str | None = None  # data version tag (e.g. a DVC hash), logged as a tag

    @model_validator(mode="after")
    def _url_needed(self) -> DataConfig:
        if self.source in ("shards", "npz") and not self.url:
            raise ValueError(f"data.url is required for source={self.source!r}")
        return self


def _network_of(preset: str, overrides: dict[str, Any]) -> FamilySettings:
    """The typed settings of ``preset``'s family: the preset's values, then ``overrides``."""
    # deferred: the preset tables live beside the networks, which import torch (~1 s): only
    # validation needs them, and the CLI imports this module for --help
    from components.networks.registry import preset_kwargs

    family, kwargs = preset_kwargs(preset)
    if "family" in overrides:
        raise ValueError(f"the family is the preset's ({family}): choose another model.preset")
    return NETWORK_SETTINGS[family].model_validate({**kwargs, **overrides})


class ModelConfig(_Section):
    """A preset from ``components.networks.registry`` plus constructor overrides, validated
    into the preset family's typed settings (``common.network_settings``): a bad override
    fails naming it (``model.overrides.depth: Input should be a valid integer``)."""

    preset: str = "unet-debug"
    overrides: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    # the preset's settings with the overrides applied: derived here, never set nor dumped
    # (None only where the preset or the overrides failed, and then the config does not load)
    network: NetworkSettings | None = Field(None, exclude=True, validate_default=True)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str) -> str:
        _network_of(preset, {})  # an unknown preset: ValueError with the list
        return preset

    @field_validator("overrides")
    @classmethod
    def _typed_overrides(cls, overrides: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "preset" not in info.data:  # the preset's own error is reported
            return overrides
        network = _network_of(info.data["preset"], overrides)
        return {k: getattr(network, k) for k in overrides}

    @field_validator("network", mode="before")
    @classmethod
    def _derived_network(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise ValueError("derived from model.preset and model.overrides: set those instead")
        if "preset" not in info.data or "overrides" not in info.data:
            return None
        return _network_of(info.data["preset"], info.data["overrides"])


class ObjectiveConfig(_Section):
    """The loss. ``name: diffusion`` is ``components.objectives.DiffusionObjective``;
    ``ssd`` and ``dimr_multiscale`` are the family objectives, built from these fields and
    ``options`` (see ``training.build.build_objective``). ``schedule_kwargs`` are validated
    into the schedule's typed parameters (``common.schedule_settings``), ``options`` into the
    named objective's typed options (``common.objective_settings``), which also lists the
    fields a family objective fixes (``ssd`` predicts x0, ...)."""

    name: Literal["diffusion", "ssd", "dimr_multiscale"] = "diffusion"
    prediction: Literal["eps", "x0", "v"] = "eps"
    schedule: str = "cosine"  # a components.schedules.SCHEDULES name
    schedule_kwargs: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    # the schedule's parameters with their defaults: derived here, never set nor dumped
    # (None only where the schedule or its kwargs failed, and then the config does not load)
    schedule_params: ScheduleParams | None = Field(None, exclude=True, validate_default=True)
    # per-image spectral schedules: a components.spectral_schedules kind, or None (global)
    per_instance: Literal["frequency", "power", "mixed"] | None = None
    weighting: Literal["uniform", "min_snr", "sigmoid"] = "uniform"
    min_snr_gamma: float = Field(5.0, gt=0)
    sigmoid_bias: float = 0.0
    label_dropout: float = Field(0.0, ge=0, lt=1)
    # the objective's own settings (SSD process, DiMR loss coefficients): the keys given,
    # typed; the objective's defaults (ssd: the preset's) hold for the others
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, schedule: str) -> str:
        if schedule not in SCHEDULE_PARAMS:
            raise ValueError(f"unknown schedule {schedule!r}: expected one of "
                             f"{', '.join(SCHEDULE_PARAMS)}")
        return schedule

    @field_validator("schedule_kwargs")
    @classmethod
    def _typed_kwargs(cls, kwargs: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "schedule" not in info.data:  # the schedule's own error is reported
            return kwargs
        if "name" in kwargs:
            raise ValueError("the schedule's name is objective.schedule: set that instead")
        params = SCHEDULE_PARAMS[info.data["schedule"]].model_validate(kwargs)
        return {k: getattr(params, k) for k in kwargs}

    @field_validator("schedule_params", mode="before")
    @classmethod
    def _derived_params(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise ValueError("derived from objective.schedule and objective.schedule_kwargs: "
                             "set those instead")
        if "schedule" not in info.data or "schedule_kwargs" not in info.data:
            return None
        return SCHEDULE_PARAMS[info.data["schedule"]].model_validate(info.data["schedule_kwargs"])

    @field_validator("options")
    @classmethod
    def _typed_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "name" not in info.data:  # the name's own error is reported
            return options
        # an option may not repeat a field the user sets (the derived ones are not set)
        fields = [k for k, f in cls.model_fields.items() if not f.exclude and k != "options"]
        return typed_options(info.data["name"], options, fields)

    @model_validator(mode="after")
    def _fixed_by_objective(self) -> ObjectiveConfig:
        check_fixed(self.name, {k: getattr(self, k) for k in type(self).model_fields})
        return self


class OptimConfig(_Section):
    """AdamW with linear warm-up (in images) and gradient clipping; EMA of the weights."""

    lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)
    warmup_images: int = Field(0, ge=0)
    decay: Literal["constant", "cosine"] = "constant"
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    ema_warmup: bool = True  # decay_k = min(ema_decay, (1 + k) / (10 + k))
    fused: Switch = "auto"


class TrainConfig(_Section):
    """How long and how big: progress is counted in images seen."""

    total_images: int = Field(10_240, ge=1)
    batch_size: int = Field(64, ge=1)  # global images per optimizer step
    grad_accum: int = Field(1, ge=1)
    log_every_images: int = Field(1024, ge=1)
    # stop (checkpoint, export) at the first log step after this many training seconds: the
    # loop's clock, which leaves out each process's first step (compilation) and the exports
    time_limit_s: float | None = Field(None, gt=0)
    count_flops: bool = True  # measure training FLOPs per image at the first step (logged)


class CheckpointConfig(_Section):
    """Checkpoints (resumable state) and snapshots (EMA model exports along the run)."""

    every_images: int = Field(5120, ge=1)
    keep_last: int = Field(3, ge=1)
    resume: bool = True  # the same run name resumes from its latest checkpoint
    # export the EMA model to <run>/snapshots/<images seen>/ when the images seen, the
    # training FLOPs (train.count_flops) or the training seconds (the loop's clock, as
    # train.time_limit_s) first reach each mark: quality along the run
    snapshot_images: list[int] = Field(default_factory=list)
    snapshot_flops: list[float] = Field(default_factory=list)
    snapshot_seconds: list[float] = Field(default_factory=list)


class TrackingConfig(_Section):
    """MLflow: experiment = run.project, run = run.name. ``uri`` None: $MLFLOW_TRACKING_URI,
    else ``sqlite:///mlflow.db`` in the working directory."""

    enabled: bool = True
    uri: str | None = None
    register_name: str | None = None  # registered model name; None: <project>-<run name>
    alias: str = "candidate"
    system_metrics: bool = True


class SamplingConfig(_Section):
    """Sample grids logged during training (EMA weights, fixed seeds)."""

    every_images: int = Field(0, ge=0)  # 0: only at the end
    num_images: int = Field(16, ge=0, le=256)
    steps: int = Field(32, ge=1, le=1000)
    # None: the model's own (DDIM; SSD models: their posterior chain, which takes no other)
    sampler: Literal["ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_full"] | None = None
    seed: int = Field(1234, ge=0)
    # fitted spectral schedule model JSON (per-instance runs); None: fitted on the training
    # set's parameters at start (in-memory data only)
    schedule_model: str | None = None


class Config(_Section):
    """The full training configuration."""

    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    # built per instance: the model's checks import torch, which importing this module must not
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    sampling: SamplingConfig = SamplingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.train.batch_size % self.train.grad_accum:
            raise ValueError(f"train.batch_size ({self.train.batch_size}) must be divisible by "
                             f"train.grad_accum ({self.train.grad_accum})")
        if self.objective.per_instance and not (self.data.spectral_stats
                                                or self.data.source == "synthetic"):
            raise ValueError("objective.per_instance needs data.spectral_stats (the Parquet of "
                             "per-image spectral parameters)")
        if self.checkpoint.snapshot_flops and not self.train.count_flops:
            raise ValueError("checkpoint.snapshot_flops needs train.count_flops: true")
        if (self.objective.per_instance and self.data.source == "shards"
                and not self.sampling.schedule_model):
            raise ValueError("objective.per_instance with sharded data needs "
                             "sampling.schedule_model (the fitted schedule model JSON)")
        return self

    @property
    def total_steps(self) -> int:
        """Optimizer steps: ceil(total_images / batch_size)."""
        return -(-self.train.total_images // self.train.batch_size)

    def public_dump(self) -> dict[str, Any]:
        """The config as JSON-able data with credentials removed from every URI: what is
        logged to MLflow and written into checkpoints and model directories."""
        return _redact_tree(self.model_dump(mode="json"))


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def redact_uri(text: str) -> str:
    """``scheme://user:password@host/...`` -> ``scheme://host/...`` (anywhere in ``text``)."""
    return _USERINFO.sub(r"\g<scheme>", text)


def _redact_tree(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _redact_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_redact_tree(v) for v in tree]
    return redact_uri(tree) if isinstance(tree, str) else tree


class ConfigError(ValueError):
    """A config that does not validate; the message names every bad field."""


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "run.name=x"]`` -> nested dict (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw else None)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid training config {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {field}: {e['msg']}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a nested dict; raise :class:`ConfigError` naming the bad fields."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def select_section(raw: dict[str, Any], section: str, source: str) -> dict[str, Any]:
    """The sub-mapping at dotted ``section`` (e.g. ``models.demo-eps`` of params.yaml); its
    ``run.name`` defaults to the last key."""
    node: Any = raw
    for i, key in enumerate(section.split(".")):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(section.split(".")[:i]) or "the top level"
            have = sorted(node) if isinstance(node, dict) else []
            raise ConfigError(f"{source}: no section {section!r} ({key!r} not in {where}; "
                              f"found {have})")
        node = node[key]
    if not isinstance(node, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping of sections")
    run = node.get("run") or {}
    return {**node, "run": {"name": section.split(".")[-1], **run}}


def load_config(path: str | Path, overrides: list[str] | None = None,
                section: str | None = None) -> Config:
    """Read a YAML config (or its dotted ``section``), apply ``key=value`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    source = str(path)
    if section:
        raw, source = select_section(raw, section, source), f"{path} [{section}]"
    return config_from_dict(_merge(raw, parse_overrides(overrides or [])), source)
