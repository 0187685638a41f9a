"""The work of the ``Sampler`` deployment, in plain asyncio and PyTorch (no Ray), so that it
runs and is tested without a cluster; ``serving/model.py`` only holds it in a Serve replica.

:meth:`SamplerService.generate_many` answers several requests at once: each is validated into a
job (``serving/jobs.py``) against its model (the cache of ``serving/loading.py``) and
registered with a ``DeviceMerger`` (``serving/merging.py``), which makes one device call at a
time of everything waiting (:meth:`SamplerService.run_turn`). Within a turn, jobs whose
settings are compatible (same model, steps, sampler, resolution, guidance, schedule...) run as
one ``generate`` call, split so that each call stays under the memory cap
(``serving/memory.py``). Images depend only on their seeds, so batching never changes a result.

Fairness: a request whose work (images x steps x m^2) exceeds ``max_turn_image_steps`` is cut
into parts of whole images, each under it, submitted one after another; every other request
that arrives meanwhile joins the next device turn, so a large request delays a small one by
about one part's time, not by its whole run. A request not answered within
``request_deadline_s`` of its arrival gets 504, and its parts still to run are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from components.generate import generate_with, to_uint8
from components.model import GenerativeModel
from components.options import GenerateOptions
from serving.diagnostics import time_generate
from serving.jobs import (
    Answer,
    Job,
    Limits,
    ServiceError,
    job_answer,
    join_answers,
    late_answer,
    make_job,
    parse_request,
    split_job,
)
from serving.loading import (
    Loaded,
    Loader,
    ModelCache,
    ModelLoading,
    ModelNotFound,
    default_device,
    load_served_model,
)
from serving.memory import split_under_cap
from serving.merging import DeviceMerger

log = logging.getLogger("ray.serve")  # the replica's log (a logger name: Ray is not imported)


def use_bf16(precision: str, device: str) -> bool:
    """Whether the network runs under bf16 autocast: ``precision`` "bf16", or "auto" on
    CUDA; "fp32" never."""
    return precision == "bf16" or (precision == "auto" and str(device).startswith("cuda"))


def generate_images(model: GenerativeModel, opts: GenerateOptions, seeds: list[int],
                    labels: list[int] | None, device: str, bf16: bool) -> torch.Tensor:
    """``generate_with``, under bf16 autocast when ``bf16``. Autocast holds per thread: call
    this in the thread that runs the generation."""
    if not bf16:
        return generate_with(model, opts, seeds, labels, device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        return generate_with(model, opts, seeds, labels, device)


def generate_uint8(model: GenerativeModel, opts: GenerateOptions, seeds: list[int],
                   labels: list[int] | None, device: str, bf16: bool) -> np.ndarray:
    """:func:`generate_images` as uint8 (N, H, W, C) numpy, all in the calling (worker)
    thread: the copy to the host waits for the device, which must not block the event loop
    (with CUDA graphs the launches return long before the device is done)."""
    return to_uint8(generate_images(model, opts, seeds, labels, device, bf16)).numpy()


class SamplerService:
    """The models of one replica, its limits, and the queue in front of its device.

    ``load`` is ``serving.loading.load_served_model`` or a stand-in with its signature;
    nothing loads until :meth:`load_default`."""

    def __init__(self, model_uri: str, device: str = "auto", *, max_models: int = 2,
                 allow_other_models: bool = True, precision: str = "auto",
                 cuda_graphs: bool = True, load: Loader = load_served_model) -> None:
        self.device = default_device() if device == "auto" else device
        self.bf16 = use_bf16(precision, self.device)
        self.cache = ModelCache(model_uri, self.device, max_models=max_models,
                                allow_other=allow_other_models, cuda_graphs=cuda_graphs,
                                load=load)  # CUDA graphs on CUDA only (load_served_model)
        self.limits = Limits()
        self.merger: DeviceMerger[Job, Answer] = DeviceMerger(self.run_turn, 32, 0.2)
        self.batches: Counter[int] = Counter()  # images per generate call -> count
        self.grouped: Counter[int] = Counter()  # requests per generate_many call -> count

    def load_default(self) -> Loaded:
        """Load the default model now (the replica answers once it is there)."""
        return self.cache.load(self.cache.default_uri)

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """Apply ``config`` (the deployment's user_config): max_batch_size,
        batch_wait_timeout_s (the merger's), and the :class:`serving.jobs.Limits`. A bad
        value raises ValueError and changes nothing."""
        limits = self.limits.updated(config)
        merger = self.merger
        if "max_batch_size" in config or "batch_wait_timeout_s" in config:
            merger = DeviceMerger(  # validates: max_batch_size >= 1, wait >= 0
                self.run_turn, int(config.get("max_batch_size", self.merger.max_jobs)),
                float(config.get("batch_wait_timeout_s", self.merger.wait_s)))
        self.limits, self.merger = limits, merger

    # ------------------------------------------------------------------ state
    def health(self) -> dict[str, Any]:
        return {"ready": self.cache.ready, "model": self.cache.default_uri,
                "device": self.device}

    def stats(self) -> dict[str, int]:
        """How many generate calls ran with each number of images."""
        return {str(k): v for k, v in sorted(self.batches.items())}

    def handle_calls(self) -> dict[str, int]:
        """How many ``generate_many`` calls carried each number of requests."""
        return {str(k): v for k, v in sorted(self.grouped.items())}

    def timeline(self, after: int = 0) -> list[dict[str, float]]:
        """The device calls' timelines (``DeviceMerger.timeline``)."""
        return self.merger.timeline(after)

    async def time_generate(self, batch: int = 32, steps: int = 16, repeats: int = 3,
                            gc_off: bool = False, threads: int = 0) -> dict[str, float]:
        """``serving.diagnostics.time_generate`` of one ``batch``-image, ``steps``-step
        generation of the default model, as a device turn runs it."""
        if not self.cache.ready:
            raise ServiceError(503, f"model {self.cache.default_uri} is not loaded")
        model = self.cache.models[self.cache.default_uri].model
        opts, seeds = GenerateOptions(steps=steps), list(range(batch))
        return await time_generate(
            lambda: generate_images(model, opts, seeds, None, self.device, self.bf16),
            repeats=repeats, cuda=str(self.device).startswith("cuda"), gc_off=gc_off,
            threads=threads)

    # ------------------------------------------------------------------ requests
    async def generate_many(self, payloads: list[dict[str, Any]]) -> list[Answer]:
        """Answer each payload (a ``GenerateRequest`` as JSON) with its images (uint8 NHWC)
        or its error; an invalid request fails alone. Every request's first part goes to the
        merger in one registration, the rest request by request."""
        received = time.perf_counter()
        self.grouped[len(payloads)] += 1
        results: list[Answer] = [{} for _ in payloads]
        jobs: list[Job] = []
        where: list[int] = []
        for i, payload in enumerate(payloads):
            try:
                jobs.append(await self._job(payload, received))
                where.append(i)
            except ServiceError as err:
                results[i] = err.as_dict()
        if jobs:
            parts = [split_job(job, self.limits.max_turn_image_steps) for job in jobs]
            firsts = await self.merger.submit([p[0] for p in parts])
            answers = await asyncio.gather(*(self._finish(p, first)
                                             for p, first in zip(parts, firsts, strict=True)))
            for i, res in zip(where, answers, strict=True):
                results[i] = res
        return results

    async def _job(self, payload: Mapping[str, Any], received: float) -> Job:
        req = parse_request(payload)
        try:
            loaded = await self.cache.get(req.model)
        except ModelLoading as exc:
            raise ServiceError(503, str(exc)) from exc
        except ModelNotFound as exc:
            raise ServiceError(404, str(exc), "model") from exc
        return make_job(req, loaded.model, loaded.info, received, self.limits)

    async def _finish(self, parts: list[Job], first: Answer) -> Answer:
        """Run a request's remaining parts one by one (others' requests join each turn) and
        join their answers; the first error (or the deadline) answers the whole request."""
        answers = [first]
        for part in parts[1:]:
            if "error" in answers[-1]:
                return answers[-1]
            if time.perf_counter() > part.deadline:
                return late_answer(self.limits.request_deadline_s)
            answers += await self.merger.submit([part])
        if "error" in answers[-1]:
            return answers[-1]
        return join_answers(parts, answers, time.perf_counter())

    # ------------------------------------------------------------------ device turns
    async def run_turn(self, jobs: list[Job]) -> list[Answer]:
        """One device turn (the merger's call): the jobs past their deadline answered 504,
        the others grouped by key, each group run in generate calls under the memory cap."""
        results: list[Answer] = [{} for _ in jobs]
        groups: dict[tuple, list[int]] = {}
        now = time.perf_counter()
        for i, job in enumerate(jobs):
            if now > job.deadline:  # waited past its deadline: not run
                results[i] = late_answer(self.limits.request_deadline_s)
            else:
                groups.setdefault(job.key, []).append(i)
        for idx in groups.values():
            first = jobs[idx[0]]
            model = self.cache.models[first.uri].model
            for chunk in split_under_cap(
                    model, [len(jobs[i].seeds) for i in idx], resolution=first.resolution,
                    cfg_scale=first.opts.cfg_scale, upscale=first.opts.upscale,
                    cap_bytes=self.limits.memory_cap_bytes):
                picked = [idx[c] for c in chunk]
                try:
                    answers = await self._run_call(model, [jobs[i] for i in picked])
                except ValueError as exc:  # a setting (OptionError names it) the checks missed
                    field_name = getattr(exc, "field", None)
                    answers = [ServiceError(422, str(exc), field_name).as_dict() for _ in picked]
                except Exception as exc:
                    log.exception("generate failed")
                    answers = [ServiceError(500, f"{type(exc).__name__}: {exc}").as_dict()
                               for _ in picked]
                for i, answer in zip(picked, answers, strict=True):
                    results[i] = answer
        return results

    async def _run_call(self, model: GenerativeModel, jobs: list[Job]) -> list[Answer]:
        """One generate call of compatible ``jobs`` in a worker thread; their answers."""
        first = jobs[0]
        seeds = [s for job in jobs for s in job.seeds]
        labels = None if first.labels is None else [c for job in jobs for c in job.labels or []]
        start = time.perf_counter()
        images = await asyncio.to_thread(  # (N, H, W, C) uint8
            generate_uint8, model, first.opts, seeds, labels, self.device, self.bf16)
        done = time.perf_counter()
        self.batches[len(seeds)] += 1
        answers, pos = [], 0
        for job in jobs:
            k = len(job.seeds)
            answers.append(job_answer(job, images[pos:pos + k], len(jobs), len(seeds),
                                      start, done))
            pos += k
        return answers
