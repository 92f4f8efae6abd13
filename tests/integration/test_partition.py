"""Integration: a network partition between one front replica and one gated pod.

Four hosts, each a network namespace on one virtual switch (``tests.netns``): two pod
hosts (``sdproxy sim`` on the host's 127.0.0.1 behind ``sdproxy gate`` on the host's
address) and two front replicas (``sdproxy serve`` with both gates as ``--backend``); the
test drives txt2img load at both replicas from the switch's namespace. Mid-run, replica A
is cut off from pod 1's gate silently (packets dropped both ways, no RST): within the
gate stream's silence limit A's ``/-/status`` shows pod 1 ``gate_lost`` and A sends
everything to pod 2, while B still sees pod 1 ``gated`` and keeps using both; when the
link heals A sees pod 1 again and sends to it again. Throughout, no pod runs more than
one generation at once (the gate is the authority) and every request is answered.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import netns

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
TXT2IMG = "/sdapi/v1/txt2img"
SIM_PORT, GATE_PORT, FRONT_PORT = 7860, 7861, 8000
PODS = ("pod1", "pod2")
FRONTS = ("front-a", "front-b")
CLIENTS = 8
#: 4 steps × 10 ms: a generation of ~40 ms, so a few hundred requests in the run
BODY = {"prompt": "a cat", "steps": 4, "send_images": False}
#: the whole scenario, start-up included (the test's timeout is above it)
SCENARIO_S = 75.0
START_S = 20.0
#: the gate stream's silence limit (sdproxy.runtime.gatewatch.SILENCE_S) plus slack
LOST_WITHIN_S = 3.0 + 4.0
#: how long the cut is held once A has noticed it
HOLD_CUT_S = 3.0
#: a reconnect attempt in flight when the link heals may wait for its connect timeout (5 s)
BACK_WITHIN_S = 15.0
#: the longest any request may take: the ones caught on the cut link finish after the heal
REQUEST_S = 30.0


@dataclass(frozen=True, kw_only=True)
class Result:
    front: str
    start: float
    end: float
    status: int
    pod: str | None
    body: bytes = b""
    error: str = ""


@dataclass(kw_only=True)
class Sample:
    """One reading of a front's /-/status: pod id -> mode."""

    at: float
    front: str
    modes: dict[str, str]


@dataclass(kw_only=True)
class Run:
    lab: netns.Lab
    http: aiohttp.ClientSession
    results: list[Result] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    marks: dict[str, float] = field(default_factory=dict)

    def front_url(self, front: str) -> str:
        return f"http://{self.lab.hosts[front].address}:{FRONT_PORT}"

    def gate_url(self, pod: str) -> str:
        return f"http://{self.lab.hosts[pod].address}:{GATE_PORT}"

    def pod_id(self, pod: str) -> str:
        """The id a front gives a static backend (its host:port), as in X-Sdproxy-Pod."""
        return f"{self.lab.hosts[pod].address}:{GATE_PORT}"

    def mark(self, name: str) -> float:
        self.marks[name] = time.monotonic()
        return self.marks[name]

    # ---- reading ----------------------------------------------------------------------

    async def status(self, front: str) -> dict[str, Any]:
        async with self.http.get(
            self.front_url(front) + "/-/status",
            headers={"Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=5),
        ) as resp:
            assert resp.status == 200, f"{front} /-/status answered {resp.status}"
            data: dict[str, Any] = await resp.json()
            return data

    async def modes(self, front: str) -> dict[str, str]:
        """Pod id -> mode, recorded as a sample."""
        pods = (await self.status(front))["pods"]
        modes = {p["id"]: p["mode"] for p in pods}
        self.samples.append(Sample(at=time.monotonic(), front=front, modes=modes))
        return modes

    async def mode(self, front: str, pod: str) -> str | None:
        return (await self.modes(front)).get(self.pod_id(pod))

    async def answers(self, url: str) -> bool:
        try:
            async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def served(self, front: str, pod: str, *, since: float) -> int:
        return sum(
            1
            for r in self.results
            if r.front == front
            and r.start >= since
            and r.status == 200
            and r.pod == self.pod_id(pod)
        )

    # ---- load -------------------------------------------------------------------------

    async def client(self, index: int) -> None:
        """One caller, sending txt2img after txt2img to its front until told to stop."""
        front = FRONTS[index % len(FRONTS)]
        headers = {"X-Sdproxy-Client": f"client-{index}"}
        while not self.stopping.is_set():
            start = time.monotonic()
            try:
                async with self.http.post(
                    self.front_url(front) + TXT2IMG,
                    json=BODY,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=REQUEST_S),
                ) as resp:
                    body = await resp.read()
                    result = Result(
                        front=front,
                        start=start,
                        end=time.monotonic(),
                        status=resp.status,
                        pod=resp.headers.get("X-Sdproxy-Pod"),
                        body=body,
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                result = Result(
                    front=front, start=start, end=time.monotonic(), status=0, pod=None,
                    error=repr(exc),
                )  # fmt: skip
            self.results.append(result)

    async def sampler(self) -> None:
        """Reads both fronts' pod modes every 100 ms, for the checks over time."""
        while not self.stopping.is_set():
            for front in FRONTS:
                await self.modes(front)
            await asyncio.sleep(0.1)


async def until(check: Callable[[], Awaitable[bool]], *, within_s: float, what: str) -> float:
    """Poll ``check`` every 50 ms; the time it first held, or fail after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic()


def sim_stats(lab: netns.Lab, pod: str) -> dict[str, Any]:
    """``GET /sim/stats`` of the pod's sd-webui, from inside its host (127.0.0.1 there)."""

    def read() -> dict[str, Any]:
        url = f"http://127.0.0.1:{SIM_PORT}/sim/stats"
        with urllib.request.urlopen(url, timeout=5) as resp:
            data: dict[str, Any] = json.load(resp)
            return data

    return netns.call_in(lab.hosts[pod].namespace, read, timeout_s=10)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[netns.Lab]:
    lab = netns.Lab.build(tmp_path, roles=[*PODS, *FRONTS])
    try:
        yield lab
    finally:
        print(lab.log_tails())  # shown when the test fails
        lab.close()


def start_hosts(lab: netns.Lab) -> None:
    sdproxy = [sys.executable, "-m", "sdproxy"]
    for pod in PODS:
        address = lab.hosts[pod].address
        lab.start(
            pod, f"{pod}-sim",
            [*sdproxy, "sim", "--pods", "1", "--port", str(SIM_PORT), "--host", "127.0.0.1",
             "--step-ms", "10", "--seed", "7"],
            cwd=REPO,
        )  # fmt: skip
        lab.start(
            pod, f"{pod}-gate",
            [*sdproxy, "gate", "--listen", f"{address}:{GATE_PORT}",
             "--upstream", f"http://127.0.0.1:{SIM_PORT}", "--max-inflight", "1"],
            cwd=REPO,
        )  # fmt: skip
    backends = []
    for pod in PODS:
        backends += ["--backend", f"http://{lab.hosts[pod].address}:{GATE_PORT}"]
    for front in FRONTS:
        lab.start(
            front, front,
            [*sdproxy, "serve", *backends, "--listen", f"0.0.0.0:{FRONT_PORT}",
             "--metrics-listen", "", "--identity", front, "--check-invariants"],
            cwd=REPO,
        )  # fmt: skip


def test_a_replica_cut_off_from_a_gate_stops_using_that_pod_until_the_link_heals(
    lab: netns.Lab,
) -> None:
    start_hosts(lab)
    report = netns.run_in(lab.net, lambda: scenario(lab), timeout_s=SCENARIO_S)
    print(report)
    assert not lab.dead(), f"processes exited during the run: {lab.dead()}"


async def scenario(lab: netns.Lab) -> str:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        run = Run(lab=lab, http=http)
        await start(run)
        tasks = [asyncio.create_task(run.client(i)) for i in range(CLIENTS)]
        tasks.append(asyncio.create_task(run.sampler()))
        try:
            await partition(run)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        run.stopping.set()
        # bounded by REQUEST_S per request: a hang shows as a TimeoutError result
        await asyncio.wait_for(asyncio.gather(*tasks), REQUEST_S + 5)
        await settle(run)
        return summary(run)


async def start(run: Run) -> None:
    """Every process answers, and both fronts follow both gates."""
    urls = [run.gate_url(p) + "/-/readyz" for p in PODS]
    urls += [run.front_url(f) + "/-/readyz" for f in FRONTS]
    for url in urls:

        async def ready(url: str = url) -> bool:
            if run.lab.dead():
                pytest.fail(f"exited during start-up: {run.lab.dead()}")
            return await run.answers(url)

        await until(ready, within_s=START_S, what=f"{url} to answer 200")
    for front in FRONTS:

        async def gated(front: str = front) -> bool:
            modes = await run.modes(front)
            return sorted(modes) == sorted(map(run.pod_id, PODS)) and all(
                m == "gated" for m in modes.values()
            )

        await until(gated, within_s=START_S, what=f"{front} to see both pods gated")


async def partition(run: Run) -> None:
    pod1 = PODS[0]
    a, b = FRONTS
    begin = run.mark("load")

    async def everyone_uses_both() -> bool:
        return all(run.served(f, p, since=begin) >= 3 for f in FRONTS for p in PODS)

    await until(everyone_uses_both, within_s=10, what="both fronts to use both pods")

    async def a_runs_on_pod1() -> bool:
        """Cut while pod 1 runs a generation for A, so its answer is caught on the link."""
        async with run.http.get(run.gate_url(pod1) + "/-/gate") as resp:
            running = (await resp.json())["running"]
        return any(c["replica"].startswith(f"{a}/") for c in running)

    await until(a_runs_on_pod1, within_s=5, what=f"{pod1} to run a generation for {a}")
    run.mark("cut")
    await asyncio.to_thread(run.lab.cut, a, run.lab.hosts[pod1].address)

    async def a_lost_pod1() -> bool:
        return await run.mode(a, pod1) == "gate_lost"

    await until(a_lost_pod1, within_s=LOST_WITHIN_S, what=f"{a} to show {pod1} gate_lost")
    run.mark("lost")
    assert await run.mode(b, pod1) == "gated", f"{b} still sees {pod1}"
    await asyncio.sleep(HOLD_CUT_S)
    assert await run.mode(a, pod1) == "gate_lost"
    run.mark("heal")
    await asyncio.to_thread(run.lab.heal, a)

    async def a_sees_pod1() -> bool:
        return await run.mode(a, pod1) == "gated"

    await until(a_sees_pod1, within_s=BACK_WITHIN_S, what=f"{a} to show {pod1} gated again")
    back = run.mark("back")

    async def a_uses_pod1() -> bool:
        return run.served(a, pod1, since=back) >= 3 and run.served(b, pod1, since=back) >= 3

    await until(a_uses_pod1, within_s=10, what=f"{a} (and {b}) to send to {pod1} again")
    run.mark("resumed")


async def settle(run: Run) -> None:
    """The checks over the whole run, once every client has stopped."""
    pod1, pod2 = PODS
    a, b = FRONTS
    marks = run.marks
    p1, p2 = run.pod_id(pod1), run.pod_id(pod2)

    # every request was answered: 200, or an error the proxy explains in JSON
    assert run.results, "no request was sent"
    for r in run.results:
        assert r.status != 0, f"request through {r.front} failed: {r.error}"
        if r.status != 200:
            assert "error" in json.loads(r.body), f"{r.status} without a JSON error: {r.body!r}"
    failed = [r for r in run.results if r.status != 200]
    assert not failed, f"{len(failed)} requests not served: {[(r.status, r.body) for r in failed]}"

    # while cut (from A noticing it to the heal), A sent everything to pod 2; B used both
    through_a, through_b = while_cut(run, a), while_cut(run, b)
    assert through_a, f"no request through {a} completed while it was cut off"
    assert {r.pod for r in through_a} == {p2}, f"{a} while cut: {_count(through_a)}"
    assert {r.pod for r in through_b} == {p1, p2}, f"{b} while {a} was cut: {_count(through_b)}"

    # what the fronts said over time
    for s in run.samples:
        if s.front == b and marks["cut"] <= s.at <= marks["back"]:
            assert s.modes == {p1: "gated", p2: "gated"}, f"{b} at {s.at}: {s.modes}"
        if s.front == a and marks["lost"] <= s.at <= marks["heal"]:
            assert s.modes == {p1: "gate_lost", p2: "gated"}, f"{a} at {s.at}: {s.modes}"
    for front in FRONTS:
        assert await run.modes(front) == {p1: "gated", p2: "gated"}

    # limits held: never two generations on one pod; each pod ran what it answered
    for pod in PODS:
        stats = await asyncio.to_thread(sim_stats, run.lab, pod)
        assert stats["heavy_inflight_max"] == 1, f"{pod}: {stats}"
        answered = sum(1 for r in run.results if r.pod == run.pod_id(pod))
        assert stats["completed"] == answered, f"{pod}: {stats} vs {answered} answered"

    # nothing left behind: no slot held, nothing queued, at the fronts or the gates
    async def idle() -> bool:
        for front in FRONTS:
            status = await run.status(front)
            busy = [p for p in status["pods"] if p["inflight"]]
            if status["inflight"] or status["queue"]["depth"] or busy:
                return False
        for pod in PODS:
            async with run.http.get(run.gate_url(pod) + "/-/gate") as resp:
                if (await resp.json())["inflight"]:
                    return False
        return True

    await until(idle, within_s=10, what="fronts and gates idle")


def while_cut(run: Run, front: str) -> list[Result]:
    """Requests through ``front`` that started once A showed the cut, and ended before
    the heal."""
    lost, heal = run.marks["lost"], run.marks["heal"]
    return [r for r in run.results if r.front == front and r.start >= lost and r.end <= heal]


def _count(results: list[Result]) -> dict[str | None, int]:
    counts: dict[str | None, int] = {}
    for r in results:
        counts[r.pod] = counts.get(r.pod, 0) + 1
    return counts


def summary(run: Run) -> str:
    m = run.marks
    caught = [
        r for r in run.results if r.front == FRONTS[0] and r.start < m["cut"] and r.end > m["heal"]
    ]
    longest = max(run.results, key=lambda r: r.end - r.start)
    lines = [
        f"requests: {len(run.results)} ({_count(run.results)})",
        f"load before the cut: {m['cut'] - m['load']:.2f} s",
        f"cut -> {FRONTS[0]} shows gate_lost: {m['lost'] - m['cut']:.2f} s",
        *(f"while cut, through {f}: {_count(while_cut(run, f))}" for f in FRONTS),
        f"heal -> {FRONTS[0]} shows gated: {m['back'] - m['heal']:.2f} s",
        f"gated -> sends to it again: {m['resumed'] - m['back']:.2f} s",
        f"caught on the cut link (through {FRONTS[0]}, started before the cut, ended "
        f"after the heal): {_count(caught)}",
        f"longest request: {longest.end - longest.start:.2f} s through {longest.front} "
        f"on {longest.pod}, started {longest.start - m['cut']:+.2f} s from the cut",
    ]
    return "\n".join(lines)
