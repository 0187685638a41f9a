"""The README's first command (``make demo`` = ``python -m pipelines.demo_run``) in a fresh
clone: the pipeline runs, the champion is served, one HTTP query is answered, the images and
the grid are written, the service is stopped, and the next steps are printed."""

from __future__ import annotations

import json
import os
import re

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
    assert len(pngs) == 16
    assert Image.open(pngs[0]).size == (32, 32)
    meta = json.loads((out / "images" / "meta.json").read_text())
    assert meta["seeds"] == list(range(16))
    assert meta["model"] in ("prism-demo-v", "prism-demo-v-sd")
    grid = Image.open(out / "grid.png")
    assert grid.size == (4 * 32 * 4, 4 * 32 * 4)
    summary = json.loads((out / "summary.json").read_text())
    reg = json.loads((clone.path / "outputs" / "register.json").read_text())
    assert summary["model"] == (reg["promoted"] or f"models:/{reg['versions'][reg['best']]}")
    assert meta["model"] == f"prism-{reg['best']}"


def test_progress_and_next_steps_are_printed(clone):
    steps = re.findall(r"==> \[\d\d:\d\d\] (\d)/4", clone.output)
    assert steps == ["1", "2", "3", "4"], clone.output[-3000:]
    for hint in ("mlflow ui --backend-store-uri sqlite:///mlflow.db", "dvc metrics show",
                 "outputs/demo/grid.png", "outputs/demo/images"):
        assert hint in clone.output, hint
    assert (clone.path / "mlflow.db").is_file()


def test_the_service_is_stopped_and_nothing_is_left_running(clone):
    out = clone.path / "outputs" / "demo"
    assert not (out / "serve.pid").exists()
    assert "stopped" in clone.output
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
    assert len(list((clone.path / "outputs/demo/images").glob("seed_*.png"))) == 16
