"""Upsample guidance and cascaded upscaling: extra cost against plain sampling, one run.

A UNet trained at r (``ddpm-cifar10``, r = 32) generates at m r = 64 with DPM-Solver++(2M):
- ``plain``: the reference, the network applied at 64 px;
- ``ug_eta1`` / ``ug_eta05``: upsample guidance active for all / the first half of t;
- ``cascade``: low resolution until the chromatogram's hand-off, then 64 px;
- ``sdedit``: a full 32 px sample, bilinear upsample, re-noise to lambda = -2 log m, finish
  at 64 px (the baseline).
Reports wall time per batch, network evaluations and pixels, and the measured extra cost of
UG against its bound eta / m^2. Weights are random: this measures cost, not quality.
On CUDA: bf16 autocast, channels_last and torch.compile (every shape compiled before timing).

    python benchmarks/upsample_guidance.py            # GPU: batch 64, 20 steps
    python benchmarks/upsample_guidance.py --smoke    # tiny CPU run (< 1 minute)

Writes ``$OUT/upsample_guidance.json`` (default ./outputs/bench). Needs no ray / mlflow.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.diffusion import Cond, NetworkDenoiser  # noqa: E402
from components.guidance import (  # noqa: E402
    CountingDenoiser,
    UpsampleGuidance,
    cascaded_upscale,
    sdedit_upscale,
)
from components.networks.registry import build_network  # noqa: E402
from components.samplers import generators_from_seeds, lambda_grid, sample_dpmpp_2m  # noqa: E402
from components.schedules import CosineSchedule  # noqa: E402


class Autocast(nn.Module):
    """The backbone under bf16 autocast on CUDA; float32 output for the sampler's maths."""

    def __init__(self, net: nn.Module, enabled: bool) -> None:
        super().__init__()
        self.net, self.enabled = net, enabled

    def forward(self, x, c_noise, class_labels=None):
        if self.enabled:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", torch.bfloat16, enabled=self.enabled):
            return self.net(x, c_noise, class_labels).float()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def methods(den, schedule, steps: int, m: int):
    """name -> callable(x_high_noise, x_low_noise, generators) -> samples."""
    lams = lambda_grid(schedule, steps)
    lams_low = lambda_grid(schedule, steps)  # the low-res model's own grid for SDEdit's stage 1
    re_noise = lambda_grid(schedule, steps // 2, t_start=float(schedule.t_of_lambda(
        torch.tensor(-2.0 * math.log(m), dtype=torch.float64))))

    def plain(x, x_low, gens):
        return sample_dpmpp_2m(den, x, lams, Cond())

    def ug(eta):
        def run(x, x_low, gens):
            g = UpsampleGuidance.from_eta(den, schedule, eta=eta, m=m, theta=1.3)
            return sample_dpmpp_2m(g, x, lams, Cond())
        return run

    def cascade(x, x_low, gens):
        return cascaded_upscale(den, x_low, lams, Cond(), m=m, sampler="dpmpp_2m",
                                generators=gens)

    def sdedit(x, x_low, gens):
        low = sample_dpmpp_2m(den, x_low, lams_low, Cond())
        return sdedit_upscale(den, low, re_noise, Cond(), m=m, sampler="dpmpp_2m",
                              generators=gens)

    return {"plain": plain, "ug_eta1": ug(1.0), "ug_eta05": ug(0.5), "cascade": cascade,
            "sdedit": sdedit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    preset, batch, steps, repeats = "ddpm-cifar10", args.batch, args.steps, args.repeats
    if args.smoke:
        preset, batch, steps, repeats = "unet-debug", 2, 4, 1
    m = 2
    torch.manual_seed(0)
    net = build_network(preset).to(device).train(False)
    r = {"unet-debug": 16, "ddpm-cifar10": 32}[preset]  # the preset's trained resolution
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
        net = torch.compile(net, dynamic=False)
    den = CountingDenoiser(NetworkDenoiser(Autocast(net, device.type == "cuda"), "eps"))
    schedule = CosineSchedule.shifted(r * m, 64)
    x = torch.randn(batch, 3, r * m, r * m, device=device)
    x_low = torch.randn(batch, 3, r, r, device=device)
    results = {}
    with torch.no_grad():
        for name, fn in methods(den, schedule, steps, m).items():
            gens = generators_from_seeds(range(batch), device=device)
            fn(x, x_low, gens)  # warm-up: compiles every shape this method uses
            sync(device)
            den.calls = den.images = den.pixels = 0
            t0 = time.perf_counter()
            for _ in range(repeats):
                out = fn(x, x_low, generators_from_seeds(range(batch), device=device))
            sync(device)
            dt = (time.perf_counter() - t0) / repeats
            assert out.shape == x.shape and torch.isfinite(out).all(), name
            results[name] = {"seconds_per_batch": dt, "images_per_second": batch / dt,
                             "evals_per_batch": den.calls / repeats,
                             "pixels_per_image": den.pixels / repeats / batch}
    ref = results["plain"]
    for res in results.values():
        res["time_vs_plain"] = res["seconds_per_batch"] / ref["seconds_per_batch"]
        res["pixels_vs_plain"] = res["pixels_per_image"] / ref["pixels_per_image"]
    bound = {"ug_eta1": 1.0 / m**2, "ug_eta05": 0.5 / m**2}
    for name, b in bound.items():
        results[name]["extra_cost_bound"] = b
    doc = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "preset": preset, "trained_resolution": r, "m": m, "batch": batch, "steps": steps,
           "sampler": "dpmpp_2m", "bf16_compile": device.type == "cuda", "results": results}
    out_dir = Path(os.environ.get("OUT", "./outputs/bench"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "upsample_guidance.json").write_text(json.dumps(doc, indent=1))
    print(f"{preset} at {r} px -> {r * m} px, batch {batch}, {steps} steps, {doc['device']}")
    print(f"{'method':10s} {'s/batch':>9s} {'img/s':>8s} {'evals':>6s} {'time/plain':>11s} "
          f"{'pixels/plain':>13s} {'UG bound':>9s}")
    for name, res in results.items():
        b = res.get("extra_cost_bound")
        print(f"{name:10s} {res['seconds_per_batch']:9.3f} {res['images_per_second']:8.1f} "
              f"{res['evals_per_batch']:6.0f} {res['time_vs_plain']:11.3f} "
              f"{res['pixels_vs_plain']:13.3f} {f'+{b:.3f}' if b else '':>9s}")


if __name__ == "__main__":
    main()
