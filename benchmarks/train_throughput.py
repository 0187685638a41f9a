"""Training throughput: our DDPM UNet against diffusers' UNet2DModel in the same configuration.

Same run, same batch (128 at 32x32, 64 at 64x64), bf16 autocast, fused AdamW, channels_last;
one training step = noise, forward, MSE to eps, backward, clip, AdamW step. Every model runs
in each execution mode asked for (``eager``, ``torch.compile`` ``default``, ``reduce-overhead``
= CUDA graphs), and diffusers' UNet in both attention layouts a diffusers user meets: one head
per block (``attention_head_dim=None``) and the library default (8 channels per head). The
ratio is our fastest row against diffusers' fastest row. Also reported: achieved TFLOP/s
(FLOPs of one step counted with torch.utils.flop_counter) against a bf16 matmul measured in
the same run, the first steps' seconds (compilation) and peak memory.

    python benchmarks/train_throughput.py            # GPU: both resolutions
    python benchmarks/train_throughput.py --smoke    # CPU, tiny models, eager, a few seconds
    python benchmarks/train_throughput.py --resolutions 32 --batch 256   # beside the recipe's

Results: JSON in $OUT (default ./outputs/bench)/train_throughput.json; a table is printed last.
No Ray or MLflow needed.
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
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.networks.registry import build_network  # noqa: E402

# (our preset, diffusers block types (down), batch) per resolution; attention at 16x16
CASES = {
    32: ("ddpm-cifar10", ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"), 128),
    64: ("unet-64", ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"), 64),
}
SMOKE = {16: ("unet-debug", ("DownBlock2D", "AttnDownBlock2D"), 4)}


HEAD_DIMS = {"one-head": None, "default-heads": 8}  # diffusers' attention_head_dim settings


def diffusers_unet(resolution: int, down: tuple[str, ...], smoke: bool,
                   head_dim: int | None = None) -> nn.Module | None:
    """diffusers' UNet2DModel with the same widths, depth and attention level, or None.
    ``head_dim`` None gives one head per attention block; 8 is diffusers' default."""
    try:
        # deferred: diffusers is optional here (the reference is skipped without it)
        from diffusers import UNet2DModel
    except ImportError:
        print("diffusers is not installed: skipping the reference (pip install diffusers)")
        return None
    up = tuple(b.replace("Down", "Up") for b in reversed(down))
    channels = (32, 64) if smoke else (128, 256, 256, 256)
    return UNet2DModel(sample_size=resolution, in_channels=3, out_channels=3,
                       block_out_channels=channels, layers_per_block=1 if smoke else 2,
                       down_block_types=down, up_block_types=up, dropout=0.0 if smoke else 0.1,
                       attention_head_dim=head_dim, norm_num_groups=32)


def step_fn(model: nn.Module, ours: bool, opt: torch.optim.Optimizer, device: torch.device,
            bf16: bool, graphs: bool = False):
    """One training step on a fixed batch shape (noise drawn each step); ``graphs`` when the
    model runs as CUDA graphs (``torch.compile`` mode ``reduce-overhead``)."""

    def forward(x0: torch.Tensor) -> torch.Tensor:
        b = x0.shape[0]
        t = torch.rand(b, device=device)
        alpha_bar = torch.cos(t * 1.5707963) ** 2  # a cosine schedule is enough to time
        eps = torch.randn_like(x0)
        a = alpha_bar.sqrt()[:, None, None, None]
        s = (1 - alpha_bar).sqrt()[:, None, None, None]
        x_t = a * x0 + s * eps
        if ours:  # c_noise = lambda / 15
            lam = torch.log(alpha_bar.clamp(1e-6, 1 - 1e-6)) - torch.log1p(-alpha_bar.clamp(
                1e-6, 1 - 1e-6))
            out = model(x_t, (lam / 15).reshape(-1, 1), None)
        else:
            out = model(x_t, t * 999).sample
        return (out.float() - eps).square().mean()

    def step(x0: torch.Tensor) -> torch.Tensor:
        if graphs:  # a new iteration: the graphs' previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else \
            torch.autocast(device.type, enabled=False)
        with ctx:
            loss = forward(x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return forward, step


def count_flops(forward, x0: torch.Tensor) -> float:
    """FLOPs of one forward + backward (torch.utils.flop_counter, eager)."""
    with FlopCounterMode(display=False) as fc:
        forward(x0).backward()
    return float(fc.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_model(model: nn.Module, ours: bool, res: int, batch: int, device: torch.device,
               steps: int, warmup: int, mode: str) -> dict[str, float]:
    """Images/s of the training step in ``mode`` (eager or a ``torch.compile`` mode)."""
    model = model.to(device).train()
    bf16 = device.type == "cuda"
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    forward, _ = step_fn(model, ours, opt, device, bf16)
    x0 = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    if bf16:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    flops = count_flops(forward, x0)
    opt.zero_grad(set_to_none=True)
    # dynamic=False and a reset per model: the same forward code at a second resolution must
    # not fall back to a dynamic-shape recompile (slow to build, slower to run).
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runner = model if mode == "eager" else torch.compile(model, dynamic=False, mode=mode)
    _, step = step_fn(runner, ours, opt, device, bf16, graphs=mode == "reduce-overhead")
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(x0)
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(x0)
    sync(device)
    seconds = time.perf_counter() - t0
    assert torch.isfinite(loss), "non-finite loss"
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"images_per_second": steps * batch / seconds, "step_ms": 1e3 * seconds / steps,
            "gflop_per_step": flops / 1e9, "tflops": flops * steps / seconds / 1e12,
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "warmup_seconds": warm, "peak_memory_gib": peak}


def matmul_tflops(device: torch.device, smoke: bool) -> float:
    """Measured dense matmul rate: bf16 on GPU (8192^3), fp32 on CPU (smoke)."""
    n = 512 if smoke else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 3 if smoke else 50
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (< 1 minute)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--resolutions", type=int, nargs="*", default=[32, 64])
    ap.add_argument("--modes", nargs="*", default=["default", "reduce-overhead"],
                    help="execution modes of our UNet: eager, default, reduce-overhead")
    ap.add_argument("--ref-modes", nargs="*", default=["default", "reduce-overhead"],
                    help="execution modes of diffusers' UNet")
    ap.add_argument("--heads", nargs="*", default=list(HEAD_DIMS), choices=list(HEAD_DIMS),
                    help="diffusers attention layouts")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch for every resolution (default: the recipe's, 128 at 32x32 and "
                         "64 at 64x64): the best batch beside the recipe's")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cases = SMOKE if args.smoke else {r: CASES[r] for r in args.resolutions}
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    modes, ref_modes = (["eager"], ["eager"]) if device.type == "cpu" else \
        (args.modes, args.ref_modes)
    torch.manual_seed(0)
    peak = matmul_tflops(device, args.smoke)
    rows = []
    for res, (preset, down, batch) in cases.items():
        batch = args.batch if args.batch and not args.smoke else batch
        models = [(f"ours {m}", True, m, lambda p=preset: build_network(p)) for m in modes]
        models += [(f"diffusers {h} {m}", False, m,
                    lambda h=h, r=res, d=down: diffusers_unet(r, d, args.smoke, HEAD_DIMS[h]))
                   for h in args.heads for m in ref_modes]
        runs = {}
        for name, ours, mode, make in models:
            torch.manual_seed(0)
            net = make()
            if net is None:
                continue
            runs[name] = time_model(net, ours, res, batch, device, steps, warmup, mode)
            print(json.dumps({"resolution": res, "model": name, **runs[name]}), flush=True)
            del net
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row = {"resolution": res, "batch": batch, "preset": preset, "models": runs}
        best = {k: max((n for n in runs if n.startswith(k)),
                       key=lambda n: runs[n]["images_per_second"], default=None)
                for k in ("ours", "diffusers")}
        row["fastest"] = best
        if best["ours"] and best["diffusers"]:
            row["ratio"] = runs[best["ours"]]["images_per_second"] / \
                runs[best["diffusers"]]["images_per_second"]
        rows.append(row)
    out = Path(os.environ.get("OUT", "outputs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(device),
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "bf16": device.type == "cuda",
              "matmul_tflops": peak, "smoke": args.smoke, "command": " ".join(sys.argv),
              "results": rows}
    (out / "train_throughput.json").write_text(json.dumps(result, indent=1))
    print(f"\nmatmul ({'bf16' if device.type == 'cuda' else 'fp32'}): {peak:.3g} TFLOP/s  "
          f"device {result['gpu']}")
    print(f"{'res':>4} {'batch':>5} {'model':>36} {'params M':>9} {'img/s':>9} {'TFLOP/s':>8} "
          f"{'of peak':>8} {'warm s':>7} {'GiB':>6}")
    for r in rows:
        for name, m in r["models"].items():
            gib = f"{m['peak_memory_gib']:.2f}" if m["peak_memory_gib"] is not None else "-"
            print(f"{r['resolution']:>4} {r['batch']:>5} {name:>36} {m['parameters_m']:>9.1f} "
                  f"{m['images_per_second']:>9.1f} {m['tflops']:>8.3g} "
                  f"{m['tflops'] / peak:>8.1%} {m['warmup_seconds']:>7.1f} {gib:>6}")
        if "ratio" in r:
            print(f"{'':>4} {'':>5} {'fastest ours / fastest diffusers':>36} {'':>9} "
                  f"{r['ratio']:>9.2f}x")


if __name__ == "__main__":
    main()
