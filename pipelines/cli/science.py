"""``prism science``: plots of the science core (resolution chromatography, schedules).

    prism science chromatogram --schedule sd_scaled_linear --out chrom.png [--m 2] [--levels 4]
    prism science schedules --out schedules.png

Each command writes the figure and a JSON of the plotted curves beside it (same stem).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from common.cli_help import examples

if TYPE_CHECKING:  # annotations only: the commands import these themselves
    import torch

    from components.schedules import Schedule

science_app = typer.Typer(help="Science-core plots: resolution chromatogram, schedule "
                               "comparison.", no_args_is_help=True)


def _sc():
    """``components.schedules``, imported on first use."""
    # deferred: torch, matplotlib and the science core (~1.5 s): the commands load them,
    # --help does not
    import components.schedules as sc

    return sc


# name -> (label, factory); SiD2 shifts are relative to d_ref = 64
SCHEDULES: dict[str, tuple[str, Callable[[], Schedule]]] = {
    "cosine": ("cosine (= SiD2 shifted, d = 64)", lambda: _sc().CosineSchedule()),
    "sid2_32": ("SiD2 shifted, d = 32", lambda: _sc().CosineSchedule.shifted(32, 64)),
    "sid2_64": ("SiD2 shifted, d = 64", lambda: _sc().CosineSchedule.shifted(64, 64)),
    "sid2_128": ("SiD2 shifted, d = 128", lambda: _sc().CosineSchedule.shifted(128, 64)),
    "sid2_interpolated": ("SiD2 interpolated, d = 64 (32 \u2192 256)",
                          lambda: _sc().build_schedule("sid2_interpolated", d=64)),
    "ddpm_linear": ("DDPM linear \u03b2", lambda: _sc().ddpm_linear()),
    "sd_scaled_linear": ("Stable Diffusion scaled-linear", lambda: _sc().sd_scaled_linear()),
    "edm": ("EDM (\u03c1 = 7)", lambda: _sc().EDMSchedule()),
}
COMPARED = ["cosine", "sid2_32", "sid2_128", "sid2_interpolated", "ddpm_linear",
            "sd_scaled_linear", "edm"]


def _schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise typer.BadParameter(f"unknown schedule {name!r}: choose one of "
                                 f"{', '.join(SCHEDULES)}", param_hint="--schedule")
    return SCHEDULES[name][1]()


def _check_out(out: Path) -> Path:
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise typer.BadParameter(f"--out must end in .png, .pdf or .svg, got {out}",
                                 param_hint="--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _gaussian_measurement(schedule: Schedule, levels: int, size: int = 32):
    """Measured chromatogram of the exact denoiser of a natural-image-like Gaussian field
    (power spectrum |f|^-2), to set beside the prediction."""
    import torch

    from components.analytic import GaussianDenoiser, stationary_covariance
    from components.chromatography import measured_chromatogram

    cov = stationary_covariance(size, size, beta=2.0, var=0.09)
    den = GaussianDenoiser(torch.zeros(size * size, dtype=torch.float64), cov, (1, size, size))
    g = torch.Generator().manual_seed(0)
    images = den.sample(64, generator=g).clamp(-1, 1)
    return measured_chromatogram(den, images, torch.linspace(0.0, 1.0, 26), schedule,
                                 levels=levels, generator=g)


@science_app.command("chromatogram", epilog=examples(
    "prism science chromatogram --schedule cosine --levels 3 --no-measure --out chroma.png",
    "prism science chromatogram --schedule sd_scaled_linear --m 4 --out figures/sd.svg"))
def chromatogram_command(
    schedule: str = typer.Option("sd_scaled_linear", help=f"one of {', '.join(SCHEDULES)}"),
    m: int = typer.Option(2, min=2, help="scale factor of the time map tau"),
    levels: int = typer.Option(4, min=1, max=8, help="pyramid levels (level k = 1/2^k res)"),
    measure: bool = typer.Option(True, help="overlay the measured chromatogram of the exact "
                                 "denoiser of a |f|^-2 Gaussian field (32x32)"),
    out: Path = typer.Option(..., help="figure path (.png/.pdf/.svg); a .json is written beside"),
) -> None:
    """Plot the resolution chromatogram of a schedule and write its curves as JSON."""
    import torch

    from components.chromatography import chromatogram, plot_chromatogram, tau, tau_discrete
    from components.schedules import DiscreteSchedule

    out = _check_out(out)
    sched = _schedule(schedule)
    measured = _gaussian_measurement(sched, min(levels, 5)) if measure else None
    plot_chromatogram(sched, levels, path=str(out), m=m, measured=measured,
                      title=f"resolution chromatogram: {SCHEDULES[schedule][0]}")
    cum = chromatogram(sched, levels, n_t=201)
    band = chromatogram(sched, levels, n_t=201, kind="bandpass")
    doc = {"schedule": schedule, "m": m, "levels": levels, "t": cum["t"].tolist(),
           "lambda": cum["lambda"].tolist(), "a": cum["a"].tolist(), "c": cum["c"].tolist(),
           "bandpass": band["a"].tolist(), "dominant_level": cum["dominant"].tolist(),
           "tau": tau(sched, cum["t"], m).tolist()}
    if isinstance(sched, DiscreteSchedule):
        steps = torch.tensor([999, 800, 600, 400, 200]).clamp(max=sched.T - 1)
        doc["tau_discrete"] = dict(zip(steps.tolist(), tau_discrete(sched, steps, m).tolist(),
                                       strict=True))
    if measured is not None:
        doc["measured"] = {k: v.tolist() for k, v in measured.items()}
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(doc, indent=1))
    typer.echo(f"wrote {out} and {json_path}")


def plot_schedules(names: list[str], path: str, levels: int = 4):
    """lambda(t), the dominant level and the per-level signal fractions of several schedules."""
    import matplotlib

    from components.chromatography import chromatogram

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 8), constrained_layout=True)  # 1,260 px wide
    axes = axes.flatten()
    styles = ["-", "--", "-.", ":", "-", "--", "-.", ":"]
    for i, name in enumerate(names):
        label, factory = SCHEDULES[name]
        ch = chromatogram(factory(), levels, n_t=401)
        t = ch["t"].numpy()
        kw = {"color": f"C{i}", "ls": styles[i % len(styles)], "lw": 1.8, "label": label}
        axes[0].plot(t, ch["lambda"].numpy(), **kw)
        axes[1].plot(t, ch["dominant"].numpy(), **kw)
        for k in range(min(levels, 4)):
            axes[2 + k].plot(t, ch["a"][k].numpy(), **kw)
    axes[0].set(title="log-SNR $\\lambda(t)$", ylabel="$\\lambda$", ylim=(-16, 16))
    axes[1].set(title="dominant level $k^*(t) = -\\lambda / \\ln 4$",
                ylabel="level (1/2$^k$ resolution)", ylim=(0, 8))
    for k in range(min(levels, 4)):
        axes[2 + k].set(title=f"signal fraction of level {k} (1/{2 ** k} res): "
                              f"$\\sigma(\\lambda + {k} \\ln 4)$", ylabel=f"$a_{k}$",
                        ylim=(-0.02, 1.02))
    for ax in axes:
        ax.set_xlim(1.0, 0.0)
        ax.set_xlabel("t  (generation runs 1 \u2192 0)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper right")  # where no curve goes: late t, high level
    fig.suptitle("noise schedules through the lens of resolution chromatography", fontsize=14)
    fig.savefig(path, dpi=90)
    return fig


@science_app.command("schedules", epilog=examples(
    "prism science schedules --out schedules.png",
    "prism science schedules --levels 2 --out figures/schedules.pdf"))
def schedules_command(
    out: Path = typer.Option(..., help="figure path (.png/.pdf/.svg); a .json is written beside"),
    levels: int = typer.Option(4, min=1, max=4, help="levels whose signal fraction is drawn"),
) -> None:
    """Compare cosine, SiD2 shifted/interpolated, DDPM, Stable Diffusion and EDM schedules."""
    import torch

    from components.chromatography import chromatogram

    out = _check_out(out)
    plot_schedules(COMPARED, str(out), levels)
    doc: dict = {"t": torch.linspace(0, 1, 101, dtype=torch.float64).tolist(), "schedules": {}}
    for name in COMPARED:
        ch = chromatogram(SCHEDULES[name][1](), levels, n_t=101)
        lam = ch["lambda"]
        doc["schedules"][name] = {
            "label": SCHEDULES[name][0], "lambda": lam.tolist(), "a": ch["a"].tolist(),
            # time at which level k is half generated (a_k = 1/2), the chromatogram's peak
            "t_half": [_t_half(ch["t"], ch["a"][k]) for k in range(levels)],
        }
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(doc, indent=1))
    typer.echo(f"wrote {out} and {json_path}")
    for name in COMPARED:
        halves = ", ".join("never" if x is None else f"{x:.2f}"
                           for x in doc["schedules"][name]["t_half"])
        typer.echo(f"  {name:18s} t(a_k = 1/2), k = 0..{levels - 1}: {halves}")


def _t_half(t: torch.Tensor, a: torch.Tensor) -> float | None:
    """Largest t with a(t) >= 1/2 (a decreases in t); None if never."""
    idx = (a >= 0.5).nonzero().flatten()
    return float(t[idx].max()) if len(idx) else None
