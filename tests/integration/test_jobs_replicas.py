"""Integration: asynchronous jobs through two replicas in front of gated simulated pods.

A job submitted at replica A is followed, fetched (``?wait`` included) and cancelled
through replica B: B does not hold it and asks its live peers at their
``/-/peer/jobs/{id}``, which answer from their own store only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from sdproxy.core.pods import Endpoint, PodId
from tests.integration.conftest import GatedFactory, ProxyFactory, eventually, gen_body
from tests.integration.test_jobs_api import SUBMIT, until_status

pytestmark = pytest.mark.timeout(60)


async def peered(
    proxy_factory: ProxyFactory, urls: list[str], tmp_path: Path, *flags: str
) -> list[Any]:
    front = [
        await proxy_factory(urls, "--jobs-dir", str(tmp_path / f"jobs-{i}"), *flags)
        for i in range(2)
    ]
    for proxy in front:
        proxy.services.on_peers(
            [Endpoint(pod_id=PodId(p.url), url=p.url) for p in front if p is not proxy]
        )

    async def live() -> bool:
        return all(
            p.services.peers is not None and len(p.services.peers.live()) == 1 for p in front
        )

    await eventually(live, what="each replica to hear from the other")
    return front


async def test_a_job_submitted_at_one_replica_is_served_by_the_other(
    gated_pods: GatedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    cluster = await gated_pods(1)
    a, b = await peered(proxy_factory, cluster.urls, tmp_path)
    async with httpx.AsyncClient(base_url=a.url) as at_a, httpx.AsyncClient(base_url=b.url) as at_b:
        long = (await at_a.post(SUBMIT, json=gen_body(300))).json()
        queued = (await at_a.post(SUBMIT, json=gen_body(5))).json()
        running = await until_status(at_b, long["id"], "running")
        assert running["pod"] is not None
        seen = (await at_b.get(f"/-/jobs/{queued['id']}")).json()
        assert seen["status"] == "queued" and seen["queue_position"] is not None

        cancelled = await at_b.delete(f"/-/jobs/{queued['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert (await at_a.get(f"/-/jobs/{queued['id']}")).json()["status"] == "cancelled"

        result = await at_b.get(f"/-/jobs/{long['id']}/result", params={"wait": 20})
        assert result.status_code == 200 and result.headers["X-Sdproxy-Job"] == long["id"]
        assert result.json()["images"] == []
        missing = await at_b.get("/-/jobs/AAAAAAAAAAAAAAAAAAAAAA")
        assert missing.status_code == 404 and missing.json()["error"] == "job_not_found"
    assert (await a.status())["jobs"]["counts"]["succeeded"] == 1
    assert (await b.status())["jobs"]["counts"] == dict.fromkeys(
        ("queued", "running", "succeeded", "failed", "cancelled"), 0
    )


async def test_peers_ask_each_other_with_the_ops_token(
    gated_pods: GatedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    cluster = await gated_pods(1)
    a, b = await peered(proxy_factory, cluster.urls, tmp_path, "--ops-token", "t0ken")
    async with httpx.AsyncClient(base_url=a.url) as at_a, httpx.AsyncClient(base_url=b.url) as at_b:
        doc = (await at_a.post(SUBMIT, json=gen_body(5))).json()
        result = await at_b.get(f"/-/jobs/{doc['id']}/result", params={"wait": 20})
        assert result.status_code == 200, result.text
        direct = await at_b.get(f"/-/peer/jobs/{doc['id']}")
        assert direct.status_code == 401 and direct.json()["error"] == "unauthorized"
        with_token = await at_a.get(
            f"/-/peer/jobs/{doc['id']}", headers={"Authorization": "Bearer t0ken"}
        )
        assert with_token.status_code == 200 and with_token.json()["status"] == "succeeded"
        not_here = await at_b.get(
            f"/-/peer/jobs/{doc['id']}", headers={"Authorization": "Bearer t0ken"}
        )
        assert not_here.status_code == 404, "a peer answers from its own store only"


def _imported(job_id: str, *, status: str = "succeeded", **more: Any) -> str:
    import json

    return json.dumps(
        {
            "id": job_id, "owner": "h:x", "route": "/sdapi/v1/txt2img", "method": "POST",
            "path_qs": "/sdapi/v1/txt2img", "headers": [], "tenant": None, "status": status,
            "created_at": 1.0, "started_at": 1.0, "finished_at": 9e9, "pod": None,
            "error": None, "idempotency_key": None, "body_bytes": 0, "result_bytes": 0,
            "result_status": 200, "result_headers": [], "expired": False,
            "callback_url": None, "callback_state": None,
        } | more
    )  # fmt: skip


async def test_the_import_endpoint_refuses_an_id_that_is_not_a_job_id(
    gated_pods: GatedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """A peer's record names a path under --jobs-dir: ``../..`` must not escape it."""
    cluster = await gated_pods(1)
    _a, b = await peered(proxy_factory, cluster.urls, tmp_path)
    sender = next(iter(b.services.peers.known))
    escape = tmp_path / "escaped"
    headers = {"X-Sdproxy-Replica": sender}
    async with httpx.AsyncClient(base_url=b.url) as at_b:
        bad = "../../escaped"
        resp = await at_b.post(
            "/-/peer/jobs/import",
            content=b"owned",
            headers={**headers, "X-Sdproxy-Job-Record": _imported(bad)},
        )
        assert resp.status_code == 400 and resp.json()["error"] == "bad_request", resp.text
        assert not escape.exists()
        # a real one is kept, and its result's bytes count in the store
        good = "G" * 16
        resp = await at_b.post(
            "/-/peer/jobs/import",
            content=b"x" * 1000,
            headers={**headers, "X-Sdproxy-Job-Record": _imported(good)},
        )
        assert resp.status_code == 200, resp.text
        assert (await b.status())["jobs"]["store_bytes"] == 1000
        assert (await at_b.get(f"/-/jobs/{good}/result")).content == b"x" * 1000


async def test_the_import_endpoint_keeps_to_jobs_max_mb(
    gated_pods: GatedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """A handed-over result larger than the room --jobs-max-mb leaves is refused (the
    leaving peer tries another), not written whole past the bound."""
    cluster = await gated_pods(1)
    _a, b = await peered(proxy_factory, cluster.urls, tmp_path, "--jobs-max-mb", "1")
    sender = next(iter(b.services.peers.known))
    async with httpx.AsyncClient(base_url=b.url) as at_b:
        resp = await at_b.post(
            "/-/peer/jobs/import",
            content=b"x" * (2 * 1024 * 1024),
            headers={"X-Sdproxy-Replica": sender, "X-Sdproxy-Job-Record": _imported("H" * 16)},
        )
        assert resp.status_code == 503 and resp.json()["error"] == "jobs_full", resp.text
        assert (await at_b.get(f"/-/jobs/{'H' * 16}")).status_code == 404
    assert (await b.status())["jobs"]["store_bytes"] == 0
    assert list((tmp_path / "jobs-1" / "results").iterdir()) == []


async def test_a_handed_over_job_with_a_pending_callback_still_calls_back(
    gated_pods: GatedFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """A job that ended while its replica drained may hand over before its callback
    went out: the replica that takes it sends it (it stayed pending until a restart)."""
    from tests.integration.test_jobs_callbacks import SECRET, receiver

    cluster = await gated_pods(1)
    flags = ("--callback-allow", "127.0.0.1/32", "--callback-secret", SECRET)
    _a, b = await peered(proxy_factory, cluster.urls, tmp_path, *flags)
    sender = next(iter(b.services.peers.known))
    async with receiver() as hook, httpx.AsyncClient(base_url=b.url) as at_b:
        record = _imported("C" * 16, callback_url=hook.url, callback_state="pending")
        resp = await at_b.post(
            "/-/peer/jobs/import",
            content=b"{}",
            headers={"X-Sdproxy-Replica": sender, "X-Sdproxy-Job-Record": record},
        )
        assert resp.status_code == 200, resp.text

        async def called() -> bool:
            return len(hook.received) == 1

        await eventually(called, what="the handed-over job's callback")
        assert b'"id":"CCCCCCCCCCCCCCCC"' in hook.received[0][0]
