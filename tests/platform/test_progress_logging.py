"""Progress bars and log output: a bar only on a terminal, status lines through logging that
``--quiet`` / ``--verbose`` set, results on stdout whatever the level."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.progress import ConsoleHandler, level_of, progress_bar, setup_logging

ROOT = Path(__file__).resolve().parents[2]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def logger():
    log = logging.getLogger("pipelines.test_progress")
    old = log.level
    log.setLevel(logging.INFO)
    yield log
    log.setLevel(old)


def test_a_bar_is_drawn_on_a_terminal_with_rate_and_eta(logger):
    term = FakeTerminal()
    with progress_bar(40, "ingest", "img", log=logger, file=term) as bar:
        assert bar.drawn
        for _ in range(4):
            bar.update(10)
    text = term.getvalue()
    assert "\r" in text and "ingest" in text and "40/40" in text and "img/s" in text
    assert "<" in text  # tqdm's elapsed<remaining (the ETA)


def test_the_terminal_flag_forces_or_refuses_the_bar(logger):
    forced, refused = io.StringIO(), FakeTerminal()
    with progress_bar(3, "x", log=logger, file=forced, terminal=True) as bar:
        bar.update(3)
    with progress_bar(3, "x", log=logger, file=refused, terminal=False) as bar:
        bar.update(3)
    assert "\r" in forced.getvalue() and refused.getvalue() == ""


def test_no_bar_into_a_file_or_a_pipe_nor_when_quiet(logger):
    plain = io.StringIO()
    with progress_bar(10, "x", log=logger, file=plain) as bar:
        bar.update(10)
        assert not bar.drawn
    assert plain.getvalue() == ""
    logger.setLevel(logging.WARNING)  # --quiet
    term = FakeTerminal()
    with progress_bar(10, "x", log=logger, file=term) as bar:
        bar.update(10)
        assert not bar.drawn
    assert term.getvalue() == ""


def test_off_a_terminal_it_logs_a_plain_line_now_and_then(logger, caplog):
    with caplog.at_level(logging.INFO, logger=logger.name):
        with progress_bar(100, "sample", "img", log=logger, file=io.StringIO(),
                          log_every_s=0.0) as bar:
            bar.update(25)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("sample: 25/100 img (") and "img/s" in line and "ETA" in line
    assert "\r" not in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=logger.name):
        with progress_bar(100, "sample", log=logger, file=io.StringIO(),
                          log_every_s=None) as bar:
            bar.update(25)
    assert not caplog.records


def test_log_lines_go_above_a_drawn_bar(logger, monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    try:
        with progress_bar(4, "train", log=logger) as bar:
            bar.update(2)
            logger.info("[train] step 2  loss 0.5")
            bar.update(2)
    finally:
        logger.removeHandler(handler)
    text = term.getvalue()
    # the bar is wiped (\r, blanks, \r), the line written whole, the bar drawn again below it
    assert "\r[train] step 2  loss 0.5\n" in text
    # redrawn at once at its count (later updates may fall inside tqdm's minimum interval)
    assert "2/4" in text.split("[train] step 2  loss 0.5\n")[1]


def test_the_levels_of_the_flags():
    assert level_of() == logging.INFO
    assert level_of(quiet=True) == logging.WARNING
    assert level_of(verbose=True) == logging.DEBUG
    with pytest.raises(ValueError):
        level_of(quiet=True, verbose=True)


def test_setup_keeps_third_party_loggers_down():
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    levels = {n: logging.getLogger(n).level for n in ("pipelines", "training", "mlflow",
                                                         "urllib3", "ray")}
    try:
        setup_logging(logging.DEBUG)
        setup_logging(logging.INFO)  # again: replaces, does not add a second handler
        assert sum(isinstance(h, ConsoleHandler) for h in root.handlers) == 1
        assert logging.getLogger("pipelines.data.ingest").getEffectiveLevel() == logging.INFO
        for name in ("mlflow", "urllib3", "ray", "botocore", "filelock"):
            assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING
    finally:
        root.handlers[:] = before[0]
        root.setLevel(before[1])
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)


# ----------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    for i in range(6):
        (src / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            src / f"c{i % 2}" / f"{i}.png")
    (src / "c0" / "broken.png").write_bytes(b"not an image")
    return src


def _prism(*args: str) -> subprocess.CompletedProcess:
    """``prism ARGS`` with stdout and stderr as pipes (not terminals)."""
    return subprocess.run([sys.executable, "-m", "prism_cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_ingest_prints_its_result_and_logs_its_status_without_a_bar(images, tmp_path):
    r = _prism("data", "ingest", str(images), str(tmp_path / "o"), "--size", "32")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "inputs = written + errors: 7 = 6 + 1 (1 shards, 0 already done)\n"
    assert "rejected 1: not a decodable image" in r.stderr
    assert "\r" not in r.stdout + r.stderr and "img/s" not in r.stderr  # no bar in a pipe


def test_quiet_silences_the_status_lines_but_not_the_result(images, tmp_path):
    r = _prism("--quiet", "data", "ingest", str(images), str(tmp_path / "o"), "--size", "32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("inputs = written + errors: 7 = 6 + 1") and r.stderr == ""


def test_verbose_shows_debug_messages(images, tmp_path):
    r = _prism("-v", "data", "ingest", str(images), str(tmp_path / "o"), "--size", "32")
    assert r.returncode == 0, r.stderr
    assert "debug [pipelines.data.ingest]: wrote " in r.stderr
    assert r.stdout.startswith("inputs = written + errors: 7 = 6 + 1")


def test_quiet_and_verbose_together_are_refused():
    r = _prism("--quiet", "--verbose", "data", "--help")
    assert r.returncode == 2 and "not both" in r.stderr
