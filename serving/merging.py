"""Merge the requests that queue up while the device is busy into the next device call.

``serve.batch`` alone forms the next batch while the current one still runs: under a steady
load the clients split into groups that return at different times and never meet again, so
each device call holds one group, a fraction of the clients. With ``DeviceMerger`` every
caller registers its jobs (the sampler's ``generate_many`` calls, each a group the ingress
gathered), one call at a time holds the device, and the holder takes every registered job (up
to ``max_jobs``) into one call.
Before it does, it waits until the jobs it expects are there, or ``wait_s`` has passed since the
oldest waiting job arrived or the device came free, whichever is later. It expects the jobs that
were waiting when the device came free plus those the call that just ended answered (their
clients come back within milliseconds): two groups that took turns on the device (one queued
while the other ran) are merged into one call, and a lone client (one job answered, none
waiting) never waits. It stops waiting sooner when the expected clients have gone quiet: once
no job has come for twice the time the recent calls' clients took to come back (device free
-> their last job), the call starts with what is there. So a load that ends or thins out
costs tens of milliseconds, not the whole ``wait_s``, while returning clients are still
waited for. Plain asyncio; no Ray.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

J = TypeVar("J")
R = TypeVar("R")


class DeviceMerger(Generic[J, R]):
    """``await merger.submit(jobs)`` -> results, in order; ``execute(jobs) -> results`` runs the
    merged jobs of every batch waiting at that moment (first come first served)."""

    def __init__(self, execute: Callable[[list[J]], Awaitable[list[R]]], max_jobs: int,
                 wait_s: float = 0.0) -> None:
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self.execute, self.max_jobs, self.wait_s = execute, max_jobs, wait_s
        self._pending: list[tuple[list[J], asyncio.Future, float]] = []  # jobs, future, arrival
        self._lock: asyncio.Lock | None = None  # created in the serving event loop
        self._arrived: asyncio.Event | None = None
        self._last_end = -math.inf  # when the device last came free (loop time)
        self._expected = 1  # jobs waiting when the device came free + jobs it just answered
        # the last calls' timelines (seconds): where a cycle's time goes, see ``timeline``
        self.history: deque[dict[str, float]] = deque(maxlen=256)
        self._calls = 0

    async def submit(self, jobs: list[J]) -> list[R]:
        if self._lock is None or self._arrived is None:
            self._lock, self._arrived = asyncio.Lock(), asyncio.Event()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._pending.append((jobs, fut, loop.time()))
        self._arrived.set()
        async with self._lock:
            while not fut.done():  # not taken by an earlier holder: run it with all that waits
                await self._fill()
                await self._run(self._take())
        return fut.result()

    async def _fill(self) -> None:
        """Wait for the expected jobs (at most ``max_jobs``), at most ``wait_s`` after the later
        of the oldest arrival and the device coming free."""
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        deadline = max(self._pending[0][2], self._last_end) + self.wait_s
        target = min(self.max_jobs, self._expected)
        patience = self.patience_s()
        while sum(len(jobs) for jobs, _, _ in self._pending) < target:
            # the latest sign of life: the device coming free or the newest job
            quiet_since = max(self._last_end, self._pending[-1][2])
            remaining = min(deadline, quiet_since + patience) - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def patience_s(self) -> float:
        """How long ``_fill`` waits after the latest sign of life (the device coming free or
        the newest job) for the jobs it expects: twice the median time that the last 16
        calls' clients took to come back (device free -> their last job), within
        [5 ms, ``wait_s``]; ``wait_s`` before any such call."""
        back = [c["free_to_first_s"] + c["first_to_last_s"] for c in list(self.history)[-16:]
                if c["call"] > 1]
        if not back:
            return self.wait_s
        return min(self.wait_s, max(0.005, 2.0 * statistics.median(back)))

    def _take(self) -> list[tuple[list[J], asyncio.Future, float]]:
        """Pending entries in arrival order while their jobs fit ``max_jobs`` (at least one)."""
        taken, n = [], 0
        while self._pending and (not taken or n + len(self._pending[0][0]) <= self.max_jobs):
            entry = self._pending.pop(0)
            taken.append(entry)
            n += len(entry[0])
        return taken

    async def _run(self, taken: list[tuple[list[J], asyncio.Future, float]]) -> None:
        merged = [job for jobs, _, _ in taken for job in jobs]
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            results = await self.execute(merged)
        except Exception as exc:  # every caller of the merged call sees the failure
            for _, fut, _ in taken:
                fut.set_exception(exc)
            return
        finally:
            end = loop.time()
            first, last = min(a for _, _, a in taken), max(a for _, _, a in taken)
            self._calls += 1
            self.history.append({
                "call": float(self._calls), "jobs": float(len(merged)),
                # device free -> first job of this call here (the answers' trip back and the
                # fastest client's next request); -> last job (the slowest one); -> start
                "free_to_first_s": max(0.0, first - self._last_end) if self._calls > 1 else 0.0,
                "first_to_last_s": last - first,
                "last_to_start_s": start - last,
                "run_s": end - start})
            self._last_end = end
            self._expected = len(merged) + sum(len(jobs) for jobs, _, _ in self._pending)
        pos = 0
        for jobs, fut, _ in taken:
            fut.set_result(results[pos:pos + len(jobs)])
            pos += len(jobs)

    def timeline(self, after: int = 0) -> list[dict[str, float]]:
        """The recorded calls numbered above ``after`` (at most the last 256), oldest first:
        ``free_to_first_s`` how long the device stood free before the call's first job came
        (the answers' way back and the fastest client's next request), ``first_to_last_s``
        how far its first and last jobs arrived apart, ``last_to_start_s`` the wait from the
        last one to the start, ``run_s`` the call itself."""
        return [{k: round(v, 4) for k, v in c.items()} for c in self.history
                if c["call"] > after]
