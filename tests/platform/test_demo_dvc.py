"""The demo's ``dvc repro`` (``pipelines.demo_run.dvc_command``) in a small git + DVC repository:
DVC's closing git hints are left out, its other lines and its errors are printed as by ``dvc``,
and the git index is left alone. (``tests/e2e/test_e2e_readme.py`` checks the demo's own
output.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.demo_run import dvc_command

GIT_HINTS = ("To track the changes with git", "core.autostage")


def _repo(path: Path, cmd: str) -> Path:
    """A git repository with DVC initialised, committed, and one stage running ``cmd``."""
    if shutil.which("git") is None:
        pytest.skip("git is needed")
    path.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    (path / "dvc.yaml").write_text(f"stages:\n  hello:\n    cmd: {cmd}\n    outs:\n"
                                   "      - out.txt\n")
    for step in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                 ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(step, cwd=path, env=env, check=True, capture_output=True, timeout=120)
    return path


def _run(cmd: list[str], repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=repo, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=300)


def test_dvc_prints_the_git_hints_the_demo_leaves_out(tmp_path):
    got = _run([sys.executable, "-m", "dvc", "repro"], _repo(tmp_path / "r", "echo hi > out.txt"))
    assert got.returncode == 0, got.stdout
    assert all(h in got.stdout for h in GIT_HINTS), got.stdout  # what the next test checks for


def test_the_demos_repro_runs_the_stage_without_the_git_hints(tmp_path):
    repo = _repo(tmp_path / "r", "echo hi > out.txt")
    got = _run(dvc_command("repro"), repo)
    assert got.returncode == 0, got.stdout
    assert "Running stage 'hello'" in got.stdout and "dvc.lock" in got.stdout, got.stdout
    assert not [h for h in GIT_HINTS if h in got.stdout], got.stdout
    assert (repo / "out.txt").read_text() == "hi\n"
    staged = subprocess.run(["git", "diff", "--cached", "--name-only"], cwd=repo, text=True,
                            capture_output=True, check=True).stdout
    assert staged == "", staged  # nothing auto-staged
    again = _run(dvc_command("repro"), repo)
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout, again.stdout


def test_the_demos_repro_still_prints_dvcs_errors(tmp_path):
    got = _run(dvc_command("repro"), _repo(tmp_path / "r", "exit 3"))
    assert got.returncode != 0, got.stdout
    assert "ERROR" in got.stdout and "failed to reproduce 'hello'" in got.stdout, got.stdout
