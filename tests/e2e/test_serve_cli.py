"""End to end: ``sdproxy sim`` and ``sdproxy serve`` as real processes (``python -m sdproxy``).

A generation through the proxy, Prometheus /metrics on the separate listener, a SIGTERM
drain (the running generations complete AND the queued request is still served, so a
rolling update loses nothing; past --drain-timeout-s what still waits is answered 503
shutting_down; the process exits 0), and settings from SDPROXY_* variables and a --config
TOML file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

TXT2IMG = "/sdapi/v1/txt2img"
START_TIMEOUT_S = 20.0


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without SDPROXY_* settings leaking in, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDPROXY_")}
    env.update(extra or {})
    return env


@contextlib.asynccontextmanager
async def process(
    args: list[str], log: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m sdproxy ARGS`` with output in ``log``; killed and reaped on exit."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sdproxy",
            *args,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=child_env(env),
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def read_log(path: Path) -> str:
    """A child's output so far (small files; read synchronously on purpose)."""
    return path.read_text()


async def wait_for(check: Any, what: str, log: Path) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}; log:\n{read_log(log)}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def sim(tmp_path: Path, pods: int = 2) -> AsyncIterator[list[str]]:
    log = tmp_path / "sim.log"
    args = ["sim", "--pods", str(pods), "--port", "0", "--step-ms", "10", "--seed", "1"]
    async with process(args, log) as proc:

        async def urls() -> list[str] | None:
            assert proc.returncode is None, read_log(log)
            lines = [ln for ln in read_log(log).splitlines() if " listening on " in ln]
            return [ln.rsplit(" ", 1)[1] for ln in lines] if len(lines) == pods else None

        found: list[str] = await wait_for(urls, "the simulated pods", log)
        yield found


async def ready(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url + "/-/readyz") as resp:
            return resp.status == 200
    except aiohttp.ClientConnectionError:
        return False


@contextlib.asynccontextmanager
async def serve(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    flags: list[str],
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, Path]]:
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / f"serve-{port}.log"
    args = ["serve", "--listen", f"127.0.0.1:{port}", *flags]
    async with process(args, log, env) as proc:

        async def up() -> bool:
            assert proc.returncode is None, read_log(log)
            return await ready(session, url)

        await wait_for(up, "the proxy to be ready", log)
        yield proc, url, log


async def status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/-/status", headers={"Accept": "application/json"}) as r:
        data: dict[str, Any] = await r.json()
        return data


async def generate(session: aiohttp.ClientSession, url: str, steps: int) -> tuple[int, Any]:
    body = {"prompt": "a cat", "steps": steps, "send_images": False}
    async with session.post(url + TXT2IMG, json=body) as resp:
        return resp.status, await resp.json()


def backend_flags(urls: list[str]) -> list[str]:
    return [flag for url in urls for flag in ("--backend", url)]


async def test_serve_generates_exports_metrics_and_drains_on_sigterm(tmp_path: Path) -> None:
    metrics_port = free_port()
    async with (
        aiohttp.ClientSession() as session,
        sim(tmp_path) as pods,
        serve(
            tmp_path,
            session,
            ["--metrics-listen", f"127.0.0.1:{metrics_port}", *backend_flags(pods)],
        ) as (proc, url, log),
    ):
        code, data = await generate(session, url, 5)
        assert code == 200, data
        assert data["info"]
        async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        assert "sdproxy_requests_total" in text
        assert 'route_class="heavy"' in text

        running = [asyncio.create_task(generate(session, url, 300)) for _ in pods]

        async def busy_and_queued() -> bool:
            snap = await status(session, url)
            return bool(snap["inflight"] == len(pods) and snap["queue"]["depth"] == 1)

        queued = asyncio.create_task(generate(session, url, 5))
        await wait_for(busy_and_queued, "every pod busy and one request queued", log)
        proc.send_signal(signal.SIGTERM)

        async def unready() -> bool:
            async with session.get(url + "/-/readyz") as resp:
                return resp.status == 503

        await wait_for(unready, "the replica to turn unready", log)
        assert not any(task.done() for task in running), "generations were cut short"
        for code, data in await asyncio.gather(*running):
            assert code == 200, data
        code, data = await queued
        assert code == 200, f"the queued request was not served during the drain: {data}"
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0, read_log(log)


async def test_sigterm_answers_what_still_waits_after_the_drain_timeout(tmp_path: Path) -> None:
    async with (
        aiohttp.ClientSession() as session,
        sim(tmp_path, pods=1) as pods,
        serve(
            tmp_path,
            session,
            ["--metrics-listen", "", "--drain-timeout-s", "1", *backend_flags(pods)],
        ) as (proc, url, log),
    ):
        running = asyncio.create_task(generate(session, url, 600))

        async def busy_and_queued() -> bool:
            snap = await status(session, url)
            return bool(snap["inflight"] == 1 and snap["queue"]["depth"] == 1)

        queued = asyncio.create_task(generate(session, url, 5))
        await wait_for(busy_and_queued, "the pod busy and one request queued", log)
        proc.send_signal(signal.SIGTERM)
        code, data = await queued
        assert code == 503 and data["error"] == "shutting_down", data
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0, read_log(log)
        running.cancel()


async def test_settings_from_environment_and_toml(tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as session, sim(tmp_path, pods=1) as pods:
        config = tmp_path / "sdproxy.toml"
        config.write_text(
            "[proxy]\nmax_queue = 0\nqueue_timeout_s = 42.0\n"
            f"[discovery]\nbackends = [{pods[0]!r}]\n".replace("'", '"')
        )
        common = ["--metrics-listen", ""]
        # TOML alone: max_queue 0, and the backend list comes from the file
        async with serve(tmp_path, session, [*common, "--config", str(config)]) as (_, url, _):
            snap = await status(session, url)
            assert snap["queue"]["max"] == 0 and snap["queue"]["timeout_s"] == 42.0
            assert [p["url"] for p in snap["pods"]] == pods
            running = asyncio.create_task(generate(session, url, 100))

            async def busy() -> bool:
                return bool((await status(session, url))["inflight"] == 1)

            await wait_for(busy, "the pod to be busy", tmp_path / "sim.log")
            code, data = await generate(session, url, 5)
            assert code == 503 and data["error"] == "queue_full", data
            assert (await running)[0] == 200
        # the environment beats the file (SDPROXY_CONFIG names the file), a flag beats both
        env = {"SDPROXY_CONFIG": str(config), "SDPROXY_MAX_QUEUE": "7"}
        async with serve(tmp_path, session, common, env) as (_, url, _):
            snap = await status(session, url)
            assert snap["queue"]["max"] == 7 and snap["queue"]["timeout_s"] == 42.0
        flags = [*common, "--max-queue", "9"]
        async with serve(tmp_path, session, flags, env) as (_, url, _):
            assert (await status(session, url))["queue"]["max"] == 9


@pytest.mark.parametrize("which", ["--listen", "--metrics-listen"])
def test_an_address_in_use_is_a_clear_error(which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        addresses = {"--listen": f"127.0.0.1:{free_port()}", "--metrics-listen": ""}
        addresses[which] = busy
        argv = [sys.executable, "-m", "sdproxy", "serve", "--backend", "http://127.0.0.1:9"]
        for flag, value in addresses.items():
            argv += [flag, value]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=child_env())
    assert proc.returncode == 2, proc.stderr
    assert f"sdproxy: error: cannot listen on {busy}" in proc.stderr
    assert "Traceback" not in proc.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m sdproxy ARGS`` to completion (20 s at most: a proxy that started serving
    instead of refusing its settings fails the test by timing out)."""
    env = {**child_env(), "COLUMNS": "200"}
    argv = [sys.executable, "-m", "sdproxy", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=20, env=env)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        pytest.param(["--backend", "notaurl"], "--backend", id="not-a-url"),
        pytest.param(["--backend", "127.0.0.1:7860"], "--backend", id="no-scheme"),
        pytest.param(["--backend", "http://h:99999"], "--backend", id="url-port-range"),
        pytest.param(
            ["--backend", "http://127.0.0.1:9", "--listen", "127.0.0.1:99999"],
            "--listen",
            id="listen-port-range",
        ),
    ],
)
def test_a_bad_url_or_address_exits_2_with_one_line_naming_the_flag(
    argv: list[str], flag: str
) -> None:
    listen = ["--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", ""]
    proc = run_cli("serve", *listen, *argv)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"sdproxy: error: {flag}: "), proc.stderr


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        pytest.param(
            "serve",
            [
                "(default: 127.0.0.1:8000) [env SDPROXY_LISTEN]",
                "(default: 4) [env SDPROXY_MAX_SCALE_STEP]",
                "(default: $POD_NAME or hostname) [env SDPROXY_IDENTITY]",
            ],
            id="serve",
        ),
        pytest.param("demo", ["(default: 127.0.0.1:9100)", "(default: 60.0)"], id="demo"),
    ],
)
def test_help_shows_the_defaults(command: str, expected: list[str]) -> None:
    proc = run_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    for text in expected:
        assert text in proc.stdout, proc.stdout
