"""The measured arms' reference hashes stay what their run folders are named by.

S3's and S4's GPU arms trained on the device are kept as run records and samples under
``references/<arm>-<hash>`` (docs/science/s3-ssd-vs-ddpm.md, s4-dimr-vs-dit.md); measuring
them again, or adding an arm beside them, finds them by that hash. A new config field must
therefore be left out of :func:`reference_hash` when it does not change the weights (as
``run.compile_scope``, ``run.sync_debug``), or the recorded runs re-keyed.
"""

from __future__ import annotations

import pytest

from pipelines.experiments import arms as A
from pipelines.experiments import dimr_vs_dit, ssd_vs_ddpm
from pipelines.experiments.common import reference_hash

RECORDED = {  # experiment module -> arm -> the hash of the run measured on the GPU
    ssd_vs_ddpm: {"ssd4": "aa63bd20", "ddpm": "5327e9fa", "ssd2": "c6e536d4"},
    dimr_vs_dit: {"dimr": "0f3738d1", "dit": "e378ff46", "dimr-adaln": "0c202d43",
                  "unet": "544c1ba0"},
}


@pytest.mark.parametrize("module", list(RECORDED), ids=lambda m: m.NAME)
def test_gpu_arms_keep_the_hashes_of_their_recorded_runs(module):
    recorded = RECORDED[module]
    s = module.Settings(**{**module.PRESETS["gpu"], "work_dir": "/nowhere",
                           "arms": list(recorded)})
    design = next(v for v in vars(module).values() if isinstance(v, A.Design))
    specs = A.references(design, s, s.train_data)
    assert {a: reference_hash(spec) for a, spec in specs.items()} == recorded


# the longer runs' settings of the pages' "Next" (docs/science/s3-*.md, s4-*.md): the arms
# kept at their recorded length must still be found by the hashes of their runs
LONGER = {
    ssd_vs_ddpm: ({"ssd4": ["checkpoint.snapshot_seconds=[330]"],
                   "ddpm": ["checkpoint.snapshot_seconds=[330]"],
                   "ssd2": ["train.time_limit_s=330.0"]}, ["ssd2"]),
    dimr_vs_dit: ({"dit": ["checkpoint.snapshot_seconds=[360]"],
                   "dimr": ["checkpoint.snapshot_seconds=[360]"],
                   "unet": ["train.time_limit_s=360.0"],
                   "dimr-adaln": ["train.time_limit_s=360.0"]}, ["unet", "dimr-adaln"]),
}


@pytest.mark.parametrize("module", list(LONGER), ids=lambda m: m.NAME)
def test_arms_kept_short_beside_longer_runs_keep_their_hashes(module):
    sets, kept = LONGER[module]
    s = module.Settings(**{**module.PRESETS["gpu"], "work_dir": "/nowhere", "arms": list(sets),
                           "time_limit_s": 480.0, "arm_sets": sets})
    design = next(v for v in vars(module).values() if isinstance(v, A.Design))
    hashes = {a: reference_hash(spec) for a, spec in A.references(design, s, s.train_data).items()}
    assert {a: hashes[a] for a in kept} == {a: RECORDED[module][a] for a in kept}
    assert all(hashes[a] != RECORDED[module][a] for a in sets if a not in kept)
