"""S5 end to end on CPU: the small SiD2 reference, the demo corpus, the chromatogram."""

from __future__ import annotations

import json

import pytest
import torch

from components.chromatography import crossing_time
from pipelines import experiments
from pipelines.experiments.chromatogram import model_crossing


@pytest.mark.slow
def test_chromatogram_small_end_to_end(tmp_path):
    res = experiments.run("chromatogram", "small", {"work_dir": str(tmp_path), "mlflow": False})
    out = tmp_path / "chromatogram" / "small"
    assert (out / "results.json").exists()
    for f in ("chromatogram.png", "emergence.png", "curves.json"):
        assert (out / f).stat().st_size > 1000
    assert res["verdict"]["verdict"] in ("explained", "not explained")
    curves = json.loads((out / "curves.json").read_text())
    t = torch.tensor(curves["t"], dtype=torch.float64)
    e_model = torch.tensor(curves["model_energy_fraction"], dtype=torch.float64)
    e_gauss = torch.tensor(curves["gaussian_energy_fraction"], dtype=torch.float64)
    model_t, _ = model_crossing(t, e_model)
    gauss_t = crossing_time(t, e_gauss)
    rows = res["rows"]
    assert [r["tag"] for r in rows] == ["band0", "band1", "band2", "band3"]
    for k, r in enumerate(rows):
        assert abs(r["model_measured_t"] - model_t[k].item()) < 1e-9
        assert abs(r["gaussian_measured_t"] - gauss_t[k].item()) < 1e-9
        assert abs(r["model_measured_raw_t"] - crossing_time(t, e_model)[k].item()) < 1e-9
    # the model's x0-prediction gains each band's energy from high noise to low noise
    mid = len(t) // 2
    assert (e_model[:, 0] > 0.9).all() and (e_model[:, 0] > e_model[:, mid]).all()
    assert (e_gauss[:, 0] > e_gauss[:, -1]).all()
