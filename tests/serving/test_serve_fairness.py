"""One large request cannot hold the device for everyone: the Sampler cuts a request over
``max_turn_image_steps`` into parts of whole images that take turns with other requests, and
answers 504 past ``request_deadline_s``. The Sampler class itself on CPU (no Serve: the
scheduling is plain asyncio inside the replica)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from components.artifact import save_model
from components.model import GenerativeModel
from components.networks.registry import build_network, preset_kwargs
from components.schedules import CosineSchedule
from serving.model import Sampler

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = build_network("unet-debug", num_classes=4)
    for p in net.parameters():
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    model = GenerativeModel(net=net, prediction="x0", n_cond=1, resolution=16, in_channels=3,
                            num_classes=4, schedule=CosineSchedule(), family="unet",
                            net_kwargs=dict(preset_kwargs("unet-debug")[1], num_classes=4),
                            schedule_name="cosine")
    return save_model(tmp_path_factory.mktemp("m") / "model", model)


def _sampler(model_dir: Path, **config) -> Sampler:
    s = Sampler.func_or_class(model_uri=str(model_dir), device="cpu", cuda_graphs=False)
    s.reconfigure({"batch_wait_timeout_s": 0.0, **config})
    return s


def test_a_request_cut_into_parts_gives_the_same_images(model_dir):
    req = {"num_images": 6, "seed": 3, "steps": 4, "class_labels": [0, 1, 2, 3, 0, 1]}
    whole = asyncio.run(_sampler(model_dir).generate(req))
    cut = asyncio.run(_sampler(model_dir, max_turn_image_steps=8).generate(req))  # 2 per part
    assert "parts" not in whole and cut["parts"] == 3
    assert cut["seeds"] == whole["seeds"] and cut["labels"] == whole["labels"]
    # the same images: a batch of 2 and a batch of 6 round a few float sums differently on
    # the CPU, which moves the odd 8-bit value by one level
    a, b = np.asarray(cut["images"], dtype=int), np.asarray(whole["images"], dtype=int)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.005


async def _small_waits_while_large_runs(s: Sampler) -> tuple[float, float]:
    """Seconds a 1-image request sent just after a large one waits, and the large one's."""
    t0 = time.perf_counter()
    large = asyncio.create_task(s.generate({"num_images": 16, "seed": 0, "steps": 24}))
    await asyncio.sleep(0.05)  # the large request holds the device
    t1 = time.perf_counter()
    small = await s.generate({"num_images": 1, "seed": 99, "steps": 2})
    t_small = time.perf_counter() - t1
    big = await large
    assert "images" in small and "images" in big
    return t_small, time.perf_counter() - t0


def test_a_small_request_does_not_wait_for_a_whole_large_one(model_dir):
    # without parts: the small request waits for all 16 images; with parts of 2 images it
    # waits for about one part (an eighth)
    t_small_whole, t_large_whole = asyncio.run(_small_waits_while_large_runs(
        _sampler(model_dir, max_turn_image_steps=10**9)))
    t_small_cut, t_large_cut = asyncio.run(_small_waits_while_large_runs(
        _sampler(model_dir, max_turn_image_steps=48)))
    assert t_small_whole > 0.6 * t_large_whole, (t_small_whole, t_large_whole)
    assert t_small_cut < 0.35 * t_large_cut, (t_small_cut, t_large_cut)


def test_a_request_past_its_deadline_gets_504_and_the_next_one_runs(model_dir):
    s = _sampler(model_dir, max_turn_image_steps=24, request_deadline_s=0.3)

    async def main():
        late = await s.generate({"num_images": 32, "seed": 0, "steps": 24})
        ok = await s.generate({"num_images": 1, "seed": 1, "steps": 2})
        return late, ok

    late, ok = asyncio.run(main())
    assert late["error"]["status"] == 504 and "deadline" in late["error"]["detail"]
    assert ok["images"].shape == (1, 16, 16, 3)


def test_a_replica_is_ready_only_with_its_model(model_dir, tmp_path):
    s = _sampler(model_dir)  # the constructor returned: the model is there (Serve's readiness)
    assert asyncio.run(s.health())["ready"]
    s.check_health()
    with pytest.raises(RuntimeError, match="failed to load"):  # Serve retries the replica
        Sampler.func_or_class(model_uri=str(tmp_path / "nothing"), device="cpu")
    s.models.clear()  # a replica that lost its model is unhealthy: Serve replaces it
    with pytest.raises(RuntimeError, match="not loaded"):
        s.check_health()


def test_bad_fairness_settings_are_refused(model_dir):
    s = _sampler(model_dir)
    with pytest.raises(ValueError, match="max_turn_image_steps"):
        s.reconfigure({"max_turn_image_steps": 0})
    with pytest.raises(ValueError, match="request_deadline_s"):
        s.reconfigure({"request_deadline_s": -1})
