"""The Sampler's work without Ray: requests into jobs (``serving.jobs``), the model cache
(``serving.loading``), the memory split (``serving.memory``) and ``serving.service`` end to end
on CPU with a tiny real model, called as plain Python."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from components.artifact import save_model
from components.generate import generate_with, to_uint8
from components.model import GenerativeModel
from components.networks.registry import build_network, preset_kwargs
from components.options import GenerateOptions
from components.schedules import CosineSchedule
from serving.jobs import (
    Limits,
    ServiceError,
    join_answers,
    late_answer,
    make_job,
    parse_request,
    split_job,
)
from serving.loading import ModelCache, ModelLoading, ModelNotFound, load_served_model
from serving.memory import memory_estimate_bytes, split_under_cap
from serving.service import SamplerService, use_bf16

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


def _tiny_model() -> GenerativeModel:
    torch.manual_seed(0)
    net = build_network("unet-debug", num_classes=4)
    for p in net.parameters():  # the zero head re-drawn: images that are not constant
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    return GenerativeModel(net=net, prediction="x0", n_cond=1, resolution=16, in_channels=3,
                           num_classes=4, schedule=CosineSchedule(), family="unet",
                           net_kwargs=dict(preset_kwargs("unet-debug")[1], num_classes=4),
                           schedule_name="cosine")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("m") / "model", _tiny_model())


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_served_model(str(model_dir), "cpu")  # (model, info)


def _service(model_dir: Path, allow_other_models: bool = True, **config) -> SamplerService:
    s = SamplerService(str(model_dir), "cpu", allow_other_models=allow_other_models,
                       cuda_graphs=False)
    s.load_default()
    s.reconfigure({"batch_wait_timeout_s": 0.0, **config})
    return s


def _job(loaded, payload: dict, limits: Limits = Limits(), received: float = 0.0):
    model, info = loaded
    return make_job(parse_request(payload), model, info, received, limits)


# ---------------------------------------------------------------------- no Ray
def test_the_plain_modules_run_without_ray():
    code = ("import sys, serving.service, serving.jobs, serving.loading, serving.memory, "
            "serving.merging, serving.diagnostics; "
            "sys.exit('ray' in sys.modules or 'ray.serve' in sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# ---------------------------------------------------------------------- jobs
def test_a_payload_is_refused_naming_its_field():
    with pytest.raises(ServiceError) as err:
        parse_request({"steps": 0})
    assert (err.value.status, err.value.field) == (422, "steps")


def test_a_job_carries_what_its_answer_needs(loaded):
    job = _job(loaded, {"num_images": 2, "seed": 5, "steps": 3, "resolution": 32},
               received=10.0)
    assert (job.seeds, job.labels, job.m, job.resolution) == ([5, 6], None, 2, 32)
    assert job.deadline == 10.0 + Limits().request_deadline_s
    assert job.model_version == "local" and job.uri == loaded[1]["uri"]
    same = _job(loaded, {"num_images": 1, "seed": 9, "steps": 3, "resolution": 32})
    other = _job(loaded, {"num_images": 1, "seed": 9, "steps": 4, "resolution": 32})
    assert job.key == same.key != other.key  # one generate call for equal settings


@pytest.mark.parametrize("payload, limits, status, field", [
    ({"resolution": 24}, Limits(), 422, "resolution"),
    ({"class_labels": 7}, Limits(), 422, "class_labels"),
    ({"num_images": 4}, Limits(memory_cap_bytes=1), 413, "num_images"),
    ({"num_images": 4, "steps": 10}, Limits(max_image_steps=39), 413, "steps"),
])
def test_a_job_the_model_or_the_caps_refuse(loaded, payload, limits, status, field):
    with pytest.raises(ServiceError) as err:
        _job(loaded, payload, limits)
    assert (err.value.status, err.value.field) == (status, field)
    assert err.value.as_dict()["error"]["status"] == status


def test_a_job_is_cut_into_parts_of_whole_images(loaded):
    job = _job(loaded, {"num_images": 5, "seed": 0, "steps": 4,
                        "class_labels": [0, 1, 2, 3, 0]})
    assert split_job(job, 20) == [job]  # 5 images x 4 steps fit one turn
    parts = split_job(job, 8)  # 2 images a part
    assert [p.seeds for p in parts] == [[0, 1], [2, 3], [4]]
    assert [p.labels for p in parts] == [[0, 1], [2, 3], [0]]
    assert all(p.deadline == job.deadline and p.key == job.key for p in parts)
    assert [len(p.seeds) for p in split_job(job, 1)] == [1] * 5  # an image at least


def test_the_answers_of_the_parts_are_joined_in_order(loaded):
    job = _job(loaded, {"num_images": 3, "seed": 0, "steps": 2, "class_labels": [1, 2, 3]})
    parts = split_job(job, 2)
    answers = [{"images": np.full((len(p.seeds), 2, 2, 3), i, np.uint8), "seeds": p.seeds,
                "labels": p.labels, "model": "m", "timings": {"queue_s": 0.5 + i,
                                                              "generate_s": 1.0}}
               for i, p in enumerate(parts)]
    out = join_answers(parts, answers, now=job.received + 9.0)
    assert out["seeds"] == [0, 1, 2] and out["labels"] == [1, 2, 3] and out["parts"] == 3
    assert out["images"][:, 0, 0, 0].tolist() == [0, 1, 2] and out["model"] == "m"
    assert out["timings"] == {"queue_s": 0.5, "generate_s": 3.0, "total_s": 9.0}
    assert join_answers(parts[:1], answers[:1], 0.0) is answers[0]


def test_limits_change_all_together_or_not_at_all():
    limits = Limits().updated({"max_turn_image_steps": 8, "request_deadline_s": 2})
    assert (limits.max_turn_image_steps, limits.request_deadline_s) == (8, 2.0)
    with pytest.raises(ValueError, match="request_deadline_s"):
        limits.updated({"memory_cap_bytes": 1, "request_deadline_s": 0})
    assert limits.memory_cap_bytes == Limits().memory_cap_bytes
    assert late_answer(3.0)["error"]["status"] == 504


# ---------------------------------------------------------------------- memory
def test_a_group_is_split_so_each_call_fits_the_cap(loaded):
    model = loaded[0]

    def need(n: int) -> int:
        return memory_estimate_bytes(model, n_images=n, resolution=16)

    groups = split_under_cap(model, [1, 1, 1, 1, 2], resolution=16, cfg_scale=1.0,
                             upscale="ug", cap_bytes=need(3))
    assert groups == [[0, 1, 2], [3, 4]]
    assert split_under_cap(model, [5, 1], resolution=16, cfg_scale=1.0, upscale="ug",
                           cap_bytes=need(2)) == [[0], [1]]  # over the cap alone: its own


# ---------------------------------------------------------------------- model cache
def test_the_cache_keeps_the_default_and_the_recent_others(loaded):
    calls = []

    def load(uri: str, device: str, graphs: bool):
        calls.append(uri)
        name = uri.removeprefix("models:/")
        return loaded[0], {"uri": uri, "name": name, "version": "1",
                           "aliases": [uri, name, "prism@champion"] if name == "prism" else []}

    cache = ModelCache("prism", "cpu", max_models=2, load=load)
    assert not cache.ready and cache.describe()[0]["loaded"] is False
    cache.load(cache.default_uri)
    get = lambda ref: asyncio.run(cache.get(ref))  # noqa: E731
    assert get(None) is get("prism@champion") is cache.models["models:/prism"]
    get("a/1"), get("b/1")  # "b" makes room by evicting "a", never the default
    assert list(cache.models) == ["models:/prism", "models:/b/1"]
    get("b/1")
    assert calls == ["models:/prism", "models:/a/1", "models:/b/1"]
    with pytest.raises(ModelNotFound):  # a request never names a directory
        get("/tmp")
    cache.loading.add("models:/c/1")
    with pytest.raises(ModelLoading):
        get("models:/c/1")
    closed = ModelCache("prism", "cpu", allow_other=False, load=load)
    with pytest.raises(ModelNotFound, match="not served here"):
        asyncio.run(closed.get("a/1"))


# ---------------------------------------------------------------------- the service
def test_requests_in_one_call_share_a_generate_call_and_fail_alone(model_dir, loaded):
    s = _service(model_dir, allow_other_models=False)  # no registry to ask
    payloads = [{"num_images": 2, "seed": 0, "steps": 3, "class_labels": [1, 2]},
                {"num_images": 1, "seed": 7, "steps": 3, "class_labels": 3},
                {"num_images": 1, "steps": 3, "resolution": 24},
                {"num_images": 1, "steps": 3, "model": "other@champion"}]
    a, b, bad, missing = asyncio.run(s.generate_many(payloads))
    assert bad["error"]["status"] == 422 and bad["error"]["field"] == "resolution"
    assert missing["error"]["status"] == 404 and missing["error"]["field"] == "model"
    assert a["batch_requests"] == b["batch_requests"] == 2 and a["batch_images"] == 3
    assert s.stats() == {"3": 1} and s.handle_calls() == {"4": 1}
    assert a["images"].shape == (2, 16, 16, 3) and a["images"].dtype == np.uint8
    assert (b["seeds"], b["labels"], b["model_version"]) == ([7], [3], "local")
    # the images of each seed, whatever the batch (at most one 8-bit level apart on the CPU)
    alone = to_uint8(generate_with(loaded[0], GenerateOptions(steps=3), [7], [3], "cpu"))
    assert np.abs(b["images"].astype(int) - alone.numpy().astype(int)).max() <= 1
    assert s.timeline()[-1]["jobs"] == 2.0


def test_a_turn_runs_a_compatible_group_in_calls_under_the_memory_cap(model_dir, loaded):
    cap = memory_estimate_bytes(loaded[0], n_images=2, resolution=16)
    s = _service(model_dir, memory_cap_bytes=cap)
    out = asyncio.run(s.generate_many([{"num_images": 1, "seed": i, "steps": 2}
                                       for i in range(3)]))
    assert [o["batch_images"] for o in out] == [2, 2, 1] and s.stats() == {"1": 1, "2": 1}


def test_a_large_request_runs_in_parts_and_answers_as_one(model_dir):
    s = _service(model_dir, max_turn_image_steps=4)  # 2 images of 2 steps a part
    out = asyncio.run(s.generate_many([{"num_images": 5, "seed": 0, "steps": 2}]))[0]
    assert out["parts"] == 3 and out["seeds"] == [0, 1, 2, 3, 4]
    assert out["images"].shape == (5, 16, 16, 3) and s.stats() == {"1": 1, "2": 2}


def test_health_models_and_the_timing_diagnostic(model_dir):
    s = _service(model_dir)
    assert s.health() == {"ready": True, "model": str(model_dir.resolve()), "device": "cpu"}
    assert s.cache.describe()[0]["loaded"] is True
    t = asyncio.run(s.time_generate(batch=1, steps=1, repeats=1))
    assert t["worker_thread_s"] > 0 and t["event_loop_thread_s"] > 0
    with pytest.raises(ValueError, match="max_jobs"):  # a bad setting changes nothing
        s.reconfigure({"max_batch_size": 0, "memory_cap_bytes": 1})
    assert s.limits == Limits() and s.merger.max_jobs == 32
    assert use_bf16("auto", "cuda:0") and not use_bf16("auto", "cpu")
    assert use_bf16("bf16", "cpu") and not use_bf16("fp32", "cuda")
