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

Samples are kept per model (``<arm>@<images seen>``, the seeds from the experiment's seed on),
so a row and a curve point of one model share them, and an arm can be trained and sampled on
the machine that holds its weights (:func:`sample_arms`) and measured anywhere else from its
run's records and samples: :func:`portable_files` lists what has to travel.
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
    environment,
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
        "device": final.get("device"),  # the chip the training seconds were measured on
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
    if not p.exists():  # a run brought back without its weights: the count kept beside them
        kept = model_dir / PARAMETERS_FILE
        return json.loads(kept.read_text())["parameters"] if kept.exists() else None

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


def model_key(arm: str, snap: dict[str, Any]) -> str:
    """The name of a model's samples: its arm and the images it had seen."""
    return f"{arm}@{snap['images_seen']}"


def evaluate_arms(refs: dict[str, dict[str, Any]], marks: list[float], key: str,
                  budget_name: str, evaluate: Any, n_rows: int, n_curve: int
                  ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, list], Any]:
    """Rows, metric details, curves and the common mark of every arm.

    ``evaluate(arm, samples, model_dir, n, intervals) -> (row, details)`` samples (or reuses
    the samples named ``samples``) and measures one model, with bootstrap intervals for the
    rows (their paired differences need them) and without for the curves' points. Rows:
    ``<arm>@time`` (final model) and ``<arm>@<budget_name>`` (the snapshot at the largest mark
    of ``key`` that every arm reached); curves: every snapshot on the first ``n_curve`` of its
    samples.
    """
    snaps = {a: snapshots(r["run_dir"]) for a, r in refs.items()}
    mark = common_mark(snaps, marks, key)
    picked = [(a, "time", snaps[a][-1]) for a in refs]
    if mark is not None:
        picked += [(a, budget_name, at_mark(snaps[a], mark, key)) for a in refs]
    rows, details = [], {}
    for a, budget, snap in picked:
        tag, samples = f"{a}@{budget}", model_key(a, snap)
        row, details[tag] = evaluate(a, samples, snap["dir"], n_rows, True)
        rows.append({"tag": tag, "arm": a, "budget": budget, "samples": samples,
                     **({"mark": mark} if budget != "time" else {}), **_progress(snap), **row})
    curves: dict[str, list[dict[str, Any]]] = {}
    for a in refs:
        curves[a] = []
        for snap in snaps[a]:
            tag = model_key(a, snap)
            row, _ = evaluate(a, tag, snap["dir"], n_curve, False)
            curves[a].append({"tag": tag, **_progress(snap), **row})
    return rows, details, curves, mark


def sample_arms(refs: dict[str, dict[str, Any]], n: int, sample: Any, out: Path,
                work_dir: str | Path, log: Log) -> list[str]:
    """Sample ``n`` images of every final model and snapshot of every arm, where the weights
    are: ``sample(arm, samples, model_dir, n)`` saves them (reusing saved ones). Final models
    first, then the snapshots from the latest back, so a run cut off has sampled what matters
    most. Each arm's parameter count is kept beside its weights, and ``out/portable.txt`` lists
    (after every model, so a run cut off still lists what it made) the files a measurement
    elsewhere needs: :func:`portable_files`. Returns the sample names."""
    for r in refs.values():
        model_dir = Path(r["model_dir"])
        (model_dir / PARAMETERS_FILE).write_text(
            json.dumps({"parameters": _parameters(model_dir)}))
    models = [(a, snap) for a, r in refs.items() for snap in snapshots(r["run_dir"])]
    todo = [m for m in models if m[1]["final"]] + sorted(
        (m for m in models if not m[1]["final"]), key=lambda m: -m[1]["images_seen"])
    names = []
    _list_portable(refs, out, work_dir)
    for a, snap in todo:
        names.append(model_key(a, snap))
        sample(a, names[-1], snap["dir"], n)
        _list_portable(refs, out, work_dir)
    log(f"sampled {len(names)} models of {len(refs)} arms, {n} images each; the files to bring "
        f"back are listed in {out / 'portable.txt'}")
    return names


def _list_portable(refs: dict[str, dict[str, Any]], out: Path, work_dir: str | Path) -> None:
    files = portable_files(refs, out, Path(work_dir))
    (out / "portable.txt").write_text("".join(f"{f}\n" for f in files))


PARAMETERS_FILE = "parameters.json"  # beside model.safetensors: its parameter count


def portable_files(refs: dict[str, dict[str, Any]], out: Path, work_dir: Path) -> list[Path]:
    """What a measurement away from the weights needs, relative to ``work_dir``: each arm's
    run records (metrics, progress and configs: every JSON and JSONL file of its run, none of
    its weights or checkpoints; its training log) and its saved samples under ``out`` (inside
    ``work_dir``)."""
    files = []
    for a, r in refs.items():
        run_dir = Path(r["run_dir"])
        files += [f for f in sorted(run_dir.rglob("*")) if f.suffix in (".json", ".jsonl")
                  and "checkpoints" not in f.relative_to(run_dir).parts]
        files += [run_dir.with_suffix(".log")] if run_dir.with_suffix(".log").exists() else []
        files += sorted((out / "samples").glob(f"{a}@*"))
    check_portable(out, work_dir)
    return [f.resolve().relative_to(work_dir.resolve()) for f in files]


def check_portable(out: Path, work_dir: str | Path) -> None:
    """A sampling-only run lists its files relative to the work folder, so its output folder
    must lie inside it; checked before any training."""
    if not Path(out).resolve().is_relative_to(Path(work_dir).resolve()):
        raise ValueError(f"stop_after_sampling needs the output folder inside work_dir "
                         f"({work_dir}), got {out}: its samples travel with the run records")


def chips(refs: dict[str, dict[str, Any]]) -> str | None:
    """Why the arms' training seconds do not compare, if they do not: the arms trained on
    different kinds of chip (read from each run's record; runs that kept none pass)."""
    seen = {a: r.get("budget", {}).get("device") for a, r in refs.items()}
    kinds = {d for d in seen.values() if d is not None}
    if len(kinds) > 1:
        return (f"the arms trained on different chips, so equal seconds are not equal "
                f"compute: {seen}")
    return None


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


def grid_figure(out: Path, rows: list[dict[str, Any]], k: int) -> list[str]:
    """grid.png: one strip per row of the first ``k`` of its model's saved samples (the same
    seeds in every strip); grid_rows.json names the strips."""
    strips = [to_uint8(image_grid(as_float(torch.from_numpy(
        np.load(out / "samples" / f"{r['samples']}.npy")[:k])), nrow=k)).numpy() for r in rows]
    Image.fromarray(np.concatenate(strips, axis=0)).save(out / "grid.png")
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


def model_samples(key: str, model_dir: str, seeds: list[int], labels: list[int] | None,
                  out: Path, device: str, batch_size: int, sample_kw: dict[str, Any]
                  ) -> tuple[torch.Tensor, float]:
    """(uint8 images, sampling seconds) of ``model_dir`` at ``seeds`` (consecutive, so a
    smaller set is a prefix of a larger one): the first ``len(seeds)`` of the samples saved as
    ``key`` when there are that many, else sampled and saved."""
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"{key}: the seeds must run on from the first, got {seeds[:4]}...")
    made_with = {"seed": seeds[0], "labels": labels is not None, **sample_kw}
    saved = saved_samples(out, key, len(seeds), prefix=True, settings=made_with)
    if saved is not None:
        return saved
    if not (Path(model_dir) / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no samples {out / 'samples' / key}.npy of {len(seeds)} images, and {model_dir} "
            "has no weights to sample them: sample the arms where they trained "
            "(stop_after_sampling=true) and bring their samples back with the run records")
    model = load_model(model_dir, device)
    _sync(device)
    t0 = time.perf_counter()
    images = sample_uint8(model, seeds, device=device, batch_size=batch_size,
                          class_labels=labels, desc=key, **sample_kw)
    _sync(device)
    seconds = time.perf_counter() - t0
    save_samples(out, key, images, seconds, made_with)
    return images, seconds


def measured(key: str, images: torch.Tensor, seconds: float, real: torch.Tensor,
             spaces: list[FeatureSpace], metrics: MetricSettings, device: str, log: Log,
             intervals: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics of one model's samples against ``real``: (summary row with the sampling
    seconds per image, metric details); ``intervals`` off skips the bootstrap."""
    if not intervals:
        metrics = metrics.model_copy(update={"bootstrap": 0})
    row, details = measure(images, real, spaces, metrics, device)
    log(f"{key}: {len(images)} images, {seconds:.1f} s sampling, "
        + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                    if isinstance(v, float) and not k.endswith("_se")))
    return {"n": len(images), **row, "sample_seconds_per_image": seconds / len(images)}, details


def sampled_results(name: str, claim: str, s: Any, refs: dict[str, dict[str, Any]],
                    sampled: list[str], seconds: dict[str, float]) -> dict[str, Any]:
    """The results of a run stopped after sampling (``stop_after_sampling``): the arms and the
    samples made (listed with the run records in ``portable.txt``: :func:`sample_arms`)."""
    return {"experiment": name, "claim": claim, "settings": s.model_dump(mode="json"),
            "references": refs, "sampled": sampled, "environment": environment(),
            "seconds": seconds}


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
