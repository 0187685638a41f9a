"""A request inside the Sampler replica, from its payload to its answer (plain Python, no Ray).

A payload is validated into a :class:`Job` against its model (:func:`make_job`:
``components.options.check_options``, then the memory and work caps of :class:`Limits`). A job
whose work (images x steps x m^2) is over ``max_turn_image_steps`` is cut into parts of whole
images (:func:`split_job`) that take separate device turns, so other requests run between them;
the parts' answers are joined into one (:func:`join_answers`). Images depend only on their
seeds, so neither batching nor cutting changes a result. A refusal is a :class:`ServiceError`,
which crosses the handle to the ingress as a dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from components.model import GenerativeModel
from components.options import GenerateOptions, OptionError, check_options
from serving.memory import memory_estimate_bytes
from serving.schemas import GenerateRequest

Answer = dict[str, Any]  # images (N, H, W, C) uint8 and their description, or {"error": ...}


class ServiceError(Exception):
    """An error with an HTTP status, returned to the ingress as a dict."""

    def __init__(self, status: int, detail: str, field_name: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.field = status, detail, field_name

    def as_dict(self) -> Answer:
        return {"error": {"status": self.status, "detail": self.detail, "field": self.field}}


@dataclass(frozen=True)
class Limits:
    """What one replica accepts (the deployment's ``user_config``): the memory of one generate
    call, a request's work in image-steps (images x steps x m^2), a request's work per device
    turn (fairness), and the time a request may take from its arrival."""

    memory_cap_bytes: int = 8 * 2**30
    max_image_steps: int = 64 * 1000 * 4
    max_turn_image_steps: int = 16 * 1000
    request_deadline_s: float = 600.0

    def updated(self, config: Mapping[str, Any]) -> Limits:
        """These limits with the ones ``config`` sets; ValueError names a bad one."""
        new = Limits(
            int(config.get("memory_cap_bytes", self.memory_cap_bytes)),
            int(config.get("max_image_steps", self.max_image_steps)),
            int(config.get("max_turn_image_steps", self.max_turn_image_steps)),
            float(config.get("request_deadline_s", self.request_deadline_s)))
        if new.max_turn_image_steps < 1 or new.request_deadline_s <= 0:
            raise ValueError(f"max_turn_image_steps must be >= 1 and request_deadline_s > 0, "
                             f"got {new.max_turn_image_steps} and {new.request_deadline_s}")
        return new


@dataclass(frozen=True)
class Job:
    """One validated request (or a part of one) waiting for the device."""

    key: tuple  # (uri, options, unconditional): jobs with one key run as one generate call
    uri: str
    opts: GenerateOptions
    seeds: list[int]
    labels: list[int] | None
    received: float  # perf_counter time of the request's arrival
    deadline: float  # perf_counter time after which it is answered 504
    model_name: str
    model_version: str
    resolution: int  # output side: native x m
    m: int


def parse_request(payload: Mapping[str, Any]) -> GenerateRequest:
    """A payload as a request; 422 naming the field. The ingress validates first, so this
    refuses only what a direct handle caller sends."""
    try:
        return GenerateRequest.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        field_name = str(err["loc"][-1]) if err.get("loc") else None
        raise ServiceError(422, f"{field_name}: {err['msg']}", field_name) from exc


def make_job(req: GenerateRequest, model: GenerativeModel, info: Mapping[str, Any],
             received: float, limits: Limits) -> Job:
    """``req`` checked against ``model`` (described by ``info``, see
    ``serving.loading.load_served_model``): 422 for a setting the model cannot run, 413 over
    the memory cap or the work cap."""
    opts, seeds, labels = req.options(), req.image_seeds(), req.image_labels()
    try:
        m = check_options(model, opts, seeds, labels)
    except OptionError as exc:
        raise ServiceError(422, str(exc), exc.field) from exc
    res = model.resolution * m
    need = memory_estimate_bytes(model, n_images=len(seeds), resolution=res,
                                 cfg_scale=opts.cfg_scale, upscale=opts.upscale)
    if need > limits.memory_cap_bytes:
        raise ServiceError(413, f"request needs about {need / 2**30:.2f} GiB, over the "
                           f"memory cap of {limits.memory_cap_bytes / 2**30:.2f} GiB: ask for "
                           "fewer images or a lower resolution", "num_images")
    work = len(seeds) * opts.steps * m * m
    if work > limits.max_image_steps:
        raise ServiceError(413, f"request asks for {work} image-steps (images x steps x m^2), "
                           f"over the cap of {limits.max_image_steps}", "steps")
    uri = info["uri"]
    return Job((uri, opts, labels is None), uri, opts, seeds, labels, received,
               received + limits.request_deadline_s, info["name"], info["version"], res, m)


def split_job(job: Job, max_turn_image_steps: int) -> list[Job]:
    """``job`` cut into parts of whole images, each at most ``max_turn_image_steps`` of work
    (a part has one image at least)."""
    k = max(1, max_turn_image_steps // (job.opts.steps * job.m**2))
    if len(job.seeds) <= k:
        return [job]
    return [dataclasses.replace(job, seeds=job.seeds[a:a + k],
                                labels=None if job.labels is None else job.labels[a:a + k])
            for a in range(0, len(job.seeds), k)]


def late_answer(request_deadline_s: float) -> Answer:
    """The 504 of a request not answered within its deadline."""
    return ServiceError(504, f"request not answered within its deadline of "
                             f"{request_deadline_s:g} s: ask for fewer images or steps, "
                             "or try again when the service is less busy").as_dict()


def job_answer(job: Job, images: np.ndarray, batch_requests: int, batch_images: int,
               start: float, done: float) -> Answer:
    """The answer to ``job`` from its ``images`` (N, H, W, C) uint8 of a generate call that
    ran from ``start`` to ``done`` (perf_counter) with ``batch_images`` images of
    ``batch_requests`` jobs."""
    return {
        "images": images, "seeds": job.seeds, "labels": job.labels,
        "model": job.model_name, "model_version": job.model_version,
        "resolution": job.resolution, "batch_requests": batch_requests,
        "batch_images": batch_images,
        "timings": {"queue_s": start - job.received, "generate_s": done - start,
                    "total_s": done - job.received},
    }


def join_answers(parts: list[Job], answers: list[Answer], now: float) -> Answer:
    """The answers to every part of a request (in order, none an error) as one answer: the
    first part's description, all the images, the queue time of the first part and the
    generate time of all; ``parts`` when there were several."""
    if len(answers) == 1:
        return answers[0]
    job = parts[0]
    out = dict(answers[0], images=np.concatenate([a["images"] for a in answers]),
               seeds=[s for p in parts for s in p.seeds],
               labels=None if job.labels is None else [c for p in parts for c in p.labels],
               parts=len(parts))
    out["timings"] = {"queue_s": answers[0]["timings"]["queue_s"],
                      "generate_s": sum(a["timings"]["generate_s"] for a in answers),
                      "total_s": now - job.received}
    return out
