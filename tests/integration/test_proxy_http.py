"""Integration: HTTP edge cases a production front must get right.

Dot segments cannot smuggle an admin route past the classifier; a pod whose connect times
out is skipped like a refusing one; HEAD keeps the pod's Content-Length; an HTTP/1.0
client gets an unchunked answer; unknown /-/ paths are the proxy's own 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from tests.integration.conftest import TXT2IMG, ProxyFactory, SimFactory, gen_body

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "path",
    [
        "/sdapi/v1/x/../server-kill",
        "/sdapi/v1/x/%2e%2e/server-kill",
        "/sdapi/v1/./train/embedding",
        "//sdapi/v1/server-kill",
    ],
)
async def test_dot_segments_cannot_smuggle_an_admin_route(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, path: str
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    async with proxy.client.post(URL(proxy.url + path, encoded=True), json={}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "bad_request"
    assert (await sims.stats(0))["completed"] == 0


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """A listener whose accept queue is full: connects to it time out (a dead node)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(3):  # fill the backlog; later SYNs are dropped
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(server.getsockname())
        fillers.append(filler)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        for filler in fillers:
            filler.close()
        server.close()


async def test_a_pod_whose_connect_times_out_is_skipped(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    with blackhole() as dead:
        proxy = await proxy_factory([dead, *sims.urls], "--connect-timeout-s", "0.5")
        for _ in range(4):
            async with proxy.client.post(TXT2IMG, json=gen_body(2)) as resp:
                assert resp.status == 200, await resp.text()
        pods = {p["url"]: p for p in (await proxy.status())["pods"]}
        assert pods[dead]["errors"] == 0, "not the pod's answer that failed: never sent"
    assert (await sims.stats(0))["completed"] == 4
    await proxy.wait_idle()


@contextlib.asynccontextmanager
async def backend(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """A one-route aiohttp backend (GET also answers HEAD)."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_head_keeps_the_pods_content_length(proxy_factory: ProxyFactory) -> None:
    async def models(request: web.Request) -> web.Response:
        return web.json_response([{"title": "a.safetensors", "model_name": "a"}] * 5)

    async with backend(models) as url, aiohttp.ClientSession() as direct:
        async with direct.head(url + "/sdapi/v1/sd-models") as resp:
            expected = resp.headers["Content-Length"]
        proxy = await proxy_factory([url])
        async with proxy.client.head("/sdapi/v1/sd-models") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == expected != "0"


async def test_http10_client_gets_an_unchunked_streamed_answer(
    proxy_factory: ProxyFactory,
) -> None:
    async def streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"x" * 300_000)  # over the proxy's one-write size, no length
        await response.write_eof()
        return response

    async with backend(streamed) as url:
        proxy = await proxy_factory([url])
        host, port = proxy.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /sdapi/v1/sd-models HTTP/1.0\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), timeout=10)  # ends at close
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0]
    assert b"chunked" not in head.lower()
    assert body == b"x" * 300_000


async def test_unknown_proxy_endpoints_are_not_forwarded(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    async with proxy.client.post("/-/nope", json=gen_body(2)) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"
    assert (await sims.stats(0))["completed"] == 0
