"""Fault: a pod that hangs (SIGSTOP) and comes back (SIGCONT).

The pod's process keeps its listening socket, so connections are accepted and nothing
answers: connection errors never show it. Active health checks take it out after
``--health-fall`` failures, light calls that it sits on are retried elsewhere after
``--light-timeout-s``, no heavy job is bound to it meanwhile, and it comes back after
``--health-rise`` passes once it runs again.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_serve_cli import process, read_log, wait_for
from tests.integration.conftest import ProxyFactory, eventually, gen_body

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


async def sim_process(tmp_path: Path, name: str) -> Any:
    log = tmp_path / f"{name}.log"
    cm = process(["sim", "--pods", "1", "--port", "0", "--step-ms", "5"], log)
    proc = await cm.__aenter__()

    async def url() -> str | None:
        lines = [ln for ln in read_log(log).splitlines() if " listening on " in ln]
        return lines[0].rsplit(" ", 1)[1] if lines else None

    return cm, proc, await wait_for(url, f"sim {name}", log)


async def test_a_hung_pod_is_taken_out_and_comes_back(
    tmp_path: Path, proxy_factory: ProxyFactory
) -> None:
    hung_cm, hung, hung_url = await sim_process(tmp_path, "hung")
    ok_cm, _ok, ok_url = await sim_process(tmp_path, "ok")
    try:
        proxy = await proxy_factory(
            [hung_url, ok_url],
            "--health-interval-s", "0.2",
            "--health-timeout-s", "0.3",
            "--light-timeout-s", "1",
        )  # fmt: skip
        hung_id = hung_url.removeprefix("http://")

        async def out_reason() -> Any:
            pods = {p["id"]: p for p in (await proxy.status())["pods"]}
            return pods[hung_id]["out"]

        hung.send_signal(signal.SIGSTOP)
        # a light call the hung pod sits on is retried on the other pod
        async with proxy.client.get("/sdapi/v1/sd-models") as resp:
            assert resp.status == 200
            assert resp.headers["X-Sdproxy-Pod"] == ok_url.removeprefix("http://")

        async def taken_out() -> bool:
            return await out_reason() in ("health_check", "ejected")

        await eventually(taken_out, what="the hung pod taken out")

        async def checked_out() -> bool:
            return await out_reason() == "health_check"

        await eventually(checked_out, what="health checks to take it out")
        # while it hangs, every heavy job goes to the healthy pod, at once
        for _ in range(3):
            async with proxy.client.post("/sdapi/v1/txt2img", json=gen_body(2)) as resp:
                assert resp.status == 200
                assert resp.headers["X-Sdproxy-Pod"] == ok_url.removeprefix("http://")
        hung.send_signal(signal.SIGCONT)

        async def back() -> bool:
            return await out_reason() is None

        await eventually(back, what="the pod back after SIGCONT")
        await proxy.wait_idle()
    finally:
        hung.send_signal(signal.SIGCONT)
        await hung_cm.__aexit__(None, None, None)
        await ok_cm.__aexit__(None, None, None)
