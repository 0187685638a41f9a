"""``prism science``: the README's demo commands write real figures and JSON."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from prism_cli import app

runner = CliRunner()


def test_chromatogram_command_writes_png_and_json(tmp_path):
    out = tmp_path / "chrom.png"
    res = runner.invoke(app, ["science", "chromatogram", "--schedule", "sd_scaled_linear",
                              "--no-measure", "--levels", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.stat().st_size > 20_000
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["tau_discrete"] == {"999": 874, "800": 631, "600": 394, "400": 204, "200": 75}
    assert len(doc["a"]) == 3 and len(doc["a"][0]) == len(doc["t"])


def test_chromatogram_with_measurement(tmp_path):
    out = tmp_path / "c.png"
    res = runner.invoke(app, ["science", "chromatogram", "--schedule", "cosine", "--levels",
                              "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    measured = json.loads(out.with_suffix(".json").read_text())["measured"]
    em = measured["emergence"]
    assert em[2] > em[1] > em[0]  # coarse bands emerge first


def test_schedules_command(tmp_path):
    out = tmp_path / "s.png"
    res = runner.invoke(app, ["science", "schedules", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.with_suffix(".json").read_text())
    assert {"cosine", "sid2_32", "ddpm_linear", "sd_scaled_linear", "edm"} <= set(doc["schedules"])
    # shifting to a smaller image moves every level's half-generation time earlier (larger t)
    assert doc["schedules"]["sid2_32"]["t_half"][0] > doc["schedules"]["cosine"]["t_half"][0]


def test_bad_inputs_are_named(tmp_path):
    res = runner.invoke(app, ["science", "chromatogram", "--schedule", "nope",
                              "--out", str(tmp_path / "x.png")])
    assert res.exit_code != 0 and "unknown schedule" in res.output
    res = runner.invoke(app, ["science", "schedules", "--out", str(tmp_path / "x.txt")])
    assert res.exit_code != 0 and "--out" in res.output
