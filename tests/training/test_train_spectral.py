"""A model trained with per-instance spectral schedules samples with schedules drawn from the
fitted schedule model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from train_helpers import debug_config  # noqa: E402, F401

from common.models import load_model  # noqa: E402
from components.generate import GenerateOptions, generate, sampling_grid  # noqa: E402, I001
from components.spectral_schedules import ScheduleModel  # noqa: E402
from training.launch import run_local  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_spectral_run_conditions_on_bounds_and_samples_from_schedule_model(tmp_path):
    cfg = debug_config(tmp_path, "objective.per_instance=mixed", "objective.weighting=sigmoid",
                       "train.total_images=48", "sampling.num_images=2", "sampling.steps=4")
    result = run_local(cfg)
    model_dir = Path(result["model_dir"])
    schedule = json.loads((model_dir / "schedule.json").read_text())
    assert schedule["spectral_kind"] == "mixed"
    dist = ScheduleModel.from_json(schedule["spectral"])  # fitted on the training images
    model = load_model(model_dir)
    assert model.n_cond == 3 and model.spectral is not None
    assert (tmp_path / "debug" / "samples" / "samples-00000006.png").is_file()
    # sampling draws each image's schedule from the model: grids differ per seed, lie within
    # the schedule model's support, and start / end at the drawn bounds
    seeds = [0, 1, 2]
    lambdas, bounds = sampling_grid(model, GenerateOptions(steps=4, schedule="spectral"),
                                    seeds, [0, 1, 2])
    assert lambdas.shape == (5, 3) and not torch.allclose(lambdas[:, 0], lambdas[:, 1])
    torch.testing.assert_close(lambdas[0].float(), bounds[:, 1].float())  # noisiest: lambda(1)
    torch.testing.assert_close(lambdas[-1].float(), bounds[:, 0].float())
    lo, hi = torch.as_tensor(dist.support_lo), torch.as_tensor(dist.support_hi)
    assert bool((bounds[:, 0] <= hi[3] + 1e-4).all()) and bool((bounds[:, 1] >= lo[2] - 1e-4).all())
    x = generate(model, seeds=seeds, steps=4, class_labels=[0, 1, 2], schedule="spectral")
    assert x.shape == (3, 3, 16, 16) and bool(torch.isfinite(x).all())
