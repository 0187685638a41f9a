"""``make demo`` (``python -m pipelines.demo_run``): from a fresh clone to images from the
served model, on the embedded demo corpus.

1. ``dvc repro``: demo corpus -> shards -> spectra (local Ray) -> schedule model -> train the
   models of params.yaml -> evaluate -> register (the best one becomes ``@champion``).
   A second run reuses DVC's cache and skips every unchanged stage.
2. ``prism serve --detach`` on the champion (Ray Serve on 127.0.0.1, a free port).
3. One query over HTTP (``prism sample --url ...``): PNGs and a sample grid under
   ``outputs/demo/``.
4. ``prism serve --stop``; any process left in the service's session is ended.

Run from anywhere; it works in the repository root. ``MLFLOW_TRACKING_URI`` overrides the
default MLflow store ``sqlite:///mlflow.db`` (repository root).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("outputs/demo")
N_IMAGES = 16
STEPS = 32
_T0 = time.monotonic()


def say(msg: str) -> None:
    """A progress line with the elapsed wall time."""
    s = int(time.monotonic() - _T0)
    print(f"\n==> [{s // 60:02d}:{s % 60:02d}] {msg}", flush=True)


def demo_env() -> dict[str, str]:
    """This interpreter's bin first on PATH (prism, dvc), the checkout first on PYTHONPATH,
    an absolute MLflow URI (Ray Serve replicas run in other directories)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")
    env.update(PYTHONUNBUFFERED="1", MPLBACKEND="Agg", RAY_USAGE_STATS_ENABLED="0")
    return env


def run(cmd: list[str], env: dict[str, str]) -> None:
    """Run a step with its output streamed; stop the demo with a clear message on failure."""
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"demo: `{' '.join(cmd)}` failed with exit code {rc}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def served_model(register_json: Path) -> str:
    """The champion's registry URI, or (when no model passed the threshold) the best one's
    registered version, with a warning."""
    doc = json.loads(register_json.read_text())
    if doc.get("promoted"):
        return doc["promoted"]
    best = doc["versions"][doc["best"]]
    print(f"warning: no model passed register.threshold ({doc['metric']} = {doc['value']:.4g},"
          f" threshold {doc['threshold']}); serving the best one, {best}", flush=True)
    return f"models:/{best}"


def sample_grid(folder: Path, dest: Path, columns: int = 4, scale: int = 4) -> Path:
    """Tile ``seed_*.png`` of ``folder`` (in seed order) into one PNG, each image scaled up."""
    from PIL import Image

    files = sorted(folder.glob("seed_*.png"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise SystemExit(f"demo: no images in {folder}")
    ims = [Image.open(f).convert("RGB") for f in files]
    w, h = ims[0].size
    rows = -(-len(ims) // columns)
    grid = Image.new("RGB", (columns * w * scale, rows * h * scale), "white")
    for i, im in enumerate(ims):
        grid.paste(im.resize((w * scale, h * scale), Image.Resampling.NEAREST),
                   ((i % columns) * w * scale, (i // columns) * h * scale))
    grid.save(dest)
    return dest


def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the detached service and what it started)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    pids.append(int(d.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def stop_service(pidfile: Path, env: dict[str, str], sid: int | None) -> None:
    """``prism serve --stop``, then end whatever is left of the service's session."""
    if pidfile.is_file():
        subprocess.call([str(Path(sys.executable).parent / "prism"), "serve", "--stop",
                         "--pidfile", str(pidfile)], env=env, cwd=ROOT)
    if sid is None or not Path("/proc").is_dir():
        return
    deadline = time.monotonic() + 30
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _session_pids(sid):  # only processes of the session this demo started
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> None:
    os.chdir(ROOT)
    env = demo_env()
    OUT.mkdir(parents=True, exist_ok=True)
    say("1/4 the pipeline: dvc repro (demo corpus, ingest, spectra on a local Ray, schedule "
        "model, train, evaluate, register); unchanged stages are skipped")
    run(["dvc", "repro"], env)
    model = served_model(Path("outputs/register.json"))
    port, pidfile = free_port(), (OUT / "serve.pid").resolve()
    say(f"2/4 starting the service on {model} at http://127.0.0.1:{port}")
    sid = None
    try:
        run(["prism", "serve", "--detach", "--model", model, "--port", str(port),
             "--pidfile", str(pidfile), "--ready-timeout-s", "600"], env)
        sid = os.getsid(int(pidfile.read_text()))
        say(f"3/4 one query over HTTP: {N_IMAGES} images, {STEPS} DDIM steps")
        images = OUT / "images"
        run(["prism", "sample", "--url", f"http://127.0.0.1:{port}", "--out", str(images),
             "--n", str(N_IMAGES), "--steps", str(STEPS), "--seed", "0"], env)
        grid = sample_grid(images, OUT / "grid.png")
    finally:
        say("4/4 stopping the service")
        stop_service(pidfile, env, sid)
    meta = json.loads((images / "meta.json").read_text())
    summary = {"model": model, "served_version": meta.get("model_version"),
               "images": sorted(str(p) for p in images.glob("seed_*.png")), "grid": str(grid),
               "register": json.loads(Path("outputs/register.json").read_text()),
               "wall_s": round(time.monotonic() - _T0, 1)}
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1))
    print_next(summary)


def print_next(summary: dict) -> None:
    reg = summary["register"]
    print(f"""
Done in {summary['wall_s'] / 60:.1f} min. The service answered; it is stopped again.

  served model   {summary['model']} (version {summary['served_version']}; best of
                 {', '.join(f'{k} {v:.4g}' for k, v in reg['scores'].items())} by {reg['metric']})
  images         {OUT}/images/seed_*.png ({len(summary['images'])} PNGs)
  sample grid    {summary['grid']}

Where to look next:
  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   # runs, loss curves, registry
  .venv/bin/dvc metrics show                                     # evaluate and register numbers
  .venv/bin/dvc plots show   # then open dvc_plots/index.html: loss, RAPSD, chromatograms
  outputs/eval/<model>/model-16/samples.png                     # evaluation samples
  .venv/bin/dvc exp run -S models.demo-v.optim.lr=0.001          # a sweep point
  .venv/bin/prism serve --model models:/prism-demo-v@champion   # serve it again (Ctrl-C stops)
""", flush=True)


if __name__ == "__main__":
    main()
