"""Integration: light requests, options classification, operational endpoints, request ids.

Light reads bypass the slots and stay fast while every pod runs long generations (the
proxy holds the queue, so the pods' worker pools are never exhausted); POST options is
heavy only when it changes sd_model_checkpoint; /-/healthz, /-/readyz and /-/status
describe the proxy; X-Request-Id is generated or propagated end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from tests.integration.conftest import (
    TXT2IMG,
    ProxyFactory,
    ProxyUnderTest,
    SimFactory,
    gen_body,
)

pytestmark = pytest.mark.timeout(60)

CKPT_A, CKPT_B = "a.safetensors", "b.safetensors"


async def heavy(proxy: ProxyUnderTest, steps: int) -> int:
    async with proxy.client.post(TXT2IMG, json=gen_body(steps)) as resp:
        await resp.read()
        return resp.status


async def timed_get(proxy: ProxyUnderTest, path: str, **kwargs: Any) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with proxy.client.get(path, **kwargs) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
    return loop.time() - start


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def test_light_requests_and_progress_stay_fast_while_every_pod_is_busy(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    # a small worker pool: were the queued requests inside the pods, it would be exhausted
    sims = await sim_pods(2, threads=4)
    proxy = await proxy_factory(sims.urls)
    jobs = [asyncio.create_task(heavy(proxy, 300)) for _ in range(12)]
    await proxy.wait_queue(10)
    light: list[float] = []
    progress: list[float] = []
    for _ in range(40):
        light.append(await timed_get(proxy, "/sdapi/v1/sd-models"))
        progress.append(await timed_get(proxy, "/sdapi/v1/progress"))
    status = await proxy.status()
    assert status["queue"]["depth"] == 10 and status["inflight"] == 2, "pods stayed busy"
    for stats in await sims.all_stats():
        assert stats["heavy_inflight"] == 1 and stats["heavy_waiting"] == 0
        assert stats["threads_in_use"] < stats["threads"]
    # the real target (20 ms) is a benchmark; this bound only catches light calls queued
    # behind generations (which would take >= 3 s here)
    assert p99(light) < 0.25, sorted(light)[-5:]
    assert p99(progress) < 0.25, sorted(progress)[-5:]
    for job in jobs:
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)
    await proxy.wait_idle()


async def test_options_with_a_checkpoint_is_heavy_without_it_light(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1, checkpoints=(CKPT_A, CKPT_B), switch_s=0.05)
    proxy = await proxy_factory(sims.urls)
    running = asyncio.create_task(heavy(proxy, 100))
    await proxy.wait_inflight(1)

    async with proxy.client.post("/sdapi/v1/options", json={"samples_format": "jpg"}) as resp:
        assert resp.status == 200, await resp.text()
        assert "X-Sdproxy-Queue-Ms" not in resp.headers, "light: no slot, no queue"
    assert (await proxy.status())["inflight"] == 1

    async def switch() -> tuple[int, str]:
        body = {"sd_model_checkpoint": CKPT_B}
        async with proxy.client.post("/sdapi/v1/options", json=body) as resp:
            await resp.read()
            return resp.status, resp.headers["X-Sdproxy-Queue-Ms"]

    switching = asyncio.create_task(switch())
    await proxy.wait_queue(1)  # it waits for the busy pod like any generation
    assert not switching.done()
    assert await running == 200
    status, queue_ms = await switching
    assert status == 200 and float(queue_ms) > 0
    stats = await sims.stats(0)
    assert stats["default_checkpoint"].startswith(CKPT_B) and stats["heavy_inflight_max"] == 1
    async with proxy.client.get("/sdapi/v1/options") as resp:
        assert (await resp.json())["samples_format"] == "jpg"
    await proxy.wait_idle()


async def test_operational_endpoints(sim_pods: SimFactory, proxy_factory: ProxyFactory) -> None:
    sims = await sim_pods(2)
    proxy = await proxy_factory(sims.urls)
    async with proxy.client.get("/-/healthz") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
    async with proxy.client.get("/-/readyz") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ready"

    jobs = [asyncio.create_task(heavy(proxy, 80)) for _ in range(3)]
    await proxy.wait_queue(1)
    await asyncio.sleep(0.05)
    status = await proxy.status()
    assert status["inflight"] == 2
    assert status["queue"]["depth"] == 1
    assert status["queue"]["oldest_wait_s"] > 0
    assert status["queue"]["max"] == 1000
    assert status["shutting_down"] is False
    assert sorted(p["url"] for p in status["pods"]) == sorted(sims.urls)
    for pod in status["pods"]:
        assert pod["state"] == "ready"
        assert pod["inflight"] == 1 and pod["limit"] == 1
        assert pod["ejected"] is False
    assert await asyncio.gather(*jobs) == [200, 200, 200]
    await proxy.wait_idle()
    status = await proxy.status()
    assert sum(p["completed"] for p in status["pods"]) == 3
    assert status["queue"]["oldest_wait_s"] == 0


@contextlib.asynccontextmanager
async def echo_backend() -> AsyncIterator[str]:
    """A backend that answers every request with the headers it received (lower-cased)."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"headers": {k.lower(): v for k, v in request.headers.items()}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_request_id_is_generated_or_propagated_to_the_pod(
    proxy_factory: ProxyFactory,
) -> None:
    async with echo_backend() as url:
        proxy = await proxy_factory([url])
        async with proxy.client.get("/sdapi/v1/samplers") as resp:
            generated = resp.headers["X-Request-Id"]
            seen = (await resp.json())["headers"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)
        assert seen["x-request-id"] == generated
        assert seen["x-forwarded-for"] == "127.0.0.1"

        headers = {"X-Request-Id": "client-chosen-id", "Connection": "keep-alive"}
        async with proxy.client.post(TXT2IMG, json={}, headers=headers) as resp:
            assert resp.headers["X-Request-Id"] == "client-chosen-id"
            seen = (await resp.json())["headers"]
        assert seen["x-request-id"] == "client-chosen-id"
        assert seen.get("connection", "").lower() != "keep-alive", "hop-by-hop dropped"

        async with proxy.client.post("/sdapi/v1/server-stop", headers=headers) as resp:
            assert resp.status == 403
            assert resp.headers["X-Request-Id"] == "client-chosen-id"
        await proxy.wait_idle()


async def test_a_cookie_a_pod_sets_for_one_caller_never_reaches_another(
    proxy_factory: ProxyFactory,
) -> None:
    """The proxy's client session is shared: it must not keep a cookie jar (a backend
    named by host name would otherwise receive caller A's cookie on caller B's request)."""

    async def set_cookie(request: web.Request) -> web.Response:
        response = web.json_response({"cookie": request.headers.get("Cookie")})
        if request.query.get("set"):
            response.set_cookie("pod_session", "user-A-secret")
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", set_cookie)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        proxy = await proxy_factory([f"http://localhost:{runner.addresses[0][1]}"])
        async with proxy.client.get("/sdapi/v1/options?set=1") as resp:
            assert resp.status == 200
        proxy.client.cookie_jar.clear()  # caller B has no cookies of its own
        async with proxy.client.get("/sdapi/v1/options") as resp:
            assert (await resp.json())["cookie"] is None
    finally:
        await runner.cleanup()
