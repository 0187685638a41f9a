"""Typed configs all the way down: the network settings, schedule parameters and objective
options in ``common`` match the constructors in ``components`` field for field, and a bad
value fails at load naming the field."""

from __future__ import annotations

import inspect
import json
import re
import sys
import typing
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
from common.objective_settings import OBJECTIVE_OPTIONS  # noqa: E402
from common.run_config import (  # noqa: E402
    ConfigError,
    ObjectiveConfig,
    config_from_dict,
    load_config,
)
from common.schedule_settings import SCHEDULE_PARAMS, ScheduleParams  # noqa: E402
from components.multiscale import MultiScaleObjective  # noqa: E402
from components.networks.dimr import BranchConfig  # noqa: E402
from components.networks.registry import (  # noqa: E402
    FAMILIES,
    constructor_parameters,
    family_parameters,
    list_presets,
    preset_kwargs,
)
from components.objectives import DiffusionObjective  # noqa: E402
from components.schedules import SCHEDULES, build_schedule  # noqa: E402
from components.ssd import SSD_EXTRA_KEYS, SSDProcess  # noqa: E402
from training.build import (  # noqa: E402
    OBJECTIVES,
    build_model,
    build_objective,
    schedule_of,
    ssd_settings_of,
)

CONFIGS = ROOT / "training" / "configs"
# the section's own fields: what an objective takes from the config outside ``options``
SECTION_FIELDS = {k for k, f in ObjectiveConfig.model_fields.items()
                  if not f.exclude and k != "options"}
# objective name -> the parameters its options come from (ssd: the process settings)
OBJECTIVE_PARAMETERS = {"diffusion": DiffusionObjective, "dimr_multiscale": MultiScaleObjective,
                        "ssd": SSDProcess}


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


@pytest.mark.parametrize("name", sorted(OBJECTIVE_OPTIONS))
def test_objective_options_mirror_the_objective(name):
    """Every parameter is an option, a field of the section, or set elsewhere (named)."""
    model = OBJECTIVE_OPTIONS[name]
    params = dict(inspect.signature(OBJECTIVE_PARAMETERS[name]).parameters)
    assert set(model.elsewhere) <= set(params), "elsewhere names a parameter that is not one"
    assert set(model.fixed) <= SECTION_FIELDS
    options = {k: p for k, p in params.items() if k not in SECTION_FIELDS | set(model.elsewhere)}
    assert_mirrors(model, options, None)


def test_ssd_options_are_the_saved_process_settings():
    params = set(inspect.signature(SSDProcess).parameters) - {"base_resolution"}
    assert params == set(SSD_EXTRA_KEYS)


def test_objective_registries_name_the_same_objectives():
    names = set(typing.get_args(ObjectiveConfig.model_fields["name"].annotation))
    assert set(OBJECTIVE_OPTIONS) == set(OBJECTIVES) == names


@pytest.mark.parametrize("config, sets, message", [
    ("ssd-32-3l.yaml", ["objective.options.levls=3"],
     "objective.options.levls: not an option of the ssd objective; accepted: levels, "
     "resolution_schedule, gamma"),
    ("ssd-32-3l.yaml", ["objective.options.levels=many"],
     "objective.options.levels: Input should be a valid integer"),
    ("ssd-32-3l.yaml", ["objective.options.resolution_schedule=linear"],
     "objective.options.resolution_schedule: Input should be 'convex' or 'equal'"),
    ("ssd-32-3l.yaml", ["objective.options.gamma=0"],
     "objective.options.gamma: Input should be greater than 0"),
    ("ssd-32-3l.yaml", ["objective.options.T=500"],
     "objective.options.T: set objective.schedule_kwargs.T instead"),
    ("ssd-32-3l.yaml", ["objective.options.min_snr_gamma=2"],
     "objective.options.min_snr_gamma: set objective.min_snr_gamma instead"),
    ("ssd-32-3l.yaml", ["objective.weighting=uniform"],
     "objective.weighting: the SSD objective weights by min(SNR, min_snr_gamma); "
     "set 'min_snr', got 'uniform'"),
    ("ssd-32-3l.yaml", ["objective.per_instance=power"],
     "objective.per_instance: the SSD objective has no per-image schedules"),
    ("dimr-32-2r.yaml", ["objective.options.coefficients=[0.25, big]"],
     "objective.options.coefficients.1: Input should be a valid number"),
    ("dimr-32-2r.yaml", ["objective.options.coefficients=[-1, 1]"],
     "objective.options.coefficients.0: Input should be greater than or equal to 0"),
    ("dimr-32-2r.yaml", ["objective.options.coeffs=[1, 1]"],
     "objective.options.coeffs: not an option of the dimr_multiscale objective; "
     "accepted: coefficients"),
    ("dimr-32-2r.yaml", ["objective.options.schedule=cosine"],
     "objective.options.schedule: set objective.schedule instead"),
    ("dimr-32-2r.yaml", ["objective.options.n_cond=3"],
     "objective.options.n_cond: follows objective.per_instance"),
    ("dimr-32-2r.yaml", ["objective.prediction=v"],
     "objective.prediction: the DiMR multi-scale loss predicts eps"),
    ("debug.yaml", ["objective.options.sigmoid_bais=1"],
     "objective.options.sigmoid_bais: not an option of the diffusion objective; "
     "accepted: none"),
    ("debug.yaml", ["objective.options.name=other"],
     "objective.options.name: set objective.name instead"),
])
def test_bad_objective_options_fail_at_load_naming_the_option(config, sets, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CONFIGS / config, sets)


def without_options(config: str) -> dict:
    """A shipped config's raw sections with ``objective.options`` left out."""
    raw = yaml.safe_load((CONFIGS / config).read_text())
    del raw["objective"]["options"]
    return raw


def test_ssd_options_are_typed_and_reach_the_process():
    cfg = load_config(CONFIGS / "ssd-32-3l.yaml", ["objective.options.levels=2",
                                                   "objective.options.resolution_schedule=equal",
                                                   "objective.schedule_kwargs.T=100"])
    assert cfg.objective.options == {"levels": 2, "resolution_schedule": "equal", "gamma": 0.5}
    process = build_objective(cfg).process
    assert (process.levels, process.resolution_schedule, process.T) == (2, "equal", 100)
    assert set(process.resolutions) == {32, 16}
    # what the model saves in its extra, for its sampler
    assert ssd_settings_of(cfg) == {"levels": 2, "resolution_schedule": "equal", "gamma": 0.5,
                                    "T": 100}
    # a key not given keeps the preset's setting, not the option's default
    preset_only = config_from_dict(without_options("ssd-32-3l.yaml"))
    assert preset_only.objective.options == {}
    assert build_objective(preset_only).process.levels == 3


def test_multiscale_coefficients_are_typed_and_reach_the_loss():
    cfg = load_config(CONFIGS / "dimr-32-2r.yaml", ["objective.options.coefficients=[0.5, 1]"])
    assert cfg.objective.options == {"coefficients": (0.5, 1.0)}
    assert build_objective(cfg).coefficients == [0.5, 1.0]
    default = config_from_dict(without_options("dimr-32-2r.yaml"))
    assert build_objective(default).coefficients is None  # default_coefficients per branch


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
    """Every shipped config loads, and its dump (MLflow params, the model's config.json)
    keeps the objective options as written."""
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        written = (yaml.safe_load(path.read_text()).get("objective") or {}).get("options", {})
        assert cfg.public_dump()["objective"]["options"] == json.loads(json.dumps(written))
    params = ROOT / "params.yaml"
    for name in yaml.safe_load(params.read_text())["models"]:
        cfg = load_config(params, section=f"models.{name}")
        build_model(cfg)  # the typed settings are what the network takes
