"""Integration: the proxy forwards the client's ``Accept-Encoding`` as it is and never
decodes or re-encodes an answer.

The simulated pods compress like sd-webui (gzip from 1000 bytes when asked), so a client
that asked for nothing must get plain bytes, and one that asked for gzip the pod's own
gzip bytes. A recording backend shows what reached the pod.
"""

from __future__ import annotations

import contextlib
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from tests.integration.conftest import TXT2IMG, ProxyFactory, SimFactory

pytestmark = pytest.mark.timeout(60)

OPTIONS = "/sdapi/v1/options"
NO_ENCODING = ("Accept-Encoding",)


@contextlib.asynccontextmanager
async def recording_backend() -> AsyncIterator[tuple[str, list[CIMultiDictProxy[str]]]]:
    """A pod that answers ``{}`` to everything and keeps each request's headers."""
    seen: list[CIMultiDictProxy[str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers)
        await request.read()
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        await runner.cleanup()


async def raw(
    url: str, method: str, path: str, *, accept: str | None, body: Any = None
) -> tuple[int, bytes, dict[str, str]]:
    """One request with exactly ``accept`` as Accept-Encoding (None: no such header)."""
    headers = {} if accept is None else {"Accept-Encoding": accept}
    async with (
        aiohttp.ClientSession(url, auto_decompress=False) as session,
        session.request(
            method, path, json=body, headers=headers, skip_auto_headers=NO_ENCODING
        ) as resp,
    ):
        return resp.status, await resp.read(), dict(resp.headers)


@pytest.mark.parametrize(
    ("method", "path"), [("GET", OPTIONS), ("POST", TXT2IMG)], ids=["light", "heavy"]
)
@pytest.mark.parametrize("accept", [None, "gzip", "br;q=1.0, identity;q=0.5"])
async def test_the_pod_gets_exactly_the_clients_accept_encoding(
    proxy_factory: ProxyFactory, method: str, path: str, accept: str | None
) -> None:
    async with recording_backend() as (url, seen):
        proxy = await proxy_factory([url])
        seen.clear()  # whatever discovery or warm-up sent
        body = {"steps": 1} if method == "POST" else None
        status, _, _ = await raw(proxy.url, method, path, accept=accept, body=body)
        assert status == 200
        (request,) = [h for h in seen if h.get("X-Request-Id")]
        assert request.getall("Accept-Encoding", []) == ([] if accept is None else [accept])


async def test_a_client_that_asked_for_no_encoding_gets_plain_bytes(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    status, body, headers = await raw(proxy.url, "GET", OPTIONS, accept=None)
    assert status == 200
    assert "Content-Encoding" not in headers and "Vary" not in headers
    assert len(json.loads(body)) > 300
    image = {"steps": 1, "width": 64, "height": 64}
    status, body, headers = await raw(proxy.url, "POST", TXT2IMG, accept=None, body=image)
    assert status == 200 and "Content-Encoding" not in headers
    assert len(json.loads(body)["images"]) == 1
    await proxy.wait_idle()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        pytest.param("GET", OPTIONS, None, id="small-light-answer"),
        pytest.param("POST", TXT2IMG, {"steps": 1, "seed": 3}, id="streamed-512px-image"),
    ],
)
async def test_a_client_that_asked_for_gzip_gets_the_pods_gzip_bytes_untouched(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, method: str, path: str, body: Any
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    _, direct, _ = await raw(sims.urls[0], method, path, accept="gzip", body=body)
    status, relayed, headers = await raw(proxy.url, method, path, accept="gzip", body=body)
    assert status == 200
    assert headers["Content-Encoding"] == "gzip" and headers["Vary"] == "Accept-Encoding"
    assert int(headers["Content-Length"]) == len(relayed)
    document = json.loads(gzip.decompress(relayed))
    if method == "GET":
        assert relayed == direct  # the very bytes the pod sent
        assert len(document) > 300
    else:  # the same generation twice: equal but for timings and the job's timestamp
        assert len(relayed) > 256 * 1024  # over forward.SMALL_BODY: the streaming relay
        assert document["images"] == json.loads(gzip.decompress(direct))["images"]
    await proxy.wait_idle()
