"""The spectra job on a real local Ray cluster, its outputs, reruns, and the schedule model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from common.shards import iter_samples, list_shards
from components.spectra import gaussian_random_field, image_statistics, uint8_to_unit
from components.spectral_schedules import ScheduleModel, spectral_lambda_grid
from pipelines.cli.data import data_app
from pipelines.config import IngestConfig, SpectraJobConfig
from pipelines.data.ingest import ingest
from pipelines.data.spectra_job import STATS_SCHEMA, run_spectra

pytestmark = pytest.mark.ray


def _grf_folder(root: Path, n: int = 40) -> Path:
    """Images whose luminance has a power-law spectrum (beta 2.0), two classes, two sizes."""
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        size = 32 if c == 0 else 48
        g = gaussian_random_field(n, size, 2.0, seed=c, variance=0.05)
        u8 = np.clip(np.rint((g + 1) * 127.5), 0, 255).astype(np.uint8)
        for i in range(n):
            Image.fromarray(np.repeat(u8[i][..., None], 3, axis=2)).save(root / f"c{c}/{i}.png")
    return root


def test_spectra_job_outputs_rerun_and_schedule_model(ray_local, tmp_path: Path) -> None:
    src = _grf_folder(tmp_path / "src")
    ingest(str(src), str(tmp_path / "shards"), IngestConfig(shard_size=25))
    out = tmp_path / "stats"
    res = run_spectra(str(tmp_path / "shards"), str(out),
                      SpectraJobConfig(shards_per_task=2), progress=False)
    shards = list_shards(str(tmp_path / "shards"))
    assert res["shards_done_now"] == len(shards) == 4 and res["images_now"] == 80
    files = sorted(out.glob("shard-*.parquet"))
    assert len(files) == 4
    table = pq.read_table(files[0])
    assert table.schema.remove_metadata() == STATS_SCHEMA
    assert json.loads(table.schema.metadata[b"prism.spectra"])["eps_lo"] == 0.01
    # values equal a direct computation on the decoded images, keyed by sample key
    samples = {s["key"]: s for s in iter_samples(shards[0])}
    row = table.to_pylist()[0]
    img = samples[row["key"]]["image"]
    direct = image_statistics(uint8_to_unit(img[None]))
    np.testing.assert_allclose(row["lum_rapsd"], direct["lum_rapsd"][0], rtol=1e-5)
    assert row["beta"] == pytest.approx(float(direct["beta"][0]))
    assert row["label"] == samples[row["key"]]["label"]
    assert len(row["lum_rapsd"]) == row["height"] // 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 80 and summary["sizes"] == {"32x32": 40, "48x48": 40}
    assert abs(summary["beta"]["mean"] - 2.0) < 0.3  # 8-bit quantised GRFs, beta 2
    assert (out / "rapsd.png").stat().st_size > 1000 and (out / "histograms.png").exists()
    # a rerun skips finished shards; a removed output is recomputed
    files[1].unlink()
    again = run_spectra(str(tmp_path / "shards"), str(out), progress=False, summary=False)
    assert again["shards_done_now"] == 1 and files[1].exists()
    # a rerun with another setting refuses (the old numbers would be kept under it) ...
    with pytest.raises(ValueError, match=r"4 existing outputs.*eps_lo 0.01 -> 0.05.*--fresh"):
        run_spectra(str(tmp_path / "shards"), str(out), SpectraJobConfig(eps_lo=0.05),
                    progress=False, summary=False)
    assert json.loads(pq.read_schema(files[0]).metadata[b"prism.spectra"])["eps_lo"] == 0.01
    # ... and with --fresh recomputes every output under the new one
    again = run_spectra(str(tmp_path / "shards"), str(out), SpectraJobConfig(eps_lo=0.05),
                        progress=False, summary=False, fresh=True)
    assert again["shards_done_now"] == 4
    assert json.loads(pq.read_schema(files[0]).metadata[b"prism.spectra"])["eps_lo"] == 0.05
    run_spectra(str(tmp_path / "shards"), str(out), progress=False, summary=False, fresh=True)
    # schedule model through the CLI
    r = CliRunner().invoke(data_app, ["schedules", str(out), str(tmp_path / "m"), "--per-class",
                                      "--n-components", "2"])
    assert r.exit_code == 0, r.output
    model = ScheduleModel.from_json(json.loads((tmp_path / "m/schedule.json").read_text()))
    assert model.meta["images"] == 80 and sorted(model.per_class) == [0, 1]
    p = model.sample(64, seed=0, class_labels=torch.arange(64) % 2)
    grid = spectral_lambda_grid(p, 10)
    assert (grid[1:] > grid[:-1]).all()


def test_cli_reports_bad_input_clearly(tmp_path: Path) -> None:
    r = CliRunner().invoke(data_app, ["spectra", str(tmp_path / "none"), str(tmp_path / "o")])
    assert r.exit_code == 2 and "not a directory" in r.output
    r = CliRunner().invoke(data_app, ["ingest", str(tmp_path), str(tmp_path / "o"),
                                      "--shard-size", "0"])
    assert r.exit_code == 2 and "shard_size" in r.output
