"""Scenario ``checkpoints``: 4 pods, 4 checkpoints of Zipf popularity, switches of 3 s, 2x.

Every pod lists the same 4 checkpoints (c0..c3); each request names one, drawn with Zipf
popularity (weights 1, 1/2, 1/3, 1/4: 48 %, 24 %, 16 %, 12 %), and sends
``override_settings_restore_afterwards: false``, so the checkpoint stays loaded after
the job (the way to keep models resident in sd-webui: with restore afterwards every
pod returns to its one default and no scheduler can avoid a switch). A switch costs 3 s
of GPU time for nothing; one generation 1 s. Poisson arrivals at twice the capacity
without switches (N / S). Before each system every pod is set back to c0 and its
counters zeroed.

Measured per system: goodput (answers finished inside the window where the backlog
keeps every pod busy, per second, and as a fraction of N / S), the checkpoint switches
the pods made (``/sim/stats``), latency percentiles. Systems: HAProxy leastconn with
``maxconn 1`` (a freed server takes the head of its queue: no idea of checkpoints),
``sdproxy --policy fifo`` (FIFO, a free pod with the checkpoint preferred among free
pods) and ``sdproxy`` (checkpoint-aware dispatch). Target: sdproxy >= 1.5x HAProxy's
goodput.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import report
from bench.loadgen import Progress, RequestSpec, Sample, new_session, open_loop, poisson
from bench.sampler import sim_stats
from bench.scenarios import Context, for_each_system
from bench.targets import Target, TargetUnavailable, start_sdproxy, start_sim, start_system

SYSTEMS = ("haproxy", "sdproxy-fifo", "sdproxy")
CHECKPOINTS = tuple(f"c{i}.safetensors" for i in range(4))
#: Zipf (s = 1) popularity of c0..c3
POPULARITY = tuple(1 / (i + 1) for i in range(len(CHECKPOINTS)))


def params(quick: bool) -> dict[str, Any]:
    if quick:
        p = {"step_ms": 10.0, "steps": 20, "switch_s": 0.3, "arrivals_s": 6.0}
    else:
        p = {"step_ms": 50.0, "steps": 20, "switch_s": 3.0, "arrivals_s": 20.0}
    p["pods"] = 4
    service_s = p["steps"] * p["step_ms"] / 1000.0
    capacity = p["pods"] / service_s
    p.update(
        service_s=service_s,
        capacity_rps=capacity,
        offered_rps=2.0 * capacity,
        # every pod has made its first switches and the backlog holds them busy
        window_start_s=2 * (service_s + p["switch_s"]),
    )
    return p


def draw(rng: random.Random) -> str:
    return rng.choices(CHECKPOINTS, weights=POPULARITY)[0]


def heavy_spec(p: dict[str, Any], i: int, *, seed: int) -> RequestSpec:
    checkpoint = draw(random.Random(seed * 100_003 + i))
    body = {
        "prompt": "bench checkpoints",
        "steps": p["steps"],
        "width": 512,
        "height": 512,
        "seed": i,
        "override_settings": {"sd_model_checkpoint": checkpoint},
        "override_settings_restore_afterwards": False,
        "send_images": False,
    }
    return RequestSpec(
        method="POST",
        path="/sdapi/v1/txt2img",
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )


def _post(url: str, body: dict[str, Any] | None = None) -> None:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        resp.read()


def reset_pods(pods: list[str]) -> None:
    """Every pod back to c0 (a load, if it had another), then its counters zeroed."""
    for url in pods:
        _post(url + "/sdapi/v1/options", {"sd_model_checkpoint": CHECKPOINTS[0]})
        _post(url + "/sim/reset")


def wait_catalogs(target: Target, *, pods: int, timeout_s: float = 30.0) -> None:
    """sdproxy reads every ready pod's checkpoints; measure once it knows them all."""
    url = target.status_url or f"{target.url}/-/status"
    deadline = time.monotonic() + timeout_s
    known: list[Any] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            with urllib.request.urlopen(url, timeout=2) as resp:
                known = [p["checkpoint"] for p in json.load(resp)["pods"]]
            if len(known) == pods and all(known):
                return
        time.sleep(0.1)
    raise TargetUnavailable(f"{target.name}: pods' checkpoints unknown after {timeout_s}s")


def start(stack: contextlib.ExitStack, name: str, *, pods: list[str], work_dir: Path) -> Target:
    reset_pods(pods)
    if name == "haproxy":
        return start_system(stack, name, backends=pods, work_dir=work_dir)
    extra = ["--policy", "fifo"] if name == "sdproxy-fifo" else []
    target = start_sdproxy(stack, backends=pods, workdir=work_dir / name, name=name, extra=extra)
    wait_catalogs(target, pods=len(pods))
    return target


async def measure(
    target: Target, *, p: dict[str, Any], pods: list[str], seed: int
) -> dict[str, Any]:
    arrivals = poisson(rate=p["offered_rps"], duration_s=p["arrivals_s"], rng=random.Random(seed))
    # a FIFO backlog drains at about a third of the capacity (most jobs switch)
    deadline = p["arrivals_s"] * 10 + 60.0
    async with new_session(timeout_s=deadline) as session, new_session(timeout_s=10) as side:
        progress = Progress(f"checkpoints {target.name}", total=len(arrivals))
        result = await open_loop(
            session,
            target.url,
            arrivals=arrivals,
            make_spec=lambda i: heavy_spec(p, i, seed=seed),
            deadline_s=deadline,
            progress=progress,
        )
        progress.close()
        stats = await sim_stats(side, pods)
    return summarize(result.samples, stats, p=p, cancelled=result.cancelled)


def summarize(
    samples: list[Sample], stats: list[dict[str, Any]], *, p: dict[str, Any], cancelled: int
) -> dict[str, Any]:
    lo, hi = p["window_start_s"], p["arrivals_s"]
    done_in_window = sum(1 for s in samples if s.ok and lo <= s.t_done < hi)
    goodput = done_in_window / (hi - lo)
    switches = sum(int(st.get("checkpoint_switches") or 0) for st in stats)
    completed = sum(int(st.get("completed") or 0) for st in stats)
    done = sorted(s.t_done for s in samples if s.ok)
    row: dict[str, Any] = {
        "sent": len(samples),
        "ok": sum(s.ok for s in samples),
        "errors": sum(not s.ok for s in samples),
        "error_kinds": report.errors_by_kind(samples),
        "cancelled": cancelled,
        "goodput_ips": round(goodput, 3),
        "goodput_fraction": round(goodput / p["capacity_rps"], 4),
        "switches": switches,
        "switches_per_job": round(switches / completed, 3) if completed else None,
        "drain_s": round(done[-1], 1) if done else None,
        **report.latency_ms(samples),
    }
    row["series"] = {
        "latency": report.downsample([(s.t_send, s.latency) for s in samples if s.ok]),
        "completed": report.downsample([(t, float(n + 1)) for n, t in enumerate(done)]),
    }
    return row


COLUMNS: list[report.Column] = [
    ("goodput_ips", "goodput img/s", ".2f"),
    ("goodput_fraction", "of N/S", ".1%"),
    ("switches", "switches", "d"),
    ("switches_per_job", "switches/job", ".2f"),
    ("p50_ms", "p50 ms", ".0f"),
    ("p95_ms", "p95 ms", ".0f"),
    ("drain_s", "last answer s", ".1f"),
    ("errors", "errors", "d"),
]


async def run(ctx: Context) -> dict[str, Any]:
    p = params(ctx.quick)
    with contextlib.ExitStack() as stack:
        extra = ["--checkpoints", ",".join(CHECKPOINTS), "--switch-s", str(p["switch_s"])]
        sim = start_sim(
            stack, pods=p["pods"], step_ms=p["step_ms"], workdir=ctx.work_dir, extra=extra
        )

        async def one(target: Target) -> dict[str, Any]:
            return await measure(target, p=p, pods=sim.urls, seed=ctx.seed)

        systems = await for_each_system(
            SYSTEMS,
            backends=sim.urls,
            work_dir=ctx.work_dir,
            measure=one,
            start=lambda stack, name: start(stack, name, pods=sim.urls, work_dir=ctx.work_dir),
        )
    sd, ha = systems.get("sdproxy", {}), systems.get("haproxy", {})
    ratio = None
    if sd.get("goodput_ips") is not None and ha.get("goodput_ips"):
        ratio = sd["goodput_ips"] / ha["goodput_ips"]
    targets = {
        "goodput_vs_haproxy": report.target(
            ratio, text=">= 1.5x HAProxy leastconn's goodput", ok=lambda v: v >= 1.5
        ),
    }
    series = {name: row.pop("series", {}) for name, row in systems.items()}
    result: dict[str, Any] = {
        "scenario": "checkpoints",
        "description": (
            f"{p['pods']} pods, checkpoints c0-c3 of Zipf popularity (sticky: no restore), "
            f"switch {p['switch_s']:g} s, generation {p['service_s']:g} s "
            f"(N/S {p['capacity_rps']:.1f} img/s), Poisson arrivals at "
            f"{p['offered_rps']:.1f}/s for {p['arrivals_s']:.0f} s; goodput counted from "
            f"{p['window_start_s']:.1f} s to {p['arrivals_s']:.0f} s."
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

    def pick(key: str) -> dict[str, Sequence[report.Point]]:
        return {name: s.get(key, []) for name, s in series.items()}

    path = report.plot_panels(
        out_dir / "checkpoints.png",
        title="checkpoints: 4 pods, 4 Zipf checkpoints, 3 s switches, 2x overload",
        panels=[
            ("answers completed", "requests", pick("completed"), "line"),
            ("latency by send time", "seconds", pick("latency"), "dots"),
        ],
    )
    bars = report.plot_bars(
        out_dir / "checkpoints_switches.png",
        title="checkpoint switches made by the pods",
        ylabel="switches",
        values={name: row.get("switches") for name, row in result["systems"].items()},
    )
    return [path.name, bars.name]
