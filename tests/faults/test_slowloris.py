"""Faults: slowloris on request headers, against a real ``sdproxy serve`` process.

Hundreds of connections that send a request head a byte at a time and never finish it
take no slot and no queue place (nothing is admitted before the head is whole) and are
closed after ``--client-idle-timeout-s`` (counted from the connection's start), while
other clients are served throughout; a generation that runs longer than that timeout is
not cut. (Slow request *bodies* are the upload row: ``test_proxy_upload.py``.)
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import pytest

from tests.faults.test_client_storms import serve
from tests.integration.conftest import SimFactory, gen_body

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]
IDLE_S = 2.0
LORIS = 300


async def loris(host: str, port: int, closed_after: list[float]) -> None:
    """Trickle a request head forever; note when the proxy closes the connection."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    reader, writer = await asyncio.open_connection(host, port)
    head = b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 10_000
    try:
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                    break
        else:
            raise AssertionError("the proxy kept a never-ending head open")
    except ConnectionError:
        pass
    finally:
        writer.close()
    closed_after.append(loop.time() - start)


async def test_slowloris_on_headers_holds_nothing_and_is_cut(
    tmp_path: Path, sim_pods: SimFactory
) -> None:
    sims = await sim_pods(1, step_ms=10.0)
    async with (
        aiohttp.ClientSession() as session,
        serve(tmp_path, session, sims.urls, "--client-idle-timeout-s", str(IDLE_S)) as (url, _p),
    ):
        port = int(url.rsplit(":", 1)[1])
        closed_after: list[float] = []
        lorises = [
            asyncio.create_task(loris("127.0.0.1", port, closed_after)) for _ in range(LORIS)
        ]
        # a generation longer than the idle timeout is not cut, and others are served
        long_job = asyncio.create_task(session.post(url + "/sdapi/v1/txt2img", json=gen_body(400)))
        served = 0
        for _ in range(10):
            async with session.get(url + "/sdapi/v1/sd-models") as resp:
                assert resp.status == 200
                served += 1
            await asyncio.sleep(0.1)
        async with await long_job as resp:
            assert resp.status == 200, await resp.text()
        await asyncio.gather(*lorises)
        async with session.get(url + "/-/status", headers={"Accept": "application/json"}) as r:
            snap = await r.json()
    assert served == 10
    assert len(closed_after) == LORIS
    # cut once the idle timeout passed (the timer's tick and a 2-core box add a little)
    assert min(closed_after) >= IDLE_S - 0.1, min(closed_after)
    assert max(closed_after) <= IDLE_S + 5, max(closed_after)
    assert snap["inflight"] == 0 and snap["queue"]["depth"] == 0
    assert (await sims.stats(0))["completed"] == 1, "only the long job reached the pod"
