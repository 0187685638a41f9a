"""What every experiment shares: settings, reference models, sampling, metrics, floors, output.

An experiment reproduces one claim of a seed paper with trained models. Its models are
*references*: a shipped training config plus overrides, trained by ``prism train`` in a
subprocess (several at once with ``parallel_training``, which fills a GPU that one small UNet
leaves idle) into ``<work_dir>/references/<label>-<hash>``. The hash covers the resolved
training config, so a second experiment (or a re-run) that asks for the same model reuses it,
and a run cut off mid-training resumes from its last checkpoint when it is started again.

Samples are drawn at fixed seeds (image i has seed ``seed + i`` in every setting, so two
settings' images are paired), quantised to 8 bits like any saved image, kept as ``.npy`` under
``samples/`` and measured with the metrics of ``prism eval`` against real images. Each number
sits beside its real-vs-real floor at the same image count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from common.progress import progress_bar
from common.run_config import load_config
from components.generate import generate
from pipelines.evaluation.data import load_images
from pipelines.evaluation.feature_net import FeatureNetRecipe, run_feature_net_stage
from pipelines.evaluation.metrics import (
    FeatureSpace,
    MetricSettings,
    compute_metrics,
    feature_spaces,
    summary_row,
)

ROOT = Path(__file__).resolve().parents[2]
Log = Callable[[str], None]
_log = logging.getLogger("pipelines.experiments")
status: Log = _log.info  # where the experiments' status lines go unless a caller takes them


class ReferenceSpec(BaseModel):
    """A model an experiment needs: a training config and its overrides (``--set`` pairs)."""

    model_config = ConfigDict(extra="forbid")

    config: str  # a path, or NAME for training/configs/NAME.yaml
    sets: list[str] = Field(default_factory=list)


class ExperimentSettings(BaseModel):
    """Settings every experiment has. Subclasses add their own; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    work_dir: str = "outputs/experiments"  # <work_dir>/references and <work_dir>/<experiment>
    device: str = Field("auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$")
    seed: int = Field(0, ge=0)
    batch_size: int = Field(500, ge=1)  # images per sampling call
    mlflow: bool = True  # log the run (and the references' training) to MLflow
    parallel_training: bool = False  # train the references at the same time
    # False: an evaluation-only run; a reference not trained with these exact settings is an
    # error (naming the settings that differ from the trained ones), never a new training
    train_missing: bool = True
    metrics: MetricSettings = Field(default_factory=MetricSettings)

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def config_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        return p
    return ROOT / "training" / "configs" / f"{name}.yaml"


def reference_hash(spec: ReferenceSpec) -> str:
    """Eight hex digits of the resolved training config (what the weights depend on)."""
    cfg = load_config(config_path(spec.config), spec.sets).model_dump(mode="json")
    # not what the weights depend on; compile_scope and sync_debug, settings newer than the
    # recorded references, are left out so that their hashes stay
    for section, key in (("run", "output_dir"), ("run", "name"), ("run", "project"),
                         ("run", "compile_scope"), ("run", "sync_debug"),
                         ("tracking", "enabled"), ("tracking", "uri"),
                         ("tracking", "register_name"), ("data", "num_workers")):
        cfg.get(section, {}).pop(key, None)
    if not cfg["checkpoint"].get("snapshot_seconds"):  # newer than the recorded references
        cfg["checkpoint"].pop("snapshot_seconds", None)
    if cfg["run"].get("cuda_graphs") == "off":  # likewise
        cfg["run"].pop("cuda_graphs")
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


def train_references(specs: dict[str, ReferenceSpec], s: ExperimentSettings, project: str,
                     log: Log = status) -> dict[str, dict[str, Any]]:
    """Train (or reuse) each reference with ``prism train``; label -> {model_dir, run, ...}.

    A reference whose ``model/`` exists is reused; one whose run stopped early resumes from its
    checkpoint. With ``s.parallel_training`` all missing references train at once. With
    ``s.train_missing`` off nothing trains: a missing reference raises at once, before any GPU
    time is spent on a training the caller did not mean (a setting that differs from the train
    stage's, e.g. its ``time_limit_s``, changes the reference's hash).
    """
    ref_root = Path(s.work_dir) / "references"
    ref_root.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, list[str], Path]] = []
    for label, spec in specs.items():
        name = f"{label}-{reference_hash(spec)}"
        run_dir = ref_root / name
        out[label] = {"name": name, "config": spec.config, "sets": spec.sets,
                      "run_dir": str(run_dir), "model_dir": str(run_dir / "model")}
        if (run_dir / "model" / "config.json").exists():
            log(f"reference {label}: reusing {run_dir / 'model'}")
            continue
        if not s.train_missing:
            todo.append((label, [], run_dir))
            continue
        cmd = [sys.executable, "-m", "prism_cli", "train", str(config_path(spec.config)),
               "--set", f"run.output_dir={ref_root}", "--set", f"run.name={name}",
               "--set", f"run.project={project}", "--set", "checkpoint.resume=true",
               *[a for kv in spec.sets for a in ("--set", kv)]]
        if not s.mlflow:
            cmd += ["--set", "tracking.enabled=false"]
        todo.append((label, cmd, run_dir))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / SPEC_FILE).write_text(json.dumps(
            {"label": label, "config": spec.config, "sets": spec.sets}, indent=1))
    if todo and not s.train_missing:
        raise FileNotFoundError("train_missing is off and these references are not trained:\n"
                                + "\n".join(_missing(label, specs[label], run_dir)
                                            for label, _, run_dir in todo))
    if todo:
        _run_trainings(todo, s.parallel_training, log)
    for info in out.values():
        metrics = Path(info["run_dir"]) / "metrics.jsonl"
        info["training"] = training_summary(metrics) if metrics.exists() else {}
    return out


SPEC_FILE = "reference.json"  # in a reference's run directory: its label, config and sets


def _missing(label: str, spec: ReferenceSpec, run_dir: Path) -> str:
    """One missing reference, with how each trained one of its label differs in its sets."""
    lines = [f"- {label}: {run_dir} ("
             + ("stopped before its model was exported)" if run_dir.exists() else "absent)")]
    for other in sorted(run_dir.parent.glob(f"{label}-*/{SPEC_FILE}")):
        theirs = json.loads(other.read_text())
        if theirs.get("label") != label or other.parent == run_dir:
            continue
        trained = (other.parent / "model" / "config.json").exists()
        only_here = [kv for kv in spec.sets if kv not in theirs["sets"]]
        only_there = [kv for kv in theirs["sets"] if kv not in spec.sets]
        lines.append(f"  {other.parent.name} ({'trained' if trained else 'not finished'}, "
                     f"config {theirs['config']}): here {only_here or '-'}, "
                     f"there {only_there or '-'}")
    return "\n".join(lines)


def _run_trainings(todo: list[tuple[str, list[str], Path]], parallel: bool, log: Log) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
    procs = []
    for label, cmd, run_dir in todo:
        run_dir.mkdir(parents=True, exist_ok=True)
        log_file = run_dir.with_suffix(".log")
        log(f"reference {label}: training -> {run_dir} (log {log_file})")
        fh = open(log_file, "a")  # noqa: SIM115 (closed below)
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        procs.append((label, p, fh, log_file))
        if not parallel:
            p.wait()
    failed = []
    for label, p, fh, log_file in procs:
        p.wait()
        fh.close()
        if p.returncode:
            tail = log_file.read_text(errors="replace").splitlines()[-15:]
            failed.append(f"{label} (exit {p.returncode}, {log_file}):\n  " + "\n  ".join(tail))
    if failed:
        raise RuntimeError("reference training failed: " + "\n".join(failed))


def training_summary(metrics_jsonl: Path) -> dict[str, Any]:
    """Images seen, steps, wall time, throughput and the loss at the end of a run."""
    recs = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "loss" in r]
    if not recs:
        return {}
    last = recs[-1]
    tail = recs[-max(1, len(recs) // 10):]
    return {"steps": last.get("step"), "images_seen": last.get("images_seen"),
            "loss_last_10pct": float(np.mean([r["loss"] for r in tail])),
            "images_per_second_median": float(np.median(
                [r["images_per_second"] for r in recs if r.get("images_per_second")] or [0])),
            "loss_curve": [(r.get("images_seen"), r["loss"]) for r in recs[:: max(1, len(recs)
                                                                              // 200)]]}


def sample_uint8(model: Any, seeds: list[int], *, device: str, batch_size: int,
                 class_labels: list[int] | None = None, desc: str = "sample",
                 **generate_kw: Any) -> torch.Tensor:
    """``generate`` over ``seeds`` (and their ``class_labels``) in batches -> (N, C, H, W) uint8
    on the CPU (bf16 autocast of the network on CUDA); ``desc`` names its progress bar."""
    chunks = []
    with progress_bar(len(seeds), desc, "img", log=_log) as bar:
        for i in range(0, len(seeds), batch_size):
            labels = None if class_labels is None else class_labels[i:i + batch_size]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                x = generate(model, seeds=seeds[i:i + batch_size], device=device,
                             class_labels=labels, **generate_kw)
            chunks.append(quantise(x))
            bar.update(len(x))
    return torch.cat(chunks)


def quantise(images: torch.Tensor) -> torch.Tensor:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, C, H, W) on the CPU (what a saved PNG holds)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def measure(generated: torch.Tensor, real: torch.Tensor, spaces: list[FeatureSpace],
            settings: MetricSettings, device: str, real_key: str | None = "real"
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """compute_metrics of uint8 ``generated`` against float ``real``: (summary row, details).

    ``real_key`` names the cache of the real features in ``spaces``: one key per real set
    (``None`` for a set measured once, such as a floor's half).
    """
    m = compute_metrics(as_float(generated).to(device), real.to(device), settings=settings,
                        spaces=spaces, real_key=real_key)
    return summary_row(m), m


def feature_space(path: str | None, device: str) -> list[FeatureSpace]:
    return feature_spaces(path, None, device)[0] if path else []


def ensure_feature_net(train_src: str, test_src: str | None, s: ExperimentSettings,
                       recipe: dict[str, Any], log: Log = status) -> str:
    """The in-house feature network for FD-prism on ``train_src``, trained once per recipe and
    data into ``<work_dir>/references/feature-net-<hash>/`` (``prism eval feature-net``'s
    stage); returns the weights' path."""
    r = FeatureNetRecipe(**recipe)
    key = hashlib.sha256(json.dumps([train_src, test_src, r.model_dump()], sort_keys=True)
                         .encode()).hexdigest()[:8]
    d = Path(s.work_dir) / "references" / f"feature-net-{key}"
    path = d / "feature_net.safetensors"
    if not path.exists():
        log(f"feature network: training on {train_src} -> {d}")
        run_feature_net_stage(train_src, test_src, d, r, device=s.resolved_device(), log=log)
    return str(path)


def real_images(src: str, n: int | None, seed: int, resolution: int | None = None,
                class_names: list[str] | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """A seeded random subset of ``n`` images of ``src`` (all when n is None or larger):
    float (N, C, H, W) in [-1, 1] and their labels."""
    s = load_images(src, resolution=resolution, class_names=class_names)
    if n is not None and n < len(s):
        g = torch.Generator().manual_seed(seed)
        s = s.subset(torch.randperm(len(s), generator=g)[:n].sort().values.numpy())
    return s.as_float(), s.labels


def real_floors(floor_src: str, real_src: str, real: torch.Tensor, sizes: list[int],
                spaces: list[FeatureSpace], metrics: MetricSettings, seed: int, device: str
                ) -> dict[str, Any]:
    """The metrics' real-vs-real floors at each n: ``floor_src`` images against the real set
    ``real``; when both are one set, two disjoint random halves of it."""
    settings = MetricSettings(**{**metrics.model_dump(), "bootstrap": 0})
    out = {}
    for n in sizes:
        if floor_src == real_src:
            idx = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed + 1))
            a, b = real[idx[: len(idx) // 2]][:n], real[idx[len(idx) // 2:]]
            what = f"two disjoint halves of {real_src}"
        else:
            a, _ = real_images(floor_src, n, seed + 1, resolution=real.shape[-1])
            b, what = real, f"{floor_src} against {real_src}"
        row, _ = measure(quantise(a), b, spaces, settings, device, real_key=None)
        out[str(n)] = {"n": int(a.shape[0]), "n_real": int(b.shape[0]), "what": what, **row}
    return out


def environment() -> dict[str, Any]:
    """Where and when: date, commit, machine, torch, device name."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=ROOT, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit,
            "dirty": dirty, "host": platform.node(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "command": " ".join(sys.argv)}


def save_samples(out_dir: Path, tag: str, images: torch.Tensor, seconds: float = 0.0,
                 settings: dict[str, Any] | None = None) -> str:
    """``samples/<tag>.npy`` (uint8 N, C, H, W) and ``samples/<tag>.json`` (the sampling
    seconds and the ``settings`` they were made with); returns the .npy path relative to
    out_dir."""
    p = out_dir / "samples" / f"{tag}.npy"
    p.parent.mkdir(parents=True, exist_ok=True)
    np.save(p, images.numpy())
    meta = {"n": len(images), "seconds": seconds, **({"settings": settings} if settings else {})}
    p.with_suffix(".json").write_text(json.dumps(meta))
    return str(p.relative_to(out_dir))


def saved_samples(out_dir: Path, tag: str, n: int, prefix: bool = False,
                  settings: dict[str, Any] | None = None) -> tuple[torch.Tensor, float] | None:
    """(images, sampling seconds) saved by :func:`save_samples` with ``n`` images, else None;
    with ``prefix`` the first ``n`` of a larger saved set (and its seconds pro rata), for
    samples whose seeds run on from one start, so a smaller set is a prefix of a larger one.
    Samples saved with other ``settings`` raise: they may have been made where the weights
    are, so they are never silently replaced.

    Samples come from fixed seeds, so a re-run of an interrupted experiment into the same
    ``out_dir`` reuses them instead of sampling again."""
    p = out_dir / "samples" / f"{tag}.npy"
    meta = p.with_suffix(".json")
    if not (p.exists() and meta.exists()):
        return None
    info = json.loads(meta.read_text())
    if settings is not None and info.get("settings", settings) != settings:
        theirs = info["settings"]
        diff = {k: (theirs.get(k), settings.get(k)) for k in {*theirs, *settings}
                if theirs.get(k) != settings.get(k)}
        raise ValueError(f"{p} was sampled with other settings (saved, asked): {diff}; "
                         "remove it to sample again")
    have = info.get("n")
    if have != n and not (prefix and isinstance(have, int) and have > n):
        return None
    return (torch.from_numpy(np.load(p, mmap_mode="r")[:n].copy()),
            float(info["seconds"]) * n / have)


def slim(details: dict[str, Any]) -> dict[str, Any]:
    """Drop bulky lists (bootstrap replicates, per-frequency profiles) from metric details."""
    d = json.loads(json.dumps(details, default=float))
    for v in d.get("intervals", {}).get("metrics", {}).values():
        v.pop("replicates", None)
    for k in ("profile_real", "profile_generated", "per_frequency"):
        d.get("spectral", {}).pop(k, None)
    return d


def paired_difference(a: dict[str, Any], b: dict[str, Any], metric: str) -> dict[str, Any]:
    """Paired bootstrap difference b - a of ``metric`` (replicates drawn on the same rows:
    same n, seed and resamples), with its standard error."""
    ra = a["intervals"]["metrics"][metric]
    rb = b["intervals"]["metrics"][metric]
    diffs = np.array(rb["replicates"]) - np.array(ra["replicates"])
    est = rb["estimate"] - ra["estimate"]
    se = float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0
    return {"metric": metric, "difference": est, "se": se, "lo": est - 1.96 * se,
            "hi": est + 1.96 * se, "relative": est / ra["estimate"] if ra["estimate"] else None}


def fd_key(row: dict[str, Any]) -> str | None:
    """The FD-prism column of a summary row (its name carries the network's hash)."""
    return next((k for k in row if k.startswith("FD-prism")), None)


def log_to_mlflow(experiment: str, out_dir: Path, results: dict[str, Any],
                  log: Log = status) -> str | None:
    """One MLflow run in experiment ``experiment``: the settings as parameters, every numeric
    cell of the result rows as ``<tag>/<column>`` metrics, the output folder as artifacts."""
    try:
        # deferred: mlflow (~1 s to import; also through common.registry) is optional here
        import mlflow
    except ImportError:
        log("mlflow is not installed: the run is not logged (prism experiment log DIR later)")
        return None
    from common.registry import mark_model_development

    mark_model_development(mlflow.set_experiment(experiment))
    with mlflow.start_run(run_name=f"{results['setting']}-{results['environment']['commit']}") \
            as run:
        flat = _flatten(results["settings"])
        mlflow.log_params({k: str(v)[:500] for k, v in list(flat.items())[:200]})
        for row in results.get("rows", []):
            tag = row.get("tag", "row")
            mlflow.log_metrics({f"{tag}/{k}".replace("-", "_"): float(v) for k, v in row.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.set_tags({"prism.experiment": experiment, "prism.setting": results["setting"],
                         "prism.verdict": str(results.get("verdict", {}).get("verdict"))})
        mlflow.log_artifacts(str(out_dir), artifact_path="results")
        return run.info.run_id


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Timer:
    """Wall time of named phases, in seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> _Phase:
        return _Phase(self, name)


class _Phase:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.seconds[self.name] = self.timer.seconds.get(self.name, 0.0) + (
            time.perf_counter() - self.t0)
