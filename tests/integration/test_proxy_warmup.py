"""Integration: --warmup gates a pod on a tiny generation before it takes traffic.

The simulated pods answer HTTP at once but load their model only after --startup-s (as
sd-webui does); requests that arrive meanwhile wait in the proxy's queue, not in a pod.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.conftest import TXT2IMG, ProxyFactory, SimFactory, eventually, gen_body

pytestmark = pytest.mark.timeout(60)


async def test_requests_wait_in_the_proxy_until_a_pod_is_warm(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(2, startup_s=1.0)
    proxy = await proxy_factory(sims.urls, "--warmup")
    states = {p["state"] for p in (await proxy.status())["pods"]}
    assert states == {"warming"}, states

    async def post() -> tuple[int, str]:
        async with proxy.client.post(TXT2IMG, json=gen_body(5)) as resp:
            await resp.read()
            return resp.status, resp.headers.get("X-Sdproxy-Queue-Ms", "")

    early = [asyncio.create_task(post()) for _ in range(3)]
    await proxy.wait_queue(3)
    for pod in await sims.all_stats():
        assert pod["completed"] == 0 and not pod["model_loaded"]
    results = await asyncio.gather(*early)
    assert all(code == 200 for code, _ in results), results
    assert all(float(ms) > 0 for _, ms in results), "they waited in the proxy"

    async def all_ready() -> bool:
        return all(p["state"] == "ready" for p in (await proxy.status())["pods"])

    await eventually(all_ready, what="both pods warm")
    stats = await sims.all_stats()
    assert all(s["heavy_inflight_max"] == 1 for s in stats), stats
    # each pod ran its warm-up generation, and the three requests between them
    assert sum(s["completed"] for s in stats) == 2 + 3
    await proxy.wait_idle()
