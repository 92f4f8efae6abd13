"""End to end: ``sdproxy demo`` as a real process — from zero pods to an answer, and
``--replicas 2``: two replicas sharing gated simulated pods; Ctrl-C stops every process."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import free_port
from tests.e2e.test_serve_cli import process, read_log, ready, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


async def status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/-/status", headers={"Accept": "application/json"}) as r:
        data: dict[str, Any] = await r.json()
        return data


def free_run(count: int) -> int:
    """A first port such that it and the ``count - 1`` after it are free right now."""
    while True:
        base = free_port()
        if base + count < 65000 and all(_bindable(base + i) for i in range(count)):
            return base


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_demo_with_two_replicas_shares_gated_pods(tmp_path: Path) -> None:
    listen, metrics, pods = free_run(2), free_run(2), free_run(16)
    log = tmp_path / "demo.log"
    args = [
        "demo",
        "--replicas", "2",
        "--listen", f"127.0.0.1:{listen}",
        "--metrics-listen", f"127.0.0.1:{metrics}",
        "--base-port", str(pods),
        "--startup-s", "0.5",
        "--step-ms", "5",
        "--max-pods", "2",
    ]  # fmt: skip
    urls = [f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{listen + 1}"]
    async with aiohttp.ClientSession() as session, process(args, log) as proc:
        for url in urls:
            await wait_for(lambda url=url: ready(session, url), f"replica {url}", log)
        body = {"prompt": "a lighthouse", "steps": 10}

        async def generate(url: str) -> int:
            async with session.post(url + "/sdapi/v1/txt2img", json=body) as resp:
                await resp.read()
                return resp.status

        assert await asyncio.gather(*(generate(u) for u in urls * 2)) == [200] * 4
        for url in urls:
            snap = await status(session, url)
            assert snap["pods"], read_log(log)
            assert {p["mode"] for p in snap["pods"]} == {"gated"}, snap["pods"]
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0, read_log(log)
    # every simulated pod and gate it started is gone with it
    probe = await asyncio.create_subprocess_exec(
        "pgrep", "-f", f"127.0.0.1:{pods}", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await probe.communicate()
    assert out.strip() == b"", out
