"""The README's first command (``make demo`` = ``python -m pipelines.demo_run``) in a fresh
clone: the pipeline runs, the champion is served, one HTTP query is answered, the images and
the grid are written, the service is stopped, and the next steps are printed."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from e2e_clone import demo_clone  # tests/ is on sys.path (rootdir insertion)
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clone():
    c = demo_clone()
    assert c.returncode == 0, c.output[-6000:]
    return c


def test_a_served_query_is_answered_and_the_files_are_there(clone):
    out = clone.path / "outputs" / "demo"
    pngs = sorted((out / "images").glob("seed_*.png"))
    assert len(pngs) == 32  # 4 of each of the 8 classes
    assert Image.open(pngs[0]).size == (32, 32)
    meta = json.loads((out / "images" / "meta.json").read_text())
    assert meta["seeds"] == list(range(32))
    assert meta["model"] in ("prism-demo-v", "prism-demo-v-sd")
    grid = Image.open(out / "grid.png")
    assert grid.size[1] > 8 * 32 * 3  # a row of real and generated images per class
    summary = json.loads((out / "summary.json").read_text())
    assert summary["class_labels"] == [k for k in range(8) for _ in range(4)]
    reg = json.loads((clone.path / "outputs" / "register.json").read_text())
    assert summary["model"] == (reg["promoted"] or f"models:/{reg['versions'][reg['best']]}")
    assert meta["model"] == f"prism-{reg['best']}"


def test_the_champion_answers_to_its_class_and_guidance(clone):
    # the served images: each class's colour statistics differ from every other class's
    out = clone.path / "outputs" / "demo" / "images"
    x = np.stack([np.asarray(Image.open(out / f"seed_{i}.png"), dtype=np.float64) / 255
                  for i in range(32)]).reshape(8, 4, 32, 32, 3)
    colours = x.mean((2, 3))  # (class, image, rgb)
    between = np.linalg.norm(colours.mean(1)[:, None] - colours.mean(1)[None], axis=-1)
    within = np.linalg.norm(colours - colours.mean(1, keepdims=True), axis=-1).mean()
    assert between[~np.eye(8, dtype=bool)].min() > 0.5 * within, (between, within)
    # the champion loaded as the service loads it: same seeds, other class / guidance
    import torch

    from common.models import load_model
    from components.generate import generate

    reg = json.loads((clone.path / "outputs" / "register.json").read_text())
    model = load_model(clone.path / "outputs" / "train" / reg["best"] / "model")
    torch.manual_seed(0)
    seeds = [0, 1, 2, 3]
    a = generate(model, seeds=seeds, steps=16, class_labels=[0] * 4, cfg_scale=1.0)
    b = generate(model, seeds=seeds, steps=16, class_labels=[5] * 4, cfg_scale=1.0)
    c = generate(model, seeds=seeds, steps=16, class_labels=[0] * 4, cfg_scale=4.0)
    assert (a - b).abs().mean() > 0.05, "class 0 and class 5 gave the same images"
    assert (a - c).abs().mean() > 0.02, "classifier-free guidance changed nothing"


def test_progress_and_next_steps_are_printed(clone):
    steps = re.findall(r"==> \[\d\d:\d\d\] (\d)/4", clone.output)
    assert steps == ["1", "2", "3", "4"], clone.output[-3000:]
    for hint in ("mlflow ui --backend-store-uri sqlite:///mlflow.db", "dvc metrics show",
                 "outputs/demo/grid.png", "outputs/demo/images", "docs/guide/sharing.md"):
        assert hint in clone.output, hint
    for noise in ("To track the changes with git", "core.autostage"):  # DVC's git hints
        assert noise not in clone.output, noise
    assert (clone.path / "mlflow.db").is_file()


def test_the_service_is_stopped_and_nothing_is_left_running(clone):
    out = clone.path / "outputs" / "demo"
    assert not (out / "serve.pid").exists()
    assert "stopped" in clone.output
    log = (out / "serve.log").read_text(errors="replace")  # the service's output
    assert "stopping" in log, log[-3000:]
    for noise in ("ServeController.graceful_shutdown failed",
                  "Cannot deregister autoscaling state"):  # Ray's, benign
        assert noise not in log, log[-3000:]
    leftover = []  # every process the demo started inherits PYTHONPATH=<clone>
    marker = f"PYTHONPATH={clone.path}".encode()
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                environ = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
                cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in environ:
                leftover.append(f"{d}: {cmd}")
    assert not leftover, leftover


def test_a_second_run_reuses_the_cache(clone):
    again = clone.run(str(clone.path / ".venv" / "bin" / "python"), "-m", "pipelines.demo_run",
                      timeout_s=900)
    assert again.returncode == 0, again.stdout[-6000:]
    assert "Running stage" not in again.stdout
    assert len(list((clone.path / "outputs/demo/images").glob("seed_*.png"))) == 32
