"""Integration: scheduling that knows Stable Diffusion, through the proxy to simulated pods.

Pods carry two checkpoints each and switches cost time; the simulator counts the
switches it made (``/sim/stats``), so checkpoint-aware dispatch is measured where the cost
is paid. Tenants (by header, or by API key from a [tenants] config), priorities and
deadlines are seen through the order and status of the answers; a CUDA out-of-memory
answer is the request's fault and keeps its pod; a pod failing generations in a row is
ejected as an outlier and /-/status says so.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    TXT2IMG,
    ProxyFactory,
    ProxyUnderTest,
    SimCluster,
    SimFactory,
    eventually,
    gen_body,
)

pytestmark = pytest.mark.timeout(90)

CKPT_A, CKPT_B = "a.safetensors", "b.safetensors"


def on(checkpoint: str, steps: int = 2, **extra: Any) -> dict[str, Any]:
    """A job naming ``checkpoint`` (sd-webui restores the pod's default afterwards)."""
    return gen_body(steps, override_settings={"sd_model_checkpoint": checkpoint}, **extra)


async def post(
    proxy: ProxyUnderTest, body: dict[str, Any], **headers: str
) -> tuple[int, dict[str, Any], Any]:
    async with proxy.client.post(TXT2IMG, json=body, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def defaults(sims: SimCluster, *checkpoints: str) -> None:
    """Give each pod its own default checkpoint, then zero its counters."""
    for url, checkpoint in zip(sims.urls, checkpoints, strict=True):
        async with sims.session.post(
            url + "/sdapi/v1/options", json={"sd_model_checkpoint": checkpoint}
        ) as resp:
            assert resp.status == 200
        async with sims.session.post(url + "/sim/reset") as resp:
            assert resp.status == 200


async def pod_checkpoints(proxy: ProxyUnderTest, expected: list[str]) -> None:
    """Wait until the pods (in the order of their URLs) show ``expected``."""

    async def check() -> bool:
        pods = sorted((await proxy.status())["pods"], key=lambda p: str(p["url"]))
        return [p["checkpoint"] for p in pods] == expected

    await eventually(check, what=f"pods' checkpoints {expected}")


async def metrics(proxy: ProxyUnderTest) -> str:
    async with proxy.client.get("/-/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def sample(exposition: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", exposition, re.MULTILINE)
    assert found is not None, name
    return float(found.group(1))


async def switches_for(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, *flags: str
) -> tuple[int, list[str]]:
    """Two pods (defaults a and b) busy with one job of their own checkpoint each; then
    a, a, b, b queue, all of the same length. Returns the switches the pods made and the
    pods that ran the jobs. Fair: each freed pod finds a job of its own checkpoint every
    time. FIFO: the two a jobs go to the first two pods that free, one of them b's."""
    sims = await sim_pods(2, checkpoints=(CKPT_A, CKPT_B), switch_s=0.3)
    await defaults(sims, CKPT_A, CKPT_B)
    proxy = await proxy_factory(sims.urls, *flags)
    by_url = dict(zip(sims.urls, ("a", "b"), strict=True))
    await pod_checkpoints(proxy, [by_url[url] for url in sorted(sims.urls)])
    first = [
        asyncio.create_task(post(proxy, on(CKPT_A, steps=30))),
        asyncio.create_task(post(proxy, on(CKPT_B, steps=30))),
    ]
    await proxy.wait_inflight(2)
    queued = []
    for checkpoint in (CKPT_A, CKPT_A, CKPT_B, CKPT_B):
        queued.append(asyncio.create_task(post(proxy, on(checkpoint, steps=30))))
        await proxy.wait_queue(len(queued))
    answers = await asyncio.gather(*first, *queued)
    assert all(status == 200 for status, _, _ in answers), answers
    await proxy.wait_idle()
    return await sims.total("checkpoint_switches"), [h["X-Sdproxy-Pod"] for _, h, _ in answers]


async def test_checkpoint_aware_dispatch_makes_no_switch_where_fifo_makes_two(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    fair, _ = await switches_for(sim_pods, proxy_factory)
    assert fair == 0, "every queued job waited for the pod that has its checkpoint"
    fifo, _ = await switches_for(sim_pods, proxy_factory, "--policy", "fifo")
    # one of the a jobs runs on b's pod: there and back again
    assert fifo >= 2


async def test_a_switching_job_costs_two_loads_and_says_so(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1, checkpoints=(CKPT_A, CKPT_B), switch_s=0.2)
    proxy = await proxy_factory(sims.urls)
    await pod_checkpoints(proxy, ["a"])
    status, headers, body = await post(proxy, on(CKPT_B, steps=10))
    assert status == 200 and "Model: b," in body["info"]
    assert await sims.total("checkpoint_switches") == 2, "there and back (restore afterwards)"
    # 10 units at the first guess 0.1 s + two loads at the first guess 3 s
    assert float(headers["X-Sdproxy-Cost-S"]) == pytest.approx(1.0 + 2 * 3.0, abs=0.01)
    await pod_checkpoints(proxy, ["a"])  # the default stays
    status, headers, _ = await post(proxy, gen_body(10))
    assert status == 200 and float(headers["X-Sdproxy-Cost-S"]) < 2.0
    assert await sims.total("checkpoint_switches") == 2, "a job naming none: the default"


async def test_a_flooding_tenant_does_not_hold_back_another(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1, step_ms=5.0)
    proxy = await proxy_factory(sims.urls)
    done: list[str] = []

    async def job(tenant: str) -> None:
        status, _, _ = await post(proxy, gen_body(10), **{"X-Sdproxy-Tenant": tenant})
        assert status == 200
        done.append(tenant)

    flood = [asyncio.create_task(job("batch")) for _ in range(12)]
    await proxy.wait_queue(11)
    steady = asyncio.create_task(job("web"))
    await asyncio.gather(steady, *flood)
    assert done.index("web") <= 2, f"web waited behind the flood: {done}"
    tenants = {t["name"]: t for t in (await proxy.status())["tenants"]}
    assert tenants["batch"]["gpu_seconds"] > tenants["web"]["gpu_seconds"] > 0
    text = await metrics(proxy)
    assert sample(text, 'sdproxy_tenant_gpu_seconds_total{tenant="web"}') > 0


async def test_priorities_are_strict(sim_pods: SimFactory, proxy_factory: ProxyFactory) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    done: list[str] = []

    async def job(priority: str, steps: int = 2) -> None:
        status, _, _ = await post(proxy, gen_body(steps), **{"X-Sdproxy-Priority": priority})
        assert status == 200
        done.append(priority)

    busy = asyncio.create_task(job("normal", steps=30))
    await proxy.wait_inflight(1)
    tasks = []
    for n, priority in enumerate(("low", "normal", "high")):
        tasks.append(asyncio.create_task(job(priority)))
        await proxy.wait_queue(n + 1)
    text = await metrics(proxy)
    for priority in ("low", "normal", "high"):
        assert sample(text, f'sdproxy_queue_depth{{priority="{priority}"}}') == 1
    await asyncio.gather(busy, *tasks)
    assert done == ["normal", "high", "normal", "low"]
    status, _, body = await post(proxy, gen_body(1), **{"X-Sdproxy-Priority": "urgent"})
    assert (status, body["error"]) == (400, "bad_request")


async def test_deadlines_refuse_at_once_or_time_out_in_the_queue(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1, step_ms=10.0)
    # weight 10: the first guess of its speed is 0.01 s per step, the sim's own
    proxy = await proxy_factory([sims.urls[0] + "#weight=10"])
    busy = asyncio.create_task(post(proxy, gen_body(200)))  # 2 s
    await proxy.wait_inflight(1)
    status, _, body = await post(proxy, gen_body(5), **{"X-Sdproxy-Deadline-S": "0.3"})
    assert (status, body["error"]) == (503, "deadline_unmeetable")
    assert body["eta_s"] > 0.3
    # an ETA under the deadline (about 1 s: half of the running job), but the pod is busy
    # for 2 s: the job's own deadline passes in the queue
    status, _, body = await post(proxy, gen_body(5), **{"X-Sdproxy-Deadline-S": "1.5"})
    assert (status, body["error"]) == (503, "queue_timeout")
    assert (await busy)[0] == 200
    status, _, body = await post(proxy, gen_body(1), **{"X-Sdproxy-Deadline-S": "soon"})
    assert (status, body["error"]) == (400, "bad_request")


async def test_tenants_by_api_key_and_401(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    config = tmp_path / "sdproxy.toml"
    config.write_text(
        '[tenants.team-a]\nkeys = ["key-a"]\nweight = 2.0\n'
        '[tenants.team-b]\nkeys = ["key-b"]\nmax_priority = "low"\n'
    )
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls, "--config", str(config))
    status, _, body = await post(proxy, gen_body(1))
    assert (status, body["error"]) == (401, "unauthorized")
    status, _, body = await post(proxy, gen_body(1), **{"X-Sdproxy-Key": "nope"})
    assert (status, body["error"]) == (401, "unauthorized")
    async with proxy.client.get("/sdapi/v1/sd-models") as resp:
        assert resp.status == 401, "every proxied route needs the key"
    status, _, _ = await post(proxy, gen_body(1), **{"X-Sdproxy-Key": "key-a"})
    assert status == 200
    status, _, _ = await post(proxy, gen_body(1), Authorization="Bearer key-b")
    assert status == 200
    async with proxy.client.get("/-/status") as resp:
        assert resp.status == 200, "operational endpoints need no key"
        tenants = {t["name"]: t for t in (await resp.json())["tenants"]}
    assert tenants["team-a"]["weight"] == 2.0 and tenants["team-a"]["gpu_seconds"] > 0
    assert tenants["team-b"]["gpu_seconds"] > 0


async def test_out_of_memory_is_the_requests_fault_and_keeps_the_pod(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1, vram_pixels=512 * 512)
    proxy = await proxy_factory(sims.urls, "--outlier-failures", "1")
    status, _, body = await post(proxy, gen_body(2, width=1024, height=1024))
    assert status == 500 and body["error"] == "OutOfMemoryError"
    (pod,) = (await proxy.status())["pods"]
    assert pod["out"] is None, "the pod keeps its place"
    assert (await post(proxy, gen_body(2)))[0] == 200
    text = await metrics(proxy)
    assert sample(text, 'sdproxy_request_faults_total{kind="oom"}') == 1


async def test_a_pod_failing_in_a_row_is_ejected_as_an_outlier(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    broken = await sim_pods(1, fail_rate=1.0)
    good = await sim_pods(1)
    proxy = await proxy_factory([*broken.urls, *good.urls], "--outlier-failures", "2")
    bad_id = broken.urls[0].removeprefix("http://")
    answers = []
    for _ in range(6):
        status, headers, _ = await post(proxy, gen_body(1))
        answers.append((status, headers["X-Sdproxy-Pod"]))
    assert [s for s, pod in answers if pod == bad_id] == [500, 500], answers
    pods = {p["id"]: p for p in (await proxy.status())["pods"]}
    assert pods[bad_id]["out"] == "outlier"
    assert pods[bad_id]["errors"] == 2


async def test_backend_weight_is_the_first_guess_of_a_pods_speed(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(2)
    proxy = await proxy_factory([sims.urls[0] + "#weight=2", sims.urls[1]])
    pods = {p["url"]: p for p in (await proxy.status())["pods"]}
    assert pods[sims.urls[0]]["weight"] == 2.0
    assert pods[sims.urls[0]]["seconds_per_unit"] == pytest.approx(0.05)
    assert pods[sims.urls[1]]["seconds_per_unit"] == pytest.approx(0.1)
    # both free: a job goes to the faster one
    status, headers, _ = await post(proxy, gen_body(5))
    assert status == 200 and headers["X-Sdproxy-Pod"] == sims.urls[0].removeprefix("http://")


async def test_bad_weights_stop_start_up() -> None:
    from sdproxy.errors import ConfigError
    from tests.integration.conftest import proxy_settings

    with pytest.raises(ConfigError, match="weight"):
        proxy_settings(["http://127.0.0.1:1#weight=0"])
    with pytest.raises(ConfigError, match="weight"):
        proxy_settings(["http://127.0.0.1:1#speed=2"])


async def test_an_asynchronous_job_keeps_its_tenant_and_not_its_key(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    config = tmp_path / "sdproxy.toml"
    config.write_text('[tenants.team-a]\nkeys = ["key-a"]\n')
    sims = await sim_pods(1)
    proxy = await proxy_factory(
        sims.urls, "--config", str(config), "--jobs-dir", str(tmp_path / "jobs")
    )
    headers = {"X-Sdproxy-Key": "key-a", "X-Sdproxy-Priority": "low"}
    async with proxy.client.post("/-/jobs" + TXT2IMG, json=gen_body(2), headers=headers) as r:
        assert r.status == 202, await r.text()
        job_id = (await r.json())["id"]
    async with proxy.client.post("/-/jobs" + TXT2IMG, json=gen_body(2)) as r:
        assert r.status == 401, "no key, no job"

    async def done() -> bool:
        async with proxy.client.get(f"/-/jobs/{job_id}", headers=headers) as r:
            return bool((await r.json())["status"] == "succeeded")

    await eventually(done, what="the job to succeed")
    async with proxy.client.get(f"/-/jobs/{job_id}", headers=headers) as r:
        assert (await r.json())["tenant"] == "team-a"
    tenants = {t["name"]: t for t in (await proxy.status())["tenants"]}
    assert tenants["team-a"]["gpu_seconds"] > 0
    stored = b"".join(p.read_bytes() for p in (tmp_path / "jobs").rglob("*") if p.is_file())
    assert b"key-a" not in stored, "the tenant's key is not kept in the job store"


async def raw_post(proxy: ProxyUnderTest, headers: bytes) -> tuple[int, Any]:
    """A heavy POST whose header block is ``headers`` byte for byte (not UTF-8, say)."""
    host, port = proxy.url.removeprefix("http://").split(":")
    body = json.dumps(gen_body(1)).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST {TXT2IMG} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
            + headers
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(payload)


async def test_a_key_that_is_not_utf8_is_401_not_500(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    config = tmp_path / "sdproxy.toml"
    config.write_text('[tenants.team-a]\nkeys = ["key-a"]\n')
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls, "--config", str(config))
    for headers in (b"X-Sdproxy-Key: key-\xff\r\n", b"Authorization: Bearer \xff\xfe\r\n"):
        status, body = await raw_post(proxy, headers)
        assert (status, body["error"]) == (401, "unauthorized"), headers
    status, body = await raw_post(proxy, b"X-Sdproxy-Key: key-a\r\nX-Sdproxy-Tenant: other\r\n")
    assert status == 200, body
    names = {t["name"] for t in (await proxy.status())["tenants"]}
    assert names == {"team-a"}, "with keys, the header names no tenant"


async def test_a_tenant_name_that_is_not_printable_text_is_400_not_500(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    for headers in (b"X-Sdproxy-Tenant: t\xff\r\n", b"X-Sdproxy-Tenant: t\xc2\x85\xe2\x80\xae\r\n"):
        status, body = await raw_post(proxy, headers)
        assert (status, body["error"]) == (400, "bad_request"), headers
    status, body = await raw_post(proxy, b"X-Sdproxy-Tenant: \xc3\xa9quipe\r\n")
    assert status == 200, body
    names = {t["name"] for t in (await proxy.status())["tenants"]}
    assert names == {"\u00e9quipe"}


async def test_header_named_tenants_are_bounded(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    """Any caller may make up tenant names, and each keeps fair-queue state and a metric
    series: past MAX_HEADER_TENANTS distinct names a new one is 400, known ones work."""
    from sdproxy.runtime.tenants import MAX_HEADER_TENANTS

    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    for index in range(MAX_HEADER_TENANTS):
        headers = {"X-Sdproxy-Tenant": f"team-{index}"}
        async with proxy.client.get("/sdapi/v1/sd-models", headers=headers) as resp:
            assert resp.status == 200, index
    async with proxy.client.get(
        "/sdapi/v1/sd-models", headers={"X-Sdproxy-Tenant": "one-too-many"}
    ) as resp:
        assert resp.status == 400
        body = await resp.json()
        assert body["error"] == "bad_request" and "[tenants]" in body["detail"]
    for headers in ({"X-Sdproxy-Tenant": "team-7"}, {}):  # a known name, the anonymous one
        async with proxy.client.post(TXT2IMG, json=gen_body(1), headers=headers) as resp:
            assert resp.status == 200


async def test_a_tenant_lists_its_own_asynchronous_jobs_by_its_key(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    config = tmp_path / "sdproxy.toml"
    config.write_text('[tenants.team-a]\nkeys = ["key-a"]\n[tenants.team-b]\nkeys = ["key-b"]\n')
    sims = await sim_pods(1)
    proxy = await proxy_factory(
        sims.urls, "--config", str(config), "--jobs-dir", str(tmp_path / "jobs")
    )
    ids = {}
    for key, client in (("key-a", "alice"), ("key-a", None), ("key-b", "alice")):
        headers = {"X-Sdproxy-Key": key} | ({"X-Sdproxy-Client": client} if client else {})
        async with proxy.client.post("/-/jobs" + TXT2IMG, json=gen_body(1), headers=headers) as r:
            assert r.status == 202, await r.text()
            ids[key, client] = (await r.json())["id"]

    async def listed(**headers: str) -> set[str]:
        async with proxy.client.get("/-/jobs", headers=headers) as r:
            assert r.status == 200, await r.text()
            return {j["id"] for j in (await r.json())["jobs"]}

    # by the identity it gave, and (address identity) what its address sent with none
    assert await listed(**{"X-Sdproxy-Key": "key-a", "X-Sdproxy-Client": "alice"}) == {
        ids["key-a", "alice"],
        ids["key-a", None],
    }
    assert await listed(**{"X-Sdproxy-Key": "key-b", "X-Sdproxy-Client": "alice"}) == {
        ids["key-b", "alice"]
    }, "the same client name in another tenant is another caller"
    async with proxy.client.get("/-/jobs", headers={"X-Sdproxy-Client": "alice"}) as r:
        assert (r.status, (await r.json())["error"]) == (401, "unauthorized")
