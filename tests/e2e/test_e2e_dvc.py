"""The DVC pipeline in a fresh clone: ``dvc repro`` on the demo parameters completes (run by
``make demo``'s job, tests/e2e_clone.py), ``dvc status`` is then clean, a second ``dvc repro``
runs nothing, metrics and plots render, ``dvc exp run -S`` reruns only what the parameter
touches, ``dvc push`` fills a local remote, and ``dvc push`` / ``dvc pull`` through the
shipped S3 remote restore the outputs in a fresh clone."""

from __future__ import annotations

import json
import re
import subprocess

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


def test_push_then_pull_into_a_fresh_clone_through_s3(clone, s3_server, tmp_path):
    """The team workflow of docs/guide/sharing.md against a real S3-protocol server: ``make
    dvc-remote`` points the shipped ``s3`` remote at a bucket, ``dvc push`` uploads the
    pipeline's outputs, and a fresh clone of the commit that holds ``dvc.lock`` gets them back
    with ``dvc pull``, byte for byte, with ``dvc status`` clean and nothing to reproduce."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(
        Bucket="prism-dvc-e2e")
    env = dict(clone.env, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1")
    remote = ["make", "dvc-remote", "DVC_BUCKET=prism-dvc-e2e", f"DVC_ENDPOINT={s3_server}"]

    def run(cwd, *cmd):
        r = subprocess.run(list(cmd), cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=600)
        assert r.returncode == 0, (cmd, r.stdout[-3000:])
        return r.stdout

    run(clone.path, *remote)
    assert "s3" in run(clone.path, "dvc", "remote", "default")
    run(clone.path, "dvc", "push")
    git = ["git", "-c", "user.name=prism-test", "-c", "user.email=test@prism.invalid"]
    # dvc.lock, and the uncached metrics, plots and register decision that go with it
    run(clone.path, *git, "add", "dvc.lock", "outputs/metrics", "outputs/plots",
        "outputs/register.json")
    run(clone.path, *git, "commit", "-q", "-m", "pipeline results")
    fresh = tmp_path / "fresh"
    run(tmp_path, "git", "clone", "-q", str(clone.path), str(fresh))
    (fresh / ".venv").symlink_to(clone.path / ".venv", target_is_directory=True)
    run(fresh, *remote)
    env["PYTHONPATH"] = str(fresh)
    run(fresh, "dvc", "pull")
    for f in ("outputs/train/demo-v/model/model.safetensors", "outputs/register.json",
              "outputs/eval/demo-v/metrics.json", "outputs/data/schedule.json"):
        assert (fresh / f).read_bytes() == (clone.path / f).read_bytes(), f
    status = run(fresh, "dvc", "status")
    assert "up to date" in status, status
    assert "Running stage" not in run(fresh, "dvc", "repro"), "pulled outputs were rebuilt"


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
