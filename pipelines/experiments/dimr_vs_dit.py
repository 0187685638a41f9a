"""S4: DiMR against an adaLN-Zero DiT at equal training compute (Liu et al. 2024).

The claim (SCIENCE.md section 5): the multi-resolution network with time-dependent layer
norm (``dimr-32-2r``: a Transformer branch at 16x16 and a ConvNeXt branch at 32x32, time only
through TD-LN) gives better samples than an adaLN-Zero DiT for the same training compute
(paper, latent ImageNet 256: FID 1.70 against 2.27).

The setting: class-conditional CIFAR-10 at 32x32. Each arm is a shipped recipe trained under
the same budget (``pipelines.experiments.arms``): ``dimr`` (``training/configs/
dimr-32-2r.yaml``), ``dit`` (``dit-b2-32.yaml``, matched to it in training FLOPs per image),
``unet`` (prism's DDPM UNet, ``cifar10-ddpm-eps.yaml`` made class-conditional with the
same label dropout) as a third row, and ``dimr-adaln`` (the paper's ablation: the same DiMR
with adaLN-Zero norms and gates instead of TD-LN, ``components/networks/adaln.py``), each with
its own optimiser recipe, the same data order
and seed, the same warm-up. Every arm trains for the same seconds on the loop's clock and
exports EMA snapshots at shared training-FLOP marks. Rows:

- ``<arm>@time``: the final model of each arm (equal GPU time);
- ``<arm>@flops``: each arm's snapshot at the largest FLOP mark both ``dimr`` and ``dit``
  reached (equal training FLOPs, as the loop measured them), for every arm that reached it;
  an arm that did not (the UNet, the fewest FLOPs per second) meets its pair at the largest
  mark both reached, in rows ``<arm>@flops (<mark>)`` (:func:`arms.evaluate_arms`);

each sampled at the same seeds and labels with the same sampler and steps, measured against
CIFAR-10's test set (FD-prism, KID, precision/recall, SWD, log-RAPSD distance) beside the
real-vs-real floor, with paired bootstrap differences dimr - dit. The curves evaluate every
snapshot on a smaller sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator

from pipelines.experiments import arms as A
from pipelines.experiments.common import Log, ReferenceSpec, status

NAME = "dimr-vs-dit"
CLAIM = ("DiMR (multi-resolution network, time-dependent layer norm) gives better samples "
         "than an adaLN-Zero DiT at equal training compute (Liu et al. 2024: FID 1.70 "
         "against 2.27 on latent ImageNet 256).")
# arm -> its recipe; the UNet row is made class-conditional like the other two
ARMS: dict[str, ReferenceSpec] = {
    "dimr": ReferenceSpec(config="dimr-32-2r"),
    "dit": ReferenceSpec(config="dit-b2-32"),
    "unet": ReferenceSpec(config="cifar10-ddpm-eps",
                          sets=["data.num_classes=10", "objective.label_dropout=0.1"]),
    # the paper's ablation: DiMR with adaLN-Zero in place of TD-LN, all else equal
    "dimr-adaln": ReferenceSpec(config="dimr-32-2r",
                                sets=["model.overrides.time_norm=ada_zero"]),
}
RULE = ("dimr@time and dimr@flops against dit at the same budget, paired bootstrap of "
        "FD-prism over the same seeds: 'reproduced' when both 95% intervals of dimr - dit lie "
        "below 0, 'not reproduced' when either lies above 0, else 'inconclusive'.")


class Settings(A.ArmsSettings):
    """S4's settings (``prism experiment show dimr-vs-dit``); the shared ones:
    :class:`arms.ArmsSettings`."""

    ARMS: ClassVar[tuple[str, ...]] = tuple(ARMS)

    flop_marks: list[float] = Field(default_factory=lambda: [1.25e16, 2.5e16, 5e16, 7.5e16, 1e17])
    steps: int = Field(32, ge=1)
    sampler: str = "dpmpp_2m"
    cfg_scale: float = Field(1.0, ge=0)

    @field_validator("flop_marks")
    @classmethod
    def _marks(cls, v: list[float]) -> list[float]:
        if any(m <= 0 for m in v):
            raise ValueError(f"flop_marks must be positive, got {v}")
        return sorted(set(v))


_SMALL_SETS = ["data.resolution=32", "data.num_classes=8", "optim.warmup_images=256",
               "optim.ema_decay=0.99", "train.batch_size=16", "train.log_every_images=64",
               "checkpoint.every_images=100000", "sampling.num_images=0", "data.num_workers=0",
               "run.compile=off"]
PRESETS: dict[str, dict[str, Any]] = {
    # CPU, a minute: the demo corpus (8 classes, 32x32), debug-sized networks of each family;
    # FLOP marks every arm passes twice within its 4 s even on a busy machine (DiMR's debug
    # network: 44 images)
    "small": {
        "time_limit_s": 4.0, "flop_marks": [4e9, 8e9], "n_images": 24, "n_curve": 16,
        "steps": 4, "grid_images": 8, "batch_size": 32,
        "feature_recipe": {"width": 4, "epochs": 1, "batch_size": 32, "compile": False},
        "reference_sets": _SMALL_SETS,
        "arm_sets": {
            "dimr": ["model.preset=dimr-debug", "model.overrides.resolution=32",
                     "optim.lr=0.001"],
            "dit": ["model.preset=dit-debug", "model.overrides.resolution=32",
                    "optim.lr=0.001"],
            "unet": ["model.preset=unet-debug", "model.overrides.resolution=32",
                     "model.overrides.channel_mult=[1, 2, 2]",
                     "model.overrides.attention_resolutions=[]", "optim.lr=0.002"],
            "dimr-adaln": ["model.preset=dimr-debug", "model.overrides.resolution=32",
                           "optim.lr=0.001"]},
        "metrics": {"swd_patches_per_image": 16, "swd_directions": 64, "swd_repeats": 1,
                    "kid_subset_size": 8, "kid_subsets": 10, "bootstrap": 10},
    },
    # one GPU: CIFAR-10 shards made with `prism data ingest` (docs/science/s4-dimr-vs-dit.md);
    # an arm trains and samples its 6 models in one 10-minute device call (s4-arm)
    "gpu": {
        "train_data": ".gpudata/cifar10-train", "real_data": ".gpudata/cifar10-test",
        "batch_size": 1000, "time_limit_s": 360.0, "n_images": 2000, "n_curve": 1000,
        "reference_sets": ["optim.warmup_images=64000", "train.log_every_images=6400",
                           "checkpoint.every_images=640000", "checkpoint.keep_last=1",
                           "sampling.num_images=0", "data.num_workers=6"],
    },
}


def verdict(comparisons: list[dict[str, Any]], apart: str | None = None) -> dict[str, Any]:
    """The rule, fixed before measuring (``RULE``); ``apart``: why the arms' seconds do not
    compare (:func:`arm_records.chips`), which leaves the rule's equal-time half unmet."""
    if apart:
        return {"verdict": "inconclusive", "rule": RULE, "reason": apart}
    cells = [c for c in comparisons if c["a"].startswith("dit@") and c["b"].startswith("dimr@")]
    metric = next((k for c in cells for k in c if k.startswith("FD-prism")), None)
    if len(cells) < 2 or metric is None:
        return {"verdict": "inconclusive", "rule": RULE,
                "reason": "dimr and dit were not both measured at both budgets with "
                          "bootstrap intervals"}
    below = [c[metric]["hi"] < 0 for c in cells]
    above = [c[metric]["lo"] > 0 for c in cells]
    v = "reproduced" if all(below) else "not reproduced" if any(above) else "inconclusive"
    return {"verdict": v, "rule": RULE, "metric": metric,
            "dimr_minus_dit": {c["budget"]: c[metric] for c in cells}}


DESIGN = A.Design(
    name=NAME, claim=CLAIM, arms=ARMS, marks_field="flop_marks", mark_key="train_flops",
    mark_budget="flops", mark_field="flop_mark",
    pairs=[("dit", "dimr"), ("dit", "unet"), ("dit", "dimr-adaln"), ("dimr", "dimr-adaln")],
    verdict=lambda comparisons, rows, apart: verdict(comparisons, apart),
    resolution=lambda s: 32, conditional=True,
    sample_kw=lambda s, arm: {"steps": s.steps, "sampler": s.sampler, "cfg_scale": s.cfg_scale})


def references(s: Settings, train: str) -> dict[str, ReferenceSpec]:
    """Every arm named in ``s.arms`` under the shared budget, on the same data and seed."""
    return A.references(DESIGN, s, train)


def run(s: Settings, out: Path, log: Log = status) -> dict[str, Any]:
    """Train (or reuse) the arms, evaluate their final models, snapshots at the common FLOP
    mark and the curves; returns the results (:func:`arms.run`)."""
    return A.run(DESIGN, s, out, log)
