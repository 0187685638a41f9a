"""Every 4xx answer of the HTTP API has one shape, ``{"detail", "fields"}``, and the OpenAPI
schema lists every closed set of values as an enum. The ASGI app alone (no Serve)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

from components.samplers import SAMPLERS
from serving.app import MAX_BODY_BYTES, api, error_fields
from serving.schemas import SAMPLER_NAMES

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client():
    return TestClient(api, raise_server_exceptions=False)


@pytest.mark.parametrize(("content", "status", "fields"), [
    (b"{not json", 422, []),
    (b'{"num_images": "\xe9"}', 400, []),
    (b'{"pad": "' + b"x" * MAX_BODY_BYTES + b'"}', 413, []),
])
def test_every_4xx_has_detail_and_fields(client, content, status, fields):
    r = client.post("/v1/generate", content=content, headers=JSON)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "fields"}
    assert body["fields"] == fields


def test_unknown_route_has_the_same_shape(client):
    r = client.get("/v1/nowhere")
    assert r.status_code == 404 and set(r.json()) == {"detail", "fields"}


@pytest.mark.parametrize(("body", "fields"), [
    ({"steps": -1}, ["steps"]),
    ({"sampler": "euler"}, ["sampler"]),
    ({"seeds": [1, -2]}, ["seeds"]),
    ({"bogus": 1}, ["bogus"]),
    ({"time_aware": {"second_class": 1, "switch_t": 7}}, ["time_aware"]),
    ({"steps": 0, "eta": 3}, ["eta", "steps"]),
])
def test_validation_errors_name_the_top_level_fields(body, fields):
    # the routes live on the Serve ingress (tests/serving/test_serve_app.py posts to a real one);
    # here the request model's own errors go through the app's handler
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    from serving.app import _validation_error
    from serving.schemas import GenerateRequest

    with pytest.raises(ValidationError) as err:
        GenerateRequest.model_validate(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in err.value.errors()]
    r = asyncio.run(_validation_error(None, RequestValidationError(errors)))
    payload = json.loads(r.body)
    assert r.status_code == 422 and set(payload) == {"detail", "fields"}
    assert payload["fields"] == fields


def test_custom_checks_name_their_field():
    # the Sampler's own 422s (resolution, class_labels) go through HTTPException's handler
    detail = [{"loc": ["body", "resolution"], "msg": "not a multiple", "type": "value_error"}]
    assert error_fields(HTTPException(422, detail=detail).detail) == ["resolution"]
    assert error_fields("model not ready") == []


def test_closed_sets_are_enums_in_the_schema(client):
    schema = client.get("/openapi.json").json()
    req = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    # sampler may be left unset (null: the model's own), else one of the samplers
    (named,) = [a for a in req["sampler"]["anyOf"] if "enum" in a]
    assert {"type": "null"} in req["sampler"]["anyOf"] and req["sampler"].get("default") is None
    assert sorted(named["enum"]) == sorted(SAMPLERS) == sorted(SAMPLER_NAMES)
    for name in ("schedule", "upscale", "ug_order", "format"):
        assert "enum" in req[name], name
    responses = schema["paths"]["/v1/generate"]["post"]["responses"]
    for status in ("400", "404", "413", "422", "503"):
        assert "ErrorBody" in str(responses[status]), status


def test_a_request_carries_every_generate_option():
    """The schema is validated into ``GenerateOptions``: every option the sampler takes is a
    request field, and each arrives with the value the client sent (none fall back to a
    default on the way)."""
    import dataclasses

    from components.options import GenerateOptions
    from serving.schemas import GenerateRequest

    names = {f.name for f in dataclasses.fields(GenerateOptions)}
    assert names <= set(GenerateRequest.model_fields)
    sent = dict(steps=7, sampler="ddpm", eta=0.5, cfg_scale=2.0, resolution=64,
                upscale="cascade", ug_theta=2.5, ug_eta=0.25, ug_order="cfg_of_ug",
                schedule="spectral", time_aware={"second_class": 1, "switch_t": 0.3},
                clip_denoised=False)
    assert set(sent) == names
    defaults = GenerateOptions(steps=1)
    opts = GenerateRequest(class_labels=0, **sent).options()
    for name in names:
        want = (1, 0.3) if name == "time_aware" else sent[name]
        assert getattr(opts, name) == want != getattr(defaults, name), name
