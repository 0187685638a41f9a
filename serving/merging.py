"""Merge batches that queue up while the device is busy into the next device call.

``serve.batch`` gathers the requests that arrive within ``batch_wait_timeout_s`` of each other,
but it forms the next batch while the current one still runs: under a steady load the clients
split into groups that return at different times and never meet again (32 closed-loop clients
were served in batches of about 11). ``DeviceMerger`` sits behind ``serve.batch`` (with
``max_concurrent_batches > 1``): each batch registers its jobs, one call at a time holds the
device, and the holder takes every registered job (up to ``max_jobs``) into one call.
Plain asyncio; no Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

J = TypeVar("J")
R = TypeVar("R")


class DeviceMerger(Generic[J, R]):
    """``await merger.submit(jobs)`` -> results, in order; ``execute(jobs) -> results`` runs the
    merged jobs of every batch waiting at that moment (first come first served)."""

    def __init__(self, execute: Callable[[list[J]], Awaitable[list[R]]], max_jobs: int) -> None:
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
        self.execute, self.max_jobs = execute, max_jobs
        self._pending: list[tuple[list[J], asyncio.Future]] = []
        self._lock: asyncio.Lock | None = None  # created in the serving event loop

    async def submit(self, jobs: list[J]) -> list[R]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append((jobs, fut))
        async with self._lock:
            while not fut.done():  # not taken by an earlier holder: run it with all that waits
                await self._run(self._take())
        return fut.result()

    def _take(self) -> list[tuple[list[J], asyncio.Future]]:
        """Pending entries in arrival order while their jobs fit ``max_jobs`` (at least one)."""
        taken, n = [], 0
        while self._pending and (not taken or n + len(self._pending[0][0]) <= self.max_jobs):
            entry = self._pending.pop(0)
            taken.append(entry)
            n += len(entry[0])
        return taken

    async def _run(self, taken: list[tuple[list[J], asyncio.Future]]) -> None:
        merged = [job for jobs, _ in taken for job in jobs]
        try:
            results = await self.execute(merged)
        except Exception as exc:  # every caller of the merged call sees the failure
            for _, fut in taken:
                fut.set_exception(exc)
            return
        pos = 0
        for jobs, fut in taken:
            fut.set_result(results[pos:pos + len(jobs)])
            pos += len(jobs)
