"""Starting and stopping the service in this process from a Serve config file.

``prism serve`` and the tests use these functions, so that what is tested is what runs.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import requests
import torch
import yaml
from ray import serve
from ray.serve import context as serve_context
from ray.serve.schema import ServeDeploySchema

from common.ray_local import init_ray
from serving.app import AppArgs, Ingress
from serving.direct import check_port_free
from serving.model import Sampler
from serving.serve_logs import drop_benign_serve_warnings

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
_STARTED_RAY = False  # whether start() started the local Ray that stop() shuts down


def load_config(path: str | Path = DEFAULT_CONFIG, *, model: str | None = None,
                host: str | None = None, port: int | None = None,
                user_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a Serve config (validated by Ray's ``ServeDeploySchema``) and apply overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"serve config {path} not found")
    cfg = yaml.safe_load(path.read_text())
    cfg = apply_overrides(cfg, model=model, host=host, port=port, user_config=user_config)
    ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(cfg)
    if len(cfg.get("applications", [])) != 1:
        raise ValueError(f"{path}: expected exactly one application")
    return cfg


def apply_overrides(cfg: dict[str, Any], *, model: str | None = None, host: str | None = None,
                    port: int | None = None, user_config: dict[str, Any] | None = None,
                    args: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    http = cfg.setdefault("http_options", {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = int(port)
    app = cfg["applications"][0]
    if model is not None:
        app.setdefault("args", {})["model_uri"] = model
    app.setdefault("args", {}).update(args or {})
    if user_config:
        dep = _deployment(app, "Sampler")
        dep["user_config"] = {**dep.get("user_config", {}), **user_config}
    return cfg


def _deployment(app: dict[str, Any], name: str) -> dict[str, Any]:
    deps = app.setdefault("deployments", [])
    for d in deps:
        if d.get("name") == name:
            return d
    deps.append({"name": name})
    return deps[-1]


def build_from_config(cfg: dict[str, Any]) -> serve.Application:
    """``Ingress -> Sampler`` with the config's args and per-deployment options."""
    app_cfg = cfg["applications"][0]
    args = AppArgs.model_validate(app_cfg.get("args", {}))
    opts = {d["name"]: {k: v for k, v in d.items() if k != "name"}
            for d in app_cfg.get("deployments", [])}
    sampler_opts = copy.deepcopy(opts.get("Sampler", {}))
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        actor = sampler_opts.setdefault("ray_actor_options", {})
        actor["num_gpus"] = max(float(actor.get("num_gpus", 0) or 0), 1.0)
    sampler = Sampler.options(**sampler_opts).bind(
        args.model_uri, args.device, args.load_delay_s, args.max_models, args.allow_other_models,
        args.precision, args.cuda_graphs)
    direct = args.direct_http.model_dump() if args.direct_http else None
    return Ingress.options(**opts.get("Ingress", {})).bind(sampler, direct)


def direct_ingress(cfg: dict[str, Any], replicas: int | None = None) -> dict[str, Any]:
    """``cfg`` with direct ingress (``serving/direct.py``): the Ingress replicas answer HTTP
    on ``http_options``' host:port themselves and no Serve proxy is started. ``replicas``:
    how many Ingress replicas share the port (default: the config's ``num_replicas``, or the
    ``max_replicas`` of an Ingress ``autoscaling_config``: Serve's autoscaler counts the
    requests that pass through Serve, and direct-ingress requests do not)."""
    if replicas is None:
        auto = next((d.get("autoscaling_config") for d in
                     cfg["applications"][0].get("deployments", []) if d.get("name") == "Ingress"),
                    None)
        replicas = int(auto.get("max_replicas", 1)) if auto else None
    cfg = copy.deepcopy(cfg) if replicas is None else with_ingress_replicas(cfg, replicas)
    http = cfg.setdefault("http_options", {})
    cfg["applications"][0].setdefault("args", {})["direct_http"] = {
        "host": http.get("host", "127.0.0.1"), "port": int(http.get("port", 8000))}
    cfg["proxy_location"] = "Disabled"
    return cfg


def with_ingress_replicas(cfg: dict[str, Any], replicas: int) -> dict[str, Any]:
    """``cfg`` with exactly ``replicas`` Ingress replicas (no autoscaling)."""
    if replicas < 1:
        raise ValueError(f"ingress replicas must be >= 1, got {replicas}")
    cfg = copy.deepcopy(cfg)
    dep = _deployment(cfg["applications"][0], "Ingress")
    dep.pop("autoscaling_config", None)
    dep["num_replicas"] = replicas
    return cfg


def base_url(cfg: dict[str, Any]) -> str:
    http = cfg.get("http_options", {})
    prefix = cfg["applications"][0].get("route_prefix", "/").rstrip("/")
    return f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{prefix}"


def start(cfg: dict[str, Any], ray_init: dict[str, Any] | None = None) -> str:
    """Start Ray (if needed), the HTTP proxy and the application; return the base URL."""
    http = cfg.get("http_options", {})
    # before Ray starts: a clear error (PortInUse), nothing to clean up
    check_port_free(http.get("host", "127.0.0.1"), int(http.get("port", 8000)))
    global _STARTED_RAY
    _STARTED_RAY = init_ray(**(ray_init or {}))
    drop_benign_serve_warnings()
    serve.start(http_options={"host": http.get("host", "127.0.0.1"),
                              "port": int(http.get("port", 8000)),
                              **({"request_timeout_s": http["request_timeout_s"]}
                                 if "request_timeout_s" in http else {})},
                proxy_location=cfg.get("proxy_location", "HeadOnly"))
    app_cfg = cfg["applications"][0]
    name = app_cfg.get("name", "prism")
    try:
        serve.run(build_from_config(cfg), name=name, route_prefix=app_cfg.get("route_prefix", "/"))
    except RuntimeError as exc:  # Serve says which deployment failed; add why
        raise RuntimeError(f"{exc} {_deploy_errors(name)}".strip()) from exc
    return base_url(cfg)


def _deploy_errors(app: str) -> str:
    """The failed deployments' messages (their constructors' errors), from Serve's status."""
    try:
        deps = serve.status().applications[app].deployments
    except Exception:  # no status to add
        return ""
    return " ".join(f"{n}: {d.message.strip().splitlines()[-1]}"
                    for n, d in deps.items() if d.message and "fail" in d.status.lower())


def wait_ready(url: str, timeout_s: float = 120.0,
               alive: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Poll ``/healthz`` until 200; raise TimeoutError (with the last answer) otherwise, or
    RuntimeError as soon as ``alive()`` (the serving process) turns false."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"the service stopped before it was ready (last: {last})")
        try:
            r = requests.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200:
                return r.json()
            last = f"{r.status_code} {r.text[:300]}"
        except requests.RequestException as exc:
            last = str(exc)
        time.sleep(0.25)
    raise TimeoutError(f"service at {url} not ready after {timeout_s:.0f} s: {last}")


def stop() -> None:
    """Shut Serve down (nothing to do when this process started no Ray, e.g. after
    :class:`~serving.direct.PortInUse`)."""
    global _STARTED_RAY
    if ray.is_initialized():
        shutdown_serve()
        if _STARTED_RAY:  # the local cluster this process started: its agents go with it
            ray.shutdown()
            _STARTED_RAY = False


def shutdown_serve(timeout_s: float = 30.0) -> None:
    """What ``serve.shutdown()`` does, without the line it makes Ray print at its end:
    ``(raylet) Task ServeController.graceful_shutdown failed. There are infinite retries
    remaining, so the task will be retried. Error: The actor is dead because it was killed by
    `ray.kill`.``

    Serve shuts down by calling the controller's ``graceful_shutdown`` and waiting on that call
    until the controller, once every replica and proxy has stopped, kills itself. Serve gives the
    controller's calls endless retries (``max_task_retries=-1``), so Ray's core worker reports
    the call the controller died under as failed and to be retried, then finds the actor gone
    for good and raises ``RayActorError``, the end Serve waits for. The same call without
    retries ends in that error at once, and nothing is printed. Where Serve's client differs
    from Ray 2.60's, ``serve.shutdown()`` runs as it is."""
    try:
        client, had_client = serve_context._check_cached_client_alive()
        graceful = client._controller.graceful_shutdown if client is not None else None
    except AttributeError:  # another Serve
        serve.shutdown()
        return
    if graceful is None:
        if not had_client:  # a controller this process holds no client of: Serve finds it
            serve.shutdown()
        return  # else the cluster no longer answers: nothing to shut down
    client.shutdown_cached_handles()
    try:
        ray.get(graceful.options(max_task_retries=0).remote(), timeout=timeout_s)
    except ray.exceptions.RayActorError:
        pass  # the controller has stopped Serve and exited
    except ray.exceptions.GetTimeoutError:
        logging.getLogger("ray.serve").warning(
            "the Serve controller did not shut down within %.0f s; see its log", timeout_s)
    serve_context._disconnect()
