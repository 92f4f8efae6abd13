"""Headless Chromium through the proxy (``serve --ui``) to ``sdproxy sim --ui`` pods.

Gradio's own JavaScript runs in the browser: it loads the page and its assets, opens the
``/queue/join`` websocket when Generate is clicked, and shows the image it then fetches
from ``/file=…``; the page polls ``POST /internal/progress`` meanwhile, as sd-webui's
does. Each ``Browser`` is a separate browser context (its own cookies: a separate
person). Driven over the DevTools protocol (tests/browser.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.browser import Browser, Chromium, chromium
from tests.conftest import require_binary
from tests.integration.conftest import (
    TXT2IMG,
    ProxyFactory,
    ProxyUnderTest,
    UiSims,
    eventually,
    gen_body,
    require_gradio,
)
from tests.integration.test_ui_proxy import reset, sim_stats

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

GENERATE = "document.querySelector('#txt2img_generate')"
IMAGE = "(document.querySelector('#txt2img_gallery img') || {}).src"
LOBBY = "(document.getElementById('position') || {}).textContent"


@pytest.fixture
async def chrome(tmp_path: Path) -> AsyncIterator[Chromium]:
    binary = require_binary("chromium", install="apt-get install chromium")
    async with chromium(binary, tmp_path / "chromium") as browser:
        yield browser


async def open_ui(browser: Browser, proxy: ProxyUnderTest) -> None:
    await browser.goto(proxy.url + "/")
    await browser.wait_for(f"{GENERATE} !== null")


async def click_generate(browser: Browser) -> str:
    """Click Generate; the src of the image the UI shows when done."""
    await browser.eval(f"{GENERATE}.click()")
    src: str = await browser.wait_for(IMAGE, timeout_s=60)
    return src


async def session_pod(proxy: ProxyUnderTest, browser: Browser) -> str:
    """The pod the browser's session cookie names, per the proxy's status."""
    (cookie,) = [c for c in await browser.cookies() if c["name"] == "sdproxy_ui"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    sid = cookie["value"].split(".")[0]
    ui = proxy.ui
    assert ui is not None
    session = ui.sessions.find(sid)
    assert session is not None, "the browser's cookie names no live session"
    return session.pod_id


async def test_generate_shows_the_image_while_api_clients_hammer_the_proxy(
    ui_sims: UiSims, proxy_factory: ProxyFactory, chrome: Chromium
) -> None:
    await reset(ui_sims)
    proxy = await proxy_factory(ui_sims.urls[:2], "--ui")
    browser = await chrome.new_browser()
    await open_ui(browser, proxy)
    pod = await session_pod(proxy, browser)

    async def api_call() -> str:
        async with proxy.client.post(TXT2IMG, json=gen_body(10)) as resp:
            assert resp.status == 200
            return resp.headers["X-Sdproxy-Pod"]

    hammer = asyncio.gather(*(api_call() for _ in range(10)))
    src = await click_generate(browser)
    assert src.startswith(proxy.url + "/file="), src
    status = await browser.eval(
        f"fetch({src!r}).then(r => r.status + ' ' + r.headers.get('content-type'))"
    )
    assert status == "200 image/png"
    api_pods = await hammer
    assert pod not in api_pods, "an API job ran on the pod the UI session holds"
    polls = await browser.wait_for("window.sdproxyProgressPolls")
    assert polls >= 1, "the page's /internal/progress polls did not get through"

    await browser.goto(proxy.url + "/")  # a reload keeps the session and its pod
    await browser.wait_for(f"{GENERATE} !== null")
    assert await session_pod(proxy, browser) == pod
    for url in ui_sims.urls[:2]:
        stats = await sim_stats(url)
        assert stats["heavy_inflight_max"] <= 1, (url, stats)
    assert (await proxy.status())["queue"]["depth"] == 0


async def test_two_browsers_two_pods_a_third_waits_and_gets_in(
    ui_sims: UiSims, proxy_factory: ProxyFactory, chrome: Chromium
) -> None:
    proxy = await proxy_factory(ui_sims.urls[:2], "--ui", "--ui-idle-s", "4")
    first, second, third, fourth = [await chrome.new_browser() for _ in range(4)]
    await open_ui(first, proxy)
    await open_ui(second, proxy)
    assert await session_pod(proxy, first) != await session_pod(proxy, second)

    await third.goto(proxy.url + "/")
    assert await third.wait_for(LOBBY) == "1"
    assert await third.eval(f"{GENERATE} === null")
    await fourth.goto(proxy.url + "/")
    assert await fourth.wait_for(LOBBY) == "2"
    operator = await chrome.new_browser()  # the status page shows the sessions and lobby
    await operator.goto(proxy.url + "/-/status")
    shown = "[$('ui-sessions'), $('ui-lobby-depth')].map(e => e && e.textContent).join()"
    assert await operator.wait_for(f"{shown} === '2,2' && {shown}") == "2,2"

    # the first leaves: the third is moved in by its lobby page, and generates
    leaving = await first.eval("fetch('/-/ui/session', {method: 'DELETE'}).then(r => r.json())")
    assert leaving["ended"] is True
    await third.wait_for(f"{GENERATE} !== null", timeout_s=20)
    assert (await click_generate(third)).startswith(proxy.url + "/file=")
    assert await fourth.eval(LOBBY) == "1"

    # the second does nothing for --ui-idle-s: its pod goes to the fourth
    await fourth.wait_for(f"{GENERATE} !== null", timeout_s=30)
    await second.goto(proxy.url + "/")
    assert "ended" in await second.wait_for("document.title.toLowerCase()")
    assert "idle" in await second.eval("document.getElementById('reason').textContent")


async def test_scale_from_zero_the_lobby_holds_the_browser_until_a_pod_is_warm(
    proxy_factory: ProxyFactory, chrome: Chromium
) -> None:
    require_gradio()  # the local pods are sim --ui
    proxy = await proxy_factory(
        [],
        "--ui",
        "--scaler",
        "local",
        "--local-ui",
        "--local-startup-s",
        "0",
        "--local-base-port",
        "17950",
        "--min-pods",
        "0",
    )
    assert (await proxy.status())["autoscaler"]["ready"] == 0
    browser = await chrome.new_browser()
    await browser.goto(proxy.url + "/")
    assert await browser.wait_for(LOBBY) == "1"

    async def asked_for_a_pod() -> bool:
        return bool((await proxy.status())["autoscaler"]["desired"] == 1)

    await eventually(asked_for_a_pod, timeout_s=10, what="the lobby to ask for a pod")
    await browser.wait_for(f"{GENERATE} !== null", timeout_s=60)
    assert (await click_generate(browser)).startswith(proxy.url + "/file=")
