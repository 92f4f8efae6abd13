"""Integration: checkpoint affinity keyed by file name, whatever title a request uses.

sd-webui titles a checkpoint "b.safetensors" until a pod first loads it and
"b.safetensors [hash]" after, and a pod that has not hashed it does not know the hashed
title (it silently generates with its default instead). The proxy must see both as the
same checkpoint, so a request naming the hashed title goes to the pod that has it loaded.

What a pod has is read from the pod when it becomes ready (its sd-models list and the
checkpoint it has loaded): a name it does not list, or one too long to be a file name,
is never recorded as its checkpoint — not in /-/status, not as a metric label.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.integration.conftest import (
    TXT2IMG,
    ProxyFactory,
    ProxyUnderTest,
    SimFactory,
    eventually,
    gen_body,
)

pytestmark = pytest.mark.timeout(60)

CKPT_A, CKPT_B = "a.safetensors", "b.safetensors"


async def generate(proxy: ProxyUnderTest, body: dict[str, Any]) -> tuple[str, str]:
    """(pod that ran it, its info string) of a txt2img that must succeed."""
    async with proxy.client.post(TXT2IMG, json=body) as resp:
        data = await resp.json()
        assert resp.status == 200, data
        return resp.headers["X-Sdproxy-Pod"], str(data["info"])


def on(checkpoint: str, steps: int = 1) -> dict[str, Any]:
    """A job that switches to ``checkpoint`` and leaves it loaded as the pod's default."""
    override = {"sd_model_checkpoint": checkpoint}
    return gen_body(steps, override_settings=override, override_settings_restore_afterwards=False)


async def test_a_hashed_title_finds_the_pod_that_loaded_the_checkpoint(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(2, checkpoints=(CKPT_A, CKPT_B))
    proxy = await proxy_factory(sims.urls)
    holder, info = await generate(proxy, on(CKPT_B))  # by file name: b is loaded there
    assert "Model: b," in info
    index = [url.removeprefix("http://") for url in sims.urls].index(holder)
    async with sims.session.get(sims.urls[index] + "/sdapi/v1/sd-models") as resp:
        title = next(m["title"] for m in await resp.json() if m["model_name"] == "b")
    assert title.startswith(f"{CKPT_B} [")  # the title that pod now lists
    # two plain jobs at once: one per pod, so the other pod is now the most recently used
    plain = await asyncio.gather(*(generate(proxy, gen_body(20)) for _ in range(2)))
    assert {pod for pod, _ in plain} == {url.removeprefix("http://") for url in sims.urls}

    pod, info = await generate(proxy, on(title))
    assert pod == holder, "affinity by file name: the hashed title is the same checkpoint"
    assert "Model: b," in info
    assert await sims.total("checkpoint_switches") == 1
    await proxy.wait_idle()


async def checkpoints(proxy: ProxyUnderTest) -> list[str | None]:
    """Each pod's checkpoint as /-/status shows it, in pod order."""
    return [pod["checkpoint"] for pod in sorted((await proxy.status())["pods"], key=by_id)]


def by_id(pod: dict[str, Any]) -> str:
    return str(pod["id"])


async def metrics(proxy: ProxyUnderTest) -> str:
    async with proxy.client.get("/-/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def until_checkpoints(proxy: ProxyUnderTest, expected: list[str | None]) -> None:
    async def check() -> bool:
        return await checkpoints(proxy) == expected

    await eventually(check, what=f"pods' checkpoints {expected}")


@pytest.mark.parametrize(
    "flags", [pytest.param([], id="ready"), pytest.param(["--warmup"], id="warmed-up")]
)
async def test_the_loaded_checkpoint_shows_once_a_pod_is_ready(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, flags: list[str]
) -> None:
    """Before any request named one: the pods were asked what they have loaded."""
    sims = await sim_pods(2, checkpoints=(CKPT_A, CKPT_B))
    proxy = await proxy_factory(sims.urls, *flags)
    await until_checkpoints(proxy, ["a", "a"])
    exposition = await metrics(proxy)
    for url in sims.urls:
        pod = url.removeprefix("http://")
        assert f'sdproxy_pod_checkpoint_info{{checkpoint="a",pod="{pod}"}} 1.0' in exposition


async def test_a_checkpoint_the_pod_does_not_list_keeps_no_state(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1, checkpoints=(CKPT_A, CKPT_B))
    proxy = await proxy_factory(sims.urls)
    await until_checkpoints(proxy, ["a"])  # the pod's list is known from here on
    _, info = await generate(proxy, on("nope.safetensors"))
    assert "Model: a," in info  # sd-webui ignores an override it cannot resolve
    async with proxy.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "zzz"}) as r:
        assert r.status == 500  # sd-webui: model not found (heavy: it names a checkpoint)
    assert await checkpoints(proxy) == ["a"]
    exposition = await metrics(proxy)
    assert 'checkpoint="nope"' not in exposition and 'checkpoint="zzz"' not in exposition
    await generate(proxy, on(CKPT_B))  # a name it lists still counts
    assert await checkpoints(proxy) == ["b"]
    await proxy.wait_idle()


async def test_a_huge_checkpoint_name_never_reaches_status_or_metrics(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    """250 KB: inside the 256 KiB the proxy reads of a body, so the body is parsed whole."""
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    huge = "x" * 250_000 + ".safetensors"
    await generate(proxy, on(huge))
    status = await proxy.status()
    assert all(pod["checkpoint"] in (None, "v1-5-pruned-emaonly") for pod in status["pods"])
    assert len(str(status)) < 10_000
    exposition = await metrics(proxy)
    assert "x" * 300 not in exposition and len(exposition) < 100_000
    await proxy.wait_idle()
