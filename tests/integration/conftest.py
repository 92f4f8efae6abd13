"""Integration fixtures for the proxy: simulated pods and proxies on real loopback sockets.

``sim_pods`` starts simulated sd-webui pods (``sdproxy.sim.server.run_pods``), each in its
own exit stack so one can be killed mid-test; ``proxy_factory`` runs ``build_app`` under
a real ``web.AppRunner(handler_cancellation=True)`` + ``TCPSite`` on an ephemeral port,
which is how ``sdproxy serve`` runs it (cancellation is what lets the proxy notice a
client that went away). Names are prefixed so they do not clash with other fixtures in
this folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sdproxy import settings
from sdproxy.cli import build_parser
from sdproxy.runtime.app import SERVICES, Services, build_app
from sdproxy.runtime.podgate import build_gate_app
from sdproxy.runtime.ui import UiFront
from sdproxy.sim.config import SimConfig
from sdproxy.sim.server import run_pods
from tests.conftest import unavailable

TXT2IMG = "/sdapi/v1/txt2img"
#: how long a wait for a condition may take on a busy 2-core machine before failing
DEADLINE_S = 10.0


def gen_body(steps: int, **extra: Any) -> dict[str, Any]:
    """A 512x512 txt2img body: the sim takes ``steps × step_ms`` to answer it."""
    return {"prompt": "a cat", "steps": steps, "send_images": False, **extra}


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float = DEADLINE_S, what: str = ""
) -> None:
    """Poll ``check`` until it holds; fail with ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what or check}")
        await asyncio.sleep(0.01)


@dataclass(kw_only=True)
class SimCluster:
    """Simulated pods on loopback, with a session to read their /sim/stats."""

    urls: list[str]
    session: aiohttp.ClientSession
    stacks: list[contextlib.AsyncExitStack]
    alive: list[bool] = field(default_factory=list)

    async def stats(self, index: int) -> dict[str, Any]:
        async with self.session.get(self.urls[index] + "/sim/stats") as resp:
            assert resp.status == 200
            data: dict[str, Any] = await resp.json()
            return data

    async def all_stats(self) -> list[dict[str, Any]]:
        """Stats of every pod still alive, in order."""
        return [await self.stats(i) for i, up in enumerate(self.alive) if up]

    async def kill(self, index: int) -> None:
        """Close pod ``index``'s server (in-flight requests get the sim's short grace)."""
        self.alive[index] = False
        await self.stacks[index].aclose()

    async def total(self, key: str) -> int:
        return sum(int(s[key]) for s in await self.all_stats())


SimFactory = Callable[..., Awaitable[SimCluster]]


@pytest.fixture
async def sim_pods() -> AsyncIterator[SimFactory]:
    """``await sim_pods(count, **SimConfig fields)`` -> a SimCluster (step_ms 10 default)."""
    async with contextlib.AsyncExitStack() as outer:
        session = await outer.enter_async_context(aiohttp.ClientSession())

        async def start(count: int = 2, **overrides: Any) -> SimCluster:
            config = SimConfig(**{"step_ms": 10.0, "switch_s": 0.1, "seed": 7, **overrides})
            urls: list[str] = []
            stacks: list[contextlib.AsyncExitStack] = []
            for _ in range(count):
                stack = contextlib.AsyncExitStack()
                outer.push_async_callback(stack.aclose)
                (url,) = await stack.enter_async_context(run_pods(config, count=1))
                urls.append(url)
                stacks.append(stack)
            return SimCluster(urls=urls, session=session, stacks=stacks, alive=[True] * count)

        yield start


@dataclass(kw_only=True)
class ProxyUnderTest:
    """One running proxy: its URL, its app (for white-box end checks) and a client."""

    url: str
    app: web.Application
    client: aiohttp.ClientSession

    @property
    def services(self) -> Services:
        return self.app[SERVICES]

    @property
    def ui(self) -> UiFront:
        """The proxy's browser-UI front (the proxy runs with --ui)."""
        proxy = self.services.proxy
        assert proxy is not None and proxy.ui is not None, "a proxy started with --ui"
        return proxy.ui

    async def status(self) -> dict[str, Any]:
        async with self.client.get("/-/status", headers={"Accept": "application/json"}) as r:
            assert r.status == 200
            data: dict[str, Any] = await r.json()
            return data

    async def wait_queue(self, depth: int) -> None:
        async def check() -> bool:
            return bool((await self.status())["queue"]["depth"] == depth)

        await eventually(check, what=f"queue depth {depth}")

    async def wait_inflight(self, count: int) -> None:
        async def check() -> bool:
            return bool((await self.status())["inflight"] == count)

        await eventually(check, what=f"{count} in flight")

    async def wait_idle(self) -> None:
        """No slot held, nothing queued, no abandoned exchange still draining."""

        async def check() -> bool:
            status = await self.status()
            proxy = self.services.proxy
            background = len(proxy._background) if proxy is not None else 0
            return bool(
                status["inflight"] == 0
                and status["queue"]["depth"] == 0
                and all(p["inflight"] == 0 for p in status["pods"])
                and background == 0
            )

        await eventually(check, what="the proxy to be idle (no slot leaks)")


ProxyFactory = Callable[..., Awaitable[ProxyUnderTest]]


@dataclass(kw_only=True)
class GatedCluster:
    """Simulated pods, each behind an in-process ``sdproxy gate``."""

    sims: SimCluster
    urls: list[str]
    runners: list[web.AppRunner]

    async def occupancy(self, index: int) -> dict[str, Any]:
        async with self.sims.session.get(self.urls[index] + "/-/gate") as resp:
            assert resp.status == 200
            data: dict[str, Any] = await resp.json()
            return data

    async def kill_gate(self, index: int) -> None:
        await self.runners[index].cleanup()


GatedFactory = Callable[..., Awaitable[GatedCluster]]


@pytest.fixture
async def gated_pods(sim_pods: SimFactory) -> AsyncIterator[GatedFactory]:
    """``await gated_pods(count, limit=1, **SimConfig fields)`` -> a GatedCluster."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(count: int = 2, *, limit: int = 1, **overrides: Any) -> GatedCluster:
            sims = await sim_pods(count, **overrides)
            urls, runners = [], []
            for sim_url in sims.urls:
                argv = ["gate", "--listen", "127.0.0.1:0", "--upstream", sim_url]
                ns = build_parser().parse_args([*argv, "--max-inflight", str(limit)])
                app = build_gate_app(settings.load_gate(ns, env={}).gate)
                runner = web.AppRunner(
                    app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0
                )
                await runner.setup()
                stack.push_async_callback(runner.cleanup)
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
                runners.append(runner)
            return GatedCluster(sims=sims, urls=urls, runners=runners)

        yield start


def proxy_settings(backends: list[str], *flags: str) -> settings.Settings:
    argv = ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", ""]
    for url in backends:
        argv += ["--backend", url]
    return settings.load(build_parser().parse_args([*argv, *flags]), env={})


@pytest.fixture
async def proxy_factory() -> AsyncIterator[ProxyFactory]:
    """``await proxy_factory(backend_urls, *serve_flags)`` -> a ready ProxyUnderTest."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(backends: list[str], *flags: str) -> ProxyUnderTest:
            app = build_app(proxy_settings(backends, *flags))
            runner = web.AppRunner(
                app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0
            )
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            connector = aiohttp.TCPConnector(limit=0)
            client = aiohttp.ClientSession(base_url=url, connector=connector)
            stack.push_async_callback(client.close)
            proxy = ProxyUnderTest(url=url, app=app, client=client)

            async def ready() -> bool:
                async with client.get("/-/readyz") as resp:
                    return resp.status == 200

            await eventually(ready, what="/-/readyz")
            return proxy

        yield start


@dataclass(kw_only=True)
class UiSims:
    """``sdproxy sim --ui`` pods (a real Gradio 3.41 app each) in one child process."""

    urls: list[str]


def require_gradio() -> None:
    """The ``ui`` extra: skipped without it, except in CI (``CI=true`` never skips)."""
    if importlib.util.find_spec("gradio") is None:
        unavailable("gradio not installed: pip install -e '.[dev,ui]'")


def _start_ui_sims(count: int) -> tuple[subprocess.Popen[bytes], list[str]]:
    """Start the child and read its "listening" lines (Gradio's import takes seconds)."""
    require_gradio()
    argv = ["sim", "--ui", "--pods", str(count), "--port", "0", "--step-ms", "25", "--seed", "3"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdproxy", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    urls: list[str] = []
    while len(urls) < count:
        line = proc.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"sdproxy sim --ui exited with {proc.wait()}")
        if " listening on " in line:
            urls.append(line.rsplit(" ", 1)[1].strip())
    return proc, urls


@pytest.fixture(scope="module")
def ui_sims() -> Iterator[UiSims]:
    """Three UI pods for a whole test module (tests reset their counters)."""
    proc, urls = _start_ui_sims(3)
    try:
        yield UiSims(urls=urls)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
