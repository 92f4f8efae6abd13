"""The browser UI behind the proxy (``serve --ui``), spoken at the wire by aiohttp clients.

The pods are ``sdproxy sim --ui``: a real Gradio 3.41 app each (its routes, its
websocket queue protocol, its file route). Each aiohttp ``ClientSession`` is one browser
(its own cookie jar). The Chromium tests (test_ui_browser.py) run Gradio's own JS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from sdproxy import settings
from sdproxy.cli import build_parser
from sdproxy.runtime.podgate import build_gate_app
from sdproxy.runtime.ui import session_key
from tests.integration.conftest import (
    TXT2IMG,
    ProxyFactory,
    ProxyUnderTest,
    UiSims,
    eventually,
    gen_body,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PAGE = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate"}


@contextlib.asynccontextmanager
async def browser(proxy: ProxyUnderTest) -> AsyncIterator[aiohttp.ClientSession]:
    """One browser: its own cookie jar (unsafe: the proxy is an IP address)."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(base_url=proxy.url, cookie_jar=jar) as session:
        yield session


async def open_page(session: aiohttp.ClientSession) -> tuple[int, str | None, str]:
    """(status, pod, X-Sdproxy-Ui) of a page load."""
    async with session.get("/", headers=PAGE) as resp:
        await resp.read()
        return resp.status, resp.headers.get("X-Sdproxy-Pod"), resp.headers.get("X-Sdproxy-Ui", "")


async def reset(sims: UiSims) -> None:
    async with aiohttp.ClientSession() as session:
        for url in sims.urls:
            async with session.post(url + "/sim/reset") as resp:
                assert resp.status == 200


async def sim_stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url + "/sim/stats") as resp:
        data: dict[str, Any] = await resp.json()
        return data


async def generate(session: aiohttp.ClientSession, *, steps: int = 20) -> dict[str, Any]:
    """One Generate click as Gradio's client does it: /queue/join over a websocket
    (gradio/routes.py join_queue, queueing.py): send_hash, estimation, send_data,
    process_starts, process_completed."""
    async with session.get("/config") as resp:
        assert resp.status == 200, await resp.text()
        config = await resp.json()
    fn_index = next(i for i, dep in enumerate(config["dependencies"]) if dep.get("js"))
    seen: list[str] = []
    async with session.ws_connect("/queue/join") as ws:
        async for msg in ws:
            data = json.loads(msg.data)
            seen.append(data["msg"])
            if data["msg"] == "send_hash":
                await ws.send_json({"fn_index": fn_index, "session_hash": "test"})
            elif data["msg"] == "send_data":
                payload = {"data": ["task(t1)", "a cat", steps], "event_data": None}
                await ws.send_json({**payload, "fn_index": fn_index, "session_hash": "test"})
            elif data["msg"] == "process_completed":
                assert data["success"], data
                return {"seen": seen, "output": data["output"]}
    raise AssertionError(f"the queue websocket closed after {seen}")


async def test_a_page_load_opens_a_session_and_every_ui_call_follows_it(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(ui_sims.urls[:2], "--ui")
    async with browser(proxy) as session:
        status, pod, _ = await open_page(session)
        assert status == 200 and pod in {u.removeprefix("http://") for u in ui_sims.urls[:2]}
        assert "sdproxy_ui" in session.cookie_jar.filter_cookies(URL(proxy.url))
        for path in ("/config", "/info", "/queue/status", "/", "/internal/ping"):
            async with session.get(path, headers=PAGE if path == "/" else {}) as resp:
                assert resp.status == 200, path
                assert resp.headers["X-Sdproxy-Pod"] == pod, f"{path} left the session's pod"
        async with session.post("/internal/progress", json={"id_task": "x"}) as resp:
            assert resp.status == 200 and resp.headers["X-Sdproxy-Pod"] == pod
    assert (await proxy.status())["ui"]["sessions"] == {pod: 1}
    assert (await proxy.status())["queue"]["depth"] == 0


@pytest.mark.parametrize(
    ("proto", "secure"),
    [pytest.param("", False, id="http"), pytest.param("https", True, id="behind-tls")],
)
async def test_the_session_cookie(
    ui_sims: UiSims, proxy_factory: ProxyFactory, proto: str, secure: bool
) -> None:
    proxy = await proxy_factory(ui_sims.urls[:1], "--ui")
    headers = {**PAGE, "X-Forwarded-Proto": proto} if proto else PAGE
    async with proxy.client.get("/", headers=headers) as resp:
        assert resp.status == 200
        (set_cookie,) = [c for c in resp.headers.getall("Set-Cookie") if "sdproxy_ui=" in c]
    attributes = {a.strip() for a in set_cookie.split(";")[1:]}
    assert {"HttpOnly", "Path=/", "SameSite=Lax"} <= attributes
    assert ("Secure" in attributes) is secure


@pytest.mark.parametrize(
    "cookie",
    [pytest.param(None, id="no-cookie"), pytest.param("x.y;z", id="garbage-cookie")],
)
async def test_a_ui_call_without_a_session_takes_no_pod(
    ui_sims: UiSims, proxy_factory: ProxyFactory, cookie: str | None
) -> None:
    proxy = await proxy_factory(ui_sims.urls[:1], "--ui")
    headers = {"Cookie": f"sdproxy_ui={cookie}"} if cookie else {}
    async with proxy.client.post("/run/predict", json={"data": []}, headers=headers) as resp:
        assert resp.status == 409
        assert (await resp.json())["error"] == "ui_no_session"
    assert (await proxy.status())["ui"]["sessions"] == {}


async def test_a_generation_over_the_websocket_and_its_image_through_the_proxy(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    await reset(ui_sims)
    proxy = await proxy_factory(ui_sims.urls[:1], "--ui")
    async with browser(proxy) as session:
        await open_page(session)
        result = await generate(session)
        assert result["seen"][:2] == ["send_hash", "estimation"]
        assert "process_starts" in result["seen"]
        (gallery, info) = result["output"]["data"]
        assert "20 steps" in info
        image = gallery[0]["name"]
        async with session.get(f"/file={image}") as resp:
            assert resp.status == 200 and resp.content_type == "image/png"
            assert (await resp.read()).startswith(b"\x89PNG")
    stats = await sim_stats(ui_sims.urls[0])
    assert stats["completed"] == 1 and stats["heavy_inflight_max"] == 1


async def test_api_clients_never_reach_the_pod_a_ui_session_holds(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    await reset(ui_sims)
    proxy = await proxy_factory(ui_sims.urls[:2], "--ui")
    async with browser(proxy) as session:
        _, ui_pod, _ = await open_page(session)

        async def api_call() -> str:
            async with proxy.client.post(TXT2IMG, json=gen_body(8)) as resp:
                assert resp.status == 200
                return resp.headers["X-Sdproxy-Pod"]

        api = asyncio.gather(*(api_call() for _ in range(8)))
        ui_runs = [await generate(session, steps=10) for _ in range(2)]
        api_pods = await api
    assert ui_pod not in api_pods and len(set(api_pods)) == 1
    assert all("process_completed" in r["seen"] for r in ui_runs)
    for url in ui_sims.urls[:2]:
        stats = await sim_stats(url)
        assert stats["heavy_inflight_max"] <= 1, (url, stats)
    held = next(u for u in ui_sims.urls if u.removeprefix("http://") == ui_pod)
    assert (await sim_stats(held))["completed"] == 2, "only the UI's generations ran there"


async def test_lobby_leave_and_idle_release(ui_sims: UiSims, proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(ui_sims.urls[:1], "--ui", "--ui-idle-s", "1.5")
    async with browser(proxy) as first, browser(proxy) as second:
        assert (await open_page(first))[0] == 200
        status, pod, kind = await open_page(second)
        assert (status, pod, kind) == (200, None, "lobby")
        async with second.get("/-/ui/lobby") as resp:
            place = await resp.json()
        assert place == {"ready": False, "position": 1, "depth": 1, "eta_s": place["eta_s"]}
        assert 0 < place["eta_s"] <= 1.5
        async with second.post("/run/predict", json={}) as resp:
            assert resp.status == 409, "a lobby waiter's calls take no pod"

        async with first.delete("/-/ui/session") as resp:
            assert (await resp.json())["ended"] is True
        async with second.get("/-/ui/lobby") as resp:
            assert (await resp.json())["ready"] is True
        status, pod, kind = await open_page(second)
        assert status == 200 and pod is not None and kind == ""
        # the first browser left: a page load joins afresh, behind nobody -> the lobby
        assert (await open_page(first))[2] == "lobby"

        async def idled_out() -> bool:
            return not (await proxy.status())["ui"]["sessions"]

        await eventually(idled_out, timeout_s=10, what="the idle session to end")
        async with second.get("/", headers=PAGE) as resp:
            assert resp.status == 410 and resp.headers["X-Sdproxy-Ui"] == "ended"
            assert "idle" in await resp.text()
        async with second.get("/config") as resp:
            assert resp.status == 410
            assert (await resp.json())["error"] == "ui_session_ended"
        async with second.delete("/-/ui/session") as resp:  # the page's Rejoin button
            assert resp.status == 200
        assert (await open_page(second))[2] in ("", "lobby")
    body = (await (await proxy.client.get("/-/metrics")).read()).decode()
    assert "sdproxy_ui_lobby_wait_seconds_count" in body
    assert "sdproxy_ui_lobby_depth" in body and "sdproxy_ui_sessions{" in body


async def test_another_replicas_session_is_found_by_its_cookie(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    one = await proxy_factory(ui_sims.urls[:2], "--ui")
    two = await proxy_factory(ui_sims.urls[:2], "--ui")
    async with browser(one) as session:
        _, pod, _ = await open_page(session)
        cookie = session.cookie_jar.filter_cookies(URL(one.url))["sdproxy_ui"].value
    async with two.client.get("/config", headers={"Cookie": f"sdproxy_ui={cookie}"}) as resp:
        assert resp.status == 200 and resp.headers["X-Sdproxy-Pod"] == pod
    assert (await two.status())["ui"]["sessions"] == {pod: 1}


async def test_without_ui_the_ui_endpoints_are_unknown(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(ui_sims.urls[:1])
    async with proxy.client.get("/-/ui/lobby") as resp:
        assert resp.status == 404 and (await resp.json())["error"] == "not_found"
    assert "ui" not in await proxy.status()


@contextlib.asynccontextmanager
async def ui_gate(upstream: str) -> AsyncIterator[str]:
    """An in-process ``sdproxy gate --ui`` in front of ``upstream``; yields its URL."""
    argv = ["gate", "--listen", "127.0.0.1:0", "--upstream", upstream, "--ui"]
    app = build_gate_app(settings.load_gate(build_parser().parse_args(argv), env={}).gate)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_behind_a_gate_a_ui_generation_claims_the_pods_slot(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    async with ui_gate(ui_sims.urls[0]) as gate_url, aiohttp.ClientSession() as plain:
        proxy = await proxy_factory([gate_url], "--ui")
        claims: list[dict[str, Any]] = []

        async def watch() -> None:
            while True:
                async with plain.get(gate_url + "/-/gate") as resp:
                    claims.extend((await resp.json())["running"])
                await asyncio.sleep(0.02)

        async with browser(proxy) as session:
            status, pod, _ = await open_page(session)
            assert status == 200 and pod == gate_url.removeprefix("http://")
            watcher = asyncio.create_task(watch())
            try:
                result = await generate(session, steps=40)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            assert "process_completed" in result["seen"]
            async with session.post("/internal/progress", json={"id_task": "x"}) as resp:
                assert resp.status == 200, "a UI POST through the gate is not heavy"
        assert {c["route"] for c in claims} == {"/queue/join (ui)"}
        async with plain.get(gate_url + "/-/gate") as resp:
            assert (await resp.json())["inflight"] == 0, "the claim ends with the generation"


async def test_a_pod_that_goes_down_ends_its_sessions(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        gate_url = await stack.enter_async_context(ui_gate(ui_sims.urls[0]))
        flags = ("--ui", "--health-interval-s", "0.2", "--health-fall", "2")
        proxy = await proxy_factory([gate_url], *flags)
        async with browser(proxy) as session:
            assert (await open_page(session))[1] == gate_url.removeprefix("http://")
            await stack.aclose()  # the pod (its gate) goes away

            async def ended() -> bool:
                return not (await proxy.status())["ui"]["sessions"]

            await eventually(ended, timeout_s=10, what="the session of the dead pod to end")
            async with session.get("/", headers=PAGE) as resp:
                assert resp.status == 410 and "went away" in await resp.text()


async def test_extension_api_paths_are_not_ui_traffic(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(
        ui_sims.urls[:1], "--ui", "--ui-api-prefix", "/controlnet/", "--route", "GET /ext/=light"
    )
    for path in ("/controlnet/version", "/ext/thing", "/sdapi/v1/samplers"):
        async with proxy.client.get(path) as resp:
            assert resp.status != 409, f"{path} was taken for UI traffic"
    async with proxy.client.get("/config") as resp:
        assert resp.status == 409, "a UI call without a session"


async def test_replicas_share_their_sessions_through_the_peers(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    """Capacity counts every replica's sessions; a session is found by any replica and
    ends everywhere when its browser leaves at one of them."""
    one = await proxy_factory(ui_sims.urls[:1], "--ui")
    two = await proxy_factory(ui_sims.urls[:1], "--ui")
    for a, b in ((one, two), (two, one)):
        peers = a.services.peers
        assert peers is not None
        peers.set_urls([b.url])

    async def two_sees(count: int) -> bool:
        ui = two.ui
        return len(ui.peer_view(ui.clock()).sessions) == count

    async with browser(one) as first, browser(two) as second:
        _, pod, _ = await open_page(first)
        assert pod is not None
        await eventually(lambda: two_sees(1), what="the other replica to see the session")
        assert (await open_page(second))[2] == "lobby", "the pod is full: held at the other"

        cookie = first.cookie_jar.filter_cookies(URL(one.url))["sdproxy_ui"].value
        headers = {"Cookie": f"sdproxy_ui={cookie}"}
        async with two.client.get("/config", headers=headers) as resp:
            assert resp.status == 200 and resp.headers["X-Sdproxy-Pod"] == pod
        async with second.get("/-/ui/lobby") as resp:
            assert (await resp.json())["ready"] is False, "the same session counts once"

        async with first.delete("/-/ui/session") as resp:
            assert (await resp.json())["ended"] is True

        async def second_in() -> bool:
            async with second.get("/-/ui/lobby") as resp:
                return bool((await resp.json())["ready"])

        await eventually(second_in, what="the left session to end at the other replica")
        async with two.client.get("/config", headers=headers) as resp:
            assert resp.status == 410 and (await resp.json())["error"] == "ui_session_ended"
        # a browser whose session another replica ended is told so here too: the
        # second's session was only ever held by the replica two
        cookie = second.cookie_jar.filter_cookies(URL(two.url))["sdproxy_ui"].value
        async with second.delete("/-/ui/session") as resp:
            assert (await resp.json())["ended"] is True

        async def one_knows() -> bool:
            ui = one.ui
            key = session_key(cookie.split(".")[0])
            return key in ui.peer_view(ui.clock()).ended

        await eventually(one_knows, what="the other replica to learn of the end")
        page = {**PAGE, "Cookie": f"sdproxy_ui={cookie}"}
        async with one.client.get("/", headers=page) as resp:
            assert resp.status == 410 and resp.headers["X-Sdproxy-Ui"] == "ended"


async def test_a_websocket_the_pod_refuses_is_a_backend_error(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(ui_sims.urls[:1], "--ui")
    async with browser(proxy) as session:
        await open_page(session)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect("/queue/nothing-here")
        assert refused.value.status == 502
        async with session.get("/config") as resp:
            assert resp.status == 200, "the session outlives a refused websocket"


async def test_an_open_websocket_keeps_its_session(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(ui_sims.urls[:1], "--ui", "--ui-idle-s", "0.5")
    async with browser(proxy) as session:
        await open_page(session)
        async with session.ws_connect("/queue/join") as ws:
            assert json.loads((await ws.receive()).data)["msg"] == "send_hash"
            # 3x --ui-idle-s with no HTTP request; reading, as a browser does, answers
            # the proxy's pings (a client that answers none has vanished: closed)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.receive(), 1.5)
            assert (await proxy.status())["ui"]["sessions"], "an open websocket is use"
            await ws.send_json({"fn_index": 0, "session_hash": "idle"})

        async def ended() -> bool:
            return not (await proxy.status())["ui"]["sessions"]

        await eventually(ended, timeout_s=5, what="the idle session to end once closed")


async def test_a_ui_generation_waiting_for_the_gpu_reports_in_queue(
    ui_sims: UiSims, proxy_factory: ProxyFactory
) -> None:
    """sd-webui's /internal/progress says "In queue" while a UI task waits for the lock
    (docs/sd-webui.md); here an API job sent to the pod directly holds it."""
    proxy = await proxy_factory(ui_sims.urls[:1], "--ui")
    async with browser(proxy) as session, aiohttp.ClientSession() as plain:
        await open_page(session)

        async def api_job() -> int:
            async with plain.post(ui_sims.urls[0] + TXT2IMG, json=gen_body(60)) as resp:
                await resp.read()
                return resp.status

        api = asyncio.create_task(api_job())
        await asyncio.sleep(0.2)
        ui = asyncio.create_task(generate(session, steps=1))
        states: list[dict[str, Any]] = []

        async def reported(key: str) -> bool:
            async with session.post("/internal/progress", json={"id_task": "task(t1)"}) as r:
                states.append(await r.json())
            return bool(states[-1][key])

        await eventually(lambda: reported("queued"), what="the UI task to be queued")
        assert states[-1]["textinfo"] == "In queue: 1/1"
        assert await api == 200
        await ui
        assert await reported("completed")


def test_sim_ui_without_gradio_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['gradio'] = None; from sdproxy.cli import main; "
        "sys.argv = ['sdproxy', 'sim', '--ui', '--port', '0']; sys.exit(main())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert b"pip install 'sdproxy[ui]'" in done.stderr and b"Traceback" not in done.stderr
