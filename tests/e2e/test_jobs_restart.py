"""End to end: asynchronous jobs across a ``kill -9`` of ``sdproxy serve``, and its memory.

The real proxy process runs twice with the same ``--jobs-dir`` in front of ``sdproxy sim``
pods. After SIGKILL and a restart every accepted job is accounted for: the finished one
is still fetchable, the queued ones are queued again and run (in their order), and the
one that was running is ``failed`` with ``interrupted_by_restart`` (README "Crash
safety": a generation is never run twice unasked). No id the proxy accepted is a 404.

Memory: multi-megabyte img2img jobs (8 MB bodies, ~5 MB answers) go through the disk;
the proxy's peak RSS grows by far less than the bytes that went through it.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_serve_cli import backend_flags, serve, sim, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SUBMIT = "/-/jobs/sdapi/v1/txt2img"


def body(steps: int) -> dict[str, Any]:
    return {"prompt": "a cat", "steps": steps, "send_images": False}


async def submit(client: httpx.AsyncClient, url: str, steps: int) -> str:
    resp = await client.post(url + SUBMIT, json=body(steps))
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


async def doc(client: httpx.AsyncClient, url: str, job_id: str) -> dict[str, Any]:
    resp = await client.get(f"{url}/-/jobs/{job_id}")
    assert resp.status_code == 200, (job_id, resp.text)
    data: dict[str, Any] = resp.json()
    return data


async def test_kill_9_and_restart_accounts_for_every_job(tmp_path: Path) -> None:
    import aiohttp

    jobs_dir = tmp_path / "jobs"
    async with (
        sim(tmp_path, pods=1) as pods,
        aiohttp.ClientSession() as session,
        httpx.AsyncClient(timeout=30) as client,
    ):
        flags = [*backend_flags(pods), "--metrics-listen", "", "--jobs-dir", str(jobs_dir)]
        async with serve(tmp_path, session, flags) as (proc, url, log):
            finished = await submit(client, url, 2)
            done = await client.get(f"{url}/-/jobs/{finished}/result", params={"wait": 20})
            assert done.status_code == 200
            running = await submit(client, url, 300)  # 3 s at 10 ms a step

            async def started() -> bool:
                return (await doc(client, url, running))["status"] == "running"

            await wait_for(started, "the long job to run", log)
            queued = [await submit(client, url, 2) for _ in range(3)]
            for job_id in queued:
                assert (await doc(client, url, job_id))["status"] == "queued"
            proc.send_signal(signal.SIGKILL)
            await proc.wait()

        async with serve(tmp_path, session, flags) as (_proc, url, log):
            kept = await client.get(f"{url}/-/jobs/{finished}/result")
            assert kept.status_code == 200 and kept.content == done.content

            lost = await doc(client, url, running)
            assert lost["status"] == "failed" and lost["error"] == "interrupted_by_restart"
            answer = await client.get(f"{url}/-/jobs/{running}/result")
            assert answer.status_code == 502
            assert answer.json()["error"] == "interrupted_by_restart"

            results = [
                await client.get(f"{url}/-/jobs/{job_id}/result", params={"wait": 30})
                for job_id in queued
            ]
            assert [r.status_code for r in results] == [200, 200, 200], [r.text for r in results]
            docs = [await doc(client, url, job_id) for job_id in queued]
            assert all(d["status"] == "succeeded" for d in docs)
            starts = [d["started_at"] for d in docs]
            assert starts == sorted(starts), "taken up again in their order"
            listed = (await client.get(f"{url}/-/jobs", params={"limit": 10})).json()["jobs"]
            assert {j["id"] for j in listed} == {finished, running, *queued}


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


async def test_multi_megabyte_img2img_jobs_keep_the_proxys_memory_bounded(
    tmp_path: Path,
) -> None:
    import aiohttp

    init = "A" * (8 * 1024 * 1024)
    big = {"init_images": [init], "steps": 2, "width": 1536, "height": 1536, "prompt": "x"}
    async with (
        sim(tmp_path, pods=2) as pods,
        aiohttp.ClientSession() as session,
        httpx.AsyncClient(timeout=60, headers={"Accept-Encoding": "identity"}) as client,
    ):
        flags = [*backend_flags(pods), "--metrics-listen", "", "--jobs-dir", str(tmp_path / "j")]
        async with serve(tmp_path, session, flags) as (proc, url, _log):
            warm = await client.post(url + SUBMIT, json=body(2))  # imports, pools, first job
            await client.get(f"{url}/-/jobs/{warm.json()['id']}/result", params={"wait": 20})
            before = _rss_kib(proc.pid, "VmRSS")
            ids = []
            for _ in range(6):
                resp = await client.post(url + "/-/jobs/sdapi/v1/img2img", json=big)
                assert resp.status_code == 202, resp.text
                ids.append(resp.json()["id"])
            sizes = []
            for job_id in ids:
                result = await client.get(f"{url}/-/jobs/{job_id}/result", params={"wait": 60})
                assert result.status_code == 200
                sizes.append(len(result.content))
            await asyncio.sleep(0)
            peak = _rss_kib(proc.pid, "VmHWM")
    moved_mib = (len(init) * len(ids) + sum(sizes)) / 2**20
    grown_mib = (peak - before) / 1024
    print(f"img2img jobs: peak RSS +{grown_mib:.1f} MiB for {moved_mib:.0f} MiB moved")
    assert min(sizes) > 4 * 2**20
    assert grown_mib < 40, f"peak RSS grew {grown_mib:.1f} MiB for {moved_mib:.0f} MiB moved"


async def test_a_replica_leaving_gracefully_hands_its_jobs_to_a_peer(tmp_path: Path) -> None:
    """SIGTERM with a short drain: the finished job's result and the still-queued jobs
    go to the peer, which runs the queued ones; the job still running when the drain
    ended stays behind (the cost of a replica leaving mid-generation)."""
    import aiohttp

    from tests.conftest import free_port

    ports = [free_port(), free_port()]
    a_url, b_url = (f"http://127.0.0.1:{p}" for p in ports)
    async with (
        sim(tmp_path, pods=2) as pods,
        aiohttp.ClientSession() as session,
        httpx.AsyncClient(timeout=30) as client,
    ):
        common = ["--metrics-listen", "", "--drain-timeout-s", "1"]
        a_flags = [
            *common,
            "--backend",
            pods[0],
            "--peer",
            b_url,
            "--jobs-dir",
            str(tmp_path / "a"),
        ]
        b_flags = [
            *common,
            *backend_flags(pods),
            "--peer",
            a_url,
            "--jobs-dir",
            str(tmp_path / "b"),
        ]
        async with (
            serve(tmp_path, session, a_flags, port=ports[0]) as (a_proc, _a, a_log),
            serve(tmp_path, session, b_flags, port=ports[1]) as (_b_proc, _b, b_log),
        ):
            finished = await submit(client, a_url, 2)
            done = await client.get(f"{a_url}/-/jobs/{finished}/result", params={"wait": 20})

            async def b_sees_a() -> bool:
                return (await client.get(f"{b_url}/-/jobs/{finished}")).status_code == 200

            await wait_for(b_sees_a, "replica b to hear from replica a", b_log)
            running = await submit(client, a_url, 400)  # 4 s: still running after the drain

            async def started() -> bool:
                return (await doc(client, a_url, running))["status"] == "running"

            await wait_for(started, "the long job to run", a_log)
            queued = [await submit(client, a_url, 2) for _ in range(2)]
            a_proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(a_proc.wait(), 30) == 0

            kept = await client.get(f"{b_url}/-/jobs/{finished}/result")
            assert kept.status_code == 200 and kept.content == done.content
            for job_id in queued:
                result = await client.get(f"{b_url}/-/jobs/{job_id}/result", params={"wait": 20})
                assert result.status_code == 200, result.text
                assert (await doc(client, b_url, job_id))["status"] == "succeeded"
            stranded = await client.get(f"{b_url}/-/jobs/{running}")
            assert stranded.status_code == 404
