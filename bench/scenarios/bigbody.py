"""Scenario 3, ``bigbody``: img2img with 10 MiB request bodies and ~10 MiB answers.

Each request carries one ``init_images`` entry of the chosen size: a valid PNG header for
2048x2048 (the simulator reads only the IHDR) followed by incompressible base64. The
answer is a 2048x2048 image, about 9.6 MB of base64. Sampling is made short (1 step, 1
ms per 512² step) so the run measures moving bytes, not waiting for the GPU.

A closed loop of ``clients`` (twice the pods, so some requests wait in the system's
queue with their body still unread) runs for a fixed time; MB/s counts bytes sent plus
bytes received. The proxy's RSS (with its children: nginx workers) is sampled every
20 ms from a thread; growth = peak minus the value just before the load. A proxy that
buffers bodies grows by about clients x body size; one that streams does not.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import struct
import time
import zlib
from pathlib import Path
from typing import Any

from bench import report
from bench.loadgen import Progress, RequestSpec, closed_loop, new_session
from bench.sampler import RssSampler
from bench.scenarios import Context, for_each_system
from bench.targets import Target, start_sim

SYSTEMS = ("round-robin", "haproxy", "sdproxy")
MIB = 1024 * 1024
SIZE = 2048


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"pods": 4, "clients": 8, "duration_s": 3.0, "body_mib": [10]}
    return {"pods": 4, "clients": 8, "duration_s": 10.0, "body_mib": [10, 40]}


def png_head_b64(width: int, height: int) -> str:
    """Base64 of a PNG signature + IHDR (33 bytes, so it ends on a base64 boundary)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk).decode()


def body(size_bytes: int, *, seed: int = 1) -> bytes:
    """A JSON img2img body of about ``size_bytes``."""
    head = png_head_b64(SIZE, SIZE)
    filler_len = max(0, size_bytes - len(head) - 200) // 4 * 3
    filler = base64.b64encode(random.Random(seed).randbytes(filler_len)).decode()
    doc = {
        "prompt": "bench bigbody",
        "init_images": [head + filler],
        "steps": 2,
        "denoising_strength": 0.5,
        "width": SIZE,
        "height": SIZE,
        "sampler_name": "Euler a",
    }
    return json.dumps(doc).encode()


async def measure(target: Target, *, p: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"by_size": {}}
    for mib in p["body_mib"]:
        spec = RequestSpec(
            method="POST",
            path="/sdapi/v1/img2img",
            body=body(mib * MIB),
            headers={"Content-Type": "application/json"},
        )
        async with new_session(timeout_s=120) as session:
            # one request first: connections, the pod's cached image, the proxy's pools
            await closed_loop(
                session, target.url, spec=spec, concurrency=1, duration_s=60, max_requests=1
            )
            t0 = time.perf_counter()
            with RssSampler(target.proc, interval_s=0.02, t0=t0) as rss:
                await asyncio.sleep(0.1)
                progress = Progress(f"bigbody {target.name} {mib} MiB")
                res = await closed_loop(
                    session,
                    target.url,
                    spec=spec,
                    concurrency=p["clients"],
                    duration_s=p["duration_s"],
                    progress=progress,
                )
                progress.close()
        ok = [s for s in res.samples if s.ok]
        moved = sum(s.bytes_in + s.bytes_out for s in ok)
        one = {
            "requests": len(res.samples),
            "errors": sum(not s.ok for s in res.samples),
            "mb_per_s": round(moved / res.elapsed_s / 1e6, 1),
            "response_mb": round(sum(s.bytes_in for s in ok) / len(ok) / 1e6, 2) if ok else None,
            **report.latency_ms(res.samples),
            "rss_before_mib": _r(rss.first_mib),
            "rss_peak_mib": _r(rss.peak_mib),
            "rss_growth_mib": _r((rss.peak_mib or 0) - (rss.first_mib or 0))
            if rss.series
            else None,
            "rss_series": report.downsample(rss.series, 600),
        }
        row["by_size"][str(mib)] = one
    first = row["by_size"][str(p["body_mib"][0])]
    growths = [
        v["rss_growth_mib"] for v in row["by_size"].values() if v["rss_growth_mib"] is not None
    ]
    row.update(
        mb_per_s=first["mb_per_s"],
        p50_ms=first["p50_ms"],
        p99_ms=first["p99_ms"],
        errors=sum(v["errors"] for v in row["by_size"].values()),
        rss_growth_mib=max(growths) if growths else None,
        rss_peak_mib=max((v["rss_peak_mib"] or 0 for v in row["by_size"].values()), default=None),
    )
    for mib, v in row["by_size"].items():
        row[f"mb_per_s_{mib}"] = v["mb_per_s"]
        row[f"rss_growth_{mib}"] = v["rss_growth_mib"]
    return row


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def run(ctx: Context) -> dict[str, Any]:
    p = params(ctx.quick)
    with contextlib.ExitStack() as stack:
        sim = start_sim(stack, pods=p["pods"], step_ms=1.0, workdir=ctx.work_dir)

        async def one(target: Target) -> dict[str, Any]:
            return await measure(target, p=p)

        systems = await for_each_system(
            SYSTEMS, backends=sim.urls, work_dir=ctx.work_dir, measure=one
        )
    ha = systems.get("haproxy", {}).get("mb_per_s")
    for row in systems.values():
        if row.get("mb_per_s") is not None and ha:
            row["mb_vs_haproxy"] = round(row["mb_per_s"] / ha, 3)
    sd = systems.get("sdproxy", {})
    first = p["body_mib"][0]
    targets = {
        "mb_per_s_vs_haproxy": report.target(
            sd.get("mb_vs_haproxy"),
            text=f">= 0.85 of HAProxy's MB/s ({first} MiB bodies)",
            ok=lambda v: v >= 0.85,
        ),
        "rss_growth_mib": report.target(
            sd.get("rss_growth_mib"),
            text="<= 64 MiB at every body size ("
            + ", ".join(f"{m} MiB" for m in p["body_mib"])
            + ")",
            ok=lambda v: v <= 64,
        ),
    }
    columns: list[report.Column] = []
    for mib in p["body_mib"]:
        columns.append((f"mb_per_s_{mib}", f"MB/s {mib} MiB", ".0f"))
    columns.append(("mb_vs_haproxy", "vs HAProxy", ".0%"))
    columns += [("p50_ms", "p50 ms", ".0f"), ("p99_ms", "p99 ms", ".0f")]
    for mib in p["body_mib"]:
        columns.append((f"rss_growth_{mib}", f"RSS growth MiB ({mib} MiB)", ".1f"))
    columns += [("rss_peak_mib", "RSS peak MiB", ".1f"), ("errors", "errors", "d")]
    result: dict[str, Any] = {
        "scenario": "bigbody",
        "description": (
            f"img2img, {' and '.join(f'{m} MiB' for m in p['body_mib'])} bodies, "
            f"{SIZE}x{SIZE} answers (~9.6 MB), {p['clients']} clients in a closed loop "
            f"for {p['duration_s']:.0f} s per size, {p['pods']} pods at limit 1."
        ),
        "params": p,
        "systems": systems,
        "targets": targets,
        "table_md": report.markdown_table(systems, columns),
    }
    result["plots"] = plots(result, ctx.out_dir)
    return result


def plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    panels = []
    for mib in result["params"]["body_mib"]:
        series = {
            name: [
                tuple(pt) for pt in row.get("by_size", {}).get(str(mib), {}).get("rss_series", [])
            ]
            for name, row in result["systems"].items()
        }
        panels.append((f"proxy RSS, {mib} MiB bodies", "MiB", series, "line"))
    path = report.plot_panels(out_dir / "bigbody.png", title="bigbody: proxy memory", panels=panels)
    return [path.name]
