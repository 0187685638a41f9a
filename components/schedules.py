"""Noise schedules as pure functions of continuous time (SCIENCE.md section 1 and 4).

Convention: ``t`` in [0, 1], ``t = 0`` clean, ``t = 1`` pure noise. A schedule is
``lambda(t) = log SNR(t)``, strictly decreasing, with an exact inverse ``t(lambda)``.
Variance preserving: ``alpha^2 = sigmoid(lambda)``, ``sigma^2 = sigmoid(-lambda)``.

Every schedule is a small frozen dataclass with two methods, ``lambda_(t)`` and
``t_of_lambda(lam)``; both take and return tensors of any shape (float64 inside for the
discrete ones, so that the inverse is exact to 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from components.devices import cached_on

LOG_2 = math.log(2.0)


@runtime_checkable
class Schedule(Protocol):
    """A strictly decreasing log-SNR schedule ``lambda(t)`` on t in [0, 1]."""

    def lambda_(self, t: Tensor) -> Tensor: ...

    def t_of_lambda(self, lam: Tensor) -> Tensor: ...


def _as_tensor(t: Tensor | float) -> Tensor:
    return t if isinstance(t, Tensor) else torch.tensor(float(t), dtype=torch.float64)


def alpha_sigma(lam: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, sigma) of a variance-preserving process at log-SNR ``lam``."""
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def lambda_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """log SNR = log(alpha_bar / (1 - alpha_bar))."""
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


# --------------------------------------------------------------------------- cosine family


@dataclass(frozen=True)
class CosineSchedule:
    """Simple Diffusion / SiD2 cosine schedule in lambda, optionally shifted.

    ``lambda(t) = -2 log tan(t_min + t (t_max - t_min)) + shift``. With
    ``shift = 2 log(d_ref / d)`` this is the *shifted* cosine schedule of Simple Diffusion
    (``shifted(d, d_ref)``). ``t_min``/``t_max`` clip lambda to [lambda_min, lambda_max].
    """

    lambda_min: float = -15.0
    lambda_max: float = 15.0
    shift: float = 0.0

    def __post_init__(self) -> None:
        if not self.lambda_min < self.lambda_max:
            raise ValueError(
                f"CosineSchedule: lambda_min ({self.lambda_min}) must be < lambda_max "
                f"({self.lambda_max})"
            )

    @property
    def t_min(self) -> float:  # arctan(exp(-lambda_max / 2)): where lambda = lambda_max
        return math.atan(math.exp(-0.5 * self.lambda_max))

    @property
    def t_max(self) -> float:
        return math.atan(math.exp(-0.5 * self.lambda_min))

    @classmethod
    def shifted(cls, d: int, d_ref: int = 64, **kw: float) -> CosineSchedule:
        """The SiD2 shifted cosine: shift by ``2 log(d_ref / d)`` (d = image side)."""
        if d <= 0 or d_ref <= 0:
            raise ValueError(f"shifted cosine: sizes must be positive, got d={d}, d_ref={d_ref}")
        return cls(shift=2.0 * math.log(d_ref / d), **kw)

    def lambda_(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        u = self.t_min + t * (self.t_max - self.t_min)
        return -2.0 * torch.log(torch.tan(u)) + self.shift

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        lam = _as_tensor(lam)
        u = torch.atan(torch.exp(-0.5 * (lam - self.shift)))
        return (u - self.t_min) / (self.t_max - self.t_min)


@dataclass(frozen=True)
class InterpolatedCosineSchedule:
    """Simple Diffusion's interpolated schedule: from shift ``2 log(d_ref_hi/d)`` at t = 0
    to shift ``2 log(d_ref_lo/d)`` at t = 1, linearly in t (detail at low noise from the
    high-resolution shift, layout at high noise from the low one).

    ``lambda(t) = (1 - t) lambda_cos(t; shift_lo_t) + t lambda_cos(t; shift_hi_t)`` as in
    Hoogeboom et al. 2023; the inverse is numerical (bisection to 1e-7 in t).
    """

    shift_start: float = 0.0  # shift used near t = 0
    shift_end: float = 0.0  # shift used near t = 1
    lambda_min: float = -15.0
    lambda_max: float = 15.0

    def lambda_(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        base = CosineSchedule(self.lambda_min, self.lambda_max).lambda_(t)
        return base + (1.0 - t) * self.shift_start + t * self.shift_end

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        return bisect_inverse(self.lambda_, _as_tensor(lam))


def bisect_inverse(fn, lam: Tensor, iters: int = 60) -> Tensor:
    """Invert a strictly decreasing ``fn`` on [0, 1] by bisection (vectorised)."""
    lo = torch.zeros_like(lam, dtype=torch.float64)
    hi = torch.ones_like(lam, dtype=torch.float64)
    target = lam.to(torch.float64)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = fn(mid) > target  # lambda still too large: move right
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return (0.5 * (lo + hi)).to(lam.dtype if lam.is_floating_point() else torch.float64)


# --------------------------------------------------------------------------- discrete family


@dataclass(frozen=True)
class DiscreteSchedule:
    """A discrete beta schedule of ``T`` steps seen as a continuous schedule.

    ``alpha_bar[n] = prod_{i<=n} (1 - beta_i)`` sits at ``t = (n + 1) / T`` for
    n = 0..T-1 and ``alpha_bar = 1`` (lambda = +inf) at t = 0 is replaced by linear
    extrapolation in lambda, so that lambda(t) is finite and strictly decreasing on [0, 1].
    Between the knots lambda is interpolated linearly; ``t_of_lambda`` inverts exactly.
    Step index ``n`` (0-based as in DDPM code, n = 0 the least noisy) is at ``t = (n+1)/T``.
    """

    betas: tuple[float, ...]
    name: str = "discrete"
    _lam: Tensor = field(init=False, repr=False, compare=False)
    _on: dict[str, Tensor] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        b = torch.tensor(self.betas, dtype=torch.float64)
        if b.ndim != 1 or len(b) < 2 or not bool(((b > 0) & (b < 1)).all()):
            raise ValueError(f"{self.name}: betas must be a 1-D sequence in (0, 1), len >= 2")
        lam_knots = lambda_from_alpha_bar(torch.cumprod(1 - b, 0))
        if not bool((lam_knots[1:] < lam_knots[:-1]).all()):
            raise ValueError(f"{self.name}: log-SNR must be strictly decreasing")
        lam0 = 2 * lam_knots[0] - lam_knots[1]  # extrapolated t = 0 knot
        object.__setattr__(self, "_lam", torch.cat([lam0[None], lam_knots]))

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def alpha_bar(self) -> Tensor:
        """alpha_bar[n] for step index n = 0..T-1 (float64)."""
        return torch.sigmoid(self._lam[1:])

    def lambda_(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        x = t.to(torch.float64).clamp(0, 1) * self.T
        i = x.floor().clamp(max=self.T - 1)
        w = x - i
        lam = cached_on(self._lam, t.device, self._on)  # one copy per device, not per call
        i = i.long()
        out = lam[i] * (1 - w) + lam[i + 1] * w
        return out.to(t.dtype) if t.is_floating_point() else out

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        lam = _as_tensor(lam)
        knots = cached_on(self._lam, lam.device, self._on)
        target = lam.to(torch.float64)
        # knots are decreasing: search on the negated (increasing) sequence
        j = torch.searchsorted(-knots, -target).clamp(1, self.T)  # knots[j-1] >= target > knots[j]
        l0, l1 = knots[j - 1], knots[j]
        w = (l0 - target) / (l0 - l1)
        out = (j - 1 + w) / self.T
        return out.to(lam.dtype) if lam.is_floating_point() else out

    def t_of_index(self, n: Tensor | int) -> Tensor:
        """Continuous time of step index n (0-based)."""
        return (torch.as_tensor(n, dtype=torch.float64) + 1) / self.T

    def index_of_t(self, t: Tensor) -> Tensor:
        """Nearest step index of continuous time t."""
        n = torch.as_tensor(t, dtype=torch.float64) * self.T - 1
        return n.round().clamp(0, self.T - 1).long()

    def lambda_of_index(self, n: Tensor | int) -> Tensor:
        return self._lam[torch.as_tensor(n).long() + 1]


def ddpm_linear(
    T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> DiscreteSchedule:
    """DDPM's linear beta schedule (Ho et al. 2020)."""
    _check_betas(beta_start, beta_end, T)
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return DiscreteSchedule(tuple(betas.tolist()), name="ddpm_linear")


def squaredcos_cap_v2(T: int = 1000, s: float = 0.008, max_beta: float = 0.999
                      ) -> DiscreteSchedule:
    """The improved-DDPM cosine as a discrete schedule (Nichol & Dhariwal 2021), as diffusers
    and guided-diffusion build it (``squaredcos_cap_v2``): ``f(t) = cos^2((t + s) / (1 + s)
    pi / 2)``, ``beta_i = min(1 - f((i + 1) / T) / f(i / T), max_beta)``. Not prism's
    ``cosine`` (a continuous log-SNR without the offset or the cap): 2.2 apart in log-SNR
    near t = 0. Use it to sample a model trained with that schedule."""
    if T < 2 or s < 0 or not 0 < max_beta < 1:
        raise ValueError(f"squaredcos_cap_v2: need T >= 2, s >= 0, 0 < max_beta < 1; got "
                         f"{T=}, {s=}, {max_beta=}")
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return DiscreteSchedule(tuple(betas.tolist()), name="squaredcos_cap_v2")


def sd_scaled_linear(
    T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> DiscreteSchedule:
    """Stable Diffusion's scaled-linear schedule: betas linear in sqrt."""
    _check_betas(beta_start, beta_end, T)
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    return DiscreteSchedule(tuple(betas.tolist()), name="sd_scaled_linear")


def _check_betas(beta_start: float, beta_end: float, T: int) -> None:
    if not (0 < beta_start < beta_end < 1):
        raise ValueError(
            f"betas must satisfy 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}"
        )
    if T < 2:
        raise ValueError(f"T must be >= 2, got {T}")


@dataclass(frozen=True)
class EDMSchedule:
    """The EDM rho-warped schedule as a continuous schedule: ``sigma(t)`` from
    ``sigma_min`` at t = 0 to ``sigma_max`` at t = 1, ``lambda = -2 log sigma``."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self) -> None:
        if not (0 < self.sigma_min < self.sigma_max) or self.rho <= 0:
            raise ValueError("EDMSchedule: need 0 < sigma_min < sigma_max and rho > 0")

    def lambda_(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return -2.0 * self.rho * torch.log(lo + t * (hi - lo))

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        lam = _as_tensor(lam)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (torch.exp(-lam / (2.0 * self.rho)) - lo) / (hi - lo)


@dataclass(frozen=True)
class LinearLambdaSchedule:
    """lambda linear in t between ``lambda_max`` (t = 0) and ``lambda_min`` (t = 1).

    Used for per-image spectral schedules once their end points are known.
    """

    lambda_min: float
    lambda_max: float

    def __post_init__(self) -> None:
        if not self.lambda_min < self.lambda_max:
            raise ValueError("LinearLambdaSchedule: lambda_min must be < lambda_max")

    def lambda_(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        return self.lambda_max + t * (self.lambda_min - self.lambda_max)

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        lam = _as_tensor(lam)
        return (lam - self.lambda_max) / (self.lambda_min - self.lambda_max)


# --------------------------------------------------------------------------- loss weights


def sigmoid_weight(lam: Tensor, bias: float = 0.0) -> Tensor:
    """SiD2 / VDM++ sigmoid weighting ``w(lambda) = sigmoid(b - lambda)`` (eps-loss units)."""
    return torch.sigmoid(bias - lam)


def min_snr_weight(lam: Tensor, gamma: float = 5.0, prediction: str = "eps") -> Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023), for the loss on ``prediction``.

    For an eps loss ``min(SNR, gamma) / SNR``; x0 loss ``min(SNR, gamma)``;
    v loss ``min(SNR, gamma) / (SNR + 1)``.
    """
    if gamma <= 0:
        raise ValueError(f"min_snr gamma must be > 0, got {gamma}")
    snr = torch.exp(lam)
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    if prediction == "v":
        return clipped / (snr + 1)
    raise ValueError(f"unknown prediction type {prediction!r}: expected eps, x0 or v")


# --------------------------------------------------------------------------- registry


def sid2_shifted(d: int, d_ref: int = 64, lambda_min: float = -15.0,
                 lambda_max: float = 15.0) -> CosineSchedule:
    """SiD2's shifted cosine for images of side ``d`` against the reference side ``d_ref``."""
    return CosineSchedule.shifted(d, d_ref, lambda_min=lambda_min, lambda_max=lambda_max)


def sid2_interpolated(d: int, d_ref_lo: float = 32, d_ref_hi: float = 256,
                      lambda_min: float = -15.0, lambda_max: float = 15.0
                      ) -> InterpolatedCosineSchedule:
    """Simple Diffusion's interpolated cosine for side ``d``: near t = 1 (layout) the shift of
    the low reference ``d_ref_lo``, near t = 0 (detail) that of the high one ``d_ref_hi``."""
    if d <= 0 or d_ref_lo <= 0 or d_ref_hi <= 0:
        raise ValueError(f"sid2_interpolated: sizes must be positive, got d={d}, "
                         f"d_ref_lo={d_ref_lo}, d_ref_hi={d_ref_hi}")
    return InterpolatedCosineSchedule(
        shift_start=2 * math.log(d_ref_hi / d), shift_end=2 * math.log(d_ref_lo / d),
        lambda_min=lambda_min, lambda_max=lambda_max,
    )


# schedule name -> its factory; the keyword arguments of each are the schedule's parameters
# (``common.schedule_settings`` mirrors them as typed models, checked by a test)
SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "cosine": CosineSchedule,
    "sid2_shifted": sid2_shifted,
    "sid2_interpolated": sid2_interpolated,
    "ddpm_linear": ddpm_linear,
    "sd_scaled_linear": sd_scaled_linear,
    "squaredcos_cap_v2": squaredcos_cap_v2,  # diffusers' improved-DDPM cosine
    "edm": EDMSchedule,
}
# parameters that are counts or sizes: a JSON float (``1000.0``) is read as the integer
_INTEGER_PARAMETERS = {"T", "d", "d_ref"}


def build_schedule(name: str, **kw: float) -> Schedule:
    """The schedule ``name`` of ``SCHEDULES`` with its keyword parameters."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: expected one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](**{k: int(v) if k in _INTEGER_PARAMETERS else v
                              for k, v in kw.items()})
