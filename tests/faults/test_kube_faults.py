"""Faults: the Kubernetes side misbehaves while clients keep the proxy busy.

Readiness flapping (every pod's endpoint flips ready/unready every few tens of ms) and a
410 storm (every open EndpointSlice watch ended with 410 Gone, ten times a second), each
under a steady load of generations and light calls through the fake Kubernetes API (the
real kubernetes_asyncio client, the real wire protocol). Afterwards: no pod ever ran
more than its limit, every answer was a 200 or a JSON error with a stable code, the
proxy is idle (no slot leaked), and it sees exactly the pods Kubernetes lists.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sdproxy import settings as settings_mod
from sdproxy.cli import build_parser
from sdproxy.core.pods import PodState
from sdproxy.runtime.app import SERVICES, build_app
from sdproxy.sim.config import SimConfig
from sdproxy.sim.server import run_pods
from tests.conftest import free_port
from tests.fakekube import FakeKube, load_role_rules, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]
ROLE = Path(__file__).resolve().parents[2] / "deploy" / "base" / "rbac.yaml"
TXT2IMG = {"prompt": "a lighthouse", "steps": 10, "width": 256, "height": 256}
PODS = 3
#: a pod may go unready under a queued job's feet: the job waits for another pod
ALLOWED_ERRORS = {"no_backends", "queue_timeout", "backend_error"}


@dataclass
class Fleet:
    kube: FakeKube
    urls: list[str]
    proxy: str
    app: web.Application

    async def pod_stats(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        stats = []
        for url in self.urls:
            async with session.get(url + "/sim/stats") as resp:
                stats.append(await resp.json())
        return stats


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    async with (
        FakeKube(rules=load_role_rules(ROLE)) as kube,
        run_pods(SimConfig(step_ms=5), count=PODS) as urls,
    ):
        for index, url in enumerate(urls):
            port = int(url.rsplit(":", 1)[1])
            kube.add_endpoint(f"sd-webui-{index}", "127.0.0.1", port=port, slice_name=f"s{index}")
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig", namespace="sd")
        port = free_port()
        args = build_parser().parse_args(
            [
                "serve",
                f"--listen=127.0.0.1:{port}",
                "--metrics-listen=",
                "--discovery=kubernetes",
                "--namespace=sd",
                "--service=sd-webui",
                "--port-name=http",
                f"--kubeconfig={kubeconfig}",
                "--scaler=none",
                "--queue-timeout-s=30",
                "--access-log=false",
                "--check-invariants",
            ]
        )
        app = build_app(settings_mod.load(args, env={}))
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            admission = app[SERVICES].admission
            await wait_until(
                lambda: sum(p.state is PodState.READY for p in admission.pods.values()) == PODS,
                what="the pods ready",
            )
            yield Fleet(kube=kube, urls=urls, proxy=f"http://127.0.0.1:{port}", app=app)
        finally:
            await runner.cleanup()


async def load_while(
    fleet: Fleet, session: aiohttp.ClientSession, fault: Callable[[], Any], seconds: float
) -> Counter[str]:
    """Generations and light calls from 8 clients while ``fault`` runs for ``seconds``."""
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def client(heavy: bool) -> None:
        while not stop.is_set():
            if heavy:
                request = session.post(fleet.proxy + "/sdapi/v1/txt2img", json=TXT2IMG)
            else:
                request = session.get(fleet.proxy + "/sdapi/v1/sd-models")
            async with request as resp:
                data = await resp.json(content_type=None)
                if resp.status == 200:
                    outcomes["heavy ok" if heavy else "light ok"] += 1
                else:
                    assert isinstance(data, dict) and "error" in data, (resp.status, data)
                    outcomes[str(data["error"])] += 1

    clients = [asyncio.create_task(client(heavy=i < 6)) for i in range(8)]
    faulting = asyncio.create_task(fault())
    await asyncio.sleep(seconds)
    faulting.cancel()
    stop.set()
    await asyncio.gather(*clients)
    return outcomes


async def settled(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    """Limits held, nothing in flight or queued, the proxy's pods are Kubernetes's."""
    services = fleet.app[SERVICES]
    for stats in await fleet.pod_stats(session):
        assert stats["heavy_inflight_max"] <= 1, stats
    await wait_until(
        lambda: services.admission.inflight == 0 and len(services.admission.queue) == 0,
        what="the proxy idle",
    )
    services.admission.check(services.clock())

    async def same_pods() -> bool:
        async with session.get(fleet.proxy + "/-/status") as resp:
            pods = (await resp.json())["pods"]
        return sorted((p["id"], p["state"]) for p in pods) == [
            (f"sd-webui-{i}", "ready") for i in range(PODS)
        ]

    deadline = asyncio.get_running_loop().time() + 15
    while not await same_pods():
        assert asyncio.get_running_loop().time() < deadline, "the proxy never caught up"
        await asyncio.sleep(0.1)


async def test_readiness_flapping_under_load(fleet: Fleet) -> None:
    rng = random.Random(7)
    flips = 0

    async def flap() -> None:
        nonlocal flips
        while True:
            pod = f"sd-webui-{rng.randrange(PODS)}"
            fleet.kube.set_endpoint(pod, ready=False, serving=False)
            await asyncio.sleep(rng.uniform(0.01, 0.05))
            fleet.kube.set_endpoint(pod, ready=True, serving=True)
            flips += 1
            await asyncio.sleep(rng.uniform(0.0, 0.03))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        outcomes = await load_while(fleet, session, flap, seconds=5.0)
        for index in range(PODS):  # the flapper may have stopped between its two steps
            fleet.kube.set_endpoint(f"sd-webui-{index}", ready=True, serving=True)
        await settled(fleet, session)
    assert flips >= 50, flips
    assert outcomes["heavy ok"] >= 100 and outcomes["light ok"] >= 20, outcomes
    errors = set(outcomes) - {"heavy ok", "light ok"}
    assert errors <= ALLOWED_ERRORS, outcomes
    # pods come back on every flip: nearly everything is served
    assert sum(outcomes[e] for e in errors) <= outcomes["heavy ok"] // 10, outcomes


async def test_410_storm_under_load(fleet: Fleet) -> None:
    kube = fleet.kube
    lists_before = len(kube.calls(verb="list"))
    storms = 0

    async def storm() -> None:
        nonlocal storms
        while True:
            # changes the watches miss while they are being expired, then the 410
            kube.set_endpoint(f"sd-webui-{storms % PODS}", ready=True, serving=True)
            kube.expire_watches()
            storms += 1
            await asyncio.sleep(0.1)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        outcomes = await load_while(fleet, session, storm, seconds=5.0)
        await settled(fleet, session)
        async with session.get(fleet.proxy + "/-/status") as resp:
            assert (await resp.json())["discovery"]["connected"] is True
    assert storms >= 30, storms
    relists = len(kube.calls(verb="list")) - lists_before
    # re-listed after the storm began, but paced: far fewer LISTs than 410s
    assert 2 <= relists <= storms // 2, (relists, storms)
    assert set(outcomes) == {"heavy ok", "light ok"}, outcomes
    assert outcomes["heavy ok"] >= 100, outcomes
