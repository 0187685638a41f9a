"""Corpus summary of the per-image spectral statistics: JSON and PNG plots.

``summary.json``: image count, the spectra parameters, and for the most common image size the
mean luminance RAPSD with quantile bands (5, 25, 50, 75, 95 %) per radius, the power-law fit of
the mean RAPSD; for beta, lambda_min, lambda_max, log_A: mean, std, quantiles and a histogram.
``rapsd.png``: mean RAPSD (log-log) with the bands; ``histograms.png``: beta and the bounds.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import storage
from components.spectra import power_law_fit
from components.spectral_bins import bin_frequencies
from pipelines.config import SpectraJobConfig

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
SCALARS = ("beta", "lambda_min", "lambda_max", "log_A", "fit_residual")


def read_stats(urls: list[str], columns: list[str] | None = None) -> pa.Table:
    """Concatenate per-shard statistics tables."""
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u)), columns=columns) for u in urls]
    return pa.concat_tables(tables) if tables else pa.table({})


def _describe(x: np.ndarray, bins: int = 40) -> dict[str, Any]:
    counts, edges = np.histogram(x, bins=bins)
    return {"mean": float(x.mean()), "std": float(x.std()),
            "quantiles": dict(zip([str(q) for q in QUANTILES],
                                  np.quantile(x, QUANTILES).tolist(), strict=True)),
            "histogram": {"counts": counts.tolist(), "edges": edges.tolist()}}


def summarise(table: pa.Table) -> dict[str, Any]:
    """The summary dict of a statistics table (see module docstring)."""
    n = table.num_rows
    if n == 0:
        return {"images": 0}
    sizes = Counter(zip(table["height"].to_numpy(), table["width"].to_numpy(), strict=True))
    (h, w), count = sizes.most_common(1)[0]
    sel = (table["height"].to_numpy() == h) & (table["width"].to_numpy() == w)
    spec = np.stack(table.filter(pa.array(sel))["lum_rapsd"].to_numpy(zero_copy_only=False))
    mean = spec.mean(0)
    log_a, beta_mean, res = power_law_fit(mean)
    out: dict[str, Any] = {
        "images": n, "sizes": {f"{a}x{b}": c for (a, b), c in sizes.most_common()},
        "rapsd": {"size": f"{h}x{w}", "images": int(count),
                  "frequency": bin_frequencies(len(mean)).tolist(), "mean": mean.tolist(),
                  "quantiles": {str(q): v.tolist() for q, v in
                                zip(QUANTILES, np.quantile(spec, QUANTILES, axis=0),
                                    strict=True)},
                  "power_law_of_mean": {"log_A": float(log_a), "beta": float(beta_mean),
                                        "residual": float(res)}},
    }
    for name in SCALARS:
        out[name] = _describe(table[name].to_numpy())
    return out


def _plots(summary: dict[str, Any], table: pa.Table) -> tuple[bytes, bytes]:
    # deferred: matplotlib (~0.4 s to import) only for the plots
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    r = summary["rapsd"]
    f, q = np.asarray(r["frequency"]), {k: np.asarray(v) for k, v in r["quantiles"].items()}
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.fill_between(f, q["0.05"], q["0.95"], alpha=0.2, label="5-95 %")
    ax.fill_between(f, q["0.25"], q["0.75"], alpha=0.4, label="25-75 %")
    ax.plot(f, r["mean"], "k", label=f"mean (beta {r['power_law_of_mean']['beta']:.2f})")
    ax.set(xscale="log", yscale="log", xlabel="radial frequency (cycles / image)",
           ylabel="luminance power", title=f"RAPSD, {r['images']} images {r['size']}")
    # plain numbers at 1, 2, 5, 10, ... and no minor labels (they collided: 3x10^0 4x10^0 ...)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.legend()
    buf1 = io.BytesIO()
    fig.savefig(buf1, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), layout="constrained")
    what = {"beta": "spectral slope beta (power ~ f^-beta)",
            "lambda_min": "lambda_min: log-SNR where noise\nswamps the strongest frequency",
            "lambda_max": "lambda_max: log-SNR where noise\nreaches the weakest frequency"}
    for ax, name in zip(axes, what, strict=True):
        ax.hist(table[name].to_numpy(), bins=50)
        ax.set(xlabel=name, ylabel="images", title=what[name])
    fig.suptitle(f"Per-image spectral statistics ({table.num_rows} images): a schedule "
                 "runs from lambda_max (t = 0) to lambda_min (t = 1)")
    buf2 = io.BytesIO()
    fig.savefig(buf2, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf1.getvalue(), buf2.getvalue()


def write_summary(out: str, stat_urls: list[str], cfg: SpectraJobConfig) -> dict[str, Any]:
    """Read the per-shard tables and write summary.json, rapsd.png, histograms.png to OUT."""
    cols = ["height", "width", "lum_rapsd", "label", *SCALARS]
    table = read_stats(stat_urls, cols)
    summary = summarise(table)
    summary["config"] = cfg.model_dump()
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(summary, indent=1).encode())
    if table.num_rows:
        rapsd_png, hist_png = _plots(summary, table)
        storage.write_bytes(storage.join(out, "rapsd.png"), rapsd_png)
        storage.write_bytes(storage.join(out, "histograms.png"), hist_png)
    return {k: summary[k] for k in ("images",) if k in summary} | (
        {"beta_mean": summary["beta"]["mean"],
         "beta_of_mean_rapsd": summary["rapsd"]["power_law_of_mean"]["beta"]}
        if table.num_rows else {})
