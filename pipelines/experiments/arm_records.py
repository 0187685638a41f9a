"""What an arm's training run recorded, and what travels with it.

An arm's run exports EMA snapshots at the shared marks and its final model, each with a
``progress.json`` (images seen, training seconds, training FLOPs, the chip); its
``metrics.jsonl`` holds the loop's logs. :func:`accounting` reads an arm's budget back from
those files, never from constants; :func:`snapshots`, :func:`at_mark` and :func:`common_mark`
find the models at equal compute; :func:`chips` says when equal seconds are not equal compute.

An arm can be trained and sampled on the machine that holds its weights (:func:`sample_arms`)
and measured anywhere else from its run's records and samples: :func:`portable_files` lists
what has to travel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from pipelines.experiments.common import Log


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


PARAMETERS_FILE = "parameters.json"  # beside model.safetensors: its parameter count


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


def progress(snap: dict[str, Any]) -> dict[str, Any]:
    return {k: snap.get(k) for k in ("images_seen", "train_seconds", "train_flops")}


def chips(refs: dict[str, dict[str, Any]]) -> str | None:
    """Why the arms' training seconds do not compare, if they do not: the arms trained on
    different kinds of chip (read from each run's record; runs that kept none pass)."""
    seen = {a: r.get("budget", {}).get("device") for a, r in refs.items()}
    kinds = {d for d in seen.values() if d is not None}
    if len(kinds) > 1:
        return (f"the arms trained on different chips, so equal seconds are not equal "
                f"compute: {seen}")
    return None


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
