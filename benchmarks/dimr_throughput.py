"""Training throughput of DiMR (TD-LN), our DiT (adaLN-Zero) and diffusers' DiT, one run.

For each model: training images per second (forward, loss, backward, fused AdamW step) at the
same batch, achieved TFLOP/s (FLOPs of one step counted with ``torch.utils.flop_counter``),
peak memory, and each as a fraction of the bf16 matmul rate measured in the same run.
On GPU: CUDA, bf16 autocast, ``torch.compile`` (diffusers also eager: the reference point,
DiT-B/2 pixel 32x32 batch 256 eager = 0.32 of the matmul rate on an H200). Models:

    dimr         dimr-32-2r with the multi-scale loss (all branches)
    dimr_tbranch DiMR's Transformer branch alone (goal: >= 0.45 of the matmul rate)
    dit          our dit-b2-32 (FLOP-matched to dimr-32-2r)
    unet         prism's CIFAR-10 UNet (ddpm-cifar10) with 10 classes: S4's third row
    diffusers    diffusers.DiTTransformer2DModel of dit-b2-32's size (skipped if absent)

``--compile-mode reduce-overhead`` compiles with CUDA graphs (``run.compile_mode`` of
``prism train``); the default is torch.compile's default mode.

Every model and its batch are in ``torch.channels_last`` on CUDA, as ``prism train`` puts them
(``run.channels_last: auto``); ``--layouts channels_last,contiguous`` adds rows named
``<model>@contiguous`` without it, in the same run (DiMR's 7x7 depthwise convolutions run
PyTorch's native kernels instead of cuDNN's when their weights are contiguous). On CPU the
default layout is contiguous.

Usage: ``python benchmarks/dimr_throughput.py [--batch 256] [--steps 30] [--profile]``;
``--smoke`` runs the debug presets on CPU in seconds. ``--profile`` also runs each model's
timed step under ``torch.profiler`` and splits its kernel time by op class (matmul, attention,
norm, elementwise, optimizer, copy; ``benchmarks/train_profile.py``), with the gap no kernel
fills: what bounds each model's fraction of the matmul rate. Results: JSON in $OUT
(default ./outputs/bench), a table printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_profile import CLASSES, class_cells, profiled  # noqa: E402
from components.multiscale import multiscale_targets  # noqa: E402
from components.networks.registry import build_network  # noqa: E402
from components.networks.tdln import count_parameters, time_coordinate  # noqa: E402


class TransformerBranch(nn.Module):
    """DiMR's coarsest branch alone (embedding, class token, blocks, head): its eps."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor) -> list[Tensor]:
        tokens = self.net._tokens(c_noise, labels, x.shape[0])
        eps, _ = self.net.branches[0](x, time_coordinate(c_noise), None, tokens, head=True,
                                     cascade=False)
        return [eps]


def matmul_tflops(device: torch.device, n: int, iters: int) -> float:
    """Achieved bf16 (CPU: fp32) matmul TFLOP/s on n x n x n products."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model: nn.Module, call: Callable, opt: torch.optim.Optimizer, batch: dict,
              device: torch.device) -> Callable[[], Tensor]:
    """One training step: autocast forward, mse (multi-scale for lists), backward, AdamW."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> Tensor:
        with autocast:
            out = call(batch)
        if isinstance(out, list):  # multi-scale: sum_b c_b mse(eps_b, k_b D_kb[eps])
            k = [batch["x"].shape[-1] // o.shape[-1] for o in out]
            targets = multiscale_targets(batch["eps"], k)
            coeffs = [4.0 ** -(len(out) - 1 - b) for b in range(len(out))]
            loss = sum(c * F.mse_loss(o.float(), t) for c, o, t in zip(coeffs, out, targets,
                                                                         strict=True))
        else:
            loss = F.mse_loss(out.float(), batch["eps"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def build_models(args: argparse.Namespace) -> dict[str, tuple[nn.Module, Callable, bool]]:
    """name -> (module, call(batch) -> output, compile?)."""
    dimr_name, dit_name = ("dimr-debug", "dit-debug") if args.smoke else ("dimr-32-2r",
                                                                           "dit-b2-32")
    dimr = build_network(dimr_name)
    models: dict[str, tuple[nn.Module, Callable, bool]] = {
        "dimr": (dimr, lambda m: lambda b: m(b["x"], b["c"], b["y"], return_all=True), True),
        "dimr_tbranch": (TransformerBranch(build_network(dimr_name)),
                         lambda m: lambda b: m(b["x"], b["c"], b["y"]), True),
    }
    dit = build_network(dit_name)
    models["dit"] = (dit, lambda m: lambda b: m(b["x"], b["c"], b["y"]), True)
    # S4's third row: prism's CIFAR-10 UNet made class-conditional (cifar10-ddpm-eps.yaml)
    unet = build_network("unet-debug" if args.smoke else "ddpm-cifar10",
                         num_classes=dit.cfg.num_classes, resolution=dit.cfg.resolution)
    models["unet"] = (unet, lambda m: lambda b: m(b["x"], b["c"], b["y"]), True)
    try:
        # deferred: diffusers is optional here (the reference is skipped without it)
        from diffusers import DiTTransformer2DModel
    except ImportError:
        print("diffusers is not installed: skipping diffusers.DiTTransformer2DModel")
        return models
    cfg = dit.cfg

    def hf() -> nn.Module:
        return DiTTransformer2DModel(
            num_attention_heads=cfg.num_heads, attention_head_dim=cfg.dim // cfg.num_heads,
            in_channels=cfg.in_channels, out_channels=cfg.in_channels,
            num_layers=cfg.depth, patch_size=cfg.patch, sample_size=cfg.resolution,
            num_embeds_ada_norm=cfg.num_classes, norm_type="ada_norm_zero")

    call = lambda m: lambda b: m(b["x"], timestep=b["t"], class_labels=b["y_hf"]).sample  # noqa: E731
    models["diffusers_eager"] = (hf(), call, False)
    models["diffusers"] = (hf(), call, True)
    return models


def bench_one(name: str, model: nn.Module, call_of: Callable, compile_: bool,
              batch: dict, args: argparse.Namespace, device: torch.device,
              layout: torch.memory_format = torch.contiguous_format) -> dict[str, Any]:
    model = model.to(device).train().to(memory_format=layout)
    batch = {k: v.contiguous(memory_format=layout) if v.dim() == 4 else v
             for k, v in batch.items()}
    groups = model.param_groups(0.0) if hasattr(model, "param_groups") else model.parameters()
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=device.type == "cuda")
    # FLOPs of one training step (forward + backward), counted eagerly
    with FlopCounterMode(display=False) as fc:
        make_step(model, call_of(model), opt, batch, device)()
    flops = fc.get_total_flops()
    torch._dynamo.reset()
    runner = torch.compile(model, mode=args.compile_mode, dynamic=False) \
        if compile_ and args.compile else model
    step = make_step(model, call_of(runner), opt, batch, device)
    if device.type == "cuda":  # before warm-up: CUDA graphs take their pool at capture
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    out = {"params_M": count_parameters(model) / 1e6, "step_ms": 1e3 * dt,
           "images_per_s": args.batch / dt, "gflop_per_step": flops / 1e9,
           "tflops": flops / dt / 1e12, "loss": float(loss),
           "compiled": bool(compile_ and args.compile),
           "compile_mode": args.compile_mode if compile_ and args.compile else None}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.profile:
        prof = profiled(step, args.steps, device)
        kernel_ms = sum(prof["per_class_ms"].values())
        out.update(kernel_ms=kernel_ms, gap_ms=max(out["step_ms"] - kernel_ms, 0.0), **prof)
    model.to("cpu")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile's mode (prism train's run.compile_mode)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the debug presets")
    p.add_argument("--models", default=None,
                   help="comma list of models to time (default all): dimr, dimr_tbranch, dit, "
                        "unet, diffusers_eager, diffusers")
    p.add_argument("--layouts", default=None,
                   help="comma list of memory layouts: channels_last, contiguous (default: "
                        "channels_last on CUDA, as prism train; contiguous on CPU); rows of "
                        "the default layout are named <model>, others <model>@<layout>")
    p.add_argument("--profile", action="store_true",
                   help="split each model's step by op class under torch.profiler")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.batch, args.steps, args.warmup, args.compile = 4, 2, 1, False
    elif device.type != "cuda":
        sys.exit("no CUDA device: run with --smoke on CPU")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    models = build_models(args)
    res = next(iter(models.values()))[0].cfg.resolution
    n_cls = models["dit"][0].cfg.num_classes
    B = args.batch
    batch = {"x": torch.randn(B, 3, res, res, device=device),
             "eps": torch.randn(B, 3, res, res, device=device),
             "c": torch.rand(B, 1, device=device) * 2 - 1,
             "y": torch.randint(0, n_cls, (B,), device=device),
             "t": torch.randint(0, 1000, (B,), device=device)}
    batch["y_hf"] = batch["y"]
    mm = matmul_tflops(device, 8192 if device.type == "cuda" else 256,
                       50 if device.type == "cuda" else 3)
    results: dict[str, Any] = {}
    keep = set(args.models.split(",")) if args.models else set(models)
    layouts = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    default = "channels_last" if device.type == "cuda" else "contiguous"
    wanted = args.layouts.split(",") if args.layouts else [default]
    if unknown := set(wanted) - set(layouts):
        sys.exit(f"unknown layouts {sorted(unknown)}; known: {sorted(layouts)}")
    runs = [(name, name if lay == default else f"{name}@{lay}", layouts[lay])
            for name in models if name in keep for lay in wanted]
    for name, row, layout in runs:
        model, call_of, compile_ = models[name]
        try:
            results[row] = bench_one(row, model, call_of, compile_, batch, args, device,
                                     layout)
            results[row]["fraction_of_matmul"] = results[row]["tflops"] / mm
            results[row]["layout"] = str(layout).removeprefix("torch.")
        except Exception as err:  # record and go on: one failing model must not hide the rest
            results[row] = {"error": f"{type(err).__name__}: {err}"}
        print(row, json.dumps(results[row]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "batch": B, "resolution": res,
              "matmul_tflops": mm, "bf16_autocast": device.type == "cuda",
              "models": results, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
    out_dir = Path(os.environ.get("OUT", "./outputs/bench"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dimr_throughput.json").write_text(json.dumps(report, indent=2))
    print(f"\n{report['device']}  batch {B}  {res}x{res}  matmul {mm:.1f} TFLOP/s")
    print(f"{'model':<24}{'params M':>9}{'img/s':>10}{'TFLOP/s':>9}{'of mm':>7}{'mem GiB':>9}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<24} error: {r['error'][:80]}")
            continue
        print(f"{name:<24}{r['params_M']:>9.1f}{r['images_per_s']:>10.0f}{r['tflops']:>9.2f}"
              f"{r['fraction_of_matmul']:>7.2f}{r.get('peak_mem_gib', float('nan')):>9.2f}")
    profiled_rows = {n: r for n, r in results.items() if "per_class_ms" in r}
    if profiled_rows:
        print("\nms per step (share of the step): gap and kernels by op class")
        print(f"{'model':<24}{'step':>8}{'gap':>14}" + "".join(f" {c[:11]:>14}" for c in CLASSES))
        for name, r in profiled_rows.items():
            w = r["step_ms"]
            print(f"{name:<24}{w:>8.2f}{r['gap_ms']:>7.2f} ({r['gap_ms'] / w:>4.0%})"
                  + class_cells(r["per_class_ms"], w))


if __name__ == "__main__":
    main()
