"""The register stage (prism pipeline promote), the DVC records, and ``prism train --section``:
real MLflow (SQLite in tmp), real files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from common.run_config import Config, ConfigError, load_config
from pipelines.evaluation.register import RegisterConfig, load_register_config, passes, promote
from pipelines.records import write_records
from prism_cli import app


def _model_dir(root: Path, name: str, uri: str, payload: bytes) -> Path:
    d = root / "train" / name / "model"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(payload)
    (d / "schedule.json").write_text("{}")
    cfg = Config.model_validate({"run": {"name": name}, "tracking": {"uri": uri}})
    (d / "config.json").write_text(json.dumps({"training": cfg.model_dump(mode="json")}))
    return d


def _eval(root: Path, name: str, swd: float, se: float | None = 1.0, shared: float = 0.0,
          seed: int = 0) -> None:
    """An evaluate output; with ``se`` the setting model-16 gets bootstrap replicates: ``swd``
    + se-sized noise of the model's own + ``shared`` x noise common to every model (the part
    that paired replicates cancel)."""
    d = root / "eval" / name
    d.mkdir(parents=True)
    rows = [{"schedule": "model", "steps": 4, "swd_x1e3": swd * 2, "sample_seconds": 0.1},
            {"schedule": "model", "steps": 16, "swd_x1e3": swd, "sample_seconds": 0.3}]
    (d / "metrics_table.json").write_text(json.dumps(rows))
    if se is None:
        return
    own = np.random.default_rng(seed + 1).standard_normal(50)
    common = np.random.default_rng(12345).standard_normal(50)
    reps = (swd + se * own + shared * common).tolist()
    iv = {"method": "bootstrap", "resamples": 50, "confidence": 0.95, "seed": 0,
          "n_generated": 64, "metrics": {"swd_x1e3": {
              "estimate": swd, "se": float(np.std(reps, ddof=1)), "replicates": reps}}}
    (d / "model-16").mkdir()
    (d / "model-16" / "metrics.json").write_text(json.dumps({"intervals": iv}))


def _params(root: Path, **register) -> Path:
    p = root / "params.yaml"
    p.write_text(yaml.safe_dump({"models": {"a": {}, "b": {}},
                                 "register": {"steps": 16, **register}}))
    return p


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root ./mlruns lands in tmp
    _model_dir(tmp_path, "a", uri, b"weights-a")
    _model_dir(tmp_path, "b", uri, b"weights-b")
    _eval(tmp_path, "a", 120.0)
    _eval(tmp_path, "b", 80.0)
    return tmp_path, uri


def test_promote_sets_champion_on_the_best_models_exact_weights(setup):
    import mlflow

    root, uri = setup
    res = promote(_params(root, threshold=100.0), root / "eval", root / "train",
                  root / "register.json", log=lambda *_: None)
    assert res["best"] == "b" and res["passed"] and res["promoted"] == "models:/prism-b@champion"
    client = mlflow.MlflowClient(uri)
    mv = client.get_model_version_by_alias("prism-b", "champion")
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{mv.source}/artifacts/prism/model.safetensors", dst_path=str(root / "dl"))
    assert Path(local).read_bytes() == b"weights-b"
    assert json.loads((root / "register.json").read_text())["versions"]["b"] == \
        f"prism-b/{mv.version}"
    # a second promotion finds the same version (by content) instead of registering again
    promote(_params(root, threshold=100.0), root / "eval", root / "train",
            root / "register.json", log=lambda *_: None)
    assert len(client.search_model_versions("name='prism-b'")) == 1


def test_threshold_not_passed_promotes_nothing(setup):
    import mlflow
    from mlflow.exceptions import MlflowException

    root, uri = setup
    res = promote(_params(root, threshold=50.0), root / "eval", root / "train",
                  root / "register.json", log=lambda *_: None)
    assert res["best"] == "b" and not res["passed"] and res["promoted"] is None
    with pytest.raises(MlflowException):
        mlflow.MlflowClient(uri).get_model_version_by_alias("prism-b", "champion")


def _setup_pair(tmp_path, monkeypatch, a: dict, b: dict) -> Path:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    _model_dir(tmp_path, "a", uri, b"weights-a")
    _model_dir(tmp_path, "b", uri, b"weights-b")
    _eval(tmp_path, "a", seed=1, **a)
    _eval(tmp_path, "b", seed=2, **b)
    return tmp_path


def test_a_best_model_within_the_interval_is_not_promoted(tmp_path, monkeypatch):
    # 80 against 83, each +-5 of its own noise: the difference's interval spans zero
    root = _setup_pair(tmp_path, monkeypatch, dict(swd=83.0, se=5.0), dict(swd=80.0, se=5.0))
    res = promote(_params(root), root / "eval", root / "train", root / "register.json",
                  log=lambda *_: None)
    assert res["best"] == "b" and not res["passed"] and res["promoted"] is None
    c = res["comparisons"]["a"]
    assert c["method"] == "paired bootstrap" and c["lo"] < 0 < c["hi"] and not c["significant"]
    assert "not better beyond the interval than a" in res["reason"]
    # the same numbers with the point estimate trusted: promoted, and the reason says how
    res = promote(_params(root, require_significance=False), root / "eval", root / "train",
                  root / "register.json", log=lambda *_: None)
    assert res["promoted"] == "models:/prism-b@champion" and "point estimate" in res["reason"]


def test_paired_replicates_cancel_the_shared_noise(tmp_path, monkeypatch):
    # each model's replicates spread by ~20, almost all of it common to both (same seeds and
    # bootstrap rows): paired, 3 apart is clear; compared independently it would not be
    root = _setup_pair(tmp_path, monkeypatch, dict(swd=83.0, se=0.5, shared=20.0),
                       dict(swd=80.0, se=0.5, shared=20.0))
    res = promote(_params(root), root / "eval", root / "train", root / "register.json",
                  log=lambda *_: None)
    c = res["comparisons"]["a"]
    assert c["significant"] and c["hi"] < 0 and res["promoted"] == "models:/prism-b@champion"
    assert "better beyond the interval than a" in res["reason"]
    iv = json.loads((root / "eval/a/model-16/metrics.json").read_text())["intervals"]
    iv["seed"] = 1  # other bootstrap rows: not paired, the shared noise no longer cancels
    (root / "eval/a/model-16/metrics.json").write_text(json.dumps({"intervals": iv}))
    res = promote(_params(root), root / "eval", root / "train", root / "register.json",
                  log=lambda *_: None)
    assert res["comparisons"]["a"]["method"] == "independent bootstrap"
    assert not res["comparisons"]["a"]["significant"] and res["promoted"] is None


def test_without_intervals_nothing_is_claimed(tmp_path, monkeypatch):
    root = _setup_pair(tmp_path, monkeypatch, dict(swd=120.0, se=None), dict(swd=80.0, se=None))
    res = promote(_params(root), root / "eval", root / "train", root / "register.json",
                  log=lambda *_: None)
    assert res["comparisons"]["a"]["significant"] is None and res["promoted"] is None
    assert "no interval" in res["reason"]


def test_mode_max_and_bad_config_are_named(tmp_path):
    assert passes(10.0, RegisterConfig(mode="max", threshold=5.0))
    assert not passes(10.0, RegisterConfig(mode="min", threshold=5.0))
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"models": {"a": {}}, "register": {"mode": "lowest"}}))
    with pytest.raises(ValueError, match="register.mode"):
        load_register_config(p)
    p.write_text(yaml.safe_dump({"register": {}}))
    with pytest.raises(ValueError, match="models"):
        load_register_config(p)


def test_missing_eval_row_is_named(setup):
    root, _ = setup
    with pytest.raises(ValueError, match="steps=32"):
        promote(_params(root, steps=32), root / "eval", root / "train", root / "r.json",
                log=lambda *_: None)


def test_records_for_dvc(tmp_path):
    jl = tmp_path / "metrics.jsonl"
    jl.write_text('{"step": 1, "loss": 0.5, "lr": 0.1}\n{"step": 2, "loss": 0.25, "lr": 0.1}\n')
    assert write_records("loss", jl, tmp_path / "loss.json") == 2
    assert json.loads((tmp_path / "loss.json").read_text())[1] == {"step": 2, "loss": 0.25,
                                                                   "lr": 0.1}
    _eval(tmp_path, "m", 10.0)
    table = tmp_path / "eval/m/metrics_table.json"
    rows = json.loads(table.read_text())
    rows[1].update({"FD-prism-1ad5a799": 3.5, "FD-prism-1ad5a799_se": 0.2, "sampler": "ddim"})
    table.write_text(json.dumps(rows))
    (tmp_path / "metrics/m").mkdir(parents=True)
    (tmp_path / "metrics/m/model-64.json").write_text("{}")  # a row the new table lacks
    assert write_records("eval", table, tmp_path / "metrics/m") == 2
    # one file per row, the same columns for every model: dvc metrics show reads a table
    assert sorted(p.name for p in (tmp_path / "metrics/m").iterdir()) == \
        ["model-16.json", "model-4.json"]
    assert json.loads((tmp_path / "metrics/m/model-4.json").read_text()) == \
        {"steps": 4, "swd_x1e3": 20.0}
    assert json.loads((tmp_path / "metrics/m/model-16.json").read_text()) == \
        {"steps": 16, "swd_x1e3": 10.0, "fd_prism": 3.5}
    with pytest.raises(ValueError, match="writes a directory"):
        write_records("eval", table, tmp_path / "m.json")
    reg = {"metric": "swd_x1e3", "best": "m", "value": 10.0, "threshold": 50.0,
           "passed": True, "comparisons": {"other": {"lo": -1.0, "hi": 2.0}}}
    (tmp_path / "register.json").write_text(json.dumps(reg))
    write_records("register", tmp_path / "register.json", tmp_path / "reg.json")
    assert json.loads((tmp_path / "reg.json").read_text()) == \
        {k: reg[k] for k in ("metric", "best", "value", "threshold", "passed")}
    chrom = {"t": [0.0, 1.0], "lambda": [float("inf"), -10.0], "a": [[1.0, 0.0], [1.0, 0.1]]}
    (tmp_path / "c.json").write_text(json.dumps(chrom))
    write_records("chromatogram", tmp_path / "c.json", tmp_path / "cr.json")
    rec = json.loads((tmp_path / "cr.json").read_text())
    assert rec[0] == {"t": 0.0, "lambda": None, "level_0": 1.0, "level_1": 1.0}
    with pytest.raises(ValueError, match="unknown kind"):
        write_records("nope", jl, tmp_path / "x.json")
    with pytest.raises(ValueError, match="rapsd"):
        write_records("rapsd", tmp_path / "c.json", tmp_path / "x.json")


def test_train_section_of_params(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"models": {"tiny": {"train": {"batch_size": 4}}}}))
    cfg = load_config(p, ["optim.lr=0.01"], section="models.tiny")
    assert cfg.run.name == "tiny" and cfg.train.batch_size == 4 and cfg.optim.lr == 0.01
    with pytest.raises(ConfigError, match="no section 'models.big'"):
        load_config(p, section="models.big")
    p.write_text(yaml.safe_dump({"models": {"tiny": {"train": {"batch_size": 0}}}}))
    with pytest.raises(ConfigError, match=r"train.batch_size"):
        load_config(p, section="models.tiny")


def test_cli_promote_reports_a_missing_eval(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"models": {"a": {}}}))
    r = CliRunner().invoke(app, ["pipeline", "promote", "--params", str(p), "--eval-dir",
                                 str(tmp_path / "none"), "--train-dir", str(tmp_path)])
    assert r.exit_code == 2 and "run the evaluate stage" in r.output
