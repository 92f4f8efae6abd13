"""The real proxy's /-/status page in headless Chromium shows the live queue and pods."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sdproxy import settings as settings_mod
from sdproxy.cli import build_parser
from sdproxy.runtime.app import SERVICES, build_app
from sdproxy.sim.config import SimConfig
from sdproxy.sim.server import run_pods
from tests.conftest import free_port, require_binary
from tests.fakekube import wait_until
from tests.integration.test_status_page import dump_dom, element_text

pytestmark = pytest.mark.timeout(90)
LONG = {"prompt": "slow", "steps": 400, "width": 512, "height": 512}  # 400 × 25 ms = 10 s


@pytest.fixture
async def proxy_with_pods() -> AsyncIterator[tuple[web.Application, str, list[str]]]:
    async with run_pods(SimConfig(step_ms=25), count=2) as urls:
        port = free_port()
        flags = ["serve", f"--listen=127.0.0.1:{port}", "--metrics-listen=", "--access-log=false"]
        args = build_parser().parse_args([*flags, *(f"--backend={u}" for u in urls)])
        app = build_app(settings_mod.load(args, env={}))
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield app, f"http://127.0.0.1:{port}", urls
        finally:
            await runner.cleanup()


async def test_status_page_renders_the_live_proxy(
    proxy_with_pods: tuple[web.Application, str, list[str]], tmp_path: Path
) -> None:
    chromium = require_binary("chromium", install="apt-get install chromium")
    app, url, urls = proxy_with_pods
    admission = app[SERVICES].admission
    async with aiohttp.ClientSession() as session:

        async def generate() -> int:
            async with session.post(url + "/sdapi/v1/txt2img", json=LONG) as resp:
                await resp.read()
                return resp.status

        clients = [asyncio.create_task(generate()) for _ in range(5)]
        try:
            await wait_until(lambda: len(admission.queue) == 3, what="2 running, 3 queued")
            dom = await dump_dom(chromium, url + "/-/status", tmp_path / "profile")
        finally:
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
    assert element_text(dom, "queue-depth") == "3"
    assert element_text(dom, "ready-pods") == "2"
    for pod_url in urls:
        pod_id = pod_url.removeprefix("http://")
        row = re.search(rf'<tr[^>]*data-pod="{re.escape(pod_id)}"[^>]*>(.*?)</tr>', dom, re.S)
        assert row, f"no row for {pod_id}"
        assert "ready" in row.group(1)
        assert re.search(r">\s*1\s*/\s*1\s*<", row.group(1)), row.group(1)
