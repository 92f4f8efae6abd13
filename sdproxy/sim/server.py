"""Sim: serve N independent simulated pods from one process (``run_pods``).

Each pod is its own aiohttp application and listener with its own state and random
stream (``seed + index``), so dozens fit on two cores. Handlers are not cancelled when a
client disconnects (``handler_cancellation=False``): on a real pod the queued generation
still runs to completion (docs/sd-webui.md).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator

from aiohttp import web

from sdproxy.sim.app import make_app
from sdproxy.sim.config import SimConfig
from sdproxy.sim.state import Clock

#: on shutdown, how long in-flight requests may still take before they are cancelled
SHUTDOWN_TIMEOUT_S = 2.0


def pod_rng(config: SimConfig, index: int) -> random.Random:
    """Pod ``index``'s random stream: reproducible with --seed, independent per pod."""
    return random.Random(None if config.seed is None else config.seed * 1_000_003 + index)


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _start_one(
    config: SimConfig, *, index: int, host: str, port: int, clock: Clock | None
) -> tuple[web.AppRunner, str]:
    app = make_app(config, clock=clock, rng=pod_rng(config, index))
    runner = web.AppRunner(
        app, access_log=None, handler_cancellation=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    url = base_url(host, runner.addresses[0][1])
    if config.ui:
        from sdproxy.sim import ui  # lazily: Gradio is an optional extra

        ui.started(app, url)
    return runner, url


@contextlib.asynccontextmanager
async def run_pods(
    config: SimConfig,
    *,
    count: int = 1,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: Clock | None = None,
) -> AsyncIterator[list[str]]:
    """Start ``count`` pods on ``port``, ``port + 1``, … (every one ephemeral if port is 0)
    and yield their base URLs; stop them all on exit."""
    if count < 1:
        raise ValueError("count must be >= 1")
    runners: list[web.AppRunner] = []
    urls: list[str] = []
    try:
        for index in range(count):
            runner, url = await _start_one(
                config, index=index, host=host, port=port + index if port else 0, clock=clock
            )
            runners.append(runner)
            urls.append(url)
        yield urls
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
