"""Closed-loop HTTP load from several processes (the load generator of ``serve_load.py``).

32 client threads in one Python process share one GIL: parsing 32 responses and building 32
requests one after another adds tens of milliseconds to every round trip, which a service
with real clients (separate processes or machines) would not see. Here the clients are spread
over processes (threads within each), every client keeps its connection open, and all start
their timed requests at one agreed moment after a warm-up request each. Imports only
``requests``, so spawned workers start fast.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

Row = tuple[float, int, dict[str, float]]  # latency s, images in the device call, timings


def _one(session: Any, url: str, seed: int, steps: int) -> Row:
    t = time.perf_counter()
    r = session.post(f"{url}/v1/generate", timeout=600,
                     json={"seeds": [seed], "steps": steps, "format": "json"})
    r.raise_for_status()
    body = r.json()
    return time.perf_counter() - t, body["batch_images"], body["timings"]


def _client(url: str, steps: int, seeds: list[int], start_at: float) -> tuple[list[Row], float]:
    import requests

    with requests.Session() as s:
        _one(s, url, 10**6 + seeds[0], steps)  # warm-up: connection, first call
        time.sleep(max(0.0, start_at - time.time()))
        rows = [_one(s, url, seed, steps) for seed in seeds]
    return rows, time.time()


def _process(url: str, steps: int, clients: list[list[int]], start_at: float
             ) -> tuple[list[Row], float]:
    with ThreadPoolExecutor(len(clients)) as pool:
        done = list(pool.map(lambda seeds: _client(url, steps, seeds, start_at), clients))
    return [r for rows, _ in done for r in rows], max(end for _, end in done)


def run(url: str, concurrency: int, per_client: int, steps: int, processes: int,
        start_delay_s: float = 3.0) -> tuple[list[Row], float]:
    """``concurrency`` clients (over ``processes`` processes), ``per_client`` requests each;
    returns every request's row and the wall time from the common start to the last answer."""
    clients = [[10_000 + c * per_client + k for k in range(per_client)]
               for c in range(concurrency)]
    processes = max(1, min(processes, concurrency))
    parts = [clients[p::processes] for p in range(processes)]
    start_at = time.time() + start_delay_s + 0.5 * processes  # spawned workers import first
    if processes == 1:
        rows, end = _process(url, steps, parts[0], start_at)
        return rows, end - start_at
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes) as pool:
        res = pool.starmap(_process, [(url, steps, part, start_at) for part in parts])
    rows = [r for rs, _ in res for r in rs]
    return rows, max(end for _, end in res) - start_at


