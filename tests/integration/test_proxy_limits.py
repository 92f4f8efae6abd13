"""Integration: one caller cannot take the whole queue, and absurd jobs never reach a pod.

``--max-queued-per-client`` caps the jobs one caller (its header, cookie, else address)
has waiting: one more is answered ``429 client_quota`` before it takes a queue place.
``--max-steps``, ``--max-pixels`` and ``--max-batch`` refuse a body over a bound with
``422 request_too_large`` naming the field; the pod never sees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import TXT2IMG, ProxyFactory, SimFactory, gen_body

pytestmark = pytest.mark.timeout(60)

BOUNDS = ("--max-steps", "150", "--max-pixels", "4194304", "--max-batch", "8")


async def generate(
    session: aiohttp.ClientSession, url: str, body: Mapping[str, Any], headers: Mapping[str, str]
) -> tuple[int, Any, Mapping[str, str]]:
    async with session.post(url + TXT2IMG, json=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


async def rejected(session: aiohttp.ClientSession, url: str, reason: str) -> float:
    """sdproxy_rejected_total{reason} as the proxy exports it."""
    async with session.get(url + "/-/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sdproxy_rejected_total" and sample.labels["reason"] == reason:
                return sample.value
    raise AssertionError(f"no sdproxy_rejected_total{{reason={reason!r}}}")


async def test_a_caller_at_its_queue_quota_is_answered_429_and_others_still_queue(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls, "--max-queued-per-client", "1")
    s, url = proxy.client, proxy.url
    alice = {"X-Sdproxy-Client": "alice"}
    running = asyncio.create_task(generate(s, url, gen_body(300), alice))
    await proxy.wait_inflight(1)
    queued = asyncio.create_task(generate(s, url, gen_body(5), alice))
    await proxy.wait_queue(1)
    status, data, headers = await generate(s, url, gen_body(5), alice)
    assert status == 429 and data["error"] == "client_quota", data
    assert int(headers["Retry-After"]) >= 1
    assert "X-Sdproxy-Job" not in headers, "no job was made of it"
    others = [
        asyncio.create_task(generate(s, url, gen_body(5), {"X-Sdproxy-Client": "bob"})),
        asyncio.create_task(generate(s, url, gen_body(5), {})),  # by its address
    ]
    await proxy.wait_queue(3)
    status, data, _ = await generate(s, url, gen_body(5), {})  # the same address again
    assert status == 429 and data["error"] == "client_quota", data
    assert [r[0] for r in await asyncio.gather(running, queued, *others)] == [200] * 4
    assert (await sims.stats(0))["completed"] == 4, "the refused ones never reached the pod"
    assert await rejected(s, url, "client_quota") == 2
    assert await rejected(s, url, "request_too_large") == 0
    await proxy.wait_idle()


@pytest.mark.parametrize(
    ("path", "body", "field", "limit"),
    [
        pytest.param(TXT2IMG, {"steps": 10**9}, "steps", 150, id="steps"),
        pytest.param(
            TXT2IMG, {"width": 10**6, "height": 10**6}, "width × height", 4194304, id="size"
        ),
        pytest.param(TXT2IMG, {"batch_size": 10**9}, "batch_size", 8, id="batch"),
        pytest.param(
            TXT2IMG, {"batch_size": 4, "n_iter": 4}, "batch_size × n_iter", 8, id="images"
        ),
        pytest.param(
            TXT2IMG,
            {"width": 1024, "height": 1024, "enable_hr": True, "hr_scale": 4},
            "hr_scale",
            4194304,
            id="hires-output",
        ),
        pytest.param("/sdapi/v1/img2img", {"steps": 151}, "steps", 150, id="img2img"),
    ],
)
async def test_a_request_over_a_bound_is_refused_422_before_it_reaches_a_pod(
    sim_pods: SimFactory,
    proxy_factory: ProxyFactory,
    path: str,
    body: dict[str, Any],
    field: str,
    limit: int,
) -> None:
    sims = await sim_pods(1, step_ms=1.0, vram_pixels=8 * 4194304)
    proxy = await proxy_factory(sims.urls, *BOUNDS)
    async with proxy.client.post(path, json={"prompt": "a cat", **body}) as resp:
        assert resp.status == 422, await resp.text()
        data = await resp.json()
    assert data["error"] == "request_too_large"
    assert (data["field"], data["limit"]) == (field, limit)
    assert field in data["detail"] and str(limit) in data["detail"]
    at_bounds = [gen_body(150), gen_body(1, width=2048, height=2048, batch_size=8)]
    for ok in at_bounds:
        async with proxy.client.post(TXT2IMG, json=ok) as resp:
            assert resp.status == 200, "at the bounds is within them"
    stats = await sims.stats(0)
    assert stats["completed"] == 2, "only the requests within the bounds reached the pod"
    assert await rejected(proxy.client, proxy.url, "request_too_large") == 1
    await proxy.wait_idle()
