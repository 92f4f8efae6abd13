"""Faults on the pod side: garbage and truncated HTTP, a pod killed mid-generation.

For each: every request is answered (a clear JSON error at worst), the proxy's slots are
all free afterwards, and the other pod keeps serving.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.integration.conftest import ProxyFactory, SimFactory, gen_body
from tests.integration.test_proxy_errors import raw_backend

pytestmark = pytest.mark.timeout(60)

GARBAGE = {
    "not-http": b"HELLO THERE\r\n\r\n",
    "bad-status": b"HTTP/1.1 abc OK\r\n\r\n",
    "head-cut-off": b"HTTP/1.1 200 OK\r\nContent-Le",
    "body-cut-off": b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"images": [',
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
}


@pytest.mark.parametrize("reply", list(GARBAGE), ids=list(GARBAGE))
@pytest.mark.parametrize("path", ["/sdapi/v1/txt2img", "/sdapi/v1/sd-models"])
async def test_a_pod_answering_garbage_gets_a_clear_error_and_frees_its_slot(
    proxy_factory: ProxyFactory, reply: str, path: str
) -> None:
    async with raw_backend(GARBAGE[reply]) as url:
        proxy = await proxy_factory([url], "--health-interval-s", "0")
        method = "POST" if path.endswith("txt2img") else "GET"
        kwargs: dict[str, Any] = {"json": gen_body(2)} if method == "POST" else {}
        try:
            async with proxy.client.request(method, path, **kwargs) as resp:
                body = await resp.read()
                if resp.status != 200:  # a clear error, never a bare 500
                    assert resp.status == 502, (resp.status, body)
                    assert b'"backend_error"' in body
        except Exception as exc:  # a response cut off after its head reached the client
            assert "Payload" in type(exc).__name__ or "Disconnected" in type(exc).__name__, exc
        await proxy.wait_idle()
        (pod,) = (await proxy.status())["pods"]
        if method == "POST":  # a broken generation counts against the pod, which rests
            assert pod["errors"] == 1 and pod["out"] == "ejected", pod


async def test_a_pod_killed_mid_generation_fails_its_job_and_the_rest_is_served(
    proxy_factory: ProxyFactory, sim_pods: SimFactory
) -> None:
    sims = await sim_pods(2)
    proxy = await proxy_factory(sims.urls)

    async def one(steps: int) -> int:
        async with proxy.client.post("/sdapi/v1/txt2img", json=gen_body(steps)) as resp:
            await resp.read()
            return resp.status

    long_jobs = [asyncio.create_task(one(400)) for _ in range(2)]
    await proxy.wait_inflight(2)
    queued = [asyncio.create_task(one(3)) for _ in range(4)]
    await proxy.wait_queue(4)
    await sims.kill(0)
    statuses = await asyncio.gather(*long_jobs, *queued)
    assert statuses.count(502) <= 1, statuses  # the job the dead pod was running
    assert statuses.count(200) >= 5, statuses
    assert set(statuses) <= {200, 502}, statuses
    assert (await sims.stats(1))["heavy_inflight_max"] == 1
    await proxy.wait_idle()
