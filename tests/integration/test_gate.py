"""Integration: ``sdproxy gate`` in front of simulated pods, and front replicas sharing
gated pods — on real loopback sockets.

The gate is the single authority on what its pod runs: a request over the limit is refused
``pod_busy`` before its body reaches sd-webui, a sender that leaves mid-generation has its
generation interrupted by the gate, and the occupancy stream lets several front replicas
share pods with the limit exact.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.integration.conftest import (
    TXT2IMG,
    GatedFactory,
    ProxyFactory,
    eventually,
    gen_body,
)


async def test_one_over_the_limit_is_refused_before_its_body_reaches_sd_webui(
    gated_pods: GatedFactory,
) -> None:
    cluster = await gated_pods(1)
    gate = cluster.urls[0]
    async with aiohttp.ClientSession() as client:
        first = asyncio.create_task(client.post(gate + TXT2IMG, json=gen_body(30)))
        await eventually(
            lambda: _inflight(cluster, 0, 1), what="the first generation holds the slot"
        )
        # with Expect: 100-continue the body is never even uploaded
        async with client.post(
            gate + TXT2IMG, data=json.dumps(gen_body(1)).encode(), expect100=True
        ) as busy:
            assert busy.status == 503
            assert busy.headers["X-Sdproxy-Gate"] == "busy"
            assert (await busy.json())["error"] == "pod_busy"
        # without it, the body arrives at the gate but is never forwarded
        async with client.post(gate + TXT2IMG, json=gen_body(1)) as busy:
            assert busy.status == 503
        resp = await first
        assert resp.status == 200
        assert resp.headers["X-Sdproxy-Gate"] == "admitted"
        resp.release()
    stats = await cluster.sims.stats(0)
    assert stats["heavy_inflight_max"] == 1
    assert stats["completed"] == 1, "the refused requests never reached the pod"
    await eventually(lambda: _inflight(cluster, 0, 0), what="the slot freed")


async def _inflight(cluster: Any, index: int, count: int) -> bool:
    return bool((await cluster.occupancy(index))["inflight"] == count)


async def test_occupancy_names_the_sender_and_streams_every_change(
    gated_pods: GatedFactory,
) -> None:
    cluster = await gated_pods(1)
    gate = cluster.urls[0]
    events: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as client:

        async def follow() -> None:
            async with client.get(gate + "/-/gate/events") as stream:
                assert stream.headers["Content-Type"].startswith("text/event-stream")
                async for raw in stream.content:
                    line = raw.decode().strip()
                    if line.startswith("data:"):
                        events.append(json.loads(line[5:]))

        watcher = asyncio.create_task(follow())
        headers = {"X-Sdproxy-Replica": "front-a", "X-Sdproxy-Client": "alice"}
        job = asyncio.create_task(client.post(gate + TXT2IMG, json=gen_body(20), headers=headers))

        async def seen_running() -> bool:
            return any(e["inflight"] == 1 for e in events)

        await eventually(seen_running, what="the stream to report the claim")
        running = next(e for e in events if e["inflight"] == 1)["running"][0]
        assert (running["replica"], running["caller"], running["route"]) == (
            "front-a",
            "alice",
            TXT2IMG,
        )
        (await job).release()

        async def seen_free() -> bool:
            return events[-1]["inflight"] == 0

        await eventually(seen_free, what="the stream to report the slot freed")
        watcher.cancel()
    versions = [e["version"] for e in events]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert events[-1]["limit"] == 1


async def test_a_sender_that_leaves_mid_generation_is_interrupted_by_the_gate(
    gated_pods: GatedFactory,
) -> None:
    """What happens when a front replica dies: its connections to the gate drop."""
    cluster = await gated_pods(1)
    gate = cluster.urls[0]
    async with aiohttp.ClientSession() as client:
        job = asyncio.create_task(client.post(gate + TXT2IMG, json=gen_body(500)))
        await eventually(lambda: _inflight(cluster, 0, 1), what="the generation started")
        job.cancel()  # the sender's connection closes mid-generation

    async def interrupted() -> bool:
        stats = await cluster.sims.stats(0)
        return bool(stats["interrupts_received"] == 1)

    await eventually(interrupted, what="the gate to interrupt its sd-webui")
    await eventually(lambda: _inflight(cluster, 0, 0), what="the slot freed after the answer")
    stats = await cluster.sims.stats(0)
    assert stats["heavy_inflight_max"] == 1


async def test_two_front_replicas_sharing_gated_pods_never_exceed_the_limit(
    gated_pods: GatedFactory, proxy_factory: ProxyFactory
) -> None:
    """Without gates, two replicas put two generations on each pod at once (the bug this
    design fixes); with gates each pod runs one, and every request is answered 200."""
    cluster = await gated_pods(2)
    front = [await proxy_factory(cluster.urls) for _ in range(2)]
    for proxy in front:

        async def gated(proxy: Any = proxy) -> bool:
            return all(p["mode"] == "gated" for p in (await proxy.status())["pods"])

        await eventually(gated, what="every pod seen through its gate")

    async def one(i: int) -> int:
        proxy = front[i % 2]
        async with proxy.client.post(TXT2IMG, json=gen_body(8)) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(one(i) for i in range(16)))
    assert statuses == [200] * 16
    for index in range(2):
        assert (await cluster.sims.stats(index))["heavy_inflight_max"] == 1
    assert await cluster.sims.total("completed") == 16
    for proxy in front:
        await proxy.wait_idle()


async def test_a_plain_backend_is_used_directly_and_says_so(
    gated_pods: GatedFactory, proxy_factory: ProxyFactory
) -> None:
    cluster = await gated_pods(1)
    proxy = await proxy_factory([cluster.urls[0], cluster.sims.urls[0]])

    async def modes() -> bool:
        pods = (await proxy.status())["pods"]
        return sorted(p["mode"] for p in pods) == ["direct", "gated"]

    await eventually(modes, what="one gated pod and one direct")
