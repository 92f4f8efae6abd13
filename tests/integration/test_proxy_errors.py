"""Integration: every way a request is refused answers a clear JSON error on real sockets.

queue_full, queue_timeout, no_backends, a refused pod retried elsewhere, a pod that dies
after the request was sent (502), bodies over --max-body-mb (413, with Content-Length and
chunked) and admin routes (403 unless --allow-admin). After each, no slot is left held.
A body nested too deep to parse is not the proxy's error: it is forwarded, and the pod
answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import free_port
from tests.integration.conftest import (
    TXT2IMG,
    GatedFactory,
    ProxyFactory,
    ProxyUnderTest,
    SimFactory,
    gen_body,
)

pytestmark = pytest.mark.timeout(60)

OPTIONS = "/sdapi/v1/options"


async def post(
    proxy: ProxyUnderTest, path: str, body: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with proxy.client.post(path, json=body) as resp:
        return resp.status, await resp.json(), resp


def assert_error(status: int, data: Any, *, expected_status: int, code: str) -> None:
    assert status == expected_status, data
    assert data["error"] == code, data
    assert isinstance(data["detail"], str) and data["detail"], data


async def test_queue_full_answers_503_with_retry_after(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls, "--max-queue", "1")
    running = asyncio.create_task(post(proxy, TXT2IMG, gen_body(60)))
    await proxy.wait_inflight(1)
    queued = asyncio.create_task(post(proxy, TXT2IMG, gen_body(5)))
    await proxy.wait_queue(1)
    status, data, resp = await post(proxy, TXT2IMG, gen_body(5))
    assert_error(status, data, expected_status=503, code="queue_full")
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.headers["X-Request-Id"]
    assert [(await t)[0] for t in (running, queued)] == [200, 200]
    assert (await sims.stats(0))["completed"] == 2
    await proxy.wait_idle()


async def test_queue_timeout_answers_503(sim_pods: SimFactory, proxy_factory: ProxyFactory) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls, "--queue-timeout-s", "0.3")
    running = asyncio.create_task(post(proxy, TXT2IMG, gen_body(150)))
    await proxy.wait_inflight(1)
    loop = asyncio.get_running_loop()
    start = loop.time()
    status, data, _ = await post(proxy, TXT2IMG, gen_body(5))
    assert_error(status, data, expected_status=503, code="queue_timeout")
    assert loop.time() - start >= 0.3
    assert (await running)[0] == 200
    assert (await sims.stats(0))["completed"] == 1, "the timed-out request never ran"
    await proxy.wait_idle()


async def test_no_backends_when_every_static_backend_refuses(
    proxy_factory: ProxyFactory,
) -> None:
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    proxy = await proxy_factory(dead, "--connect-timeout-s", "2")
    loop = asyncio.get_running_loop()
    start = loop.time()
    status, data, resp = await post(proxy, TXT2IMG, gen_body(5))
    assert_error(status, data, expected_status=503, code="no_backends")
    assert int(resp.headers["Retry-After"]) >= 1
    assert loop.time() - start < 5.0, "refused connections fail fast"
    # both pods are now ejected: the next request is refused without trying them
    status, data, _ = await post(proxy, TXT2IMG, gen_body(5))
    assert_error(status, data, expected_status=503, code="no_backends")
    pods = (await proxy.status())["pods"]
    assert all(p["ejected"] for p in pods), pods
    await proxy.wait_idle()


async def test_refused_connection_is_retried_on_another_pod(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = await proxy_factory([dead, *sims.urls])
    for _ in range(3):
        status, data, resp = await post(proxy, TXT2IMG, gen_body(3))
        assert status == 200, data
        assert resp.headers["X-Sdproxy-Pod"] == sims.urls[0].removeprefix("http://")
    assert (await sims.stats(0))["completed"] == 3
    pods = {p["url"]: p for p in (await proxy.status())["pods"]}
    assert pods[dead]["ejected"]
    await proxy.wait_idle()


async def test_pod_dying_mid_generation_answers_502_and_frees_the_slot(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(2)
    proxy = await proxy_factory(sims.urls)
    doomed = asyncio.create_task(post(proxy, TXT2IMG, gen_body(600)))
    await proxy.wait_inflight(1)
    victim = next(p for p in (await proxy.status())["pods"] if p["inflight"])
    index = sims.urls.index(victim["url"])
    await sims.kill(index)  # the sim's server closes; the running request is cut off
    status, data, _ = await doomed
    assert_error(status, data, expected_status=502, code="backend_error")
    await proxy.wait_idle()
    pods = {p["url"]: p for p in (await proxy.status())["pods"]}
    assert pods[victim["url"]]["errors"] == 1
    # the surviving pod still serves; the dead one is found out by connect and skipped
    for _ in range(2):
        status, data, _ = await post(proxy, TXT2IMG, gen_body(3))
        assert status == 200, data
    await proxy.wait_idle()


@contextlib.asynccontextmanager
async def raw_backend(reply: bytes) -> AsyncIterator[str]:
    """A backend that reads the request head, writes ``reply`` verbatim and hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


def hang_up_backend() -> contextlib.AbstractAsyncContextManager[str]:
    """Closes the connection without answering."""
    return raw_backend(b"")


def truncating_backend() -> contextlib.AbstractAsyncContextManager[str]:
    """Answers 200 with Content-Length 100000, sends 10 bytes, hangs up."""
    return raw_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n0123456789")


async def test_backend_closing_after_the_request_was_sent_answers_502(
    proxy_factory: ProxyFactory,
) -> None:
    async with hang_up_backend() as url:
        proxy = await proxy_factory([url])
        status, data, _ = await post(proxy, TXT2IMG, gen_body(3))
        assert_error(status, data, expected_status=502, code="backend_error")
        await proxy.wait_idle()


async def test_body_over_the_limit_with_content_length_is_413(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls, "--max-body-mb", "1")
    body = io.BytesIO(b'{"prompt": "' + b"x" * (1536 * 1024) + b'"}')
    headers = {"Content-Type": "application/json"}
    async with proxy.client.post("/sdapi/v1/img2img", data=body, headers=headers) as resp:
        status, data = resp.status, await resp.json()
    assert_error(status, data, expected_status=413, code="body_too_large")
    assert (await sims.stats(0))["completed"] == 0
    await proxy.wait_idle()


async def test_chunked_body_over_the_limit_is_413(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls, "--max-body-mb", "1")

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(48):  # 1.5 MiB in 32 KiB pieces, no Content-Length
            yield b"x" * (32 * 1024)
            await asyncio.sleep(0)
        yield b'"}'

    headers = {"Content-Type": "application/json"}
    async with proxy.client.post("/sdapi/v1/img2img", data=chunks(), headers=headers) as resp:
        status, data = resp.status, await resp.json()
    assert_error(status, data, expected_status=413, code="body_too_large")
    assert (await sims.stats(0))["completed"] == 0
    await proxy.wait_idle()
    (pod,) = (await proxy.status())["pods"]
    assert pod["errors"] == 0, "a client's oversized body is not the pod's failure"
    # the pod is still healthy and serves the next request
    status, data, _ = await post(proxy, TXT2IMG, gen_body(2))
    assert status == 200, data


@pytest.mark.parametrize(
    "path", ["/sdapi/v1/server-kill", "/sdapi/v1/train/embedding", "/sdapi/v1/unload-checkpoint"]
)
async def test_admin_routes_are_forbidden_by_default(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, path: str
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    status, data, resp = await post(proxy, path, {})
    assert_error(status, data, expected_status=403, code="forbidden_route")
    assert "X-Sdproxy-Pod" not in resp.headers


async def test_admin_routes_reach_a_pod_with_allow_admin(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls, "--allow-admin")
    status, data, resp = await post(proxy, "/sdapi/v1/server-kill", {})
    # the simulator has no server-kill route: its 404 proves the request reached it
    assert status == 404, data
    assert resp.headers["X-Sdproxy-Pod"] == sims.urls[0].removeprefix("http://")
    await proxy.wait_idle()


@pytest.mark.parametrize("path", ["/sdapi/v1/txt2img", "/sdapi/v1/sd-models"])
async def test_response_breaking_off_mid_body_cuts_the_client_off(
    proxy_factory: ProxyFactory, path: str
) -> None:
    """Too late for a JSON error: the client must see a truncated body, never a short one
    that looks complete; the slot is freed and the pod's error counted."""
    async with truncating_backend() as url:
        proxy = await proxy_factory([url])
        method = "POST" if path.endswith("txt2img") else "GET"
        kwargs: dict[str, Any] = {"json": gen_body(3)} if method == "POST" else {}
        async with proxy.client.request(method, path, **kwargs) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        await proxy.wait_idle()
        body, _ = proxy.services.metrics.exposition()
        assert b'sdproxy_backend_errors_total{kind="broke_off"' in body


async def test_a_pod_that_broke_an_exchange_rests_before_it_gets_work_again(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    """After a 502 (the pod reset an exchange it had received) the next jobs go to the
    healthy pod, not back to the broken one as the most recently used."""
    sims = await sim_pods(1)
    async with hang_up_backend() as broken:
        proxy = await proxy_factory([broken, *sims.urls])
        statuses = []
        for _ in range(6):
            status, _body, _ = await post(proxy, TXT2IMG, gen_body(2))
            statuses.append(status)
        assert statuses.count(502) == 1, statuses
        assert statuses[statuses.index(502) + 1 :] == [200] * (5 - statuses.index(502))
        await proxy.wait_idle()


DEEP_BODIES = [
    pytest.param(b"[" * 1500, id="arrays"),
    pytest.param(b'{"a":' * 1500, id="objects"),  # json.loads: RecursionError at ~1000
]
DEEP_PATHS = [pytest.param(TXT2IMG, id="txt2img"), pytest.param(OPTIONS, id="options")]


async def post_raw(proxy: ProxyUnderTest, path: str, body: bytes) -> tuple[int, Any, str | None]:
    headers = {"Content-Type": "application/json"}
    async with proxy.client.post(path, data=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers.get("X-Sdproxy-Pod")


def assert_forwarded_to_the_pod(answer: tuple[int, Any, str | None], pods: list[str]) -> None:
    """The pod's own answer (FastAPI's 400 for a body json cannot parse), not the proxy's."""
    status, data, pod = answer
    assert (status, data["detail"]) == (400, "There was an error parsing the body"), data
    assert pod in [url.removeprefix("http://") for url in pods]


def assert_nothing_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


@pytest.mark.parametrize("body", DEEP_BODIES)
@pytest.mark.parametrize("path", DEEP_PATHS)
async def test_a_deeply_nested_body_is_forwarded_not_a_500(
    sim_pods: SimFactory,
    proxy_factory: ProxyFactory,
    caplog: pytest.LogCaptureFixture,
    path: str,
    body: bytes,
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    assert_forwarded_to_the_pod(await post_raw(proxy, path, body), sims.urls)
    assert_nothing_logged_as_an_error(caplog)
    await proxy.wait_idle()


@pytest.mark.parametrize("body", DEEP_BODIES)
async def test_a_deeply_nested_options_body_passes_a_pod_gate(
    gated_pods: GatedFactory,
    proxy_factory: ProxyFactory,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
) -> None:
    """The gate reads POST options bodies too (a checkpoint change takes a slot)."""
    cluster = await gated_pods(1)
    proxy = await proxy_factory(cluster.urls)
    assert_forwarded_to_the_pod(await post_raw(proxy, OPTIONS, body), cluster.urls)
    assert_nothing_logged_as_an_error(caplog)
    await proxy.wait_idle()
