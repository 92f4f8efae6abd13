"""Integration: heavy requests through the proxy to simulated pods on loopback.

Spreading over free pods, one shared FIFO queue when all are busy, the X-Sdproxy-* headers,
work conservation sampled from /-/status, and a 10 MiB img2img streamed both ways.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from multidict import CIMultiDict

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


async def generate(proxy: ProxyUnderTest, steps: int) -> tuple[float, CIMultiDict[str], Any]:
    """(loop time when done, response headers, JSON) of a txt2img that must succeed."""
    async with proxy.client.post(TXT2IMG, json=gen_body(steps)) as resp:
        data = await resp.json()
        assert resp.status == 200, data
        return asyncio.get_running_loop().time(), CIMultiDict(resp.headers), data


async def test_heavy_requests_spread_over_free_pods(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(3)
    proxy = await proxy_factory(sims.urls)
    results = await asyncio.gather(*(generate(proxy, 30) for _ in range(3)))
    pods = {headers["X-Sdproxy-Pod"] for _, headers, _ in results}
    assert len(pods) == 3, "three free pods take three requests at once"
    for _, headers, _ in results:
        assert float(headers["X-Sdproxy-Queue-Ms"]) >= 0
        assert headers["X-Request-Id"]
    stats = await sims.all_stats()
    assert [s["completed"] for s in stats] == [1, 1, 1]
    assert all(s["heavy_inflight_max"] == 1 for s in stats)
    await proxy.wait_idle()


async def test_queue_is_shared_fifo_and_work_conserving(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(2)
    proxy = await proxy_factory(sims.urls)
    violations: list[dict[str, Any]] = []
    stop = asyncio.Event()

    async def watch() -> None:
        """Whenever something waits in the queue, every pod must be at its limit."""
        while not stop.is_set():
            status = await proxy.status()
            if status["queue"]["depth"] and any(p["inflight"] < p["limit"] for p in status["pods"]):
                violations.append(status)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    first = [asyncio.create_task(generate(proxy, 40)) for _ in range(2)]
    await proxy.wait_inflight(2)
    queued = []
    for depth in (1, 2, 3):  # enqueue one at a time so the arrival order is known
        queued.append(asyncio.create_task(generate(proxy, 40)))
        await proxy.wait_queue(depth)
    status = await proxy.status()
    assert status["queue"]["oldest_wait_s"] >= 0
    assert [p["inflight"] for p in status["pods"]] == [1, 1]
    done = await asyncio.gather(*first, *queued)
    stop.set()
    await watcher
    assert not violations, violations[0]

    (_, h_a, _), (_, h_b, _) = done[:2]
    assert {h_a["X-Sdproxy-Pod"], h_b["X-Sdproxy-Pod"]} == {
        p["id"] for p in (await proxy.status())["pods"]
    }
    c, d, e = done[2:]
    waits = [float(h["X-Sdproxy-Queue-Ms"]) for _, h, _ in (c, d, e)]
    assert all(w > 0 for w in waits), waits
    # C and D take the two slots A and B free; E (last in) waits for one of them
    assert e[0] > max(c[0], d[0]), "the last request in was served last"
    assert waits[2] > waits[0] and waits[2] > waits[1]
    stats = await sims.all_stats()
    assert sum(s["completed"] for s in stats) == 5
    assert all(s["heavy_inflight_max"] == 1 for s in stats)
    await proxy.wait_idle()


def big_image(mib: float) -> str:
    """A base64 string of about ``mib`` MiB (random, so nothing compresses it)."""
    raw = random.Random(3).randbytes(int(mib * 1024 * 1024 * 3 / 4))
    return base64.b64encode(raw).decode()


async def test_ten_mib_img2img_streams_through_intact(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    image = big_image(10)
    body = {
        "init_images": [image],
        "include_init_images": True,
        "steps": 5,
        "send_images": False,
        "prompt": "a bigger cat",
    }
    data = io.BytesIO(json.dumps(body).encode())  # aiohttp warns about big raw bytes
    headers = {"Content-Type": "application/json"}
    async with proxy.client.post("/sdapi/v1/img2img", data=data, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        data = await resp.json()
    assert data["parameters"]["init_images"] == [image]
    assert resp.headers["X-Sdproxy-Pod"]
    assert (await sims.stats(0))["completed"] == 1
    await proxy.wait_idle()


async def test_chunked_img2img_upload_streams_through(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    """No Content-Length: the proxy peeks at the prefix and streams the rest."""
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    image = big_image(3)
    payload = (
        b'{"steps": 3, "send_images": false, "include_init_images": true, "init_images": ["'
        + image.encode()
        + b'"]}'
    )

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 64 * 1024):
            yield payload[start : start + 64 * 1024]
            await asyncio.sleep(0)

    headers = {"Content-Type": "application/json"}
    async with proxy.client.post("/sdapi/v1/img2img", data=chunks(), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        data = await resp.json()
    assert data["parameters"]["init_images"] == [image]
    await proxy.wait_idle()


async def test_no_pod_ever_exceeds_its_limit_under_a_burst(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(3)
    proxy = await proxy_factory(sims.urls)
    rng = random.Random(11)
    steps = [rng.randint(2, 15) for _ in range(40)]
    results = await asyncio.gather(*(generate(proxy, n) for n in steps))
    assert len(results) == 40
    stats = await sims.all_stats()
    assert sum(s["completed"] for s in stats) == 40
    assert all(s["heavy_inflight_max"] == 1 for s in stats), stats
    assert all(s["completed"] > 0 for s in stats), "every pod took work"
    await proxy.wait_idle()
    await eventually(
        lambda: _zero_inflight(sims), what="pods to report nothing in flight afterwards"
    )


async def _zero_inflight(sims: SimCluster) -> bool:
    return all(s["heavy_inflight"] == 0 for s in await sims.all_stats())


async def test_a_slow_client_does_not_hold_the_pod_once_it_has_answered(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    """The proxy reads a finished pod's response ahead of a client that reads slowly
    (bounded read-ahead), so the slot frees when the POD is done, not the client."""
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    body = json.dumps(gen_body(2, batch_size=8, send_images=True)).encode()  # ~5 MB answer
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # a slow mobile client
    sock.setblocking(False)
    host, port = proxy.url.removeprefix("http://").split(":")
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    head = f"POST {TXT2IMG} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    try:
        status_line = await asyncio.wait_for(reader.readline(), timeout=20)
        assert b" 200 " in status_line
        # the slow client reads nothing more; the next job must still run on the pod
        _, headers, _ = await asyncio.wait_for(generate(proxy, 2), timeout=20)
        assert headers["X-Sdproxy-Pod"]
        length = 0
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        answer = json.loads(await reader.readexactly(length))
    finally:
        writer.close()
    assert len(answer["images"]) == 8
    assert (await sims.stats(0))["heavy_inflight_max"] == 1
    await proxy.wait_idle()
