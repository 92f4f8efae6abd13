"""Scenario 2, ``overhead``: small light requests (``GET /sdapi/v1/sd-models``).

One simulated pod behind every system, so ``direct`` (the client talks to the pod) is an
exact baseline. Two phases per system:

- throughput: a closed loop at a fixed concurrency for a fixed time. ``wrk`` (C, one
  thread) is used when installed, because a Python client saturates before HAProxy does
  and would flatter a slow proxy; otherwise the aiohttp closed loop. The generator used
  is recorded in the JSON.
- added latency: one connection, requests back to back (no queueing anywhere), p50/p99;
  added = the system's p50 minus direct's p50.

- heavy latency: the same on one connection with the smallest generation (txt2img, 1
  step, 64x64: ~0.2 ms of simulated sampling), so the heavy path's own cost shows
  (admission, a pod slot; with a gate also its claim and ``Expect: 100-continue``).

``gated`` is sdproxy in front of ``sdproxy gate`` in front of the pod (client -> sdproxy
-> gate -> pod, the replicas set-up): its added p50 against direct and against plain
sdproxy is the cost of the gate's hop.

All of it shares 2 cores with the pod (Python) and the client, so requests/s are bounded
by the pod as much as by the proxy; the ratio to HAProxy is what the target reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench import report
from bench.loadgen import Progress, RequestSpec, closed_loop, new_session
from bench.scenarios import Context, for_each_system
from bench.targets import Target, start_sim

SYSTEMS = ("direct", "haproxy", "nginx", "sdproxy", "gated")
PATH = "/sdapi/v1/sd-models"


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "concurrency": 16,
            "duration_s": 2.0,
            "sequential": 300,
            "warmup": 50,
            "heavy_sequential": 100,
        }
    return {
        "concurrency": 32,
        "duration_s": 10.0,
        "sequential": 3000,
        "warmup": 200,
        "heavy_sequential": 1000,
    }


HEAVY = RequestSpec(
    method="POST",
    path="/sdapi/v1/txt2img",
    body=json.dumps({"prompt": "bench overhead", "steps": 1, "width": 64, "height": 64}).encode(),
    headers={"Content-Type": "application/json"},
)


def _wrk(url: str, *, concurrency: int, duration_s: float) -> dict[str, Any] | None:
    binary = shutil.which("wrk")
    if binary is None:
        return None
    argv = [binary, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", "--latency"]
    res = subprocess.run(
        [*argv, url], capture_output=True, text=True, timeout=duration_s + 30, check=False
    )
    rps = re.search(r"Requests/sec:\s+([\d.]+)", res.stdout)
    if res.returncode != 0 or rps is None:
        return {"error": (res.stdout + res.stderr).strip()[-300:]}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", res.stdout)
    sock_err = re.search(r"Socket errors:.*", res.stdout)
    return {
        "rps": float(rps.group(1)),
        "errors": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sock_err.group(0) if sock_err else "",
    }


async def measure(target: Target, *, p: dict[str, Any]) -> dict[str, Any]:
    spec = RequestSpec(method="GET", path=PATH)
    row: dict[str, Any] = {}
    async with new_session(timeout_s=30, limit=1) as one:
        # warm-up, then latency with one connection, requests back to back
        await closed_loop(
            one, target.url, spec=spec, concurrency=1, duration_s=30, max_requests=p["warmup"]
        )
        progress = Progress(f"overhead {target.name} latency", total=p["sequential"])
        seq = await closed_loop(
            one,
            target.url,
            spec=spec,
            concurrency=1,
            duration_s=60,
            max_requests=p["sequential"],
            progress=progress,
        )
        progress.close()
        await closed_loop(
            one, target.url, spec=HEAVY, concurrency=1, duration_s=30, max_requests=10
        )
        progress = Progress(f"overhead {target.name} heavy", total=p["heavy_sequential"])
        heavy = await closed_loop(
            one,
            target.url,
            spec=HEAVY,
            concurrency=1,
            duration_s=60,
            max_requests=p["heavy_sequential"],
            progress=progress,
        )
        progress.close()
    lat = report.latency_ms(seq.samples)
    row.update(
        {f"seq_{k}": v for k, v in lat.items()},
        seq_errors=sum(not s.ok for s in seq.samples),
    )
    heavy_lat = report.latency_ms(heavy.samples)
    row.update(
        heavy_p50_ms=heavy_lat["p50_ms"],
        heavy_p99_ms=heavy_lat["p99_ms"],
        heavy_errors=sum(not s.ok for s in heavy.samples),
    )
    wrk = await asyncio.to_thread(
        _wrk, target.url + PATH, concurrency=p["concurrency"], duration_s=p["duration_s"]
    )
    if wrk is not None and "rps" in wrk:
        row.update(generator="wrk", rps=wrk["rps"], errors=wrk["errors"])
        return row
    async with new_session(timeout_s=30) as session:
        progress = Progress(f"overhead {target.name} rps")
        res = await closed_loop(
            session,
            target.url,
            spec=spec,
            concurrency=p["concurrency"],
            duration_s=p["duration_s"],
            progress=progress,
        )
        progress.close()
    ok = sum(s.ok for s in res.samples)
    row.update(
        generator="aiohttp" + (f" (wrk failed: {wrk['error']})" if wrk else ""),
        rps=round(ok / res.elapsed_s, 1),
        errors=sum(not s.ok for s in res.samples),
    )
    return row


COLUMNS: list[report.Column] = [
    ("rps", "requests/s", ".0f"),
    ("rps_vs_haproxy", "vs HAProxy", ".0%"),
    ("seq_p50_ms", "p50 ms (1 conn)", ".3f"),
    ("seq_p99_ms", "p99 ms (1 conn)", ".3f"),
    ("added_p50_ms", "added p50 ms", ".3f"),
    ("added_vs_sdproxy_p50_ms", "added p50 ms vs sdproxy", ".3f"),
    ("heavy_p50_ms", "txt2img 64² p50 ms", ".3f"),
    ("heavy_added_p50_ms", "txt2img added p50 ms", ".3f"),
    ("errors", "errors", "d"),
]


async def run(ctx: Context) -> dict[str, Any]:
    p = params(ctx.quick)
    with contextlib.ExitStack() as stack:
        sim = start_sim(stack, pods=1, step_ms=10.0, workdir=ctx.work_dir)

        async def one(target: Target) -> dict[str, Any]:
            return await measure(target, p=p)

        systems = await for_each_system(
            SYSTEMS, backends=sim.urls, work_dir=ctx.work_dir, measure=one
        )
    base = systems.get("direct", {}).get("seq_p50_ms")
    heavy_base = systems.get("direct", {}).get("heavy_p50_ms")
    ha = systems.get("haproxy", {}).get("rps")
    for row in systems.values():
        if row.get("seq_p50_ms") is not None and base is not None:
            row["added_p50_ms"] = round(row["seq_p50_ms"] - base, 3)
        if row.get("heavy_p50_ms") is not None and heavy_base is not None:
            row["heavy_added_p50_ms"] = round(row["heavy_p50_ms"] - heavy_base, 3)
        if row.get("rps") is not None and ha:
            row["rps_vs_haproxy"] = round(row["rps"] / ha, 3)
    sd = systems.get("sdproxy", {})
    gated = systems.get("gated", {})
    if gated.get("seq_p50_ms") is not None and sd.get("seq_p50_ms") is not None:
        gated["added_vs_sdproxy_p50_ms"] = round(gated["seq_p50_ms"] - sd["seq_p50_ms"], 3)
    if gated.get("heavy_p50_ms") is not None and sd.get("heavy_p50_ms") is not None:
        gated["heavy_added_vs_sdproxy_p50_ms"] = round(
            gated["heavy_p50_ms"] - sd["heavy_p50_ms"], 3
        )
    targets = {
        "rps_vs_haproxy": report.target(
            sd.get("rps_vs_haproxy"), text=">= 0.40 of HAProxy's requests/s", ok=lambda v: v >= 0.40
        ),
        "added_p50_ms": report.target(
            sd.get("added_p50_ms"), text="<= 1 ms over direct", ok=lambda v: v <= 1.0
        ),
    }
    generator = next((r.get("generator") for r in systems.values() if r.get("generator")), "?")
    result: dict[str, Any] = {
        "scenario": "overhead",
        "description": (
            f"GET {PATH} to 1 pod; requests/s at concurrency {p['concurrency']} for "
            f"{p['duration_s']:.0f} s ({generator}); latency over {p['sequential']} "
            "back-to-back requests on one connection, and over "
            f"{p['heavy_sequential']} back-to-back txt2img (1 step, 64x64)."
        ),
        "params": p,
        "systems": systems,
        "targets": targets,
        "table_md": report.markdown_table(systems, COLUMNS),
        "notes": [
            "gated: client -> sdproxy -> sdproxy gate -> pod (the replicas set-up). GET "
            "sd-models (light, passed straight through by the gate): "
            f"{_ms(gated.get('added_vs_sdproxy_p50_ms'))} p50 over plain sdproxy, "
            f"{_ms(gated.get('added_p50_ms'))} over direct. txt2img 64x64, 1 step (heavy: "
            "the gate's claim and Expect: 100-continue): "
            f"{_ms(gated.get('heavy_added_vs_sdproxy_p50_ms'))} p50 over plain sdproxy, "
            f"{_ms(gated.get('heavy_added_p50_ms'))} over direct.",
        ],
    }
    result["plots"] = plots(result, ctx.out_dir)
    return result


def _ms(value: float | None) -> str:
    return "? (not measured)" if value is None else f"{value:+.3f} ms"


def plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    rps = {name: row.get("rps") for name, row in result["systems"].items()}
    path = report.plot_bars(
        out_dir / "overhead.png",
        title="overhead: GET sd-models, requests/s",
        ylabel="requests/s",
        values=rps,
    )
    return [path.name]
