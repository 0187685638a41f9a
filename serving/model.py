"""The Serve deployment that holds the model(s): it loads, queues and delegates.

All of its work is :class:`serving.service.SamplerService` (plain asyncio, no Ray): validating
requests into jobs (``serving/jobs.py``), the model cache (``serving/loading.py``), the device
queue that merges what waits into one call (``serving/merging.py``), the memory cap
(``serving/memory.py``) and the timing diagnostic (``serving/diagnostics.py``). The ingress
groups the requests that reach it together into one ``generate_many`` call.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from ray import serve

from serving.loading import Loaded
from serving.service import SamplerService


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
        self.service = SamplerService(model_uri, device, max_models=max_models,
                                      allow_other_models=allow_other_models,
                                      precision=precision, cuda_graphs=cuda_graphs)
        time.sleep(load_delay_s)  # a slow load, for tests of readiness and rollouts
        try:
            self.service.load_default()
        except Exception as exc:
            uri = self.service.cache.default_uri
            raise RuntimeError(f"model {uri} failed to load: "
                               f"{type(exc).__name__}: {exc}") from exc

    @property
    def models(self) -> OrderedDict[str, Loaded]:
        """The loaded models by canonical reference."""
        return self.service.cache.models

    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config: max_batch_size, batch_wait_timeout_s, memory_cap_bytes,
        max_image_steps, max_turn_image_steps, request_deadline_s."""
        self.service.reconfigure(config)

    def check_health(self) -> None:
        """Ray Serve's periodic replica check: a replica without its default model (it
        cannot answer) is unhealthy, so Serve replaces it with one that loads it again."""
        if not self.service.cache.ready:
            raise RuntimeError(f"model {self.service.cache.default_uri} is not loaded")

    async def health(self) -> dict[str, Any]:
        return self.service.health()

    async def list_models(self) -> list[dict[str, Any]]:
        return self.service.cache.describe()

    async def time_generate(self, batch: int = 32, steps: int = 16, repeats: int = 3,
                            gc_off: bool = False, threads: int = 0) -> dict[str, float]:
        """Diagnostic (handle only, not routed over HTTP): the replica's time for one
        ``batch``-image, ``steps``-step generation of the default model."""
        return await self.service.time_generate(batch, steps, repeats, gc_off, threads)

    async def stats(self) -> dict[str, int]:
        """How many device calls ran with each number of images."""
        return self.service.stats()

    async def timeline(self, after: int = 0) -> list[dict[str, float]]:
        """The device calls' timelines (``DeviceMerger.timeline``)."""
        return self.service.timeline(after)

    async def handle_calls(self) -> dict[str, int]:
        """How many ``generate_many`` calls carried each number of requests."""
        return self.service.handle_calls()

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """One request: its images (uint8 NHWC) or its error."""
        return (await self.generate_many([payload]))[0]

    async def generate_many(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Several requests in one handle call (the ingress groups those that reach it
        together): one call's overhead instead of one per request. Each is validated, queued
        for the device and answered on its own; an invalid one fails alone."""
        return await self.service.generate_many(payloads)
