"""S3: Scale Space Diffusion against DDPM at equal training compute (Mukhopadhyay et al.).

The claim (SCIENCE.md section 6): diffusing in scale space, where the state shrinks as noise
grows and one Flexi-UNet serves every resolution, matches DDPM's quality at lower training
and sampling cost (paper: 2 levels, FID 2.14 against 2.22 at 0.89x the training time).

The setting: unconditional Tiny-ImageNet at 64x64, where SSD's savings are large. Arms, each
trained under the same budget (``pipelines.experiments.arms``): ``ssd4`` (``training/configs/
ssd-64-4l.yaml``: levels 8/16/32/64), ``ssd2`` (the same with 2 levels, 32/64) and ``ddpm``
(``ddpm-x0-64.yaml``: the same UNet width at full resolution with the same x0 prediction,
DDPM linear betas and min(SNR, 5) weighting: SSD with one level). Same seed, data order, batch and
optimiser. Every arm trains for the same seconds on the loop's clock (SSD's later resolution
pairs compile inside that time when compiled, which is why the SSD arms run eager by
default: ``ssd_compile``) and exports EMA snapshots at shared image marks. Rows:

- ``<arm>@time``: each arm's final model (equal GPU time);
- ``<arm>@images``: each arm's snapshot at the largest image mark both ``ssd4`` and ``ddpm``
  reached (equal images seen, the same data); ``ssd2`` meets ``ddpm`` at the largest mark
  both reached, in rows ``<arm>@images (<mark>)`` where that is a smaller one
  (:func:`arms.evaluate_arms`);

sampled at the same seeds with the same number of steps (SSD's respaced chain, DDIM for the
DDPM arm), measured against Tiny-ImageNet's validation images beside the real-vs-real floor,
with paired bootstrap differences ssd - ddpm and the sampling seconds per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator

from pipelines.experiments import arms as A
from pipelines.experiments.common import Log, ReferenceSpec, status

NAME = "ssd-vs-ddpm"
CLAIM = ("Scale Space Diffusion (a Flexi-UNet over a shrinking state) matches DDPM's quality "
         "at lower training and sampling cost (Mukhopadhyay et al.: 2 levels, FID 2.14 "
         "against 2.22 at 0.89x the training time).")
# arm -> its recipe, made unconditional
ARMS: dict[str, ReferenceSpec] = {
    "ssd4": ReferenceSpec(config="ssd-64-4l", sets=["data.num_classes=0"]),
    "ssd2": ReferenceSpec(config="ssd-64-4l", sets=[
        "data.num_classes=0", "model.preset=ssd-64-2l", "objective.options.levels=2"]),
    "ddpm": ReferenceSpec(config="ddpm-x0-64", sets=["data.num_classes=0"]),
}
MARGIN = 0.05  # "matches": FD-prism within 5% of DDPM's (a non-inferiority margin)
RULE = ("ssd4@time and ssd4@images against ddpm at the same budget, paired bootstrap of "
        "FD-prism over the same seeds: 'reproduced' (SSD matches DDPM) when both 95% "
        "intervals of ssd4 - ddpm end below 5% of DDPM's FD-prism, 'not reproduced' when "
        "either lies wholly above 0, else 'inconclusive'.")


class Settings(A.ArmsSettings):
    """S3's settings (``prism experiment show ssd-vs-ddpm``); the shared ones:
    :class:`arms.ArmsSettings`."""

    ARMS: ClassVar[tuple[str, ...]] = tuple(ARMS)

    resolution: int = Field(64, ge=8)
    image_marks: list[int] = Field(
        default_factory=lambda: [64000, 128000, 256000, 384000, 512000])
    ssd_compile: bool = False  # compile the SSD arms (one graph per resolution pair)
    steps: int = Field(100, ge=1)  # sampling steps of every arm
    ddpm_sampler: str = "ddim"

    @field_validator("image_marks")
    @classmethod
    def _marks(cls, v: list[int]) -> list[int]:
        if any(m <= 0 for m in v):
            raise ValueError(f"image_marks must be positive, got {v}")
        return sorted(set(v))


PRESETS: dict[str, dict[str, Any]] = {
    # CPU, a minute: the demo corpus at 32x32, debug-sized networks (ssd: 3 levels); image
    # marks every arm passes even on a busy machine (the loop stops at its first log past the
    # time limit, so every arm sees at least one 32-image logging window)
    "small": {
        "resolution": 32, "time_limit_s": 4.0, "image_marks": [16, 32], "n_images": 24,
        "n_curve": 16, "steps": 8, "grid_images": 8, "batch_size": 32,
        "feature_recipe": {"width": 4, "epochs": 1, "batch_size": 32, "compile": False},
        "reference_sets": ["data.resolution=32", "model.overrides.resolution=32",
                           "optim.warmup_images=64",
                           "optim.ema_decay=0.99", "optim.lr=0.001", "train.batch_size=16",
                           "train.log_every_images=32", "checkpoint.every_images=100000",
                           "sampling.num_images=0", "data.num_workers=0", "run.compile=off"],
        "arm_sets": {
            "ssd4": ["model.preset=ssd-debug", "objective.options.levels=3"],
            "ssd2": ["model.preset=ssd-debug", "objective.options.levels=2"],
            "ddpm": ["model.preset=unet-debug", "model.overrides.channel_mult=[1, 2, 2]",
                     "model.overrides.attention_resolutions=[]"]},
        "metrics": {"swd_patches_per_image": 16, "swd_directions": 64, "swd_repeats": 1,
                    "kid_subset_size": 8, "kid_subsets": 10, "bootstrap": 10},
    },
    # one GPU: Tiny-ImageNet at 64x64, 150 images of each class (what one device call
    # carries with the wheels; docs/science/s3-ssd-vs-ddpm.md); an arm trains and samples
    # its models in one 10-minute call (benchmarks/experiments_gpu.sh s3-arm)
    "gpu": {
        "train_data": ".gpudata/tin64-s3", "real_data": ".gpudata/tin64-val",
        "batch_size": 500, "time_limit_s": 330.0, "n_images": 1000, "n_curve": 1000,
        "reference_sets": ["optim.warmup_images=64000", "checkpoint.every_images=640000",
                           "checkpoint.keep_last=1", "sampling.num_images=0",
                           "data.num_workers=6"],
    },
}


def verdict(comparisons: list[dict[str, Any]], rows: list[dict[str, Any]],
            apart: str | None = None) -> dict[str, Any]:
    """The rule, fixed before measuring (``RULE``); ``apart``: why the arms' seconds do not
    compare (:func:`arm_records.chips`), which leaves the rule's equal-time half unmet."""
    if apart:
        return {"verdict": "inconclusive", "rule": RULE, "reason": apart}
    cells = [c for c in comparisons if c["a"].startswith("ddpm@") and c["b"].startswith("ssd4@")]
    metric = next((k for c in cells for k in c if k.startswith("FD-prism")), None)
    if len(cells) < 2 or metric is None:
        return {"verdict": "inconclusive", "rule": RULE,
                "reason": "ssd4 and ddpm were not both measured at both budgets with "
                          "bootstrap intervals"}
    ddpm = {r["budget"]: r[metric] for r in rows if r["arm"] == "ddpm"}
    within = [c[metric]["hi"] < MARGIN * ddpm[c["budget"]] for c in cells]
    worse = [c[metric]["lo"] > 0 for c in cells]
    v = "not reproduced" if any(worse) else "reproduced" if all(within) else "inconclusive"
    return {"verdict": v, "rule": RULE, "metric": metric, "margin": MARGIN,
            "ssd4_minus_ddpm": {c["budget"]: c[metric] for c in cells}}


def _sets(s: Settings, arm: str) -> list[str]:
    """The SSD arms eager unless ``ssd_compile``."""
    return ["run.compile=off"] if arm.startswith("ssd") and not s.ssd_compile else []


def _sample_kw(s: Settings, arm: str) -> dict[str, Any]:
    """The same steps for every arm: SSD's own respaced chain, the DDPM arm's sampler."""
    return {"steps": s.steps} if arm.startswith("ssd") else \
        {"steps": s.steps, "sampler": s.ddpm_sampler}


DESIGN = A.Design(
    name=NAME, claim=CLAIM, arms=ARMS, marks_field="image_marks", mark_key="images_seen",
    mark_budget="images", mark_field="image_mark", pairs=[("ddpm", "ssd4"), ("ddpm", "ssd2")],
    verdict=verdict,
    resolution=lambda s: s.resolution, sample_kw=_sample_kw, sets=_sets)


def references(s: Settings, train: str) -> dict[str, ReferenceSpec]:
    """Every arm named in ``s.arms`` under the shared budget, on the same data and seed."""
    return A.references(DESIGN, s, train)


def run(s: Settings, out: Path, log: Log = status) -> dict[str, Any]:
    """Train (or reuse) the arms, evaluate their final models, snapshots at the common image
    mark and the curves; returns the results (:func:`arms.run`)."""
    return A.run(DESIGN, s, out, log)
