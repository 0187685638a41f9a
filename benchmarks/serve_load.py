"""Serving load test: the service against the offline sampler, and the cost of upsample guidance.

    python benchmarks/serve_load.py                       # debug model, Serve in-process
    python benchmarks/serve_load.py --model DIR_OR_URI    # a real model
    python benchmarks/serve_load.py --preset ddpm-cifar10 # its network, random weights
    python benchmarks/serve_load.py --url http://127.0.0.1:8000   # a running service
    python benchmarks/serve_load.py --smoke               # tiny, offline parts only (<1 min)

1. Offline: ``generate`` throughput (images/s) at batch sizes 1, 8 and 32.
2. Service (Ray Serve in this process, or ``--url``; skipped where ray is not installed):
   requests/s and p50/p99 latency at concurrency 1, 8 and 32, one image per request, and the
   ratio to offline throughput at the same batch size (target >= 0.8 at concurrency 32),
   offline and service measured in turns (``--pairs``, the ratio is the median pair's); per
   level, the replica's device-call timeline and the CPU each Serve process spent per request.
   ``--direct-ingress``: the service without the HTTP proxy (``serving/direct.py``).
3. Upsample guidance, eta = 0.5, m = 2, against plain sampling at the same output resolution
   (2 x native): the paper's bound on the extra cost is eta / m^2 = 12.5% (target: within 2
   points of it). The exact extra pixel fraction of the active steps is printed beside it.
On GPU: CUDA and bf16 autocast (as the service), no compilation. Results: JSON in $OUT
(default ./outputs/bench), a table printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import http_load  # noqa: E402

from common.ray_local import init_ray  # noqa: E402
from components.artifact import save_model  # noqa: E402
from components.generate import GenerativeModel, generate  # noqa: E402
from components.networks.registry import build_network, preset_kwargs  # noqa: E402
from components.samplers import lambda_grid  # noqa: E402
from components.schedules import CosineSchedule, ddpm_linear  # noqa: E402
from serving.direct import enable_throughput_mode  # noqa: E402
from serving.loading import load_served_model, normalize_uri  # noqa: E402


def debug_model(directory: Path | None = None, preset: str = "unet-debug"
                ) -> tuple[GenerativeModel, str | None]:
    """A UNet preset with random weights (zero heads re-drawn: they make constant images);
    saved as a model directory when ``directory`` is given (for the service). unet-debug:
    16x16, 4 classes, x0-prediction, cosine schedule; other presets (``ddpm-cifar10``,
    ``unet-64``): their resolution, unconditional, eps-prediction, DDPM's linear betas (a
    network's speed does not depend on its weights)."""
    torch.manual_seed(0)
    debug = preset == "unet-debug"
    family, kwargs = preset_kwargs(preset)
    classes = 4 if debug else 0
    kwargs = dict(kwargs, num_classes=classes)
    net = build_network(preset, num_classes=classes).train(False)
    for p in net.parameters():
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    res = 16 if debug else int(kwargs.get("resolution", 32))
    sched, sched_name = (CosineSchedule(), "cosine") if debug else (ddpm_linear(), "ddpm_linear")
    prediction = "x0" if debug else "eps"
    model = GenerativeModel(net=net, prediction=prediction, n_cond=1, resolution=res,
                            in_channels=3, num_classes=classes, schedule=sched, family=family,
                            net_kwargs=kwargs, schedule_name=sched_name)
    if directory is None:
        return model, None
    save_model(directory, model)
    return model, str(directory)


def timed(fn, repeats: int, cuda: bool) -> float:
    """Median wall time (s) of ``fn()`` over ``repeats`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def offline(model: GenerativeModel, batches: list[int], steps: int, repeats: int, device: str,
            autocast) -> dict[int, float]:
    """images/s of ``generate`` at each batch size."""
    out = {}
    for b in batches:
        def run(b: int = b) -> None:
            with autocast():
                generate(model, seeds=list(range(b)), steps=steps, device=device)
        out[b] = b / timed(run, repeats, device == "cuda")
    return out


def ug_cost(model: GenerativeModel, batch: int, steps: int, repeats: int, device: str,
            autocast, eta: float = 0.5, m: int = 2) -> dict[str, float]:
    """Extra time of upsample guidance over plain sampling at m x native."""
    res = model.resolution * m
    kw = dict(seeds=list(range(batch)), steps=steps, resolution=res, device=device)

    def plain() -> None:
        with autocast():
            generate(model, ug_theta=0.0, **kw)

    def ug() -> None:
        with autocast():
            generate(model, ug_theta=1.3, ug_eta=eta, **kw)

    t_plain, t_ug = timed(plain, repeats, device == "cuda"), timed(ug, repeats, device == "cuda")
    # evaluations with UG active: grid points with lambda <= lambda(1 - eta) (+ final denoise)
    lams = lambda_grid(model.schedule, steps)
    lam_active = float(model.schedule.lambda_(torch.tensor(1.0 - eta)))
    active = int((lams <= lam_active).sum())
    pixel_frac = active / (steps + 1) / m**2
    return {"plain_s": t_plain, "ug_s": t_ug, "extra": t_ug / t_plain - 1.0,
            "bound": eta / m**2, "pixel_extra": pixel_frac, "eta": eta, "m": m}


# --------------------------------------------------------------------------- service


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_service(model_uri: str, max_batch: int, batch_wait_s: float | None = None,
                  ingress_replicas: int | None = None, direct: bool = False,
                  cuda_graphs: bool = True):
    """Ray Serve in this process with the shipped config (one Sampler replica; the Ingress
    replicas of the config unless ``ingress_replicas`` is given). ``direct``: direct ingress
    (``serving/direct.py``: the Ingress replicas answer HTTP on the port themselves, no
    proxy in the path)."""
    # deferred: Ray Serve reads the throughput settings (--direct-ingress) when ray.serve is
    # imported, so ray and serving.launch load only after main() has set them
    import ray

    from serving.launch import (
        apply_overrides,
        direct_ingress,
        load_config,
        start,
        stop,
        wait_ready,
        with_ingress_replicas,
    )

    user = {"max_batch_size": max_batch, "max_image_steps": 10**9}
    if batch_wait_s is not None:
        user["batch_wait_timeout_s"] = batch_wait_s
    cfg = load_config(model=model_uri, port=_free_port(), user_config=user)
    cfg = apply_overrides(cfg, args={"cuda_graphs": cuda_graphs})
    for dep in cfg["applications"][0]["deployments"]:
        if dep["name"] == "Sampler":
            dep.pop("autoscaling_config", None)
            dep["num_replicas"] = 1
    if direct:
        cfg = direct_ingress(cfg, ingress_replicas)
    elif ingress_replicas is not None:
        cfg = with_ingress_replicas(cfg, ingress_replicas)
    init_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        url = start(cfg)
        wait_ready(url, timeout_s=300)
        yield url
    finally:
        stop()
        ray.shutdown()


def _stats(url: str, after: int = 0) -> dict[str, Any]:
    return requests.get(f"{url}/v1/stats", params={"after": after}, timeout=30).json()


def cycle_medians(calls: list[dict[str, float]]) -> dict[str, float]:
    """Median of each timeline field over device calls (the replica's ``/v1/stats``)."""
    keys = ("free_to_first_s", "first_to_last_s", "last_to_start_s", "run_s")
    return {k: statistics.median(c[k] for c in calls) for k in keys} if calls else {}


_ROLES = {"ProxyActor": "proxy", "ServeReplica:prism:Ingress": "ingress",
          "ServeReplica:prism:Sampler": "sampler", "ServeController": "controller"}


def serve_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this machine's Serve processes, by role
    (Ray names its worker processes after their actors); {} where /proc is absent."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            role = next((r for tag, r in _ROLES.items() if tag in cmd), None)
            if role is None:
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return out


def load(url: str, concurrency: int, n_requests: int, steps: int,
         processes: int = 1) -> dict[str, float]:
    """Closed loop: ``concurrency`` clients, ``n_requests`` one-image requests in all, spread
    over ``processes`` client processes (``benchmarks/http_load.py``); each client keeps its
    connection open (HTTP keep-alive, as any real client would)."""
    res, wall = http_load.run(url, concurrency, max(1, n_requests // concurrency), steps, processes)
    lat = sorted(x for x, _, _ in res)
    # where the time goes, seen from the replica: waiting for a device call, the call itself;
    # the rest of the latency is HTTP, proxy, ingress, the handle call and PNG encoding
    queue = statistics.median(t["queue_s"] for _, _, t in res)
    gen = statistics.median(t["generate_s"] for _, _, t in res)
    return {"requests_per_s": len(res) / wall, "p50_s": lat[len(lat) // 2],
            "p99_s": lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)],
            "mean_batch": statistics.mean(b for _, b, _ in res),
            "replica_queue_p50_s": queue, "replica_generate_p50_s": gen,
            "outside_p50_s": statistics.median(x - t["total_s"] for x, _, t in res),
            "client_processes": min(processes, concurrency)}


def measure_level(url: str, c: int, args: argparse.Namespace) -> dict[str, Any]:
    """One closed-loop load at concurrency ``c``, with what the service says about it."""
    st0, cpu0 = _stats(url), serve_cpu_seconds()
    before_calls = st0["images_per_batch"]
    last_call = max((int(d["call"]) for d in st0.get("device_calls", [])), default=0)
    res = load(url, c, args.rounds * c, args.steps, args.client_processes)
    # CPU milliseconds per request in each Serve process (the HTTP proxy, the ingress
    # replicas, the sampler replica: where the time outside the device call goes); only for
    # a service on this machine
    cpu1, n_req = serve_cpu_seconds(), args.rounds * c + c  # + the warm-ups
    res["cpu_ms_per_request"] = {k: 1000 * (cpu1[k] - cpu0.get(k, 0.0)) / n_req
                                 for k in sorted(cpu1)}
    # images per device call during this level (the replica's /v1/stats), and where each
    # cycle's time went (device free -> first job -> last job -> start -> end), medians over
    # the level's calls (warm-ups included)
    st1 = _stats(url, last_call)
    after = st1["images_per_batch"]
    res["cycle"] = cycle_medians(st1.get("device_calls", []))
    res["timeline"] = st1.get("device_calls", [])
    res["device_calls"] = {k: after[k] - before_calls.get(k, 0) for k in sorted(after, key=int)
                           if after[k] > before_calls.get(k, 0)}
    return res


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory or models:/NAME@ALIAS (default: debug)")
    ap.add_argument("--preset", default="unet-debug",
                    help="without --model: a UNet preset with random weights (unet-debug, "
                         "ddpm-cifar10, unet-64)")
    ap.add_argument("--url", help="measure a running service instead of starting one")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-wait", type=float, default=None,
                    help="the Sampler's batch_wait_timeout_s (default: serving/config.yaml's)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=8, help="requests = rounds x concurrency")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3,
                    help="offline-then-service measurements per concurrency (ratio: median)")
    ap.add_argument("--smoke", action="store_true", help="tiny offline-only run")
    ap.add_argument("--no-service", action="store_true")
    ap.add_argument("--no-ug", action="store_true", help="skip the upsample-guidance cost")
    ap.add_argument("--ingress-replicas", type=int, default=None,
                    help="Ingress replicas of the local service (default: serving/config.yaml's)")
    ap.add_argument("--client-processes", type=int, default=max(1, (os.cpu_count() or 2) // 4),
                    help="processes the clients are spread over (default: a quarter of the "
                         "cores; 1 = all client threads in this process)")
    ap.add_argument("--eager", action="store_true",
                    help="no CUDA graphs, in the offline reference and the service alike")
    ap.add_argument("--direct-ingress", action="store_true",
                    help="the local service with direct ingress (serving/direct.py: the "
                         "Ingress replicas answer HTTP on the port themselves, no proxy)")
    args = ap.parse_args()
    if args.direct_ingress and not args.url:
        enable_throughput_mode()  # before Ray starts and ray.serve is imported
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    if args.smoke:
        args.steps, args.repeats, args.concurrency = 4, 1, "1,8"
    levels = [int(c) for c in args.concurrency.split(",")]

    tmp = tempfile.TemporaryDirectory()
    if args.model:
        uri = normalize_uri(args.model)
        model, _ = load_served_model(uri, device, cuda_graphs=not args.eager)
    else:
        model, uri = debug_model(Path(tmp.name) / "model", args.preset)
        if torch.cuda.is_available() and not args.eager:  # as the service loads it
            model, _ = load_served_model(uri, device, cuda_graphs=True)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" \
        else contextlib.nullcontext
    # the service runs the network eagerly under bf16 autocast on CUDA (batch sizes vary from
    # call to call); the offline reference does the same, so the ratio compares like for like

    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "device": device,
                               "machine": platform.node(), "steps": args.steps,
                               "model": args.model or f"{args.preset} (random weights)",
                               "cuda_graphs": device == "cuda" and not args.eager,
                               "path": ("direct ingress" if args.direct_ingress else "proxy")
                               + f", {args.ingress_replicas or 'config'} ingress replicas"}
    results["offline_images_per_s"] = offline(model, levels, args.steps, args.repeats, device,
                                              autocast)
    if not args.no_ug:
        results["ug"] = ug_cost(model, max(levels) if not args.smoke else 4, args.steps,
                                args.repeats, device, autocast)
    service: dict[int, dict[str, float]] = {}
    want_service = not args.no_service and (args.url or not args.smoke)
    if want_service:
        try:
            ctx = contextlib.nullcontext(args.url) if args.url \
                else local_service(uri, max(levels), args.batch_wait, args.ingress_replicas,
                                    args.direct_ingress, cuda_graphs=not args.eager)
            with ctx as url:
                for c in levels:
                    # the service's warm-up at this batch size, as ``timed`` warms the offline
                    # sampler: the first call of a new batch bucket records its CUDA graphs
                    load(url, c, c, args.steps, args.client_processes)
                    # offline and service measured in turns, ``pairs`` times: launch-bound GPU
                    # timings drift by tens of percent within minutes on a shared host, so
                    # each service measurement is compared with the offline one just before
                    pairs = []
                    for _ in range(args.pairs):
                        off = offline(model, [c], args.steps, args.repeats, device, autocast)[c]
                        svc = measure_level(url, c, args)
                        pairs.append({"offline_images_per_s": off,
                                      "service_requests_per_s": svc["requests_per_s"],
                                      "ratio": svc["requests_per_s"] / off,
                                      "offline_s_per_call": c / off,
                                      "service_device_call_s": svc["cycle"].get("run_s")})
                    ratios = sorted(pr["ratio"] for pr in pairs)
                    service[c] = dict(svc, pairs=pairs, vs_offline=statistics.median(ratios),
                                      vs_offline_range=[ratios[0], ratios[-1]],
                                      requests_per_s=statistics.median(
                                          pr["service_requests_per_s"] for pr in pairs))
                    results["offline_images_per_s"][c] = statistics.median(
                        pr["offline_images_per_s"] for pr in pairs)
        except ImportError as exc:
            results["service_skipped"] = f"ray not installed: {exc}"
    results["service"] = service
    out = Path(os.environ.get("OUT", "outputs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(results, indent=2))
    print_table(results, levels)


def print_table(r: dict[str, Any], levels: list[int]) -> None:
    print(f"\nserve_load  device={r['device']}  steps={r['steps']}  model={r['model']}  "
          f"path={r.get('path')}  cuda_graphs={r.get('cuda_graphs')}")
    print(f"{'conc/batch':>10} {'offline img/s':>14} {'service req/s':>14} {'ratio':>6} "
          f"{'p50 s':>7} {'p99 s':>7} {'batch':>6} {'queue s':>8} {'gen s':>7} {'other s':>8}")
    for c in levels:
        s = r["service"].get(c)
        off = r["offline_images_per_s"][c]
        if s:
            print(f"{c:>10} {off:>14.2f} {s['requests_per_s']:>14.2f} {s['vs_offline']:>6.2f} "
                  f"{s['p50_s']:>7.3f} {s['p99_s']:>7.3f} {s['mean_batch']:>6.1f} "
                  f"{s['replica_queue_p50_s']:>8.3f} {s['replica_generate_p50_s']:>7.3f} "
                  f"{s['outside_p50_s']:>8.3f}")
        else:
            print(f"{c:>10} {off:>14.2f} {'-':>14}")
    for c in levels:
        s = r["service"].get(c, {})
        if s.get("cycle"):
            print(f"device calls at concurrency {c} (median s): " + ", ".join(
                f"{k[:-2]} {v:.3f}" for k, v in s["cycle"].items()))
        if s.get("cpu_ms_per_request"):
            print(f"CPU ms per request at concurrency {c}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in s["cpu_ms_per_request"].items()))
    for c in levels:
        pairs = r["service"].get(c, {}).get("pairs")
        if pairs:
            print(f"pairs at concurrency {c} (offline img/s -> service req/s = ratio; offline "
                  "s/call vs the service's device call): " + "; ".join(
                      f"{p['offline_images_per_s']:.1f} -> {p['service_requests_per_s']:.1f} = "
                      f"{p['ratio']:.2f} ({p['offline_s_per_call']:.3f} vs "
                      f"{p['service_device_call_s'] or float('nan'):.3f})" for p in pairs))
    u = r.get("ug")
    if not u:
        return
    print(f"upsample guidance eta={u['eta']} m={u['m']}: +{100 * u['extra']:.1f}% time "
          f"(bound eta/m^2 = {100 * u['bound']:.1f}%, active pixel fraction "
          f"{100 * u['pixel_extra']:.1f}%); plain {u['plain_s']:.3f} s, UG {u['ug_s']:.3f} s")


if __name__ == "__main__":
    main()
