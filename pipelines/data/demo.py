"""``prism data demo DEST``: a small real corpus built from scikit-image's bundled photographs.

No download: the photographs ship inside the scikit-image wheel (``skimage.data``). One class
per photograph; each sample is a random square crop (side ``min_crop`` to ``max_crop`` of the
shorter side, default 0.6 to 1, a deterministic function of the seed) resized with Lanczos
anti-aliasing to ``size`` and written as a PNG to ``DEST/<class>/<index>.png`` (a per-class
folder, the input layout of ingest).

The crops are large on purpose: each class then looks like its photograph, so a model trained for
the demo's CPU minute produces samples in which a person recognises the class (the astronaut's
orange suit, the rocket against a blue sky, the star field, the retina's disc).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from pipelines.config import DemoConfig

_log = logging.getLogger(__name__)

# (class name, skimage.data function): RGB photographs bundled with the wheel
PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
               "immunohistochemistry", "motorcycle_left", "retina")


def _photo(name: str) -> np.ndarray:
    img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle_left" \
        else getattr(skimage.data, name)()
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise RuntimeError(f"skimage.data.{name} is not an 8-bit RGB photograph")
    return img


def build_demo(dest: str | Path, cfg: DemoConfig | None = None,
               log: Callable[[str], None] = _log.info) -> int:
    """Write the demo corpus; returns the number of images written."""
    cfg = cfg or DemoConfig()
    dest = Path(dest)
    rng = np.random.default_rng(cfg.seed)
    n = 0
    for label, name in enumerate(PHOTOGRAPHS):
        photo = Image.fromarray(_photo(name))
        w, h = photo.size
        folder = dest / f"{label}_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(cfg.per_class):
            short = min(w, h)
            side = int(rng.integers(max(cfg.size, round(cfg.min_crop * short)),
                                    max(cfg.size, round(cfg.max_crop * short)) + 1))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = photo.crop((x, y, x + side, y + side)).resize(
                (cfg.size, cfg.size), Image.Resampling.LANCZOS)
            crop.save(folder / f"{i:05d}.png", format="PNG")
            n += 1
    log(f"demo corpus: {n} images, {len(PHOTOGRAPHS)} classes, {cfg.size}x{cfg.size} -> {dest}")
    return n
