"""``components.artifact``: the model directory format is stable, and save/load round-trips.

``tests/golden/model_format/<case>/`` holds the ``config.json`` and ``schedule.json`` that the
writer produced for three models (a UNet, an SSD Flexi-UNet, a per-instance spectral UNet);
the writer must keep producing them byte for byte, and directories in that format must load.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from components.artifact import load_dir, save_model
from components.model import GenerativeModel
from components.networks.registry import build_family
from components.schedules import CosineSchedule, build_schedule
from components.ssd import process_from_extra

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "model_format"
FILES = ("config.json", "schedule.json", "model.safetensors")

# explicit constructor kwargs (not the presets, which may change): tuples become JSON lists
UNET = dict(resolution=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(8,), dropout=0.0, num_classes=4, n_cond=1, in_channels=3)
FLEXI = dict(resolution=16, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
             attention_resolutions=(4,), dropout=0.0, num_classes=2, n_cond=1, in_channels=3)
SSD_EXTRA = dict(levels=3, resolution_schedule="convex", gamma=0.5, T=1000,
                 beta_start=0.0001, beta_end=0.02)
DDPM = {"T": 1000, "beta_start": 0.0001, "beta_end": 0.02}
SPECTRAL = {"placeholder": "opaque to the artifact", "weights": [0.25, 0.75]}
TRAINING = {"run": {"name": "debug", "seed": 0}, "train": {"batch_size": 8}}
CASES = ("unet", "ssd", "spectral")


def build(case: str) -> GenerativeModel:
    """The model of a golden case, with seeded random weights."""
    torch.manual_seed(0)
    if case == "unet":
        return GenerativeModel(
            net=build_family("unet", **UNET), prediction="x0", n_cond=1, resolution=16,
            in_channels=3, num_classes=4, schedule=CosineSchedule(), family="unet",
            net_kwargs=UNET, schedule_name="cosine")
    if case == "ssd":
        return GenerativeModel(
            net=build_family("flexi_unet", **FLEXI), prediction="x0", n_cond=1,
            resolution=16, in_channels=3, num_classes=2,
            schedule=build_schedule("ddpm_linear", **DDPM), kind="ssd", extra=SSD_EXTRA,
            family="flexi_unet", net_kwargs=FLEXI, schedule_name="ddpm_linear",
            schedule_kwargs=DDPM)
    kwargs = dict(UNET, n_cond=3)
    return GenerativeModel(
        net=build_family("unet", **kwargs), prediction="eps", n_cond=3, resolution=16,
        in_channels=3, num_classes=4, schedule=CosineSchedule(lambda_min=-12.0, lambda_max=12.0),
        spectral=SPECTRAL, extra={"spectral_kind": "power"}, family="unet", net_kwargs=kwargs,
        schedule_name="cosine", schedule_kwargs={"lambda_min": -12.0, "lambda_max": 12.0},
        spectral_kind="power")


def training_of(case: str) -> dict[str, Any] | None:
    return TRAINING if case == "unet" else None


@pytest.mark.parametrize("case", CASES)
def test_writer_produces_the_golden_files(case, tmp_path):
    d = save_model(tmp_path / case, build(case), training=training_of(case))
    for name in ("config.json", "schedule.json"):
        assert (d / name).read_bytes() == (GOLDEN / case / name).read_bytes(), (case, name)


@pytest.mark.parametrize("case", CASES)
def test_a_directory_in_the_golden_format_loads(case, tmp_path):
    """The golden JSON beside weights of the same network: every field comes back."""
    built = build(case)
    d = tmp_path / case
    shutil.copytree(GOLDEN / case, d)
    save_model(tmp_path / "weights", built)
    shutil.copy(tmp_path / "weights" / "model.safetensors", d)
    model = load_dir(d)
    for f in dataclasses.fields(GenerativeModel):
        if f.name in ("net", "schedule", "net_kwargs", "training"):
            continue
        assert getattr(model, f.name) == getattr(built, f.name), (case, f.name)
    assert model.net_kwargs == {k: list(v) if isinstance(v, tuple) else v
                                for k, v in built.net_kwargs.items()}
    assert model.training == (training_of(case) or {})
    assert not model.net.training
    t = torch.linspace(0, 1, 9, dtype=torch.float64)
    torch.testing.assert_close(model.schedule.lambda_(t), built.schedule.lambda_(t))
    for k, v in built.net.state_dict().items():
        torch.testing.assert_close(model.net.state_dict()[k], v, atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_save_load_save_writes_the_same_files(case, tmp_path):
    first = save_model(tmp_path / "a", build(case), training=training_of(case))
    loaded = load_dir(first)
    second = save_model(tmp_path / "b", loaded)
    for name in FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), (case, name)
    if case == "ssd":  # the SSD process comes back from the saved settings
        process = process_from_extra(loaded.resolution, loaded.extra)
        assert loaded.kind == "ssd" and process.levels == 3 and process.T == 1000
    weights = load_file(str(second / "model.safetensors"))
    assert weights.keys() == loaded.net.state_dict().keys()


def test_training_keyword_replaces_the_models_record(tmp_path):
    model = load_dir(save_model(tmp_path / "a", build("unet"), training=TRAINING))
    assert model.training == TRAINING
    again = load_dir(save_model(tmp_path / "b", model, training={"run": {"seed": 1}}))
    assert again.training == {"run": {"seed": 1}}


def test_a_model_that_cannot_be_rebuilt_is_refused(tmp_path):
    model = build("unet")
    with pytest.raises(ValueError, match="family and schedule_name"):
        save_model(tmp_path / "a", dataclasses.replace(model, family=None))
    with pytest.raises(ValueError, match="family and schedule_name"):
        save_model(tmp_path / "b", dataclasses.replace(model, schedule_name=None))
    # schedule.json must describe the schedule the model samples with
    with pytest.raises(ValueError, match="not the schedule 'cosine'"):
        save_model(tmp_path / "c", dataclasses.replace(model, schedule=CosineSchedule(shift=1.0)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
