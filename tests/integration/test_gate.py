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
from aiohttp import web

from sdproxy import settings
from sdproxy.cli import build_parser
from sdproxy.core.pods import Endpoint, PodId
from sdproxy.runtime.podgate import build_gate_app
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
        headers = {"X-Sdproxy-Replica": "front-a", "X-Sdproxy-Caller": "h:alice,a:127.0.0.1"}
        job = asyncio.create_task(client.post(gate + TXT2IMG, json=gen_body(20), headers=headers))

        async def seen_running() -> bool:
            return any(e["inflight"] == 1 for e in events)

        await eventually(seen_running, what="the stream to report the claim")
        running = next(e for e in events if e["inflight"] == 1)["running"][0]
        assert (running["replica"], running["caller"], running["route"]) == (
            "front-a",
            "h:alice,a:127.0.0.1",
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


async def peered(proxy_factory: ProxyFactory, urls: list[str], count: int) -> list[Any]:
    """``count`` front replicas over the same pods, each told the others as peers (what
    --peer or --peer-service gives it)."""
    front = [await proxy_factory(urls) for _ in range(count)]
    for proxy in front:
        proxy.services.on_peers(
            [Endpoint(pod_id=PodId(p.url), url=p.url) for p in front if p is not proxy]
        )

    async def every_peer_live() -> bool:
        return all(
            p.services.peers is not None and len(p.services.peers.live()) == count - 1
            for p in front
        )

    await eventually(every_peer_live, what="every replica to hear from its peers")
    for proxy in front:

        async def gated(proxy: Any = proxy) -> bool:
            return all(p["mode"] == "gated" for p in (await proxy.status())["pods"])

        await eventually(gated, what="every pod seen through its gate")
    return front


async def test_a_job_sent_through_one_replica_is_followed_and_stopped_through_another(
    gated_pods: GatedFactory, proxy_factory: ProxyFactory
) -> None:
    cluster = await gated_pods(1)
    a, b = await peered(proxy_factory, cluster.urls, 2)
    alice = {"X-Sdproxy-Client": "alice"}

    async def generate(steps: int) -> tuple[int, Any]:
        async with a.client.post(TXT2IMG, json=gen_body(steps), headers=alice) as resp:
            return resp.status, await resp.json()

    running = asyncio.create_task(generate(2000))  # alice's first job runs ...
    await a.wait_inflight(1)
    queued = asyncio.create_task(generate(5))  # ... and her second waits at A
    await a.wait_queue(1)

    async def progress_via_b() -> dict[str, Any]:
        async with b.client.get("/sdapi/v1/progress", headers=alice) as resp:
            assert resp.status == 200
            data: dict[str, Any] = await resp.json()
            return data

    seen = await progress_via_b()  # the newest job of alice: queued at A
    assert seen["sdproxy"]["queued"] is True and seen["sdproxy"]["queue_position"] == 1
    async with b.client.post("/sdapi/v1/interrupt", headers=alice) as resp:
        assert resp.status == 200
    status, data = await queued
    assert status == 409 and data["error"] == "job_cancelled", data

    async def running_seen_via_b() -> bool:
        return "sdproxy" not in await progress_via_b()  # the pod's own answer

    await eventually(running_seen_via_b, what="B to route alice's progress to her pod")
    async with b.client.post("/sdapi/v1/interrupt", headers=alice) as resp:
        assert resp.status == 200
        assert resp.headers["X-Sdproxy-Pod"] == cluster.urls[0].removeprefix("http://")
    status, _data = await running
    assert status == 200  # sd-webui answers an interrupted generation with its partial image
    assert (await cluster.sims.stats(0))["interrupts_received"] == 1
    for proxy in (a, b):
        await proxy.wait_idle()


async def test_a_job_named_by_its_id_is_reached_through_another_replica_whoever_asks(
    gated_pods: GatedFactory, proxy_factory: ProxyFactory
) -> None:
    """X-Sdproxy-Job works across replicas: the job queued at A is found through B's peer
    query, the one running through the gate's occupancy, both by the id's hash (the gate
    never publishes the id itself); the caller at B names itself otherwise (bob)."""
    cluster = await gated_pods(1)
    a, b = await peered(proxy_factory, cluster.urls, 2)
    run_id, wait_id = "run-" + "r" * 16, "wait-" + "w" * 16

    async def generate(steps: int, job_id: str) -> tuple[int, Any]:
        headers = {"X-Sdproxy-Client": "alice", "X-Sdproxy-Job": job_id}
        async with a.client.post(TXT2IMG, json=gen_body(steps), headers=headers) as resp:
            return resp.status, await resp.json()

    running = asyncio.create_task(generate(2000, run_id))
    await a.wait_inflight(1)
    queued = asyncio.create_task(generate(5, wait_id))
    await a.wait_queue(1)

    async def via_b(method: str, path: str, job_id: str) -> tuple[Any, Any]:
        headers = {"X-Sdproxy-Job": job_id, "X-Sdproxy-Client": "bob"}
        async with b.client.request(method, path, headers=headers) as resp:
            assert resp.status == 200
            return await resp.json(), resp.headers

    seen, _ = await via_b("GET", "/sdapi/v1/progress", wait_id)
    assert seen["sdproxy"]["queued"] is True and seen["sdproxy"]["queue_position"] == 1
    await via_b("POST", "/sdapi/v1/interrupt", wait_id)
    status, data = await queued
    assert status == 409 and data["error"] == "job_cancelled", data
    occupancy = await cluster.occupancy(0)
    assert run_id not in json.dumps(occupancy), "the gate publishes the id's hash only"
    seen, headers = await via_b("GET", "/sdapi/v1/progress", run_id)
    assert "sdproxy" not in seen, "the pod's own answer"
    _, headers = await via_b("POST", "/sdapi/v1/interrupt", run_id)
    assert headers["X-Sdproxy-Pod"] == cluster.urls[0].removeprefix("http://")
    status, _data = await running
    assert status == 200
    assert (await cluster.sims.stats(0))["interrupts_received"] == 1
    for proxy in (a, b):
        await proxy.wait_idle()


async def test_every_replica_exports_the_same_global_desired_pods(
    gated_pods: GatedFactory, proxy_factory: ProxyFactory
) -> None:
    """Demand queued at one replica only is counted by all (what the leader sizes by)."""
    cluster = await gated_pods(1)
    a, b = await peered(proxy_factory, cluster.urls, 2)
    jobs = [asyncio.create_task(b.client.post(TXT2IMG, json=gen_body(1000))) for _ in range(4)]
    await b.wait_queue(3)

    async def desired(proxy: Any) -> float:
        async with proxy.client.get("/-/metrics") as resp:
            text = await resp.text()
        line = next(x for x in text.splitlines() if x.startswith("sdproxy_desired_pods "))
        return float(line.split()[1])

    async def agree() -> bool:
        return await desired(a) == await desired(b) == 4  # 1 running + 3 queued, limit 1

    await eventually(agree, what="both replicas to ask for 4 pods")
    for job in jobs:
        job.cancel()
    for proxy in (a, b):
        await proxy.wait_idle()


async def test_a_gate_whose_sd_webui_died_takes_no_work_and_says_so(
    gated_pods: GatedFactory, proxy_factory: ProxyFactory
) -> None:
    """The gate outlives its sd-webui (a crashed container): it answers pod_down before
    anything is sent, publishes upstream_ok false, and the replicas send it nothing."""
    cluster = await gated_pods(2)
    (proxy,) = await peered(proxy_factory, cluster.urls, 1)
    await cluster.sims.kill(0)
    async with (
        aiohttp.ClientSession() as client,
        client.post(cluster.urls[0] + TXT2IMG, json=gen_body(1)) as resp,
    ):
        assert resp.status == 503
        assert resp.headers["X-Sdproxy-Gate"] == "upstream_down"
        assert (await resp.json())["error"] == "pod_down"
    assert (await cluster.occupancy(0))["upstream_ok"] is False

    async def down() -> bool:
        modes = {p["url"]: p["mode"] for p in (await proxy.status())["pods"]}
        return modes == {cluster.urls[0]: "pod_down", cluster.urls[1]: "gated"}

    await eventually(down, what="the replica to see pod 0 down")
    for _ in range(4):
        async with proxy.client.post(TXT2IMG, json=gen_body(2)) as resp:
            assert resp.status == 200
            assert resp.headers["X-Sdproxy-Pod"] == cluster.urls[1].removeprefix("http://")
    await proxy.wait_idle()


async def test_a_gate_started_while_its_sd_webui_generates_counts_that_job(
    sim_pods: Any,
) -> None:
    """The gate container restarted, sd-webui did not: the generation already running
    holds a slot, so the gate admits nothing beside it until sd-webui is idle."""
    sims = await sim_pods(1)
    async with aiohttp.ClientSession() as client:
        running = asyncio.create_task(client.post(sims.urls[0] + TXT2IMG, json=gen_body(150)))

        async def generating() -> bool:
            async with client.get(sims.urls[0] + "/sdapi/v1/progress") as resp:
                return bool((await resp.json())["state"]["job_count"] > 0)

        await eventually(generating, what="sd-webui to generate")
        ns = build_parser().parse_args(
            ["gate", "--listen", "127.0.0.1:0", "--upstream", sims.urls[0]]
        )
        app = build_gate_app(settings.load_gate(ns, env={}).gate)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            gate = f"http://127.0.0.1:{runner.addresses[0][1]}"
            async with client.get(gate + "/-/gate") as resp:
                occupancy = await resp.json()
            assert occupancy["inflight"] == 1
            assert occupancy["running"][0]["request_id"] == "running-before-the-gate-started"
            async with client.post(gate + TXT2IMG, json=gen_body(1)) as busy:
                assert busy.status == 503 and busy.headers["X-Sdproxy-Gate"] == "busy"
            (await running).release()

            async def freed() -> bool:
                async with client.get(gate + "/-/gate") as resp:
                    return bool((await resp.json())["inflight"] == 0)

            await eventually(freed, what="the adopted slot freed once sd-webui is idle")
            async with client.post(gate + TXT2IMG, json=gen_body(1)) as resp:
                assert resp.status == 200
        finally:
            await runner.cleanup()
    assert (await sims.stats(0))["heavy_inflight_max"] == 1


async def test_a_client_leaving_through_a_replica_is_interrupted_by_the_gate_alone(
    gated_pods: GatedFactory, proxy_factory: ProxyFactory
) -> None:
    """Behind a gate the replica only drops its exchange: the gate interrupts its sd-webui
    (an interrupt from the replica could land on another sender's job)."""
    cluster = await gated_pods(1)
    (proxy,) = await peered(proxy_factory, cluster.urls, 1)
    job = asyncio.create_task(proxy.client.post(TXT2IMG, json=gen_body(2000)))
    await eventually(lambda: _inflight(cluster, 0, 1), what="the generation started")
    job.cancel()

    async def interrupted_once() -> bool:
        stats = await cluster.sims.stats(0)
        return bool(stats["interrupts_received"] == 1)

    await eventually(interrupted_once, what="the gate to interrupt sd-webui")
    await eventually(lambda: _inflight(cluster, 0, 0), what="the gate's slot freed")
    async with proxy.client.post(TXT2IMG, json=gen_body(2)) as resp:
        assert resp.status == 200
    assert (await cluster.sims.stats(0))["interrupts_received"] == 1, "only the gate's"
    await proxy.wait_idle()


async def _strip_continue_relay(target: str) -> tuple[asyncio.Server, str]:
    """A TCP relay to ``target`` that swallows every ``100 Continue`` interim answer (a
    broken middlebox): the gate says continue, the sender never hears it."""
    host, port = target.removeprefix("http://").rsplit(":", 1)

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, strip: bool) -> None:
        try:
            while chunk := await reader.read(65536):
                if strip:  # loopback: the gate writes the interim answer in one piece
                    chunk = chunk.replace(b"HTTP/1.1 100 Continue\r\n\r\n", b"")
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(
            pump(reader, up_writer, strip=False), pump(up_reader, writer, strip=True)
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_a_gate_whose_100_continue_never_arrives_costs_a_bounded_wait(
    gated_pods: GatedFactory, proxy_factory: ProxyFactory
) -> None:
    """A large body goes to a gated pod with Expect: 100-continue; if the 100 never
    arrives, the job goes elsewhere after --connect-timeout-s, not after the backend
    timeout, and nothing reached the silent pod's sd-webui."""
    cluster = await gated_pods(2, step_ms=1.0)
    server, relayed = await _strip_continue_relay(cluster.urls[0])
    async with server:
        proxy = await proxy_factory([relayed, cluster.urls[1]], "--connect-timeout-s", "1")

        async def gated() -> bool:
            return all(p["mode"] == "gated" for p in (await proxy.status())["pods"])

        await eventually(gated, what="both pods seen through their gates")
        big = gen_body(2, init_images=["A" * (200 * 1024)])  # over the Expect threshold
        loop = asyncio.get_running_loop()
        served_by = []
        for _ in range(4):
            start = loop.time()
            async with proxy.client.post("/sdapi/v1/img2img", json=big) as resp:
                assert resp.status == 200, await resp.text()
                served_by.append(resp.headers["X-Sdproxy-Pod"])
            assert loop.time() - start < 10, "bounded by the connect timeout, not 1800 s"
        assert set(served_by) == {cluster.urls[1].removeprefix("http://")}, served_by
        assert (await cluster.sims.stats(0))["completed"] == 0
        assert (await cluster.sims.stats(1))["completed"] == 4
        await proxy.wait_idle()
