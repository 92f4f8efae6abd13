"""Runtime: ``sdproxy demo`` — simulated pods, the proxy and the local autoscaler on loopback.

Starts from zero pods (by default): the first request waits in the proxy's queue while the
local scaler starts a simulated pod, which takes traffic once its warm-up generation
succeeds. Runs until Ctrl-C and stops every pod it started.

``--replicas N`` shows the HA mode: N proxy replicas (on consecutive ports, each the
others' ``--peer``) share the simulated pods, each pod behind its own ``sdproxy gate``;
the first replica runs the local scaler, all follow the same pods.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from typing import Any

from sdproxy import settings as settings_mod
from sdproxy.errors import ConfigError
from sdproxy.options import HostPort
from sdproxy.runtime.app import serve, stop_on_signals
from sdproxy.runtime.discovery import FanOut
from sdproxy.runtime.local import LocalPods
from sdproxy.runtime.scaling import NoScaler

CURL = (
    "curl -s -X POST {url}/sdapi/v1/txt2img -H 'Content-Type: application/json' "
    '-d \'{{"prompt": "a lighthouse at dawn", "steps": 20}}\' | head -c 200; echo'
)


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="run simulated pods + proxy + autoscaler on loopback",
        description="One command: simulated sd-webui pods, the proxy and the local "
        "autoscaler (from zero pods), until Ctrl-C.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--listen", default="127.0.0.1:8000", help="proxy HOST:PORT")
    parser.add_argument("--metrics-listen", default="127.0.0.1:9100", help="metrics HOST:PORT")
    parser.add_argument("--max-pods", type=int, default=4, help="most simulated pods")
    parser.add_argument("--min-pods", type=int, default=0, help="fewest pods (0 = to zero)")
    parser.add_argument("--idle-to-zero-s", type=float, default=60.0, help="idle before 0")
    parser.add_argument("--scale-down-delay-s", type=float, default=20.0, help="scale-in window")
    parser.add_argument("--startup-s", type=float, default=5.0, help="pod model-load time")
    parser.add_argument("--step-ms", type=float, default=50.0, help="pod ms per 512² step")
    parser.add_argument("--base-port", type=int, default=7860, help="first pod port")
    parser.add_argument("--log-format", choices=("text", "json"), default="text", help="logs")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="proxy replicas sharing the pods (more than 1: a gate in front of each pod)",
    )
    parser.set_defaults(handler=run)


def demo_settings(args: argparse.Namespace) -> settings_mod.Settings:
    """``sdproxy serve`` settings with the demo's flags given (not the environment): they
    are parsed and checked like serve's, so a bad ``--listen`` is named as such."""
    given = argparse.Namespace(
        listen=args.listen,
        metrics_listen=args.metrics_listen,
        scaler="local",
        warmup=True,
        warmup_timeout_s=args.startup_s + 60,
        max_pods=args.max_pods,
        min_pods=args.min_pods,
        idle_to_zero_s=args.idle_to_zero_s,
        scale_down_delay_s=args.scale_down_delay_s,
        local_startup_s=args.startup_s,
        local_step_ms=args.step_ms,
        local_base_port=args.base_port,
        log_format=args.log_format,
        queue_timeout_s=max(120.0, args.startup_s * 4),
        local_gates=args.replicas > 1,
    )
    if args.replicas < 1:
        raise ConfigError(f"--replicas: must be >= 1, got {args.replicas}")
    return settings_mod.load(given, env={})


def replica_settings(first: settings_mod.Settings, count: int) -> list[settings_mod.Settings]:
    """The first replica's settings, then one per further replica on the next ports, each
    naming all the others as peers."""
    listen, metrics = first.proxy.listen, first.proxy.metrics_listen

    def shifted(where: HostPort, by: int) -> HostPort:
        return HostPort(host=where.host, port=where.port + by)

    urls = [f"http://{shifted(listen, i)}" for i in range(count)]
    out = []
    for i in range(count):
        proxy = dataclasses.replace(
            first.proxy,
            listen=shifted(listen, i),
            metrics_listen=None if metrics is None else shifted(metrics, i),
            peer=tuple(u for j, u in enumerate(urls) if j != i) if count > 1 else (),
        )
        scaler = dataclasses.replace(first.scaler, identity=f"{first.scaler.identity}-{i}")
        out.append(dataclasses.replace(first, proxy=proxy, scaler=scaler))
    return out


def banner(settings: settings_mod.Settings, replicas: int = 1) -> str:
    url = f"http://{settings.proxy.listen}"
    metrics = settings.proxy.metrics_listen
    where = settings.proxy.listen
    more = [
        f"  replica: http://{HostPort(host=where.host, port=where.port + i)}"
        for i in range(1, replicas)
    ]
    lines = [
        "",
        "sdproxy demo is running (Ctrl-C to stop)",
        f"  proxy:   {url}",
        *more,
        "  pods:    each behind an sdproxy gate; /-/status shows them 'gated'"
        if replicas > 1
        else "",
        f"  status:  {url}/-/status   (open it in a browser)",
        f"  metrics: http://{metrics}/metrics" if metrics else "",
        f"  pods:    0 now, up to {settings.scaler.autoscale.max_pods}; each needs "
        f"{settings.scaler.local_startup_s:g}s to load its model",
        "  try:",
        "    " + CURL.format(url=url),
        "",
    ]
    return "\n".join(line for line in lines if line or line == "")


async def run(args: argparse.Namespace) -> int:
    settings = demo_settings(args)
    if args.replicas == 1:
        return await _run_one(settings)
    return await _run_replicas(replica_settings(settings, args.replicas))


async def _run_one(settings: settings_mod.Settings) -> int:
    ready = asyncio.Event()
    server = asyncio.create_task(serve(settings, ready=ready))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({server, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if ready.is_set():
        print(banner(settings), flush=True)
    else:
        waiter.cancel()
    return await server


async def _run_replicas(all_settings: list[settings_mod.Settings]) -> int:
    """Several replicas in this process: one local scaler (the first replica's), one
    discovery fanned out to all, one Ctrl-C for all."""
    pods = LocalPods(all_settings[0].scaler)
    shared = FanOut(pods)
    stop = stop_on_signals()
    readies = [asyncio.Event() for _ in all_settings]
    servers = [
        asyncio.create_task(
            serve(s, ready=r, stop=stop, discovery=shared, scaler=pods if i == 0 else NoScaler())
        )
        for i, (s, r) in enumerate(zip(all_settings, readies, strict=True))
    ]

    async def all_ready() -> None:
        for ready in readies:
            await ready.wait()

    waiter = asyncio.create_task(all_ready())
    await asyncio.wait({waiter, *servers}, return_when=asyncio.FIRST_COMPLETED)
    if waiter.done():
        print(banner(all_settings[0], len(all_settings)), flush=True)
    else:
        waiter.cancel()
        stop.set()
    codes = await asyncio.gather(*servers, return_exceptions=True)
    for code in codes:
        if isinstance(code, BaseException):
            raise code
    return max(int(c) for c in codes if not isinstance(c, BaseException))
