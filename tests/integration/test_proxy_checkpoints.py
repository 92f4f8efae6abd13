"""Integration: checkpoint affinity keyed by file name, whatever title a request uses.

sd-webui titles a checkpoint "b.safetensors" until a pod first loads it and
"b.safetensors [hash]" after, and a pod that has not hashed it does not know the hashed
title (it silently generates with its default instead). The proxy must see both as the
same checkpoint, so a request naming the hashed title goes to the pod that has it loaded.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.integration.conftest import TXT2IMG, ProxyFactory, ProxyUnderTest, SimFactory, gen_body

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
