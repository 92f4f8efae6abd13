"""Scenario 2, ``overhead``: small light requests (``GET /sdapi/v1/sd-models``).

One simulated pod behind every system, so ``direct`` (the client talks to the pod) is an
exact baseline. Two phases per system:

- throughput: a closed loop at a fixed concurrency for a fixed time. ``wrk`` (C, one
  thread) is used when installed, because a Python client saturates before HAProxy does
  and would flatter a slow proxy; otherwise the aiohttp closed loop. The generator used
  is recorded in the JSON.
- added latency: one connection, requests back to back (no queueing anywhere), p50/p99;
  added = the system's p50 minus direct's p50.

All of it shares 2 cores with the pod (Python) and the client, so requests/s are bounded
by the pod as much as by the proxy; the ratio to HAProxy is what the target reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench import report
from bench.loadgen import Progress, RequestSpec, closed_loop, new_session
from bench.scenarios import Context, for_each_system
from bench.targets import Target, start_sim

SYSTEMS = ("direct", "haproxy", "nginx", "sdproxy")
PATH = "/sdapi/v1/sd-models"


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"concurrency": 16, "duration_s": 2.0, "sequential": 300, "warmup": 50}
    return {"concurrency": 32, "duration_s": 10.0, "sequential": 3000, "warmup": 200}


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
    lat = report.latency_ms(seq.samples)
    row.update(
        {f"seq_{k}": v for k, v in lat.items()},
        seq_errors=sum(not s.ok for s in seq.samples),
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
    ha = systems.get("haproxy", {}).get("rps")
    for row in systems.values():
        if row.get("seq_p50_ms") is not None and base is not None:
            row["added_p50_ms"] = round(row["seq_p50_ms"] - base, 3)
        if row.get("rps") is not None and ha:
            row["rps_vs_haproxy"] = round(row["rps"] / ha, 3)
    sd = systems.get("sdproxy", {})
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
            "back-to-back requests on one connection."
        ),
        "params": p,
        "systems": systems,
        "targets": targets,
        "table_md": report.markdown_table(systems, COLUMNS),
    }
    result["plots"] = plots(result, ctx.out_dir)
    return result


def plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    rps = {name: row.get("rps") for name, row in result["systems"].items()}
    path = report.plot_bars(
        out_dir / "overhead.png",
        title="overhead: GET sd-models, requests/s",
        ylabel="requests/s",
        values=rps,
    )
    return [path.name]
