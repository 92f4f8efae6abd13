"""Scenario 6, ``jobs``: 2,000 asynchronous jobs submitted in 5 s while every pod is busy.

Every pod first runs a long "blocker" generation (longer than the submit phase), so
every job waits in the queue. Then ``jobs`` txt2img jobs (64×64, 8 ms of sampling each)
arrive spread over ``spread_s`` seconds as ``POST /-/jobs/sdapi/v1/txt2img``; each is
answered ``202`` once its body file is written and its row committed. When the blockers
end the queue drains; every result is then fetched (``GET /-/jobs/{id}/result``).

Reported: submit latency (p50/p99/max, the time to the ``202``), the proxy's peak RSS
(sampled every 50 ms), the job store's size on disk after the run (SQLite file + WAL +
result files) and ``store_bytes`` as ``/-/status`` reports it, how long the drain took,
and lost jobs: accepted ones whose result is not a ``200``.

Baselines, the same arrivals as synchronous requests that hold their connection for the
whole wait: ``sdproxy-sync`` and ``haproxy`` (backend queue) — what a client without a
job API must do. Their "submit" latency is the whole wait, so the comparable numbers
are RSS, lost requests and held connections (one per waiting request).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import report
from bench.loadgen import Progress, RequestSpec, burst, new_session, open_loop, send
from bench.sampler import RssSampler, sim_reset
from bench.scenarios import Context, for_each_system
from bench.targets import Target, start_sdproxy, start_sim, start_system

SYSTEMS = ("sdproxy", "sdproxy-sync", "haproxy")
STEP_MS = 8.0
SUBMIT_PATH = "/-/jobs/sdapi/v1/txt2img"


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"pods": 4, "jobs": 200, "spread_s": 1.0, "blocker_s": 3.0}
    return {"pods": 4, "jobs": 2000, "spread_s": 5.0, "blocker_s": 8.0}


def _spec(*, path: str, steps: int, size: int, tag: str) -> RequestSpec:
    doc = {"prompt": f"bench jobs {tag}", "steps": steps, "width": size, "height": size}
    return RequestSpec(
        method="POST",
        path=path,
        body=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json", "Accept-Encoding": "identity"},
    )


def _blocker(p: dict[str, Any]) -> RequestSpec:
    steps = int(p["blocker_s"] * 1000.0 / STEP_MS)
    return _spec(path="/sdapi/v1/txt2img", steps=steps, size=512, tag="blocker")


async def measure(
    target: Target, *, p: dict[str, Any], pods: list[str], work: Path
) -> dict[str, Any]:
    is_jobs = target.name == "sdproxy"
    job = _spec(path=SUBMIT_PATH if is_jobs else "/sdapi/v1/txt2img", steps=64, size=64, tag="job")
    deadline = p["blocker_s"] + p["jobs"] * 0.008 / p["pods"] * 6 + 60
    async with new_session(timeout_s=deadline) as session, new_session(timeout_s=30) as side:
        await sim_reset(side, pods)
        t0 = time.perf_counter()
        blockers = [
            asyncio.create_task(send(session, target.url, _blocker(p), t0=t0))
            for _ in range(p["pods"])
        ]
        await asyncio.sleep(0.5)
        progress = Progress(f"jobs {target.name}", total=p["jobs"])
        with RssSampler(target.proc, interval_s=0.05, t0=t0) as rss:
            start = time.perf_counter() - t0
            arrivals = burst(count=p["jobs"], at_s=start, spread_s=p["spread_s"])
            res = await open_loop(
                session,
                target.url,
                arrivals=arrivals,
                make_spec=lambda i: job,
                deadline_s=deadline,
                progress=progress,
                t0=t0,
            )
            progress.close()
            submitted_s = time.perf_counter() - t0 - start
            await asyncio.gather(*blockers)
            row: dict[str, Any] = {"jobs": p["jobs"], **report.latency_ms(res.samples)}
            if is_jobs:
                row.update(await _fetch_all(side, target, res.samples, t0=t0))
        row["rss_peak_mib"] = None if rss.peak_mib is None else round(rss.peak_mib, 1)
        row["rss_before_mib"] = None if rss.first_mib is None else round(rss.first_mib, 1)
    ok = sum(1 for s in res.samples if s.ok)
    row["accepted"] = ok
    row["submit_phase_s"] = round(submitted_s, 2)
    row["error_kinds"] = report.errors_by_kind(res.samples)
    if is_jobs:
        row["store_disk_bytes"] = _disk_bytes(work / "sdproxy" / "sdproxy-jobs")
    else:
        row["lost"] = p["jobs"] - ok
    return row


async def _fetch_all(
    session: aiohttp.ClientSession, target: Target, samples: list[Any], *, t0: float
) -> dict[str, Any]:
    """Wait for every accepted job's result (long-polls, 64 at a time)."""
    ids = [s.job_id for s in samples if s.ok and s.job_id]
    limit = asyncio.Semaphore(64)
    statuses: list[int] = []
    done_at: list[float] = []

    async def one(job_id: str) -> None:
        async with limit:
            url = f"{target.url}/-/jobs/{job_id}/result?wait=120"
            try:
                async with session.get(url, headers={"Accept-Encoding": "identity"}) as resp:
                    await resp.read()
                    statuses.append(resp.status)
            except (aiohttp.ClientError, TimeoutError):
                statuses.append(0)
            done_at.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(i) for i in ids))
    async with session.get(target.url + "/-/status", headers={"Accept": "application/json"}) as r:
        jobs = (await r.json())["jobs"]
    return {
        "results_ok": statuses.count(200),
        "lost": len(samples) - statuses.count(200),
        "store_bytes": jobs["store_bytes"],
        "all_done_s": round(max(done_at, default=0.0), 2),
    }


def _disk_bytes(root: Path) -> int | None:
    if not root.exists():
        return None
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


COLUMNS: list[report.Column] = [
    ("jobs", "jobs", "d"),
    ("accepted", "accepted", "d"),
    ("lost", "lost", "d"),
    ("p50_ms", "submit p50 ms", ".1f"),
    ("p99_ms", "submit p99 ms", ".1f"),
    ("max_ms", "submit max ms", ".1f"),
    ("rss_peak_mib", "RSS peak MiB", ".1f"),
    ("store_disk_bytes", "store on disk B", "d"),
]


async def run(ctx: Context) -> dict[str, Any]:
    p = params(ctx.quick)
    with contextlib.ExitStack() as stack:
        sim = start_sim(stack, pods=p["pods"], step_ms=STEP_MS, workdir=ctx.work_dir)

        def start(inner: contextlib.ExitStack, name: str) -> Target:
            if name == "sdproxy-sync":
                return start_sdproxy(
                    inner, backends=sim.urls, workdir=ctx.work_dir / name, name="sdproxy-sync"
                )
            return start_system(inner, name, backends=sim.urls, work_dir=ctx.work_dir)

        async def one(target: Target) -> dict[str, Any]:
            return await measure(target, p=p, pods=sim.urls, work=ctx.work_dir)

        systems = await for_each_system(
            SYSTEMS, backends=sim.urls, work_dir=ctx.work_dir, measure=one, start=start
        )
    sd = systems.get("sdproxy", {})
    targets = {
        "submit_p99_ms": report.target(
            sd.get("p99_ms"),
            text=f"<= 100 ms with {p['jobs']} jobs submitted in {p['spread_s']:g} s",
            ok=lambda v: v <= 100,
        ),
        "lost_jobs": report.target(sd.get("lost"), text="0", ok=lambda v: v == 0),
        "rss_peak_mb": report.target(
            None if sd.get("rss_peak_mib") is None else round(sd["rss_peak_mib"] * 1.048576, 1),
            text="<= 300 MB",
            ok=lambda v: v <= 300,
        ),
        "store_disk_mb": report.target(
            None if sd.get("store_disk_bytes") is None else sd["store_disk_bytes"] / 1e6,
            text="measured (results of 64x64 images + SQLite)",
            ok=lambda v: v >= 0,
        ),
    }
    return {
        "scenario": "jobs",
        "description": (
            f"{p['jobs']} txt2img jobs submitted within {p['spread_s']:g} s while "
            f"{p['pods']} pods run {p['blocker_s']:g} s blockers, then drained at 8 ms per "
            "job; every result fetched."
        ),
        "params": p,
        "systems": systems,
        "targets": targets,
        "table_md": report.markdown_table(systems, COLUMNS),
        "plots": [],
    }
