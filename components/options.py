"""The options of one generation, the one object that crosses from a caller (the HTTP schema,
the CLI, an experiment) to the sampler, and the checks that need the model.

``GenerateOptions`` holds what all images of one ``generate`` call share; the closed sets of
values (samplers, schedules, upscaling, guidance order) and the seed range exist only here, so
the HTTP schema's enums and limits are these. :func:`check_options` validates the options
against a model and raises :class:`OptionError`, which names the offending field itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from components.model import GenerativeModel
from components.samplers import SAMPLERS

MAX_SEED = 2**63 - 1
DEFAULT_STEPS = 32  # what a request that names no step count gets (HTTP, MLflow pyfunc)
DEFAULT_SAMPLER = "ddim"  # a denoiser's sampler when none is named (SSD: its own chain)
SamplerName = Literal["ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_full"]
ScheduleName = Literal["model", "spectral"]
Upscale = Literal["ug", "cascade"]
UgOrder = Literal["ug_of_cfg", "cfg_of_ug", "cfg_high_only"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
if set(SAMPLER_NAMES) != set(SAMPLERS):  # one list of samplers, whatever is added where
    raise ImportError(f"SamplerName {sorted(SAMPLER_NAMES)} != samplers {sorted(SAMPLERS)}")


class OptionError(ValueError):
    """A generation setting the model cannot honour; ``field`` names it (``steps``,
    ``class_labels``, ...), as a request's field would be named."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class GenerateOptions:
    """The settings of one ``generate`` call that are shared by all images of a batch.

    ``resolution`` None is the model's native one; a multiple m of it goes through upsample
    guidance (``upscale="ug"``, with ``ug_theta``, ``ug_eta``, ``ug_order``) or the cascade.
    ``time_aware`` is ``(second_class, switch_t)`` with ``switch_t`` in (0, 1) or ``"auto"``.
    ``clip_denoised`` clamps each step's x0 estimate to the data range [-1, 1].
    ``sampler`` None is the model's own: DDIM for a denoiser (``DEFAULT_SAMPLER``), the
    posterior chain for a Scale Space Diffusion model, which takes no other; ``eta`` is DDIM's.
    """

    steps: int
    sampler: SamplerName | None = None
    eta: float = 0.0
    cfg_scale: float = 1.0
    resolution: int | None = None
    upscale: Upscale = "ug"
    ug_theta: float = 1.3
    ug_eta: float = 1.0
    ug_order: UgOrder = "ug_of_cfg"
    schedule: ScheduleName = "model"
    time_aware: tuple[int, float | str] | None = None
    clip_denoised: bool = True


def _closed(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise OptionError(field, f"{field} must be one of {', '.join(allowed)}, got {value!r}")


def check_options(model: GenerativeModel, opts: GenerateOptions, seeds: list[int],
                  class_labels: list[int] | None) -> int:
    """Validate ``opts`` (and the seeds and labels) against ``model``; return the upscale
    factor m.

    Raises :class:`OptionError` naming the offending field.
    """
    if opts.sampler is not None:
        _closed("sampler", opts.sampler, SAMPLER_NAMES)
    _closed("schedule", opts.schedule, get_args(ScheduleName))
    _closed("upscale", opts.upscale, get_args(Upscale))
    _closed("ug_order", opts.ug_order, get_args(UgOrder))
    if opts.steps < 1:
        raise OptionError("steps", f"steps must be >= 1, got {opts.steps}")
    if not seeds:
        raise OptionError("seeds", "seeds must name at least one image")
    if any(not 0 <= int(s) <= MAX_SEED for s in seeds):
        raise OptionError("seeds", f"seeds must be in [0, {MAX_SEED}]")
    native, num_classes = model.resolution, model.num_classes
    if model.kind == "ssd":
        _check_ssd(opts, native)
    elif opts.eta != 0.0 and (opts.sampler or DEFAULT_SAMPLER) != "ddim":
        raise OptionError("eta", f"eta is DDIM's stochasticity and does not apply to the "
                          f"{opts.sampler} sampler (ddpm is ancestral, the DPM-Solver++ "
                          f"samplers are deterministic), got eta={opts.eta}")
    res = opts.resolution or native
    if res <= 0 or res % native:
        raise OptionError("resolution", f"resolution {res} is not a positive multiple of the "
                          f"model's native resolution {native}")
    if class_labels is not None:
        if len(class_labels) != len(seeds):
            raise OptionError("class_labels", f"class_labels has {len(class_labels)} entries "
                              f"for {len(seeds)} seeds")
        if num_classes == 0:
            raise OptionError("class_labels", "class_labels given but the model is "
                              "unconditional")
        bad = [c for c in class_labels if not 0 <= c < num_classes]
        if bad:
            raise OptionError("class_labels", f"class_labels {bad[:4]} out of range "
                              f"[0, {num_classes})")
    if opts.cfg_scale != 1.0 and class_labels is None:
        # the field at fault is the one missing
        raise OptionError("class_labels", "cfg_scale != 1 needs class_labels (classifier-free "
                          "guidance)")
    if opts.time_aware is not None:
        second, switch = opts.time_aware
        if class_labels is None:
            raise OptionError("class_labels", "time_aware needs class_labels (the condition "
                              "of the layout)")
        if not 0 <= int(second) < num_classes:
            raise OptionError("time_aware", f"time_aware second class {second} out of range "
                              f"[0, {num_classes})")
        if switch != "auto" and not 0.0 < float(switch) < 1.0:
            raise OptionError("time_aware", "time_aware switch time must be in (0, 1) or "
                              f"'auto', got {switch}")
    if opts.schedule == "spectral" and model.spectral is None:
        raise OptionError("schedule", "schedule 'spectral' needs a model saved with a spectral "
                          "schedule model")
    return res // native


def _check_ssd(opts: GenerateOptions, native: int) -> None:
    """What a Scale Space Diffusion chain cannot honour (classifier-free guidance, time-aware
    conditioning and ``clip_denoised`` apply to it as to any model)."""
    if opts.sampler is not None:
        raise OptionError("sampler", f"Scale Space Diffusion models sample with their own "
                          f"posterior chain over the resolution schedule (ancestral), not "
                          f"{opts.sampler!r}: leave sampler unset")
    if opts.eta != 0.0:
        raise OptionError("eta", f"eta is DDIM's stochasticity; a Scale Space Diffusion "
                          f"chain is ancestral and takes none, got eta={opts.eta}")
    if opts.resolution not in (None, native):
        raise OptionError("resolution", f"Scale Space Diffusion models sample at their native "
                          f"resolution {native} only: the resolution schedule ends there and "
                          "the Flexi-UNet has no level above it, so neither upsample guidance "
                          "nor the cascade applies")
    if opts.schedule != "model":
        raise OptionError("schedule", "Scale Space Diffusion models sample on their own "
                          "process only: the posterior steps are derived for DDPM's alpha_bar "
                          "over the resolution schedule, so per-image spectral schedules do "
                          "not apply")
    if opts.steps < 2:
        raise OptionError("steps", f"Scale Space Diffusion models need steps >= 2 (the chain "
                          f"visits the first and the last state of its schedule), got "
                          f"{opts.steps}")
