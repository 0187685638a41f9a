"""Equal-compute comparisons of training recipes: arms, snapshots, curves and accounting.

An *arm* is a reference model (a shipped training config plus overrides) trained under a
budget that every arm of the experiment shares: the same training seconds (``time_limit_s``,
the loop's clock: the steps, without compilation or exports) and EMA snapshots at the same
training-FLOP marks (``checkpoint.snapshot_flops``, FLOPs per image measured by each run at
its first step). So every arm has a model at equal GPU time (its final export) and models at
equal training FLOPs (its snapshots at the shared marks), and the curves of quality against
training time and FLOPs come from the same snapshots.

What a comparison rests on is read back from what each run recorded (``metrics.jsonl``,
``progress.json``), never from constants: :func:`accounting`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from common.models import load_model
from components.generate import image_grid, to_uint8
from pipelines.evaluation.metrics import FeatureSpace, MetricSettings
from pipelines.experiments.common import (
    Log,
    as_float,
    measure,
    paired_difference,
    sample_uint8,
    save_samples,
    saved_samples,
)


def arm_sets(time_limit_s: float, flop_marks: list[float] = (),
             image_marks: list[int] = ()) -> list[str]:
    """The overrides that put an arm under the shared budget: stop on the training clock,
    snapshots at the FLOP and image marks; total images out of the way."""
    flops = ", ".join(f"{m:.6g}" for m in sorted(flop_marks))
    images = ", ".join(str(int(m)) for m in sorted(image_marks))
    return [f"train.time_limit_s={time_limit_s}", "train.total_images=1000000000000",
            "train.count_flops=true", f"checkpoint.snapshot_flops=[{flops}]",
            f"checkpoint.snapshot_images=[{images}]"]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def snapshots(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's snapshots and its final model, each with its progress (images seen, training
    seconds, training FLOPs), in training order; ``final`` marks the end of the run."""
    run_dir = Path(run_dir)
    out = []
    for d in sorted((run_dir / "snapshots").glob("*")):
        if (d / "progress.json").exists():
            out.append({"dir": str(d), "final": False,
                        **json.loads((d / "progress.json").read_text())})
    final = run_dir / "model" / "progress.json"
    if final.exists():
        out.append({"dir": str(final.parent), "final": True, **json.loads(final.read_text())})
    return out


def accounting(run_dir: str | Path) -> dict[str, Any]:
    """What an arm's run recorded: FLOPs per image, images seen, training seconds, first
    step (compilation), median images/s, peak memory, parameters, its snapshots."""
    run_dir = Path(run_dir)
    recs = _records(run_dir)
    snaps = snapshots(run_dir)
    final = next((s for s in snaps if s["final"]), {})
    config = json.loads((run_dir / "model" / "config.json").read_text()) \
        if (run_dir / "model" / "config.json").exists() else {}
    rates = [r["images_per_second"] for r in recs[1:] if r.get("images_per_second")]
    return {
        "flops_per_image": final.get("flops_per_image"),
        "images_seen": final.get("images_seen"),
        "train_seconds": final.get("train_seconds"),
        "train_flops": final.get("train_flops"),
        "first_step_s": [r["first_step_s"] for r in recs if "first_step_s" in r],
        "images_per_second_median": float(np.median(rates)) if rates else None,
        "peak_memory_gib": max((r.get("memory_gib", 0.0) for r in recs), default=None),
        "loss_last": recs[-1]["loss"] if recs else None,
        "family": config.get("family"),
        "parameters": _parameters(run_dir / "model"),
        "snapshots": [{k: s[k] for k in ("images_seen", "train_seconds", "train_flops",
                                          "final")} for s in snaps],
        "loss_curve": [(r.get("train_seconds"), r.get("train_flops"), r["loss"])
                       for r in recs[:: max(1, len(recs) // 200)]],
    }


def _parameters(model_dir: Path) -> int | None:
    p = model_dir / "model.safetensors"
    if not p.exists():
        return None

    with safe_open(str(p), "pt") as f:
        return int(sum(np.prod(f.get_slice(k).get_shape()) for k in f.keys()))


def at_mark(snaps: list[dict[str, Any]], mark: float, key: str = "train_flops"
            ) -> dict[str, Any] | None:
    """The snapshot taken at mark ``mark`` of ``key`` (``train_flops`` or ``images_seen``):
    the first whose count reaches it, if any."""
    return next((s for s in snaps if not s["final"] and (s.get(key) or 0) >= mark), None)


def common_mark(all_snaps: dict[str, list[dict[str, Any]]], marks: list[float],
                key: str = "train_flops") -> float | None:
    """The largest mark at which every arm has a snapshot."""
    ok = [m for m in sorted(marks) if all(at_mark(s, m, key) for s in all_snaps.values())]
    return ok[-1] if ok else None


def evaluate_arms(refs: dict[str, dict[str, Any]], marks: list[float], key: str,
                  budget_name: str, evaluate: Any, n_rows: int, n_curve: int
                  ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, list], Any]:
    """Rows, metric details, curves and the common mark of every arm.

    ``evaluate(arm, tag, model_dir, n) -> (row, details)`` samples and measures one model.
    Rows: ``<arm>@time`` (final model) and ``<arm>@<budget_name>`` (the snapshot at the
    largest mark of ``key`` that every arm reached); curves: every snapshot on ``n_curve``.
    """
    snaps = {a: snapshots(r["run_dir"]) for a, r in refs.items()}
    mark = common_mark(snaps, marks, key)
    rows, details = [], {}
    for a, r in refs.items():
        tag = f"{a}@time"
        row, details[tag] = evaluate(a, tag, r["model_dir"], n_rows)
        rows.append({"tag": tag, "arm": a, "budget": "time", **_progress(snaps[a][-1]), **row})
    if mark is not None:
        for a in refs:
            snap = at_mark(snaps[a], mark, key)
            tag = f"{a}@{budget_name}"
            row, details[tag] = evaluate(a, tag, snap["dir"], n_rows)
            rows.append({"tag": tag, "arm": a, "budget": budget_name, "mark": mark,
                         **_progress(snap), **row})
    curves: dict[str, list[dict[str, Any]]] = {}
    for a in refs:
        curves[a] = []
        for snap in snaps[a]:
            tag = f"{a}@{snap['images_seen']}"
            row, _ = evaluate(a, tag, snap["dir"], n_curve)
            curves[a].append({"tag": tag, **_progress(snap), **row})
    return rows, details, curves, mark


def _progress(snap: dict[str, Any]) -> dict[str, Any]:
    return {k: snap.get(k) for k in ("images_seen", "train_seconds", "train_flops")}


def paired(details: dict[str, Any], pairs: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """Paired bootstrap differences b - a of FD-prism, SWD and log-RAPSD distance for each
    (a, b, budget) whose rows both exist with intervals."""
    out = []
    for a, b, budget in pairs:
        if a not in details or b not in details or "intervals" not in details[a]:
            continue
        have = details[a]["intervals"]["metrics"]
        metrics = [m for m in have if m.startswith("FD-prism")] + ["swd_x1e3", "log_rapsd_l1"]
        out.append({"a": a, "b": b, "budget": budget,
                    **{m: paired_difference(details[a], details[b], m) for m in metrics
                       if m in have and m in details[b]["intervals"]["metrics"]}})
    return out


def grid_figure(out: Path, tags: list[str], k: int) -> list[str]:
    """grid.png: one row per tag of its first ``k`` saved samples (same seeds in every row)."""
    strips = [to_uint8(image_grid(as_float(torch.from_numpy(
        np.load(out / "samples" / f"{t}.npy")[:k])), nrow=k)).numpy() for t in tags]
    Image.fromarray(np.concatenate(strips, axis=0)).save(out / "grid.png")
    (out / "grid_rows.json").write_text(json.dumps(tags))
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


def evaluate_model(tag: str, model_dir: str, seeds: list[int], labels: list[int] | None,
                   real: torch.Tensor, spaces: list[FeatureSpace], metrics: MetricSettings,
                   out: Path, device: str, batch_size: int, sample_kw: dict[str, Any],
                   log: Log) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample ``model_dir`` at ``seeds`` (reusing saved samples), measure against ``real``:
    (summary row with sampling seconds per image, metric details)."""
    saved = saved_samples(out, tag, len(seeds))
    if saved is None:
        model = load_model(model_dir, device)
        _sync(device)
        t0 = time.perf_counter()
        images = sample_uint8(model, seeds, device=device, batch_size=batch_size,
                              class_labels=labels, desc=tag, **sample_kw)
        _sync(device)
        saved = images, time.perf_counter() - t0
        save_samples(out, tag, *saved)
        del model
    images, seconds = saved
    row, details = measure(images, real, spaces, metrics, device)
    log(f"{tag}: {len(seeds)} images, {seconds:.1f} s sampling, "
        + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                    if isinstance(v, float) and not k.endswith("_se")))
    return {"n": len(seeds), **row, "sample_seconds_per_image": seconds / len(seeds)}, details


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
