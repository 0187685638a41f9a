"""What the loop records for equal-compute comparisons: training FLOPs per image measured at
the first step, the training clock, the time limit, and EMA snapshots along the run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from train_helpers import debug_config  # noqa: E402

from common.models import load_model  # noqa: E402
from components.generate import generate  # noqa: E402
from training.build import build_model, build_objective  # noqa: E402
from training.launch import run_local  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _independent_flops_per_image(cfg, n: int = 4) -> float:
    """Forward + backward of the config's objective on n synthetic images, counted here."""
    torch.manual_seed(0)
    net, _, _ = build_model(cfg)
    objective = build_objective(cfg)
    r = cfg.data.resolution
    batch = {"images": torch.randn(n, 3, r, r), "labels": torch.zeros(n, dtype=torch.long)}
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = objective(net, batch)
        loss.backward()
    return counter.get_total_flops() / n


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clock")
    cfg = debug_config(out, "train.total_images=96", "train.batch_size=8",
                       "train.log_every_images=16", "checkpoint.every_images=48",
                       "checkpoint.snapshot_images=[20, 40]")
    probe = _independent_flops_per_image(cfg)
    # a FLOPs mark between the image marks, reached at the step that passes 60 images
    cfg = debug_config(out, "train.total_images=96", "train.batch_size=8",
                       "train.log_every_images=16", "checkpoint.every_images=48",
                       "checkpoint.snapshot_images=[20, 40]",
                       f"checkpoint.snapshot_flops=[{probe * 60}]")
    run_local(cfg)
    return out / "debug", probe


def test_flops_per_image_is_measured_and_matches_an_independent_count(snapshot_run):
    run_dir, probe = snapshot_run
    recs = _records(run_dir)
    per_image = {r["gflops_per_image"] for r in recs}
    assert len(per_image) == 1 and per_image.pop() * 1e9 == pytest.approx(probe, rel=1e-6)
    for r in recs:
        assert r["train_flops"] == pytest.approx(r["gflops_per_image"] * 1e9 * r["images_seen"])


def test_snapshots_at_image_and_flops_marks_with_their_progress(snapshot_run):
    run_dir, probe = snapshot_run
    snaps = sorted((run_dir / "snapshots").iterdir())
    # 20 -> first step at or past it (24), 40 -> 40, 60 FLOPs-images -> 64
    assert [int(p.name) for p in snaps] == [24, 40, 64]
    seconds = []
    for p in snaps:
        prog = json.loads((p / "progress.json").read_text())
        assert prog["images_seen"] == int(p.name)
        assert prog["train_flops"] == pytest.approx(probe * int(p.name), rel=1e-6)
        seconds.append(prog["train_seconds"])
        model = load_model(p)  # a whole model directory that samples
        x = generate(model, seeds=[0], steps=2, device="cpu", class_labels=[0])
        assert torch.isfinite(x).all()
    assert seconds == sorted(seconds) and seconds[-1] > 0
    final = json.loads((run_dir / "model" / "progress.json").read_text())
    assert final["images_seen"] == 96 and final["train_seconds"] >= seconds[-1]
    assert final["first_step_s"] > 0


def test_time_limit_stops_on_the_training_clock(tmp_path):
    cfg = debug_config(tmp_path, "train.total_images=100000", "train.batch_size=8",
                       "train.log_every_images=8", "checkpoint.every_images=100000",
                       "train.time_limit_s=1.0", "checkpoint.snapshot_seconds=[0.5]")
    result = run_local(cfg)
    recs = _records(tmp_path / "debug")
    assert 8 <= result["images_seen"] < 100000
    # one snapshot, at the step that took the training clock past 0.5 s
    (snap,) = (tmp_path / "debug" / "snapshots").iterdir()
    at = json.loads((snap / "progress.json").read_text())
    before = [r for r in recs if r["images_seen"] == at["images_seen"] - 8]
    assert at["train_seconds"] >= 0.5 and all(r["train_seconds"] < 0.5 for r in before)
    # it stopped at the first log step after 1 s of training time, not before
    assert recs[-1]["train_seconds"] > 1.0
    assert all(r["train_seconds"] <= 1.0 for r in recs[:-1])
    assert json.loads((tmp_path / "debug" / "model" / "progress.json").read_text())[
        "train_seconds"] == pytest.approx(recs[-1]["train_seconds"], abs=0.5)


def test_resume_carries_the_training_clock(tmp_path):
    sets = ["train.batch_size=8", "train.log_every_images=8", "checkpoint.every_images=40"]
    run_local(debug_config(tmp_path, "train.total_images=40", *sets))
    first = _records(tmp_path / "debug")[-1]["train_seconds"]
    run_local(debug_config(tmp_path, "train.total_images=80", *sets))
    recs = _records(tmp_path / "debug")
    assert recs[-1]["images_seen"] == 80
    assert recs[-1]["train_seconds"] > first
    # the resumed process's first step (compilation) is left out and reported on its own
    assert sum("first_step_s" in r for r in recs) == 2


def test_snapshot_flops_needs_the_flop_count(tmp_path):
    from common.run_config import ConfigError

    with pytest.raises(ConfigError, match="count_flops"):
        debug_config(tmp_path, "train.count_flops=false", "checkpoint.snapshot_flops=[1e9]")


def test_ssd_flops_are_the_expectation_over_its_resolution_pairs():
    from components.networks import flexi_unet
    from components.networks.registry import build_network
    from components.ssd import SSDObjective, SSDProcess
    from training import parts

    torch.manual_seed(0)
    net = build_network("ssd-debug")
    objective = SSDObjective(SSDProcess(16, **flexi_unet.ssd_settings("ssd-debug")))
    cfg = debug_config(Path("unused"))
    batch = {"images": torch.randn(2, 3, 16, 16), "labels": None}
    cases = objective.flop_cases()
    assert len(cases) == len(objective.process.segments) > 1
    assert sum(w for w, _ in cases) == pytest.approx(1.0)
    per_case = []
    for i, (_, case) in enumerate(cases):
        with case:
            ks = objective.sample_steps(64)
        assert len({(objective.process.res(int(k)), objective.process.res(int(k) - 1))
                    for k in ks}) == 1  # one resolution pair per case
        per_case.append(parts.step_flops_per_image(_Only(objective, i), net, batch, cfg,
                                                   torch.device("cpu")))
    assert len(set(per_case)) > 2  # the pairs cost differently
    expected = sum(w * f for (w, _), f in zip(cases, per_case, strict=True))
    measured = parts.step_flops_per_image(objective, net, batch, cfg, torch.device("cpu"))
    assert measured == pytest.approx(expected, rel=1e-6)
    assert min(per_case) < measured < max(per_case)


class _Only:
    """The SSD objective held to one case (no flop_cases of its own)."""

    def __init__(self, objective, case: int) -> None:
        self.objective, self.case = objective, case

    def __call__(self, net, batch):
        with self.objective.flop_cases()[self.case][1]:
            return self.objective(net, batch)
