"""The served sampler over real HTTP: a real Ray Serve application on CPU with the debug UNet.

Serve starts once for the module (``serving.launch``, the same code path as ``prism serve``).
"""

from __future__ import annotations

import base64
import io
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from components.artifact import save_model
from components.model import GenerativeModel
from components.networks.registry import preset_kwargs
from components.schedules import CosineSchedule

pytestmark = pytest.mark.ray
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def debug_model_dir(path, num_classes: int = 4, seed: int = 0):
    """A unet-debug model directory (random weights; the zero head re-drawn so that the
    x0-predictions, hence the images, are not constant)."""
    from components.networks.registry import build_network

    torch.manual_seed(seed)
    kwargs = dict(preset_kwargs("unet-debug")[1], num_classes=num_classes)
    net = build_network("unet-debug", num_classes=num_classes)
    for p in net.parameters():
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    model = GenerativeModel(net=net, prediction="x0", n_cond=1, resolution=16, in_channels=3,
                            num_classes=num_classes, schedule=CosineSchedule(), family="unet",
                            net_kwargs=kwargs, schedule_name="cosine")
    return save_model(path, model)


def test_config(model_uri: str, port: int, tracking_uri: str, **args) -> dict:
    """The shipped config, made small for a 2-core box (one replica, half a CPU)."""
    from serving.launch import apply_overrides, load_config

    cfg = load_config(model=model_uri, port=port, user_config={
        "max_batch_size": 32, "batch_wait_timeout_s": 0.25, "max_image_steps": 4096,
        "max_turn_image_steps": 512, "memory_cap_bytes": 256 * 2**20})
    cfg = apply_overrides(cfg, args=args)
    for dep in cfg["applications"][0]["deployments"]:
        if dep["name"] == "Sampler":
            dep.pop("autoscaling_config", None)
            dep["num_replicas"] = 1
            dep["ray_actor_options"] = {"num_cpus": 0.5, "runtime_env": {"env_vars": {
                "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1"}}}
    return cfg


test_config.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    from ray import serve

    from serving.launch import start, stop, wait_ready

    tmp = tmp_path_factory.mktemp("serve")
    model_dir = debug_model_dir(tmp / "model")
    tracking = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = test_config(str(model_dir), _free_port(), tracking)
    url = start(cfg)
    wait_ready(url, timeout_s=120)
    yield {"url": url, "cfg": cfg, "model_dir": model_dir, "serve": serve, "tmp": tmp,
           "tracking": tracking}
    stop()


def post(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/v1/generate", json=body, timeout=120)


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


# --------------------------------------------------------------------------- behaviour


def test_health_models_docs(service):
    url = service["url"]
    assert requests.get(f"{url}/healthz", timeout=10).json()["ready"] is True
    models = requests.get(f"{url}/v1/models", timeout=10).json()["models"]
    assert models[0]["resolution"] == 16 and models[0]["loaded"] and models[0]["version"]
    assert "swagger" in requests.get(f"{url}/docs", timeout=10).text.lower()
    assert "/v1/generate" in requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]


def test_single_request_json_png_grid(service):
    url = service["url"]
    r = post(url, num_images=2, seed=7, steps=STEPS, class_labels=1)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seeds"] == [7, 8] and body["resolution"] == 16 and body["batch_images"] >= 2
    imgs = [decode(im["png_base64"]) for im in body["images"]]
    assert imgs[0].shape == (16, 16, 3) and not np.array_equal(imgs[0], imgs[1])
    assert set(body["timings"]) == {"queue_s", "generate_s", "total_s"}
    png = post(url, num_images=1, seed=7, steps=STEPS, class_labels=1, format="png")
    assert png.headers["content-type"] == "image/png" and png.headers["X-Seeds"] == "7"
    alone = np.asarray(Image.open(io.BytesIO(png.content))).astype(int)
    assert np.abs(alone - imgs[0]).max() <= 1  # batch of 2 vs 1: float numerics ~1e-5
    grid = post(url, num_images=4, seed=0, steps=STEPS, format="grid")
    assert Image.open(io.BytesIO(grid.content)).size == (2 * 18 + 2, 2 * 18 + 2)


def test_concurrent_requests_are_batched_and_seeds_reproducible(service):
    url = service["url"]
    alone = post(url, seeds=[1234], steps=STEPS, sampler="ddim", eta=0.5)
    assert alone.status_code == 200 and alone.json()["batch_images"] == 1
    seeds = [1234] + list(range(100, 131))  # 32 requests, one of them the seed above
    with ThreadPoolExecutor(32) as pool:
        res = list(pool.map(lambda s: post(url, seeds=[s], steps=STEPS, sampler="ddim",
                                           eta=0.5), seeds))
    assert all(r.status_code == 200 for r in res), [r.text for r in res if r.status_code != 200]
    sizes = [r.json()["batch_images"] for r in res]
    assert max(sizes) > 1, sizes
    in_batch = res[0].json()
    a = decode(alone.json()["images"][0]["png_base64"]).astype(int)
    b = decode(in_batch["images"][0]["png_base64"]).astype(int)
    assert np.abs(a - b).max() <= 1  # float batch numerics (~1e-5) may flip one 8-bit level
    assert (a == b).mean() > 0.99
    stats = requests.get(f"{url}/v1/stats", timeout=10).json()["images_per_batch"]
    assert any(int(k) > 1 for k in stats)


def test_clip_denoised_is_a_request_setting(service):
    url = service["url"]
    for value in (True, False):
        r = post(url, num_images=1, seed=3, steps=STEPS, clip_denoised=value)
        assert r.status_code == 200, r.text
    bad = post(url, num_images=1, seed=3, steps=STEPS, clip_denoised="sometimes")
    assert bad.status_code == 422 and "clip_denoised" in bad.text


def test_upsample_guidance_and_cascade_return_2x(service):
    url = service["url"]
    for upscale in ("ug", "cascade"):
        r = post(url, num_images=1, seed=3, steps=STEPS, resolution=32, upscale=upscale,
                 ug_eta=0.5)
        assert r.status_code == 200, r.text
        assert decode(r.json()["images"][0]["png_base64"]).shape == (32, 32, 3)


@pytest.mark.slow  # about 60 s: training + MLflow store creation
def test_registry_path_train_register_serve_by_alias(service, monkeypatch):
    """Train the debug preset with MLflow tracking (real SQLite store), which registers it;
    then the running service loads it by alias from the registry and samples it."""
    import mlflow

    from common.run_config import load_config
    from training.loop import train
    from training.tracking import MLflowLogger

    tmp, uri = service["tmp"], service["tracking"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("prism-serve-test", artifact_location=str(tmp / "artifacts"))
    cfg = load_config(Path("training/configs/debug.yaml"), [
        f"run.output_dir={tmp / 'runs'}", "run.project=prism-serve-test", "sampling.num_images=0",
        f"tracking.uri={uri}", "tracking.register_name=prism-debug", "tracking.alias=champion",
        "tracking.system_metrics=false"])
    logger = MLflowLogger()
    train(cfg, callbacks=[logger])
    assert logger.version == "1"
    r = post(service["url"], model="prism-debug@champion", seeds=[5, 6], steps=STEPS,
             class_labels=[0, 3])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "prism-debug" and body["model_version"] == "1"
    assert decode(body["images"][0]["png_base64"]).shape == (16, 16, 3)
    models = requests.get(f"{service['url']}/v1/models", timeout=10).json()["models"]
    assert any(m["name"] == "prism-debug" and m["version"] == "1" for m in models)
    assert post(service["url"], model="prism-debug@nosuch", steps=STEPS).status_code == 404


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("body,field", [
    ({"steps": -1}, "steps"),
    ({"sampler": "euler"}, "sampler"),
    ({"resolution": 24}, "resolution"),
    ({"num_images": 65}, "num_images"),
    ({"cfg_scale": 50.0}, "cfg_scale"),
    ({"class_labels": [9]}, "class_labels"),
    ({"cfg_scale": 2.0}, "class_labels"),  # CFG without labels: the missing field
    ({"bogus": 1}, "bogus"),
])
def test_invalid_values_get_422_naming_the_field(service, body, field):
    r = post(service["url"], **{"steps": STEPS, **body})
    assert r.status_code == 422, r.text
    assert set(r.json()) == {"detail", "fields"} and r.json()["fields"] == [field]


def test_malformed_json_unknown_model_and_caps(service):
    url = service["url"]
    r = requests.post(f"{url}/v1/generate", data=b"{not json", timeout=10,
                      headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    r = post(url, model="no-such-model@prod", steps=STEPS)
    assert r.status_code == 404 and "no-such-model" in r.text
    r = post(url, num_images=32, seed=0, steps=8, resolution=16 * 16)  # refused before running
    assert r.status_code == 413 and "cap" in r.text
    r = post(url, num_images=64, steps=100)
    assert r.status_code == 413 and "image-steps" in r.text


def _small_latencies(url: str, clients: int, each: int) -> list[float]:
    def one(c: int) -> list[float]:
        out = []
        session = requests.Session()  # kept alive: no connection set-up (SYN retries under load)
        for k in range(each):
            r = session.post(f"{url}/v1/generate", json={"seeds": [1000 * c + k], "steps": 2},
                             timeout=120)
            assert r.status_code == 200, r.text
            out.append(r.elapsed.total_seconds())
        return out

    with ThreadPoolExecutor(clients) as pool:
        return [t for ts in pool.map(one, range(clients)) for t in ts]


def test_small_requests_keep_their_latency_beside_a_maximal_one(service):
    """32 clients of 1-image requests, alone and beside a client that sends maximal requests
    (64 images x 64 steps, the cap) back to back. The maximal ones run in 8 parts of 512
    image-steps that take turns with the small ones, so a small request's p99 grows by about
    one part's time; the bound is three parts (a whole maximal request is eight)."""
    url = service["url"]
    p99 = lambda ts: float(np.percentile(ts, 99))  # noqa: E731
    _small_latencies(url, 8, 2)  # warm: workers, graphs of both shapes
    assert post(url, num_images=64, seed=0, steps=64, format="grid").status_code == 200
    alone = _small_latencies(url, 32, 3)
    stop, large = [], []

    def maximal() -> None:
        session = requests.Session()
        while not stop:
            r = session.post(f"{url}/v1/generate", timeout=120, json={
                "num_images": 64, "seed": 0, "steps": 64, "format": "grid"})  # little to encode
            assert r.status_code == 200, r.text
            large.append(float(r.headers["X-Generate-Seconds"]))

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(maximal)
        beside = _small_latencies(url, 32, 3)
        stop.append(True)
        fut.result()
    assert large, "the maximal client got no answer while the small ones ran"
    part_s = float(np.median(large)) / 8
    assert p99(beside) <= p99(alone) + 3 * part_s, (p99(alone), p99(beside), part_s)


@pytest.mark.slow  # about 30 s: deploys a second application
def test_a_loading_replica_takes_no_traffic_until_its_model_is_there(service, tmp_path):
    """Readiness: a Sampler replica is ready when its constructor has loaded the model; until
    then /healthz answers 503 at once and a request waits for the replica (not an error)."""
    import time

    from ray import serve as ray_serve

    from serving.launch import build_from_config

    # The Sampler waits 30 s before loading. The Ingress is a fresh worker process that imports
    # torch, Ray Serve and FastAPI: on two busy cores that alone took more than 10 s, and the
    # proxy holds a request to a route whose Ingress replica is still starting (not an error),
    # so the first /healthz may wait that long before the Ingress answers 503 after its own
    # HEALTH_WAIT_S.
    cfg = test_config(str(service["model_dir"]), 0, "sqlite:///:memory:", load_delay_s=30)
    ray_serve._run(build_from_config(cfg), name="slow", route_prefix="/slow", _blocking=False)
    try:
        base = service["url"].rstrip("/") + "/slow"
        deadline = time.monotonic() + 60
        while True:  # the Ingress comes up first; the Sampler is still loading
            r = requests.get(f"{base}/healthz", timeout=25)
            if r.status_code == 503:
                assert "loading" in r.text
                break
            assert r.status_code == 404 and time.monotonic() < deadline, r.text
            time.sleep(0.2)
        t0 = time.monotonic()
        r = post(base, seeds=[3], steps=STEPS)  # waits for the replica, then answers
        assert r.status_code == 200, r.text
        assert time.monotonic() - t0 > 1.0  # it did wait for the load
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
    finally:
        ray_serve.delete("slow")


# --------------------------------------------------------------------------- fuzz


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_gives_a_server_error(service, mode):
    """Property (schemathesis + hypothesis over the live OpenAPI schema): whatever the
    schema-shaped (positive) or schema-violating (negative) input, the answer is never 5xx."""
    url = service["url"]
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/generate", "/healthz", "/v1/models"}
    for op in ops:
        if mode == "negative" and op.method.upper() != "POST":
            continue  # parameterless GETs have no invalid inputs
        strategy = op.as_strategy(generation_mode=schemathesis.GenerationMode(mode))
        examples = 40 if op.path == "/v1/generate" else 3

        @given(case=strategy)
        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            r = case.call(base_url=url, timeout=120)
            assert r.status_code < 500, (case.method, case.path, case.body, r.status_code,
                                         r.text[:500])

        check()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids,
                                                              max_size=4), max_leaves=12)
fields = st.sampled_from(["num_images", "seeds", "seed", "steps", "sampler", "eta", "schedule",
                          "cfg_scale", "class_labels", "resolution", "upscale", "ug_theta",
                          "ug_eta", "ug_order", "time_aware", "format", "model"])


def test_arbitrary_json_bodies_never_give_5xx(service):
    """Property: any JSON object over the request's field names (any types) or raw bytes."""
    url = service["url"]

    @given(body=st.dictionaries(fields, json_values, max_size=6) | st.binary(max_size=40))
    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(body):
        kw = {"data": body} if isinstance(body, bytes) else {"json": {"steps": 2, **body}}
        r = requests.post(f"{url}/v1/generate", timeout=120,
                          headers={"content-type": "application/json"}, **kw)
        assert r.status_code < 500, (body, r.status_code, r.text[:500])

    check()


def test_the_replica_times_its_own_generate_call(service):
    """The handle-only diagnostic behind benchmarks/serve_profile.py (not an HTTP route)."""
    from ray import serve

    handle = serve.get_deployment_handle("Sampler", app_name="prism")
    t = handle.time_generate.remote(2, 2, 1).result()
    assert t["worker_thread_s"] > 0 and t["event_loop_thread_s"] > 0 and t["torch_threads"] >= 1
    assert requests.post(f"{service['url']}/v1/time_generate", json={}, timeout=10).status_code \
        in (404, 405)


def test_grouped_handle_calls_answer_each_request_on_its_own(service):
    """The ingress sends the requests that reach it together in one ``generate_many`` call;
    the sampler validates and answers each alone: a bad one fails alone, the others get the
    images they would get one by one."""
    from ray import serve

    url = service["url"]
    handle = serve.get_deployment_handle("Sampler", app_name="prism")
    out = handle.generate_many.remote([
        {"seeds": [5], "steps": STEPS}, {"seeds": [6], "steps": 0},
        {"seeds": [7], "steps": STEPS, "resolution": 24}, {"seeds": [8], "steps": STEPS}]).result()
    assert [("error" in r) for r in out] == [False, True, True, False]
    assert out[1]["error"]["status"] == 422 and out[1]["error"]["field"] == "steps"
    assert out[2]["error"]["status"] == 422 and out[2]["error"]["field"] == "resolution"
    assert out[0]["batch_images"] == 2 and out[0]["images"].shape == (1, 16, 16, 3)
    alone = decode(post(url, seeds=[8], steps=STEPS).json()["images"][0]["png_base64"])
    assert np.abs(alone.astype(int) - out[3]["images"][0].astype(int)).max() <= 1
    # what the stats say about it: calls that carried several requests, and the timeline
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda s: post(url, seeds=[s], steps=STEPS), range(16)))
    stats = requests.get(f"{url}/v1/stats", timeout=10).json()
    assert any(int(k) >= 4 for k in stats["requests_per_handle_call"])
    calls = stats["device_calls"]
    assert calls and {"call", "jobs", "free_to_first_s", "first_to_last_s", "last_to_start_s",
                      "run_s"} <= set(calls[-1])
    newest = int(calls[-1]["call"])
    assert requests.get(f"{url}/v1/stats", params={"after": newest},
                        timeout=10).json()["device_calls"] == []
    assert requests.get(f"{url}/v1/stats", params={"after": -1}, timeout=10).status_code == 422


def test_a_body_over_the_limit_is_refused_before_it_is_read():
    # the ASGI app alone (no Serve): the middleware answers before any route runs
    from fastapi.testclient import TestClient

    from serving.app import MAX_BODY_BYTES, api

    client = TestClient(api)
    big = b'{"num_images": 1, "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
    r = client.post("/v1/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "request body over" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(3):
            yield b"x" * (MAX_BODY_BYTES // 2)

    r = client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_a_body_that_is_not_utf8_is_a_listed_400():
    from fastapi.testclient import TestClient

    from serving.app import api

    client = TestClient(api)
    r = client.post("/v1/generate", content=b'{"num_images": "\xe9"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "detail" in r.json()
    responses = client.get("/openapi.json").json()["paths"]["/v1/generate"]["post"]["responses"]
    assert "400" in responses and "ErrorBody" in json.dumps(responses["400"])
