"""DeviceMerger: batches that queue while the device is busy go into its next call together."""

from __future__ import annotations

import asyncio

import pytest

from serving.merging import DeviceMerger


def test_batches_waiting_on_a_busy_device_are_merged_in_order():
    calls: list[list[int]] = []

    async def execute(jobs: list[int]) -> list[int]:
        calls.append(list(jobs))
        await asyncio.sleep(0.05)  # the device is busy
        return [10 * j for j in jobs]

    async def main():
        m = DeviceMerger(execute, max_jobs=32)
        first = asyncio.create_task(m.submit([1, 2]))
        await asyncio.sleep(0.01)  # first holds the device; three batches queue meanwhile
        rest = [asyncio.create_task(m.submit(b)) for b in ([3], [4, 5, 6], [7])]
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert calls == [[1, 2], [3, 4, 5, 6, 7]]  # 4 batches, 2 device calls
    assert first == [10, 20] and rest == [[30], [40, 50, 60], [70]]


def test_the_cap_splits_merges_and_every_caller_gets_its_own_results():
    calls: list[list[int]] = []

    async def execute(jobs: list[int]) -> list[int]:
        calls.append(list(jobs))
        await asyncio.sleep(0.02)
        return [-j for j in jobs]

    async def main():
        m = DeviceMerger(execute, max_jobs=3)
        first = asyncio.create_task(m.submit([0]))
        await asyncio.sleep(0.005)
        rest = [asyncio.create_task(m.submit(b)) for b in ([1, 2], [3], [4, 5], [6, 7, 8, 9])]
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert calls == [[0], [1, 2, 3], [4, 5], [6, 7, 8, 9]]  # an entry over the cap runs alone
    assert rest == [[-1, -2], [-3], [-4, -5], [-6, -7, -8, -9]]


def test_a_failed_call_fails_every_merged_caller_and_the_next_calls_run():
    async def execute(jobs: list[int]) -> list[int]:
        await asyncio.sleep(0.02)
        if 13 in jobs:
            raise RuntimeError("device error")
        return jobs

    async def main():
        m = DeviceMerger(execute, max_jobs=8)
        first = asyncio.create_task(m.submit([1]))
        await asyncio.sleep(0.005)
        bad = [asyncio.create_task(m.submit(b)) for b in ([13], [2])]
        results = await asyncio.gather(first, *bad, return_exceptions=True)
        after = await m.submit([5])
        return results, after

    results, after = asyncio.run(main())
    assert results[0] == [1]
    assert all(isinstance(r, RuntimeError) for r in results[1:])  # merged with the bad job
    assert after == [5]
    with pytest.raises(ValueError, match="max_jobs"):
        DeviceMerger(lambda jobs: None, 0)


def _simulate(max_jobs: int, wait_s: float, groups: list[tuple[float, list[int]]], rounds: int,
              prime: list[int] | None = None) -> list[list[int]]:
    """Closed-loop clients on a merger whose device takes 50 ms a call; each client resubmits
    5 ms after its answer (the network). ``groups``: (start delay in s, client ids); ``prime``:
    the jobs of a first call (what the merger then expects). Returns every call's jobs, sorted."""
    calls: list[list[int]] = []

    async def execute(jobs: list[int]) -> list[int]:
        calls.append(sorted(jobs))
        await asyncio.sleep(0.05)
        return jobs

    async def client(m: DeviceMerger, job: int, delay: float) -> None:
        await asyncio.sleep(delay)
        for _ in range(rounds):
            await m.submit([job])
            await asyncio.sleep(0.005)

    async def main() -> None:
        m = DeviceMerger(execute, max_jobs=max_jobs, wait_s=wait_s)
        if prime:
            await m.submit(prime)
            calls.clear()
        await asyncio.gather(*(client(m, j, d) for d, ids in groups for j in ids))

    asyncio.run(main())
    return calls


def _closed_loop(wait_s: float) -> list[list[int]]:
    """4 clients started 10 ms apart (out of step), 5 requests each."""
    return _simulate(4, wait_s, [(0.01 * j, [j]) for j in range(4)], rounds=5)


def test_a_free_device_waits_briefly_for_the_clients_of_the_call_that_just_ended():
    split = _closed_loop(wait_s=0.0)  # the first client ran alone and stays out of step
    assert len(split) == 10 and [0] in split
    merged = _closed_loop(wait_s=0.03)  # its group comes back within the wait and joins
    assert len(merged) <= 6 and sum(len(c) == 4 for c in merged) >= 4


def test_a_lone_client_never_waits_for_company():
    async def execute(jobs: list[int]) -> list[int]:
        return jobs

    async def main() -> float:
        m = DeviceMerger(execute, max_jobs=32, wait_s=1.0)  # a long wait, never taken
        loop = asyncio.get_running_loop()
        t = loop.time()
        for j in range(5):
            assert await m.submit([j]) == [j]
        return loop.time() - t

    assert asyncio.run(main()) < 0.5  # 5 calls; one wait alone would take 1 s


def test_two_groups_that_take_turns_on_the_device_are_merged():
    """Group A (3 clients) runs; group B (3) queues meanwhile. Waiting only for as many as the
    last call had would run B at once and keep the groups apart for ever (calls of 3); counting
    A's clients as coming back merges them (calls of 6). A first call of three makes A's first
    turn wait for all three."""
    calls = _simulate(8, 0.03, [(0.0, [0, 1, 2]), (0.02, [3, 4, 5])], rounds=6,
                      prime=[-1, -2, -3])
    assert calls[0] == [0, 1, 2]  # B arrives while A runs
    assert sum(len(c) == 6 for c in calls) >= 4, calls  # then one call for all six (not 3s)


def test_each_call_records_where_its_cycle_went():
    """The timeline behind /v1/stats: per call, device free -> first job -> last job -> start
    -> end, numbered so that a reader can ask for the calls after the ones it has seen."""
    async def execute(jobs: list[int]) -> list[int]:
        await asyncio.sleep(0.03)
        return jobs

    async def main() -> DeviceMerger:
        m = DeviceMerger(execute, max_jobs=4, wait_s=0.2)
        await m.submit([0])  # call 1: alone, then one job is expected back
        await asyncio.sleep(0.02)  # the device stands free 20 ms before the next job comes
        late = asyncio.create_task(m.submit([1]))
        await late
        return m

    m = asyncio.run(main())
    calls = m.timeline()
    assert [c["call"] for c in calls] == [1.0, 2.0] and [c["jobs"] for c in calls] == [1, 1]
    assert calls[0]["free_to_first_s"] == 0.0  # nothing ran before the first call
    assert 0.015 <= calls[1]["free_to_first_s"] < 0.2
    assert all(0.025 <= c["run_s"] < 0.5 and c["first_to_last_s"] == 0.0 for c in calls)
    assert m.timeline(after=1) == calls[1:]


def test_a_client_that_leaves_costs_the_others_a_short_wait_not_the_window():
    """Four closed-loop clients, one of which stops after two requests: the merger still
    expects four, but once the three that remain are in and nothing more comes for twice the
    time the clients took to come back, the call starts (before: every later call waited the
    whole window for the client that left)."""
    calls: list[int] = []

    async def execute(jobs: list[int]) -> list[int]:
        calls.append(len(jobs))
        await asyncio.sleep(0.02)
        return jobs

    async def client(m: DeviceMerger, job: int, rounds: int) -> None:
        for _ in range(rounds):
            await m.submit([job])
            await asyncio.sleep(0.002)

    async def main() -> tuple[float, float]:
        m = DeviceMerger(execute, max_jobs=8, wait_s=0.5)
        loop = asyncio.get_running_loop()
        t = loop.time()
        await asyncio.gather(*(client(m, j, 2 if j == 3 else 8) for j in range(4)))
        return loop.time() - t, m.patience_s()

    took, patience = asyncio.run(main())
    assert 4 in calls and calls.count(3) >= 4, calls  # together, then the three alone
    assert 0.005 <= patience < 0.05, patience
    assert took < 1.0, took  # 6 calls of 3 after the client left: 3 s if each waited 0.5 s
