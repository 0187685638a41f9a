"""Two launchers, one loop: in this process (or one process of ``torchrun``), or on Ray Train.

* :func:`run_local`: checkpoints in ``<output_dir>/<name>/checkpoints``; the same run name
  resumes from the latest one.
* :func:`run_ray`: ``TorchTrainer`` with N workers (CPU or GPU), locally or on the cluster at
  ``RAY_ADDRESS``; checkpoints are Ray Train checkpoints under ``storage_path/<name>`` (a local
  path or ``s3://``), the last K kept; ``FailureConfig(max_failures)`` replaces a dead worker
  and the run continues from the last checkpoint; the same name resumes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from common.progress import configured_level, ensure_logging
from common.ray_local import init_ray
from common.run_config import Config, config_from_dict
from training.callbacks import Callback, ConsoleLogger, JsonlLogger
from training.checkpoint import latest_checkpoint
from training.loop import train


def _tracking(cfg: Config) -> list[Callback]:
    if not cfg.tracking.enabled:
        return []
    # deferred: mlflow (~1 s, through training.tracking) and ray (~1 s with ray.train) only
    # for tracked runs and Ray runs; a local untracked run (tests, benchmarks) needs neither
    from training.tracking import MLflowLogger

    return [MLflowLogger()]


def run_local(cfg: Config, extra_callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Train in this process (rank from torchrun's environment if set); resume by name."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    resume = latest_checkpoint(run_dir / "checkpoints") if cfg.checkpoint.resume else None
    callbacks = [ConsoleLogger(), JsonlLogger(run_dir), *_tracking(cfg), *(extra_callbacks or [])]
    return train(cfg, callbacks, resume_from=resume, run_dir=run_dir)


# --------------------------------------------------------------------------- Ray Train


class RayReporter(Callback):
    """Hands every checkpoint to Ray Train (``ray.train.report`` on every rank: a barrier)."""

    def on_checkpoint(self, step: int, path: Path | None, metrics: dict[str, float]) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report({**metrics, "step": step}, checkpoint=ckpt)


def ray_worker(config: dict[str, Any]) -> None:
    """The per-worker function of the TorchTrainer: the same loop, Ray's checkpoints."""
    import ray.train

    ensure_logging(config.get("log_level", logging.INFO))  # the driver's --quiet / --verbose
    cfg = config_from_dict(config["cfg"], "<ray worker>")
    run_dir = Path(config["run_dir"])
    rank = ray.train.get_context().get_world_rank()
    ckpt = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="prism-ckpt-") as scratch:
        resume = None
        if ckpt is not None:
            resume = ckpt.to_directory(str(Path(scratch) / "resume"))
        start = json.loads((Path(resume) / "state.json").read_text())["step"] if resume else 0
        (run_dir / "workers").mkdir(parents=True, exist_ok=True)
        (run_dir / "workers" / f"rank-{rank}.json").write_text(
            json.dumps({"pid": os.getpid(), "start_step": start}))
        callbacks = [ConsoleLogger(), JsonlLogger(run_dir), *_tracking(cfg), RayReporter()]
        train(cfg, callbacks, resume_from=resume, checkpoint_dir=Path(scratch) / "ckpt",
              run_dir=run_dir)


def run_ray(cfg: Config, workers: int, use_gpu: bool = False, storage_path: str | None = None,
            max_failures: int = 3) -> dict[str, Any]:
    """Train on Ray Train; returns the last metrics reported by rank 0 plus the checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from training.tracking import tracking_uri

    init_ray(configure_logging=False)
    out = Path(cfg.run.output_dir).resolve()
    raw = cfg.model_dump(mode="json")
    raw["run"]["output_dir"] = str(out)
    uri = tracking_uri(cfg)
    if cfg.tracking.enabled and uri.startswith("sqlite:"):
        # workers run in other directories: pin the absolute path of a local SQLite store. A
        # server URI stays out of the config (it may hold credentials, and the config is
        # logged and saved): workers read $MLFLOW_TRACKING_URI, which a local Ray inherits
        # from this process and a cluster gets from the job's runtime_env.
        raw["tracking"]["uri"] = uri
    storage = storage_path or str(out / "ray")
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={"cfg": raw, "run_dir": str(out / cfg.run.name),
                           "log_level": configured_level()},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=None if use_gpu
                                               else {"CPU": 1}),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
        ),
    )
    result = trainer.fit()
    return {**(result.metrics or {}),
            "checkpoint": None if result.checkpoint is None else result.checkpoint.path,
            "model_dir": str(out / cfg.run.name / "model")}
