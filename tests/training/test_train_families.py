"""Scale Space Diffusion, DiMR and DiT through the training platform, end to end.

Every shipped config loads and builds its network (meta device) and objective. Then each
family's shipped config, shrunk to its debug preset on synthetic 16 px data, trains in the real
loop (``training.launch.run_local``) with MLflow on a SQLite store: the run finishes with a
finite loss that went down (the objective on fixed draws, before and after), the model is
registered as ``<project>-<name>`` with the alias ``candidate``, ``load_model`` of
``models:/NAME@candidate`` gives back the run's weights, and the loaded model samples through
``components.generate.generate`` with every sampler (SSD: its own sampler, respaced).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from train_helpers import ROOT  # noqa: E402, F401

from common.models import load_model  # noqa: E402
from common.run_config import Config, load_config  # noqa: E402
from components.generate import generate  # noqa: E402
from components.options import OptionError  # noqa: E402
from components.samplers import SAMPLERS  # noqa: E402
from training.build import build_model, build_objective, ssd_settings_of  # noqa: E402
from training.data import build_data  # noqa: E402
from training.launch import run_local  # noqa: E402

CONFIGS = ROOT / "training" / "configs"
PROJECT = "prism-fam"
STEPS = 12  # optimizer steps of batch 8
# family -> (shipped config, its debug preset)
FAMILIES = {
    "ssd": ("ssd-32-3l.yaml", "ssd-debug"),
    "dimr": ("dimr-32-2r.yaml", "dimr-debug"),
    "dit": ("dit-b2-32.yaml", "dit-debug"),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_shipped_config_builds_its_network_and_objective():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"ssd-32-3l.yaml", "ssd-64-4l.yaml", "dimr-32-2r.yaml", "dit-b2-32.yaml"} <= names
    params = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        with torch.device("meta"):
            net, family, kwargs = build_model(cfg)
        assert kwargs.get("resolution", cfg.data.resolution) == cfg.data.resolution, path.name
        assert callable(build_objective(cfg)), path.name
        params[path.stem] = (family, sum(p.numel() for p in net.parameters()))
    assert params["ssd-32-3l"][0] == params["ssd-64-4l"][0] == "flexi_unet"
    assert params["dimr-32-2r"][0] == "dimr" and params["dit-b2-32"][0] == "dit"
    # the SSD process follows the preset: 3 levels at 32 px, 4 at 64 px
    assert ssd_settings_of(load_config(CONFIGS / "ssd-64-4l.yaml"))["levels"] == 4
    assert ssd_settings_of(load_config(CONFIGS / "ssd-32-3l.yaml"))["levels"] == 3


def test_family_objectives_refuse_settings_they_would_ignore():
    ssd = CONFIGS / "ssd-32-3l.yaml"
    with pytest.raises(ValueError, match="objective.weighting: the SSD objective"):
        build_objective(load_config(ssd, ["objective.weighting=uniform"]))
    with pytest.raises(ValueError, match="objective.prediction: the SSD objective predicts x0"):
        build_objective(load_config(ssd, ["objective.prediction=eps"]))
    with pytest.raises(ValueError, match="objective.options.levls: not an option"):
        build_objective(load_config(ssd, ["objective.options.levls=3"]))
    dimr = CONFIGS / "dimr-32-2r.yaml"
    with pytest.raises(ValueError, match="objective.options.label_dropout: set objective"):
        build_objective(load_config(dimr, ["objective.options.label_dropout=0.2"]))
    with pytest.raises(ValueError, match="objective.prediction: the DiMR multi-scale loss"):
        build_objective(load_config(dimr, ["objective.prediction=v"]))
    # the config's schedule and label dropout reach the DiMR loss
    obj = build_objective(load_config(dimr))
    assert obj.base.label_dropout == 0.1 and obj.base.schedule.name == "ddpm_linear"


def tiny(family: str, out: Path, uri: str) -> Config:
    """The family's shipped config on its debug preset, synthetic 16 px data, a few steps."""
    config, preset = FAMILIES[family]
    return load_config(CONFIGS / config, [
        f"run.output_dir={out}", f"run.name={family}-tiny", f"run.project={PROJECT}",
        "run.device=cpu", f"model.preset={preset}", "data.source=synthetic", "data.url=",
        "data.resolution=16", "data.synthetic_size=64", "data.num_workers=0",
        "optim.lr=2e-3", "optim.warmup_images=16", "optim.ema_decay=0.9",
        "optim.weight_decay=0", f"train.total_images={8 * STEPS}", "train.batch_size=8",
        "train.log_every_images=8", f"checkpoint.every_images={8 * STEPS}",
        "sampling.num_images=2", "sampling.steps=3", f"tracking.uri={uri}",
        "tracking.system_metrics=false"])


def paired_loss(cfg: Config, state: dict[str, torch.Tensor] | None, draws: int = 6) -> float:
    """Mean objective over fixed (timestep, noise) draws on a fixed batch; ``state`` None:
    the initial weights (the loop's ``torch.manual_seed(run.seed)`` before building)."""
    torch.manual_seed(cfg.run.seed)
    net, _, _ = build_model(cfg)
    if state is not None:
        net.load_state_dict(state)
    net.train(False)
    objective = build_objective(cfg)
    batch = build_data(cfg, 0, 1, 8, torch.device("cpu")).batch(0, 0)
    total = 0.0
    with torch.no_grad():
        for seed in range(draws):
            torch.manual_seed(seed)
            total += float(objective(net, batch)[0])
    return total / draws


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store for the module; MLflow's process-wide URI restored after."""
    from mlflow.tracking._tracking_service import utils

    root = tmp_path_factory.mktemp("families")
    old_uri, old_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    yield root, f"sqlite:///{root / 'mlflow.db'}"
    utils.set_tracking_uri(old_uri)
    if old_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old_env


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, store):
    root, uri = store
    cfg = tiny(request.param, root / "runs", uri)
    result = run_local(cfg)
    return request.param, cfg, result


def test_trains_registers_loads_and_samples(trained):
    import mlflow

    family, cfg, result = trained
    assert result["step"] == STEPS and math.isfinite(result["loss"])
    # the loss went down: the objective on the same draws, initial and final raw weights
    ckpt = Path(cfg.run.output_dir) / cfg.run.name / "checkpoints" / f"step-{STEPS:08d}"
    before = paired_loss(cfg, None)
    after = paired_loss(cfg, load_file(str(ckpt / "model.safetensors")))
    assert after < 0.9 * before, (family, before, after)

    client = mlflow.MlflowClient(cfg.tracking.uri)
    name = f"{PROJECT}-{cfg.run.name}"
    mv = client.get_model_version_by_alias(name, "candidate")
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["prism.run_name"] == cfg.run.name
    assert run.data.params["objective.name"] == cfg.objective.name
    history = client.get_metric_history(mv.run_id, "loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m.value) for m in history)
    assert [f.path for f in client.list_artifacts(mv.run_id, "samples")]

    model = load_model(f"models:/{name}@candidate")
    local = load_file(str(Path(result["model_dir"]) / "model.safetensors"))
    state = model.net.state_dict()
    assert state.keys() == local.keys()
    for k, v in state.items():
        torch.testing.assert_close(v, local[k], atol=0, rtol=0)
    labels = [1, 3]
    if family == "ssd":
        check_ssd_sampling(model, cfg, labels)
    else:
        check_standard_sampling(model, labels)


def check_ssd_sampling(model, cfg: Config, labels: list[int]) -> None:
    """SSD: its own sampler over the saved resolution schedule, respaced chains."""
    assert model.kind == "ssd" and model.prediction == "x0"
    assert model.extra == ssd_settings_of(cfg) and model.extra["levels"] == 3
    a = generate(model, seeds=[5, 6], steps=4, class_labels=None)
    assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
    # the image depends on its seed only
    b = generate(model, seeds=[6], steps=4)
    torch.testing.assert_close(b[0], a[1], atol=1e-4, rtol=1e-4)
    # its chain is its own: a sampler or DDIM's eta is refused by name, not ignored
    for bad, field in (({"sampler": "dpmpp_2m"}, "sampler"), ({"sampler": "ddim"}, "sampler"),
                       ({"eta": 0.5}, "eta")):
        with pytest.raises(OptionError, match="Scale Space Diffusion") as err:
            generate(model, seeds=[6], steps=4, **bad)
        assert err.value.field == field
    c = generate(model, seeds=[5], steps=6)
    assert not torch.allclose(c[0], a[0])
    with pytest.raises(ValueError, match="Scale Space Diffusion models"):
        generate(model, seeds=[5], steps=4, resolution=32)


def check_standard_sampling(model, labels: list[int]) -> None:
    """DiMR (finest branch) and DiT: every sampler, with and without guidance."""
    assert model.kind == "standard" and model.prediction == "eps" and model.num_classes == 10
    outs = {}
    for sampler in SAMPLERS:
        x = generate(model, seeds=[5, 6], steps=3, sampler=sampler, class_labels=labels)
        assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all(), sampler
        outs[sampler] = x
    assert not torch.allclose(outs["ddim"], outs["ddpm"])
    g = generate(model, seeds=[5, 6], steps=3, class_labels=labels, cfg_scale=2.0)
    assert torch.isfinite(g).all() and not torch.allclose(g, outs["ddim"])
