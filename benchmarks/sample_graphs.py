"""Sampling with the network as CUDA graphs against eager: same images? how much faster?

    python benchmarks/sample_graphs.py --model DIR_OR_URI [--steps 32] [--batches 1,8,32]

The same model loaded twice (``serving.loading.load_served_model`` with and without
``cuda_graphs``), ``generate`` under bf16 autocast as the service runs it:
1. per batch size, the median seconds per call of each (after one warm-up call, which records
   the graphs), the ratio, and the largest difference between their images (uint8 levels;
   cuDNN may pick other kernels for a padded batch, so a level or two is expected, not more);
2. every sampling path the service offers (``--path-steps`` steps, 5 images): DDPM, upsample
   guidance 2x, the cascade, classes with classifier-free guidance (the network batch
   doubles) and a spectral schedule where the model has them: the largest difference from
   eager, and whether the path fell back to eager (a capture that failed).
Needs CUDA. A table printed last, JSON in $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.generate import generate, to_uint8  # noqa: E402
from serving.loading import load_served_model, normalize_uri  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--path-steps", type=int, default=12)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA (CUDA graphs)")
    uri = normalize_uri(args.model)
    eager, _ = load_served_model(uri, "cuda")
    graphed, info = load_served_model(uri, "cuda", cuda_graphs=True)
    assert info["cuda_graphs"], info

    def run(model, b: int, steps: int = args.steps, **kw) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return generate(model, seeds=list(range(1000, 1000 + b)), steps=steps,
                            device="cuda", **kw)

    def timed(model, b: int) -> tuple[float, torch.Tensor]:
        out = run(model, b)  # warm-up (records the graphs of this size)
        ts = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            run(model, b)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts), out

    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        te, ie = timed(eager, b)
        tg, ig = timed(graphed, b)
        diff = (to_uint8(ie).int() - to_uint8(ig).int()).abs()
        rows.append({"batch": b, "eager_s": te, "graphs_s": tg, "speedup": te / tg,
                     "eager_img_per_s": b / te, "graphs_img_per_s": b / tg,
                     "max_level_diff": int(diff.max()),
                     "mean_level_diff": float(diff.float().mean())})
    paths = {}
    for name, kw in sampling_paths(eager).items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ie, ig = run(eager, 5, args.path_steps, **kw), run(graphed, 5, args.path_steps, **kw)
        paths[name] = {"max_level_diff": int((to_uint8(ie).int() - to_uint8(ig).int()).abs().max()),
                       "eager_fallback": [str(w.message)[:200] for w in caught
                                          if "CUDA graph" in str(w.message)]}
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model,
           "steps": args.steps, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "graphs_recorded": graphed.net.graphs, "rows": rows, "paths": paths}
    out = Path(os.environ.get("OUT", "outputs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sample_graphs.json").write_text(json.dumps(res, indent=2))
    print(f"\nsample_graphs  {res['gpu']}  steps={args.steps}  model={args.model}")
    print(f"{'batch':>6} {'eager s':>9} {'graphs s':>9} {'speedup':>8} {'eager img/s':>12} "
          f"{'graphs img/s':>13} {'max diff':>9}")
    for r in rows:
        print(f"{r['batch']:>6} {r['eager_s']:>9.4f} {r['graphs_s']:>9.4f} {r['speedup']:>8.2f} "
              f"{r['eager_img_per_s']:>12.1f} {r['graphs_img_per_s']:>13.1f} "
              f"{r['max_level_diff']:>9}")
    print(f"sampling paths ({args.path_steps} steps, 5 images), max uint8 difference from eager:")
    for name, r in paths.items():
        print(f"  {name:24s} {r['max_level_diff']}"
              + (f"  (NOT graphed: {r['eager_fallback'][0]})" if r["eager_fallback"] else ""))


def sampling_paths(model) -> dict[str, dict]:
    """The service's sampling paths for ``model`` as ``generate`` keyword arguments."""
    res = model.resolution
    paths = {"plain": {}, "ddpm": {"sampler": "ddpm"},
             "upsample guidance 2x": {"resolution": 2 * res, "ug_theta": 1.3},
             "cascade 2x": {"resolution": 2 * res, "upscale": "cascade"}}
    if model.num_classes:
        paths["classes + cfg 2.0"] = {"class_labels": [i % model.num_classes for i in range(5)],
                                      "cfg_scale": 2.0}
    if model.spectral:
        paths["spectral schedule"] = {"schedule": "spectral"}
    return paths


if __name__ == "__main__":
    main()
