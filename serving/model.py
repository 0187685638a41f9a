"""The Serve deployment that holds the model(s) and runs ``components.generate.generate``.

The ingress groups the requests that reach it together into one ``generate_many`` call;
every call registers its requests with a ``DeviceMerger`` (``serving/merging.py``), which makes
one device call at a time of everything waiting. Inside it, requests whose settings are
compatible (same model, steps, sampler, resolution, guidance, schedule...) run as one
``generate`` call, split so that each call stays under the memory cap. Images depend only on
their seeds, so batching never changes a result.

Fairness: a request whose work (images x steps x m^2) exceeds ``max_turn_image_steps`` is cut
into parts of whole images, each under it, submitted one after another; every other request
that arrives meanwhile joins the next device turn, so a large request delays a small one by
about one part's time, not by its whole run. A request not answered within
``request_deadline_s`` of its arrival gets 504, and its parts still to run are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from ray import serve

from components.generate import generate_with, to_uint8
from components.model import GenerativeModel
from components.options import GenerateOptions, OptionError, check_options
from serving.diagnostics import time_generate
from serving.loading import ModelNotFound, default_device, load_served_model, normalize_uri
from serving.memory import memory_estimate_bytes
from serving.merging import DeviceMerger
from serving.schemas import GenerateRequest

log = logging.getLogger("ray.serve")


class ServiceError(Exception):
    """An error with an HTTP status, returned to the ingress as a dict."""

    def __init__(self, status: int, detail: str, field_name: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.field = status, detail, field_name

    def as_dict(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "detail": self.detail, "field": self.field}}


@dataclass
class Loaded:
    model: GenerativeModel
    info: dict[str, Any]


@dataclass
class Job:
    """One validated request waiting in the batch queue."""

    key: tuple
    uri: str
    opts: GenerateOptions
    seeds: list[int]
    labels: list[int] | None
    received: float
    extra: dict[str, Any] = field(default_factory=dict)
    deadline: float = float("inf")  # perf_counter time after which it is answered 504


@serve.deployment(name="Sampler", max_ongoing_requests=64)
class Sampler:
    """Holds the default model and a small cache of others.

    Readiness: the constructor loads the default model, and Ray Serve routes requests only to
    replicas whose constructor has returned, so a new replica (autoscaling, a rolling upgrade
    of a RayService) takes traffic only once it can answer. A model that fails to load fails
    the constructor: Serve retries the replica and reports the error (``serve.run`` raises
    it, ``prism serve`` prints it)."""

    def __init__(self, model_uri: str, device: str = "auto", load_delay_s: float = 0.0,
                 max_models: int = 2, allow_other_models: bool = True,
                 precision: str = "auto", cuda_graphs: bool = True) -> None:
        self.default_uri = normalize_uri(model_uri)
        self.device = default_device() if device == "auto" else device
        # bf16 autocast of the network on CUDA ("auto"), or fp32 everywhere
        self.bf16 = precision == "bf16" or (precision == "auto"
                                            and str(self.device).startswith("cuda"))
        self.max_models, self.allow_other = max_models, allow_other_models
        self.cuda_graphs = cuda_graphs  # on CUDA only (load_served_model)
        self.models: OrderedDict[str, Loaded] = OrderedDict()
        self.loading: set[str] = set()
        self.memory_cap_bytes = 8 * 2**30
        self.max_image_steps = 64 * 1000 * 4
        self.max_turn_image_steps = 16 * 1000  # a request's work per device turn (fairness)
        self.request_deadline_s = 600.0
        self.batches: Counter[int] = Counter()  # images per generate call -> count
        self.grouped: Counter[int] = Counter()  # requests per generate_many call -> count
        self._merger: DeviceMerger[Job, dict[str, Any]] = DeviceMerger(self._execute, 32, 0.2)
        self._lock = threading.Lock()
        time.sleep(load_delay_s)  # a slow load, for tests of readiness and rollouts
        try:
            self._load(self.default_uri)
        except Exception as exc:
            raise RuntimeError(f"model {self.default_uri} failed to load: "
                               f"{type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ configuration
    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config: max_batch_size, batch_wait_timeout_s, memory_cap_bytes,
        max_image_steps, max_turn_image_steps, request_deadline_s."""
        if "max_batch_size" in config or "batch_wait_timeout_s" in config:
            self._merger = DeviceMerger(  # validates: max_batch_size >= 1, wait >= 0
                self._execute, int(config.get("max_batch_size", self._merger.max_jobs)),
                float(config.get("batch_wait_timeout_s", self._merger.wait_s)))
        self.memory_cap_bytes = int(config.get("memory_cap_bytes", self.memory_cap_bytes))
        self.max_image_steps = int(config.get("max_image_steps", self.max_image_steps))
        turn = int(config.get("max_turn_image_steps", self.max_turn_image_steps))
        deadline = float(config.get("request_deadline_s", self.request_deadline_s))
        if turn < 1 or deadline <= 0:
            raise ValueError(f"max_turn_image_steps must be >= 1 and request_deadline_s > 0, "
                             f"got {turn} and {deadline}")
        self.max_turn_image_steps, self.request_deadline_s = turn, deadline

    # ------------------------------------------------------------------ loading
    def _load(self, uri: str) -> Loaded:
        model, info = load_served_model(uri, self.device, self.cuda_graphs)
        loaded = Loaded(model, info)
        with self._lock:
            self.models[uri] = loaded
            while len(self.models) > self.max_models:
                old = next(k for k in self.models if k != self.default_uri)
                self.models.pop(old)
        return loaded

    async def _get(self, ref: str | None) -> Loaded:
        default = self.models.get(self.default_uri)
        if ref is None or (default is not None and ref in default.info["aliases"]):
            ref = self.default_uri
        uri = normalize_uri(ref)
        if uri in self.models:
            self.models.move_to_end(uri)
            return self.models[uri]
        if uri in self.loading:
            raise ServiceError(503, f"model {uri} is still loading")
        if not self.allow_other or not uri.startswith("models:/"):
            raise ServiceError(404, f"model {ref!r} is not served here", "model")
        self.loading.add(uri)
        try:
            return await asyncio.to_thread(self._load, uri)
        except ModelNotFound as exc:
            raise ServiceError(404, str(exc), "model") from exc
        finally:
            self.loading.discard(uri)

    # ------------------------------------------------------------------ endpoints
    def check_health(self) -> None:
        """Ray Serve's periodic replica check: a replica without its default model (it
        cannot answer) is unhealthy, so Serve replaces it with one that loads it again."""
        if self.default_uri not in self.models:
            raise RuntimeError(f"model {self.default_uri} is not loaded")

    async def health(self) -> dict[str, Any]:
        ready = self.default_uri in self.models
        return {"ready": ready, "model": self.default_uri,
                "device": self.device}

    async def list_models(self) -> list[dict[str, Any]]:
        out = [dict(lm.info, loaded=True) for lm in self.models.values()]
        if self.default_uri not in self.models:
            out.insert(0, {"name": self.default_uri, "uri": self.default_uri, "version": "",
                           "loaded": False})
        return out

    async def time_generate(self, batch: int = 32, steps: int = 16, repeats: int = 3,
                            gc_off: bool = False, threads: int = 0) -> dict[str, float]:
        """Diagnostic (handle only, not routed over HTTP): ``serving.diagnostics.time_generate``
        of one ``batch``-image, ``steps``-step generation of the default model."""
        if self.default_uri not in self.models:
            raise ServiceError(503, f"model {self.default_uri} is not loaded")
        model = self.models[self.default_uri].model
        opts, seeds = GenerateOptions(steps=steps), list(range(batch))
        return await time_generate(lambda: self._generate(model, opts, seeds, None),
                                   repeats=repeats, cuda=str(self.device).startswith("cuda"),
                                   gc_off=gc_off, threads=threads)

    async def stats(self) -> dict[str, int]:
        return {str(k): v for k, v in sorted(self.batches.items())}

    async def timeline(self, after: int = 0) -> list[dict[str, float]]:
        """The device calls' timelines (``DeviceMerger.timeline``)."""
        return self._merger.timeline(after)

    async def handle_calls(self) -> dict[str, int]:
        """How many ``generate_many`` calls carried each number of requests."""
        return {str(k): v for k, v in sorted(self.grouped.items())}

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Validate a request against its model, queue it, return images (uint8 NHWC)."""
        return (await self.generate_many([payload]))[0]

    async def generate_many(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``generate`` for several requests in one handle call (the ingress groups the
        requests that reach it together): one call's overhead instead of one per request.
        Each request is validated and answered on its own; an invalid one fails alone."""
        received = time.perf_counter()
        self.grouped[len(payloads)] += 1
        results: list[dict[str, Any]] = [{} for _ in payloads]
        jobs: list[Job] = []
        where: list[int] = []
        for i, payload in enumerate(payloads):
            try:
                jobs.append(await self._validated(payload, received))
                where.append(i)
            except ServiceError as err:
                results[i] = err.as_dict()
        if jobs:
            parts = [self._parts(job) for job in jobs]
            # every request's first part in one registration; the rest, request by request
            firsts = await self._merger.submit([p[0] for p in parts])
            answers = await asyncio.gather(*(self._finish(p, first)
                                             for p, first in zip(parts, firsts, strict=True)))
            for i, res in zip(where, answers, strict=True):
                results[i] = res
        return results

    def _parts(self, job: Job) -> list[Job]:
        """``job`` cut into parts of whole images, each at most ``max_turn_image_steps`` of
        work (a part has one image at least)."""
        per_image = job.opts.steps * job.extra["m"] ** 2
        k = max(1, self.max_turn_image_steps // per_image)
        if len(job.seeds) <= k:
            return [job]
        return [Job(job.key, job.uri, job.opts, job.seeds[a:a + k],
                    None if job.labels is None else job.labels[a:a + k], job.received,
                    job.extra, job.deadline) for a in range(0, len(job.seeds), k)]

    async def _finish(self, parts: list[Job], first: dict[str, Any]) -> dict[str, Any]:
        """Run a request's remaining parts one by one (others' requests join each turn) and
        join their answers; the first error (or the deadline) answers the whole request."""
        answers = [first]
        for part in parts[1:]:
            if "error" in answers[-1]:
                return answers[-1]
            if time.perf_counter() > part.deadline:
                return self._late(part)
            answers += await self._merger.submit([part])
        if len(answers) == 1 or "error" in answers[-1]:
            return answers[-1]
        job = parts[0]
        out = dict(answers[0], images=np.concatenate([a["images"] for a in answers]),
                   seeds=job.seeds + [s for p in parts[1:] for s in p.seeds],
                   labels=None if job.labels is None else
                   [c for p in parts for c in p.labels], parts=len(parts))
        end = time.perf_counter()
        out["timings"] = {"queue_s": answers[0]["timings"]["queue_s"],
                          "generate_s": sum(a["timings"]["generate_s"] for a in answers),
                          "total_s": end - job.received}
        return out

    def _late(self, job: Job) -> dict[str, Any]:
        return ServiceError(504, f"request not answered within its deadline of "
                                 f"{self.request_deadline_s:g} s: ask for fewer images or steps, "
                                 "or try again when the service is less busy").as_dict()

    async def _validated(self, payload: dict[str, Any], received: float) -> Job:
        try:
            req = GenerateRequest.model_validate(payload)
        except ValidationError as exc:  # the ingress validates first; a direct handle caller
            err = exc.errors()[0]
            field_name = str(err["loc"][-1]) if err.get("loc") else None
            raise ServiceError(422, f"{field_name}: {err['msg']}", field_name) from exc
        loaded = await self._get(req.model)
        return self._job(req, loaded, received)

    def _job(self, req: GenerateRequest, loaded: Loaded, received: float) -> Job:
        opts, seeds, labels = req.options(), req.image_seeds(), req.image_labels()
        try:
            m = check_options(loaded.model, opts, seeds, labels)
        except OptionError as exc:
            raise ServiceError(422, str(exc), exc.field) from exc
        res = loaded.model.resolution * m
        need = memory_estimate_bytes(loaded.model, n_images=len(seeds), resolution=res,
                                     cfg_scale=opts.cfg_scale, upscale=opts.upscale)
        if need > self.memory_cap_bytes:
            raise ServiceError(413, f"request needs about {need / 2**30:.2f} GiB, over the "
                               f"memory cap of {self.memory_cap_bytes / 2**30:.2f} GiB: ask for "
                               "fewer images or a lower resolution", "num_images")
        work = len(seeds) * opts.steps * m * m
        if work > self.max_image_steps:
            raise ServiceError(413, f"request asks for {work} image-steps (images x steps x m^2), "
                               f"over the cap of {self.max_image_steps}", "steps")
        uri = loaded.info["uri"]
        key = (uri, opts, labels is None)
        return Job(key, uri, opts, seeds, labels, received,
                   {"model": loaded.info["name"], "version": loaded.info["version"],
                    "resolution": res, "m": m}, received + self.request_deadline_s)

    # ------------------------------------------------------------------ batching
    # The merger makes the device calls: everything waiting when the device comes free, up to
    # max_batch_size, after at most batch_wait_timeout_s for the clients of the call that just
    # ended (see merging.py).
    async def _execute(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """One device turn: compatible jobs grouped, each group split under the caps."""
        groups: dict[tuple, list[int]] = {}
        results: list[dict[str, Any]] = [{} for _ in jobs]
        now = time.perf_counter()
        for i, job in enumerate(jobs):
            if now > job.deadline:  # waited past its deadline: not run
                results[i] = self._late(job)
            else:
                groups.setdefault(job.key, []).append(i)
        for idx in groups.values():
            for chunk in self._chunks([jobs[i] for i in idx], idx):
                try:
                    await self._run_group(jobs, chunk, results)
                except ValueError as exc:  # a setting (OptionError names it) the checks missed
                    for i in chunk:
                        results[i] = ServiceError(422, str(exc),
                                                  getattr(exc, "field", None)).as_dict()
                except Exception as exc:
                    log.exception("generate failed")
                    for i in chunk:
                        results[i] = ServiceError(500, f"{type(exc).__name__}: {exc}").as_dict()
        return results

    def _chunks(self, group: list[Job], idx: list[int]) -> list[list[int]]:
        """Split a compatible group so that each generate call stays under the caps."""
        model = self.models[group[0].uri].model
        chunks, cur, n = [], [], 0
        for job, i in zip(group, idx, strict=True):
            k = len(job.seeds)
            need = memory_estimate_bytes(model, n_images=n + k, resolution=job.extra["resolution"],
                                         cfg_scale=job.opts.cfg_scale, upscale=job.opts.upscale)
            if cur and need > self.memory_cap_bytes:
                chunks.append(cur)
                cur, n = [], 0
            cur.append(i)
            n += k
        return chunks + [cur]

    def _generate(self, model: GenerativeModel, opts: GenerateOptions, seeds: list[int],
                  labels: list[int] | None) -> torch.Tensor:
        """``generate_with`` in the worker thread (autocast is per thread), bf16 when set."""
        if not self.bf16:
            return generate_with(model, opts, seeds, labels, self.device)
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16):
            return generate_with(model, opts, seeds, labels, self.device)

    def _generate_uint8(self, model: GenerativeModel, opts: GenerateOptions, seeds: list[int],
                        labels: list[int] | None) -> np.ndarray:
        """``_generate`` to uint8 NHWC numpy, all in the worker thread: the copy to the host
        waits for the device, which must not block the event loop (with CUDA graphs the
        launches return long before the device is done)."""
        return to_uint8(self._generate(model, opts, seeds, labels)).numpy()

    async def _run_group(self, jobs: list[Job], chunk: list[int],
                         results: list[dict[str, Any]]) -> None:
        first = jobs[chunk[0]]
        loaded = self.models[first.uri]
        seeds = [s for i in chunk for s in jobs[i].seeds]
        labels = None if first.labels is None else [c for i in chunk for c in jobs[i].labels]
        start = time.perf_counter()
        arr = await asyncio.to_thread(  # (N, H, W, C) uint8
            self._generate_uint8, loaded.model, first.opts, seeds, labels)
        done = time.perf_counter()
        self.batches[len(seeds)] += 1
        pos = 0
        for i in chunk:
            job, k = jobs[i], len(jobs[i].seeds)
            results[i] = {
                "images": arr[pos:pos + k], "seeds": job.seeds, "labels": job.labels,
                "model": job.extra["model"], "model_version": job.extra["version"],
                "resolution": job.extra["resolution"], "batch_requests": len(chunk),
                "batch_images": len(seeds),
                "timings": {"queue_s": start - job.received, "generate_s": done - start,
                            "total_s": done - job.received},
            }
            pos += k
