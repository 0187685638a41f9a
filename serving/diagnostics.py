"""Diagnostics of a Sampler replica, for benchmarks (``benchmarks/serve_profile.py``): how long
one generation takes inside the replica, run as the service runs it (a worker thread) and in
the event-loop thread, against an offline call of the same model."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Any

import torch


def _median_seconds(run: Callable[[], Any], repeats: int, cuda: bool) -> float:
    run()  # warm-up, finished before the clock starts
    if cuda:
        torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return sorted(out)[len(out) // 2]


async def time_generate(run: Callable[[], Any], *, repeats: int = 3, cuda: bool = False,
                        gc_off: bool = False, threads: int = 0) -> dict[str, float]:
    """Median seconds of ``run()`` in a worker thread and in the calling (event-loop) thread;
    optionally with Python's cyclic GC off, or ``threads`` torch threads, meanwhile."""
    old_threads, gc_was = torch.get_num_threads(), gc.isenabled()
    if threads:
        torch.set_num_threads(threads)
    if gc_off:
        gc.disable()
    try:
        in_thread = await asyncio.to_thread(_median_seconds, run, repeats, cuda)
        in_loop = _median_seconds(run, repeats, cuda)
    finally:
        torch.set_num_threads(old_threads)
        if gc_was:
            gc.enable()
    return {"worker_thread_s": in_thread, "event_loop_thread_s": in_loop,
            "torch_threads": float(threads or old_threads)}
