"""Scenario 1, ``overload``: 4 pods at limit 1, Poisson arrivals at twice their capacity.

Capacity is the physical limit N / S (S = the simulator's service time,
steps x (w*h/512^2) x step-ms). At 2x the queue grows all run long, so every pod should
be busy from the first second: goodput is counted over the window where the pods are
saturated (from 2 S + 0.5 s to the last arrival), then the backlog drains and every
answer is waited for (latency percentiles cover all answered requests). A separate
client polls ``GET /sdapi/v1/progress`` through the system every 50 ms all along; its
latency is reported over the same window. Each pod's ``heavy_inflight_max`` comes from
its own ``/sim/stats`` (reset before each system).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.loadgen import Progress, RequestSpec, Sample, new_session, open_loop, poisson, poller
from bench.sampler import StackSampler, sim_reset, sim_stats
from bench.scenarios import Context, for_each_system
from bench.targets import Target, start_sim

SYSTEMS = ("round-robin", "haproxy", "sdproxy")


def params(quick: bool) -> dict[str, Any]:
    if quick:
        p = {"pods": 4, "step_ms": 20.0, "steps": 20, "size": 256, "arrivals_s": 4.0}
    else:
        p = {"pods": 4, "step_ms": 10.0, "steps": 20, "size": 512, "arrivals_s": 30.0}
    service_s = p["steps"] * (p["size"] ** 2 / 512**2) * p["step_ms"] / 1000.0
    capacity = p["pods"] / service_s
    p.update(
        service_s=service_s,
        capacity_rps=capacity,
        offered_rps=2.0 * capacity,
        progress_interval_s=0.05,
        window_start_s=2 * service_s + 0.5,
    )
    return p


def heavy_spec(p: dict[str, Any], i: int) -> RequestSpec:
    body = {"prompt": "bench overload", "steps": p["steps"], "width": p["size"]}
    body.update(height=p["size"], seed=i, sampler_name="Euler a")
    return RequestSpec(
        method="POST",
        path="/sdapi/v1/txt2img",
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )


async def measure(
    target: Target, *, p: dict[str, Any], pods: list[str], seed: int
) -> dict[str, Any]:
    arrivals = poisson(rate=p["offered_rps"], duration_s=p["arrivals_s"], rng=random.Random(seed))
    deadline = p["arrivals_s"] * 3 + 30.0
    async with new_session(timeout_s=deadline) as session, new_session(timeout_s=10) as side:
        await sim_reset(side, pods)
        progress = Progress(f"overload {target.name}", total=len(arrivals))
        stop = asyncio.Event()
        t0 = time.perf_counter()
        sampler = StackSampler(target=target, pods=pods, session=side, t0=t0)
        run_task = asyncio.create_task(
            open_loop(
                session,
                target.url,
                arrivals=arrivals,
                make_spec=lambda i: heavy_spec(p, i),
                deadline_s=deadline,
                progress=progress,
                t0=t0,
            )
        )
        spec = RequestSpec(method="GET", path="/sdapi/v1/progress?skip_current_image=true")
        async with sampler:
            poll_task = asyncio.create_task(
                poller(
                    side,
                    target.url,
                    spec=spec,
                    interval_s=p["progress_interval_s"],
                    stop=stop,
                    t0=t0,
                )
            )
            try:
                result = await run_task
            finally:
                stop.set()
                polls = await poll_task
                progress.close()
        stats = await sim_stats(side, pods)
    return summarize(result.samples, polls, sampler.rows, stats, p=p, cancelled=result.cancelled)


def summarize(
    samples: list[Sample],
    polls: list[Sample],
    rows: list[dict[str, Any]],
    stats: list[dict[str, Any]],
    *,
    p: dict[str, Any],
    cancelled: int,
) -> dict[str, Any]:
    lo, hi = p["window_start_s"], p["arrivals_s"]
    done_in_window = sum(1 for s in samples if s.ok and lo <= s.t_done < hi)
    goodput = done_in_window / (hi - lo)
    window_polls = [s for s in polls if lo <= s.t_send < hi]
    busy = [r["busy_pods"] for r in rows if lo <= r["t"] < hi]
    inflight_max = [st.get("heavy_inflight_max") for st in stats]
    row: dict[str, Any] = {
        "sent": len(samples),
        "ok": sum(s.ok for s in samples),
        "errors": sum(not s.ok for s in samples),
        "error_kinds": report.errors_by_kind(samples),
        "cancelled": cancelled,
        "goodput_ips": round(goodput, 3),
        "goodput_fraction": round(goodput / p["capacity_rps"], 4),
        **report.latency_ms(samples),
        "pod_inflight_max": inflight_max,
        "max_pod_inflight": max((v for v in inflight_max if v is not None), default=None),
        "all_pods_busy_fraction": round(sum(1 for b in busy if b >= p["pods"]) / len(busy), 3)
        if busy
        else None,
        "progress_polls": len(window_polls),
        "progress_errors": sum(not s.ok for s in window_polls),
        "progress_p50_ms": report.latency_ms(window_polls)["p50_ms"],
        "progress_p99_ms": report.latency_ms(window_polls)["p99_ms"],
    }
    row["series"] = {
        "latency": report.downsample([(s.t_send, s.latency) for s in samples if s.ok]),
        "progress_ms": report.downsample([(s.t_send, s.latency * 1000) for s in polls if s.ok]),
        "queue_depth": report.downsample(
            [(r["t"], float(r["queue_depth"])) for r in rows if r["queue_depth"] is not None]
        ),
        "busy_pods": report.downsample([(r["t"], float(r["busy_pods"])) for r in rows]),
        "pod_inflight_sum": report.downsample(
            [(r["t"], float(sum(v or 0 for v in r["pod_inflight"]))) for r in rows]
        ),
    }
    return row


COLUMNS: list[report.Column] = [
    ("goodput_ips", "goodput img/s", ".2f"),
    ("goodput_fraction", "of limit", ".1%"),
    ("p50_ms", "p50 ms", ".0f"),
    ("p95_ms", "p95 ms", ".0f"),
    ("p99_ms", "p99 ms", ".0f"),
    ("errors", "errors", "d"),
    ("max_pod_inflight", "max in flight/pod", "d"),
    ("progress_p50_ms", "progress p50 ms", ".1f"),
    ("progress_p99_ms", "progress p99 ms", ".1f"),
]


async def run(ctx: Context) -> dict[str, Any]:
    p = params(ctx.quick)
    with contextlib.ExitStack() as stack:
        sim = start_sim(stack, pods=p["pods"], step_ms=p["step_ms"], workdir=ctx.work_dir)

        async def one(target: Target) -> dict[str, Any]:
            return await measure(target, p=p, pods=sim.urls, seed=ctx.seed)

        systems = await for_each_system(
            SYSTEMS, backends=sim.urls, work_dir=ctx.work_dir, measure=one
        )
    sd = systems.get("sdproxy", {})
    targets = {
        "goodput_fraction": report.target(
            sd.get("goodput_fraction"), text=">= 0.98 of N/S", ok=lambda v: v >= 0.98
        ),
        "max_pod_inflight": report.target(
            sd.get("max_pod_inflight"), text="<= 1 (the pod limit)", ok=lambda v: v <= 1
        ),
        "progress_p99_ms": report.target(
            sd.get("progress_p99_ms"), text="<= 20 ms while every pod is busy", ok=lambda v: v <= 20
        ),
    }
    series = {name: row.pop("series", {}) for name, row in systems.items()}
    result: dict[str, Any] = {
        "scenario": "overload",
        "description": (
            f"{p['pods']} pods at limit 1, service time {p['service_s'] * 1000:.0f} ms "
            f"(limit {p['capacity_rps']:.1f} img/s), Poisson arrivals at "
            f"{p['offered_rps']:.1f}/s for {p['arrivals_s']:.0f} s; goodput counted from "
            f"{p['window_start_s']:.2f} s to {p['arrivals_s']:.0f} s."
        ),
        "quick": ctx.quick,
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
        return {name: s.get(key, []) for name, s in series.items()}

    path = report.plot_panels(
        out_dir / "overload.png",
        title=f"overload: {result['description'][:90]}",
        panels=[
            ("latency by send time", "seconds", pick("latency"), "dots"),
            ("queue depth (system's own)", "requests", pick("queue_depth"), "line"),
            ("busy pods (from /sim/stats)", "pods", pick("busy_pods"), "line"),
            ("progress poll latency", "ms", pick("progress_ms"), "dots"),
        ],
    )
    return [path.name]
