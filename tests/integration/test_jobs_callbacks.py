"""Integration: job callbacks to a local HTTP server (aiohttp on 127.0.0.1).

Loopback is refused by default, so the delivery tests allow it with
``--callback-allow 127.0.0.1/32``; the refusal tests use the default policy: a literal
loopback address is refused at submit (400), a name that resolves to loopback is refused
when it would be sent — and in neither case does the server ever see a request.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from tests.integration.conftest import (
    ProxyFactory,
    ProxyUnderTest,
    SimFactory,
    eventually,
    gen_body,
)
from tests.integration.test_jobs_api import SUBMIT, until_status

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cret-for-tests"


@dataclass
class Receiver:
    url: str
    #: answer these statuses first, then 200
    failures: list[int] = field(default_factory=list)
    received: list[tuple[bytes, str]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def receiver(failures: list[int] | None = None) -> AsyncIterator[Receiver]:
    state = Receiver(url="", failures=list(failures or []))

    async def hook(request: web.Request) -> web.Response:
        state.received.append(
            (await request.read(), request.headers.get("X-Sdproxy-Signature", ""))
        )
        status = state.failures.pop(0) if state.failures else 200
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        yield state
    finally:
        await runner.cleanup()


async def proxy_with(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path, *flags: str
) -> ProxyUnderTest:
    sims = await sim_pods(1)
    return await proxy_factory(sims.urls, "--jobs-dir", str(tmp_path / "jobs"), *flags)


def metric(proxy: ProxyUnderTest, outcome: str) -> float:
    text = proxy.services.metrics.exposition()[0].decode()
    line = f'sdproxy_callbacks_total{{outcome="{outcome}"}} '
    (value,) = [ln.removeprefix(line) for ln in text.splitlines() if ln.startswith(line)]
    return float(value)


async def test_a_signed_callback_carries_the_final_status_document(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    allow = ("--callback-allow", "127.0.0.1/32", "--callback-secret", SECRET)
    proxy = await proxy_with(sim_pods, proxy_factory, tmp_path, *allow)
    async with receiver() as hook, httpx.AsyncClient(base_url=proxy.url) as client:
        resp = await client.post(
            SUBMIT, json=gen_body(5, send_images=True), headers={"X-Sdproxy-Callback": hook.url}
        )
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]

        async def called() -> bool:
            return len(hook.received) == 1

        await eventually(called, what="the callback")
        body, signature = hook.received[0]
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(signature, expected)
        doc = json.loads(body)
        assert doc["id"] == job_id and doc["status"] == "succeeded"
        assert doc["urls"]["result"] == f"/-/jobs/{job_id}/result"
        assert "images" not in doc and len(body) < 4096, "the status, never the images"
        assert doc == {**(await until_status(client, job_id, "succeeded")), "progress": None}
    assert metric(proxy, "delivered") == 1


async def test_a_failing_callback_is_retried_with_backoff(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    allow = ("--callback-allow", "127.0.0.1/32", "--callback-secret", SECRET)
    proxy = await proxy_with(sim_pods, proxy_factory, tmp_path, *allow)
    async with receiver(failures=[500, 503]) as hook, httpx.AsyncClient(base_url=proxy.url) as c:
        resp = await c.post(SUBMIT, json=gen_body(2), headers={"X-Sdproxy-Callback": hook.url})
        assert resp.status_code == 202

        async def delivered() -> bool:
            return metric(proxy, "delivered") == 1

        await eventually(delivered, what="the third attempt", timeout_s=15)
    assert len(hook.received) == 3
    assert len({body for body, _sig in hook.received}) == 1, "the same document each time"
    assert metric(proxy, "retried") == 2 and metric(proxy, "failed") == 0


async def test_a_callback_that_keeps_failing_is_given_up(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    flags = ("--callback-allow", "127.0.0.1", "--callback-secret", SECRET)
    proxy = await proxy_with(sim_pods, proxy_factory, tmp_path, *flags, "--callback-retry-s", "1.5")
    async with receiver(failures=[500] * 10) as hook, httpx.AsyncClient(base_url=proxy.url) as c:
        resp = await c.post(SUBMIT, json=gen_body(2), headers={"X-Sdproxy-Callback": hook.url})
        assert resp.status_code == 202

        async def gave_up() -> bool:
            return metric(proxy, "failed") == 1

        await eventually(gave_up, what="the callback to be given up")
    assert len(hook.received) == 2, "at 0 s and 1 s; the next (3 s) is past --callback-retry-s"


async def test_refused_destinations_are_never_sent(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await proxy_with(sim_pods, proxy_factory, tmp_path, "--callback-secret", SECRET)
    async with receiver() as hook, httpx.AsyncClient(base_url=proxy.url) as client:
        for url in (hook.url, "http://169.254.169.254/latest", "http://10.0.0.1/x", "ftp://x/"):
            resp = await client.post(SUBMIT, json=gen_body(2), headers={"X-Sdproxy-Callback": url})
            assert resp.status_code == 400, url
            assert resp.json()["error"] == "bad_request"
        assert metric(proxy, "refused") == 4
        # a name is checked when it resolves: localhost is loopback
        by_name = hook.url.replace("127.0.0.1", "localhost")
        resp = await client.post(SUBMIT, json=gen_body(2), headers={"X-Sdproxy-Callback": by_name})
        assert resp.status_code == 202
        await until_status(client, resp.json()["id"], "succeeded")

        async def refused() -> bool:
            return metric(proxy, "refused") == 5

        await eventually(refused, what="the callback to localhost to be refused")
        assert (await client.get("/-/jobs")).json()["jobs"][0]["status"] == "succeeded"
    assert hook.received == []


async def test_callbacks_need_a_secret(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await proxy_with(sim_pods, proxy_factory, tmp_path, "--callback-allow", "127.0.0.1/32")
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        resp = await client.post(
            SUBMIT, json=gen_body(2), headers={"X-Sdproxy-Callback": "http://127.0.0.1:9/x"}
        )
        assert resp.status_code == 400 and "--callback-secret" in resp.json()["detail"]


async def test_other_spellings_of_loopback_are_never_sent(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """Decimal, hexadecimal, octal, short and IPv6 spellings of 127.0.0.1: refused at
    submit (400) or, for what only the resolver reads as loopback, when sent."""
    proxy = await proxy_with(sim_pods, proxy_factory, tmp_path, "--callback-secret", SECRET)
    async with receiver() as hook, httpx.AsyncClient(base_url=proxy.url) as client:
        port = hook.url.split(":")[2].split("/")[0]
        spellings = ("2130706433", "0x7f000001", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]")
        sent = 0
        for host in spellings:
            url = f"http://{host}:{port}/hook"
            resp = await client.post(SUBMIT, json=gen_body(2), headers={"X-Sdproxy-Callback": url})
            if resp.status_code == 202:
                sent += 1
                await until_status(client, resp.json()["id"], "succeeded")
            else:
                assert resp.status_code == 400, (url, resp.text)

        async def refused() -> bool:
            return metric(proxy, "refused") == len(spellings)

        await eventually(refused, what="every spelling of loopback to be refused")
        assert metric(proxy, "delivered") == 0 and sent >= 1
    assert hook.received == []


async def test_a_redirect_to_a_refused_address_is_not_followed(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    allow = ("--callback-allow", "127.0.0.1/32", "--callback-secret", SECRET)
    proxy = await proxy_with(sim_pods, proxy_factory, tmp_path, *allow, "--callback-retry-s", "0")
    inside: list[bytes] = []

    async def target(request: web.Request) -> web.Response:
        inside.append(await request.read())
        return web.Response()

    app = web.Application()
    app.router.add_post("/inside", target)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.2", 0).start()
    elsewhere = f"http://127.0.0.2:{runner.addresses[0][1]}/inside"
    try:
        async with receiver() as hook, httpx.AsyncClient(base_url=proxy.url) as client:

            async def redirect(request: web.Request) -> web.Response:
                hook.received.append((await request.read(), ""))
                raise web.HTTPTemporaryRedirect(elsewhere)

            hook_app = web.Application()
            hook_app.router.add_post("/hook", redirect)
            hook_runner = web.AppRunner(hook_app, access_log=None)
            await hook_runner.setup()
            await web.TCPSite(hook_runner, "127.0.0.1", 0).start()
            url = f"http://127.0.0.1:{hook_runner.addresses[0][1]}/hook"
            try:
                headers = {"X-Sdproxy-Callback": url}
                resp = await client.post(SUBMIT, json=gen_body(2), headers=headers)
                assert resp.status_code == 202, resp.text

                async def failed() -> bool:
                    return metric(proxy, "failed") == 1

                await eventually(failed, what="the redirected callback to be given up")
                assert len(hook.received) == 1
            finally:
                await hook_runner.cleanup()
    finally:
        await runner.cleanup()
    assert inside == []


async def test_a_callback_answer_is_not_read_whole(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """The destination's status says delivered; its body is not the proxy's to hold: an
    endless one (a hostile receiver) must neither fill memory nor stall the delivery."""
    allow = ("--callback-allow", "127.0.0.1/32", "--callback-secret", SECRET)
    proxy = await proxy_with(sim_pods, proxy_factory, tmp_path, *allow)
    streamed = [0]

    async def endless(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"x" * 65536
        with contextlib.suppress(ConnectionError):
            while streamed[0] < 2**31:
                await response.write(chunk)
                streamed[0] += len(chunk)
        return response

    app = web.Application()
    app.router.add_post("/hook", endless)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            resp = await client.post(SUBMIT, json=gen_body(1), headers={"X-Sdproxy-Callback": url})
            assert resp.status_code == 202, resp.text

            async def delivered() -> bool:
                return metric(proxy, "delivered") == 1

            await eventually(delivered, timeout_s=5.0, what="the callback to be delivered")
        assert metric(proxy, "retried") == 0
    finally:
        await runner.cleanup()
    assert streamed[0] < 64 * 1024 * 1024, "the proxy stopped reading the answer"
