"""CUDA graphs on every sampling path the service offers: the same images as eager?

    python benchmarks/graphs_paths_check.py --model DIR_OR_URI

Class labels with classifier-free guidance (the network batch doubles), upsample guidance at
2x (a second, low-resolution signature), the cascade, a spectral schedule where the model has
one, and DDPM: the largest uint8 difference from eager sampling for each, and the number of
graphs recorded. Needs CUDA; prints a table, JSON in $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.generate import generate, to_uint8  # noqa: E402
from serving.loading import load_served_model, normalize_uri  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA (CUDA graphs)")
    uri = normalize_uri(args.model)
    eager, _ = load_served_model(uri, "cuda")
    graphed, _ = load_served_model(uri, "cuda", cuda_graphs=True)
    res = eager.resolution
    labels = [i % eager.num_classes for i in range(5)] if eager.num_classes else None
    cases = {
        "plain, 5 images": {},
        "ddpm": {"sampler": "ddpm"},
        "upsample guidance 2x": {"resolution": 2 * res, "ug_theta": 1.3},
        "cascade 2x": {"resolution": 2 * res, "upscale": "cascade"},
    }
    if labels:
        cases["classes + cfg 2.0"] = {"class_labels": labels, "cfg_scale": 2.0}
    if eager.spectral:
        cases["spectral schedule"] = {"schedule": "spectral"}
    rows, fallbacks = {}, {}
    for name, kw in cases.items():
        outs = []
        for model in (eager, graphed):
            with warnings.catch_warnings(record=True) as caught, \
                    torch.autocast("cuda", dtype=torch.bfloat16):
                warnings.simplefilter("always")
                outs.append(to_uint8(generate(model, seeds=list(range(7, 12)),
                                              steps=args.steps, device="cuda", **kw)).int())
        rows[name] = int((outs[0] - outs[1]).abs().max())
        fallbacks[name] = [str(w.message)[:200] for w in caught if "CUDA graph" in str(w.message)]
    result = {"model": args.model, "max_level_diff": rows, "graphs": graphed.net.graphs,
              "eager_fallbacks": fallbacks}
    out = Path(os.environ.get("OUT", "outputs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "graphs_paths_check.json").write_text(json.dumps(result, indent=2))
    print(f"\ngraphs_paths_check  model={args.model}  graphs recorded: {graphed.net.graphs}")
    for name, d in rows.items():
        print(f"  {name:24s} max uint8 difference from eager: {d}"
              + ("  (NOT graphed: " + fallbacks[name][0] + ")" if fallbacks[name] else ""))


if __name__ == "__main__":
    main()
