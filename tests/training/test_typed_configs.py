"""Typed configs all the way down: the network settings and schedule parameters in ``common``
match the constructors in ``components`` field for field, and a bad value fails at load
naming the field."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_helpers import ROOT, debug_config  # noqa: E402

from common.network_settings import (  # noqa: E402
    NETWORK_SETTINGS,
    BranchSettings,
    DiMRSettings,
    NetworkSettings,
)
from common.run_config import ConfigError, config_from_dict, load_config  # noqa: E402
from common.schedule_settings import SCHEDULE_PARAMS, ScheduleParams  # noqa: E402
from components.networks.dimr import BranchConfig  # noqa: E402
from components.networks.registry import (  # noqa: E402
    FAMILIES,
    constructor_parameters,
    family_parameters,
    list_presets,
    preset_kwargs,
)
from components.schedules import SCHEDULES, build_schedule  # noqa: E402
from training.build import build_model, schedule_of  # noqa: E402


def assert_mirrors(model: type[BaseModel], params: dict[str, inspect.Parameter],
                   tag: str | None) -> None:
    """Every constructor parameter is a field with the same default, and vice versa."""
    fields = {k: f for k, f in model.model_fields.items() if k != tag}
    assert set(fields) == set(params), (f"{model.__name__}: fields without a parameter "
                                        f"{sorted(set(fields) - set(params))}, parameters "
                                        f"without a field {sorted(set(params) - set(fields))}")
    for name, p in params.items():
        if p.default is inspect.Parameter.empty:
            assert fields[name].is_required(), f"{model.__name__}.{name} should be required"
        else:
            assert fields[name].default == p.default, f"{model.__name__}.{name} default"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_network_settings_mirror_the_family_constructor(family):
    assert_mirrors(NETWORK_SETTINGS[family], family_parameters(family), "family")


def test_branch_settings_mirror_the_branch_config():
    assert_mirrors(BranchSettings, constructor_parameters(BranchConfig), None)


def test_registries_name_the_same_families_and_schedules():
    assert set(NETWORK_SETTINGS) == set(FAMILIES)
    assert set(SCHEDULE_PARAMS) == set(SCHEDULES)
    for family, model in NETWORK_SETTINGS.items():
        assert model.model_fields["family"].default == family
    for name, model in SCHEDULE_PARAMS.items():
        assert model.model_fields["name"].default == name


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_params_mirror_the_schedule_factory(name):
    params = dict(inspect.signature(SCHEDULES[name]).parameters)
    assert_mirrors(SCHEDULE_PARAMS[name], params, "name")


@pytest.mark.parametrize("preset", sorted(list_presets()))
def test_every_preset_validates_into_its_family_settings(preset):
    family, kwargs = preset_kwargs(preset)
    settings = TypeAdapter(NetworkSettings).validate_python({"family": family, **kwargs})
    assert type(settings) is NETWORK_SETTINGS[family]
    cfg = config_from_dict({"model": {"preset": preset}})
    assert cfg.model.network == settings


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_default_schedule_params_build(name):
    raw = {"name": name, **({"d": 32} if name.startswith("sid2") else {})}
    params = TypeAdapter(ScheduleParams).validate_python(raw)
    build_schedule(params.name, **params.kwargs())


@pytest.mark.parametrize("sets, message", [
    (["model.overrides.depht=3"], "model.overrides.depht: Extra inputs are not permitted"),
    (["model.overrides.model_channels=wide"],
     "model.overrides.model_channels: Input should be a valid integer"),
    (["model.overrides.dropout=2"], "model.overrides.dropout: Input should be less than 1"),
    (["model.preset=ssd-debug", "model.overrides.mode=half"],
     "model.overrides.mode: Input should be 'flexi' or 'full'"),
    (["model.preset=dimr-debug", "model.overrides.n_cond=2"],
     "model.overrides.n_cond: Input should be 1 or 3"),
    (["model.preset=dimr-debug", "model.overrides.branches=[{kind: convnext, dim: x, depth: 1}]"],
     "model.overrides.branches.0.dim: Input should be a valid integer"),
    (["model.preset=dit-debug", "model.overrides.depth=deep"],
     "model.overrides.depth: Input should be a valid integer"),
    (["model.network={family: unet}"], "model.network: Value error, derived from"),
    (["objective.schedule_kwargs.shfit=1"],
     "objective.schedule_kwargs.shfit: Extra inputs are not permitted"),
    (["objective.schedule=sid2_shifted"], "objective.schedule_kwargs.d: Field required"),
    (["objective.schedule=sid2_shifted", "objective.schedule_kwargs.d=large"],
     "objective.schedule_kwargs.d: Input should be a valid integer"),
    (["objective.schedule=ddpm_linear", "objective.schedule_kwargs.T=1"],
     "objective.schedule_kwargs.T: Input should be greater than or equal to 2"),
    (["objective.schedule_kwargs.lambda_min=20"], "objective.schedule_kwargs: Value error, "
     "lambda_min (20.0) must be < lambda_max"),
    (["objective.schedule=nosuch"], "objective.schedule: Value error, unknown schedule"),
])
def test_bad_settings_fail_at_load_naming_the_field(tmp_path, sets, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        debug_config(tmp_path, *sets)


def test_overrides_are_typed_and_reach_the_network(tmp_path):
    cfg = debug_config(tmp_path, "model.overrides.channel_mult=[1, 2, 2]",
                       "model.overrides.model_channels=16", "model.overrides.dropout=0")
    assert cfg.model.overrides == {"channel_mult": (1, 2, 2), "model_channels": 16,
                                   "dropout": 0.0}
    assert cfg.model.network.channel_mult == (1, 2, 2)  # the preset's other values kept
    assert cfg.model.network.num_res_blocks == preset_kwargs("unet-debug")[1]["num_res_blocks"]
    net, family, kwargs = build_model(cfg)
    assert family == "unet" and kwargs["model_channels"] == 16
    assert net.num_levels == 3


def test_dimr_branches_override_is_typed(tmp_path):
    cfg = debug_config(tmp_path, "model.preset=dimr-debug",
                       "model.overrides.branches=[{kind: transformer, dim: 16, depth: 1, "
                       "num_heads: 2, patch: 2}]")
    assert isinstance(cfg.model.network, DiMRSettings)
    assert cfg.model.network.branches == (BranchSettings(kind="transformer", dim=16, depth=1,
                                                         num_heads=2, patch=2),)


def test_schedule_kwargs_are_typed_and_build(tmp_path):
    cfg = debug_config(tmp_path, "objective.schedule=sid2_shifted",
                       "objective.schedule_kwargs.d=32")
    assert cfg.objective.schedule_kwargs == {"d": 32}
    assert cfg.objective.schedule_params.d_ref == 64  # the default, typed
    assert schedule_of(cfg) == build_schedule("sid2_shifted", d=32)


def test_dumped_config_keeps_its_shape_and_reloads(tmp_path):
    """The derived typed objects are not written: a config's JSON is what its user wrote."""
    cfg = debug_config(tmp_path, "model.overrides.channel_mult=[1, 2, 2]",
                       "objective.schedule=sid2_shifted", "objective.schedule_kwargs.d=32")
    dumped = cfg.public_dump()
    assert set(dumped["model"]) == {"preset", "overrides"}
    assert "schedule_params" not in dumped["objective"]
    assert dumped["model"]["overrides"] == {"channel_mult": [1, 2, 2]}
    assert config_from_dict(dumped) == cfg


def test_shipped_configs_and_params_sections_load():
    for path in sorted((ROOT / "training" / "configs").glob("*.yaml")):
        load_config(path)
    params = ROOT / "params.yaml"
    for name in yaml.safe_load(params.read_text())["models"]:
        cfg = load_config(params, section=f"models.{name}")
        build_model(cfg)  # the typed settings are what the network takes
