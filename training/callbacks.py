"""The loop's small logging interface. The loop calls every callback on every rank; a callback
that should act once (MLflow, console) checks ``info["rank"]`` in ``on_start``.

Events: ``on_start(cfg, info)``; ``on_metrics(step, metrics)``; ``on_images(step, name,
image)`` with image uint8 (H, W, 3); ``on_checkpoint(step, path, metrics)`` with ``path`` the
checkpoint written on rank 0 (None on other ranks); ``on_end(result, model_dir)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.run_config import Config


class Callback:
    """No-op base: override what you need."""

    def on_start(self, cfg: Config, info: dict[str, Any]) -> None: ...

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
    """Rank 0 prints one line per metrics record."""

    def __init__(self) -> None:
        self.active = False

    def on_start(self, cfg: Config, info: dict[str, Any]) -> None:
        self.active = info["rank"] == 0
        if self.active:
            print(f"[train] {cfg.run.name}: {info['parameters'] / 1e6:.2f}M parameters, "
                  f"{info['total_steps']} steps, world {info['world']}, device {info['device']}"
                  + (f", resumed at step {info['start_step']}" if info["start_step"] else "")
                  + (f" ({info['data_note']})" if info.get("data_note") else ""),
                  file=sys.stderr, flush=True)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.active:
            body = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"[train] step {step}  {body}", file=sys.stderr, flush=True)
