"""Scenario 5, ``replicas``: several front processes in front of the same pods at 2x overload.

With one proxy the per-pod limit is that proxy's own book. With several replicas (a
Deployment with ``replicas: 3`` behind a Service) each replica's book only knows its own
requests: the limit would multiply by the number of replicas. ``sdproxy gate`` (one per
pod, its sidecar) is the single authority on what its pod runs; every replica follows
every gate's occupancy stream and gets ``pod_busy`` (then requeues at the head) when
another replica won the slot. This scenario shows what it costs and that it holds.

The systems, all in front of the same 4 simulated pods at limit 1, arrivals as in
``overload`` (Poisson at 2x N / S), the requests spread over the front processes
round-robin (as a Service spreads connections):

- ``sdproxy-1-direct``: one ``sdproxy serve`` straight to the pods (reference, no gate);
- ``sdproxy-1``: one replica in front of one gate per pod;
- ``sdproxy-3``: three replicas, each with every gate as ``--backend``;
- ``haproxy-2``: two HAProxy processes, each ``maxconn 1`` per server, straight to the
  pods (no gate): what the classic answer does with two replicas -- each process keeps
  its own ``maxconn``, so a pod runs up to two requests (the second waits inside the pod).

The heavy requests say ``Accept-Encoding: identity``. The simulated pods gzip answers of
1000 bytes or more at level 9 when asked (as sd-webui's GZipMiddleware does, since
5a3a6ef), ~15 ms of CPU per 0.6 MB answer before its first byte leaves the pod: on a real
pod that is the pod's own CPU and ~1 % of a 2 s generation, here it is the 2 cores the
front processes share with the pods and the client, and 7 % of each 200 ms job -- it would
measure the simulator, not the replicas.

Reported per system: goodput over the saturated window (as ``overload``), latency
p50/p99, max in flight per pod (each pod's own ``/sim/stats`` ``heavy_inflight_max``),
and the queue wait: ``X-Sdproxy-Queue-Ms`` for sdproxy (enqueue to dispatch, time spent
requeued after ``pod_busy`` included), HAProxy's ``%Tw`` (its queue time, sent back in a
response header this scenario's config adds). Because HAProxy x2 lets the second request
of a pod wait inside the pod (in sd-webui's lock), where ``%Tw`` cannot see it, the table
also shows latency minus the service time S for every system -- the comparable figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench import report
from bench.loadgen import Progress, RequestSpec, Sample, new_session, open_loop, poisson
from bench.sampler import StackSampler, sim_reset, sim_stats
from bench.scenarios import Context, for_each_system
from bench.scenarios.overload import heavy_spec
from bench.targets import (
    Fleet,
    Target,
    start_gates,
    start_haproxy,
    start_sdproxy,
    start_sim,
    wait_gated,
)

SYSTEMS = ("sdproxy-1-direct", "sdproxy-1", "sdproxy-3", "haproxy-2")
REPLICAS = {"sdproxy-1-direct": 1, "sdproxy-1": 1, "sdproxy-3": 3, "haproxy-2": 2}


def params(quick: bool) -> dict[str, Any]:
    if quick:
        p = {"pods": 4, "step_ms": 20.0, "steps": 20, "size": 256, "arrivals_s": 3.0}
    else:
        p = {"pods": 4, "step_ms": 10.0, "steps": 20, "size": 512, "arrivals_s": 30.0}
    service_s = p["steps"] * (p["size"] ** 2 / 512**2) * p["step_ms"] / 1000.0
    capacity = p["pods"] / service_s
    p.update(
        service_s=service_s,
        capacity_rps=capacity,
        offered_rps=2.0 * capacity,
        window_start_s=2 * service_s + 0.5,
    )
    return p


def spec(p: dict[str, Any], i: int) -> RequestSpec:
    """``overload``'s generation request, answered uncompressed (see the docstring)."""
    base = heavy_spec(p, i)
    headers = {**base.headers, "Accept-Encoding": "identity"}
    return RequestSpec(method=base.method, path=base.path, body=base.body, headers=headers)


def start_fleet(
    stack: contextlib.ExitStack, name: str, *, pods: Sequence[str], work_dir: Path
) -> Fleet:
    """Start the front processes (and gates) of one system in front of ``pods``."""
    workdir = work_dir / name
    members: list[Target] = []
    gates: list[str] = []
    if name == "haproxy-2":
        for i in range(REPLICAS[name]):
            members.append(
                start_haproxy(
                    stack,
                    backends=pods,
                    workdir=workdir / f"haproxy{i}",
                    queue_header=True,
                    name=f"haproxy{i}",
                )
            )
    else:
        if name != "sdproxy-1-direct":
            gates = start_gates(stack, pods=pods, workdir=workdir / "gates")
        for i in range(REPLICAS[name]):
            replica = start_sdproxy(
                stack,
                backends=gates or pods,
                workdir=workdir / f"replica{i}",
                name=f"replica{i}",
            )
            if gates:
                wait_gated(replica, pods=len(gates))
            members.append(replica)
    return Fleet(name=name, url=members[0].url, members=members, extra={"gates": gates})


async def measure(fleet: Fleet, *, p: dict[str, Any], pods: list[str], seed: int) -> dict[str, Any]:
    arrivals = poisson(rate=p["offered_rps"], duration_s=p["arrivals_s"], rng=random.Random(seed))
    deadline = p["arrivals_s"] * 3 + 30.0
    async with new_session(timeout_s=deadline) as session, new_session(timeout_s=10) as side:
        await sim_reset(side, pods)
        progress = Progress(f"replicas {fleet.name}", total=len(arrivals))
        t0 = time.perf_counter()
        sampler = StackSampler(target=fleet, pods=pods, session=side, t0=t0)
        async with sampler:
            try:
                result = await open_loop(
                    session,
                    fleet.urls,
                    arrivals=arrivals,
                    make_spec=lambda i: spec(p, i),
                    deadline_s=deadline,
                    progress=progress,
                    t0=t0,
                )
            finally:
                progress.close()
        elapsed = time.perf_counter() - t0
        stats = await sim_stats(side, pods)
        per_replica = await _replica_completed(side, fleet)
    row = summarize(result.samples, sampler.rows, stats, p=p, cancelled=result.cancelled)
    row["replicas"] = len(fleet.members)
    row["gated"] = bool(fleet.extra.get("gates"))
    row["completed_per_replica_pod"] = per_replica
    row["completed_per_replica"] = [None if c is None else sum(c) for c in per_replica]
    row["pod_busy_fraction"] = [
        None if st.get("busy_s") is None else round(st["busy_s"] / elapsed, 3) for st in stats
    ]
    return row


async def _replica_completed(
    session: aiohttp.ClientSession, fleet: Fleet
) -> list[list[int] | None]:
    """Heavy requests each sdproxy replica completed, per pod (its /-/status counters)."""

    async def one(member: Target) -> list[int] | None:
        if member.status_url is None:
            return None
        try:
            async with session.get(member.status_url) as resp:
                data = await resp.json()
            return [int(pod["completed"]) for pod in data["pods"]]
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError, TypeError):
            return None

    return list(await asyncio.gather(*(one(m) for m in fleet.members)))


def _pct(values: list[float], q: float) -> float | None:
    v = report.percentile(values, q)
    return None if v is None else round(v, 1)


def summarize(
    samples: list[Sample],
    rows: list[dict[str, Any]],
    stats: list[dict[str, Any]],
    *,
    p: dict[str, Any],
    cancelled: int,
) -> dict[str, Any]:
    lo, hi = p["window_start_s"], p["arrivals_s"]
    ok = [s for s in samples if s.ok]
    done_in_window = sum(1 for s in ok if lo <= s.t_done < hi)
    goodput = done_in_window / (hi - lo)
    waits = [s.queue_ms for s in ok if s.queue_ms is not None]
    beyond = [max(0.0, (s.latency - p["service_s"]) * 1000.0) for s in ok]
    inflight_max = [st.get("heavy_inflight_max") for st in stats]
    sampled_max = max((max((v or 0) for v in r["pod_inflight"]) for r in rows), default=None)
    row: dict[str, Any] = {
        "sent": len(samples),
        "ok": len(ok),
        "errors": len(samples) - len(ok),
        "error_kinds": report.errors_by_kind(samples),
        "cancelled": cancelled,
        "goodput_ips": round(goodput, 3),
        "goodput_fraction": round(goodput / p["capacity_rps"], 4),
        **report.latency_ms(samples),
        "wait_header_count": len(waits),
        "wait_p50_ms": _pct(waits, 50),
        "wait_p99_ms": _pct(waits, 99),
        "beyond_service_p50_ms": _pct(beyond, 50),
        "beyond_service_p99_ms": _pct(beyond, 99),
        "pod_inflight_max": inflight_max,
        "max_pod_inflight": max((v for v in inflight_max if v is not None), default=None),
        "max_pod_inflight_sampled": sampled_max,
        "completed_per_pod": [st.get("completed") for st in stats],
        "by_front": _by_front(ok, lo=lo, hi=hi, service_s=p["service_s"]),
    }
    row["series"] = {
        "latency": report.downsample([(s.t_send, s.latency) for s in ok]),
        "wait_s": report.downsample(
            [(s.t_send, s.queue_ms / 1000.0) for s in ok if s.queue_ms is not None]
        ),
        "queue_depth": report.downsample(
            [(r["t"], float(r["queue_depth"])) for r in rows if r["queue_depth"] is not None]
        ),
        "pod_inflight_max": report.downsample(
            [(r["t"], float(max((v or 0) for v in r["pod_inflight"]))) for r in rows]
        ),
        **{
            f"wait_front{base}": report.downsample(
                [(s.t_send, (s.latency - p["service_s"])) for s in ok if s.base == base]
            )
            for base in sorted({s.base for s in ok})
        },
    }
    in_window = [f["done_in_window"] for f in row["by_front"]]
    row["window_share"] = (
        " / ".join(f"{n / sum(in_window):.0%}" for n in in_window) if sum(in_window) else None
    )
    return row


def _by_front(ok: list[Sample], *, lo: float, hi: float, service_s: float) -> list[dict[str, Any]]:
    """Per front process (the load is spread evenly): answers finished inside the
    saturated window, and its requests' waits -- shows whether the replicas share the
    pods fairly or one of them keeps winning them."""
    out: list[dict[str, Any]] = []
    for base in sorted({s.base for s in ok}):
        mine = [s for s in ok if s.base == base]
        waits = [s.queue_ms for s in mine if s.queue_ms is not None]
        beyond = [max(0.0, (s.latency - service_s) * 1000.0) for s in mine]
        out.append(
            {
                "front": base,
                "ok": len(mine),
                "done_in_window": sum(1 for s in mine if lo <= s.t_done < hi),
                "wait_p50_ms": _pct(waits, 50),
                "wait_p99_ms": _pct(waits, 99),
                "beyond_service_p99_ms": _pct(beyond, 99),
            }
        )
    return out


COLUMNS: list[report.Column] = [
    ("replicas", "front processes", "d"),
    ("goodput_ips", "goodput img/s", ".2f"),
    ("goodput_fraction", "of N/S", ".1%"),
    ("p50_ms", "latency p50 ms", ".0f"),
    ("p99_ms", "latency p99 ms", ".0f"),
    ("wait_p50_ms", "queue wait p50 ms", ".0f"),
    ("wait_p99_ms", "queue wait p99 ms", ".0f"),
    ("beyond_service_p50_ms", "latency-S p50 ms", ".0f"),
    ("beyond_service_p99_ms", "latency-S p99 ms", ".0f"),
    ("p99_wait_vs_single", "p99 wait vs 1 replica", ".2f"),
    ("window_share", "served per front (window)", "s"),
    ("errors", "errors", "d"),
    ("max_pod_inflight", "max in flight/pod", "d"),
]


async def run(ctx: Context) -> dict[str, Any]:
    p = params(ctx.quick)
    with contextlib.ExitStack() as stack:
        sim = start_sim(stack, pods=p["pods"], step_ms=p["step_ms"], workdir=ctx.work_dir)

        async def one(target: Target) -> dict[str, Any]:
            assert isinstance(target, Fleet)
            return await measure(target, p=p, pods=sim.urls, seed=ctx.seed)

        def start(stack: contextlib.ExitStack, name: str) -> Target:
            return start_fleet(stack, name, pods=sim.urls, work_dir=ctx.work_dir)

        systems = await for_each_system(
            SYSTEMS, backends=sim.urls, work_dir=ctx.work_dir, measure=one, start=start
        )
    single = systems.get("sdproxy-1", {}).get("wait_p99_ms")
    for row in systems.values():
        if row.get("wait_p99_ms") is not None and single:
            row["p99_wait_vs_single"] = round(row["wait_p99_ms"] / single, 3)
    three = systems.get("sdproxy-3", {})
    targets = {
        "max_pod_inflight_3_replicas": report.target(
            three.get("max_pod_inflight"), text="<= 1 (the pod limit)", ok=lambda v: v <= 1
        ),
        "goodput_fraction_3_replicas": report.target(
            three.get("goodput_fraction"), text=">= 0.97 of N/S", ok=lambda v: v >= 0.97
        ),
        "p99_wait_vs_single_replica": report.target(
            three.get("p99_wait_vs_single"),
            text="<= 1.2x the single (gated) replica's p99 queue wait",
            ok=lambda v: v <= 1.2,
        ),
    }
    series = {name: row.pop("series", {}) for name, row in systems.items()}
    result: dict[str, Any] = {
        "scenario": "replicas",
        "description": (
            f"{p['pods']} pods at limit 1, service time S = {p['service_s'] * 1000:.0f} ms "
            f"(N/S = {p['capacity_rps']:.1f} img/s), Poisson arrivals at "
            f"{p['offered_rps']:.1f}/s for {p['arrivals_s']:.0f} s spread round-robin over "
            f"the front processes; goodput counted from {p['window_start_s']:.2f} s to "
            f"{p['arrivals_s']:.0f} s. sdproxy-1/-3 go through one `sdproxy gate` per pod; "
            "sdproxy-1-direct and haproxy-2 talk to the pods directly."
        ),
        "quick": ctx.quick,
        "params": p,
        "systems": systems,
        "targets": targets,
        "series": series,
        "table_md": report.markdown_table(systems, COLUMNS),
        "notes": [
            "queue wait: sdproxy's X-Sdproxy-Queue-Ms (enqueue to dispatch, requeues after "
            "pod_busy included); haproxy-2: HAProxy's %Tw, which does not see the second "
            "request of a pod waiting inside the pod; latency-S (latency minus the service "
            "time) is the comparable wait for every system.",
            "max in flight/pod: the largest heavy_inflight_max of the pods' own /sim/stats.",
        ],
    }
    result["plots"] = plots(result, ctx.out_dir)
    return result


def plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    series: dict[str, dict[str, list[report.Point]]] = result["series"]

    def pick(key: str) -> dict[str, list[report.Point]]:
        return {name: [(x[0], x[1]) for x in s.get(key, [])] for name, s in series.items()}

    def by_front(system: str) -> dict[str, list[report.Point]]:
        mine = series.get(system, {})
        keys = sorted(k for k in mine if k.startswith("wait_front"))
        return {f"replica{k.removeprefix('wait_front')}": list(mine[k]) for k in keys}

    path = report.plot_panels(
        out_dir / "replicas.png",
        title=f"replicas: {result['params']['pods']} pods at 2x overload",
        panels=[
            ("latency by send time", "seconds", pick("latency"), "dots"),
            ("queue wait (header) by send time", "seconds", pick("wait_s"), "dots"),
            ("queue depth (sum over the front processes)", "requests", pick("queue_depth"), "line"),
            (
                "most requests in one pod (sampled /sim/stats)",
                "requests",
                pick("pod_inflight_max"),
                "line",
            ),
            ("sdproxy-3: latency - S by front replica", "seconds", by_front("sdproxy-3"), "dots"),
        ],
    )
    values = {name: row.get("max_pod_inflight") for name, row in result["systems"].items()}
    bars = report.plot_bars(
        out_dir / "replicas_inflight.png",
        title="replicas: most heavy requests one pod ran at once (limit 1)",
        ylabel="requests",
        values=values,
    )
    return [path.name, bars.name]
