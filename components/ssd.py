"""Scale Space Diffusion (SCIENCE.md section 6): the resolution schedule, the process with
``M_t = (a_t / a_{t-1}) R_t``, its training objective and its sampler.

Indexing follows DDPM code: state ``k = 0..T-1`` has ``a_k = sqrt(alpha_bar[k])``,
``sigma_k = sqrt(1 - alpha_bar[k])`` and resolution ``r(k)``; ``k = -1`` is the clean image
(a = 1, sigma = 0, full resolution). The marginal is

    x_k = a_k R_{0:k} x0 + sigma_k eps,   R_{0:k}: anti-aliased bilinear 2x resizes base -> r(k),

and the transition from state j to k > j is ``M = (a_k / a_j) R_{j->k}`` (identity resize where
the resolution does not change), so the posterior of ``components.degradation`` applies to
both the 1000-step chain and a respaced one. ``R`` is separable, ``R x = A x A^T`` with the
1-D matrix ``A`` of ``components.scale.resize`` (:func:`half_resize_matrix`); hence
``R^T R = (A^T A) kron (A^T A)`` and the resolution-increasing posterior noise
``sigma_j^2 (I - rho c^2 R^T R)`` is drawn exactly in the eigenbasis of ``A^T A``
(no Lanczos iterations needed).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from components.degradation import LinearOp, posterior_mean
from components.devices import cached_on, to_device
from components.diffusion import LAMBDA_SCALE, Cond, Denoiser, NetworkDenoiser
from components.scale import resize
from components.schedules import ddpm_linear

RESOLUTION_SCHEDULES: tuple[str, ...] = ("convex", "equal")
Generators = list[torch.Generator] | torch.Generator | None


def level_resolutions(base_resolution: int, levels: int) -> list[int]:
    """Ascending resolutions of the levels: ``[base / 2^(levels-1), ..., base / 2, base]``."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if base_resolution < 1 or base_resolution % 2 ** (levels - 1):
        raise ValueError(f"base_resolution {base_resolution} must be divisible by "
                         f"2**(levels-1) = {2 ** (levels - 1)}")
    return [base_resolution // 2 ** (levels - 1 - i) for i in range(levels)]


def resolution_schedule(base_resolution: int, levels: int, T: int = 1000,
                        kind: str = "convex", gamma: float = 0.5) -> list[int]:
    """r(k) for k = 0..T-1 with ``tau = k / (T - 1)``.

    convex ("convex decay"): ``x = 1 - (1 - tau)^gamma``; equal: ``x = tau``;
    ``r = levels[n - 1 - min(floor(x n), n - 1)]`` with ``levels`` ascending.
    """
    if T < 2:
        raise ValueError(f"T must be >= 2, got {T}")
    if kind not in RESOLUTION_SCHEDULES:
        raise ValueError(f"unknown resolution_schedule {kind!r}: expected {RESOLUTION_SCHEDULES}")
    if kind == "convex" and not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    res, n = level_resolutions(base_resolution, levels), levels
    out = []
    for k in range(T):
        tau = k / (T - 1)
        x = 1.0 - (1.0 - tau) ** gamma if kind == "convex" else tau
        out.append(res[n - 1 - min(math.floor(x * n), n - 1)])
    return out


def half_resize_matrix(n: int) -> Tensor:
    """1-D matrix A (n/2, n), float64, of ``components.scale.resize`` from n to n/2 px.

    ``R(e_i 1^T) = (A e_i)(A 1)^T`` and the rows of A sum to 1, so column i of A is the
    first column of R applied to the image with row i set to 1; separability
    (``R x = A x A^T``) is then checked on a random image.
    """
    if n < 2 or n % 2:
        raise ValueError(f"half_resize_matrix: n must be even and >= 2, got {n}")
    rows = torch.eye(n, dtype=torch.float64)[:, :, None].expand(n, n, n)  # image i: row i = 1
    A = resize(rows.contiguous(), n // 2)[:, :, 0].T.contiguous()  # (n/2, n)
    x = torch.randn(1, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if not torch.allclose(A @ x @ A.T, resize(x, n // 2), atol=1e-9):
        raise RuntimeError("components.scale.resize is not separable: SSD needs R x = A x A^T")
    return A


@dataclass
class SSDProcess:
    """The SSD forward process on DDPM's linear-beta alpha_bar (its settings are saved in
    ``GenerativeModel.extra``: see :meth:`settings`)."""

    base_resolution: int
    levels: int = 4
    T: int = 1000
    resolution_schedule: str = "convex"
    gamma: float = 0.5
    beta_start: float = 1e-4
    beta_end: float = 0.02
    alpha_bar: Tensor = field(init=False, repr=False)
    resolutions: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.alpha_bar = ddpm_linear(self.T, self.beta_start, self.beta_end).alpha_bar
        self._on: dict[str, Tensor] = {}  # alpha_bar, one copy per device
        self.resolutions = resolution_schedule(self.base_resolution, self.levels, self.T,
                                               self.resolution_schedule, self.gamma)
        self._mats: dict[tuple, Tensor] = {}
        self._lambdas = self.lambda_(torch.arange(self.T)).double()  # for state_of
        self._eig: dict[tuple, tuple[Tensor, Tensor]] = {}
        # segments of equal (r(k-1), r(k)): training draws all of a batch from one segment
        pairs = [(self.res(k - 1), self.res(k)) for k in range(self.T)]
        self.segments: list[tuple[int, int]] = []  # inclusive (first k, last k)
        for k in range(self.T):
            if k == 0 or pairs[k] != pairs[k - 1]:
                self.segments.append((k, k))
            else:
                self.segments[-1] = (self.segments[-1][0], k)
        self.segment_of = torch.tensor(
            [i for i, (s, e) in enumerate(self.segments) for _ in range(s, e + 1)])

    def settings(self) -> dict[str, Any]:
        """The constructor settings other than base_resolution (JSON-able, for ``extra``)."""
        d = asdict(self)
        return {k: d[k] for k in ("levels", "T", "resolution_schedule", "gamma",
                                  "beta_start", "beta_end")}

    # ----------------------------------------------------------------- coefficients
    def res(self, k: int) -> int:
        return self.base_resolution if k < 0 else self.resolutions[k]

    def a(self, k: int) -> float:
        return 1.0 if k < 0 else float(self.alpha_bar[k].sqrt())

    def sigma(self, k: int) -> float:
        return 0.0 if k < 0 else float((1 - self.alpha_bar[k]).sqrt())

    def lambda_(self, k: Tensor) -> Tensor:
        """log SNR of states k (long tensor, k >= 0), float32."""
        ab = cached_on(self.alpha_bar, k.device, self._on)[k]
        return (ab.log() - (-ab).log1p()).float()

    def state_of(self, lam: Tensor | float) -> int:
        """The state k whose log SNR is nearest ``lam`` (a scalar, or the first of a batch
        that shares one): what a denoiser given only lambda needs to know where it is."""
        value = float(torch.as_tensor(lam).flatten()[0])
        return int((self._lambdas - value).abs().argmin())  # falls strictly with k

    # ----------------------------------------------------------------- resize operators
    def matrix(self, n_in: int, n_out: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> Tensor:
        """The 1-D matrix (n_out, n_in) of the composite of anti-aliased 2x resizes."""
        key = (n_in, n_out, str(device), dtype)
        if key not in self._mats:
            m = n_in // n_out
            if n_out > n_in or n_in % n_out or m & (m - 1):
                raise ValueError(f"SSD resizes go down by powers of 2: {n_in} -> {n_out}")
            A, n = torch.eye(n_in, dtype=torch.float64), n_in
            while n > n_out:
                A, n = half_resize_matrix(n) @ A, n // 2
            self._mats[key] = A.to(device=device, dtype=dtype)
        return self._mats[key]

    def resize_op(self, n_in: int, n_out: int) -> LinearOp:
        """``R`` from n_in to n_out px: ``x -> A x A^T`` on (..., n_in, n_in), transpose back
        (A in the input's dtype and device)."""
        if n_in == n_out:
            return LinearOp(lambda x: x, lambda y: y)

        def apply(x: Tensor) -> Tensor:
            A = self.matrix(n_in, n_out, x.device, x.dtype)
            return A @ x @ A.T  # (..., n_out, n_out)

        def transpose(y: Tensor) -> Tensor:
            A = self.matrix(n_in, n_out, y.device, y.dtype)
            return A.T @ y @ A  # (..., n_in, n_in)

        return LinearOp(apply, transpose)

    def down(self, x: Tensor, n_out: int) -> Tensor:
        """``R_{base -> n_out} x`` for images (..., H, H)."""
        return self.resize_op(x.shape[-1], n_out).apply(x)

    def transition(self, j: int, k: int) -> LinearOp:
        """``M = (a_k / a_j) R_{r(j) -> r(k)}`` from state j to state k > j."""
        c, R = self.a(k) / self.a(j), self.resize_op(self.res(j), self.res(k))
        return LinearOp(lambda x: c * R.apply(x), lambda y: c * R.transpose(y))

    # ----------------------------------------------------------------- forward process
    def q_sample(self, x0: Tensor, k: Tensor, eps: Tensor,
                 resolution: int | None = None) -> Tensor:
        """``x_k = a_k R_{0:k} x0 + sigma_k eps``; k (B,) long, all at one resolution.

        ``resolution``: that resolution, known to a caller that drew k on the host; without
        it, k's values are read to find it (a host sync where k is on a GPU)."""
        if resolution is None:
            r = {self.resolutions[int(i)] for i in k.unique()}
            if len(r) != 1:
                raise ValueError(f"q_sample: the steps of a batch must share one resolution, "
                                 f"got {r}")
            resolution = r.pop()
        ab = cached_on(self.alpha_bar, x0.device, self._on)[k].to(x0.dtype)
        ab = ab[:, None, None, None]  # (B, 1, 1, 1)
        return ab.sqrt() * self.down(x0, resolution) + (1 - ab).sqrt() * eps

    # ----------------------------------------------------------------- posterior
    def posterior_noise(self, z: Tensor, j: int, k: int) -> Tensor:
        """Noise of covariance ``Sigma = sigma_j^2 (I - rho c^2 R^T R)`` from z ~ N(0, I) at
        r(j), ``rho = sigma_j^2 / sigma_k^2``, ``c = a_k / a_j``, exactly:
        ``sigma_j U (sqrt(1 - rho c^2 e e^T) * z) U^T`` with ``A^T A = U diag(e) U^T``."""
        s_j, s_k = self.sigma(j), self.sigma(k)
        kappa = (s_j / s_k) ** 2 * (self.a(k) / self.a(j)) ** 2  # rho c^2
        n_big, n_small = self.res(j), self.res(k)
        if n_big == n_small:  # DDPM: Sigma = sigma_j^2 (1 - rho c^2) I
            return s_j * math.sqrt(1.0 - kappa) * z
        key = (n_big, n_small, str(z.device))
        if key not in self._eig:
            A = self.matrix(n_big, n_small, "cpu", torch.float64)
            e, U = torch.linalg.eigh(A.T @ A)  # (n_big,), (n_big, n_big)
            self._eig[key] = (e.clamp_min(0).to(z.device), U.to(z.device))
        e, U = self._eig[key]
        scale = (1.0 - kappa * e[:, None] * e[None, :]).clamp_min(0).sqrt()  # (n, n)
        U = U.to(z.dtype)
        return s_j * (U @ (scale.to(z.dtype) * (U.T @ z @ U)) @ U.T)  # symmetric Sigma^1/2 z

    def posterior_step(self, x_k: Tensor, x0_hat: Tensor, j: int, k: int, z: Tensor | None
                       ) -> Tensor:
        """One reverse step: a draw of q(x_j | x_k, x0 = x0_hat) for j < k (x0_hat at r(j)).

        j = -1 returns x0_hat. z: standard normals at r(j) (None: the posterior mean).
        """
        if j < 0:
            return x0_hat
        op = self.transition(j, k)
        mean = posterior_mean(x_k, self.a(j) * x0_hat, op, self.sigma(j), self.sigma(k))
        return mean if z is None else mean + self.posterior_noise(z, j, k)


def respaced_steps(T: int, steps: int | None) -> list[int]:
    """Increasing state indices to visit: all T, or ``steps`` evenly spaced incl. 0 and T-1."""
    if steps is None or steps >= T:
        return list(range(T))
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    return sorted({round(i * (T - 1) / (steps - 1)) for i in range(steps)})


def _standard_normal(shape: tuple[int, ...], generators: Generators, device: torch.device
                     ) -> Tensor:
    """(B, *shape[1:]) normals: image i from generators[i] (CPU, batch-independent), or the
    whole batch from one generator on its device, or from the global RNG."""
    if isinstance(generators, list):
        if len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g) for g in generators]).to(device)
    return torch.randn(shape, generator=generators, device=device)


def call_net(net: nn.Module, x: Tensor, lam: Tensor, labels: Tensor | None,
             out_resolution: int, flexible: bool) -> Tensor:
    """``net(x, c_noise, labels[, out_resolution])`` with ``c_noise = lambda / 15``."""
    c_noise = (lam / LAMBDA_SCALE).reshape(-1, 1).to(x.device, torch.float32)
    if flexible:
        return net(x, c_noise, labels, out_resolution=out_resolution)
    if out_resolution != x.shape[-1]:
        raise ValueError("a network without out_resolution cannot change resolution: use a "
                         "Flexi-UNet (or levels=1)")
    return net(x, c_noise, labels)


@torch.no_grad()
def ssd_chain(denoiser: Denoiser, process: SSDProcess, batch_size: int, generators: Generators,
              cond: Cond | None = None, steps: int | None = None, channels: int = 3,
              device: torch.device | str = "cpu", clip: bool = True) -> Tensor:
    """Sample (B, C, base, base) from N(0, I) at the lowest resolution with an x0-denoiser.

    Every reverse step j <- k (k = T-1 .. 0, or a respaced subset) asks the denoiser for
    ``x0_hat = D(x_k, lambda_k, cond with out_resolution = r(j))`` (clipped to [-1, 1] when
    ``clip``) and draws x_j from the posterior: the DDPM posterior at equal resolutions, the
    exact resize posterior where r grows. ``denoiser`` may be any wrapper of the network's
    denoiser (classifier-free guidance, time-aware conditioning) that forwards ``cond``.
    """
    if denoiser.prediction != "x0":
        raise ValueError(f"the SSD chain needs an x0-denoiser, got {denoiser.prediction!r}")
    device = torch.device(device)
    cond = cond if cond is not None else Cond()
    ks = respaced_steps(process.T, steps)
    r = process.res(ks[-1])
    x = _standard_normal((batch_size, channels, r, r), generators, device)
    # every step's log-SNR on the device once: no host-to-device copy (a sync) per step
    lams = process.lambda_(torch.tensor(ks, dtype=torch.long)).to(device)
    for i in reversed(range(len(ks))):
        k, j = ks[i], ks[i - 1] if i > 0 else -1
        lam = lams[i].expand(batch_size)
        x0_hat = denoiser(x, lam, replace(cond, out_resolution=process.res(j))).float()
        if clip:
            x0_hat = x0_hat.clamp(-1, 1)
        z = None
        if j >= 0:
            rj = process.res(j)
            z = _standard_normal((batch_size, channels, rj, rj), generators, device)
        with torch.autocast(device.type, enabled=False):  # posterior maths in float32
            x = process.posterior_step(x.float(), x0_hat, j, k, z)
    return x


def ssd_sample(net: nn.Module, process: SSDProcess, batch_size: int, generators: Generators,
               class_labels: Tensor | None = None, steps: int | None = None,
               channels: int = 3, device: torch.device | str = "cpu", clip: bool = True
               ) -> Tensor:
    """:func:`ssd_chain` of a bare x0-network ``net(x, c_noise, labels[, out_resolution])``
    conditioned on ``class_labels`` (B,) or None, without guidance."""
    labels = None if class_labels is None else class_labels.to(device)
    return ssd_chain(NetworkDenoiser(net, "x0"), process, batch_size, generators,
                     Cond(labels), steps, channels, device, clip)


SSD_EXTRA_KEYS = ("levels", "T", "resolution_schedule", "gamma", "beta_start", "beta_end")


def process_from_extra(resolution: int, extra: dict[str, Any]) -> SSDProcess:
    """The SSDProcess of a saved model: ``extra`` holds :meth:`SSDProcess.settings`."""
    return SSDProcess(resolution, **{k: extra[k] for k in SSD_EXTRA_KEYS if k in extra})


@dataclass
class SSDObjective:
    """SSD training loss ``objective(net, batch) -> (loss, logs)`` (CONVENTIONS.md).

    Batch time sampling: one k0 ~ U{0..T-1} picks the segment of steps that share the
    resolution pair (r(k-1), r(k)); each image draws its own k uniformly from that segment
    (so every k is uniform marginally). Then, on x0-prediction at r(k-1):

        x_k = a_k R_{0:k} x0 + sigma_k eps,   target = R_{0:k-1} x0,
        loss = mean_b min(SNR_k, gamma) * mean_chw (net(x_k, out_resolution = r(k-1)) - target)^2
    """

    process: SSDProcess
    min_snr_gamma: float = 5.0
    label_dropout: float = 0.0
    name: str = "ssd"
    _only: int | None = field(default=None, init=False, repr=False)  # see flop_cases

    def __post_init__(self) -> None:
        if not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")

    @classmethod
    def from_settings(cls, resolution: int, settings: dict[str, Any],
                      min_snr_gamma: float = 5.0, label_dropout: float = 0.0) -> SSDObjective:
        """From a base resolution and SSD settings (``flexi_unet.ssd_settings(preset)`` or a
        saved ``GenerativeModel.extra``)."""
        unknown = sorted(set(settings) - set(SSD_EXTRA_KEYS))
        if unknown:
            raise ValueError(f"unknown SSD settings {unknown}: expected {SSD_EXTRA_KEYS}")
        return cls(process_from_extra(resolution, settings), min_snr_gamma, label_dropout)

    def sample_steps(self, n: int) -> Tensor:
        """(n,) long steps from one segment of equal resolution pair (global RNG)."""
        seg = self._only
        if seg is None:
            seg = int(self.process.segment_of[int(torch.randint(self.process.T, ()))])
        first, last = self.process.segments[seg]
        return torch.randint(first, last + 1, (n,))

    def flop_cases(self) -> list[tuple[float, contextlib.AbstractContextManager[None]]]:
        """A step's cost depends on the resolution pair its batch drew: each segment's
        probability with a context in which the objective draws only from that segment, so
        that the training loop counts the expected FLOPs per image."""
        T = self.process.T
        return [((last - first + 1) / T, self._restricted(i))
                for i, (first, last) in enumerate(self.process.segments)]

    @contextlib.contextmanager
    def _restricted(self, segment: int) -> Iterator[None]:
        self._only = segment
        try:
            yield
        finally:
            self._only = None

    def __call__(self, net: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        x0 = batch["images"]  # (B, C, base, base) in [-1, 1]
        if x0.shape[-1] != self.process.base_resolution or x0.shape[-2] != x0.shape[-1]:
            raise ValueError(f"SSD images must be square at {self.process.base_resolution} px, "
                             f"got {tuple(x0.shape[-2:])}")
        k = self.sample_steps(x0.shape[0])  # (B,) long, CPU
        r_in, r_out = self.process.res(int(k[0])), self.process.res(int(k[0]) - 1)
        k_dev = to_device(k, x0.device)  # queued: the host knows k and the pair already
        x0f = x0.float()
        eps = torch.randn(x0.shape[0], x0.shape[1], r_in, r_in, device=x0.device)
        with torch.autocast(x0.device.type, enabled=False):  # resizes in float32
            x_k = self.process.q_sample(x0f, k_dev, eps, r_in).to(x0.dtype)  # (B,C,r_in,r_in)
            target = self.process.down(x0f, r_out)  # (B, C, r_out, r_out)
        labels = batch.get("labels")
        if labels is not None and self.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, -1), labels)
        lam = self.process.lambda_(k_dev)  # (B,)
        out = call_net(net, x_k, lam, labels, r_out, self.process.levels > 1).float()
        err = (out - target).square().mean(dim=(1, 2, 3))  # (B,)
        w = lam.exp().clamp(max=self.min_snr_gamma)  # min(SNR, gamma)
        loss = (w * err).mean()
        return loss, {"loss": loss.detach(), "mse": err.mean().detach(),
                      "resolution_in": float(r_in), "resolution_out": float(r_out)}
