"""Integration: a heavy request's body is received whole before it takes a GPU slot — on
real loopback sockets, with raw clients that stall, trickle, break their chunking or
hang up mid-upload.

Nothing a client does while uploading holds a slot or counts against a pod: a stalled
upload waits alone (another client's txt2img is served at once), one that does not
finish within ``--client-body-timeout-s`` is answered ``408 body_timeout``, a malformed
chunked body ``400 bad_request`` (or, with aiohttp's C parser, which does not report it,
the 408). A large body still arrives at the pod byte for byte,
from the proxy's spool, and is replayed from it when a gate answers pod_busy.
``Expect: 100-continue`` is the proxy's business with its client: the pod never sees the
client's, and a gated pod that never answers the proxy's own keeps no slot once the
client left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web_protocol
import pytest
from aiohttp import web
from aiohttp.http_parser import HttpRequestParserPy
from multidict import CIMultiDictProxy

from tests.integration.conftest import (
    DEADLINE_S,
    TXT2IMG,
    ProxyFactory,
    ProxyUnderTest,
    SimFactory,
    eventually,
    gen_body,
)

pytestmark = pytest.mark.timeout(60)

IMG2IMG = "/sdapi/v1/img2img"
MIB = 1024 * 1024


# ---- raw clients ------------------------------------------------------------------------


@dataclass(kw_only=True)
class RawClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, timeout_s: float = DEADLINE_S) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of the proxy's answer (a Content-Length body)."""
        status_line = await asyncio.wait_for(self.reader.readline(), timeout_s)
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers: dict[str, str] = {}
        while (line := await asyncio.wait_for(self.reader.readline(), timeout_s)) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout_s)
        return int(status_line.split()[1]), headers, body

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def raw_upload(proxy: ProxyUnderTest, head: str) -> AsyncIterator[RawClient]:
    """A connection to the proxy that has sent ``head`` (request line and fields)."""
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    client = RawClient(reader=reader, writer=writer)
    try:
        await client.send(head.encode() + b"\r\n")
        yield client
    finally:
        client.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def upload_head(length: int | None, path: str = IMG2IMG) -> str:
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n"


def image_body(size: int) -> bytes:
    """An img2img JSON body of exactly ``size`` bytes (its init image is filler)."""
    opening, closing = b'{"steps": 2, "init_images": ["', b'"]}'
    filler = (os.urandom(size // 2).hex().encode() + b"0")[: size - len(opening) - len(closing)]
    return opening + filler + closing


async def pod_errors(proxy: ProxyUnderTest) -> list[int]:
    return [p["errors"] for p in (await proxy.status())["pods"]]


def backend_errors(proxy: ProxyUnderTest) -> bool:
    body, _ = proxy.services.metrics.exposition()
    return b"sdproxy_backend_errors_total{" in body


# ---- a client's upload holds no slot ----------------------------------------------------


async def test_stalled_uploads_hold_no_slot_and_another_clients_txt2img_is_served_at_once(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    """Two clients send 300 KB of a 1 MiB body and stop: both pods stay free."""
    sims = await sim_pods(2)
    proxy = await proxy_factory(sims.urls)
    async with (
        raw_upload(proxy, upload_head(MIB)) as one,
        raw_upload(proxy, upload_head(MIB)) as two,
    ):
        for stalled in (one, two):
            await stalled.send(b'{"steps": 2, "init_images": ["' + b"A" * 300_000)
        await asyncio.sleep(0.3)  # both are past the proxy's first read
        assert (await proxy.status())["inflight"] == 0
        async with proxy.client.post(TXT2IMG, json=gen_body(3)) as resp:
            assert resp.status == 200
            assert float(resp.headers["X-Sdproxy-Queue-Ms"]) < 500, "it never queued"
    # the stalled clients hung up: nothing of theirs ever reached a pod
    await proxy.wait_idle()
    assert await sims.total("completed") == 1
    assert await pod_errors(proxy) == [0, 0]
    assert not backend_errors(proxy)


async def test_spooled_bodies_stay_within_the_spool_budget(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    """--spool-max-mb 3: a stalled 2 MiB upload holds 2 MiB of it; another announced
    2 MiB is 503 spool_full at once (nothing read, nothing queued), a chunked one is
    refused when it grows past what is left; once the first is gone the budget is back."""
    sims = await sim_pods(1, step_ms=1.0)
    proxy = await proxy_factory(sims.urls, "--spool-max-mb", "3")
    async with raw_upload(proxy, upload_head(2 * MIB)) as holder:
        await holder.send(b'{"steps": 2, "init_images": ["' + b"A" * 300_000)

        async def holding() -> bool:
            return proxy.services.proxy is not None and (
                proxy.services.proxy.spool_budget.used == 2 * MIB
            )

        await eventually(holding, what="the stalled upload's share of the spool budget")
        async with raw_upload(proxy, upload_head(2 * MIB)) as refused:
            status, headers, answer = await refused.answer()
        assert status == 503, answer
        assert json.loads(answer)["error"] == "spool_full"
        assert int(headers["retry-after"]) >= 1
        async with raw_upload(proxy, upload_head(None)) as chunked:
            piece = b"A" * (256 * 1024)
            await chunked.send(b'%x\r\n{"steps": 2, "init_images": ["\r\n' % 30)
            with contextlib.suppress(ConnectionError):
                for _ in range(8):  # 2 MiB: past the 1 MiB left
                    await chunked.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            status, _headers, answer = await chunked.answer()
        assert (status, json.loads(answer)["error"]) == (503, "spool_full")
    # the holder hung up: its share is back, and a big body goes through
    await eventually(holding_nothing(proxy), what="the budget given back")
    status, data, _ = await _post(proxy, IMG2IMG, json.loads(image_body(2 * MIB)))
    assert status == 200, data
    await eventually(holding_nothing(proxy), what="the budget given back again")
    assert await sims.total("completed") == 1
    exposition, _ = proxy.services.metrics.exposition()
    assert b'sdproxy_rejected_total{reason="spool_full"} 2.0' in exposition


def holding_nothing(proxy: ProxyUnderTest) -> Any:
    async def check() -> bool:
        return proxy.services.proxy is not None and proxy.services.proxy.spool_budget.used == 0

    return check


async def test_a_trickling_upload_is_answered_408_after_the_client_body_timeout(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    """The timeout bounds the whole upload: a byte every 50 ms never resets it."""
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls, "--client-body-timeout-s", "1")
    loop = asyncio.get_running_loop()
    async with raw_upload(proxy, upload_head(100_000)) as trickle:
        start = loop.time()

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(200):
                    await trickle.send(b"A")
                    await asyncio.sleep(0.05)

        dripping = asyncio.create_task(drip())
        status, headers, body = await trickle.answer()
        elapsed = loop.time() - start
        dripping.cancel()
        assert status == 408, body
        assert json.loads(body)["error"] == "body_timeout"
        assert headers.get("connection") == "close"
        assert 1.0 <= elapsed < 3.0, elapsed
    await proxy.wait_idle()
    assert (await sims.stats(0))["completed"] == 0
    assert await pod_errors(proxy) == [0]


@pytest.mark.parametrize("parser", ["python", "c"])
async def test_a_malformed_chunk_after_the_first_read_is_the_clients_error(
    sim_pods: SimFactory,
    proxy_factory: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
    parser: str,
) -> None:
    """aiohttp's pure-Python parser hands the parse error to the body's reader: 400 at
    once. Its C parser (the default) drops it (``_http_parser.pyx`` ``feed_data`` raises
    without failing the payload, which then never ends): the upload times out, 408."""
    if parser == "python":
        monkeypatch.setattr(aiohttp.web_protocol, "HttpRequestParser", HttpRequestParserPy)
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls, "--client-body-timeout-s", "1")
    async with raw_upload(proxy, upload_head(None)) as broken:
        piece = b'{"steps": 2, "init_images": ["' + b"A" * 300_000
        await broken.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        await broken.send(b"this is no chunk size\r\n")
        status, headers, body = await broken.answer()
        assert headers.get("connection") == "close"
    expected = (400, "bad_request") if parser == "python" else (408, "body_timeout")
    assert (status, json.loads(body)["error"]) == expected, body
    await proxy.wait_idle()
    assert (await sims.stats(0))["completed"] == 0
    assert await pod_errors(proxy) == [0]
    assert not backend_errors(proxy)


async def test_a_client_gone_mid_upload_never_took_a_slot(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    async with raw_upload(proxy, upload_head(10 * MIB)) as gone:
        for _ in range(40):  # 2.5 MiB of 10: past the in-memory part, into the spool
            await gone.send(b"A" * (64 * 1024))
        await asyncio.sleep(0.2)
        assert (await proxy.status())["inflight"] == 0
    await proxy.wait_idle()
    status, _, _ = await _post(proxy, TXT2IMG, gen_body(2))
    assert status == 200
    stats = await sims.stats(0)
    assert stats["completed"] == 1 and stats["interrupts_received"] == 0, stats
    assert await pod_errors(proxy) == [0]
    assert not backend_errors(proxy)


def spool_files() -> int:
    """Open unnamed temporary files of this process (the proxy runs in it)."""
    tmp = tempfile.gettempdir()
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sum(1 for link in links if link.startswith(tmp) and link.endswith("(deleted)"))


async def test_no_spooled_body_outlives_its_request(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    """Answered, abandoned while queued, mid-upload or mid-generation: the spool file is
    closed (and so gone) when the request ends."""
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    before = spool_files()
    big = "x" * (2 * MIB)  # over the in-memory bound: spooled
    status, _, _ = await _post(proxy, TXT2IMG, gen_body(2, prompt=big))
    assert status == 200
    assert spool_files() == before
    # queued with its body spooled, then the client hangs up
    running = asyncio.create_task(_post(proxy, TXT2IMG, gen_body(300)))
    await proxy.wait_inflight(1)
    queued = asyncio.create_task(_post(proxy, TXT2IMG, gen_body(2, prompt=big)))
    await proxy.wait_queue(1)
    assert spool_files() == before + 1, "a queued big body waits on disk"
    queued.cancel()
    await proxy.wait_queue(0)
    assert spool_files() == before
    # mid-upload
    async with raw_upload(proxy, upload_head(10 * MIB)) as gone:
        await gone.send(b'{"prompt": "' + b"x" * (2 * MIB))

        async def spooling() -> bool:
            return spool_files() == before + 1

        await eventually(spooling, what="the upload to be spooled")

    async def closed() -> bool:
        return spool_files() == before

    await eventually(closed, what="the spool closed")
    # mid-generation: the abandoned exchange owns the body until the pod's answer ended
    assert (await running)[0] == 200
    gone_later = asyncio.create_task(_post(proxy, TXT2IMG, gen_body(300, prompt=big)))
    await proxy.wait_inflight(1)
    gone_later.cancel()
    await proxy.wait_idle()
    assert spool_files() == before
    assert (await sims.stats(0))["interrupts_received"] == 1


async def _post(proxy: ProxyUnderTest, path: str, body: Any) -> tuple[int, Any, str]:
    data = io.BytesIO(json.dumps(body).encode())  # aiohttp warns of large bytes bodies
    headers = {"Content-Type": "application/json"}
    async with proxy.client.post(path, data=data, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers.get("X-Sdproxy-Pod", "")


# ---- a recording pod: what arrives ------------------------------------------------------


@dataclass(kw_only=True)
class Seen:
    """What a recording pod received: each request's head, and its body's digest."""

    heads: list[CIMultiDictProxy[str]] = field(default_factory=list)
    digests: list[tuple[str, int]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def recording_pod() -> AsyncIterator[tuple[str, Seen]]:
    """A plain pod (no gate) that answers ``{}`` and records what it was sent."""
    seen = Seen()

    async def handle(request: web.Request) -> web.Response:
        if request.path.startswith("/-/"):
            return web.json_response({}, status=404)  # no gate here
        if request.method != "POST":  # the proxy's health checks
            return web.json_response({})
        seen.heads.append(request.headers)
        body = await request.read()
        seen.digests.append((hashlib.sha256(body).hexdigest(), len(body)))
        return web.json_response({})

    app = web.Application(client_max_size=256 * MIB)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("size", [200_000, 10 * MIB], ids=["in-memory", "spooled"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_arrives_at_the_pod_byte_for_byte(
    proxy_factory: ProxyFactory, size: int, chunked: bool
) -> None:
    body = image_body(size)
    async with recording_pod() as (url, seen):
        proxy = await proxy_factory([url])

        async def pieces() -> AsyncIterator[bytes]:
            for at in range(0, len(body), 100_000):
                yield body[at : at + 100_000]

        data: Any = pieces() if chunked else io.BytesIO(body)
        async with proxy.client.post(IMG2IMG, data=data) as resp:
            assert resp.status == 200
        await proxy.wait_idle()
    (head,) = seen.heads
    assert seen.digests == [(hashlib.sha256(body).hexdigest(), size)]
    assert head.get("Content-Length") == str(size), "sent as it came (chunked)"
    assert "Transfer-Encoding" not in head


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", TXT2IMG), ("POST", "/sdapi/v1/png-info")],
    ids=["heavy", "light"],
)
async def test_the_clients_expect_never_reaches_the_pod(
    proxy_factory: ProxyFactory, method: str, path: str
) -> None:
    """The proxy answers the client's ``Expect: 100-continue`` itself; towards a plain
    pod it sends no Expect of its own."""
    async with recording_pod() as (url, seen):
        proxy = await proxy_factory([url])
        body = json.dumps(gen_body(2)).encode()
        async with proxy.client.request(method, path, data=body, expect100=True) as resp:
            assert resp.status == 200
        await proxy.wait_idle()
    (head,) = seen.heads
    assert "Expect" not in head, dict(head)
    assert seen.digests == [(hashlib.sha256(body).hexdigest(), len(body))]


# ---- a fake gate: the proxy's own Expect ------------------------------------------------


@dataclass(kw_only=True)
class FakeGate:
    """An ``sdproxy gate`` look-alike: publishes a free pod (limit 1) and answers the
    expect step of a heavy request as told by ``expect``."""

    url: str = ""
    #: "hang": never answer (no 100, no refusal); "busy-once": refuse the first with
    #: pod_busy, accept the rest
    expect: str = "hang"
    expect_heads: list[CIMultiDictProxy[str]] = field(default_factory=list)
    digests: list[tuple[str, int]] = field(default_factory=list)
    interrupts: int = 0
    #: the expect step of a heavy request was cancelled (its connection closed)
    dropped: asyncio.Event = field(default_factory=asyncio.Event)
    version: int = 0


@contextlib.asynccontextmanager
async def fake_gate(expect: str, *, gated: bool = True) -> AsyncIterator[FakeGate]:
    """``gated=False``: no occupancy stream (404), a plain pod to the proxy."""
    fake = FakeGate(expect=expect)

    async def events(request: web.Request) -> web.StreamResponse:
        if not gated:
            return web.json_response({}, status=404)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while True:
            fake.version += 1
            occupancy = {"version": fake.version, "limit": 1, "running": [], "upstream_ok": True}
            await response.write(f"data: {json.dumps(occupancy)}\n\n".encode())
            await asyncio.sleep(0.2)

    async def on_expect(request: web.Request) -> web.StreamResponse | None:
        fake.expect_heads.append(request.headers)
        if fake.expect == "busy-once" and len(fake.expect_heads) == 1:
            body = {"error": "pod_busy", "detail": "busy"}
            return web.json_response(body, status=503, headers={"X-Sdproxy-Gate": "busy"})
        if fake.expect == "hang":
            try:
                await asyncio.Event().wait()
            finally:
                fake.dropped.set()
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    async def heavy(request: web.Request) -> web.Response:
        if request.method != "POST":  # the proxy's health checks
            return web.json_response({})
        body = await request.read()
        fake.digests.append((hashlib.sha256(body).hexdigest(), len(body)))
        return web.json_response({}, headers={"X-Sdproxy-Gate": "admitted"})

    async def interrupt(request: web.Request) -> web.Response:
        fake.interrupts += 1
        return web.json_response({})

    app = web.Application(client_max_size=256 * MIB)
    app.router.add_get("/-/gate/events", events)
    app.router.add_post("/sdapi/v1/interrupt", interrupt)
    app.router.add_route("*", "/{tail:.*}", heavy, expect_handler=on_expect)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield fake
    finally:
        await runner.cleanup()


async def gated_proxy(proxy_factory: ProxyFactory, fake: FakeGate) -> ProxyUnderTest:
    proxy = await proxy_factory([fake.url])

    async def gated() -> bool:
        return all(p["mode"] == "gated" for p in (await proxy.status())["pods"])

    await eventually(gated, what="the pod seen through its gate")
    return proxy


async def test_a_gated_pod_that_never_sends_100_keeps_no_slot_once_the_client_left(
    proxy_factory: ProxyFactory,
) -> None:
    async with fake_gate("hang") as fake:
        proxy = await gated_proxy(proxy_factory, fake)
        # over 64 KiB: a body the proxy sends to a gated pod with Expect: 100-continue
        body = gen_body(2, prompt="x" * 100_000)
        client = asyncio.create_task(_post(proxy, TXT2IMG, body))

        async def asked() -> bool:
            return len(fake.expect_heads) == 1

        await eventually(asked, what="the proxy's Expect at the gate")
        assert fake.expect_heads[0]["Expect"] == "100-continue"
        client.cancel()  # the client hangs up
        with pytest.raises(asyncio.CancelledError):
            await client
        await proxy.wait_idle()  # at once: nothing of it reached the pod
        await asyncio.wait_for(fake.dropped.wait(), DEADLINE_S)
        # the pod runs nothing of ours: interrupting it would stop someone else's job
        assert fake.interrupts == 0
        assert fake.digests == []
        assert await pod_errors(proxy) == [0]


async def test_a_plain_pod_that_would_never_send_100_serves_a_client_that_sent_expect(
    proxy_factory: ProxyFactory,
) -> None:
    """The client's Expect, forwarded, made the exchange wait for the pod's 100; this
    pod would never send it (it hangs in the expect step if asked)."""
    async with fake_gate("hang", gated=False) as fake:
        proxy = await proxy_factory([fake.url])
        body = json.dumps(gen_body(2)).encode()
        post = proxy.client.post(TXT2IMG, data=body, expect100=True)
        async with asyncio.timeout(DEADLINE_S), post as resp:
            assert resp.status == 200
        await proxy.wait_idle()
        assert fake.expect_heads == [], "the pod was asked for a 100 Continue"
        assert fake.digests == [(hashlib.sha256(body).hexdigest(), len(body))]


async def test_a_spooled_body_is_replayed_after_pod_busy(proxy_factory: ProxyFactory) -> None:
    body = image_body(5 * MIB)
    async with fake_gate("busy-once") as fake:
        proxy = await gated_proxy(proxy_factory, fake)
        async with proxy.client.post(IMG2IMG, data=io.BytesIO(body)) as resp:
            assert resp.status == 200
        await proxy.wait_idle()
    assert len(fake.expect_heads) == 2, "refused once, then sent again"
    assert fake.digests == [(hashlib.sha256(body).hexdigest(), len(body))]
