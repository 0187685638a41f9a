"""One fresh clone of this repository with the README's first command run in it, shared by
tests/e2e/test_e2e_dvc.py and tests/e2e/test_e2e_readme.py (computed once per test session).

The clone holds only committed files; it reuses this checkout's ``.venv`` through a symlink
and puts the clone first on PYTHONPATH (the venv's editable install points at this checkout).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT_S = 1800


@dataclass
class DemoClone:
    path: Path
    env: dict[str, str]
    returncode: int
    output: str
    wall_s: float

    def run(self, *cmd: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
        """A command in the clone (stdout and stderr together in ``.stdout``)."""
        return subprocess.run(list(cmd), cwd=self.path, env=self.env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout_s)


def clone_env(path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PRISM_SERVE_PIDFILE")}
    env["PATH"] = f"{path / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(PYTHONPATH=str(path), MPLBACKEND="Agg", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1")
    return env


@functools.lru_cache(maxsize=1)
def demo_clone() -> DemoClone:
    """``git clone`` this repository into a temporary folder and run
    ``python -m pipelines.demo_run`` there (the job of ``make demo``)."""
    if shutil.which("git") is None:
        raise RuntimeError("git is needed for the end-to-end tests")
    base = Path(tempfile.mkdtemp(prefix="prism-e2e-"))
    if not os.environ.get("PRISM_E2E_KEEP"):  # set it to keep the clone for a post-mortem
        atexit.register(shutil.rmtree, base, True)
    path = base / "prism"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(path)], check=True, timeout=300)
    (path / ".venv").symlink_to(ROOT / ".venv")
    env = clone_env(path)
    t0 = time.monotonic()
    proc = subprocess.run([str(path / ".venv" / "bin" / "python"), "-m", "pipelines.demo_run"],
                          cwd=path, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=DEMO_TIMEOUT_S)
    wall = time.monotonic() - t0
    (base / "demo_run.log").write_text(proc.stdout)
    print(f"demo_run in {path}: exit {proc.returncode}, {wall:.0f} s", file=sys.stderr)
    return DemoClone(path, env, proc.returncode, proc.stdout, wall)
