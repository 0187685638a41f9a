"""Resolution chromatography (SCIENCE.md section 2, Hwang, Park & Jo).

``D_m[x_t] = alpha D_m[x0] + (sigma / m) eps'``: at the coarse resolution the SNR is
``m^2 SNR(t)``, the total power is ``P = alpha^2 + sigma^2 / m^2`` and
``D_m[x_t] / sqrt(P)`` is a valid state at time ``tau`` with ``SNR(tau) = m^2 SNR(t)``,
i.e. at log-SNR ``lambda + 2 log m``.

Level k (m = 2^k) sees the schedule ``lambda(t) + k ln 4`` (schedule-mapping property); its
signal fraction is ``a_k(t) = sigmoid(lambda(t) + k ln 4)`` and its chromatogram (signal
generation rate) ``c_k(t) = -d a_k / dt``. The dominant level is ``k*(t) = -lambda(t) / ln 4``.

*Reconstruction (ours)*: the band-pass view ``p_k = a_k - a_{k-1}`` (``p_0 = a_0``) is the
difference between adjacent cumulative curves: the fraction of the process whose finest
resolved level is k (with the remainder ``1 - a_{L-1}``: nothing resolved yet).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from components.diffusion import Cond, as_prediction, check_image_range, q_sample
from components.scale import band_energies
from components.schedules import DiscreteSchedule, Schedule, lambda_from_alpha_bar

LN4 = math.log(4.0)


def _f64(x: Tensor | float) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _check_m(m: float) -> None:
    if not m >= 1:
        raise ValueError(f"chromatography: scale factor m must be >= 1, got {m}")


def power(lam: Tensor | float, m: float) -> Tensor:
    """``P = alpha^2 + sigma^2 / m^2``: the power of ``D_m[x_t]`` for unit-power data."""
    _check_m(m)
    lam = torch.as_tensor(lam)
    return torch.sigmoid(lam) + torch.sigmoid(-lam) / (m * m)


def lambda_low(lam: Tensor | float, m: float) -> Tensor:
    """Log-SNR of ``D_m[x_t] / sqrt(P)``: ``lambda + 2 log m``."""
    _check_m(m)
    return torch.as_tensor(lam) + 2.0 * math.log(m)


def tau(schedule: Schedule, t: Tensor | float, m: float) -> Tensor:
    """Continuous time map: ``SNR(tau) = m^2 SNR(t)``, i.e.
    ``tau = t(lambda(t) + 2 log m)`` (clipped to [0, 1] where the schedule ends)."""
    t = _f64(t)
    return schedule.t_of_lambda(lambda_low(schedule.lambda_(t), m)).clamp(0.0, 1.0)


def tau_discrete(schedule: DiscreteSchedule, n: Tensor | int, m: float) -> Tensor:
    """Discrete time map of Upsample Guidance's appendix, on 0-based step indices:
    ``tau[n] = argmin_j |log SNR[j] - (log SNR[n] + 2 log m)|`` over j = 0..T-1."""
    _check_m(m)
    log_snr = lambda_from_alpha_bar(schedule.alpha_bar)  # (T,)
    n = torch.as_tensor(n, dtype=torch.long)
    if bool(((n < 0) | (n >= schedule.T)).any()):
        raise ValueError(f"tau_discrete: step index out of range 0..{schedule.T - 1}: {n}")
    target = log_snr[n] + 2.0 * math.log(m)  # (...)
    return (target[..., None] - log_snr).abs().argmin(dim=-1)


def signal_fraction(lam: Tensor | float, k: int | Tensor) -> Tensor:
    """``a_k = sigmoid(lambda + k ln 4)``: signal fraction of the level-k view (m = 2^k)."""
    return torch.sigmoid(torch.as_tensor(lam) + torch.as_tensor(k) * LN4)


def dominant_level(lam: Tensor | float) -> Tensor:
    """Continuous dominant level ``k* = -lambda / ln 4`` (where a_k = 1/2), clipped at 0."""
    return (-torch.as_tensor(lam) / LN4).clamp(min=0.0)


def lambda_of_level(level: float) -> float:
    """The log-SNR at which level ``level`` is dominant (a_level = 1/2): ``-level ln 4``."""
    return -float(level) * LN4


ChromKind = Literal["cumulative", "bandpass"]


def chromatogram(
    schedule: Schedule, levels: int = 4, n_t: int = 501, kind: ChromKind = "cumulative"
) -> dict[str, Tensor]:
    """Predicted chromatogram of ``schedule`` on a uniform t grid.

    Returns float64 tensors: ``t`` (n_t,), ``lambda`` (n_t,), ``a`` (levels, n_t) the
    cumulative signal fractions (or the band-pass ``p_k`` when kind="bandpass"), ``c``
    (levels, n_t) the rates ``-d a/dt`` (same kind), and ``dominant`` (n_t,) = k*(t).
    """
    if levels < 1 or n_t < 3:
        raise ValueError(f"chromatogram: need levels >= 1 and n_t >= 3, got {levels}, {n_t}")
    if kind not in ("cumulative", "bandpass"):
        raise ValueError(f"chromatogram kind must be 'cumulative' or 'bandpass', got {kind!r}")
    t = torch.linspace(0.0, 1.0, n_t, dtype=torch.float64).requires_grad_(True)
    with torch.enable_grad():
        lam = schedule.lambda_(t)
        (dlam_dt,) = torch.autograd.grad(lam.sum(), t)
    t, lam = t.detach(), lam.detach()
    k = torch.arange(levels, dtype=torch.float64)[:, None]  # (L, 1)
    a = signal_fraction(lam[None, :], k)  # (L, n_t)
    c = -a * (1 - a) * dlam_dt[None, :]  # -da/dt = -a (1 - a) dlambda/dt >= 0
    if kind == "bandpass":
        a = torch.cat([a[:1], a[1:] - a[:-1]], dim=0)
        c = torch.cat([c[:1], c[1:] - c[:-1]], dim=0)
    return {"t": t, "lambda": lam, "a": a, "c": c, "dominant": dominant_level(lam)}


def crossing_time(t: Tensor, e: Tensor, level: float = 0.5) -> Tensor:
    """The latest t at which each curve is at or above ``level``, (L,) float64.

    t: (n_t,) grid; e: (L, n_t) curves over it. Between the latest grid point ``t_i`` with
    ``e_i >= level`` and its neighbour ``t_j > t_i`` (``e_j < level``) the crossing is linear:
    ``t_i + (e_i - level) / (e_i - e_j) (t_j - t_i)``. The largest t when the curve is already
    at the level there; NaN when it never reaches it.
    """
    t = _f64(t).flatten().cpu()
    e = _f64(e).cpu().reshape(-1, t.numel())
    order = torch.argsort(t)
    t, e = t[order], e[:, order]
    out = torch.full((e.shape[0],), float("nan"), dtype=torch.float64)
    for k in range(e.shape[0]):
        above = (e[k] >= level).nonzero().flatten()
        if not len(above):
            continue
        i = int(above.max())
        if i == t.numel() - 1:
            out[k] = t[i]
            continue
        ei, ej = e[k, i], e[k, i + 1]  # ei >= level > ej
        out[k] = t[i] + (ei - level) / (ei - ej) * (t[i + 1] - t[i])
    return out


def measured_chromatogram(
    denoiser,
    images: Tensor,
    t_grid: Tensor,
    schedule: Schedule,
    levels: int = 4,
    cond=None,
    generator: torch.Generator | None = None,
    kind: str = "box",
) -> dict[str, Tensor]:
    """Measure when each Laplacian band of the x0-prediction emerges.

    For each t: ``x_t = alpha x0 + sigma eps`` (one fixed eps per image), ``x0_hat = D(x_t)``,
    band energies ``E_k(t)`` of x0_hat (per full-resolution pixel, batch-averaged), normalised
    by the clean images' band energies: ``e_k(t) = E_k(t) / E_k(x0)``, which rises from ~0 to
    ~1 as t -> 0. ``emergence[k]`` is the largest grid t at which ``e_k >= 1/2`` (NaN if
    never); ``emergence_interp[k]`` the same crossing interpolated between grid points
    (:func:`crossing_time`).

    images: (B, C, H, W) in [-1, 1]; t_grid: (n_t,). Returns float64 CPU tensors ``t``,
    ``lambda``, ``energy_fraction`` (levels, n_t), ``emergence`` (levels,),
    ``emergence_interp`` (levels,), ``clean_energy`` (levels,).
    """
    check_image_range(images, "measured_chromatogram images")
    cond = cond if cond is not None else Cond()
    t_grid = _f64(t_grid).flatten().cpu()
    eps = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device)
    clean = band_energies(images.double(), levels, kind).mean(0).cpu()  # (L,)
    frac = []
    with torch.no_grad():
        for t in t_grid:
            lam = schedule.lambda_(t).to(torch.float64).expand(images.shape[0])
            lam = lam.to(images.device)
            x_t = q_sample(images, lam, eps)
            x0_hat = as_prediction(denoiser, x_t, lam.to(images.dtype), cond, "x0")
            frac.append(band_energies(x0_hat.double(), levels, kind).mean(0).cpu() / clean)
    e = torch.stack(frac, dim=1)  # (L, n_t)
    emergence = torch.full((levels,), float("nan"), dtype=torch.float64)
    for k in range(levels):
        above = (e[k] >= 0.5).nonzero().flatten()
        if len(above):
            emergence[k] = t_grid[above].max()
    return {"t": t_grid, "lambda": schedule.lambda_(t_grid).double().cpu(),
            "energy_fraction": e, "emergence": emergence,
            "emergence_interp": crossing_time(t_grid, e), "clean_energy": clean}


# --------------------------------------------------------------------------- band SNR
# For a Gaussian (Wiener) denoiser the x0-prediction energy at a frequency of data power S
# (orthonormal DFT, unit white noise has power 1 per frequency) is ``S sigmoid(lambda + ln S)``.
# A band therefore emerges (half its energy) about where its own SNR is 1:
# ``lambda = -ln rho_k``, ``rho_k = E_k / N_k`` (clean band energy over the band energy of unit
# white noise). The paper's ``a_k`` is the case ``rho_k = 4^k``. A data mean is in the
# x0-prediction from the start: ``e_k = m_k + (1 - m_k) sigmoid(lambda + ln rho_k)``.


def noise_band_energies(levels: int, kind: str = "box", size: int = 32) -> Tensor:
    """Band energies per pixel of unit white noise, (levels,) float64.

    ``kind="box"`` (exact, any size): ``N_k = 3 / 4^(k+1)`` for k < L-1 and
    ``N_{L-1} = 1 / 4^(L-1)`` (the level-k mean has variance 1/4^k; the bands are
    orthogonal). Other kinds: ``E||B_k eps||^2 = sum_i ||B_k e_i||^2`` over the pixel basis of
    a ``size`` x ``size`` image (exact too, by linearity).
    """
    if levels < 1:
        raise ValueError(f"noise_band_energies: need levels >= 1, got {levels}")
    if kind == "box":
        k = torch.arange(levels, dtype=torch.float64)
        n = 3.0 / 4.0 ** (k + 1)
        n[-1] = 1.0 / 4.0 ** (levels - 1)
        return n

    basis = torch.eye(size * size, dtype=torch.float64).reshape(-1, 1, size, size)
    return band_energies(basis, levels, kind).sum(0)  # (L,)


def band_snr(images: Tensor, levels: int, kind: str = "box") -> dict[str, Tensor]:
    """Per-band signal statistics of ``images`` (B, C, H, W), float64 (levels,) each:
    ``E`` clean band energies (batch mean), ``M`` band energies of the batch-mean image,
    ``N`` band energies of unit white noise, ``rho = (E - M) / N`` the band SNR at
    lambda = 0 of the fluctuation about the mean, ``m = M / E`` the share of the mean."""
    x = images.detach().double().cpu()
    e = band_energies(x, levels, kind).mean(0)
    m = band_energies(x.mean(0, keepdim=True), levels, kind)[0]
    n = noise_band_energies(levels, kind, x.shape[-1])
    return {"E": e, "M": m, "N": n, "rho": (e - m) / n, "m": m / e}


def band_prediction(schedule: Schedule, stats: dict[str, Tensor], t: Tensor) -> Tensor:
    """Predicted energy fraction ``m_k + (1 - m_k) sigmoid(lambda(t) + ln rho_k)``,
    (levels, n_t), from :func:`band_snr` statistics."""
    lam = schedule.lambda_(_f64(t).flatten()).double()[None, :]  # (1, n_t)
    rho, m = stats["rho"].double()[:, None], stats["m"].double()[:, None]  # (L, 1)
    return m + (1 - m) * torch.sigmoid(lam + rho.log())


def predicted_emergence(schedule: Schedule, stats: dict[str, Tensor]) -> Tensor:
    """Where :func:`band_prediction` is 1/2, (levels,): ``lambda = logit((1/2 - m) / (1 - m))
    - ln rho`` mapped to t by the schedule (clipped to [0, 1]); t = 1 where ``m >= 1/2``."""
    rho, m = stats["rho"].double(), stats["m"].double()
    q = ((0.5 - m) / (1 - m)).clamp(1e-12, 1 - 1e-12)
    lam = torch.logit(q) - rho.log()
    t = _f64(schedule.t_of_lambda(lam)).clamp(0.0, 1.0)
    return torch.where(m >= 0.5, torch.ones_like(t), t)


def paper_emergence(schedule: Schedule, levels: int) -> Tensor:
    """Where the paper's ``a_k = sigmoid(lambda + k ln 4)`` is 1/2: ``lambda = -k ln 4``,
    mapped to t (clipped to [0, 1]); (levels,)."""
    lam = -torch.arange(levels, dtype=torch.float64) * LN4
    return _f64(schedule.t_of_lambda(lam)).clamp(0.0, 1.0)


def plot_chromatogram(
    schedule: Schedule,
    levels: int = 4,
    path: str | None = None,
    title: str | None = None,
    measured: dict[str, Tensor] | None = None,
    m: int = 2,
):
    """Draw the chromatogram of ``schedule`` (matplotlib, Agg backend): a_k(t); the rates
    c_k(t) with the dominant level k*(t); the band-pass p_k(t); and the time map tau(t) for
    scale factor ``m``. With ``measured`` (from :func:`measured_chromatogram`) the measured
    band energy fractions are drawn as markers on the first panel. Saves to ``path`` if
    given; returns the figure.
    """
    # deferred: matplotlib (~0.4 s) is for this plot only, not for the science core's users
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cum = chromatogram(schedule, levels, kind="cumulative")
    band = chromatogram(schedule, levels, kind="bandpass")
    t = cum["t"].numpy()
    colors = plt.cm.viridis([0.9 * k / max(levels - 1, 1) for k in range(levels)])
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), constrained_layout=True)
    ax_a, ax_c, ax_b, ax_tau = axes.flatten()
    for k in range(levels):
        lbl = f"level {k} (1/{2 ** k} res)"
        ax_a.plot(t, cum["a"][k].numpy(), color=colors[k], lw=2, label=lbl)
        ax_c.plot(t, cum["c"][k].numpy(), color=colors[k], lw=2, label=lbl)
        ax_b.plot(t, band["a"][k].numpy(), color=colors[k], lw=2, label=lbl)
        if measured is not None and k < measured["energy_fraction"].shape[0]:
            ax_a.plot(measured["t"].numpy(), measured["energy_fraction"][k].numpy(), "o",
                      mfc="none", color=colors[k], ms=5)
    if measured is not None:  # one legend entry for all bands (the colours are the levels')
        ax_a.plot([], [], "o", mfc="none", color="0.3", ms=5,
                  label="measured band (x0-pred / clean energy)")
    ax_b.plot(t, (1 - cum["a"][-1]).numpy(), color="0.6", ls=":", label="nothing resolved")
    ax_a.set(title="signal fraction $a_k(t) = \\sigma(\\lambda(t) + k \\ln 4)$",
             ylabel="$a_k$", ylim=(-0.02, 1.05))
    ax_c.set(title="chromatogram $c_k(t) = -da_k/dt$", ylabel="signal generation rate")
    ax_b.set(title="band-pass $p_k = a_k - a_{k-1}$ (finest resolved level)",
             ylabel="$p_k$", ylim=(-0.02, 1.05))
    twin = ax_c.twinx()
    twin.plot(t, cum["dominant"].numpy(), "k--", lw=1, label="dominant level $k^*$")
    twin.set_ylabel("dominant level $k^* = -\\lambda / \\ln 4$")
    twin.set_ylim(0, max(levels, 1))
    twin.legend(fontsize=8, loc="upper right")
    tau_t = tau(schedule, cum["t"], m).numpy()
    ax_tau.plot(t, tau_t, color="C3", lw=2, label=f"$\\tau(t)$, m = {m}")
    ax_tau.plot(t, t, color="0.6", ls=":", label="identity")
    ax_tau.set(title=f"time map: SNR($\\tau$) = {m}$^2$ SNR(t)", ylabel="$\\tau$",
               xlim=(1.0, 0.0), ylim=(0.0, 1.0))
    # each legend where its panel's curves leave room (generation runs right to left)
    where = {ax_a: "lower right", ax_c: "center right", ax_b: "upper center",
             ax_tau: "upper right"}
    for ax in (ax_a, ax_c, ax_b, ax_tau):
        ax.grid(alpha=0.3)
        ax.set_xlabel("t  (generation runs 1 \u2192 0)")
        if ax is not ax_tau:
            ax.set_xlim(1.0, 0.0)
        ax.legend(fontsize=8, loc=where[ax])
    if measured is not None:  # why the circles lag the curves (docs/science/s5-chromatogram.md)
        ax_a.set_xlabel("t  (generation runs 1 \u2192 0); circles: exact denoiser of a synthetic "
                        "|f|$^{-2}$ field,\nlate because of that field's power normalisation, "
                        "not the theory (see the S5 results page)", fontsize=9)
    name = getattr(schedule, "name", type(schedule).__name__)
    fig.suptitle(title or f"resolution chromatogram: {name}", fontsize=14)
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig
