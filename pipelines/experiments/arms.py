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

The procedure every such experiment follows (data, training, accounting, sampling, floors,
rows, curves, paired differences, figures) is :func:`run`; an experiment supplies its
:class:`Design` (arms, marks, sampling options, comparisons, rule) and :class:`ArmsSettings`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field, field_validator
from safetensors import safe_open

from common.models import load_model
from components.generate import image_grid, to_uint8
from pipelines.config import DemoConfig, IngestConfig
from pipelines.data.demo import build_demo
from pipelines.data.ingest import ingest
from pipelines.evaluation.metrics import FeatureSpace, MetricSettings
from pipelines.experiments.common import (
    ExperimentSettings,
    Log,
    ReferenceSpec,
    Timer,
    as_float,
    ensure_feature_net,
    environment,
    fd_key,
    feature_space,
    measure,
    paired_difference,
    real_floors,
    real_images,
    sample_uint8,
    save_samples,
    saved_samples,
    slim,
    train_references,
)


class ArmsSettings(ExperimentSettings):
    """Settings every equal-compute experiment has; a subclass names its arms (``ARMS``, the
    default of ``arms``) and its marks."""

    ARMS: ClassVar[tuple[str, ...]] = ()

    train_data: str | None = None  # shards; None: the embedded demo corpus, built in work_dir
    real_data: str | None = None  # held-out images; None: the training data
    floor_data: str | None = None  # a second real set for the floors; None: real_data halves
    arms: list[str] = Field(default_factory=list, validate_default=True)  # empty: every arm
    time_limit_s: float = Field(480.0, gt=0)  # training seconds per arm (the loop's clock)
    reference_sets: list[str] = Field(default_factory=list)  # overrides for every arm
    arm_sets: dict[str, list[str]] = Field(default_factory=dict)  # per-arm overrides
    feature_net: str | None = None  # weights; None: trained on train_data (feature_recipe)
    feature_recipe: dict[str, Any] = Field(default_factory=dict)
    n_images: int = Field(5000, ge=2)  # per row
    n_curve: int = Field(1000, ge=2)  # per snapshot on the curves
    grid_images: int = Field(16, ge=1)
    stop_after_training: bool = False  # train (or resume) the arms named, then stop
    # train (or resume) the arms named, sample n_images of each of their snapshots and
    # final models, keep the samples and run records, then stop: the metrics can then be
    # computed on another machine (train_missing=false, the same settings, these files)
    stop_after_sampling: bool = False

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in cls.ARMS]
        if bad:
            raise ValueError(f"arms must be among {list(cls.ARMS)}, got {v}")
        return list(dict.fromkeys(v)) or list(cls.ARMS)

    @field_validator("arm_sets")
    @classmethod
    def _arm_sets(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        bad = [a for a in v if a not in cls.ARMS]
        if bad:
            raise ValueError(f"arm_sets names arms that do not exist: {bad} "
                             f"(arms: {list(cls.ARMS)})")
        return v


@dataclass(frozen=True)
class Design:
    """What an equal-compute experiment fixes beside its settings.

    ``arms`` maps each arm to its recipe; ``sets(s, arm)`` adds the overrides an arm takes
    from the settings beyond the shared ones (none by default). The arms meet at the largest
    of ``s.<marks_field>`` that all reached, counted as ``mark_key`` in their run records
    (``train_flops`` or ``images_seen``); the rows there are ``<arm>@<mark_budget>``, and the
    results name the mark under ``mark_field``.
    ``pairs``: the (a, b) arms whose paired differences b - a are computed at both budgets;
    ``verdict(comparisons, rows, apart)`` applies the rule fixed before measuring.
    """

    name: str
    claim: str
    arms: dict[str, ReferenceSpec]
    marks_field: str
    mark_key: str
    mark_budget: str
    mark_field: str
    pairs: list[tuple[str, str]]
    verdict: Callable[[list[dict[str, Any]], list[dict[str, Any]], str | None],
                      dict[str, Any]]
    resolution: Callable[[Any], int]
    sample_kw: Callable[[Any, str], dict[str, Any]]
    sets: Callable[[Any, str], list[str]] = lambda s, arm: []
    conditional: bool = False  # sample with class labels (seed mod the arms' classes)


def demo_data(s: ArmsSettings, resolution: int, log: Log) -> tuple[str, str]:
    """(training shards, real images): ``s.train_data`` and ``s.real_data``, or the embedded
    demo corpus at ``resolution``, built and ingested in the work folder once."""
    if s.train_data is not None:
        return s.train_data, s.real_data or s.train_data
    root = Path(s.work_dir) / "data"
    shards = root / f"demo-shards-{resolution}"
    if not (shards / "manifest.parquet").exists():
        corpus = root / f"demo-corpus-{resolution}"
        build_demo(corpus, DemoConfig(size=resolution, per_class=32), log=log)
        ingest(str(corpus), str(shards),
               IngestConfig(size=resolution, shard_size=128, gzip=True), log=log)
    return str(shards), s.real_data or str(shards)


def references(d: Design, s: ArmsSettings, train: str) -> dict[str, ReferenceSpec]:
    """Every arm named in ``s.arms`` under the shared budget, on the same data and seed."""
    marks = getattr(s, d.marks_field)
    budget = arm_sets(s.time_limit_s, **{d.marks_field: marks})
    return {a: ReferenceSpec(config=d.arms[a].config, sets=[
        f"data.url={train}", f"run.seed={s.seed}", *d.arms[a].sets, *budget,
        *d.sets(s, a), *s.reference_sets, *s.arm_sets.get(a, [])]) for a in s.arms}


def run(d: Design, s: ArmsSettings, out: Path, log: Log) -> dict[str, Any]:
    """Train (or reuse) the arms, then evaluate their final models, their snapshots at the
    common mark and the curves; returns the results. ``s.stop_after_training`` and
    ``s.stop_after_sampling`` end it early (:func:`sample_arms`)."""
    timer = Timer()
    device = s.resolved_device()
    if s.stop_after_sampling:
        check_portable(out, s.work_dir)
    with timer("data"):
        train, real_src = demo_data(s, d.resolution(s), log)
    with timer("training"):
        refs = train_references(references(d, s, train), s, d.name, log)
    for a, r in refs.items():
        r["budget"] = b = accounting(r["run_dir"])
        log(f"{a}: {b['images_seen']} images, {b['train_seconds']:.1f} s, "
            f"{(b['flops_per_image'] or 0) / 1e9:.2f} GFLOP/image, "
            f"{(b['train_flops'] or 0):.3g} FLOPs")
    head = {"experiment": d.name, "claim": d.claim, "settings": s.model_dump(mode="json"),
            "references": refs}
    if s.stop_after_training:
        return {**head, "environment": environment(), "seconds": timer.seconds}

    num_classes = _num_classes(refs) if d.conditional else 0

    def samples(arm: str, key: str, model_dir: str, n: int) -> tuple[torch.Tensor, float]:
        seeds = list(range(s.seed, s.seed + n))
        labels = [i % num_classes for i in seeds] if num_classes else None
        with timer("sampling"):
            return model_samples(key, model_dir, seeds, labels, out, device, s.batch_size,
                                 d.sample_kw(s, arm))

    if s.stop_after_sampling:
        sampled = sample_arms(refs, s.n_images, samples, out, s.work_dir, log)
        return {**head, "sampled": sampled, "environment": environment(),
                "seconds": timer.seconds}

    with timer("feature_net"):
        fnet = s.feature_net or ensure_feature_net(train, None, s, s.feature_recipe, log)
    spaces = feature_space(fnet, device)
    real, _ = real_images(real_src, None, s.seed, resolution=d.resolution(s))
    with timer("floors"):
        floors = real_floors(s.floor_data or real_src, real_src, real,
                             sorted({s.n_images, s.n_curve}), spaces, s.metrics, s.seed, device)

    def evaluate(arm: str, key: str, model_dir: str, n: int, intervals: bool
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
        images, seconds = samples(arm, key, model_dir, n)
        with timer("metrics"):
            return measured(key, images, seconds, real, spaces, s.metrics, device, log,
                            intervals)

    rows, details, curves, mark = evaluate_arms(
        refs, getattr(s, d.marks_field), d.mark_key, d.mark_budget, evaluate, s.n_images,
        s.n_curve)
    comparisons = paired(details, [(f"{a}@{budget}", f"{b}@{budget}", budget)
                                   for budget in ("time", d.mark_budget) for a, b in d.pairs])
    results = {
        **head, "feature_net": fnet, "real_data": real_src, "n_real": len(real),
        "floors": floors, d.mark_field: mark, "rows": rows, "curves": curves,
        "comparisons": comparisons, "verdict": d.verdict(comparisons, rows, chips(refs)),
        "details": {k: slim(v) for k, v in details.items()},
        "environment": environment(), "seconds": timer.seconds}
    results["figures"] = figures(results, out, s)
    return results


def _num_classes(refs: dict[str, dict[str, Any]]) -> int:
    counts = {json.loads((Path(r["model_dir"]) / "config.json").read_text())["num_classes"]
              for r in refs.values()}
    if len(counts) != 1:
        raise ValueError(f"the arms disagree on the number of classes: {sorted(counts)}")
    return counts.pop()


def figures(results: dict[str, Any], out: Path, s: ArmsSettings) -> list[str]:
    """curves.png (FD-prism, else SWD, along the run against time and FLOPs, beside the floor
    at the curves' n), grid.png (one strip per arm's final model, the same seeds and labels),
    loss.png (each arm's training loss)."""
    rows = results["rows"]
    metric = (fd_key(rows[0]) if rows else None) or "swd_x1e3"
    floor = results["floors"].get(str(s.n_curve), {}).get(metric)
    curve_figure(results["curves"], metric, floor, out / "curves.png")
    grid = grid_figure(out, [r for r in rows if r["budget"] == "time"],
                       min(s.grid_images, s.n_images))
    loss_figure(results["references"], out / "loss.png")
    return ["curves.png", *grid, "loss.png"]


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
