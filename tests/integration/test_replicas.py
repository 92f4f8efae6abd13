"""End to end: three ``sdproxy serve`` processes in front of four gated simulated pods.

Bursts spread over the replicas, random client disconnects, one replica SIGKILLed while it
runs generations, and one pod killed mid-run. Afterwards: no pod ever ran more than its
limit (``heavy_inflight_max`` from ``/sim/stats``), every request sent to a surviving
replica completed or got a clear JSON error, no slot is left taken at any gate, and the
generations the killed replica was running were interrupted at their pods by the gates.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.test_serve_cli import process, read_log, ready, wait_for
from tests.integration.conftest import GatedFactory, eventually, gen_body

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TXT2IMG = "/sdapi/v1/txt2img"


@contextlib.asynccontextmanager
async def replicas(
    tmp_path: Path, session: aiohttp.ClientSession, gates: list[str], count: int
) -> AsyncIterator[list[tuple[asyncio.subprocess.Process, str, Path]]]:
    from tests.conftest import free_port

    ports = [free_port() for _ in range(count)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    async with contextlib.AsyncExitStack() as stack:
        started = []
        for port, url in zip(ports, urls, strict=True):
            flags = ["serve", "--listen", f"127.0.0.1:{port}", "--metrics-listen", ""]
            flags += [f for g in gates for f in ("--backend", g)]
            flags += [f for u in urls if u != url for f in ("--peer", u)]
            flags += ["--access-log", "false", "--max-queue", "200"]
            log = tmp_path / f"replica-{port}.log"
            proc = await stack.enter_async_context(process(flags, log))
            started.append((proc, url, log))
        for proc, url, log in started:

            async def up(proc: Any = proc, url: str = url, log: Path = log) -> bool:
                assert proc.returncode is None, read_log(log)
                return await ready(session, url)

            await wait_for(up, "a replica to be ready", log)
        yield started


async def status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/-/status", headers={"Accept": "application/json"}) as r:
        data: dict[str, Any] = await r.json()
        return data


async def test_three_replicas_four_gated_pods_kill_a_replica_and_a_pod(
    tmp_path: Path, gated_pods: GatedFactory
) -> None:
    cluster = await gated_pods(4, step_ms=5.0)
    rng = random.Random(11)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        replicas(tmp_path, session, cluster.urls, 3) as front,
    ):
        for _proc, url, _log in front:

            async def gated(url: str = url) -> bool:
                pods = (await status(session, url))["pods"]
                return len(pods) == 4 and all(p["mode"] == "gated" for p in pods)

            await eventually(gated, what="every replica to see every pod through its gate")
        victim_proc, victim_url, _ = front[2]
        async with session.get(victim_url + "/-/peer") as resp:
            victim_id = (await resp.json())["replica"]

        outcomes: list[tuple[int, str]] = []

        async def one(index: int) -> None:
            replica = index % 3
            url = front[replica][1]
            # the victim's generations are long, so they surely run when it is killed
            steps = 4000 if replica == 2 else rng.randint(20, 80)
            try:
                async with session.post(url + TXT2IMG, json=gen_body(steps)) as r:
                    data = await r.json(content_type=None)
                    code = "ok" if r.status == 200 else str(data.get("error"))
                    outcomes.append((replica, code))
            except aiohttp.ClientError:
                outcomes.append((replica, "connection"))

        tasks = [asyncio.create_task(one(i)) for i in range(60)]
        # random client disconnects: some callers give up mid-way
        await asyncio.sleep(0.3)
        for task in rng.sample(tasks, 10):
            task.cancel()

        async def victim_runs_something() -> bool:
            for index in range(3):
                occupancy = await cluster.occupancy(index)
                if any(c["replica"] == victim_id for c in occupancy["running"]):
                    return True
            return False

        await eventually(victim_runs_something, what="the victim replica to run a generation")
        await asyncio.sleep(0.3)  # let it take more slots as the short jobs finish
        # pods 0-2 survive: the interrupts the gates send there can be counted
        victim_claims = 0
        interrupts_before = 0
        for index in range(3):
            occupancy = await cluster.occupancy(index)
            victim_claims += sum(1 for c in occupancy["running"] if c["replica"] == victim_id)
            interrupts_before += (await cluster.sims.stats(index))["interrupts_received"]
        victim_proc.send_signal(signal.SIGKILL)
        await victim_proc.wait()

        # one pod dies mid-run too (its max in flight so far is read first)
        killed_stats = await cluster.sims.stats(3)
        await cluster.sims.kill(3)

        await asyncio.gather(*tasks, return_exceptions=True)

        # the gates interrupted every generation the dead replica was running
        async def victim_gone_from_gates() -> bool:
            for index in range(3):
                occupancy = await cluster.occupancy(index)
                if any(c["replica"] == victim_id for c in occupancy["running"]):
                    return False
            return True

        await eventually(victim_gone_from_gates, what="the dead replica's claims to end")
        interrupts = await cluster.sims.total("interrupts_received") - interrupts_before
        assert interrupts >= victim_claims, (interrupts, victim_claims)

        # limits held everywhere
        assert killed_stats["heavy_inflight_max"] <= 1
        for stats in await cluster.sims.all_stats():
            assert stats["heavy_inflight_max"] <= 1, stats

        # survivors answered everything: completed, or a clear error code
        clear = {"ok", "backend_error", "queue_timeout", "no_backends"}
        for replica, code in outcomes:
            if replica != 2:
                assert code in clear, (replica, code, outcomes)
        assert sum(1 for r, c in outcomes if r != 2 and c == "ok") > 0

        # nothing stays taken at the gates, nothing waits at the survivors
        async def all_free() -> bool:
            busy = [(await cluster.occupancy(i))["inflight"] for i in range(3)]
            return busy == [0, 0, 0]

        await eventually(all_free, timeout_s=30, what="every gate to be free")
        for _proc, url, _log in front[:2]:
            snap = await status(session, url)
            assert snap["inflight"] == 0 and snap["queue"]["depth"] == 0, snap
