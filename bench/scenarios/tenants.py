"""Scenario ``tenants``: tenant A floods 500 jobs; tenants B and C send steady traffic.

4 pods at limit 1, one generation S = 0.2 s (capacity N / S = 20 img/s). B and C each
send Poisson arrivals at 20 % of the capacity (below a third: steady, not backlogged;
``STEADY_SHARE``)
for T seconds, each with ``X-Sdproxy-Tenant``; A sends 500 jobs at once at the start.
Each of B and C is also run alone (same arrivals, nothing else) on the same system.

Measured per system and tenant: p95 latency (arrival to answer: queue wait plus the
generation; the queue wait of a steady tenant alone is about zero, so a ratio of waits
alone would divide by noise) together and alone, and the ratio; p95 queue wait. Fairness
while A is backlogged and B and C send (the window from 0.5 s + S to the end of their
arrivals): GPU-seconds served per tenant (each answer's generation interval, clipped to
the window), and Jain's index over them normalised by the max-min fair allocation
(Jain, Chiu, Hawe 1984: x_i = served_i / fair_i; a tenant that asks less than an equal
share is owed what it asks, the rest is A's) — 1.0 when each tenant got its fair
allocation. Systems: HAProxy leastconn (one queue, no idea of tenants), ``sdproxy
--policy fifo``, ``sdproxy``. Targets (sdproxy): B's and C's p95 <= 2x alone, index >=
0.95.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import report
from bench.loadgen import RequestSpec, Sample, new_session, open_loop, poisson
from bench.scenarios import Context, for_each_system
from bench.targets import Target, start_sdproxy, start_sim, start_system

SYSTEMS = ("haproxy", "sdproxy-fifo", "sdproxy")
STEADY = ("B", "C")
#: B's and C's offered load each, as a fraction of N / S (a fair share is a third)
STEADY_SHARE = 0.2
#: the sizes of the jobs, drawn per request
STEPS = (10, 20, 30)


def params(quick: bool) -> dict[str, Any]:
    p: dict[str, Any] = {"flood": 100, "steady_s": 4.0} if quick else {"flood": 500}
    p.setdefault("steady_s", 15.0)
    p.update(pods=4, step_ms=10.0, steps=20, steady_share=STEADY_SHARE, steady_start_s=0.5)
    service_s = p["steps"] * p["step_ms"] / 1000.0
    capacity = p["pods"] / service_s
    p.update(
        service_s=service_s,
        capacity_rps=capacity,
        steady_rps=p["steady_share"] * capacity,
        window=(p["steady_start_s"] + service_s, p["steady_start_s"] + p["steady_s"]),
    )
    return p


def steps_of(p: dict[str, Any], tenant: str, i: int) -> int:
    """Job sizes vary (10, 20 or 30 steps: mean S), as real traffic does; identical
    sizes would keep every pod finishing at the same instants."""
    return int(random.Random(f"{tenant}-{i}").choice(STEPS))


def spec(p: dict[str, Any], tenant: str, i: int) -> RequestSpec:
    body = {"prompt": f"bench tenants {tenant}", "steps": steps_of(p, tenant, i), "seed": i}
    body.update(width=512, height=512, send_images=False)
    return RequestSpec(
        method="POST",
        path="/sdapi/v1/txt2img",
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Sdproxy-Tenant": tenant},
    )


def arrivals(p: dict[str, Any], tenant: str, seed: int) -> list[float]:
    if tenant == "A":
        return [0.0] * p["flood"]
    rng = random.Random(f"{seed}-{tenant}")
    return poisson(
        rate=p["steady_rps"], duration_s=p["steady_s"], rng=rng, start_s=p["steady_start_s"]
    )


async def run_tenants(
    target: Target, *, p: dict[str, Any], tenants: Sequence[str], seed: int
) -> dict[str, list[Sample]]:
    """The given tenants' open loops at once, from one t0."""
    deadline = p["flood"] * p["service_s"] * 2 + p["steady_s"] + 60.0
    t0 = time.perf_counter()
    async with new_session(timeout_s=deadline) as session:

        async def loop(tenant: str) -> list[Sample]:
            result = await open_loop(
                session,
                target.url,
                arrivals=arrivals(p, tenant, seed),
                make_spec=lambda i: spec(p, tenant, i),
                deadline_s=deadline,
                t0=t0,
            )
            return result.samples

        found = await asyncio.gather(*(loop(t) for t in tenants))
    return dict(zip(tenants, found, strict=True))


def served_in(
    samples: Sequence[Sample], window: tuple[float, float], p: dict[str, Any], tenant: str
) -> float:
    """GPU-seconds of the answers' generations inside the window (each generation is
    its steps x step-ms before its answer)."""
    lo, hi = window
    total = 0.0
    for s in samples:
        if s.ok:
            service_s = steps_of(p, tenant, s.index) * p["step_ms"] / 1000.0
            total += max(0.0, min(hi, s.t_done) - max(lo, s.t_done - service_s))
    return total


def jain(served: dict[str, float], demand: dict[str, float]) -> float | None:
    """Jain's index of the allocations normalised by the max-min fair ones."""
    total = sum(served.values())
    if total <= 0:
        return None
    fair: dict[str, float] = {}
    left, names = total, sorted(served, key=lambda t: demand.get(t, float("inf")))
    for n, tenant in enumerate(names):
        share = left / (len(names) - n)
        fair[tenant] = min(share, demand.get(tenant, float("inf")))
        left -= fair[tenant]
    xs = [served[t] / fair[t] for t in served if fair[t] > 0]
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if xs else None


def p95(samples: Sequence[Sample]) -> float | None:
    return report.latency_ms(samples)["p95_ms"]


def p95_wait(samples: Sequence[Sample]) -> float | None:
    waits = [s.queue_ms for s in samples if s.ok and s.queue_ms is not None]
    return report.percentile(waits, 95)


async def measure(target: Target, *, p: dict[str, Any], seed: int) -> dict[str, Any]:
    alone = {t: (await run_tenants(target, p=p, tenants=[t], seed=seed))[t] for t in STEADY}
    together = await run_tenants(target, p=p, tenants=["A", *STEADY], seed=seed)
    lo, hi = p["window"]
    served = {t: served_in(s, p["window"], p, t) for t, s in together.items()}
    demand = {
        t: sum(
            steps_of(p, t, i) * p["step_ms"] / 1000.0
            for i, at in enumerate(arrivals(p, t, seed))
            if lo <= at < hi
        )
        for t in STEADY
    }
    row: dict[str, Any] = {
        "errors": sum(not s.ok for samples in together.values() for s in samples),
        "jain": jain(served, demand),
    }
    for t in ("A", *STEADY):
        row[f"{t}_gpu_s"] = round(served[t], 2)
        row[f"{t}_p95_ms"] = p95(together[t])
        row[f"{t}_wait_p95_ms"] = p95_wait(together[t])
    for t in STEADY:
        row[f"{t}_alone_p95_ms"] = p95(alone[t])
        row[f"{t}_alone_wait_p95_ms"] = p95_wait(alone[t])
        if row[f"{t}_p95_ms"] is not None and row[f"{t}_alone_p95_ms"]:
            row[f"{t}_vs_alone"] = round(row[f"{t}_p95_ms"] / row[f"{t}_alone_p95_ms"], 3)
    done = sorted(s.t_done for s in together["A"] if s.ok)
    row["A_last_s"] = round(done[-1], 1) if done else None
    row["series"] = {
        f"{t}": report.downsample([(s.t_send, s.latency) for s in together[t] if s.ok])
        for t in ("A", *STEADY)
    }
    return row


def start(stack: contextlib.ExitStack, name: str, *, pods: list[str], work_dir: Path) -> Target:
    if name == "haproxy":
        return start_system(stack, name, backends=pods, work_dir=work_dir)
    extra = ["--policy", "fifo"] if name == "sdproxy-fifo" else []
    return start_sdproxy(stack, backends=pods, workdir=work_dir / name, name=name, extra=extra)


COLUMNS: list[report.Column] = [
    ("B_p95_ms", "B p95 ms", ".0f"),
    ("B_alone_p95_ms", "B alone", ".0f"),
    ("B_vs_alone", "B x alone", ".2f"),
    ("C_p95_ms", "C p95 ms", ".0f"),
    ("C_alone_p95_ms", "C alone", ".0f"),
    ("C_vs_alone", "C x alone", ".2f"),
    ("A_gpu_s", "A GPU-s", ".1f"),
    ("B_gpu_s", "B GPU-s", ".1f"),
    ("C_gpu_s", "C GPU-s", ".1f"),
    ("jain", "Jain (max-min)", ".3f"),
    ("A_last_s", "A done s", ".1f"),
    ("errors", "errors", "d"),
]


async def run(ctx: Context) -> dict[str, Any]:
    p = params(ctx.quick)
    with contextlib.ExitStack() as stack:
        sim = start_sim(stack, pods=p["pods"], step_ms=p["step_ms"], workdir=ctx.work_dir)

        async def one(target: Target) -> dict[str, Any]:
            return await measure(target, p=p, seed=ctx.seed)

        systems = await for_each_system(
            SYSTEMS,
            backends=sim.urls,
            work_dir=ctx.work_dir,
            measure=one,
            start=lambda stack, name: start(stack, name, pods=sim.urls, work_dir=ctx.work_dir),
        )
    sd = systems.get("sdproxy", {})
    targets = {
        f"{t}_p95_vs_alone": report.target(
            sd.get(f"{t}_vs_alone"), text="<= 2x its p95 alone", ok=lambda v: v <= 2.0
        )
        for t in STEADY
    }
    targets["jain_index"] = report.target(
        sd.get("jain"), text=">= 0.95 while A is backlogged", ok=lambda v: v >= 0.95
    )
    series = {name: row.pop("series", {}) for name, row in systems.items()}
    lo, hi = p["window"]
    result: dict[str, Any] = {
        "scenario": "tenants",
        "description": (
            f"{p['pods']} pods, generation {p['service_s']:g} s (N/S "
            f"{p['capacity_rps']:.0f} img/s); A sends {p['flood']} jobs at t=0, B and C "
            f"Poisson at {p['steady_rps']:.0f}/s each ({p['steady_share']:.0%} of N/S) for "
            f"{p['steady_s']:g} s; fairness window {lo:.1f}-{hi:.1f} s."
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
    panels: list[tuple[str, str, dict[str, Sequence[report.Point]], str]] = [
        (f"{name}: latency by send time, per tenant", "seconds", dict(s), "dots")
        for name, s in series.items()
    ]
    path = report.plot_panels(
        out_dir / "tenants.png", title="tenants: A floods, B and C steady", panels=panels
    )
    return [path.name]
