"""The figures of an equal-compute experiment: quality along the run, samples, losses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from components.generate import image_grid, to_uint8
from pipelines.experiments.common import as_float, fd_key


def figures(results: dict[str, Any], out: Path, n_curve: int, grid_images: int) -> list[str]:
    """curves.png (FD-prism, else SWD, along the run against time and FLOPs, beside the floor
    at the curves' n, ``n_curve``), grid.png (the first ``grid_images`` of each arm's final
    model, the same seeds and labels), loss.png (each arm's training loss)."""
    rows = results["rows"]
    metric = (fd_key(rows[0]) if rows else None) or "swd_x1e3"
    floor = results["floors"].get(str(n_curve), {}).get(metric)
    curve_figure(results["curves"], metric, floor, out / "curves.png")
    grid = grid_figure(out, [r for r in rows if r["budget"] == "time"], grid_images)
    loss_figure(results["references"], out / "loss.png")
    return ["curves.png", *grid, "loss.png"]


def grid_figure(out: Path, rows: list[dict[str, Any]], k: int) -> list[str]:
    """grid.png: one strip per row of the first ``k`` of its model's saved samples (the same
    seeds in every strip), the row's name at its left; grid_rows.json names the strips."""
    images = [torch.from_numpy(np.load(out / "samples" / f"{r['samples']}.npy")[:k])
              for r in rows]
    strips = [to_uint8(image_grid(as_float(x), nrow=k)).numpy() for x in images]
    grid = Image.fromarray(np.concatenate(strips, axis=0))
    zoom = max(1, 64 // images[0].shape[-1])  # small images drawn larger, pixels kept sharp
    grid = grid.resize((grid.width * zoom, grid.height * zoom), Image.Resampling.NEAREST)
    font = ImageFont.load_default()
    margin = 8 + max(int(font.getlength(r["tag"])) for r in rows)
    page = Image.new("RGB", (grid.width + margin, grid.height), "white")
    page.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(page)
    h = grid.height // len(rows)
    for i, r in enumerate(rows):
        draw.text((4, i * h + h // 2), r["tag"], fill="black", font=font, anchor="lm")
    page.save(out / "grid.png")
    (out / "grid_rows.json").write_text(json.dumps([r["tag"] for r in rows]))
    return ["grid.png", "grid_rows.json"]


def loss_figure(refs: dict[str, dict[str, Any]], path: Path) -> None:
    """Each arm's training loss against its training seconds."""
    # deferred: matplotlib (~0.4 s to import) only for the figures, not for `experiment list`
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (a, ref) in enumerate(refs.items()):
        pts = [(t, loss) for t, _, loss in ref["budget"]["loss_curve"] if t is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), color=f"C{i}", label=a)
    ax.set(xlabel="training time (s)", ylabel="training loss (each arm's own objective)",
           yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_figure(curves: dict[str, list[dict[str, Any]]], metric: str, floor: float | None,
                 path: Path) -> None:
    """``metric`` against training seconds and against training FLOPs, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (arm, pts) in enumerate(curves.items()):
        pts = [p for p in pts if metric in p]
        if not pts:
            continue
        for ax, x in zip(axes, ("train_seconds", "train_flops"), strict=True):
            ax.plot([p[x] for p in pts], [p[metric] for p in pts], "o-", color=f"C{i}",
                    label=arm)
    for ax, label in zip(axes, ("training time (s, the loop's clock)",
                                "training FLOPs (measured per image x images seen)"),
                         strict=True):
        if floor is not None:
            ax.axhline(floor, color="0.5", ls=":", label="real vs real (same n)")
        ax.set(xlabel=label, ylabel=metric)
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{metric} along the run (EMA snapshots; lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
