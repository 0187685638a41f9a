"""The loop's small logging interface. The loop calls every callback on every rank; a callback
that should act once (MLflow, console) checks ``info["rank"]`` in ``on_start``.

Events: ``on_start(cfg, info)``; ``on_step(step, images_seen)`` after every optimizer step;
``on_metrics(step, metrics)``; ``on_images(step, name, image)`` with image uint8 (H, W, 3);
``on_checkpoint(step, path, metrics)`` with ``path`` the checkpoint written on rank 0 (None on
other ranks); ``on_end(result, model_dir)``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.progress import ProgressBar, progress_bar
from common.run_config import Config

_log = logging.getLogger(__name__)


class Callback:
    """No-op base: override what you need."""

    def on_start(self, cfg: Config, info: dict[str, Any]) -> None: ...

    def on_step(self, step: int, images_seen: int) -> None: ...

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_images(self, step: int, name: str, image: np.ndarray) -> None: ...

    def on_checkpoint(self, step: int, path: Path | None, metrics: dict[str, float]) -> None: ...

    def on_end(self, result: dict[str, Any], model_dir: Path | None) -> None: ...


class Callbacks(Callback):
    """Fan an event out to several callbacks."""

    def __init__(self, items: list[Callback] | tuple[Callback, ...] = ()) -> None:
        self.items = list(items)

    def on_start(self, cfg: Config, info: dict[str, Any]) -> None:
        for c in self.items:
            c.on_start(cfg, info)

    def on_step(self, step: int, images_seen: int) -> None:
        for c in self.items:
            c.on_step(step, images_seen)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for c in self.items:
            c.on_metrics(step, metrics)

    def on_images(self, step: int, name: str, image: np.ndarray) -> None:
        for c in self.items:
            c.on_images(step, name, image)

    def on_checkpoint(self, step: int, path: Path | None, metrics: dict[str, float]) -> None:
        for c in self.items:
            c.on_checkpoint(step, path, metrics)

    def on_end(self, result: dict[str, Any], model_dir: Path | None) -> None:
        for c in self.items:
            c.on_end(result, model_dir)


class JsonlLogger(Callback):
    """Rank 0 appends every metrics record to ``<run dir>/metrics.jsonl`` and saves sample
    grids as PNG next to it (the loss curve survives without MLflow)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.active = False

    def on_start(self, cfg: Config, info: dict[str, Any]) -> None:
        self.active = info["rank"] == 0
        if self.active:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._truncate(int(info.get("start_step") or 0))

    def _truncate(self, start_step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their earlier records so
        that every step appears once (a fresh start keeps nothing)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.active:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def on_images(self, step: int, name: str, image: np.ndarray) -> None:
        if self.active:
            (self.run_dir / "samples").mkdir(exist_ok=True)
            Image.fromarray(image).save(self.run_dir / "samples" / f"{name}-{step:08d}.png")


class ConsoleLogger(Callback):
    """Rank 0 logs one line per metrics record and, on a terminal, draws a bar of the images
    seen toward ``train.total_images`` (rate, ETA; the time left under ``train.time_limit_s``).
    The lines go through logging, which writes them above the bar."""

    def __init__(self) -> None:
        self.active = False
        self.bar: ProgressBar | None = None
        self.time_limit_s: float | None = None

    def on_start(self, cfg: Config, info: dict[str, Any]) -> None:
        self.active = info["rank"] == 0
        if not self.active:
            return
        _log.info(f"[train] {cfg.run.name}: {info['parameters'] / 1e6:.2f}M parameters, "
                  f"{info['total_steps']} steps, world {info['world']}, device {info['device']}"
                  + (f", resumed at step {info['start_step']}" if info["start_step"] else "")
                  + (f" ({info['data_note']})" if info.get("data_note") else ""))
        self.time_limit_s = cfg.train.time_limit_s
        self.bar = progress_bar(info["total_steps"] * cfg.train.batch_size, "train", "img",
                                initial=info["start_step"] * cfg.train.batch_size, log=_log,
                                log_every_s=None)  # the metrics lines say it in a log

    def on_step(self, step: int, images_seen: int) -> None:
        if self.bar is not None:
            self.bar.update(images_seen - self.bar.n)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        body = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        _log.info(f"[train] step {step}  {body}")
        if self.bar is not None:
            extra = {"loss": f"{metrics['loss']:.4g}"}
            if self.time_limit_s:
                left = max(self.time_limit_s - metrics.get("train_seconds", 0.0), 0.0)
                extra["limit_left_s"] = f"{left:.0f}"
            self.bar.set_postfix(**extra)

    def on_end(self, result: dict[str, Any], model_dir: Path | None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
