"""The HTTP ingress: FastAPI routes that validate, delegate to the ``Sampler`` deployment and
format the response. Build the application with :func:`build_app` (the Serve config's
``import_path: serving.app:build_app``).
"""

import asyncio
import json
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.direct import DirectServer
from serving.encode import grid_png, png_base64, png_bytes
from serving.model import Sampler
from serving.schemas import ErrorBody, GenerateRequest, GenerateResponse, ModelsResponse

api = FastAPI(
    title="prism sampler",
    version="0.1.0",
    description="Pixel diffusion sampling: seeds in, images out. Every image depends only "
    "on its seed. Resolutions above the native one use upsample guidance or cascaded "
    "upscaling.",
)
# 400: a body that is not UTF-8 JSON text (FastAPI's "error parsing the body")
_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody} for s in (400, 404, 413, 422, 503, 504)
}
# The largest valid request (64 seeds and labels, every option) is about 4 KB.
MAX_BODY_BYTES = 1 << 20


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 without being read
    further: at once from its Content-Length, or as soon as a chunked body passes the limit
    (the app then sees the client disconnect, and whatever it would send is dropped).
    Without it, FastAPI would read and parse a body of any size (400 MB of JSON, say)
    before answering 422."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(send)
        seen, state = 0, {"started": False, "rejected": False}

        async def limited() -> dict:
            nonlocal seen
            if state["rejected"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes and not state["started"]:
                    state["rejected"] = True
                    await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: dict) -> None:
            if state["rejected"]:
                return
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited, guarded)
        except Exception:
            if not state["rejected"]:
                raise

    async def _reject(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body over {self.max_bytes} bytes",
                           "fields": []}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


api.add_middleware(BodyLimit)


def error_fields(detail: Any) -> list[str]:
    """The request fields named by a list of pydantic-style errors: the first name in each
    error's ``loc`` after its place (``body``, ``query``); none for a body that is not JSON."""
    if not isinstance(detail, list):
        return []
    out = set()
    for err in detail:
        loc = err.get("loc", ()) if isinstance(err, dict) else ()
        names = [p for p in loc[1:] if isinstance(p, str)]
        if names and err.get("type") != "json_invalid":
            out.add(names[0])
    return sorted(out)


def error_response(status: int, detail: Any, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    """Every 4xx in one shape (:class:`serving.schemas.ErrorBody`)."""
    return JSONResponse(status_code=status, headers=headers, content=json.loads(json.dumps(
        {"detail": detail, "fields": error_fields(detail)}, default=str)))


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Any, exc: RequestValidationError) -> JSONResponse:
    """422: ``detail`` lists pydantic's errors (``loc``, ``msg``, ``type``)."""
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    return error_response(422, errors)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Any, exc: StarletteHTTPException) -> JSONResponse:
    """Every other 4xx and 5xx the routes or FastAPI raise, in the same shape."""
    return error_response(exc.status_code, exc.detail, getattr(exc, "headers", None))


def _raise(result: dict[str, Any]) -> None:
    err = result.get("error")
    if err is None:
        return
    if err["status"] == 422:
        loc = ["body", err["field"]] if err["field"] else ["body"]
        raise HTTPException(422, detail=[{"loc": loc, "msg": err["detail"], "type": "value_error"}])
    raise HTTPException(err["status"], detail=err["detail"])


# A request of at least this many image-steps (or several upscaled images) may run in several
# device turns (the Sampler's max_turn_image_steps): it goes to the Sampler alone, because a
# grouped handle call answers all of its requests together, and the small requests grouped
# with it would wait for its last part.
SOLO_IMAGE_STEPS = 1000
HEALTH_WAIT_S = 3.0  # /healthz waits this long for a ready Sampler replica


def _may_run_in_parts(req: GenerateRequest) -> bool:
    n = len(req.image_seeds())
    return n > 1 and (n * req.steps >= SOLO_IMAGE_STEPS or req.resolution is not None)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    """Routes only: all work happens in the ``Sampler`` deployment.

    ``direct_http`` (``{"host", "port"}``): this replica also answers HTTP on that address
    itself, sharing it with the other replicas (``serving/direct.py``)."""

    def __init__(self, sampler: DeploymentHandle,
                 direct_http: dict[str, Any] | None = None) -> None:
        self.sampler = sampler
        self._direct = None
        if direct_http:
            self._direct = DirectServer(api, direct_http["host"], int(direct_http["port"]),
                                        ready=self._initialised)
            self._direct.start()  # binds now; accepts once Serve has initialised the replica

    def _initialised(self) -> bool:
        # the routes' ``self`` is the replica context's servable object, set after __init__
        return serve.get_replica_context().servable_object is self

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose own HTTP server stopped is
        unhealthy (Serve replaces it)."""
        task = self._direct.task if self._direct is not None else None
        if task is not None and task.done():
            raise RuntimeError("direct ingress: this replica's HTTP server stopped")

    def __del__(self) -> None:
        if getattr(self, "_direct", None) is not None:
            self._direct.stop()

    @api.get("/healthz", responses={503: {"model": ErrorBody}})
    async def healthz(self) -> dict[str, Any]:
        """200 once a Sampler replica holds the default model, 503 before (no replica has
        finished loading it within a few seconds)."""
        try:
            state = await asyncio.wait_for(self.sampler.health.remote(), HEALTH_WAIT_S)
        except asyncio.TimeoutError:
            raise HTTPException(503, detail="no Sampler replica is ready yet: the model is still "
                                "loading (or failing to load: see the Serve logs)") from None
        if not state["ready"]:
            raise HTTPException(503, detail=f"model {state['model']} not ready")
        return {"status": "ok", **state}

    @api.get("/v1/models", response_model=ModelsResponse)
    async def models(self) -> ModelsResponse:
        return ModelsResponse(models=await self.sampler.list_models.remote())

    @api.get("/v1/stats")
    async def stats(self, after: int = Query(0, ge=0, description="Device calls numbered "
                                             "above this one in ``device_calls``")
                    ) -> dict[str, Any]:
        """How many device calls ran with each number of images (batching at work), how many
        requests each call from the ingress to the sampler carried, and the timeline of the
        last device calls (seconds: device free -> first job -> last job -> start -> end)."""
        return {"images_per_batch": await self.sampler.stats.remote(),
                "requests_per_handle_call": await self.sampler.handle_calls.remote(),
                "device_calls": await self.sampler.timeline.remote(after)}

    @api.post(
        "/v1/generate", response_model=GenerateResponse, responses={
            **_ERRORS, 200: {"content": {"image/png": {}}, "description":
                             "JSON (format=json) or a PNG (format=png or grid)"}})
    async def generate(self, req: GenerateRequest) -> Any:
        payload = req.model_dump(mode="json")
        if _may_run_in_parts(req):  # its own handle call: see _may_run_in_parts
            result = await self.sampler.generate.remote(payload)
        else:
            result = await self._generate_many(payload)
        _raise(result)
        images = result["images"]  # (N, H, W, C) uint8
        headers = {"X-Seeds": ",".join(map(str, result["seeds"])),
                   "X-Model-Version": f"{result['model']}/{result['model_version']}",
                   "X-Batch-Images": str(result["batch_images"]),
                   "X-Generate-Seconds": f"{result['timings']['generate_s']:.4f}"}
        if req.format == "png":
            return Response(png_bytes(images[0]), media_type="image/png", headers=headers)
        if req.format == "grid":
            return Response(grid_png(images), media_type="image/png", headers=headers)
        labels = result["labels"] or [None] * len(result["seeds"])
        body = {  # GenerateResponse's fields, serialised directly (no second validation)
            "model": result["model"], "model_version": result["model_version"],
            "resolution": result["resolution"],
            "images": [{"seed": s, "class_label": c, "png_base64": png_base64(im)}
                       for s, c, im in zip(result["seeds"], labels, images, strict=True)],
            "seeds": result["seeds"], "timings": result["timings"],
            "batch_requests": result["batch_requests"], "batch_images": result["batch_images"]}
        return Response(json.dumps(body), media_type="application/json", headers=headers)

    # Requests that reach this replica together go to the Sampler in one handle call: its
    # per-call cost (routing, the replica's bookkeeping, one message each way) is paid once
    # for the group, not once per request. The Sampler still validates, queues and answers
    # each request on its own.
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, max_concurrent_batches=64)
    async def _generate_many(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await self.sampler.generate_many.remote(payloads)


class DirectHTTP(BaseModel):
    """Where the Ingress replicas answer HTTP themselves (direct ingress)."""

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args`` of the Serve config)."""

    model_config = ConfigDict(extra="forbid")
    model_uri: str = Field(description="models:/NAME@ALIAS, models:/NAME/VERSION or a directory")
    device: str = "auto"
    load_delay_s: float = Field(0.0, ge=0.0, description="Wait before loading (tests, rollouts)")
    max_models: int = Field(2, ge=1)
    allow_other_models: bool = True
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast of the network on CUDA, fp32 on CPU")
    cuda_graphs: bool = Field(True, description="On CUDA, replay the network's forward "
                              "passes as CUDA graphs (components/cuda_graphs.py)")
    direct_http: DirectHTTP | None = Field(
        None, description="Direct ingress: the Ingress replicas answer HTTP on this host:port "
        "themselves (SO_REUSEPORT; run with proxy_location: Disabled)")


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application: ``Ingress -> Sampler``."""
    a = AppArgs.model_validate(args)
    sampler = Sampler.bind(a.model_uri, a.device, a.load_delay_s, a.max_models,
                           a.allow_other_models, a.precision, a.cuda_graphs)
    return Ingress.bind(sampler, a.direct_http and a.direct_http.model_dump())
