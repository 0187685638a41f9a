"""``prism serve`` (start the service) and ``prism sample`` (HTTP client, or in-process)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer

from common.cli_help import examples
from serving.direct import PortInUse, check_port_free, enable_throughput_mode

serving_app = typer.Typer(no_args_is_help=True)
DEFAULT_PIDFILE = Path(os.environ.get("PRISM_SERVE_PIDFILE", ".prism-serve.pid"))


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@serving_app.command("serve", epilog=examples(
    "prism serve --model models:/prism-demo-v@champion",
    "prism serve --model runs/debug/model --port 8011 --detach --pidfile serve.pid",
    "prism serve --stop --pidfile serve.pid"))
def serve_cmd(
    config: Path = typer.Option(Path("serving/config.yaml"), help="Ray Serve config file."),
    model: str = typer.Option(None, help="Model to serve: models:/NAME@ALIAS or a directory."),
    host: str = typer.Option(None, help="Bind address (config default 127.0.0.1)."),
    port: int = typer.Option(None, help="HTTP port (config default 8000)."),
    detach: bool = typer.Option(False, help="Start in the background, wait until ready, "
                                "write the pid file, return."),
    stop: bool = typer.Option(False, help="Stop a service started with --detach."),
    pidfile: Path = typer.Option(DEFAULT_PIDFILE, help="Pid file of --detach / --stop."),
    ready_timeout_s: float = typer.Option(300.0, help="How long --detach waits for /healthz."),
    direct_ingress: bool = typer.Option(
        False, "--direct-ingress", help="The Ingress replicas answer HTTP on the port "
        "themselves, sharing it (SO_REUSEPORT), with no Ray Serve HTTP proxy in the path "
        "(faster under load). See serving/direct.py."),
    ingress_replicas: int = typer.Option(
        None, help="Ingress replicas (HTTP parsing and PNG encoding in parallel; default: "
        "the config's)."),
) -> None:
    """Start the sampling service locally and block until Ctrl-C (or --detach / --stop)."""
    if stop:
        _stop(pidfile)
        return
    if ingress_replicas is not None and ingress_replicas < 1:
        _fail(f"--ingress-replicas must be >= 1, got {ingress_replicas}")
    if direct_ingress and not detach:
        # before anything imports ray.serve: Ray Serve reads these settings at import
        enable_throughput_mode()
    # deferred: torch and Ray Serve (~2.5 s, through serving.launch and serving.loading) and
    # requests (~40 ms): each command loads what it uses, so that --help stays fast; serve
    # also has to set the throughput settings above before ray.serve is imported
    from serving.launch import base_url, load_config, start, wait_ready, with_ingress_replicas
    from serving.launch import direct_ingress as with_direct_ingress
    from serving.launch import stop as stop_service

    try:
        cfg = load_config(config, model=model, host=host, port=port)
        if direct_ingress:
            cfg = with_direct_ingress(cfg, ingress_replicas)
        elif ingress_replicas is not None:
            cfg = with_ingress_replicas(cfg, ingress_replicas)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    url = base_url(cfg)

    if detach:
        http = cfg.get("http_options", {})
        try:  # a service already there would answer this one's readiness checks
            check_port_free(http.get("host", "127.0.0.1"), int(http.get("port", 8000)))
        except PortInUse as exc:
            _fail(str(exc))
        _detach(config, model, host, port, pidfile, url, ready_timeout_s, direct_ingress,
                ingress_replicas)
        return
    stopping = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stopping.update(now=True))
    try:
        try:
            start(cfg)
        except PortInUse as exc:  # raised before Ray starts
            _fail(str(exc))
        except RuntimeError as exc:  # the application failed to deploy (a model that fails
            stop_service()           # to load, a bad config): its error, not a traceback
            _fail(str(exc))
        typer.echo(f"serving {cfg['applications'][0]['args'].get('model_uri')} at {url} "
                   f"(docs: {url}/docs); Ctrl-C to stop")
        try:
            wait_ready(url, timeout_s=ready_timeout_s)
            typer.echo("ready")
        except TimeoutError as exc:
            typer.echo(f"warning: {exc}", err=True)
        while not stopping["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        import ray

        if ray.is_initialized():  # not after PortInUse: nothing was started
            typer.echo("stopping")
        stop_service()


def _detach(config: Path, model: str | None, host: str | None, port: int | None,
            pidfile: Path, url: str, timeout_s: float, direct_ingress: bool = False,
            ingress_replicas: int | None = None) -> None:
    from serving.launch import wait_ready

    cmd = [sys.executable, "-m", "prism_cli", "serve", "--config", str(config)]
    for flag, val in (("--model", model), ("--host", host), ("--port", port),
                      ("--ingress-replicas", ingress_replicas)):
        if val is not None:
            cmd += [flag, str(val)]
    if direct_ingress:
        cmd.append("--direct-ingress")
    log = pidfile.with_suffix(".log")
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    pidfile.write_text(str(proc.pid))
    try:
        wait_ready(url, timeout_s=timeout_s, alive=lambda: proc.poll() is None)
    except TimeoutError as exc:
        _stop(pidfile)
        _fail(f"{exc} (log: {log})")
    except RuntimeError:  # it exited: its last line says why (a model that fails to load)
        pidfile.unlink(missing_ok=True)
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1].removeprefix("error: ") if lines else "the service exited"
        _fail(f"{last} (log: {log})")
    typer.echo(json.dumps({"url": url, "pid": proc.pid, "pidfile": str(pidfile),
                           "log": str(log)}))


def _stop(pidfile: Path, timeout_s: float = 60.0) -> None:
    if not pidfile.is_file():
        _fail(f"no pid file {pidfile}: nothing started with --detach here")
    pid = int(pidfile.read_text().strip())
    try:
        os.kill(pid, signal.SIGINT)  # the server shuts Serve down on Ctrl-C
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pidfile.unlink(missing_ok=True)
    typer.echo(f"stopped {pid}")


@serving_app.command("sample", epilog=examples(
    "prism sample --url http://127.0.0.1:8000 --n 4 --steps 16 --out samples",
    "prism sample --local --model runs/debug/model --n 4 --resolution 32 --out samples-2x",
    "prism sample --local --model runs/debug/model --n 4 --class-label 0,0,1,1 "
    "--cfg-scale 3 --out samples-cfg"))
def sample_cmd(
    out: Path = typer.Option(..., help="Directory for the PNGs (seed_<seed>.png)."),
    url: str = typer.Option("http://127.0.0.1:8000", help="Service URL."),
    local: bool = typer.Option(False, help="Sample in this process (needs --model)."),
    model: str = typer.Option(None, help="Model: NAME@ALIAS (service) or a URI (--local)."),
    n: int = typer.Option(4, help="Number of images."),
    seed: int = typer.Option(0, help="Base seed: image i gets seed + i."),
    steps: int = typer.Option(32, help="Sampling steps."),
    sampler: str = typer.Option(None, help="ddim, ddpm, dpmpp_2m or dpmpp_2m_full "
                                "(diffusers' and k-diffusion's DPM-Solver++(2M)); unset: the "
                                "model's own (ddim; SSD models: their posterior chain)."),
    eta: float = typer.Option(0.0, help="DDIM stochasticity: 0 deterministic, 1 DDPM-like "
                              "(the ddim sampler only)."),
    class_label: str = typer.Option(
        None, help="Class for every image, or a comma-separated list, one class per image "
        "(e.g. 0,0,1,1 with --n 4)."),
    cfg_scale: float = typer.Option(1.0, help="Classifier-free guidance scale (1: off; "
                                    "needs --class-label)."),
    resolution: int = typer.Option(None, help="Output side (m x native)."),
    upscale: str = typer.Option("ug", help="ug or cascade"),
    ug_theta: float = typer.Option(1.3, help="Upsample-guidance strength (0: off)."),
    ug_eta: float = typer.Option(1.0, help="Fraction of the trajectory, from the noisy end, "
                                 "in which upsample guidance is active."),
    schedule: str = typer.Option("model", help="model or spectral"),
    timeout_s: float = typer.Option(600.0, help="HTTP timeout of the request, seconds."),
) -> None:
    """Get images from the service (or in-process with --local) and write them as PNGs."""
    body: dict[str, Any] = dict(
        num_images=n, seed=seed, steps=steps, sampler=sampler, eta=eta, cfg_scale=cfg_scale,
        resolution=resolution, upscale=upscale, ug_theta=ug_theta, ug_eta=ug_eta,
        schedule=schedule, class_labels=_class_labels(class_label), format="json")
    out.mkdir(parents=True, exist_ok=True)
    if local:
        if not model:
            _fail("--local needs --model (models:/NAME@ALIAS or a model directory)")
        meta = _sample_local(model, body, out)
    else:
        if model:
            body["model"] = model
        meta = _sample_http(url, body, out, timeout_s)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    typer.echo(f"wrote {len(meta['seeds'])} images to {out}")


def _class_labels(text: str | None) -> int | list[int] | None:
    """``--class-label``: None, one class (``"3"``) or one per image (``"0,0,1,1"``)."""
    if text is None or not text.strip():
        return None
    try:
        labels = [int(t) for t in text.split(",")]
    except ValueError:
        _fail(f"--class-label must be an integer or a comma-separated list, got {text!r}")
    return labels[0] if len(labels) == 1 and "," not in text else labels


def _sample_http(url: str, body: dict[str, Any], out: Path, timeout_s: float) -> dict[str, Any]:
    import requests

    try:
        r = requests.post(f"{url.rstrip('/')}/v1/generate", json=body, timeout=timeout_s)
    except requests.RequestException as exc:
        _fail(f"cannot reach {url}: {exc}")
    if r.status_code != 200:
        _fail(f"{r.status_code}: {r.text[:1000]}")
    res = r.json()
    for im in res["images"]:
        (out / f"seed_{im['seed']}.png").write_bytes(base64.b64decode(im["png_base64"]))
    return {k: v for k, v in res.items() if k != "images"}


def _sample_local(model_ref: str, body: dict[str, Any], out: Path) -> dict[str, Any]:
    from components.generate import generate_with, to_uint8
    from serving.encode import png_bytes
    from serving.loading import ModelNotFound, default_device, load_served_model, normalize_uri
    from serving.schemas import GenerateRequest

    try:
        req = GenerateRequest.model_validate(body)
        model, info = load_served_model(normalize_uri(model_ref), default_device())
    except (ValueError, ModelNotFound) as exc:
        _fail(str(exc))
    seeds = req.image_seeds()
    start = time.perf_counter()
    try:  # the same options object, checks and sampler as the service
        images = generate_with(model, req.options(), seeds, req.image_labels(), info["device"])
    except ValueError as exc:
        _fail(str(exc))
    for s, im in zip(seeds, to_uint8(images).numpy(), strict=True):
        (out / f"seed_{s}.png").write_bytes(png_bytes(im))
    return {"model": info["name"], "model_version": info["version"], "seeds": seeds,
            "resolution": int(images.shape[-1]), "generate_s": time.perf_counter() - start}
