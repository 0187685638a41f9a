"""Guidance as denoiser wrappers (STYLE.md principle 1) and cascaded upscaling.

Every wrapper is itself a Denoiser ``D(x, lam, cond)`` with ``.prediction``, so any sampler
runs it unchanged. The time coordinate is the per-image log-SNR ``lam`` (B,):

- :class:`ClassifierFreeGuidance`: ``u + w (c - u)`` with the null class ``-1``.
- :class:`UpsampleGuidance` (SCIENCE.md section 3): a model trained at r generates at m r,
      eps_ug = eps + w U_m[(1/m) eps(D_m[x] / sqrt(P), lambda + 2 log m) - D_m[eps]].
  ``tau(t)`` is the time with log-SNR ``lambda + 2 log m``: since the denoiser takes lambda,
  no schedule is needed. The activity window ``w_t = theta H(t - (1 - eta))`` is stored as a
  lambda threshold: active while ``lam <= lambda_active_max``; :meth:`UpsampleGuidance.from_eta`
  converts (schedule, eta) to it. The low-resolution pass runs only on active images.
- :class:`TimeAwareConditioning`: switch (or blend) the condition at a log-SNR, chosen by
  hand or from the chromatogram (where the dominant level crosses a given level).
- :func:`cascaded_upscale` and :func:`sdedit_upscale`: sampling procedures (SCIENCE.md 2).
- :class:`DiffusersUNetDenoiser`: a diffusers ``UNet2DModel`` as an eps-denoiser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from components.chromatography import lambda_of_level, power
from components.diffusion import Cond, Denoiser, as_prediction, q_sample
from components.samplers import _check_grid, get_sampler, randn_per_image
from components.scale import downsample_mean, resize, upsample_nearest
from components.schedules import DiscreteSchedule, Schedule, alpha_sigma


def _per_image(lam: Tensor, x: Tensor) -> Tensor:
    lam = torch.as_tensor(lam, device=x.device)
    return lam.expand(x.shape[0]) if lam.ndim == 0 else lam


class CountingDenoiser:
    """Counts network evaluations: ``calls``, ``images`` (sum of batch sizes), ``pixels``."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser, self.prediction = denoiser, denoiser.prediction
        self.calls = self.images = self.pixels = 0

    def __call__(self, x: Tensor, lam: Tensor, cond: Cond) -> Tensor:
        self.calls += 1
        self.images += x.shape[0]
        self.pixels += x.shape[0] * x.shape[-2] * x.shape[-1]
        return self.denoiser(x, lam, cond)


class ClassifierFreeGuidance:
    """``D_cfg = D(x | null) + scale (D(x | c) - D(x | null))`` (Ho & Salimans 2022).

    Combined in the inner prediction space (the eps / x0 / v conversions are affine in the
    prediction with weights summing to 1, so the result is the same in every space).
    ``scale = 1`` is plain conditional sampling (one evaluation).
    """

    def __init__(self, denoiser: Denoiser, scale: float, null_label: int = -1) -> None:
        self.denoiser, self.scale, self.null_label = denoiser, float(scale), int(null_label)
        self.prediction = denoiser.prediction

    def __call__(self, x: Tensor, lam: Tensor, cond: Cond) -> Tensor:
        if cond.class_labels is None:
            raise ValueError("classifier-free guidance needs cond.class_labels (got None)")
        if self.scale == 1.0:
            return self.denoiser(x, lam, cond)
        lam = _per_image(lam, x)
        null = torch.full_like(cond.class_labels, self.null_label)
        cond2 = cond.repeat(2).with_labels(torch.cat([cond.class_labels, null]))
        out = self.denoiser(torch.cat([x, x]), torch.cat([lam, lam]), cond2)  # (2B, ...)
        c, u = out.chunk(2)
        return u + self.scale * (c - u)


class UpsampleGuidance:
    """Upsample guidance (Hwang, Park & Jo): an eps-denoiser at m times the trained size.

    denoiser: the trained model (called at both resolutions); ``low_denoiser`` optionally
    replaces it for the low-resolution pass (e.g. without CFG). ``stats`` counts the
    evaluations and pixels of both passes; ``extra_cost`` = low pixels / high pixels.
    """

    prediction = "eps"

    def __init__(self, denoiser: Denoiser, m: int = 2, theta: float = 1.0,
                 lambda_active_max: float = math.inf, low_denoiser: Denoiser | None = None
                 ) -> None:
        if not isinstance(m, int) or m < 2:
            raise ValueError(f"upsample guidance: m must be an int >= 2, got {m!r}")
        self.denoiser, self.low_denoiser = denoiser, low_denoiser or denoiser
        self.m, self.theta, self.lambda_active_max = m, float(theta), float(lambda_active_max)
        self.stats = {"high_evals": 0, "low_evals": 0, "high_pixels": 0, "low_pixels": 0}

    @classmethod
    def from_eta(cls, denoiser: Denoiser, schedule: Schedule, eta: float, m: int = 2,
                 theta: float = 1.0, **kw) -> UpsampleGuidance:
        """``w_t = theta H(t - (1 - eta))``: active for t >= 1 - eta of ``schedule``, i.e.
        ``lam <= lambda(1 - eta)``; eta = 1 is always active."""
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"upsample guidance: eta must be in [0, 1], got {eta}")
        lam_max = math.inf if eta >= 1.0 else float(schedule.lambda_(torch.tensor(1.0 - eta)))
        return cls(denoiser, m=m, theta=theta, lambda_active_max=lam_max, **kw)

    @property
    def extra_cost(self) -> float:
        return self.stats["low_pixels"] / max(self.stats["high_pixels"], 1)

    def weight(self, lam: Tensor) -> Tensor:
        """``w`` per image (B,): theta where active (lam <= lambda_active_max), else 0."""
        return self.theta * (lam <= self.lambda_active_max).to(torch.float64)

    def __call__(self, x: Tensor, lam: Tensor, cond: Cond) -> Tensor:
        m = self.m
        lam = _per_image(lam, x)
        eps = as_prediction(self.denoiser, x, lam, cond, "eps")  # eps(x_t, t)  (B, C, H, W)
        self.stats["high_evals"] += 1
        self.stats["high_pixels"] += x.shape[0] * x.shape[-2] * x.shape[-1]
        w = self.weight(lam)
        idx = (w != 0).nonzero().flatten()
        if len(idx) == 0:
            return eps
        xa, la, ea = x[idx], lam[idx], eps[idx]
        p = power(la.to(torch.float64), m).to(x.dtype).reshape(-1, 1, 1, 1)  # P = a^2 + s^2/m^2
        x_low = downsample_mean(xa, m) / p.sqrt()  # D_m[x_t] / sqrt(P): a state at tau(t)
        lam_low = la + 2.0 * math.log(m)  # log SNR(tau) = log SNR(t) + 2 log m
        eps_low = as_prediction(self.low_denoiser, x_low, lam_low, cond.index(idx), "eps")
        self.stats["low_evals"] += 1
        self.stats["low_pixels"] += x_low.shape[0] * x_low.shape[-2] * x_low.shape[-1]
        # w U_m[(1/m) eps(D x / sqrt P, tau) - D_m[eps]]
        corr = upsample_nearest(eps_low / m - downsample_mean(ea, m), m)
        out = eps.clone()
        out[idx] = ea + w[idx].to(x.dtype).reshape(-1, 1, 1, 1) * corr
        return out


Order = Literal["ug_of_cfg", "cfg_of_ug", "cfg_high_only"]


def guided_denoiser(denoiser: Denoiser, cfg_scale: float | None = None, ug_theta: float = 0.0,
                    m: int = 2, lambda_active_max: float = math.inf,
                    order: Order = "ug_of_cfg") -> Denoiser:
    """Compose CFG and UG in an explicit order.

    ``ug_of_cfg``: UG around the CFG denoiser (both passes guided); ``cfg_of_ug``: CFG of
    two UG predictions. With constant scales both are linear in the four evaluations and
    agree exactly; they differ once a nonlinearity enters (clipping, dynamic scales).
    ``cfg_high_only``: CFG at the target resolution, the low-resolution pass conditional
    without CFG (3 evaluations instead of 4).
    """
    if order not in ("ug_of_cfg", "cfg_of_ug", "cfg_high_only"):
        raise ValueError(f"unknown guidance order {order!r}: expected ug_of_cfg, cfg_of_ug "
                         "or cfg_high_only")
    use_cfg = cfg_scale is not None and cfg_scale != 1.0
    if ug_theta == 0.0:
        return ClassifierFreeGuidance(denoiser, cfg_scale) if use_cfg else denoiser
    ug_kw = {"m": m, "theta": ug_theta, "lambda_active_max": lambda_active_max}
    if not use_cfg:
        return UpsampleGuidance(denoiser, **ug_kw)
    if order == "ug_of_cfg":
        return UpsampleGuidance(ClassifierFreeGuidance(denoiser, cfg_scale), **ug_kw)
    if order == "cfg_of_ug":
        return ClassifierFreeGuidance(UpsampleGuidance(denoiser, **ug_kw), cfg_scale)
    return UpsampleGuidance(ClassifierFreeGuidance(denoiser, cfg_scale), low_denoiser=denoiser,
                            **ug_kw)


class TimeAwareConditioning:
    """Coarse layout from one condition, detail from another (SCIENCE.md section 2).

    The incoming ``cond`` applies while ``lam < lambda_switch`` (high noise: coarse levels
    are being generated); ``cond_late`` applies afterwards. With ``blend_width > 0`` the two
    predictions are mixed with weight ``s = sigmoid((lam - lambda_switch) / blend_width)``
    on the late one. Null labels (-1) of the incoming cond are kept (CFG inside works).
    Use it as the outermost wrapper: ``cond_late`` is per image, (B,) like the batch.
    """

    def __init__(self, denoiser: Denoiser, cond_late: Cond, lambda_switch: float,
                 blend_width: float = 0.0) -> None:
        if blend_width < 0:
            raise ValueError(f"time-aware conditioning: blend_width must be >= 0, "
                             f"got {blend_width}")
        self.denoiser, self.cond_late = denoiser, cond_late
        self.lambda_switch, self.blend_width = float(lambda_switch), float(blend_width)
        self.prediction = denoiser.prediction

    @classmethod
    def auto(cls, denoiser: Denoiser, cond_late: Cond, level: float, **kw
             ) -> TimeAwareConditioning:
        """Switch where the dominant level ``k* = -lambda / ln 4`` crosses ``level``."""
        return cls(denoiser, cond_late, lambda_of_level(level), **kw)

    def _late(self, cond: Cond, batch: int) -> Cond:
        late = self.cond_late
        if late.class_labels is None or cond.class_labels is None:
            raise ValueError("time-aware conditioning needs class labels in cond and cond_late")
        if late.class_labels.shape[0] != batch:
            raise ValueError(f"time-aware conditioning: cond_late has {late.class_labels.shape[0]}"
                             f" labels for a batch of {batch}; use it as the outermost wrapper")
        labels = late.class_labels.to(cond.class_labels.device)
        return cond.with_labels(torch.where(cond.class_labels < 0, cond.class_labels, labels))

    def __call__(self, x: Tensor, lam: Tensor, cond: Cond) -> Tensor:
        lam = _per_image(lam, x)
        late = self._late(cond, x.shape[0])
        if self.blend_width == 0.0:
            use_late = lam >= self.lambda_switch  # (B,)
            labels = torch.where(use_late, late.class_labels, cond.class_labels)
            return self.denoiser(x, lam, cond.with_labels(labels))
        s = torch.sigmoid((lam.to(torch.float64) - self.lambda_switch) / self.blend_width)
        s = s.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - s) * self.denoiser(x, lam, cond) + s * self.denoiser(x, lam, late)


# --------------------------------------------------------------------------- upscaling


def index_at_lambda(lambdas: Tensor, lam_target: float) -> int:
    """First index of a 1-D increasing grid with ``lambdas[i] >= lam_target`` (else last)."""
    lambdas = torch.as_tensor(lambdas, dtype=torch.float64)
    lam0 = lambdas if lambdas.ndim == 1 else lambdas[:, 0]
    hits = (lam0 >= lam_target).nonzero().flatten()
    return int(hits[0]) if len(hits) else len(lam0) - 1


def cascaded_upscale(
    denoiser: Denoiser, x_init_low: Tensor, lambdas: Tensor, cond: Cond | None = None,
    handoff: int | None = None, m: int = 2, sampler: str = "ddim",
    generators: Sequence[torch.Generator] | None = None, **opts,
) -> Tensor:
    """Sample at the low resolution, hand the noisy state over, finish at m times the size.

    ``lambdas`` (N+1,) or (N+1, B) is the grid at the *high* resolution. Steps
    0..handoff run at the low resolution on ``lambdas + 2 log m`` (same SNR of the coarse
    content); at high-resolution log-SNR ``l = lambdas[handoff]``:
        x_high = sqrt(P) U_m[x_low] + sigma_l (eps - U_m D_m eps),  P = alpha_l^2 + sigma_l^2/m^2
    (``D_m x_high = sqrt(P) x_low`` keeps the coarse state; the residual is fresh
    high-frequency noise of the right variance), then the rest of the grid at high res.
    Default hand-off: where the high-res dominant level crosses log2(m) (lambda = -2 log m).
    """
    cond = cond if cond is not None else Cond()
    sample = get_sampler(sampler)
    lams = _check_grid(x_init_low, lambdas)  # (N+1, B)
    if handoff is None:
        handoff = index_at_lambda(lams, -2.0 * math.log(m))
    if not 0 <= handoff < lams.shape[0]:
        raise ValueError(f"cascaded_upscale: handoff index {handoff} out of range "
                         f"0..{lams.shape[0] - 1}")
    x_low = sample(denoiser, x_init_low, lams[: handoff + 1] + 2.0 * math.log(m), cond,
                   generators, denoise_final=False, **opts)
    lam_h = lams[handoff]  # (B,)
    _, sig = alpha_sigma(lam_h)
    p = power(lam_h, m)
    shape4 = (-1, 1, 1, 1)
    high_shape = (*x_low.shape[:-2], x_low.shape[-2] * m, x_low.shape[-1] * m)
    eps = randn_per_image(x_low.new_empty(high_shape), generators)
    resid = eps - upsample_nearest(downsample_mean(eps, m), m)  # eps - U D eps
    x_high = (p.sqrt().to(x_low.dtype).reshape(shape4) * upsample_nearest(x_low, m)
              + sig.to(x_low.dtype).reshape(shape4) * resid)
    return sample(denoiser, x_high, lams[handoff:], cond, generators, **opts)


def sdedit_upscale(
    denoiser: Denoiser, x_low: Tensor, lambdas: Tensor, cond: Cond | None = None, m: int = 2,
    sampler: str = "ddim", generators: Sequence[torch.Generator] | None = None,
    upsample: Literal["bilinear", "nearest"] = "bilinear", **opts,
) -> Tensor:
    """SDEdit-style baseline: upsample a finished low-res sample, re-noise it to
    ``lambdas[0]`` (e.g. ``-2 log m``: where level log2(m) dominates), denoise over ``lambdas``."""
    if upsample == "bilinear":
        x_up = resize(x_low, (x_low.shape[-2] * m, x_low.shape[-1] * m))
    elif upsample == "nearest":
        x_up = upsample_nearest(x_low, m)
    else:
        raise ValueError(f"sdedit_upscale: upsample must be 'bilinear' or 'nearest', "
                         f"got {upsample!r}")
    lams = _check_grid(x_up, lambdas)
    x = q_sample(x_up, lams[0], randn_per_image(x_up, generators))  # alpha x_up + sigma eps
    return get_sampler(sampler)(denoiser, x, lams, cond, generators, **opts)


# --------------------------------------------------------------------------- diffusers


class DiffusersUNetDenoiser:
    """A diffusers ``UNet2DModel`` (trained on a discrete schedule) as a Denoiser.

    lambda -> continuous step index ``n = T t(lambda) - 1`` (0-based, float), the UNet's
    timestep input. diffusers is an optional extra, imported only by ``from_pretrained``.
    Every prism sampler and guidance wrapper takes it; for classifier-free guidance pass
    ``ClassifierFreeGuidance(den, scale, null_label=K)`` with the class index K the model was
    trained with as "no class" (UNet2DModel has no null class of its own).
    """

    def __init__(self, unet, schedule: DiscreteSchedule, prediction: str = "eps") -> None:
        self.unet, self.schedule, self.prediction = unet, schedule, prediction

    @classmethod
    def from_pretrained(cls, path: str, schedule: DiscreteSchedule, prediction: str = "eps",
                        **kw) -> DiffusersUNetDenoiser:
        try:
            # deferred: diffusers, an optional extra (~1.4 s to import), is for this loader only
            from diffusers import UNet2DModel
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise ImportError("DiffusersUNetDenoiser needs the optional 'diffusers' package") from e
        return cls(UNet2DModel.from_pretrained(path, **kw).train(False), schedule, prediction)

    def __call__(self, x: Tensor, lam: Tensor, cond: Cond) -> Tensor:
        lam = _per_image(lam, x).to(torch.float64)
        n_max = self.schedule.T - 1
        step = (self.schedule.t_of_lambda(lam.cpu()) * self.schedule.T - 1).clamp(0, n_max)
        labels = cond.class_labels
        if labels is not None and bool((labels < 0).any()):
            raise ValueError("DiffusersUNetDenoiser: null class (-1) is not supported by "
                             "UNet2DModel's class embedding: give ClassifierFreeGuidance the "
                             "null label the model was trained with (null_label=...)")
        return self.unet(x, step.to(device=x.device, dtype=x.dtype), class_labels=labels).sample
