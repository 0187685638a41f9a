"""The training loop on CPU: golden loss curve, exact resume on sharded data, configs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from train_helpers import debug_config, losses, write_shards  # noqa: E402, F401

from common.run_config import ConfigError, config_from_dict, load_config  # noqa: E402
from training.launch import run_local  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "train_debug_loss.json"

pytestmark = pytest.mark.usefixtures("one_thread")


def _golden_run(out: Path) -> list[float]:
    run_local(debug_config(out))
    return losses(out / "debug")


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory) -> list[float]:
    return _golden_run(tmp_path_factory.mktemp("golden"))


def test_debug_preset_loss_decreases_and_matches_golden(debug_run):
    assert len(debug_run) == 20  # 160 images at batch 8, one record per step
    first, last = sum(debug_run[:5]) / 5, sum(debug_run[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    golden = json.loads(GOLDEN.read_text())
    assert debug_run == pytest.approx(golden["losses"], abs=2e-3, rel=2e-3)


def _shard_cfg(out: Path, shards: Path, total: int):
    return debug_config(out, "data.source=shards", f"data.url={shards}", "data.num_workers=2",
                        "train.batch_size=8", f"train.total_images={total}",
                        "train.log_every_images=8", "checkpoint.every_images=40",
                        "checkpoint.keep_last=2", "run.name=resume")


def test_resume_is_exact_on_shards(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, [7, 3, 12, 5, 9])  # uneven: 36 images in 5 shards
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_local(_shard_cfg(straight, shards, 160))  # 20 steps
    run_local(_shard_cfg(split, shards, 80))  # 10 steps, stop
    assert (split / "resume" / "checkpoints" / "step-00000010").is_dir()
    run_local(_shard_cfg(split, shards, 160))  # same name: resumes at step 10
    a = straight / "resume" / "checkpoints" / "step-00000020"
    b = split / "resume" / "checkpoints" / "step-00000020"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=f"{name}:{k}")
    assert losses(split / "resume") == pytest.approx(losses(straight / "resume"), abs=1e-6)
    sa = json.loads((a / "state.json").read_text())["data"]
    sb = json.loads((b / "state.json").read_text())["data"]
    assert sa == sb and sa[0]["batches"] == 20  # the data position continued


@pytest.mark.parametrize("sets, field", [
    (["objective.prediction=epsilon"], "objective.prediction"),
    (["optim.lr=-1"], "optim.lr"),
    (["train.batch_size=0"], "train.batch_size"),
    (["optim.bogus=1"], "optim.bogus"),
    (["data.source=shards"], "data.url"),
    (["run.name=has space"], "run.name"),
    # settings that used to surface as a TypeError traceback when the network was built
    (["model.overrides.chanels=8"], "model.overrides.chanels"),
    (["model.preset=unet-nosuch"], "unknown model preset"),
    (["objective.schedule_kwargs.shfit=1"], "shfit"),
    (["objective.schedule=nosuch"], "unknown schedule"),
])
def test_bad_config_fails_at_load_naming_the_field(tmp_path, sets, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        debug_config(tmp_path, *sets)


def test_every_overridable_setting_is_accepted(tmp_path):
    """The check accepts what the networks take: a valid override still loads and builds."""
    from training.build import build_model

    cfg = debug_config(tmp_path, "model.overrides.model_channels=16", "model.overrides.dropout=0.1")
    net, family, kwargs = build_model(cfg)
    assert family == "unet" and kwargs["model_channels"] == 16 and kwargs["dropout"] == 0.1


def test_config_consistency_errors_are_clear():
    with pytest.raises(ConfigError, match="divisible by train.grad_accum"):
        config_from_dict({"train": {"batch_size": 10, "grad_accum": 3}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent.yaml")


def test_switches_read_yaml_booleans_as_on_off(tmp_path):
    # YAML 1.1 reads `off`/`on` as booleans: `--set run.compile=off` must still mean "off"
    cfg = debug_config(tmp_path, "run.compile=off", "run.channels_last=on", "optim.fused=no")
    assert (cfg.run.compile, cfg.run.channels_last, cfg.optim.fused) == ("off", "on", "off")
    with pytest.raises(ConfigError, match=r"run\.compile"):
        debug_config(tmp_path, "run.compile=sometimes")


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[2] / "training" / "configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"debug.yaml", "cifar10-ddpm-eps.yaml", "cifar10-ddpm-x0.yaml",
            "unet-64.yaml"} <= set(names)
    for p in root.glob("*.yaml"):
        load_config(p)


if __name__ == "__main__":  # regenerate the golden curve: python tests/training/test_train_loop.py
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        first, second = _golden_run(Path(a)), _golden_run(Path(b))
    assert first == second, "the debug run is not deterministic"
    GOLDEN.write_text(json.dumps({"config": "training/configs/debug.yaml",
                                  "overrides": ["tracking.enabled=false",
                                                "sampling.num_images=0"],
                                  "torch": torch.__version__, "losses": first}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {first}")


def test_credentials_in_a_tracking_uri_are_never_written(tmp_path):
    from common.run_config import redact_uri

    assert redact_uri("http://user:s3cret@mlflow:5000/x") == "http://mlflow:5000/x"
    assert redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    cfg = debug_config(tmp_path, "tracking.uri=http://alice:s3cret@mlflow.internal:5000",
                       "train.total_images=16", "checkpoint.every_images=8")
    assert cfg.public_dump()["tracking"]["uri"] == "http://mlflow.internal:5000"
    run_local(cfg)
    written = [p for p in (tmp_path / "debug").rglob("*") if p.is_file()]
    assert any(p.name == "config.json" for p in written)
    for p in written:
        if p.suffix in (".json", ".jsonl", ".yaml", ".txt"):
            assert "s3cret" not in p.read_text(), p


def test_resume_keeps_one_record_per_step_and_removes_orphaned_checkpoints(tmp_path):
    sets = ("train.total_images=80", "checkpoint.every_images=40", "train.log_every_images=8")
    run_local(debug_config(tmp_path, *sets))  # 10 steps, checkpoints at 5 and 10
    run_dir = tmp_path / "debug"
    # a run killed after step 13, mid-save: records past the last checkpoint and a .tmp folder
    with open(run_dir / "metrics.jsonl", "a") as f:
        for step in (11, 12, 13):
            f.write(json.dumps({"step": step, "loss": 9.0}) + "\n")
    orphan = run_dir / "checkpoints" / "step-00000015.tmp-999999999"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"x" * 1000)
    run_local(debug_config(tmp_path, *sets, "train.total_images=160"))  # resumes at step 10
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21)), steps
    assert not orphan.exists()


def test_resumed_optimizer_moments_take_channels_last_strides(tmp_path):
    """The fused CUDA AdamW refuses moments laid out unlike their parameters (a resumed
    channels_last run failed at its first step); CPU does not check, so strides are asserted."""
    from training.checkpoint import load_checkpoint, save_checkpoint

    def parts():
        torch.manual_seed(0)
        net = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
        ema = torch.nn.Conv2d(4, 8, 3)
        return net, ema, torch.optim.AdamW(net.parameters(), lr=1e-3)

    net, ema, opt = parts()
    net(torch.randn(2, 4, 8, 8)).square().mean().backward()
    opt.step()
    ckpt = save_checkpoint(tmp_path, 1, net, ema, opt, {"step": 1}, keep_last=1)
    net2, ema2, opt2 = parts()
    load_checkpoint(ckpt, net2, ema2, opt2)
    w = net2.weight
    assert w.stride() != w.contiguous().stride()  # the case that failed: non-default strides
    for name in ("exp_avg", "exp_avg_sq"):
        moment = opt2.state[w][name]
        assert moment.stride() == w.stride()
        torch.testing.assert_close(moment, opt.state[net.weight][name])


@pytest.mark.slow  # inductor's CPU compile: about a minute per mode
@pytest.mark.parametrize("mode,scope", [("default", "model"), ("reduce-overhead", "model"),
                                        ("default", "blocks")])
def test_compiled_modes_train_the_same_losses_as_eager(tmp_path, mode, scope):
    """A compile mode or scope is a speed path only: the loss curve of a few steps matches
    eager (on CPU no CUDA graphs are recorded; the GPU side is benchmarks/train_profile.py and,
    for the scopes, benchmarks/ssd_compile_cost.sh)."""
    sets = ("train.total_images=24", "train.log_every_images=8")
    run_local(debug_config(tmp_path / "eager", "run.compile=off", *sets))
    from torch._dynamo.utils import counters

    counters.clear()
    run_local(debug_config(tmp_path / "compiled", "run.compile=on",
                           f"run.compile_mode={mode}", f"run.compile_scope={scope}", *sets))
    # something was compiled: a scope that left the network eager would pass the losses too
    # (blocks met first under the FLOP counter's dispatch mode once stayed eager all run)
    assert counters["stats"]["unique_graphs"] > 0
    want, got = losses(tmp_path / "eager/debug"), losses(tmp_path / "compiled/debug")
    assert len(got) == len(want) == 3
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_compile_blocks_compiles_each_named_block_in_place():
    """run.compile_scope=blocks: the network's COMPILE_UNITS compiled in place (lazily: no
    compilation happens here), the state-dict keys those of the plain network; a network that
    names none is refused with the way out."""
    from components.networks.registry import build_network
    from training.parts import compile_blocks

    for preset, unit_names in [("ssd-debug", {"Block"}), ("dit-debug", {"DiTBlock"}),
                               ("dimr-debug", {"TransformerBlock", "ConvNeXtBlock"})]:
        net = build_network(preset)
        keys = list(net.state_dict())
        units = [m for m in net.modules() if type(m).__name__ in unit_names]
        assert compile_blocks(net, "default") == len(units) > 0
        assert all(m._compiled_call_impl is not None for m in units)
        assert list(net.state_dict()) == keys
    with pytest.raises(ValueError, match="compile_scope=model"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), "default")
