"""The experiment runner: refusals, and S1 and S2 end to end on CPU in their small settings,
with the results' numbers recomputed from the saved samples (not read back)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import experiments
from pipelines.experiments import ExperimentError
from pipelines.experiments.common import (
    SPEC_FILE,
    ExperimentSettings,
    ReferenceSpec,
    feature_space,
    measure,
    paired_difference,
    real_images,
    reference_hash,
    saved_samples,
    train_references,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("name", "setting", "overrides", "says"), [
    ("no-such-claim", "small", {}, "unknown experiment 'no-such-claim'"),
    ("upsample-guidance", "huge", {}, "unknown setting 'huge'"),
    ("upsample-guidance", "small", {"thetas": [-1.0]}, "thetas must be > 0"),
    ("upsample-guidance", "small", {"no_such_field": 1}, "no_such_field"),
    ("spectral-schedules", "small", {"samplers": ["euler"]}, "samplers must be among"),
    ("chromatogram", "small", {"levels": 9}, "levels"),
])
def test_runner_refuses_bad_requests(name, setting, overrides, says):
    with pytest.raises(ExperimentError, match=says):
        experiments.resolve(name, setting, overrides)


def test_evaluation_only_run_refuses_to_train_and_names_what_differs(tmp_path):
    """With train_missing off a reference trained under other settings is not retrained (that
    would spend the evaluation's budget on training); the error names the differing set."""
    s = ExperimentSettings(work_dir=str(tmp_path), train_missing=False, mlflow=False)
    trained = {"a": ReferenceSpec(config="debug", sets=["train.time_limit_s=420.0"])}
    wanted = {"a": ReferenceSpec(config="debug", sets=["train.time_limit_s=480.0"])}
    # what the train stage left: a finished reference with its spec
    with pytest.raises(FileNotFoundError):
        train_references(trained, s, "t")
    done = next((tmp_path / "references").glob("a-*"), None)
    assert done is None, "an evaluation-only run created a reference"
    done = tmp_path / "references" / f"a-{reference_hash(trained['a'])}"
    (done / "model").mkdir(parents=True)
    (done / "model" / "config.json").write_text("{}")
    (done / SPEC_FILE).write_text(json.dumps({"label": "a", "config": "debug",
                                              "sets": trained["a"].sets}))
    assert train_references(trained, s, "t")["a"]["model_dir"] == str(done / "model")
    with pytest.raises(FileNotFoundError) as err:
        train_references(wanted, s, "t")
    msg = str(err.value)
    assert done.name in msg and "train.time_limit_s=480.0" in msg, msg
    assert "train.time_limit_s=420.0" in msg, msg
    assert len(list((tmp_path / "references").iterdir())) == 1  # nothing new was started


def test_cli_refuses_unknown_experiment_with_exit_2():
    r = subprocess.run([sys.executable, "-m", "prism_cli", "experiment", "run", "nope"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "unknown experiment 'nope'" in r.stderr + r.stdout
    assert "spectral-schedules" in r.stderr + r.stdout  # the message lists the known ones


def _recompute(out: Path, row: dict, tag: str, real: torch.Tensor, settings, fnet) -> None:
    """The row's metrics from ``samples/<tag>.npy``, measured again."""
    images = torch.from_numpy(np.load(out / "samples" / f"{tag}.npy"))
    assert len(images) == row["n"]
    again, _ = measure(images, real, feature_space(fnet, "cpu"), settings, "cpu")
    for key in ("swd_x1e3", "log_rapsd_l1", "precision", "recall"):
        assert again[key] == pytest.approx(row[key], rel=1e-5, abs=1e-7), key
    fd = next(k for k in row if k.startswith("FD-prism") and not k.endswith("_se"))
    assert again[fd] == pytest.approx(row[fd], rel=1e-5)


@pytest.fixture(scope="module")
def s2(tmp_path_factory):
    work = tmp_path_factory.mktemp("s2")
    res = experiments.run("upsample-guidance", "small", {"work_dir": str(work), "mlflow": False})
    return res, work / "upsample-guidance" / "small"


@pytest.mark.slow
def test_upsample_guidance_small_end_to_end(s2):
    from pipelines.experiments.upsample_guidance import Settings, upscale_pil

    res, out = s2
    saved = json.loads((out / "results.json").read_text())
    assert saved["verdict"] == res["verdict"]
    for f in res["figures"]:
        assert (out / f).stat().st_size > 50, f
    s = Settings.model_validate(res["settings"])
    tags = [r["tag"] for r in res["rows"]]
    assert tags[0] == "naive" and {"ug-th0.6", "ug-th1.3", "ug-th1.3-eta0.5", "cascade",
                                   "sdedit", "bicubic", "lanczos"} <= set(tags)
    assert res["resolution"] == 2 * res["native_resolution"] == 32
    real, _ = real_images(res["real_data"], None, s.seed, resolution=res["resolution"])
    rows = {r["tag"]: r for r in res["rows"]}
    for tag in ("ug-th1.3", "bicubic", "sdedit"):
        _recompute(out, rows[tag], tag, real, s.metrics, res["feature_net"])
    # the upscalers are the native samples, upscaled; every method's samples differ
    native = torch.from_numpy(np.load(out / "samples" / "native.npy"))
    assert native.shape[-1] == 16
    assert torch.equal(upscale_pil(native, 2, "lanczos"),
                       torch.from_numpy(np.load(out / "samples" / "lanczos.npy")))
    pics = {t: np.load(out / "samples" / f"{t}.npy").astype(np.int16) for t in tags}
    for a in tags:
        for b in tags:
            if a < b:
                assert np.abs(pics[a] - pics[b]).mean() > 0.5, (a, b)
    # guidance strength and switch-off time both change the result, monotonically in cost
    g = pics["ug-th1.3"]
    assert np.abs(g - pics["ug-th0.6"]).mean() > 0.5
    assert np.abs(g - pics["ug-th1.3-eta0.5"]).mean() > 0.5
    # the paired differences come from the saved bootstrap replicates
    details = json.loads((out / "details.json").read_text())
    for c in res["comparisons"]:
        for key, diff in c.items():
            if isinstance(diff, dict):
                again = paired_difference(details[c["a"]], details[c["b"]], key)
                assert again["difference"] == pytest.approx(diff["difference"], abs=1e-9)
    assert res["verdict"]["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    assert set(res["verdict"]["against"]) == {"naive", "bicubic", "lanczos"}


@pytest.mark.slow
def test_upsample_guidance_rerun_reuses_samples(s2):
    res, out = s2
    settings = {"work_dir": str(out.parents[1]), "mlflow": False}
    again = experiments.run("upsample-guidance", "small", settings)
    for a, b in zip(res["rows"], again["rows"], strict=True):
        assert a["tag"] == b["tag"]
        if a["tag"] not in ("bicubic", "lanczos"):  # those are upscaled again (milliseconds)
            assert a["sample_seconds"] == b["sample_seconds"]
    assert saved_samples(out, "naive", 5) is None  # a different n is not reused


@pytest.mark.slow
def test_spectral_schedules_small_end_to_end(tmp_path):
    from pipelines.experiments.spectral_schedules import Settings

    res = experiments.run("spectral-schedules", "small",
                          {"work_dir": str(tmp_path), "mlflow": False})
    out = tmp_path / "spectral-schedules" / "small"
    assert json.loads((out / "results.json").read_text())["verdict"] == res["verdict"]
    for f in res["figures"]:
        assert (out / f).stat().st_size > 50, f
    s = Settings.model_validate(res["settings"])
    assert {r["model"] for r in res["rows"]} == {"sid2", "spectral"}
    real, _ = real_images(res["real_data"], None, s.seed)
    for row in res["rows"][:: max(1, len(res["rows"]) // 3)]:
        _recompute(out, row, row["tag"], real, s.metrics, res["feature_net"])
    # the spectral model samples on its own per-image schedules: not SiD2's images
    a = np.load(out / "samples" / "sid2-ddim-4.npy").astype(np.int16)
    b = np.load(out / "samples" / "spectral-ddim-4.npy").astype(np.int16)
    assert np.abs(a - b).mean() > 1.0
    details = json.loads((out / "details.json").read_text())
    for c in res["comparisons"]:
        for key, diff in c.items():
            if isinstance(diff, dict):
                again = paired_difference(details[f"sid2-{c['sampler']}-{c['steps']}"],
                                          details[f"spectral-{c['sampler']}-{c['steps']}"], key)
                assert again["difference"] == pytest.approx(diff["difference"], abs=1e-9)
    assert res["verdict"]["verdict"] in ("reproduced", "contradicted", "no difference",
                                         "inconclusive")
    for label, ref in res["references"].items():
        assert ref["training"]["images_seen"] >= s.training_images, label


def test_arms_grid_names_each_strip_and_draws_small_images_larger(tmp_path):
    from PIL import Image

    from pipelines.experiments import arm_figures as arms

    (tmp_path / "samples").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for tag, name in (("a@time", "a@10"), ("bb@time", "bb@20")):
        np.save(tmp_path / "samples" / f"{name}.npy",
                rng.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8))
        rows.append({"tag": tag, "samples": name})
    arms.grid_figure(tmp_path, rows, 4)
    page = np.asarray(Image.open(tmp_path / "grid.png").convert("L"))
    strip = arms.image_grid(torch.zeros(4, 3, 16, 16), nrow=4)  # one unzoomed strip
    assert page.shape[0] == 2 * strip.shape[-2] * 4  # 16 px images drawn at 4x
    margin = page.shape[1] - strip.shape[-1] * 4
    assert margin > 0 and (page[:, :margin] < 128).any()  # the names are written at the left
    assert json.loads((tmp_path / "grid_rows.json").read_text()) == ["a@time", "bb@time"]
