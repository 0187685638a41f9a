"""``make demo`` (``python -m pipelines.demo_run``): from a fresh clone to images from the
served model, on the embedded demo corpus.

1. ``dvc repro``: demo corpus -> shards -> spectra (local Ray) -> schedule model -> train the
   models of params.yaml -> evaluate -> register (the best one becomes ``@champion``).
   A second run reuses DVC's cache and skips every unchanged stage.
2. ``prism serve --detach`` on the champion (Ray Serve on 127.0.0.1, a free port).
3. One query over HTTP (``prism sample --url ...``): ``PER_CLASS`` images of every class, written
   as PNGs under ``outputs/demo/images`` and as ``outputs/demo/grid.png``: one row per class,
   labelled, real corpus images on the left and the served model's on the right.
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

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("outputs/demo")
PER_CLASS = 4
STEPS = 32
CFG_SCALE = 2.0
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


def run(cmd: list[str], env: dict[str, str], shown: str | None = None) -> None:
    """Run a step with its output streamed; stop the demo with a clear message on failure.
    ``shown``: the command as the user would type it, when ``cmd`` is a stand-in for it."""
    shown = shown or " ".join(cmd)
    print(f"$ {shown}", flush=True)
    rc = subprocess.call(cmd, env=env, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"demo: `{shown}` failed with exit code {rc}")


# DVC's command line, with the hints it closes a run with left out: "To track the changes with
# git, run: git add dvc.lock ..." and "To enable auto staging, run: dvc config core.autostage
# true". Both are INFO records of the logger dvc.repo.scm_context, which logs nothing else above
# DEBUG but a warning when auto staging fails; that logger alone is set to WARNING. Every other
# line (stages run or skipped, warnings, errors) is printed as by `dvc`, and the git index is
# not touched: which files to commit is said at the end of the demo.
_DVC_WITHOUT_GIT_HINTS = (
    "import logging, sys; from dvc.cli import main; "
    "logging.getLogger('dvc.repo.scm_context').setLevel(logging.WARNING); "
    "sys.exit(main(sys.argv[1:]))")


def dvc_command(*args: str) -> list[str]:
    """``dvc ARGS`` in this interpreter, without DVC's closing git hints."""
    return [sys.executable, "-c", _DVC_WITHOUT_GIT_HINTS, *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def served_model(register_json: Path) -> str:
    """The champion's registry URI, or (when the register stage promoted none) the best one's
    registered version, with the stage's reason."""
    doc = json.loads(register_json.read_text())
    if doc.get("promoted"):
        return doc["promoted"]
    best = doc["versions"][doc["best"]]
    print(f"note: no model was promoted ({doc.get('reason', 'see outputs/register.json')}); "
          f"serving the best one by point estimate, {best}", flush=True)
    return f"models:/{best}"


def class_grid(real_root: Path, generated: Path, labels: list[int], dest: Path,
               scale: int = 3) -> Path:
    """One row per class: its name, ``PER_CLASS`` real corpus images (``real_root/<k>_<name>``),
    a gap, then the generated ``seed_*.png`` of that class (seed order; ``labels[i]`` is the
    class of seed i). Images are scaled up ``scale`` times (nearest)."""
    files = sorted(generated.glob("seed_*.png"), key=lambda p: int(p.stem.split("_")[1]))
    if len(files) != len(labels):
        raise SystemExit(f"demo: {len(files)} images in {generated}, expected {len(labels)}")
    folders = sorted((d for d in real_root.iterdir() if d.is_dir()),
                     key=lambda d: int(d.name.split("_", 1)[0]))
    classes = sorted(set(labels))
    side = Image.open(files[0]).size[0] * scale
    pad, label_w, head = 4, 150, 22
    cols = PER_CLASS
    width = label_w + 2 * cols * (side + pad) + 3 * pad
    grid = Image.new("RGB", (width, head + len(classes) * (side + pad)), "white")
    draw = ImageDraw.Draw(grid)
    x_real, x_gen = label_w, label_w + cols * (side + pad) + 3 * pad
    draw.text((x_real, 4), "real (corpus)", fill="black")
    draw.text((x_gen, 4), f"generated (served, cfg {CFG_SCALE:g})", fill="black")
    for row, k in enumerate(classes):
        y = head + row * (side + pad)
        draw.text((4, y + side // 2 - 6), folders[k].name.split("_", 1)[1], fill="black")
        real = sorted(folders[k].glob("*.png"))[:cols]
        gen = [f for f, lab in zip(files, labels, strict=True) if lab == k][:cols]
        for col, f in enumerate(real):
            im = Image.open(f).convert("RGB").resize((side, side), Image.Resampling.NEAREST)
            grid.paste(im, (x_real + col * (side + pad), y))
        for col, f in enumerate(gen):
            im = Image.open(f).convert("RGB").resize((side, side), Image.Resampling.NEAREST)
            grid.paste(im, (x_gen + col * (side + pad), y))
    grid.save(dest)
    return dest


def corpus_classes(real_root: Path) -> int:
    """Number of class folders of the demo corpus."""
    n = sum(1 for d in real_root.iterdir() if d.is_dir())
    if not n:
        raise SystemExit(f"demo: no class folders in {real_root}")
    return n


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
    run(dvc_command("repro"), env, shown="dvc repro")
    model = served_model(Path("outputs/register.json"))
    port, pidfile = free_port(), (OUT / "serve.pid").resolve()
    say(f"2/4 starting the service on {model} at http://127.0.0.1:{port}")
    sid = None
    try:
        run(["prism", "serve", "--detach", "--model", model, "--port", str(port),
             "--pidfile", str(pidfile), "--ready-timeout-s", "600"], env)
        sid = os.getsid(int(pidfile.read_text()))
        real_root = Path("outputs/data/demo")
        labels = [k for k in range(corpus_classes(real_root)) for _ in range(PER_CLASS)]
        say(f"3/4 one query over HTTP: {PER_CLASS} images of each of {labels[-1] + 1} classes, "
            f"{STEPS} DDIM steps, classifier-free guidance {CFG_SCALE:g}")
        images = OUT / "images"
        for stale in images.glob("seed_*.png"):
            stale.unlink()
        run(["prism", "sample", "--url", f"http://127.0.0.1:{port}", "--out", str(images),
             "--n", str(len(labels)), "--steps", str(STEPS), "--seed", "0",
             "--class-label", ",".join(map(str, labels)), "--cfg-scale", str(CFG_SCALE)], env)
        grid = class_grid(real_root, images, labels, OUT / "grid.png")
    finally:
        say("4/4 stopping the service")
        stop_service(pidfile, env, sid)
    meta = json.loads((images / "meta.json").read_text())
    summary = {"model": model, "served_version": meta.get("model_version"),
               "class_labels": labels, "cfg_scale": CFG_SCALE,
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
  why            {reg.get('reason', '')}
  images         {OUT}/images/seed_*.png ({len(summary['images'])} PNGs)
  sample grid    {summary['grid']} (one row per class: real images, then generated ones)

Where to look next:
  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   # runs, loss curves, registry
  .venv/bin/dvc metrics show                                     # evaluate and register numbers
  .venv/bin/dvc plots show   # open dvc_plots/index.html (offline too): loss, RAPSD, chromatograms
  outputs/eval/<model>/model-16/samples.png                     # evaluation samples
  .venv/bin/dvc exp run -S models.demo-v.optim.lr=0.001          # a sweep point
  docs/guide/sharing.md   # keep a run: `dvc push`, then commit dvc.lock and its small outputs
  .venv/bin/prism serve --model {summary['model']}   # serve it again (Ctrl-C stops)
""", flush=True)


if __name__ == "__main__":
    main()
