"""Runtime: ``sdproxy demo`` — simulated pods, the proxy and the local autoscaler on loopback.

Starts from zero pods (by default): the first request waits in the proxy's queue while the
local scaler starts a simulated pod, which takes traffic once its warm-up generation
succeeds. Runs until Ctrl-C and stops every pod it started.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from sdproxy import settings as settings_mod
from sdproxy.runtime.app import serve

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
    )
    return settings_mod.load(given, env={})


def banner(settings: settings_mod.Settings) -> str:
    url = f"http://{settings.proxy.listen}"
    metrics = settings.proxy.metrics_listen
    lines = [
        "",
        "sdproxy demo is running (Ctrl-C to stop)",
        f"  proxy:   {url}",
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
    ready = asyncio.Event()
    server = asyncio.create_task(serve(settings, ready=ready))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({server, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if ready.is_set():
        print(banner(settings), flush=True)
    else:
        waiter.cancel()
    return await server
