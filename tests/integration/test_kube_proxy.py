"""The whole proxy against the fake Kubernetes API (enforcing the shipped Role) and
simulated pods: scale from zero, warm-up gating, scale to zero with pod-deletion-cost,
and serving through an API-server outage with the last known pods."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sdproxy import settings as settings_mod
from sdproxy.cli import build_parser
from sdproxy.core.pods import Endpoint, PodId
from sdproxy.runtime.app import SERVICES, build_app
from sdproxy.sim.config import SimConfig
from sdproxy.sim.server import run_pods
from tests.conftest import free_port
from tests.fakekube import FakeKube, load_role_rules, wait_until

pytestmark = pytest.mark.timeout(60)
ROLE = Path(__file__).resolve().parents[2] / "deploy" / "base" / "rbac.yaml"
TXT2IMG = {"prompt": "a lighthouse", "steps": 10, "width": 256, "height": 256}


@dataclass
class ReplicaSet:
    """Plays the ReplicaSet + kubelet: replicas become endpoints of simulated pods."""

    kube: FakeKube
    urls: list[str]
    running: dict[str, str] = field(default_factory=dict)  # pod name -> sim URL
    serial: int = 0

    def on_scale(self, name: str, old: int, new: int) -> None:
        for _ in range(old, new):
            url = next(u for u in self.urls if u not in self.running.values())
            pod = f"sd-webui-{self.serial}"
            self.serial += 1
            self.running[pod] = url
            port = int(url.rsplit(":", 1)[1])
            self.kube.add_endpoint(pod, "127.0.0.1", port=port, slice_name=f"slice-{pod}")
        for victim in self.kube.scale_in_victims(max(0, old - new)):
            self.kube.remove_endpoint(victim)
            self.running.pop(victim, None)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[FakeKube, ReplicaSet, str]]:
    async with (
        FakeKube(rules=load_role_rules(ROLE)) as kube,
        run_pods(SimConfig(step_ms=5, startup_s=0.3), count=2) as urls,
    ):
        kube.add_deployment("sd-webui", replicas=0)
        replicaset = ReplicaSet(kube, urls)
        kube.on_scale = replicaset.on_scale
        yield kube, replicaset, str(kube.write_kubeconfig(tmp_path / "kubeconfig", namespace="sd"))


def proxy_settings(kubeconfig: str, port: int) -> settings_mod.Settings:
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
            "--warmup",
            "--scaler=kubernetes",
            "--deployment=sd-webui",
            "--max-pods=2",
            "--idle-to-zero-s=1.5",
            "--scale-down-delay-s=0.5",
            "--scale-interval-s=0.1",
            "--lease-duration-s=2",
            "--identity=proxy-0",
            "--queue-timeout-s=30",
            "--access-log=false",
        ]
    )
    return settings_mod.load(args, env={})


@pytest.fixture
async def proxy(
    cluster: tuple[FakeKube, ReplicaSet, str],
) -> AsyncIterator[tuple[web.Application, str]]:
    port = free_port()
    app = build_app(proxy_settings(cluster[2], port))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/-/status") as resp:
        data: dict[str, Any] = await resp.json()
        return data


async def test_scale_from_zero_serve_then_scale_to_zero(
    cluster: tuple[FakeKube, ReplicaSet, str], proxy: tuple[web.Application, str]
) -> None:
    kube, replicaset, _ = cluster
    app, url = proxy
    services = app[SERVICES]
    await wait_until(services.scaler.is_leader, what="leadership")
    assert kube.replicas("sd-webui") == 0
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/sdapi/v1/txt2img", json=TXT2IMG) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["X-Sdproxy-Pod"].startswith("sd-webui-")
            # it waited in the proxy for a pod to be ordered, appear and warm up
            assert float(resp.headers["X-Sdproxy-Queue-Ms"]) > 0
            body = await resp.json()
        assert len(body["images"]) == 1
        assert kube.replicas("sd-webui") >= 1
        snap = await status(session, url)
        assert snap["discovery"]["connected"] is True
        assert snap["autoscaler"]["leader"] is True
        # idle: the policy falls to zero after --idle-to-zero-s; the pod is marked first
        await wait_until(lambda: kube.replicas("sd-webui") == 0, timeout_s=15, what="zero")
        await wait_until(lambda: not replicaset.running, what="pods gone")
    calls = [(c.verb, c.resource, c.subresource) for c in kube.requests]
    cost_patch = calls.index(("patch", "pods", ""))
    scale_in = max(
        i
        for i, c in enumerate(kube.requests)
        if c.verb == "patch" and c.subresource == "scale" and i > cost_patch
    )
    assert cost_patch < scale_in
    assert kube.denied == [], "the shipped Role must grant everything the proxy does"


async def test_api_outage_keeps_serving_last_known_pods(
    cluster: tuple[FakeKube, ReplicaSet, str], proxy: tuple[web.Application, str]
) -> None:
    kube, _, _ = cluster
    app, url = proxy
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/sdapi/v1/txt2img", json=TXT2IMG) as resp:
            assert resp.status == 200
        kube.outage("503")
        await wait_until(
            lambda: not app[SERVICES].discovery.health().connected, what="outage noticed"
        )
        snap = await status(session, url)
        assert snap["discovery"]["connected"] is False
        assert snap["discovery"]["last_error"]
        assert [p["state"] for p in snap["pods"]] == ["ready"]
        async with session.post(url + "/sdapi/v1/txt2img", json=TXT2IMG) as resp:
            assert resp.status == 200, "the last known pod still serves"
        async with session.get(url + "/-/metrics") as resp:
            assert "sdproxy_discovery_connected 0.0" in await resp.text()
        kube.recover()
        await wait_until(
            lambda: app[SERVICES].discovery.health().connected, timeout_s=40, what="recovery"
        )


async def test_demand_queued_only_at_a_follower_makes_the_leader_scale_up(
    cluster: tuple[FakeKube, ReplicaSet, str], proxy: tuple[web.Application, str]
) -> None:
    """Two replicas (peers), the second not the leader: requests queued only there make the
    leader order pods, and both export the same desired count."""
    kube, _replicaset, kubeconfig = cluster
    leader_app, leader_url = proxy
    await wait_until(leader_app[SERVICES].scaler.is_leader, what="leadership")
    port = free_port()
    follower_settings = proxy_settings(kubeconfig, port)
    follower_settings = dataclasses.replace(
        follower_settings,
        proxy=dataclasses.replace(follower_settings.proxy, peer=(leader_url,)),
        scaler=dataclasses.replace(follower_settings.scaler, identity="proxy-1"),
    )
    follower = build_app(follower_settings)
    runner = web.AppRunner(follower, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    follower_url = f"http://127.0.0.1:{port}"
    leader_app[SERVICES].on_peers([Endpoint(pod_id=PodId("f"), url=follower_url)])
    try:
        assert not follower[SERVICES].scaler.is_leader()
        assert kube.replicas("sd-webui") == 0
        async with aiohttp.ClientSession() as session:
            jobs = [
                asyncio.create_task(session.post(follower_url + "/sdapi/v1/txt2img", json=TXT2IMG))
                for _ in range(2)
            ]
            await wait_until(lambda: kube.replicas("sd-webui") == 2, what="the leader to scale up")

            async def desired(url: str) -> int:
                return int((await status(session, url))["autoscaler"]["desired"])

            assert await desired(leader_url) == await desired(follower_url) == 2
            for job in jobs:
                resp = await job
                assert resp.status == 200
                resp.release()
    finally:
        await runner.cleanup()
