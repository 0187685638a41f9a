"""Closed-loop HTTP load from several processes (the load generator of ``serve_load.py``).

32 client threads in one Python process share one GIL: parsing 32 responses and building 32
requests one after another adds tens of milliseconds to every round trip, which a service
with real clients (separate processes or machines) would not see. Here the clients are spread
over processes (threads within each), every client keeps its connection open, and the timed
requests start together once every client, in every process, has had its warm-up request
answered (a barrier): warm-ups that trickle in as processes start never overlap the timed
window. Imports only ``requests``, so spawned workers start fast.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

Row = tuple[float, int, dict[str, float]]  # latency s, images in the device call, timings


def _one(session: Any, url: str, seed: int, steps: int) -> Row:
    t = time.perf_counter()
    r = session.post(f"{url}/v1/generate", timeout=600,
                     json={"seeds": [seed], "steps": steps, "format": "json"})
    r.raise_for_status()
    body = r.json()
    return time.perf_counter() - t, body["batch_images"], body["timings"]


def _process(url: str, steps: int, clients: list[list[int]], barrier: Any
             ) -> tuple[list[Row], float, float]:
    """This process's clients: warm-up (connection, first call), ``barrier.wait()`` with the
    other processes, then the timed requests. Returns rows, timed start, last answer."""
    sessions = [requests.Session() for _ in clients]
    local = threading.Barrier(len(clients))
    start: list[float] = []

    def client(k: int) -> tuple[list[Row], float]:
        s, seeds = sessions[k], clients[k]
        try:
            _one(s, url, 10**6 + seeds[0], steps)
            if local.wait() == 0:  # one thread of this process meets the other processes
                if barrier is not None:
                    barrier.wait()
                start.append(time.time())
            local.wait()
        except Exception:
            local.abort()  # the other threads stop waiting (BrokenBarrierError)
            if barrier is not None:
                barrier.abort()
            raise
        rows = [_one(s, url, seed, steps) for seed in seeds]
        return rows, time.time()

    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            done = list(pool.map(client, range(len(clients))))
    finally:
        for s in sessions:
            s.close()
    return [r for rows, _ in done for r in rows], start[0], max(end for _, end in done)


def _worker(url: str, steps: int, clients: list[list[int]], barrier: Any, out: Any) -> None:
    try:
        out.put(_process(url, steps, clients, barrier))
    except Exception as exc:  # reported by run()
        out.put(exc)


def run(url: str, concurrency: int, per_client: int, steps: int, processes: int,
        timeout_s: float = 1800.0) -> tuple[list[Row], float]:
    """``concurrency`` clients (over ``processes`` processes), ``per_client`` requests each;
    returns every request's row and the wall time from the common start to the last answer."""
    clients = [[10_000 + c * per_client + k for k in range(per_client)]
               for c in range(concurrency)]
    processes = max(1, min(processes, concurrency))
    parts = [clients[p::processes] for p in range(processes)]
    if processes == 1:
        rows, start, end = _process(url, steps, parts[0], None)
        return rows, end - start
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(processes, timeout=timeout_s), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, steps, part, barrier, out), daemon=True)
             for part in parts]
    for p in procs:
        p.start()
    try:
        res = [out.get(timeout=timeout_s) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for r in res:
        if isinstance(r, Exception):
            raise r
    rows = [r for rs, _, _ in res for r in rs]
    return rows, max(end for _, _, end in res) - min(start for _, start, _ in res)
