"""Where the UNet training step's time goes: device time per op class and the launch gaps.

The same step as ``benchmarks/train_throughput.py`` (noise, forward, MSE, backward, clip, fused
AdamW; bf16 autocast and channels_last on CUDA), run under ``torch.profiler`` for a few steps
after warm-up, per resolution and per execution mode (eager, ``torch.compile`` modes). Every
device kernel is put in one class by its name:

    conv         convolution kernels (cuDNN, implicit GEMM, layout transforms around them)
    matmul       other GEMMs (attention projections, embeddings, linear layers)
    attention    fused attention kernels (flash / memory-efficient SDPA)
    norm         GroupNorm / LayerNorm kernels, compiled fusions that contain them
    optimizer    AdamW, gradient clipping, zeroing (foreach / fused multi-tensor kernels)
    copy         dtype casts and memory copies
    elementwise  every other kernel (activations, residual adds, compiled pointwise fusions)

``gap`` is the wall time per step that no kernel fills (launch overhead, host work,
synchronisation): wall - sum of kernel times.

    python benchmarks/train_profile.py                    # GPU: 32x32 b128 and 64x64 b64
    python benchmarks/train_profile.py --smoke            # CPU, tiny model, seconds (CPU ops)

Results: JSON in $OUT (default ./outputs/bench)/train_profile.json (with the 25 longest kernels
of every case); a table is printed last. No Ray or MLflow needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.train_throughput import CASES, SMOKE, step_fn, sync  # noqa: E402
from components.networks.registry import build_network  # noqa: E402

CLASSES = ("conv", "matmul", "attention", "norm", "optimizer", "copy", "elementwise")
_RULES = (  # first match wins; names lower-cased
    ("optimizer", ("adam", "foreach", "multi_tensor", "clip_grad", "zero_")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cutlass_mha")),
    ("conv", ("conv", "cudnn", "implicit", "fprop", "dgrad", "wgrad", "nchw", "nhwc")),
    ("norm", ("group_norm", "layer_norm", "native_norm", "groupnorm", "layernorm",
              "native_group", "native_layer")),
    ("matmul", ("gemm", "nvjet", "cutlass", "cublas", "matmul", "::mm", "_mm", "mm_", "bmm",
                "addmm", "sm90_", "sm80_", "ampere", "hopper")),
    ("copy", ("copy", "cast", "convert", "_to_copy", "memcpy", "memset", "fill")),
)


def op_class(name: str) -> str:
    """The class of a kernel (or, on CPU, an aten op) by its name."""
    low = name.lower()
    for cls, needles in _RULES:
        if any(n in low for n in needles):
            return cls
    return "elementwise"


def profiled(step: Callable[[], object], steps: int, device: torch.device) -> dict:
    """``steps`` calls of ``step`` under ``torch.profiler``: kernel ms per step by op class
    (:func:`op_class`) and the 25 longest kernels. On CUDA only device kernels count (a
    CPU-side op or a graph replay carries its children's device time, which would count a
    kernel twice); on CPU the leaf aten ops' own time."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts):  # the profiler's own first-use cost
        step()
        sync(device)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(device)
    per_class = dict.fromkeys(CLASSES, 0.0)
    kernels = []
    for ev in prof.key_averages():
        if device.type == "cuda":
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = ev.self_device_time_total
        else:
            us = ev.self_cpu_time_total if ev.key.startswith("aten::") else 0.0
        if us <= 0:
            continue
        ms = us / 1e3 / steps
        cls = op_class(ev.key)
        per_class[cls] += ms
        kernels.append({"name": ev.key[:160], "class": cls, "ms_per_step": ms,
                        "calls_per_step": ev.count / steps})
    kernels.sort(key=lambda k: -k["ms_per_step"])
    return {"per_class_ms": per_class, "top_kernels": kernels[:25]}


def class_cells(per_class_ms: dict[str, float], wall_ms: float) -> str:
    """The table cells of one case: ms per step by class, with its share of the wall time."""
    return "".join(f" {per_class_ms[c]:>6.2f} ({per_class_ms[c] / wall_ms:>4.0%})"
                   for c in CLASSES)


def profile_case(preset: str, res: int, batch: int, mode: str, device: torch.device,
                 steps: int, warmup: int) -> dict:
    """Wall ms per step, kernel ms per step by class, the gap, and the longest kernels."""
    torch.manual_seed(0)
    model = build_network(preset).to(device).train()
    bf16 = device.type == "cuda"
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    torch._dynamo.reset()
    runner = model if mode == "eager" else torch.compile(model, dynamic=False, mode=mode)
    _, step = step_fn(runner, True, opt, device, bf16)
    x0 = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    if bf16:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(x0)
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):  # timed without the profiler
        step(x0)
    sync(device)
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    prof = profiled(lambda: step(x0), steps, device)
    busy = sum(prof["per_class_ms"].values())
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"preset": preset, "resolution": res, "batch": batch, "mode": mode,
            "warmup_seconds": warm_s, "wall_ms": wall_ms, "images_per_second":
            1e3 * batch / wall_ms, "kernel_ms": busy, "gap_ms": max(wall_ms - busy, 0.0),
            "per_class_ms": prof["per_class_ms"], "peak_memory_gib": peak,
            "top_kernels": prof["top_kernels"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (seconds)")
    ap.add_argument("--resolutions", type=int, nargs="*", default=[32, 64])
    ap.add_argument("--modes", nargs="*", default=["eager", "default"],
                    help="eager and/or torch.compile modes (default, reduce-overhead, "
                         "max-autotune-no-cudagraphs)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cases = SMOKE if args.smoke else {r: CASES[r] for r in args.resolutions}
    modes = ["eager"] if args.smoke else args.modes
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    out = Path(os.environ.get("OUT", "outputs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(device),
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "command": " ".join(sys.argv), "results": rows}
    for res, (preset, _, batch) in cases.items():
        for mode in modes:
            row = profile_case(preset, res, batch, mode, device, steps, warmup)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
            # written after every case: a run cut off by its time limit keeps what it measured
            (out / "train_profile.json").write_text(json.dumps(result, indent=1))
    print(f"\ndevice {result['gpu']}; ms per step (share of wall)")
    head = f"{'res':>4} {'batch':>5} {'mode':>16} {'img/s':>8} {'wall':>7} {'gap':>12}"
    print(head + "".join(f" {c[:11]:>14}" for c in CLASSES))
    for r in rows:
        w = r["wall_ms"]
        cells = class_cells(r["per_class_ms"], w)
        print(f"{r['resolution']:>4} {r['batch']:>5} {r['mode']:>16} "
              f"{r['images_per_second']:>8.0f} {w:>7.2f} {r['gap_ms']:>5.2f} "
              f"({r['gap_ms'] / w:>4.0%}){cells}")


if __name__ == "__main__":
    main()
