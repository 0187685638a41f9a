"""The DVC pipeline in a fresh clone: ``dvc repro`` on the demo parameters completes (run by
``make demo``'s job, tests/e2e_clone.py), ``dvc status`` is then clean, a second ``dvc repro``
runs nothing, metrics and plots render, ``dvc exp run -S`` reruns only what the parameter
touches, and ``dvc push`` fills a local remote."""

from __future__ import annotations

import json
import re

import pytest
from e2e_clone import demo_clone  # tests/ is on sys.path (rootdir insertion)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clone():
    c = demo_clone()
    assert c.returncode == 0, c.output[-6000:]
    return c


def test_repro_completes_with_every_stage(clone):
    ran = set(re.findall(r"Running stage '([^']+)'", clone.output))
    for stage in ("data_demo", "data_ingest", "data_spectra", "data_schedules", "feature_net",
                  "train@demo-v",
                  "train@demo-v-sd", "evaluate@demo-v", "evaluate@demo-v-sd",
                  "chromatogram@demo-v", "schedules_compared", "corpus_rapsd", "register"):
        assert stage in ran, f"stage {stage} did not run: {sorted(ran)}"
    lock = (clone.path / "dvc.lock").read_text()
    assert "train@demo-v:" in lock and "register:" in lock
    for f in ("outputs/train/demo-v/model/model.safetensors", "outputs/eval/demo-v/metrics.json",
              "outputs/feature_net/feature_net.safetensors",
              "outputs/data/schedule.json", "outputs/register.json",
              "outputs/plots/loss/demo-v.json", "outputs/plots/chromatogram/demo-v-sd.json",
              "outputs/plots/rapsd.json", "outputs/plots/schedules.json"):
        assert (clone.path / f).is_file(), f


def test_status_clean_and_second_repro_is_a_no_op(clone):
    status = clone.run("dvc", "status")
    assert status.returncode == 0, status.stdout
    assert "up to date" in status.stdout, status.stdout
    again = clone.run("dvc", "repro")
    assert again.returncode == 0, again.stdout
    assert "Running stage" not in again.stdout, again.stdout
    assert "didn't change, skipping" in again.stdout


def test_metrics_and_plots_render(clone, tmp_path):
    shown = clone.run("dvc", "metrics", "show", "--json")
    assert shown.returncode == 0, shown.stdout
    doc = json.loads(shown.stdout[shown.stdout.index("{"):])
    data = json.dumps(doc)
    assert "swd_x1e3" in data and "passed" in data
    assert "fd_prism" in data  # the evaluate stages use the feature_net stage's network
    # one row per (model, schedule, steps), one shared set of columns: a table to scan
    rows = [p for rev in doc.values() for p in rev.get("data", {})]
    assert any(p.startswith("outputs/metrics/eval/demo-v/") for p in rows), rows
    table = clone.run("dvc", "metrics", "show", "--md")
    header = table.stdout.splitlines()[0]
    assert header.count("|") - 1 <= 16, header
    reg = json.loads((clone.path / "outputs/register.json").read_text())
    assert reg["best"] in ("demo-v", "demo-v-sd") and reg["value"] == min(reg["scores"].values())
    plots = clone.run("dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    assert plots.returncode == 0, plots.stdout
    html = (tmp_path / "plots" / "index.html").read_text()
    for name in ("loss", "rapsd", "chromatogram", "schedules", "eval"):
        assert name in html, name


def test_push_to_a_local_remote(clone, tmp_path):
    remote = tmp_path / "remote"
    assert clone.run("dvc", "remote", "add", "--local", "-f", "e2e", str(remote)).returncode == 0
    pushed = clone.run("dvc", "push", "-r", "e2e")
    assert pushed.returncode == 0, pushed.stdout
    assert sum(1 for p in remote.rglob("*") if p.is_file()) > 10


def test_exp_run_with_a_parameter_reruns_only_its_stage(clone):
    params = (clone.path / "params.yaml").read_text()
    exp = clone.run("dvc", "exp", "run", "-S", "register.threshold=1.0")
    assert exp.returncode == 0, exp.stdout
    ran = set(re.findall(r"Running stage '([^']+)'", exp.stdout))
    assert ran == {"register"}, exp.stdout
    reg = json.loads((clone.path / "outputs/register.json").read_text())
    assert reg["threshold"] == 1.0 and reg["passed"] is False and reg["promoted"] is None
    shown = clone.run("dvc", "exp", "show", "--json")
    assert shown.returncode == 0 and '"threshold": 1.0' in shown.stdout, shown.stdout[-3000:]
    # the experiment leaves its parameters in the workspace: put them back, rerun register
    (clone.path / "params.yaml").write_text(params)
    back = clone.run("dvc", "repro")
    assert back.returncode == 0 and set(re.findall(r"Running stage '([^']+)'", back.stdout)) \
        == {"register"}, back.stdout
    assert json.loads((clone.path / "outputs/register.json").read_text())["passed"] is True
