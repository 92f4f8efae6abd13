"""Integration: chaos on real sockets — bursts, random client hang-ups, a pod killed mid-run.

Seeded and bounded. Afterwards: every request the client did not abandon got a 200 or a
clear JSON error; no surviving pod ever ran two generations at once; the proxy holds no
slot, queues nothing and has no abandoned exchange left (no slot leaks); the surviving
pods run nothing.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from tests.integration.conftest import (
    TXT2IMG,
    ProxyFactory,
    ProxyUnderTest,
    SimFactory,
    eventually,
    gen_body,
)

pytestmark = pytest.mark.timeout(60)

SEED = 20261125
BURSTS = 5
PER_BURST = 16
#: some generations run long enough that killing their pod cuts them off (502)
LONG_SHARE = 0.04
LONG_STEPS = 600
KNOWN_ERRORS = {
    502: {"backend_error"},
    503: {"queue_full", "queue_timeout", "no_backends"},
    409: {"job_cancelled"},
}


@dataclass(kw_only=True)
class Outcome:
    status: int | None = None  # None: abandoned by the client
    error: str | None = None
    pod: str | None = None
    polls: int = 0
    long: bool = False


async def client(proxy: ProxyUnderTest, name: str | None, steps: int, outcome: Outcome) -> None:
    """One txt2img; a named client also polls its progress while it waits."""
    headers = {"X-Sdproxy-Client": name} if name else {}
    body = gen_body(steps)
    poller = asyncio.create_task(poll(proxy, headers, outcome)) if headers else None
    try:
        async with proxy.client.post(TXT2IMG, json=body, headers=headers) as resp:
            outcome.status = resp.status
            outcome.pod = resp.headers.get("X-Sdproxy-Pod")
            data: Any = await resp.json()
            if resp.status != 200:
                outcome.error = data["error"]
                assert isinstance(data["detail"], str) and data["detail"]
    finally:
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)


async def poll(proxy: ProxyUnderTest, headers: dict[str, str], outcome: Outcome) -> None:
    """A client watching its own job: every answer is JSON, a progress or an error."""
    while True:
        await asyncio.sleep(0.05)
        async with proxy.client.get("/sdapi/v1/progress", headers=headers) as resp:
            data = await resp.json()
            assert resp.status == 200 or data["error"] == "backend_error", data
            outcome.polls += 1


async def test_chaos_bursts_hangups_and_a_dead_pod_leave_no_leaks(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    rng = random.Random(SEED)
    sims = await sim_pods(3)
    proxy = await proxy_factory(
        sims.urls, "--max-queue", "25", "--queue-timeout-s", "4", "--connect-timeout-s", "1"
    )
    outcomes: list[Outcome] = []
    tasks: list[asyncio.Task[None]] = []
    hangups: list[asyncio.Task[None]] = []
    killer: asyncio.Task[None] | None = None
    before_kill: dict[str, Any] = {}
    killed: list[int] = []

    async def hang_up_later(task: asyncio.Task[None], delay: float) -> None:
        await asyncio.sleep(delay)
        task.cancel()

    async def kill_a_pod() -> None:
        """Kill a pod while it runs a long generation (any pod after 5 s)."""

        async def long_job_on(index: int) -> bool:
            async with sims.session.get(sims.urls[index] + "/sdapi/v1/progress") as resp:
                return bool((await resp.json())["state"]["sampling_steps"] == LONG_STEPS)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        victim = 0
        while loop.time() < deadline:
            found = [i for i in range(len(sims.urls)) if await long_job_on(i)]
            if found:
                victim = found[0]
                break
            await asyncio.sleep(0.02)
        killed.append(victim)
        before_kill.update(await sims.stats(victim))
        await sims.kill(victim)

    for burst in range(BURSTS):
        for i in range(PER_BURST):
            long = rng.random() < LONG_SHARE
            outcome = Outcome(long=long)
            outcomes.append(outcome)
            steps = LONG_STEPS if long else rng.randint(3, 40)
            name = f"c{burst}-{i}" if rng.random() < 0.5 else None
            task = asyncio.create_task(client(proxy, name, steps, outcome))
            tasks.append(task)
            if rng.random() < 0.3 and not long:  # long ones stay, to be cut off by the kill
                hangups.append(asyncio.create_task(hang_up_later(task, rng.uniform(0, 0.6))))
        if burst == 2:
            killer = asyncio.create_task(kill_a_pod())
        await asyncio.sleep(rng.uniform(0.2, 0.6))

    results = await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*hangups)
    assert killer is not None
    await killer

    abandoned = 0
    for outcome, result in zip(outcomes, results, strict=True):
        if isinstance(result, asyncio.CancelledError):
            abandoned += 1
            continue
        assert result is None, f"the client saw {result!r} instead of an answer"
        assert outcome.status is not None
        if outcome.status != 200:
            assert outcome.error in KNOWN_ERRORS.get(outcome.status, set()), outcome
    statuses = Counter(o.status for o in outcomes if o.status is not None)
    assert statuses[200] >= len(outcomes) // 3, statuses
    assert abandoned > 0, "the seed must exercise hang-ups"
    assert statuses[502] >= 1, "the kill cut off a running generation (502 backend_error)"

    await proxy.wait_idle()
    admission = proxy.services.admission
    assert admission.inflight == 0 and len(admission.queue) == 0
    assert all(not pod.running for pod in admission.pods.values())
    assert proxy.services.proxy is not None
    assert len(proxy.services.proxy.jobs) == 0, "every job left the job index"

    assert before_kill["heavy_inflight_max"] <= 1
    (dead,) = killed
    survivors = [i for i in range(len(sims.urls)) if i != dead]

    async def pods_quiet() -> bool:
        return all(stats["heavy_inflight"] == 0 for stats in await sims.all_stats())

    await eventually(pods_quiet, what="the surviving pods to finish")
    ok_by_pod = Counter(o.pod for o in outcomes if o.status == 200)
    for index in survivors:
        stats = await sims.stats(index)
        assert stats["heavy_inflight_max"] <= 1, stats
        assert stats["completed"] >= ok_by_pod[sims.urls[index].removeprefix("http://")]

    # the proxy still works normally afterwards
    async with proxy.client.post(TXT2IMG, json=gen_body(3)) as resp:
        assert resp.status == 200
        assert resp.headers["X-Sdproxy-Pod"] != sims.urls[dead].removeprefix("http://")
