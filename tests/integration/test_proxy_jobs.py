"""Integration: job-bound calls (progress, interrupt) reach the caller's own job.

A caller is known by X-Sdproxy-Client, else the sdproxy_client cookie, else its address.
While its job is queued the proxy answers progress itself (sd-webui's shape plus an
``sdproxy`` block with the queue position) and an interrupt cancels the waiting request
(409 job_cancelled); while it runs both go to the pod running it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp
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

PROGRESS = "/sdapi/v1/progress"
INTERRUPT = "/sdapi/v1/interrupt"


def client(name: str) -> dict[str, str]:
    return {"X-Sdproxy-Client": name}


def cookie(value: str) -> dict[str, str]:
    return {"Cookie": f"sdproxy_client={value}"}


async def generate(
    session: aiohttp.ClientSession, url: str, steps: int, headers: Mapping[str, str]
) -> tuple[int, Any]:
    async with session.post(url + TXT2IMG, json=gen_body(steps), headers=headers) as resp:
        return resp.status, await resp.json()


async def running_and_queued(
    proxy: ProxyUnderTest,
    running: tuple[aiohttp.ClientSession, Mapping[str, str]],
    queued: tuple[aiohttp.ClientSession, Mapping[str, str]],
) -> tuple[asyncio.Task[tuple[int, Any]], asyncio.Task[tuple[int, Any]]]:
    """Two 60-step jobs on a one-pod proxy: the first runs, the second waits in the queue."""
    first = asyncio.create_task(generate(running[0], proxy.url, 60, running[1]))
    await proxy.wait_inflight(1)
    second = asyncio.create_task(generate(queued[0], proxy.url, 60, queued[1]))
    await proxy.wait_queue(1)
    return first, second


async def get_progress(
    session: aiohttp.ClientSession, url: str, headers: Mapping[str, str]
) -> tuple[Any, aiohttp.ClientResponse]:
    async with session.get(url + PROGRESS, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json(), resp


def assert_queued_progress(data: Any, *, position: int) -> None:
    """sd-webui's ProgressResponse keys, plus where the job waits."""
    assert {"progress", "eta_relative", "state", "current_image", "textinfo"} <= set(data)
    assert data["progress"] == 0.0
    assert data["state"]["job"] == "queued"
    assert data["sdproxy"]["queued"] is True
    assert data["sdproxy"]["queue_position"] == position
    assert data["eta_relative"] > 0


async def running_progress(proxy: ProxyUnderTest, headers: Mapping[str, str]) -> Any:
    """Poll until the caller's job samples on its pod; returns that progress answer."""
    answer: dict[str, Any] = {}

    async def check() -> bool:
        data, resp = await get_progress(proxy.client, proxy.url, headers)
        answer.update(
            data, pod=resp.headers.get("X-Sdproxy-Pod"), request_id=resp.headers["X-Request-Id"]
        )
        # the pod's own answer (sd-webui's current_task is always null: the proxy's answers
        # carry "sdproxy" instead), with a job sampling
        state = data["state"]
        return bool("sdproxy" not in data and state["job_count"] > 0 and state["sampling_step"])

    await eventually(check, what="the job to run on its pod")
    return answer


async def test_progress_is_answered_by_the_proxy_while_queued_and_by_the_pod_while_running(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    s, url = proxy.client, proxy.url
    alice, bob = await running_and_queued(proxy, (s, client("alice")), (s, client("bob")))

    data, resp = await get_progress(s, url, client("bob"))
    assert_queued_progress(data, position=1)
    assert "X-Sdproxy-Pod" not in resp.headers, "answered by the proxy"

    running = await running_progress(proxy, client("alice"))
    assert running["pod"] == sims.urls[0].removeprefix("http://")
    assert "sdproxy" not in running, "the pod's own answer"
    assert running["request_id"]
    assert 0 < running["progress"] <= 1

    assert (await alice)[0] == 200
    running = await running_progress(proxy, client("bob"))  # bob's job moved to the pod
    assert running["pod"] == sims.urls[0].removeprefix("http://")
    assert (await bob)[0] == 200
    data, resp = await get_progress(s, url, client("bob"))  # nothing left: idle answer
    assert data["state"]["job"] == "" and data["sdproxy"]["queued"] is False
    await proxy.wait_idle()


async def test_interrupt_while_queued_cancels_the_waiting_request(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    s = proxy.client
    alice, bob = await running_and_queued(proxy, (s, client("alice")), (s, client("bob")))
    async with s.post(INTERRUPT, headers=client("bob")) as resp:
        assert resp.status == 200 and await resp.json() == {}
        assert "X-Sdproxy-Pod" not in resp.headers
    status, data = await bob
    assert status == 409 and data["error"] == "job_cancelled", data
    assert (await alice)[0] == 200
    stats = await sims.stats(0)
    assert stats["interrupts_received"] == 0, "alice's running job was not touched"
    assert stats["completed"] == 1 and stats["interrupted"] == 0
    await proxy.wait_idle()


async def test_interrupt_while_running_reaches_that_pod_and_ends_the_job_early(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(2)
    proxy = await proxy_factory(sims.urls)
    s, url = proxy.client, proxy.url
    loop = asyncio.get_running_loop()
    other = asyncio.create_task(generate(s, url, 100, client("other")))
    await proxy.wait_inflight(1)
    start = loop.time()
    mine = asyncio.create_task(generate(s, url, 600, client("mine")))  # 6 s uninterrupted
    running = await running_progress(proxy, client("mine"))
    async with s.post(INTERRUPT, headers=client("mine")) as resp:
        assert resp.status == 200
        assert resp.headers["X-Sdproxy-Pod"] == running["pod"]
    status, _ = await mine
    assert status == 200
    assert loop.time() - start < 5.0, "the interrupted generation came back early"
    assert (await other)[0] == 200
    by_pod = {u.removeprefix("http://"): await sims.stats(i) for i, u in enumerate(sims.urls)}
    mine_pod = by_pod.pop(running["pod"])
    (other_pod,) = by_pod.values()
    assert mine_pod["interrupts_received"] == 1 and mine_pod["interrupted"] == 1
    assert other_pod["interrupts_received"] == 0 and other_pod["interrupted"] == 0
    await proxy.wait_idle()


async def test_callers_are_told_apart_by_cookie(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    """Both callers share one address; only their cookies tell their jobs apart."""
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    s, url = proxy.client, proxy.url
    carol, dave = await running_and_queued(proxy, (s, cookie("carol")), (s, cookie("dave")))
    data, _ = await get_progress(s, url, cookie("dave"))
    assert_queued_progress(data, position=1)
    running = await running_progress(proxy, cookie("carol"))
    assert running["pod"] and "sdproxy" not in running
    async with s.post(INTERRUPT, headers=cookie("dave")) as resp:
        assert resp.status == 200
    assert (await dave)[0] == 409
    assert (await carol)[0] == 200
    await proxy.wait_idle()


async def test_a_new_caller_is_given_the_cookie(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    """Answers to a caller without identity set sdproxy_client, proxied ones included,
    so a browser's later progress polls find its job."""
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    for method, path in (("GET", PROGRESS), ("GET", "/sdapi/v1/sd-models")):
        async with proxy.client.request(method, path) as resp:
            assert resp.status == 200
            assert "sdproxy_client" in resp.cookies, f"{method} {path} sets no cookie"
    async with proxy.client.get(PROGRESS, headers=cookie("known")) as resp:
        assert "sdproxy_client" not in resp.cookies, "a known caller keeps its cookie"


async def test_callers_are_told_apart_by_address(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    sessions = {
        addr: aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(addr, 0)),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        for addr in ("127.0.0.2", "127.0.0.3")
    }
    try:
        first, mine = await running_and_queued(
            proxy, (proxy.client, client("first")), (sessions["127.0.0.2"], {})
        )
        data, _ = await get_progress(sessions["127.0.0.2"], proxy.url, {})
        assert_queued_progress(data, position=1)
        data, _ = await get_progress(sessions["127.0.0.3"], proxy.url, {})
        assert data["sdproxy"]["queued"] is False, "another address has no job here"
        async with sessions["127.0.0.2"].post(proxy.url + INTERRUPT) as resp:
            assert resp.status == 200
        assert (await mine)[0] == 409
        assert (await first)[0] == 200
    finally:
        for session in sessions.values():
            await session.close()
    await proxy.wait_idle()


async def test_a_named_caller_without_a_job_never_reaches_anothers_job(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    """Callers that name themselves share an address (a NAT, a gateway): a poll or an
    interrupt from one with no job of its own must not touch the other's generation."""
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    s, url = proxy.client, proxy.url
    owner = asyncio.create_task(generate(s, url, 100, client("owner")))
    await running_progress(proxy, client("owner"))
    for who in (client("stranger"), cookie("stranger")):
        data, resp = await get_progress(s, url, who)
        assert "X-Sdproxy-Pod" not in resp.headers, "answered by the proxy, not the pod"
        assert data["state"]["job"] == "" and data["sdproxy"]["queued"] is False
        async with s.post(INTERRUPT, headers=who) as resp:
            assert resp.status == 200 and "X-Sdproxy-Pod" not in resp.headers
    assert (await owner)[0] == 200
    stats = await sims.stats(0)
    assert stats["interrupts_received"] == 0 and stats["interrupted"] == 0
    await proxy.wait_idle()


async def test_job_bound_call_to_a_pod_that_went_away_answers_json_502(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    s, url = proxy.client, proxy.url
    job = asyncio.create_task(generate(s, url, 600, client("owner")))
    await running_progress(proxy, client("owner"))
    killing = asyncio.create_task(sims.kill(0))  # stops listening now, cuts the job later
    await asyncio.sleep(0.2)
    async with s.get(PROGRESS, headers=client("owner")) as resp:
        assert resp.status == 502, await resp.text()
        assert (await resp.json())["error"] == "backend_error"
    async with s.post(INTERRUPT, headers=client("owner")) as resp:
        assert resp.status == 502, await resp.text()
    await killing
    status, data = await job
    assert status == 502 and data["error"] == "backend_error"
    await proxy.wait_idle()


def anonymous_session(address: str = "127.0.0.1") -> aiohttp.ClientSession:
    """A caller that names itself nowhere: no header, and it keeps no cookie."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(address, 0)),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


@pytest.mark.parametrize(
    "named",
    [pytest.param(client("alice"), id="header"), pytest.param(cookie("c0ffee"), id="cookie")],
)
async def test_a_caller_without_identity_never_reaches_a_named_callers_job_at_its_address(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, named: dict[str, str]
) -> None:
    """Behind an ingress or a NAT every client has the same address: a job started with a
    name (header or cookie) is reachable with that name only, never by the address."""
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    s = proxy.client
    async with anonymous_session() as stranger:  # 127.0.0.1, as the named caller
        running = asyncio.create_task(generate(s, proxy.url, 300, named))
        await running_progress(proxy, named)
        queued = asyncio.create_task(generate(s, proxy.url, 5, named))
        await proxy.wait_queue(1)
        data, resp = await get_progress(stranger, proxy.url, {})
        assert "X-Sdproxy-Pod" not in resp.headers, "not the pod running the named job"
        assert data["sdproxy"]["queued"] is False, "not the named caller's queued job"
        async with stranger.post(proxy.url + INTERRUPT) as resp:
            assert resp.status == 200 and "X-Sdproxy-Pod" not in resp.headers
        data, _ = await get_progress(s, proxy.url, named)
        assert data["sdproxy"]["queued"] is True, "the named caller still finds its job"
    assert (await running)[0] == 200
    assert (await queued)[0] == 200, "the queued job was not cancelled by the stranger"
    stats = await sims.stats(0)
    assert stats["interrupts_received"] == 0 and stats["completed"] == 2
    await proxy.wait_idle()


@pytest.mark.parametrize(
    ("flags", "reachable"),
    [
        pytest.param((), True, id="address-identity"),
        pytest.param(("--address-identity", "false"), False, id="no-address-identity"),
    ],
)
async def test_a_job_sent_without_identity_is_reachable_by_its_address_unless_switched_off(
    sim_pods: SimFactory, proxy_factory: ProxyFactory, flags: tuple[str, ...], reachable: bool
) -> None:
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls, *flags)
    async with anonymous_session("127.0.0.2") as anon:
        first, mine = await running_and_queued(proxy, (proxy.client, client("first")), (anon, {}))
        data, _ = await get_progress(anon, proxy.url, {})
        assert data["sdproxy"]["queued"] is reachable
        async with anon.post(proxy.url + INTERRUPT) as resp:
            assert resp.status == 200
        status, _ = await mine
    assert status == (409 if reachable else 200)
    assert (await first)[0] == 200
    await proxy.wait_idle()


async def test_a_job_named_by_its_id_is_reached_by_whoever_names_it(
    sim_pods: SimFactory, proxy_factory: ProxyFactory
) -> None:
    """X-Sdproxy-Job is a capability: a job-bound call naming the job reaches exactly that
    job, queued or running, whatever identity the call carries (or none); the heavy
    request may propose the id, its response always carries it."""
    sims = await sim_pods(1)
    proxy = await proxy_factory(sims.urls)
    s = proxy.client
    first_id, second_id = "first-" + "x" * 16, "second-" + "y" * 16
    first, second = await running_and_queued(
        proxy,
        (s, {**client("alice"), "X-Sdproxy-Job": first_id}),
        (s, {**client("alice"), "X-Sdproxy-Job": second_id}),
    )
    async with anonymous_session("127.0.0.3") as bob:
        data, _ = await get_progress(bob, proxy.url, {"X-Sdproxy-Job": second_id})
        assert_queued_progress(data, position=1)
        running = await running_progress(proxy, {"X-Sdproxy-Job": first_id, **client("bob")})
        assert running["pod"] == sims.urls[0].removeprefix("http://")
        wrong = {"X-Sdproxy-Job": "nobody-" + "z" * 16, **client("alice")}
        data, resp = await get_progress(bob, proxy.url, wrong)
        assert data["sdproxy"]["queued"] is False and "X-Sdproxy-Pod" not in resp.headers, (
            "an id that names no job reaches nothing, not the caller's own jobs"
        )
        async with bob.post(proxy.url + INTERRUPT, headers={"X-Sdproxy-Job": second_id}) as r:
            assert r.status == 200 and "X-Sdproxy-Pod" not in r.headers
    status, data = await second
    assert status == 409 and data["error"] == "job_cancelled"
    assert (await first)[0] == 200
    assert (await sims.stats(0))["interrupts_received"] == 0
    ids = []
    for _ in range(2):  # no proposal: the proxy draws an unguessable id per job
        async with s.post(TXT2IMG, json=gen_body(1)) as resp:
            assert resp.status == 200
            ids.append(resp.headers["X-Sdproxy-Job"])
    assert ids[0] != ids[1] and all(len(i) >= 16 for i in ids)
    async with s.post(TXT2IMG, json=gen_body(1), headers={"X-Sdproxy-Job": first_id}) as resp:
        assert resp.headers["X-Sdproxy-Job"] == first_id
    async with s.post(TXT2IMG, json=gen_body(1), headers={"X-Sdproxy-Job": "short"}) as resp:
        assert resp.status == 400, "a guessable id is refused"
    await proxy.wait_idle()
