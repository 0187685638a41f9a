"""A training step does not wait for the GPU: no value read back, no blocking copy.

On a GPU, reading a tensor's value on the host (``bool(x.all())``, ``int(x)``, ``x.item()``)
or copying a pageable host tensor to the device waits for every kernel queued before it; once
a step, the GPU then idles while the host launches the next one. A table copied per call from
a discrete schedule did this to every DDPM-schedule recipe (the UNet, DiT and DiMR of S4).

Both are caught here on the CPU:
* the real loop runs a few steps of each family under a dispatch mode that records every op
  that reads a value back to the host (``aten._local_scalar_dense``, ``aten.nonzero``); the
  steps between the first and the last must record none, except reads of tensors that live
  on the host by design (named in ``HOST_READS``);
* copies to a device are seen on PyTorch's ``meta`` device, which computes nothing: a
  constant table reaches a device once, not once per call.
"""

from __future__ import annotations

import shutil
import sys
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from train_helpers import ROOT  # noqa: E402

from common.run_config import load_config  # noqa: E402
from components import scale  # noqa: E402
from components.devices import cached_on, to_device  # noqa: E402
from components.schedules import ddpm_linear  # noqa: E402
from components.spectral_schedules import check_params  # noqa: E402
from components.ssd import SSDProcess  # noqa: E402
from training.callbacks import Callback  # noqa: E402
from training.data import to_batch  # noqa: E402
from training.launch import run_local  # noqa: E402

CONFIGS = ROOT / "training" / "configs"
READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}
# (file, function) of reads of host tensors, which are no sync on a GPU either:
HOST_READS = {
    ("unet.py", "_class_index"),  # checks labels only where they are on the CPU
    ("dimr.py", "class_index"),  # the same for DiT and DiMR
    ("ssd.py", "sample_steps"),  # SSD draws a batch's steps on the host: the host picks the
    ("ssd.py", "__call__"),  # resolution pair (and so the graph) before launching the step
}

pytestmark = pytest.mark.usefixtures("one_thread")


class _Reads(TorchDispatchMode):
    """Records where each op that reads a tensor's value on the host was called from."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            ours = [f for f in traceback.extract_stack()[:-1]
                    if str(ROOT) in f.filename and "site-packages" not in f.filename]
            f = ours[-1]
            self.calls.append((Path(f.filename).name, f.name))
        return func(*args, **(kwargs or {}))


class _PerStep(Callback):
    def __init__(self, mode: _Reads) -> None:
        self.mode, self.steps = mode, []

    def on_step(self, step: int, images_seen: int) -> None:
        self.steps.append(self.mode.calls[:])
        self.mode.calls.clear()


@pytest.mark.parametrize("config,sets", [
    ("debug.yaml", []),  # class-conditional UNet
    ("debug.yaml", ["objective.per_instance=mixed", "objective.weighting=sigmoid"]),
    ("cifar10-ddpm-eps.yaml", ["model.preset=unet-debug"]),  # the DDPM (discrete) schedule
    ("cifar10-sid2.yaml", ["model.preset=unet-debug"]),
    ("dit-b2-32.yaml", ["model.preset=dit-debug"]),
    ("dimr-32-2r.yaml", ["model.preset=dimr-debug"]),
    ("ssd-32-3l.yaml", ["model.preset=ssd-debug"]),
], ids=["unet-labels", "spectral", "ddpm", "sid2", "dit", "dimr", "ssd"])
def test_steady_training_steps_read_nothing_back_from_the_device(tmp_path, config, sets):
    cfg = load_config(CONFIGS / config, [
        f"run.output_dir={tmp_path}", "run.name=sync", "run.device=cpu", "run.compile=off",
        "data.source=synthetic", "data.url=", "data.resolution=16", "data.synthetic_size=64",
        "data.num_workers=0", "train.total_images=40", "train.batch_size=8",
        "train.log_every_images=100000", "checkpoint.every_images=100000",
        "sampling.num_images=0", "tracking.enabled=false",
        "optim.fused=on", *sets])  # as on a GPU: the CPU foreach AdamW reads its step counts
    mode = _Reads()
    per_step = _PerStep(mode)
    with mode:
        run_local(cfg, [per_step])
    assert len(per_step.steps) == 5
    steady = Counter(c for calls in per_step.steps[1:-1] for c in calls)
    assert {c: n for c, n in steady.items() if c not in HOST_READS} == {}
    shutil.rmtree(tmp_path / "sync", ignore_errors=True)


class _Copies(TorchDispatchMode):
    """Counts copies from the host to another device."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" \
                and kwargs.get("device") is not None and torch.device(kwargs["device"]).type \
                != "cpu":
            self.n += 1
        return func(*args, **kwargs)


def test_constant_tables_reach_a_device_once_not_per_call():
    meta = torch.device("meta")
    schedule, process = ddpm_linear(), SSDProcess(16, levels=2)
    t = torch.zeros(8, device=meta)
    k = torch.zeros(8, dtype=torch.long, device=meta)
    x0, eps = torch.zeros(8, 3, 16, 16, device=meta), torch.zeros(8, 3, 8, 8, device=meta)
    counts = []
    for _ in range(3):
        with _Copies() as c:
            schedule.lambda_(t)
            schedule.t_of_lambda(t)
            process.lambda_(k)
            process.q_sample(x0, k, eps, resolution=8)
        counts.append(c.n)
    assert counts[0] >= 2 and counts[1:] == [0, 0]  # tables, resize matrices: once
    # the pyramids' binomial kernel (kornia makes it with torch.tensor(list, device=...), a
    # copy this mode does not see): kept, one per device
    scale.pyramid_down(x0[:, :1], "gaussian")
    kernel = scale._BINOMIAL_ON["meta"]
    scale.pyramid_down(x0[:, :1], "gaussian")
    assert scale._BINOMIAL_ON["meta"] is kernel
    assert schedule == ddpm_linear()  # the per-device copies are not part of the value


def test_to_device_and_cached_on_on_the_host():
    x = torch.arange(4)
    assert to_device(x, "cpu") is x
    cache: dict[str, torch.Tensor] = {}
    assert cached_on(x, "cpu", cache) is x and cache == {}
    m = cached_on(x, "meta", cache)
    assert m.device.type == "meta" and cached_on(x, "meta", cache) is m


def test_batches_are_checked_on_the_host_with_clear_errors():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    good = np.array([[0.0, 1.0, -5.0, 5.0], [0.0, 1.0, -4.0, 6.0]], np.float32)
    b = to_batch(images, np.array([0, 1]), good, ["a", "b"], torch.device("cpu"), 2)
    assert b["lambda_bounds"].tolist() == [[5.0, -5.0], [6.0, -4.0]]
    with pytest.raises(ValueError, match="label 2 of b is outside"):
        to_batch(images, np.array([0, 2]), None, ["a", "b"], torch.device("cpu"), 2)
    bad = good.copy()
    bad[1, 3] = -6.0  # lambda_max below lambda_min
    with pytest.raises(ValueError, match="lambda_max"):
        to_batch(images, None, bad, ["a", "b"], torch.device("cpu"), 0)
    bad[1, 3] = np.nan
    for p in (bad, torch.from_numpy(bad)):  # the same rule for arrays and tensors
        with pytest.raises(ValueError, match="NaN"):
            check_params(p)
