"""How much the generated images' mean colours vary, and how much of that a chain alone keeps.

Two questions S3 (docs/science/s3-ssd-vs-ddpm.md) asks of SSD's samples:

1. The samples: each saved sample file's per-image mean colour (the spread over images,
   per channel, and the set's mean), the same for real images, and the mean contrast within
   an image. A model whose samples share one colour cast has a small spread.
2. The sampler alone (``--chains``), driven by exact denoisers, for each SSD chain (levels 1 =
   DDPM, 2, 4; 100 steps and the full 1000): images whose only content is a mean colour
   ``c`` ~ N(0, v) at the samples' resolution (``E[c | x_k]`` from the state's pixel mean):
   the fraction of v the chain returns; and Gaussian images with a natural-image power
   spectrum (1/f^2, ``components.analytic``) at ``--field-resolution`` px: the fractions of
   their mean-colour and within-image (contrast) variance it returns. What the chain keeps
   bounds what the chain, not the network, takes from the colours and the contrast.

    python benchmarks/colour_spread.py W/ssd-vs-ddpm/samples/*.npy --real .gpudata/tin64-val \
        [--chains] [--resolution 64] [--field-resolution 16]

Prints a short table; no GPU, Ray or MLflow needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.analytic import SSDGaussianDenoiser, stationary_covariance  # noqa: E402
from components.diffusion import Cond  # noqa: E402
from components.ssd import SSDProcess, ssd_chain  # noqa: E402
from pipelines.experiments.common import real_images  # noqa: E402


def spread(x: torch.Tensor) -> dict[str, list[float] | float]:
    """x (N, C, H, W) in [0, 1]: per-channel spread and mean of the images' mean colours."""
    means = x.mean(dim=(2, 3))  # (N, C)
    return {"colour_spread": means.std(0).tolist(), "set_colour": means.mean(0).tolist(),
            "contrast": float(x.std(dim=(2, 3)).mean())}


class MeanColourDenoiser:
    """The exact x0-denoiser of images ``c * 1`` with c ~ N(0, v), for an SSD process."""

    prediction = "x0"

    def __init__(self, process: SSDProcess, v: float) -> None:
        self.p, self.v = process, v

    def __call__(self, x: torch.Tensor, lam: torch.Tensor, cond: Cond) -> torch.Tensor:
        k = self.p.state_of(lam)
        a, s, r = self.p.a(k), self.p.sigma(k), x.shape[-1]
        c = a * self.v * x.double().mean(dim=(1, 2, 3)) / (a * a * self.v + s * s / r**2)
        ro = cond.out_resolution
        return c.float()[:, None, None, None].expand(x.shape[0], 1, ro, ro).contiguous()


def chain_kept(resolution: int, levels: int, steps: int | None, n: int, v: float) -> float:
    """The fraction of the mean-colour variance v the SSD chain returns (n images)."""
    p = SSDProcess(resolution, levels=levels)
    x = ssd_chain(MeanColourDenoiser(p, v), p, n, torch.Generator().manual_seed(1), Cond(),
                  steps=steps, channels=1, clip=False)
    return float(x.double().mean(dim=(1, 2, 3)).var() / v)


def field_kept(resolution: int, levels: int, steps: int | None, n: int) -> dict[str, float]:
    """Fractions of the mean-colour and within-image variance of 1/f^2 Gaussian images
    (pixel variance 0.25) that the SSD chain returns with the exact denoiser (n images)."""
    p = SSDProcess(resolution, levels=levels)
    cov = stationary_covariance(resolution, resolution, var=0.25, beta=2.0)
    d = resolution ** 2
    mean_colour = float(cov.sum() / d**2)  # Var of the pixel mean
    within = float(cov.diagonal().mean()) - mean_colour  # E[within-image variance]
    x = ssd_chain(SSDGaussianDenoiser(p, torch.zeros(d, dtype=torch.float64), cov), p, n,
                  torch.Generator().manual_seed(1), Cond(), steps=steps, channels=1,
                  clip=False).reshape(n, d).double()
    return {"mean_colour": float(x.mean(1).var()) / mean_colour,
            "within_image": float(x.var(1).mean()) / within}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("samples", nargs="*", help="saved sample files (N, 3, H, W) uint8")
    ap.add_argument("--real", help="real images (shards, tar, folder, npz)")
    ap.add_argument("--n-real", type=int, default=2000)
    ap.add_argument("--chains", action="store_true", help="also the exact-denoiser chains")
    ap.add_argument("--resolution", type=int, default=None,
                    help="the chains' resolution (default: the samples')")
    ap.add_argument("--levels", default="1,2,4")
    ap.add_argument("--field-resolution", type=int, default=16,
                    help="side of the 1/f^2 Gaussian images of the contrast check")
    ap.add_argument("--chain-images", type=int, default=1000)
    args = ap.parse_args()
    rows: dict[str, dict] = {}
    def order(path: str) -> tuple[str, int]:  # <arm>@<images>: arms, then images seen
        arm, _, seen = Path(path).stem.partition("@")
        return arm, int(seen) if seen.isdigit() else 0

    for path in sorted(args.samples, key=order):
        x = torch.from_numpy(np.load(path)).float() / 255
        rows[Path(path).stem] = spread(x)
    res = args.resolution or (np.load(args.samples[0], mmap_mode="r").shape[-1]
                              if args.samples else 64)
    if args.real:
        real, _ = real_images(args.real, args.n_real, 0, resolution=res)
        rows["real"] = spread((real + 1) / 2)
    report: dict[str, object] = {"images": rows}
    if args.chains:
        # v: the real images' mean-colour variance in [-1, 1] units where known
        v = 4 * float(np.mean(np.square(rows["real"]["colour_spread"]))) if args.real else 0.04
        kept = {f"levels={lv} steps={st or 1000}": chain_kept(res, int(lv), st,
                                                                args.chain_images, v)
                for lv in args.levels.split(",") for st in (100, None)}
        fr = args.field_resolution
        field = {f"levels={lv} steps={st or 1000}": field_kept(fr, int(lv), st,
                                                                args.chain_images)
                 for lv in args.levels.split(",") for st in (100, None)}
        report["chains"] = {"resolution": res, "v": v, "kept": kept,
                            "field_resolution": fr, "field_kept": field}
    print(json.dumps(report, indent=1))
    print(f"\n{'images':<24}{'colour spread (R, G, B)':>26}{'set colour':>22}{'contrast':>10}")
    for name, r in rows.items():
        cs, sc = r["colour_spread"], r["set_colour"]
        print(f"{name:<24}{' '.join(f'{c:.3f}' for c in cs):>26}"
              f"{' '.join(f'{c:.3f}' for c in sc):>22}{r['contrast']:>10.3f}")
    if args.chains:
        print(f"\nexact-denoiser chains at {res} px keep of the mean-colour variance "
              f"(n = {args.chain_images}):")
        for name, f in report["chains"]["kept"].items():
            print(f"  {name:<24}{f:.3f}")
        print(f"1/f^2 Gaussian images at {args.field_resolution} px, kept of the mean-colour / "
              "within-image variance:")
        for name, f in report["chains"]["field_kept"].items():
            print(f"  {name:<24}{f['mean_colour']:.3f} / {f['within_image']:.3f}")


if __name__ == "__main__":
    main()
