"""The browser UI (``serve --ui``) against clients and pods that misbehave: a session that
ended keeps no websocket to its pod, broken websocket handshakes and oversized frames are
refused cleanly, UI bodies stream (not buffered whole), a pod that vanishes silently
closes its websockets. Real sockets: ``sdproxy sim --ui`` pods, a TCP tap in between."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.integration.conftest import ProxyFactory, UiSims, eventually
from tests.integration.test_ui_proxy import browser, open_page

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


class Tap:
    """A TCP forwarder in front of a pod: counts the bytes going up, and ``freeze()``
    makes the pod vanish without a FIN (a dead node): open connections go silent, new
    ones are refused."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.bytes_up = 0
        #: everything sent up to the pod
        self.sent = bytearray()
        self.frozen = asyncio.Event()
        self.server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool):
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                if self.frozen.is_set():
                    await asyncio.Event().wait()  # swallow it, answer nothing, forever
                if up:
                    self.bytes_up += len(chunk)
                    self.sent += chunk
                writer.write(chunk)
                await writer.drain()
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.frozen.is_set():
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False)
        )

    def freeze(self) -> None:
        self.frozen.set()


@contextlib.asynccontextmanager
async def tap(upstream: str) -> AsyncIterator[Tap]:
    t = Tap(upstream)
    t.server = await asyncio.start_server(t._handle, "127.0.0.1", 0)
    try:
        yield t
    finally:
        t.server.close()
        for w in t._writers:
            w.transport.abort()


async def test_a_left_sessions_websocket_is_closed_and_the_next_browser_has_the_pod_alone(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(ui_sims.urls[:1], "--ui")
    async with browser(proxy) as first, browser(proxy) as second:
        await open_page(first)
        ws = await first.ws_connect("/queue/join")
        assert json.loads((await ws.receive()).data)["msg"] == "send_hash"
        async with first.delete("/-/ui/session") as resp:
            assert (await resp.json())["ended"] is True
        # the websocket of the ended session goes: it may not submit work to the pod
        # the next browser now holds
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
        assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY
        status, pod, kind = await open_page(second)
        assert (status, kind) == (200, "") and pod is not None
    ui = proxy.ui

    async def relay_gone() -> bool:
        return ui is not None and not ui._websockets

    await eventually(relay_gone, what="the relay of the ended session to finish")


async def test_a_broken_websocket_handshake_is_a_json_400_and_reaches_no_pod(
    ui_sims: UiSims, proxy_factory: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await proxy_factory(ui_sims.urls[:1], "--ui")
    async with browser(proxy) as session:
        await open_page(session)
        for headers in (
            {"Upgrade": "websocket"},  # no Connection: upgrade, no key
            {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"},
            {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "short",
                "Sec-WebSocket-Version": "13",
            },
        ):
            async with session.get("/queue/join", headers=headers) as resp:
                assert resp.status == 400, headers
                assert (await resp.json())["error"] == "bad_request"
        async with session.get("/config") as resp:
            assert resp.status == 200, "the session is unharmed"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


async def test_a_websocket_message_over_the_body_limit_closes_that_websocket_only(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(ui_sims.urls[:1], "--ui", "--max-body-mb", "1")
    async with browser(proxy) as session:
        await open_page(session)
        async with session.ws_connect("/queue/join", max_msg_size=0) as ws:
            assert json.loads((await ws.receive()).data)["msg"] == "send_hash"
            await ws.send_str("x" * (2 * 1024 * 1024))  # buffered whole, unbounded, before
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.type is aiohttp.WSMsgType.CLOSE, msg
            assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        async with session.get("/config") as resp:
            assert resp.status == 200


async def test_a_ui_upload_streams_to_the_pod(ui_sims: UiSims, proxy_factory: ProxyFactory) -> None:
    """The body goes on as it comes (README: streamed both ways), not read whole first:
    memory stays bounded, whatever many uploads run."""
    async with tap(ui_sims.urls[0]) as pod:
        proxy = await proxy_factory([pod.url], "--ui")
        async with browser(proxy) as session:
            await open_page(session)
            first_part = asyncio.Event()
            release = asyncio.Event()

            async def body() -> AsyncIterator[bytes]:
                yield b"x" * 300_000
                first_part.set()
                await release.wait()
                yield b"y" * 300_000

            upload = asyncio.create_task(
                session.post(
                    "/run/predict", data=body(), headers={"Content-Type": "application/json"}
                )
            )
            await first_part.wait()
            before = pod.bytes_up

            async def reached_the_pod() -> bool:
                return pod.bytes_up - before >= 250_000

            try:
                await eventually(reached_the_pod, timeout_s=5, what="the body to stream on")
            finally:
                release.set()
                resp = await upload
                resp.release()
            assert resp.status == 422  # Gradio: that is no predict request


async def test_the_websockets_of_a_pod_that_vanishes_close(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    async with tap(ui_sims.urls[0]) as pod:
        flags = ("--ui", "--health-interval-s", "0.2", "--health-fall", "2")
        proxy = await proxy_factory([pod.url], *flags)
        async with browser(proxy) as session:
            await open_page(session)
            ws = await session.ws_connect("/queue/join")
            assert json.loads((await ws.receive()).data)["msg"] == "send_hash"
            pod.freeze()  # no FIN, no RST: the pod is just gone
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type is aiohttp.WSMsgType.CLOSE, msg
            assert not (await proxy.status())["ui"]["sessions"]
            await ws.close()


async def test_a_pod_given_to_a_lobby_tab_that_was_closed_goes_to_the_next_browser(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    """Before: the closed tab's session held the pod for --ui-idle-s (900 s), its GPU
    idle and closed to API jobs, while the next browser waited in the lobby."""
    proxy = await proxy_factory(ui_sims.urls[:1], "--ui")
    ui = proxy.ui
    assert ui is not None
    async with browser(proxy) as first, browser(proxy) as closed, browser(proxy) as third:
        assert (await open_page(first))[0] == 200
        assert (await open_page(closed))[2] == "lobby"  # then its tab closes
        async with first.delete("/-/ui/session") as resp:
            assert (await resp.json())["ended"] is True
        assert (await proxy.status())["ui"]["sessions"], "the closed tab was given the pod"
        assert (await open_page(third))[2] == "lobby"

        async def third_in() -> bool:
            async with third.get("/-/ui/lobby") as resp:
                return bool((await resp.json())["ready"])

        await eventually(
            third_in, timeout_s=ui.config.lobby_stale_s + 5, what="the unclaimed pod to free"
        )
        status, pod, kind = await open_page(third)
        assert status == 200 and pod is not None and kind == ""


async def test_a_browser_that_vanishes_with_its_websocket_open_does_not_keep_the_gpu(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    """An open websocket is use (the session never idles out) — but one whose client is
    gone without a FIN (a laptop lid closed, a network lost) answers no ping: it closes,
    and the session then idles out as any other. Before: TCP keepalive's ~2 h."""
    proxy = await proxy_factory(ui_sims.urls[:1], "--ui", "--ui-idle-s", "1")
    async with tap(proxy.url) as front:
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(base_url=front.url, cookie_jar=jar) as session:
            await open_page(session)
            ws = await session.ws_connect("/queue/join", autoping=True)
            assert json.loads((await ws.receive()).data)["msg"] == "send_hash"
            front.freeze()

            async def ended() -> bool:
                return not (await proxy.status())["ui"]["sessions"]

            await eventually(ended, timeout_s=10, what="the vanished browser's session to end")
            assert not proxy.ui._websockets
            # aiohttp's client websocket has no public abort, and a close would wait for
            # the frozen peer's answer: drop the connection under it
            connection = ws._response.connection
            assert connection is not None and connection.transport is not None
            connection.transport.abort()


async def test_a_tenants_key_does_not_reach_the_pod_on_a_websocket(
    ui_sims: UiSims, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    config = tmp_path / "sdproxy.toml"
    config.write_text('[tenants.team-a]\nkeys = ["key-a-secret"]\n')
    async with tap(ui_sims.urls[0]) as pod:
        proxy = await proxy_factory([pod.url], "--ui", "--config", str(config))
        async with browser(proxy) as session:
            session.headers["X-Sdproxy-Key"] = "key-a-secret"
            assert (await open_page(session))[0] == 200
            async with session.ws_connect("/queue/join") as ws:
                await ws.send_str(json.dumps({"hash": "x"}))
                await ws.receive(timeout=5)
        assert b"GET /queue/join" in pod.sent, "the websocket went through the tap"
        assert b"key-a-secret" not in pod.sent, "the key reached the pod"
