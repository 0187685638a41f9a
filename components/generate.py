"""Generation from a trained model: the one entry point used by training (sample grids),
evaluation and serving.

``generate`` turns seeds into images. Each image depends only on its own seed: its initial
noise, its fresh sampler noise and (for spectral schedules) its drawn schedule all come from
per-image generators, so an image never depends on the batch it was generated in
(STYLE.md principle 10). Guidance (classifier-free, upsample guidance, time-aware
conditioning) is a wrapper around the denoiser (``components.guidance``); the sampler loop
never changes.

Every model kind samples through the same denoiser (:func:`base_denoiser`) and guidance
(:func:`guided`); what differs is the chain that drives it, looked up in :data:`CHAINS` by
``model.kind``: the sampler over a log-SNR grid (:func:`sample_standard`) or the Scale Space
Diffusion posterior chain over the resolution schedule (:func:`sample_ssd`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from components.diffusion import Cond, NetworkDenoiser
from components.guidance import TimeAwareConditioning, cascaded_upscale, guided_denoiser
from components.model import GenerativeModel
from components.options import DEFAULT_SAMPLER, GenerateOptions, check_options
from components.samplers import get_sampler, lambda_grid
from components.spectral_schedules import ScheduleModel, lambda_bounds, spectral_lambda_grid
from components.ssd import process_from_extra, ssd_chain

# A separate stream for the per-image spectral schedule draw, so it does not shift the noise.
SCHEDULE_STREAM = 0x5EED_5C4E


# --------------------------------------------------------------------------- noise


def per_image_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image (CPU so that an image is the same on every device)."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...],
                  device: torch.device | str) -> Tensor:
    """x_T: image i is N(0, I) of ``shape`` (C, H, W) from generator i -> (N, C, H, W).

    Variance preserving: at lambdas[0] (alpha ~ 0) the state is the unit-variance noise.
    """
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


# --------------------------------------------------------------------------- generate


def generate(
    model: GenerativeModel,
    *,
    seeds: list[int],
    steps: int,
    sampler: str | None = None,
    eta: float = 0.0,
    class_labels: list[int] | None = None,
    cfg_scale: float = 1.0,
    resolution: int | None = None,
    upscale: Literal["ug", "cascade"] = "ug",
    ug_theta: float = 1.3,
    ug_eta: float = 1.0,
    ug_order: Literal["ug_of_cfg", "cfg_of_ug", "cfg_high_only"] = "ug_of_cfg",
    schedule: Literal["model", "spectral"] = "model",
    time_aware: tuple[int, float | str] | None = None,
    clip_denoised: bool = True,
    device: torch.device | str = "cpu",
) -> Tensor:
    """One image per seed -> (N, C, H, W) in [-1, 1], H = W = ``resolution`` (default native).

    resolution = m x native goes through upsample guidance (``upscale="ug"``, SCIENCE.md
    section 3, with ``ug_theta``, ``ug_eta`` and ``ug_order`` relative to classifier-free
    guidance) or cascaded upscaling (``"cascade"``, section 2). ``time_aware`` is
    ``(second_class, switch_t)`` with ``switch_t`` in (0, 1) or ``"auto"`` (chromatogram).
    ``sampler`` None is DDIM for a denoiser; ``kind == "ssd"`` models run the SSD posterior
    chain and refuse a ``sampler`` or ``eta`` (``steps`` >= 2 states of the resolution
    schedule, respaced).
    ``clip_denoised`` clamps every step's x0 estimate to [-1, 1] (as DDPM's sampler does): an
    eps- or v-network's x0 at high noise is its error divided by alpha, and an unclamped one
    derails multistep solvers on young models.
    """
    opts = GenerateOptions(steps=steps, sampler=sampler, eta=eta, cfg_scale=cfg_scale,
                           resolution=resolution, upscale=upscale, ug_theta=ug_theta,
                           ug_eta=ug_eta, ug_order=ug_order, schedule=schedule,
                           time_aware=time_aware, clip_denoised=clip_denoised)
    return generate_with(model, opts, seeds, class_labels, device)


def generate_with(model: GenerativeModel, opts: GenerateOptions, seeds: list[int],
                  class_labels: list[int] | None = None,
                  device: torch.device | str = "cpu") -> Tensor:
    """:func:`generate` with its settings as one :class:`GenerateOptions` (what a service
    or an experiment passes on). Raises ``components.options.OptionError`` naming the field
    a setting the model cannot honour."""
    seeds = [int(s) for s in seeds]
    device = torch.device(device)
    check_options(model, opts, seeds, class_labels)
    if model.kind not in CHAINS:
        raise ValueError(f"unknown model kind {model.kind!r}: expected one of {sorted(CHAINS)}")
    with torch.no_grad():
        x = CHAINS[model.kind](model, opts, seeds, class_labels, device)
    return x.clamp(-1.0, 1.0)


def sampling_grid(model: GenerativeModel, opts: GenerateOptions, seeds: list[int],
                  class_labels: list[int] | None) -> tuple[Tensor, Tensor | None]:
    """The log-SNR grid, (steps + 1,) for the model's schedule or (steps + 1, N) for
    per-image spectral schedules, and the per-image ``lambda_bounds`` (N, 2) or None."""
    if opts.schedule == "model":
        lambdas = lambda_grid(model.schedule, opts.steps)
        if model.n_cond != 3:
            return lambdas, None
        # a network conditioned on (lambda(t), lambda(0), lambda(1)) sampled on the global
        # schedule: every image's end points are that schedule's
        ends = model.schedule.lambda_(torch.tensor([0.0, 1.0], dtype=torch.float64)).float()
        return lambdas, ends.expand(len(seeds), 2).clone()

    dist = ScheduleModel.from_json(model.spectral or {})
    labels = class_labels or [-1] * len(seeds)
    # one draw per image from its own stream: the schedule depends only on the seed
    params = torch.cat([
        dist.sample(1, generator=torch.Generator().manual_seed(int(s) ^ SCHEDULE_STREAM),
                    class_labels=torch.tensor([c]))
        for s, c in zip(seeds, labels, strict=True)])  # (N, 4)
    kind = model.spectral_kind or "mixed"
    return spectral_lambda_grid(params, opts.steps, kind), lambda_bounds(params)


# --------------------------------------------------------------------------- chains


def sample_standard(model: GenerativeModel, opts: GenerateOptions, seeds: list[int],
                    class_labels: list[int] | None, device: torch.device) -> Tensor:
    """Noise -> images at m x native (m from ``opts.resolution``): one sampler run over the
    log-SNR grid (with upsample guidance where m > 1) or the cascade."""
    m = (opts.resolution or model.resolution) // model.resolution
    lambdas, bounds = sampling_grid(model, opts, seeds, class_labels)
    cond = Cond(labels_tensor(class_labels, device), None if bounds is None else bounds.to(device))
    gens = per_image_generators(seeds)
    kw: dict = {"clip_denoised": opts.clip_denoised}
    sampler = opts.sampler or DEFAULT_SAMPLER
    if sampler == "ddim":
        kw["eta"] = opts.eta
    res = model.resolution * (1 if opts.upscale == "cascade" else m)
    x = initial_noise(gens, (model.in_channels, res, res), device)  # x_T, (N, C, res, res)
    den = guided(model, opts, cond, m if opts.upscale == "ug" else 1)
    if m > 1 and opts.upscale == "cascade":
        # native-resolution steps on lambdas + 2 log m, hand-off at the chromatogram's default
        return cascaded_upscale(den, x, lambdas, cond, m=m, sampler=sampler,
                                generators=gens, **kw)
    return get_sampler(sampler)(den, x, lambdas, cond, gens, **kw)


def sample_ssd(model: GenerativeModel, opts: GenerateOptions, seeds: list[int],
               class_labels: list[int] | None, device: torch.device) -> Tensor:
    """Noise at the lowest resolution -> images at native: the Scale Space Diffusion
    posterior chain (``components.ssd.ssd_chain``) over ``opts.steps`` states of the model's
    resolution schedule, each step's x0 from the guided denoiser at that step's output size.

    Classifier-free guidance combines the two x0 predictions (at r(t-1)) before clipping.
    """
    process = process_from_extra(model.resolution, model.extra)
    cond = Cond(labels_tensor(class_labels, device))
    den = guided(model, opts, cond, 1)
    return ssd_chain(den, process, len(seeds), per_image_generators(seeds), cond,
                     steps=opts.steps, channels=model.in_channels, device=device,
                     clip=opts.clip_denoised)


# One signature for every chain: (model, opts, seeds, class_labels, device) -> images.
Chain = Callable[[GenerativeModel, GenerateOptions, list[int], list[int] | None, torch.device],
                 Tensor]
CHAINS: dict[str, Chain] = {"standard": sample_standard, "ssd": sample_ssd}


def auto_switch_level(resolution: int, layout_size: int = 8) -> float:
    """Time-aware ``"auto"``: switch when the dominant level ``k* = -lambda / ln 4`` falls
    below the level of a ``layout_size`` grid, ``log2(resolution / layout_size)`` (ours)."""
    return max(math.log2(resolution / layout_size), 0.0)


def guided(model: GenerativeModel, opts: GenerateOptions, cond: Cond, m: int) -> Any:
    """The model's denoiser with guidance: CFG and UG composed in ``opts.ug_order`` (see
    ``components.guidance.guided_denoiser``), time-aware conditioning outermost."""
    den: Any = base_denoiser(model)
    if m > 1 or opts.cfg_scale != 1.0:
        # w_t = theta H(t - (1 - eta)): active while lambda <= lambda(1 - eta)
        lam_active = (math.inf if opts.ug_eta >= 1.0
                      else float(model.schedule.lambda_(torch.tensor(1.0 - opts.ug_eta))))
        den = guided_denoiser(den, cfg_scale=opts.cfg_scale, ug_theta=opts.ug_theta if m > 1
                              else 0.0, m=max(m, 2), lambda_active_max=lam_active,
                              order=opts.ug_order)
    if opts.time_aware is not None:
        second, switch = opts.time_aware
        assert cond.class_labels is not None  # checked by check_options
        late = Cond(torch.full_like(cond.class_labels, int(second)), cond.lambda_bounds)
        if switch == "auto":
            level = auto_switch_level(model.resolution * m)
            den = TimeAwareConditioning.auto(den, late, level)
        else:
            lam_switch = float(model.schedule.lambda_(torch.tensor(float(switch))))
            den = TimeAwareConditioning(den, late, lam_switch)
    return den


# --------------------------------------------------------------------------- images


def image_grid(images: Tensor, nrow: int | None = None, padding: int = 2,
               pad_value: float = 1.0) -> Tensor:
    """(N, C, H, W) -> (C, rows (H + p) + p, nrow (W + p) + p), row-major, ``nrow`` default
    ceil(sqrt(N)); padding filled with ``pad_value`` (white in [-1, 1])."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch, got "
                         f"{tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = images.new_full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding),
                           pad_value)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float (..., C, H, W) -> uint8 (..., H, W, C) on the CPU."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu()


def labels_tensor(class_labels: list[int] | None, device: torch.device) -> Tensor | None:
    return None if class_labels is None else torch.tensor(class_labels, dtype=torch.long,
                                                          device=device)


def base_denoiser(model: GenerativeModel) -> NetworkDenoiser:
    """The network as a denoiser ``D(x, lam, cond)``, for every model kind (an SSD model's
    Flexi-UNet takes its output size from ``cond.out_resolution``)."""
    return NetworkDenoiser(model.net, model.prediction, model.n_cond)


__all__ = ["Cond", "GenerativeModel", "GenerateOptions", "generate", "generate_with",
           "image_grid", "to_uint8", "initial_noise",
           "per_image_generators", "check_options"]
