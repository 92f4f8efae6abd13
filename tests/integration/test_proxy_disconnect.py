"""Integration: clients that go away (the proxy runs under AppRunner(handler_cancellation=True),
as ``sdproxy serve`` does, so a closed connection cancels its handler).

Gone while queued: the request leaves the queue and never reaches a pod. Gone mid-
generation: the proxy POSTs /sdapi/v1/interrupt to that pod and keeps the slot until the
pod's response has ended, so the next queued request never lands on a still-busy pod.
Gone mid-upload: nothing was queued yet (the body is received whole first), see
test_proxy_upload.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sdproxy.sim.images import png_b64
from tests.integration.conftest import (
    TXT2IMG,
    ProxyFactory,
    ProxyUnderTest,
    SimCluster,
    SimFactory,
    eventually,
    gen_body,
)

pytestmark = pytest.mark.timeout(60)


async def post(proxy: ProxyUnderTest, path: str, body: Any) -> tuple[int, Any, str]:
    """(status, JSON, X-Sdproxy-Queue-Ms or '')."""
    async with proxy.client.post(path, json=body) as resp:
        return resp.status, await resp.json(), resp.headers.get("X-Sdproxy-Queue-Ms", "")


async def hang_up(task: asyncio.Task[Any]) -> None:
    """The client gives up: its connection closes with the request unanswered."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def sim_running(sims: SimCluster, index: int = 0) -> None:
    async def check() -> bool:
        return bool((await sims.stats(index))["running_task"])

    await eventually(check, what="a job running on the pod")


async def test_client_gone_while_queued_leaves_the_queue_and_never_reaches_a_pod(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    running = asyncio.create_task(post(proxy, TXT2IMG, gen_body(80)))
    await proxy.wait_inflight(1)
    gone = [asyncio.create_task(post(proxy, TXT2IMG, gen_body(5))) for _ in range(3)]
    await proxy.wait_queue(3)
    for task in gone:
        await hang_up(task)
    await proxy.wait_queue(0)  # removed at once, not when a slot frees
    assert not running.done()
    assert (await running)[0] == 200
    await proxy.wait_idle()
    await asyncio.sleep(0.2)  # give a leaked request every chance to show up
    stats = await sims.stats(0)
    assert stats["completed"] == 1 and stats["heavy_inflight"] == 0, stats
    assert stats["interrupts_received"] == 0


async def test_client_gone_mid_generation_interrupts_that_pod(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    gone = asyncio.create_task(post(proxy, TXT2IMG, gen_body(500)))  # 5 s if left alone
    await sim_running(sims)
    queued = asyncio.create_task(post(proxy, TXT2IMG, gen_body(5)))
    await proxy.wait_queue(1)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await hang_up(gone)

    async def interrupted() -> bool:
        stats = await sims.stats(0)
        return bool(stats["interrupts_received"] == 1 and stats["interrupted"] == 1)

    await eventually(interrupted, what="the pod to receive the interrupt")
    status, _, _ = await queued
    assert status == 200
    assert loop.time() - start < 4.0, "the interrupt freed the pod early"
    stats = await sims.stats(0)
    assert stats["heavy_inflight_max"] == 1, "the next job never overlapped the old one"
    assert stats["completed"] == 2
    await proxy.wait_idle()


async def test_slot_is_held_until_the_pods_response_ends(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    """Interrogation is not interruptible (sd-webui checks the flag only while sampling):
    the pod works on after the client left, and the next job must wait for it."""
    sims = await sim_pods(1, step_ms=200.0)  # clip interrogation: 10 units = 2 s
    proxy = await proxy_factory(sims.urls)
    body = {"image": png_b64(64, 64).decode(), "model": "clip"}
    gone = asyncio.create_task(post(proxy, "/sdapi/v1/interrogate", body))
    await sim_running(sims)
    task_id = (await sims.stats(0))["running_task"]
    queued = asyncio.create_task(post(proxy, TXT2IMG, gen_body(1)))
    await proxy.wait_queue(1)
    await hang_up(gone)

    async def interrupt_sent() -> bool:
        return bool((await sims.stats(0))["interrupts_received"] == 1)

    await eventually(interrupt_sent, what="the interrupt")
    # read the proxy first, the pod second: the pod was still busy with the abandoned
    # job at both instants, and the proxy still held its slot and the queued request
    status = await proxy.status()
    stats = await sims.stats(0)
    assert stats["running_task"] == task_id, "too slow a machine: interrogation ended"
    assert status["inflight"] == 1 and status["queue"]["depth"] == 1, status
    result, _, _ = await queued
    assert result == 200
    stats = await sims.stats(0)
    assert stats["heavy_inflight_max"] == 1, stats
    assert stats["completed"] == 2, "the abandoned interrogation still ran to its end"
    await proxy.wait_idle()
