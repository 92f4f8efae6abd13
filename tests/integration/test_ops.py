"""Integration: the operational endpoints behind --ops-listen and --ops-token.

/-/status (JSON and HTML) and /-/metrics expose pod addresses, queue state and
checkpoints; /-/peer* let a caller of the proxy port find or cancel a queued job by its
caller key. With --ops-listen they move to their own address (probes answer on both);
with --ops-token they need the bearer token wherever they are served, and the replicas
send it to each other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.test_serve_cli import process, read_log, ready, wait_for
from tests.integration.conftest import ProxyFactory, SimFactory, eventually, gen_body

TOKEN = "s3cret-ops-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Accept": "application/json"}


async def _status_of(session: aiohttp.ClientSession, url: str, **headers: str) -> Any:
    async with session.get(url, headers={**JSON, **headers}) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


async def test_token_guards_status_metrics_and_peers_on_the_proxy_port(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls, "--ops-token", TOKEN)
    for path in ("/-/status", "/-/metrics", "/-/peer", "/-/peer/job?caller=x"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            async with proxy.client.get(path, headers=headers) as resp:
                assert resp.status == 401, (path, headers)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                body = await resp.json()
                assert body["error"] == "unauthorized"
                assert "--ops-token" in body["detail"]
    async with proxy.client.post("/-/peer/job/cancel?caller=x") as resp:
        assert resp.status == 401
    # the HTML page too (a browser asks with Accept: text/html)
    async with proxy.client.get("/-/status", headers={"Accept": "text/html"}) as resp:
        assert resp.status == 401
    async with proxy.client.get("/-/status", headers={**AUTH, **JSON}) as resp:
        assert resp.status == 200
        assert [p["url"] for p in (await resp.json())["pods"]] == sims.urls
    async with proxy.client.get("/-/metrics", headers=AUTH) as resp:
        assert resp.status == 200
        assert "sdproxy_pods" in await resp.text()
    for probe in ("/-/healthz", "/-/readyz"):
        async with proxy.client.get(probe) as resp:
            assert resp.status == 200, probe
    # the traffic itself needs no token
    async with proxy.client.post("/sdapi/v1/txt2img", json=gen_body(2)) as resp:
        assert resp.status == 200


@contextlib.asynccontextmanager
async def _replica(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    ports: dict[str, int],
    backends: list[str],
    peer_ops: str,
) -> AsyncIterator[tuple[str, str, str, Path]]:
    flags = ["serve", "--listen", f"127.0.0.1:{ports['http']}"]
    flags += ["--metrics-listen", f"127.0.0.1:{ports['metrics']}"]
    flags += ["--ops-listen", f"127.0.0.1:{ports['ops']}", "--peer", peer_ops]
    flags += [f for b in backends for f in ("--backend", b)]
    log = tmp_path / f"replica-{ports['http']}.log"
    # the token from the environment, as the manifests pass a Secret
    async with process(flags, log, env={"SDPROXY_OPS_TOKEN": TOKEN}) as proc:
        url = f"http://127.0.0.1:{ports['http']}"

        async def up() -> bool:
            assert proc.returncode is None, read_log(log)
            return await ready(session, url)

        await wait_for(up, "the replica to be ready", log)
        yield (
            url,
            f"http://127.0.0.1:{ports['ops']}",
            f"http://127.0.0.1:{ports['metrics']}",
            log,
        )


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_ops_listener_and_peers_that_talk_with_the_token(
    tmp_path: Path, sim_pods: SimFactory
) -> None:
    from tests.conftest import free_port

    sims = await sim_pods(1, step_ms=10.0)
    a_ports = {name: free_port() for name in ("http", "ops", "metrics")}
    b_ports = {name: free_port() for name in ("http", "ops", "metrics")}
    a_peer, b_peer = (f"http://127.0.0.1:{p['ops']}" for p in (b_ports, a_ports))
    async with (
        aiohttp.ClientSession() as session,
        _replica(tmp_path, session, a_ports, sims.urls, a_peer) as (a, a_ops, a_metrics, _),
        _replica(tmp_path, session, b_ports, sims.urls, b_peer) as (b, _b_ops, _m, _),
    ):
        # the proxy port no longer serves the operational endpoints (token or not)
        for path in ("/-/status", "/-/metrics", "/-/peer"):
            status, body, _h = await _status_of(session, a + path, **AUTH)
            assert (status, body["error"]) == (404, "not_found"), path
        for probe in ("/-/healthz", "/-/readyz"):
            for base in (a, a_ops):
                async with session.get(base + probe) as resp:
                    assert resp.status == 200, base + probe
        # on the ops address they need the token
        status, body, headers = await _status_of(session, a_ops + "/-/status")
        assert (status, body["error"]) == (401, "unauthorized")
        assert headers["WWW-Authenticate"] == 'Bearer realm="sdproxy"'
        status, body, _h = await _status_of(session, a_ops + "/-/status", **AUTH)
        assert status == 200 and body["pods"][0]["url"] == sims.urls[0]
        for base, path in ((a_ops, "/-/metrics"), (a_ops, "/metrics"), (a_metrics, "/metrics")):
            async with session.get(base + path) as resp:
                assert resp.status == 401, base + path
            async with session.get(base + path, headers=AUTH) as resp:
                assert resp.status == 200, base + path
                assert "sdproxy_queue_depth" in await resp.text()
        async with session.get(a_ops + "/sdapi/v1/options") as resp:
            assert resp.status == 404  # the ops listener forwards nothing to pods

        # peers reach each other's ops address with the token: alice's job queued at A
        # is seen and cancelled through B
        blocker = asyncio.create_task(
            session.post(a + "/sdapi/v1/txt2img", json=gen_body(600)).__aenter__()
        )

        async def busy() -> bool:
            return int((await sims.stats(0))["heavy_inflight"]) == 1

        await eventually(busy, what="the pod to run the blocker")
        alice = {"X-Sdproxy-Client": "alice"}
        queued = asyncio.create_task(
            session.post(a + "/sdapi/v1/txt2img", json=gen_body(2), headers=alice).__aenter__()
        )

        async def seen_through_b() -> bool:
            async with session.get(b + "/sdapi/v1/progress", headers=alice) as resp:
                data = await resp.json()
            return bool(data["sdproxy"]["queued"]) and data["sdproxy"]["queue_position"] == 1

        await eventually(seen_through_b, what="B to find alice's job queued at A")
        async with session.post(b + "/sdapi/v1/interrupt", headers=alice) as resp:
            assert resp.status == 200
        answer = await asyncio.wait_for(queued, 10)
        assert answer.status == 409
        assert (await answer.json())["error"] == "job_cancelled"
        answer.release()
        blocker.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await blocker
