"""Integration: the simulated sd-webui pod over real HTTP on 127.0.0.1.

Scheduling, progress, interrupt/skip, checkpoints and the worker pool. Timing checks
are orderings and lower bounds (a noisy shared 2-core machine makes upper bounds flaky),
with step_ms small enough that the file runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from sdproxy.sim.config import SimConfig
from sdproxy.sim.server import run_pods

pytestmark = pytest.mark.timeout(30)

CKPT_A, CKPT_B = "a.safetensors", "b.safetensors"
SD15: dict[str, Any] = {"width": 512, "height": 512}  # one cost unit per step


@contextlib.asynccontextmanager
async def pod(**overrides: Any) -> AsyncIterator[aiohttp.ClientSession]:
    """One simulated pod and a client session bound to its base URL."""
    config = SimConfig(**{"step_ms": 10.0, "switch_s": 0.2, **overrides})
    async with run_pods(config) as urls, aiohttp.ClientSession(base_url=urls[0]) as session:
        yield session


async def get(session: aiohttp.ClientSession, path: str) -> Any:
    async with session.get(path) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def post(session: aiohttp.ClientSession, path: str, *, json: Any) -> tuple[int, Any]:
    async with session.post(path, json=json) as resp:
        return resp.status, await resp.json()


async def timed_post(session: aiohttp.ClientSession, path: str, *, json: Any) -> tuple[float, Any]:
    """(loop time at completion, JSON) of a POST that must succeed."""
    status, data = await post(session, path, json=json)
    assert status == 200, data
    return asyncio.get_running_loop().time(), data


async def wait_until(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        # ASYNC110 wants an Event; we poll another process's HTTP surface: there is none
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def stats(session: aiohttp.ClientSession) -> dict[str, Any]:
    data: dict[str, Any] = await get(session, "/sim/stats")
    return data


async def running_task(session: aiohttp.ClientSession, task: str, *, job_no: int = 0) -> None:
    """Wait until ``task`` runs on the GPU, at pass ``job_no`` or later, sampling.

    Progress never names the running task (v1.10.1's ``current_task`` is always null), so
    the task comes from the simulator's own ``/sim/stats``.
    """

    async def check() -> bool:
        if (await stats(session))["running_task"] != task:
            return False
        state = (await get(session, "/sdapi/v1/progress"))["state"]
        return bool(state["job_no"] >= job_no and state["sampling_step"] > 0)

    await wait_until(check)


async def test_heavy_requests_are_serialised_and_counted() -> None:
    async with pod() as s:
        loop = asyncio.get_running_loop()
        body = {**SD15, "steps": 10, "send_images": False}  # 10 steps × 10 ms = 0.1 s each
        start = loop.time()
        done = await asyncio.gather(
            *(timed_post(s, "/sdapi/v1/txt2img", json=body) for _ in range(4))
        )
        ends = sorted(end - start for end, _ in done)
        # one at a time: the k-th completion cannot come before k service times
        for k, end in enumerate(ends, start=1):
            assert end >= k * 0.1 * 0.9
        st = await stats(s)
        assert st["heavy_inflight_max"] == 4  # all four were inside the pod at once
        assert st["heavy_inflight"] == 0
        assert st["completed"] == 4
        assert st["busy_s"] >= 0.4 * 0.9


async def test_waiters_are_woken_in_no_fifo_order() -> None:
    async with pod(seed=3) as s:
        body = {**SD15, "steps": 5, "send_images": False}
        order: list[int] = []

        async def one(index: int) -> None:
            steps = 100 if index == 0 else 5  # the first holds the lock while the rest arrive
            await timed_post(s, "/sdapi/v1/txt2img", json={**body, "steps": steps})
            order.append(index)

        tasks = []
        for index in range(7):  # arrive one by one so the arrival order is known
            tasks.append(asyncio.create_task(one(index)))
            await wait_until(functools.partial(_inflight_at_least, s, index + 1))
        await asyncio.gather(*tasks)
        assert order[0] == 0  # the first found the lock free
        assert order != sorted(order)  # the six waiters did not run first-come first-served


async def _inflight_at_least(s: aiohttp.ClientSession, count: int) -> bool:
    return bool((await stats(s))["heavy_inflight"] >= count)


async def test_progress_reflects_the_running_job() -> None:
    async with pod() as s:
        idle = await get(s, "/sdapi/v1/progress")
        assert idle["progress"] == 0 and idle["state"]["job"] == "" and idle["current_task"] is None
        body = {**SD15, "steps": 40, "n_iter": 2, "force_task_id": "task(mine)"}
        job = asyncio.create_task(timed_post(s, "/sdapi/v1/txt2img", json=body))
        await running_task(s, "task(mine)")
        prog = await get(s, "/sdapi/v1/progress")
        state = prog["state"]
        assert state["job"] == "Batch 1 out of 2"  # processing.py, for n_iter > 1
        assert state["job_count"] == 2 and state["sampling_steps"] == 40
        assert 0 < state["sampling_step"] <= 40
        assert 0 < prog["progress"] < 1 and prog["eta_relative"] > 0
        assert prog["current_task"] is None
        skipped = await get(s, "/sdapi/v1/progress?skip_current_image=true")
        assert skipped["current_image"] is None
        await running_task(s, "task(mine)", job_no=1)  # the second iteration advances
        later = await get(s, "/sdapi/v1/progress")
        assert later["progress"] > prog["progress"]
        await job
        assert (await get(s, "/sdapi/v1/progress"))["state"]["job"] == ""


async def test_interrupt_ends_the_running_job_with_partial_images_only() -> None:
    async with pod() as s:
        loop = asyncio.get_running_loop()
        # 4 iterations × 50 steps × 10 ms = 2 s uninterrupted
        long = {**SD15, "steps": 50, "n_iter": 4, "force_task_id": "long"}
        start = loop.time()
        first = asyncio.create_task(timed_post(s, "/sdapi/v1/txt2img", json=long))
        await running_task(s, "long", job_no=1)
        waiting = asyncio.create_task(
            timed_post(s, "/sdapi/v1/txt2img", json={**SD15, "steps": 5, "n_iter": 2})
        )
        await wait_until(lambda: _inflight_at_least(s, 2))
        status, answer = await post(s, "/sdapi/v1/interrupt", json={})
        assert status == 200 and answer == {}
        end, data = await first
        assert end - start < 1.8  # well short of the 2 s the job would take
        assert 2 <= len(data["images"]) < 4  # done so far, the interrupted batch included
        _, other = await waiting
        assert len(other["images"]) == 2  # the waiting job was not interrupted
        st = await stats(s)
        assert (st["interrupted"], st["interrupts_received"], st["completed"]) == (1, 1, 2)


async def test_interrupt_when_idle_is_a_noop() -> None:
    async with pod() as s:
        assert (await post(s, "/sdapi/v1/interrupt", json={}))[0] == 200
        _, data = await timed_post(s, "/sdapi/v1/txt2img", json={**SD15, "steps": 3, "n_iter": 2})
        assert len(data["images"]) == 2
        st = await stats(s)
        assert (st["interrupted"], st["interrupts_received"]) == (0, 1)


async def test_skip_ends_only_the_current_iteration() -> None:
    async with pod() as s:
        loop = asyncio.get_running_loop()
        body = {**SD15, "steps": 100, "n_iter": 2, "force_task_id": "skipme"}  # 2 × 1 s
        start = loop.time()
        job = asyncio.create_task(timed_post(s, "/sdapi/v1/txt2img", json=body))
        await running_task(s, "skipme")
        status, answer = await post(s, "/sdapi/v1/skip", json={})
        assert status == 200 and answer is None
        await running_task(s, "skipme", job_no=1)  # the second iteration runs normally
        prog = await get(s, "/sdapi/v1/progress")
        assert prog["state"]["skipped"] is False
        end, data = await job
        assert len(data["images"]) == 2
        assert end - start < 1.9
        assert (await stats(s))["interrupted"] == 0


async def test_checkpoint_override_switches_and_restores_afterwards() -> None:
    async with pod(checkpoints=(CKPT_A, CKPT_B)) as s:
        loop = asyncio.get_running_loop()
        titles = {
            m["filename"].rsplit("/", 1)[-1]: m["title"]
            for m in await get(s, "/sdapi/v1/sd-models")
        }
        assert (await stats(s))["loaded_checkpoint"] == titles[CKPT_A]
        body = {**SD15, "steps": 1, "override_settings": {"sd_model_checkpoint": "b"}}
        start = loop.time()
        end, data = await timed_post(s, "/sdapi/v1/txt2img", json=body)
        assert end - start >= 2 * 0.2 * 0.9  # switch to b, then back to a
        assert "Model: b" in data["info"]
        st = await stats(s)
        assert (st["checkpoint_switches"], st["loaded_checkpoint"]) == (2, titles[CKPT_A])
        assert (await get(s, "/sdapi/v1/options"))["sd_model_checkpoint"] == titles[CKPT_A]

        keep = {**body, "override_settings_restore_afterwards": False}
        start = loop.time()
        end, _ = await timed_post(s, "/sdapi/v1/txt2img", json=keep)
        assert end - start >= 0.2 * 0.9
        st = await stats(s)
        assert st["checkpoint_switches"] == 3 and st["loaded_checkpoint"].startswith(CKPT_B)
        # opts keeps the override as written (b was hashed by its first load already)
        assert (await get(s, "/sdapi/v1/options"))["sd_model_checkpoint"] == "b"

        # no override (or an unknown one) runs on the pod's current default: no switch
        await timed_post(s, "/sdapi/v1/txt2img", json={**SD15, "steps": 1})
        unknown = {"sd_model_checkpoint": "nope.ckpt"}
        await timed_post(
            s, "/sdapi/v1/txt2img", json={**SD15, "steps": 1, "override_settings": unknown}
        )
        assert (await stats(s))["checkpoint_switches"] == 3


async def test_post_options_switches_under_the_lock_and_persists() -> None:
    async with pod(checkpoints=(CKPT_A, CKPT_B)) as s:
        loop = asyncio.get_running_loop()
        job = asyncio.create_task(
            timed_post(s, "/sdapi/v1/txt2img", json={**SD15, "steps": 30, "force_task_id": "t"})
        )
        await running_task(s, "t")
        status, answer = await post(s, "/sdapi/v1/options", json={"sd_model_checkpoint": CKPT_B})
        options_done = loop.time()
        job_done, _ = await job
        assert status == 200 and answer is None
        assert options_done >= job_done  # waited for the running generation (the lock)
        options = await get(s, "/sdapi/v1/options")
        assert options["sd_model_checkpoint"].startswith(CKPT_B)
        st = await stats(s)
        assert st["checkpoint_switches"] == 1 and st["loaded_checkpoint"].startswith(CKPT_B)
        # persists: a plain request stays on b
        _, data = await timed_post(s, "/sdapi/v1/txt2img", json={**SD15, "steps": 1})
        assert "Model: b" in data["info"]
        assert (await stats(s))["checkpoint_switches"] == 1
        status, error = await post(s, "/sdapi/v1/options", json={"sd_model_checkpoint": "zzz"})
        assert status == 500 and error["error"] == "RuntimeError"


async def test_exhausted_worker_pool_stalls_light_routes_too() -> None:
    async with pod(threads=3) as s:
        body = {**SD15, "steps": 50, "send_images": False}  # 0.5 s each, 1.5 s in all
        heavy = [
            asyncio.create_task(timed_post(s, "/sdapi/v1/txt2img", json=body)) for _ in range(3)
        ]

        async def pool_full() -> bool:
            return bool((await stats(s))["threads_in_use"] == 3)

        await wait_until(pool_full)  # /sim/* bypasses the pool and still answers
        stalled = [
            asyncio.create_task(get(s, "/sdapi/v1/progress")),
            asyncio.create_task(get(s, "/internal/ping")),
        ]
        done, _ = await asyncio.wait(stalled, timeout=0.15)
        assert not done  # no thread free: even progress and ping wait
        assert (await stats(s))["completed"] == 0
        await asyncio.gather(*stalled)  # answered once a generation frees its thread
        assert (await stats(s))["completed"] >= 1
        await asyncio.gather(*heavy)
        assert (await stats(s))["threads_in_use"] == 0


async def test_a_client_that_disconnects_does_not_stop_its_generation() -> None:
    async with pod() as s:
        body = {**SD15, "steps": 20, "send_images": False}  # 0.2 s
        with pytest.raises(TimeoutError):
            await s.post("/sdapi/v1/txt2img", json=body, timeout=aiohttp.ClientTimeout(total=0.05))

        async def completed() -> bool:
            return bool((await stats(s))["completed"] == 1)

        await wait_until(completed)  # still ran to the end, as on a real pod
        assert (await stats(s))["heavy_inflight"] == 0


async def test_pods_are_independent() -> None:
    config = SimConfig(step_ms=5.0, switch_s=0.05, checkpoints=(CKPT_A, CKPT_B))
    async with run_pods(config, count=3) as urls, aiohttp.ClientSession() as s:
        assert len(set(urls)) == 3
        status, _ = await post(s, urls[0] + "/sdapi/v1/txt2img", json={**SD15, "steps": 2})
        assert status == 200
        status, _ = await post(
            s, urls[1] + "/sdapi/v1/options", json={"sd_model_checkpoint": CKPT_B}
        )
        assert status == 200
        all_stats = [await get(s, url + "/sim/stats") for url in urls]
        assert [st["completed"] for st in all_stats] == [1, 0, 0]
        assert [st["loaded_checkpoint"].split(" ")[0] for st in all_stats] == [
            CKPT_A,
            CKPT_B,
            CKPT_A,
        ]
