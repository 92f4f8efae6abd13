"""Scenario 4, ``queue``: thousands of clients waiting at once behind busy pods.

First one long "blocker" generation per pod makes every pod busy. Then ``clients``
requests arrive in a burst (spread over a few seconds so the kernel's listen backlog is
not the thing measured) and all wait in the system's queue. When the blockers finish
the queue drains, one short job (8 ms) per freed slot.

Reported per system: peak RSS of the proxy (sampled every 50 ms from a thread), time to
admit (first client sent -> the system reports every client queued), the drain rate
(client completions per second) and how it changes with depth: the rate while the queue
is deep (completions 10-30 %) against the rate when it is shallow (70-90 %). A dispatch
that costs O(queue length) shows up as a deep rate well below the shallow one. Lost
clients are those that got no 200.

Systems: sdproxy and HAProxy (backend queue). Round-robin has no queue -- every request
goes to a pod at once and waits inside it -- so it is not part of this scenario.
HAProxy's connection limit here is bounded by the open-file limit (see targets.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.loadgen import Progress, RequestSpec, burst, new_session, open_loop, send
from bench.sampler import RssSampler, StackSampler, sim_reset, sim_stats
from bench.scenarios import Context, for_each_system
from bench.targets import Target, start_sim

SYSTEMS = ("haproxy", "sdproxy")
STEP_MS = 8.0


def params(quick: bool) -> dict[str, Any]:
    if quick:
        p = {"pods": 4, "clients": 1000, "blocker_s": 4.0, "spread_s": 0.5}
    else:
        p = {"pods": 4, "clients": 10_000, "blocker_s": 25.0, "spread_s": 4.0}
    p.update(job_ms=8.0, physical_rate=p["pods"] / 0.008)
    return p


def _spec(*, steps: int, size: int, tag: str) -> RequestSpec:
    doc = {"prompt": f"bench queue {tag}", "steps": steps, "width": size, "height": size}
    return RequestSpec(
        method="POST",
        path="/sdapi/v1/txt2img",
        body=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json"},
    )


BLOCKER_STEPS_PER_S = 1000.0 / STEP_MS  # 512x512: one step = STEP_MS
# 64x64 is 1/64 of 512x512: 64 steps x 1/64 x 8 ms = 8 ms
JOB = _spec(steps=64, size=64, tag="job")


async def measure(target: Target, *, p: dict[str, Any], pods: list[str]) -> dict[str, Any]:
    blocker = _spec(steps=int(p["blocker_s"] * BLOCKER_STEPS_PER_S), size=512, tag="blocker")
    deadline = p["blocker_s"] + p["clients"] * 0.008 / p["pods"] * 6 + 60
    async with new_session(timeout_s=deadline) as session, new_session(timeout_s=10) as side:
        await sim_reset(side, pods)
        t0 = time.perf_counter()
        blockers = [
            asyncio.create_task(send(session, target.url, blocker, t0=t0)) for _ in range(p["pods"])
        ]
        await asyncio.sleep(0.5)
        sampler = StackSampler(target=target, pods=pods, session=side, t0=t0, interval_s=0.1)
        progress = Progress(f"queue {target.name}", total=p["clients"])
        with RssSampler(target.proc, interval_s=0.05, t0=t0) as rss:
            async with sampler:
                start = time.perf_counter() - t0
                arrivals = burst(count=p["clients"], at_s=start, spread_s=p["spread_s"])
                res = await open_loop(
                    session,
                    target.url,
                    arrivals=arrivals,
                    make_spec=lambda i: JOB,
                    deadline_s=deadline,
                    progress=progress,
                    t0=t0,
                )
                progress.close()
                blocked = await asyncio.gather(*blockers)
        stats = await sim_stats(side, pods)
    return summarize(res.samples, blocked, sampler.rows, rss, stats, p=p, start=start)


def _rate(times: list[float], lo: float, hi: float) -> float | None:
    n = len(times)
    i, j = int(n * lo), int(n * hi)
    if n < 10 or j <= i or times[j - 1] <= times[i]:
        return None
    return (j - 1 - i) / (times[j - 1] - times[i])


def summarize(
    samples: list[Any],
    blocked: list[Any],
    rows: list[dict[str, Any]],
    rss: RssSampler,
    stats: list[dict[str, Any]],
    *,
    p: dict[str, Any],
    start: float,
) -> dict[str, Any]:
    ok = sorted(s.t_done for s in samples if s.ok)
    depths = [(r["t"], r["queue_depth"]) for r in rows if r["queue_depth"] is not None]
    max_depth = max((d for _, d in depths), default=None)
    full_at = next((t for t, d in depths if d >= p["clients"]), None)
    deep, shallow = _rate(ok, 0.1, 0.3), _rate(ok, 0.7, 0.9)
    overall = _rate(ok, 0.0, 1.0)
    inflight_max = [st.get("heavy_inflight_max") for st in stats]
    return {
        "clients": p["clients"],
        "ok": len(ok),
        "lost": p["clients"] - len(ok),
        "error_kinds": report.errors_by_kind(samples),
        "blockers_ok": sum(1 for b in blocked if b.ok),
        "rss_peak_mib": None if rss.peak_mib is None else round(rss.peak_mib, 1),
        "rss_before_mib": None if rss.first_mib is None else round(rss.first_mib, 1),
        "max_queue_depth": max_depth,
        "admit_s": None if full_at is None else round(full_at - start, 2),
        "drain_rate": None if overall is None else round(overall, 1),
        "drain_vs_physical": None if overall is None else round(overall / p["physical_rate"], 3),
        "rate_deep": None if deep is None else round(deep, 1),
        "rate_shallow": None if shallow is None else round(shallow, 1),
        "deep_cost_ratio": None if not deep or not shallow else round(shallow / deep, 3),
        "max_pod_inflight": max((v for v in inflight_max if v is not None), default=None),
        **report.latency_ms(samples),
        "series": {
            "queue_depth": report.downsample([(t, float(d)) for t, d in depths]),
            "busy_pods": report.downsample([(r["t"], float(r["busy_pods"])) for r in rows]),
            "rss_mib": report.downsample(rss.series),
            "completed": report.downsample([(t, float(i + 1)) for i, t in enumerate(ok)]),
        },
    }


COLUMNS: list[report.Column] = [
    ("clients", "clients", "d"),
    ("lost", "lost", "d"),
    ("rss_peak_mib", "RSS peak MiB", ".1f"),
    ("max_queue_depth", "max queue", "d"),
    ("admit_s", "all queued after s", ".2f"),
    ("drain_rate", "drain /s", ".0f"),
    ("drain_vs_physical", "of physical", ".0%"),
    ("rate_deep", "rate deep /s", ".0f"),
    ("rate_shallow", "rate shallow /s", ".0f"),
    ("deep_cost_ratio", "cost deep/shallow", ".2f"),
]


async def run(ctx: Context) -> dict[str, Any]:
    p = params(ctx.quick)
    with contextlib.ExitStack() as stack:
        sim = start_sim(stack, pods=p["pods"], step_ms=STEP_MS, workdir=ctx.work_dir)

        async def one(target: Target) -> dict[str, Any]:
            return await measure(target, p=p, pods=sim.urls)

        systems = await for_each_system(
            SYSTEMS, backends=sim.urls, work_dir=ctx.work_dir, measure=one
        )
    sd = systems.get("sdproxy", {})
    targets = {
        "rss_peak_mb": report.target(
            # the target is in MB (10^6 bytes); the table shows MiB
            None if sd.get("rss_peak_mib") is None else round(sd["rss_peak_mib"] * 1.048576, 1),
            text=f"<= 300 MB with {p['clients']} waiting",
            ok=lambda v: v <= 300,
        ),
        "dispatch_cost_deep_vs_shallow": report.target(
            sd.get("deep_cost_ratio"),
            text="<= 1.25 (drain rate at depth within 25% of shallow: flat)",
            ok=lambda v: v <= 1.25,
        ),
        "lost_clients": report.target(sd.get("lost"), text="0", ok=lambda v: v == 0),
    }
    series = {name: row.pop("series", {}) for name, row in systems.items()}
    result: dict[str, Any] = {
        "scenario": "queue",
        "description": (
            f"{p['clients']} clients arrive within {p['spread_s']:.1f} s while "
            f"{p['pods']} pods run "
            f"{p['blocker_s']:.0f} s blockers, then drain at 8 ms per job "
            f"(physical {p['physical_rate']:.0f}/s)."
        ),
        "params": p,
        "systems": systems,
        "targets": targets,
        "series": series,
        "table_md": report.markdown_table(systems, COLUMNS),
    }
    result["plots"] = plots(result, ctx.out_dir)
    return result


def plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    series: dict[str, dict[str, list[report.Point]]] = result["series"]

    def pick(key: str) -> dict[str, list[report.Point]]:
        return {name: [(x[0], x[1]) for x in s.get(key, [])] for name, s in series.items()}

    path = report.plot_panels(
        out_dir / "queue.png",
        title=f"queue: {result['params']['clients']} waiting clients",
        panels=[
            ("queue depth", "requests", pick("queue_depth"), "line"),
            ("clients answered", "count", pick("completed"), "line"),
            ("proxy RSS", "MiB", pick("rss_mib"), "line"),
            ("busy pods", "pods", pick("busy_pods"), "line"),
        ],
    )
    return [path.name]
