"""Integration: ``sdproxy sim`` as a process — help, listening lines, requests, SIGTERM."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

pytestmark = pytest.mark.timeout(30)

LINE = re.compile(r"^sim pod (\d+) listening on (http://127\.0\.0\.1:\d+)$")


def sdproxy_command() -> list[str]:
    """The installed console script, else the module (same entry point)."""
    script = shutil.which("sdproxy", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "sdproxy"]


async def test_help_lists_the_flags() -> None:
    proc = await asyncio.create_subprocess_exec(
        *sdproxy_command(), "sim", "--help", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    text = out.decode()
    flags = "--pods --port --host --step-ms --threads --checkpoints --switch-s --startup-s"
    for flag in (*flags.split(), "--vram-pixels", "--fail-rate", "--seed"):
        assert flag in text


async def test_two_pods_start_print_their_urls_serve_and_stop_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        *sdproxy_command(), "sim", "--pods", "2", "--port", "0", "--step-ms", "5",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        urls = []
        async with asyncio.timeout(15):
            for expected in range(2):
                match = LINE.match((await proc.stdout.readline()).decode().strip())
                assert match and int(match.group(1)) == expected
                urls.append(match.group(2))
        assert len(set(urls)) == 2
        async with aiohttp.ClientSession() as session:
            body = {"steps": 2, "send_images": False}
            async with session.post(urls[1] + "/sdapi/v1/txt2img", json=body) as resp:
                assert resp.status == 200
            completed = []
            for url in urls:
                async with session.get(url + "/sim/stats") as resp:
                    completed.append((await resp.json())["completed"])
            assert completed == [0, 1]
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_bad_flags_exit_2() -> None:
    proc = await asyncio.create_subprocess_exec(
        *sdproxy_command(), "sim", "--threads", "0", "--port", "0",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"threads" in err
