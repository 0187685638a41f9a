"""Scale Space Diffusion speed: SSD (Flexi-UNet) against DDPM-x0 at full resolution.

Same UNet width, same number of steps, same batch, one run: sampling time of the SSD chain
(``ssd-64-4l``: 8 -> 64 px) and of the full-resolution chain (``ddpm-x0-64``: the same
sampler with one level), and training images per second of both. On CUDA: bf16 autocast,
channels_last and torch.compile (one graph per (input, output) resolution pair, all compiled
before timing). Also prints the FLOPs per step of every level.

    python benchmarks/ssd_speed.py            # GPU, 64 px, batch 64, 1000 steps
    python benchmarks/ssd_speed.py --smoke    # tiny CPU run (< 1 minute)

Writes ``$OUT/ssd_speed.json`` (default ./outputs/bench). Needs no ray / mlflow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.networks import flexi_unet  # noqa: E402
from components.networks.registry import build_network  # noqa: E402
from components.ssd import SSDObjective, SSDProcess, respaced_steps, ssd_sample  # noqa: E402


class Autocast(nn.Module):
    """Runs the wrapped backbone under bf16 autocast (the sampler's maths stays float32)."""

    def __init__(self, net: nn.Module, enabled: bool) -> None:
        super().__init__()
        self.net, self.enabled = net, enabled

    def forward(self, *args, **kwargs):
        with torch.autocast("cuda", torch.bfloat16, enabled=self.enabled):
            return self.net(*args, **kwargs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prepare(preset: str, device: torch.device, compile_: bool, mode: str | None = None
            ) -> tuple[nn.Module, nn.Module]:
    """(module with parameters, callable net): channels_last, compiled on CUDA."""
    torch.manual_seed(0)
    net = build_network(preset).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    fn = torch.compile(net, dynamic=False, mode=mode) if compile_ else net
    return net, Autocast(fn, device.type == "cuda")


def pairs_of(process: SSDProcess, ks: list[int]) -> list[tuple[int, int]]:
    """(input, output) resolutions of the reverse steps over the visited states ks."""
    prev = [-1] + ks[:-1]
    return sorted({(process.res(k), process.res(j)) for j, k in zip(prev, ks, strict=True)})


def time_sampling(net: nn.Module, process: SSDProcess, batch: int, steps: int,
                  device: torch.device) -> float:
    """Seconds for one batch through the chain (after compiling every resolution pair)."""
    ks = respaced_steps(process.T, steps)
    # warm-up through the sampler itself (same dtypes and shapes as the timed chain), on a
    # respaced chain that still visits every (input, output) resolution pair
    warm = min(len(ks), 100)
    assert set(pairs_of(process, respaced_steps(process.T, warm))) == set(pairs_of(process, ks))
    gen = torch.Generator(device=device).manual_seed(0)
    ssd_sample(net, process, batch, gen, None, steps=warm, device=device)
    sync(device)
    t0 = time.perf_counter()
    ssd_sample(net, process, batch, gen, None, steps=steps, device=device)
    sync(device)
    return time.perf_counter() - t0


def time_training(params: nn.Module, net: nn.Module, process: SSDProcess, batch: int,
                  iters: int, device: torch.device) -> float:
    """Training images per second of the SSD objective (levels=1: DDPM-x0)."""
    objective = SSDObjective(process)
    opt = torch.optim.AdamW(params.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, process.base_resolution, process.base_resolution,
                        device=device) * 2 - 1
    data = {"images": images, "labels": None}

    def step() -> None:
        loss, _ = objective(net, data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sample_steps = objective.sample_steps
    for first, last in process.segments:  # warm-up: compile every resolution pair
        objective.sample_steps = lambda n, a=first, b=last: torch.randint(a, b + 1, (n,))
        step()
    objective.sample_steps = sample_steps
    torch.manual_seed(0)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return batch * iters / (time.perf_counter() - t0)


def flops_table(preset: str, process: SSDProcess) -> dict[str, float]:
    """GFLOPs per step (batch 1) of each resolution pair, and per 1000-step chain."""
    with torch.device("meta"):
        net = build_network(preset)
    pairs = pairs_of(process, list(range(process.T)))
    table = {f"{a}->{b}": flexi_unet.forward_flops(net, a, b) / 1e9 for a, b in pairs}
    chain = sum(table[f"{process.res(k)}->{process.res(k - 1)}"] for k in range(process.T))
    full = table[f"{process.base_resolution}->{process.base_resolution}"] * process.T
    return {**table, "chain_ssd": chain, "chain_full_res": full}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run")
    ap.add_argument("--preset", default="ssd-64-4l")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1000, help="sampling steps (both chains)")
    ap.add_argument("--train-iters", type=int, default=50)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--part", choices=("all", "sample", "train"), default="all",
                    help="time only sampling or only training (compiling both takes longest)")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.batch, args.steps, args.train_iters = "ssd-debug", 2, 20, 3
        torch.set_num_threads(1)  # tiny ops: avoid OpenMP oversubscription on a busy CPU
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    compile_ = device.type == "cuda" and not args.no_compile
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch._dynamo.config.cache_size_limit = 64
    baseline = flexi_unet.BASELINES[args.preset]
    res = flexi_unet.PRESETS[args.preset]["resolution"]
    ssd = SSDProcess(res, **flexi_unet.ssd_settings(args.preset))
    ddpm = SSDProcess(res, **{**flexi_unet.ssd_settings(args.preset), "levels": 1})

    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "preset": args.preset, "baseline": baseline, "batch": args.batch,
                     "steps": args.steps, "bf16": device.type == "cuda", "compiled": compile_,
                     "compile_mode": args.compile_mode, "levels": ssd.levels, "resolution": res}
    results["gflops_per_step"] = flops_table(args.preset, ssd)
    for name, preset, process in (("ssd", args.preset, ssd), ("ddpm_x0", baseline, ddpm)):
        params, net = prepare(preset, device, compile_, args.compile_mode)
        results[f"{name}_params"] = sum(p.numel() for p in params.parameters())
        t0 = time.perf_counter()
        if args.part in ("all", "sample"):
            results[f"{name}_sample_s"] = time_sampling(net.train(False), process, args.batch,
                                                        args.steps, device)
        if args.part in ("all", "train"):
            results[f"{name}_train_images_per_s"] = time_training(
                params.train(), net.train(), process, args.batch, args.train_iters, device)
        results[f"{name}_wall_s"] = time.perf_counter() - t0  # incl. compiling
        print(name, json.dumps({k: v for k, v in results.items() if k.startswith(name)}),
              flush=True)  # partial results survive a timeout
        del params, net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    nan = float("nan")
    for key, a, b in (("sampling_speedup", "ddpm_x0_sample_s", "ssd_sample_s"),
                      ("training_speedup", "ssd_train_images_per_s",
                       "ddpm_x0_train_images_per_s")):
        results[key] = results.get(a, nan) / results.get(b, nan)
    g = results["gflops_per_step"]
    results["flops_ratio"] = g["chain_full_res"] / g["chain_ssd"]

    out_dir = Path(os.environ.get("OUT", "./outputs/bench"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ssd_speed.json").write_text(json.dumps(results, indent=2))
    print("GFLOPs per step (batch 1): "
          + ", ".join(f"{k} {v:.2f}" for k, v in g.items() if "->" in k))
    print(f"\n{'':22}{'SSD (Flexi-UNet)':>18}{'DDPM-x0 full res':>18}{'ratio':>8}")
    r = {k: results.get(k, nan) for k in ("ssd_sample_s", "ddpm_x0_sample_s",
                                          "ssd_train_images_per_s",
                                          "ddpm_x0_train_images_per_s")}
    print(f"{'sampling s/batch':22}{r['ssd_sample_s']:18.3f}"
          f"{r['ddpm_x0_sample_s']:18.3f}{results['sampling_speedup']:8.2f}")
    print(f"{'train images/s':22}{r['ssd_train_images_per_s']:18.1f}"
          f"{r['ddpm_x0_train_images_per_s']:18.1f}{results['training_speedup']:8.2f}")
    print(f"{'GFLOPs per chain':22}{g['chain_ssd']:18.1f}{g['chain_full_res']:18.1f}"
          f"{results['flops_ratio']:8.2f}")
    print(f"({results['device']}, {args.preset} vs {baseline}, batch {args.batch}, "
          f"{args.steps} steps, bf16={results['bf16']}, compiled={compile_})")


if __name__ == "__main__":
    main()
