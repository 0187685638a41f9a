"""Equal-compute comparisons of training recipes: arms, snapshots, curves and accounting.

An *arm* is a reference model (a shipped training config plus overrides) trained under a
budget that every arm of the experiment shares: the same training seconds (``time_limit_s``,
the loop's clock: the steps, without compilation or exports) and EMA snapshots at the same
training-FLOP marks (``checkpoint.snapshot_flops``, FLOPs per image measured by each run at
its first step). So every arm has a model at equal GPU time (its final export) and models at
equal training FLOPs (its snapshots at the shared marks), and the curves of quality against
training time and FLOPs come from the same snapshots.

What a comparison rests on is read back from what each run recorded, never from constants
(``arm_records``). Samples are kept per model (``<arm>@<images seen>``, the seeds from the
experiment's seed on), so a row and a curve point of one model share them, and an arm
sampled where it trained is measured anywhere else from its records and samples
(``arm_records.sample_arms``). Figures: ``arm_figures``.

The procedure every such experiment follows (data, training, accounting, sampling, floors,
rows, curves, paired differences, figures) is :func:`run`; an experiment supplies its
:class:`Design` (arms, marks, sampling options, comparisons, rule) and :class:`ArmsSettings`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator

from common.models import load_model
from pipelines.config import DemoConfig, IngestConfig
from pipelines.data.demo import build_demo
from pipelines.data.ingest import ingest
from pipelines.evaluation.metrics import FeatureSpace, MetricSettings
from pipelines.experiments.arm_figures import figures
from pipelines.experiments.arm_records import (
    accounting,
    arm_sets,
    at_mark,
    check_portable,
    chips,
    common_mark,
    model_key,
    progress,
    sample_arms,
    snapshots,
)
from pipelines.experiments.common import (
    ExperimentSettings,
    Log,
    ReferenceSpec,
    Timer,
    ensure_feature_net,
    environment,
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
    of ``s.<marks_field>`` that the first pair both reached, counted as ``mark_key`` in their
    run records (``train_flops`` or ``images_seen``); the rows there are
    ``<arm>@<mark_budget>``, and the results name the mark under ``mark_field``; a pair that
    did not both reach it meets at its own largest common mark (:func:`evaluate_arms`).
    ``pairs``: the (a, b) arms whose paired differences b - a are computed at both budgets,
    the first the rule's;
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
    ``s.stop_after_sampling`` end it early (:func:`arm_records.sample_arms`)."""
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

    rows, details, curves, mark, meet = evaluate_arms(
        refs, getattr(s, d.marks_field), d.mark_key, d.mark_budget, evaluate, s.n_images,
        s.n_curve, d.pairs)
    comparisons = paired(details, meet)
    results = {
        **head, "feature_net": fnet, "real_data": real_src, "n_real": len(real),
        "floors": floors, d.mark_field: mark, "rows": rows, "curves": curves,
        "comparisons": comparisons, "verdict": d.verdict(comparisons, rows, chips(refs)),
        "details": {k: slim(v) for k, v in details.items()},
        "environment": environment(), "seconds": timer.seconds}
    results["figures"] = figures(results, out, s.n_curve, min(s.grid_images, s.n_images))
    return results


def _num_classes(refs: dict[str, dict[str, Any]]) -> int:
    counts = {json.loads((Path(r["model_dir"]) / "config.json").read_text())["num_classes"]
              for r in refs.values()}
    if len(counts) != 1:
        raise ValueError(f"the arms disagree on the number of classes: {sorted(counts)}")
    return counts.pop()


def evaluate_arms(refs: dict[str, dict[str, Any]], marks: list[float], key: str,
                  budget_name: str, evaluate: Any, n_rows: int, n_curve: int,
                  pairs: Sequence[tuple[str, str]] = ()
                  ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, list], Any,
                             list[tuple[str, str, str]]]:
    """Rows, metric details, curves, the main mark and where each pair meets.

    ``evaluate(arm, samples, model_dir, n, intervals) -> (row, details)`` samples (or reuses
    the samples named ``samples``) and measures one model, with bootstrap intervals for the
    rows (their paired differences need them) and without for the curves' points. Rows:
    ``<arm>@time`` (final model) and ``<arm>@<budget_name>``, the snapshot at the main mark:
    the largest mark of ``key`` that both arms of the first pair reached (the rule's pair;
    every arm when no pair is given), for every arm that reached it. A pair that did not both
    reach the main mark meets at the largest mark it did reach, in rows
    ``<arm>@<budget_name> (<mark>)``: an arm that stopped early leaves the others' equal-compute
    rows where they were. At equal time a pair meets at its final models when both ran to the
    same ``train.time_limit_s``; otherwise at the shorter run's end, against the longer run's
    snapshot at that many seconds (its ``checkpoint.snapshot_seconds`` must hold the shorter
    limit), in a row ``<arm>@time (<mark> s)``; without it the pair has no equal-time
    comparison. Returns ``meet``: the
    (row a, row b, budget) of each pair's comparisons. Curves: every snapshot on the first
    ``n_curve`` of its samples.
    """
    snaps = {a: snapshots(r["run_dir"]) for a, r in refs.items()}
    pairs = [(a, b) for a, b in pairs if a in refs and b in refs]
    first = {a: snaps[a] for a in pairs[0]} if pairs else snaps
    mark = common_mark(first, marks, key)
    picked = [(a, "time", None, snaps[a][-1]) for a in refs]
    if mark is not None:
        picked += [(a, budget_name, mark, snap) for a in refs
                   if (snap := at_mark(snaps[a], mark, key))]
    meet: list[tuple[str, str, str]] = []
    for a, b in pairs:
        labels = _equal_time(snaps, a, b)
        if labels is not None:
            have = {(arm, lab) for arm, lab, _, _ in picked}
            picked += [(arm, lab, m, snap) for arm, (lab, m, snap) in labels.items()
                       if (arm, lab) not in have]
            meet.append((f"{a}@{labels[a][0]}", f"{b}@{labels[b][0]}", "time"))
        m = common_mark({a: snaps[a], b: snaps[b]}, marks, key)
        if m is None:
            continue
        label = budget_name if m == mark else f"{budget_name} ({mark_label(m)})"
        have = {(arm, lab) for arm, lab, _, _ in picked}
        picked += [(arm, label, m, at_mark(snaps[arm], m, key)) for arm in (a, b)
                   if (arm, label) not in have]
        meet.append((f"{a}@{label}", f"{b}@{label}", label))
    rows, details = [], {}
    for a, budget, m, snap in picked:
        tag, samples = f"{a}@{budget}", model_key(a, snap)
        row, details[tag] = evaluate(a, samples, snap["dir"], n_rows, True)
        rows.append({"tag": tag, "arm": a, "budget": budget, "samples": samples,
                     **({"mark": m} if m is not None else {}), **progress(snap), **row})
    curves: dict[str, list[dict[str, Any]]] = {}
    for a in refs:
        curves[a] = []
        for snap in snaps[a]:
            tag = model_key(a, snap)
            row, _ = evaluate(a, tag, snap["dir"], n_curve, False)
            curves[a].append({"tag": tag, **progress(snap), **row})
    return rows, details, curves, mark, meet


def _equal_time(snaps: dict[str, list[dict[str, Any]]], a: str, b: str
                ) -> dict[str, tuple[str, float | None, dict[str, Any]]] | None:
    """Where arms a and b meet at equal time: arm -> (row budget, time mark or None for the
    final model, the model), or None where they cannot (see :func:`evaluate_arms`)."""
    train = {x: _training(snaps[x][-1]) for x in (a, b)}
    limit = {x: train[x].get("train", {}).get("time_limit_s") for x in (a, b)}
    if limit[a] == limit[b]:  # the same budget (or runs too old to say: as before)
        return {x: ("time", None, snaps[x][-1]) for x in (a, b)}
    if None in limit.values():
        return None
    short, long_ = sorted((a, b), key=lambda x: limit[x])
    t = limit[short]
    snap = at_mark(snaps[long_], t, "train_seconds")
    if t not in train[long_].get("checkpoint", {}).get("snapshot_seconds", []) or snap is None:
        return None
    return {short: ("time", None, snaps[short][-1]), long_: (f"time ({t:g} s)", t, snap)}


def _training(final: dict[str, Any]) -> dict[str, Any]:
    """The run's training config, from its final model (empty where it kept none)."""
    p = Path(final["dir"]) / "config.json"
    return json.loads(p.read_text()).get("training", {}) if p.exists() else {}


def mark_label(m: float) -> str:
    """A mark as a row names it: counts with separators, FLOP-sized ones as 1.25e16."""
    if m >= 1e9:
        mant, exp = f"{m:.3g}".split("e")
        return f"{mant}e{int(exp)}"
    return f"{int(m):,}"


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
