"""Integration: the asynchronous job API, driven with httpx as an application would.

Simulated pods and the proxy on loopback (one queue: an asynchronous job waits behind a
synchronous one); submit → follow → fetch, cancel while queued and while running (the
pod receives the interrupt), idempotent resubmit, ``?wait`` long-polls, expiry, the list,
the metrics, and ``GET /-/jobs/{id}`` for a synchronous job while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
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

SUBMIT = "/-/jobs" + TXT2IMG
DOC_KEYS = {
    "id", "status", "route", "queue_position", "eta_s", "progress", "pod",
    "created_at", "started_at", "finished_at", "error",
}  # fmt: skip


@contextlib.asynccontextmanager
async def api(proxy: ProxyUnderTest, **headers: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=proxy.url, headers=headers, timeout=30) as client:
        yield client


async def start(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path, *flags: str, pods: int = 1
) -> ProxyUnderTest:
    sims = await sim_pods(pods)
    return await proxy_factory(sims.urls, "--jobs-dir", str(tmp_path / "jobs"), *flags)


async def submit(client: httpx.AsyncClient, steps: int, **headers: str) -> dict[str, Any]:
    resp = await client.post(SUBMIT, json=gen_body(steps), headers=headers)
    assert resp.status_code == 202, resp.text
    doc: dict[str, Any] = resp.json()
    assert resp.headers["Location"] == f"/-/jobs/{doc['id']}"
    assert resp.headers["X-Sdproxy-Job"] == doc["id"]
    return doc


async def submit_images(client: httpx.AsyncClient) -> dict[str, Any]:
    resp = await client.post(SUBMIT, json=gen_body(2, send_images=True))
    assert resp.status_code == 202, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


async def status_of(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    resp = await client.get(f"/-/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


async def until_status(client: httpx.AsyncClient, job_id: str, *wanted: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def check() -> bool:
        seen.update(await status_of(client, job_id))
        return seen["status"] in wanted

    await eventually(check, what=f"job {job_id} to be {wanted}")
    return seen


async def test_submit_follow_fetch_answers_what_the_synchronous_call_answers(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await start(sim_pods, proxy_factory, tmp_path)
    async with api(proxy) as client:
        sync = await client.post(TXT2IMG, json=gen_body(40))
        assert sync.status_code == 200
        assert sync.headers["X-Sdproxy-Job"]

        doc = await submit(client, 40)
        assert set(doc) >= DOC_KEYS and doc["status"] == "queued"
        assert doc["urls"] == {
            "self": f"/-/jobs/{doc['id']}",
            "result": f"/-/jobs/{doc['id']}/result",
            "cancel": f"/-/jobs/{doc['id']}",
        }
        running = await until_status(client, doc["id"], "running", "succeeded")
        if running["status"] == "running":
            assert running["pod"] == proxy.services.admission.pods[running["pod"]].pod_id
        done = await until_status(client, doc["id"], "succeeded")
        assert done["finished_at"] >= done["started_at"] >= done["created_at"]
        assert done["error"] is None and done["progress"] is None

        result = await client.get(doc["urls"]["result"])
        assert result.status_code == sync.status_code
        assert result.headers["Content-Type"] == sync.headers["Content-Type"]
        assert result.headers["X-Sdproxy-Job"] == doc["id"]
        answer, expected = result.json(), sync.json()
        assert set(answer) == set(expected) == {"images", "parameters", "info"}
        assert json.loads(answer["info"])["steps"] == 40
    await proxy.wait_idle()


async def test_prefer_respond_async_on_the_normal_path_and_not_a_job_for_light_routes(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await start(sim_pods, proxy_factory, tmp_path)
    async with api(proxy) as client:
        resp = await client.post(
            TXT2IMG, json=gen_body(5), headers={"Prefer": "wait=5, respond-async"}
        )
        assert resp.status_code == 202, resp.text
        assert resp.headers["Preference-Applied"] == "respond-async"
        await until_status(client, resp.json()["id"], "succeeded")
        for path in ("/-/jobs/sdapi/v1/png-info", "/-/jobs/sdapi/v1/interrupt"):
            refused = await client.post(path, json={})
            assert refused.status_code == 400
            assert refused.json()["error"] == "not_a_job"
        unknown = await client.get("/-/jobs/AAAAAAAAAAAAAAAAAAAAAA")
        assert unknown.status_code == 404 and unknown.json()["error"] == "job_not_found"
        assert (await client.get("/-/jobs/x/result")).json()["error"] == "job_not_found"
    stats = await proxy.client.get("/-/status", headers={"Accept": "application/json"})
    assert (await stats.json())["jobs"]["counts"]["succeeded"] == 1


async def test_result_before_the_end_is_409_and_wait_long_polls(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await start(sim_pods, proxy_factory, tmp_path)
    async with api(proxy) as client:
        doc = await submit(client, 150)  # 1.5 s at 10 ms a step
        early = await client.get(doc["urls"]["result"])
        assert early.status_code == 409 and early.json()["error"] == "job_not_finished"
        assert early.headers["Retry-After"]
        short = await client.get(doc["urls"]["result"], params={"wait": "0.2"})
        assert short.status_code == 409
        loop = asyncio.get_running_loop()
        began = loop.time()
        waited = await client.get(doc["urls"]["result"], params={"wait": "20"})
        assert waited.status_code == 200, waited.text
        assert loop.time() - began < 10, "answered when the job ended, not at the wait's end"
        assert waited.json()["images"] == []
        bad = await client.get(doc["urls"]["result"], params={"wait": "soon"})
        assert bad.status_code == 400 and bad.json()["error"] == "bad_request"


async def test_cancel_while_queued_never_reaches_the_pod(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls, "--jobs-dir", str(tmp_path / "jobs"))
    async with api(proxy) as client:
        first = await submit(client, 200)
        await until_status(client, first["id"], "running")
        second = await submit(client, 5)
        queued = await status_of(client, second["id"])
        assert queued["status"] == "queued" and queued["queue_position"] is not None
        assert queued["eta_s"] > 0
        cancelled = await client.delete(second["urls"]["cancel"])
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        result = await client.get(second["urls"]["result"])
        assert result.status_code == 409 and result.json()["error"] == "job_cancelled"
        await until_status(client, first["id"], "succeeded")
        again = await client.delete(second["urls"]["cancel"])  # already final: as it is
        assert again.json()["status"] == "cancelled"
    stats = await sims.stats(0)
    assert stats["completed"] == 1 and stats["interrupts_received"] == 0
    await proxy.wait_idle()


async def test_cancel_while_running_interrupts_the_pod(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls, "--jobs-dir", str(tmp_path / "jobs"))
    async with api(proxy) as client:
        doc = await submit(client, 3000)

        async def sampling() -> bool:
            progress = (await status_of(client, doc["id"]))["progress"]
            return bool(progress and progress["step"])

        await eventually(sampling, what="the job to sample on its pod")
        progress = (await status_of(client, doc["id"]))["progress"]
        assert progress["steps"] == 3000 and 0 < progress["fraction"] < 1
        cancelled = await client.delete(doc["urls"]["cancel"])
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["error"] == "job_cancelled"
    stats = await sims.stats(0)
    assert stats["interrupts_received"] == 1
    await proxy.wait_idle()
    assert (await sims.stats(0))["interrupted"] == 1


async def test_idempotency_key_returns_the_same_job_per_caller(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await start(sim_pods, proxy_factory, tmp_path)
    async with api(proxy, **{"X-Sdproxy-Client": "alice"}) as alice:
        one = await submit(alice, 20, **{"Idempotency-Key": "order-17"})
        two = await submit(alice, 20, **{"Idempotency-Key": "order-17"})
        assert one["id"] == two["id"]
        await until_status(alice, one["id"], "succeeded")
        three = await submit(alice, 20, **{"Idempotency-Key": "order-17"})
        assert three["id"] == one["id"] and three["status"] == "succeeded"
        async with api(proxy, **{"X-Sdproxy-Client": "bob"}) as bob:
            other = await submit(bob, 20, **{"Idempotency-Key": "order-17"})
            assert other["id"] != one["id"], "keys are scoped to their caller"
            await until_status(bob, other["id"], "succeeded")
        listed = (await alice.get("/-/jobs")).json()["jobs"]
        assert [j["id"] for j in listed] == [one["id"]]
    assert (await proxy.status())["jobs"]["counts"]["succeeded"] == 2


async def test_expired_results_answer_410(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await start(sim_pods, proxy_factory, tmp_path, "--jobs-ttl-s", "1")
    async with api(proxy) as client:
        doc = await submit(client, 5)
        assert (await client.get(doc["urls"]["result"], params={"wait": 10})).status_code == 200
        result = tmp_path / "jobs" / "results" / doc["id"]
        assert result.exists()

        async def gone() -> bool:
            resp = await client.get(doc["urls"]["result"])
            return resp.status_code == 410 and resp.json()["error"] == "job_expired"

        await eventually(gone, what="the result to expire")
        assert (await status_of(client, doc["id"]))["expired"] is True

        async def swept() -> bool:
            return not result.exists()

        await eventually(swept, what="the sweeper to delete the result file")
        assert (await proxy.status())["jobs"]["store_bytes"] == 0


async def test_the_list_is_the_callers_newest_first_with_cursor_and_status(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await start(sim_pods, proxy_factory, tmp_path)
    async with api(proxy, **{"X-Sdproxy-Client": "carol"}) as client:
        ids = [(await submit(client, 2))["id"] for _ in range(5)]
        for job_id in ids:
            await until_status(client, job_id, "succeeded")
        first = (await client.get("/-/jobs", params={"limit": 2})).json()
        assert [j["id"] for j in first["jobs"]] == ids[::-1][:2]
        rest = (await client.get("/-/jobs", params={"limit": 10, "cursor": first["cursor"]})).json()
        assert [j["id"] for j in rest["jobs"]] == ids[::-1][2:] and rest["cursor"] is None
        none = (await client.get("/-/jobs", params={"status": "queued"})).json()
        assert none["jobs"] == []
        bad = await client.get("/-/jobs", params={"status": "lost"})
        assert bad.status_code == 400
    async with api(proxy, **{"X-Sdproxy-Client": "dave"}) as other:
        assert (await other.get("/-/jobs")).json()["jobs"] == []


async def test_a_synchronous_job_is_visible_while_it_runs(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await start(sim_pods, proxy_factory, tmp_path)
    job_id = "SyncJobIdSyncJobId01"
    async with api(proxy) as client:
        sync = asyncio.create_task(
            client.post(TXT2IMG, json=gen_body(150), headers={"X-Sdproxy-Job": job_id})
        )
        doc: dict[str, Any] = {}

        async def running() -> bool:
            resp = await client.get(f"/-/jobs/{job_id}")  # 404 until it arrived
            doc.update(resp.json() if resp.status_code == 200 else {})
            return doc.get("status") == "running"

        await eventually(running, what="the synchronous job to run")
        assert doc["route"] == TXT2IMG and doc["pod"]
        resp = await sync
        assert resp.headers["X-Sdproxy-Job"] == job_id
        gone = await client.get(f"/-/jobs/{job_id}")
        assert gone.status_code == 404, "a synchronous job's answer went to its caller"


async def test_deleting_a_running_synchronous_job_interrupts_its_pod(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls, "--jobs-dir", str(tmp_path / "jobs"))
    job_id = "SyncJobIdSyncJobId02"
    async with api(proxy) as client:
        sync = asyncio.create_task(
            client.post(TXT2IMG, json=gen_body(3000), headers={"X-Sdproxy-Job": job_id})
        )

        async def sampling() -> bool:
            resp = await client.get(f"/-/jobs/{job_id}")
            progress = resp.json().get("progress") if resp.status_code == 200 else None
            return bool(progress and progress["step"])

        await eventually(sampling, what="the synchronous job to sample")
        deleted = await client.delete(f"/-/jobs/{job_id}")
        assert deleted.status_code == 200 and deleted.json()["status"] == "interrupted"
        answer = await sync
        assert answer.status_code == 200, "sd-webui answers an interrupted job with what it made"
    assert (await sims.stats(0))["interrupts_received"] == 1


async def test_metrics_count_jobs_by_status_and_store_bytes(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await start(sim_pods, proxy_factory, tmp_path)
    async with api(proxy) as client:
        doc = await submit(client, 5)
        await until_status(client, doc["id"], "succeeded")
    text = proxy.services.metrics.exposition()[0].decode()
    assert 'sdproxy_jobs{status="succeeded"} 1.0' in text
    assert 'sdproxy_jobs{status="queued"} 0.0' in text
    size = (tmp_path / "jobs" / "results" / doc["id"]).stat().st_size
    assert f"sdproxy_jobs_store_bytes {float(size)}" in text
    assert 'sdproxy_callbacks_total{outcome="delivered"} 0.0' in text


async def test_a_multi_megabyte_img2img_job_goes_through_the_disk(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await start(sim_pods, proxy_factory, tmp_path)
    init = "A" * (6 * 1024 * 1024)
    body = {
        "init_images": [init], "steps": 2, "width": 1024, "height": 1024,
        "batch_size": 2, "prompt": "big",
    }  # fmt: skip
    async with api(proxy, **{"Accept-Encoding": "identity"}) as client:
        resp = await client.post("/-/jobs/sdapi/v1/img2img", json=body)
        assert resp.status_code == 202, resp.text
        doc = resp.json()
        stored = tmp_path / "jobs" / "bodies" / doc["id"]
        result = await client.get(doc["urls"]["result"], params={"wait": 30})
        assert result.status_code == 200
        assert len(result.content) > 2 * 1024 * 1024
        assert len(result.json()["images"]) == 2
        assert not stored.exists(), "a finished job's body is deleted"
        on_disk = (tmp_path / "jobs" / "results" / doc["id"]).read_bytes()
        assert on_disk == result.content
        assert not on_disk.startswith(gzip.compress(b"")[:2])


async def test_the_store_bound_expires_the_oldest_results_and_refuses_what_cannot_fit(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await start(sim_pods, proxy_factory, tmp_path, "--jobs-max-mb", "1")
    async with api(proxy, **{"Accept-Encoding": "identity"}) as client:
        ids = []
        for _ in range(3):  # a 512x512 answer is ~0.6 MB: two do not fit in 1 MiB
            doc = await submit_images(client)
            ids.append(doc["id"])
            resp = await client.get(doc["urls"]["result"], params={"wait": 10})
            assert resp.status_code == 200 and len(resp.content) > 400_000
        old = await client.get(f"/-/jobs/{ids[0]}/result")
        assert old.status_code == 410 and old.json()["error"] == "job_expired"
        assert (await client.get(f"/-/jobs/{ids[-1]}/result")).status_code == 200
        assert (await proxy.status())["jobs"]["store_bytes"] <= 1024 * 1024

        big = {"init_images": ["A" * (2 * 1024 * 1024)], "steps": 2}
        refused = await client.post("/-/jobs/sdapi/v1/img2img", json=big)
        assert refused.status_code == 503 and refused.json()["error"] == "jobs_full"
        assert refused.headers["Retry-After"]


async def test_a_storm_of_submits_and_cancels_leaks_no_slot(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """Cancels land while jobs queue, bind, run and finish: every job ends in a final
    state, no pod ever ran two, and no slot stays taken."""
    import random

    sims = await sim_pods(2)
    proxy = await proxy_factory(sims.urls, "--jobs-dir", str(tmp_path / "jobs"))
    rng = random.Random(5)
    async with api(proxy) as client:
        ids = [(await submit(client, rng.randint(2, 40)))["id"] for _ in range(30)]
        victims = rng.sample(ids, 15)

        async def cancel_later(job_id: str) -> None:
            await asyncio.sleep(rng.uniform(0, 0.5))
            resp = await client.delete(f"/-/jobs/{job_id}")
            assert resp.status_code == 200
            assert resp.json()["status"] in ("cancelled", "succeeded")

        await asyncio.gather(*(cancel_later(j) for j in victims))
        finals = [await until_status(client, j, "succeeded", "cancelled") for j in ids]
    assert {d["status"] for d in finals} <= {"succeeded", "cancelled"}
    assert all(d["status"] == "succeeded" for d in finals if d["id"] not in victims)
    await proxy.wait_idle()
    assert all(s["heavy_inflight_max"] <= 1 for s in await sims.all_stats())


async def test_odd_queries_and_ids_are_client_errors_never_500(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await start(sim_pods, proxy_factory, tmp_path)
    async with api(proxy, **{"X-Sdproxy-Client": "odd"}) as client:
        doc = await submit(client, 2)
        result = f"/-/jobs/{doc['id']}/result"
        for wait in ("-1", "nan", "inf-", "1e400x", "", "0x10"):
            resp = await client.get(result, params={"wait": wait})
            assert resp.status_code in (400, 409) and "error" in resp.json(), (wait, resp.text)
        assert (await client.get(result, params={"wait": "1e400"})).status_code == 200
        for query in (
            {"cursor": "1_0"}, {"cursor": "9" * 40}, {"cursor": "-5"}, {"cursor": "x"},
            {"limit": "9" * 40}, {"limit": "0"}, {"status": "nope"}, {"tenant": "\u00e9" * 300},
        ):  # fmt: skip
            resp = await client.get("/-/jobs", params=query)
            assert resp.status_code in (200, 400) and resp.json(), (query, resp.text)
        for job_id in ("..%2F..%2Fjobs.sqlite", "a" * 200, "%00" * 20, "\u00e9" * 20):
            for method in ("GET", "DELETE"):
                resp = await client.request(method, f"/-/jobs/{job_id}")
                assert resp.status_code == 404, (method, job_id, resp.text)
        for prefer in ("respond-async;;;", ",,,", "respond-async, wait=abc", "x" * 8000):
            resp = await client.post(TXT2IMG, json=gen_body(1), headers={"Prefer": prefer})
            assert resp.status_code in (200, 202, 400), (prefer, resp.text)


async def test_the_list_of_a_tenant_caller_shows_its_own_jobs_only(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """A tenant's job is owned by the tenant-scoped identity: the list must look it up
    the same way (it looked up the bare identity: a tenant caller listed nothing)."""
    proxy = await start(sim_pods, proxy_factory, tmp_path)
    async with (
        api(proxy, **{"X-Sdproxy-Client": "same", "X-Sdproxy-Tenant": "a"}) as at_a,
        api(proxy, **{"X-Sdproxy-Client": "same", "X-Sdproxy-Tenant": "b"}) as at_b,
        api(proxy, **{"X-Sdproxy-Client": "same"}) as bare,
    ):
        doc = await submit(at_a, 1)
        assert doc["tenant"] == "a"
        assert [j["id"] for j in (await at_a.get("/-/jobs")).json()["jobs"]] == [doc["id"]]
        assert (await at_b.get("/-/jobs")).json()["jobs"] == []
        assert (await bare.get("/-/jobs")).json()["jobs"] == []
        key = {"Idempotency-Key": "k1"}
        assert (await submit(at_b, 1, **key))["id"] != (await submit(at_a, 1, **key))["id"]


async def test_an_idempotency_key_past_retention_starts_a_new_job(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """Once a job's retention ended its key is free, also before the sweeper's next
    round (a resubmit then got the expired job back: its result a 410)."""
    proxy = await start(sim_pods, proxy_factory, tmp_path, "--jobs-ttl-s", "4")
    async with api(proxy, **{"X-Sdproxy-Client": "carol"}) as carol:
        key = {"Idempotency-Key": "once"}
        one = await submit(carol, 1, **key)
        await until_status(carol, one["id"], "succeeded")

        async def past_retention() -> bool:
            return bool((await status_of(carol, one["id"]))["expired"])

        await eventually(past_retention, what="the job to pass its retention")
        again = await submit(carol, 1, **key)
        assert again["id"] != one["id"] and again["status"] == "queued"
        resp = await carol.get(again["urls"]["result"], params={"wait": 10})
        assert resp.status_code == 200, resp.text
