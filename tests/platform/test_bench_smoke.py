"""The training benchmarks' CPU smoke runs: the harnesses work and report what they claim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, f"benchmarks/{script}", "--smoke", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=True)


def test_train_throughput_smoke_reports_every_model_and_the_fastest_ratio(tmp_path):
    pytest.importorskip("diffusers", reason="the reference model is diffusers' UNet2DModel")
    _run("train_throughput.py", tmp_path)
    row = json.loads((tmp_path / "train_throughput.json").read_text())["results"][0]
    runs = row["models"]
    assert set(runs) == {"ours eager", "diffusers one-head eager",
                         "diffusers default-heads eager"}
    assert all(r["images_per_second"] > 0 for r in runs.values())
    fastest_ref = max((n for n in runs if n.startswith("diffusers")),
                      key=lambda n: runs[n]["images_per_second"])
    assert row["fastest"]["diffusers"] == fastest_ref
    assert row["ratio"] == pytest.approx(
        runs["ours eager"]["images_per_second"] / runs[fastest_ref]["images_per_second"])


def test_train_profile_smoke_accounts_for_the_step_by_op_class(tmp_path):
    from benchmarks.train_profile import op_class

    # the classes of real CUDA kernel names (H100, compiled UNet step)
    assert op_class("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc") == "conv"
    assert op_class("flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert op_class("triton_red_fused_native_group_norm_silu_3") == "norm"
    assert op_class("void at::native::(anonymous)::multi_tensor_apply_kernel<...Adam") == \
        "optimizer"
    assert op_class("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert op_class("nvjet_tst_128x64_64x8_1x2_h_bz_TNN") == "matmul"
    assert op_class("aten::mm") == "matmul" and op_class("aten::convolution") == "conv"
    assert op_class("triton_poi_fused_add_mul_silu_7") == "elementwise"
    proc = _run("train_profile.py", tmp_path)
    row = json.loads((tmp_path / "train_profile.json").read_text())["results"][0]
    per_class = row["per_class_ms"]
    assert per_class["conv"] > 0 and per_class["norm"] > 0 and per_class["attention"] > 0
    assert row["kernel_ms"] == pytest.approx(sum(per_class.values()))
    assert row["kernel_ms"] <= row["wall_ms"] * 1.5  # profiled op time is of the step's order
    assert "ms per step" in proc.stdout


def test_dimr_throughput_profile_splits_every_models_step_by_op_class(tmp_path):
    from benchmarks.train_profile import CLASSES

    proc = _run("dimr_throughput.py", tmp_path, "--profile", "--models", "dimr,dimr_tbranch,dit",
                "--layouts", "contiguous,channels_last")
    models = json.loads((tmp_path / "dimr_throughput.json").read_text())["models"]
    assert set(models) == {"dimr", "dimr_tbranch", "dit", "dimr@channels_last",
                           "dimr_tbranch@channels_last", "dit@channels_last"}
    assert models["dit"]["layout"] == "contiguous_format"
    assert models["dit@channels_last"]["layout"] == "channels_last"
    # the same work either way: the layout moves bytes, not FLOPs
    assert models["dimr@channels_last"]["gflop_per_step"] == pytest.approx(
        models["dimr"]["gflop_per_step"])
    for name, r in models.items():
        per_class = r["per_class_ms"]
        assert set(per_class) == set(CLASSES), name
        assert per_class["matmul"] > 0 and per_class["norm"] > 0, name  # a real step ran
        assert r["kernel_ms"] == pytest.approx(sum(per_class.values()))
        assert r["gap_ms"] == pytest.approx(max(r["step_ms"] - r["kernel_ms"], 0.0))
        assert r["top_kernels"] and r["top_kernels"][0]["ms_per_step"] > 0
    assert models["dimr"]["per_class_ms"]["conv"] > 0  # DiMR's ConvNeXt branch
    assert "gap and kernels by op class" in proc.stdout


def test_stream_throughput_smoke_times_both_streams(tmp_path):
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("the baseline stream is read from git")
    proc = _run("stream_throughput.py", tmp_path)
    result = json.loads((tmp_path / "stream_throughput.json").read_text())
    median = result["median"]
    assert set(median) == {"streams@HEAD", "this tree"}
    assert all(m["samples_per_second"] > 0 and m["longest_wait_ms"] > 0
               for m in median.values())
    assert result["ratio"] == pytest.approx(median["this tree"]["samples_per_second"]
                                            / median["streams@HEAD"]["samples_per_second"])
    assert "ratio this tree / streams@HEAD" in proc.stdout


SSD_SMOKE = ["eager=4,compiled=4,compiled-cached=4,compiled-blocks=4,graphs=4",
             "training/configs/ssd-32-3l.yaml",
             "--set", "model.preset=ssd-debug",
             "--set", "data.resolution=16", "--set", "train.batch_size=8",
             "--set", "train.log_every_images=16", "--set", "data.num_workers=0",
             "--set", "optim.warmup_images=16",
             "--set", "objective.options.levels=2"]  # three resolution pairs to compile


@pytest.mark.slow  # five short trainings, three compiled on CPU: 4 to 8 minutes
def test_ssd_compile_cost_smoke_times_eager_compiled_and_cached(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "SSDCC_WORK": str(tmp_path / "work"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "benchmarks/ssd_compile_cost.sh", *SSD_SMOKE], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "ssd_compile_cost.json").read_text())["rows"]
    # graphs: run.cuda_graphs=on, which records nothing off CUDA (the run is eager here)
    assert set(rows) == {"eager", "compiled", "compiled-cached", "compiled-blocks", "graphs"}
    for r in rows.values():
        assert r["images"] > 0 and r["steady_images_per_s"] > 0
        assert r["wall_s"] == pytest.approx(r["first_step_s"] + r["loop_seconds"])
    # the second compiled run finds the first one's kernels: its compilation is far shorter
    assert rows["compiled-cached"]["first_step_s"] < 0.5 * rows["compiled"]["first_step_s"]
    for name in ("compiled", "compiled-cached", "compiled-blocks", "graphs"):
        r, e = rows[name], rows["eager"]
        assert r["speedup"] == pytest.approx(r["steady_images_per_s"] / e["steady_images_per_s"])
        assert (r["pays_after_wall_s"] is None) == (r["speedup"] <= 1)
    assert "compiling pays after" in proc.stdout


def test_hf_outlier_seeds_finds_the_noisy_seeds_by_class_and_across_models(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    smooth = (127 + 60 * np.sin(xx[None] / 3 + rng.uniform(0, 6, (60, 1, 1)))
              * np.cos(yy[None] / 4)).astype(np.uint8)  # (60, 16, 16): low frequencies only
    grain = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "real.npz", x=np.repeat(grain[..., None], 3, -1), y=np.zeros(60))
    # generated: the same scenes without the real images' grain, 3 (then 2) left as noise
    images = np.repeat(smooth[:40, None], 3, 1)  # (40, 3, 16, 16) uint8, seeds 0..39
    noisy = images.copy()
    noisy[[3, 13, 23]] = rng.integers(0, 256, (3, 3, 16, 16), dtype=np.uint8)
    earlier = images.copy()
    earlier[[3, 5]] = rng.integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "now.npy", noisy)
    np.save(tmp_path / "earlier.npy", earlier)
    proc = subprocess.run(
        [sys.executable, "benchmarks/hf_outlier_seeds.py", str(tmp_path / "now.npy"),
         "--real", str(tmp_path / "real.npz"), "--earlier", str(tmp_path / "earlier.npy")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(proc.stdout[: proc.stdout.index("\n}") + 2])
    assert report["fraction"] == pytest.approx(3 / 40)
    # class 3 holds seeds 3, 13, 23 and 33: three of its four images are noise
    assert report["per_class"] == pytest.approx([0, 0, 0, 0.75, 0, 0, 0, 0, 0, 0])
    assert (report["outliers"], report["earlier_outliers"], report["shared_seeds"]) == (3, 2, 1)


def test_colour_spread_tells_a_shared_colour_cast_from_real_colours(tmp_path):
    rng = np.random.default_rng(0)
    colours = rng.uniform(40, 215, (80, 1, 1, 3))  # every real image its own mean colour
    real = np.clip(colours + rng.normal(0, 20, (80, 8, 8, 3)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "real.npz", x=real, y=np.zeros(80))
    cast = np.clip(np.array([150, 140, 90])[None, :, None, None]
                   + rng.normal(0, 20, (40, 3, 8, 8)), 0, 255).astype(np.uint8)
    np.save(tmp_path / "m@200.npy", cast)
    np.save(tmp_path / "m@100.npy", cast[:, ::-1].copy())
    proc = subprocess.run(
        [sys.executable, "benchmarks/colour_spread.py", str(tmp_path / "m@200.npy"),
         str(tmp_path / "m@100.npy"), "--real", str(tmp_path / "real.npz"), "--chains",
         "--levels", "1,2", "--field-resolution", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(proc.stdout[: proc.stdout.index("\n}") + 2])
    rows = report["images"]
    assert list(rows) == ["m@100", "m@200", "real"]  # arms, then images seen
    assert max(rows["m@200"]["colour_spread"]) < 0.02 < 0.1 < min(rows["real"]["colour_spread"])
    assert rows["m@200"]["set_colour"] == pytest.approx([150 / 255, 140 / 255, 90 / 255],
                                                        abs=0.01)
    assert rows["m@100"]["set_colour"][0] == pytest.approx(90 / 255, abs=0.01)
    # the exact denoiser's chains keep most of the mean-colour variance (n = 1000)
    for kept in report["chains"]["kept"].values():
        assert 0.75 < kept < 1.15
    for kept in report["chains"]["field_kept"].values():  # 1/f^2 images: colour and contrast
        assert 0.75 < kept["mean_colour"] < 1.15 and 0.8 < kept["within_image"] < 1.1
