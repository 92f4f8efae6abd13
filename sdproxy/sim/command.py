"""Sim: the ``sdproxy sim`` sub-command — flags, start-up lines, signal handling.

Prints one line per pod to stdout, flushed, once all listen:
``sim pod N listening on http://HOST:PORT`` (N counts from 0); tests and the demo parse
it. Runs until SIGINT or SIGTERM, then stops the listeners and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from sdproxy.errors import ConfigError
from sdproxy.sim.config import SimConfig
from sdproxy.sim.server import run_pods

DEFAULTS = SimConfig()


def _checkpoints(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


#: (flag, argparse keyword arguments); defaults come from SimConfig where it has them
FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--pods", {"type": int, "default": 1, "help": "independent pods on consecutive ports"}),
    ("--host", {"default": "127.0.0.1", "help": "listen address"}),
    ("--port", {"type": int, "default": 7860, "help": "first pod's port; 0 = ephemeral"}),
    ("--step-ms", {"type": float, "default": DEFAULTS.step_ms,
                   "help": "ms per 512x512 sampling step (100 ~ A10)"}),
    ("--threads", {"type": int, "default": DEFAULTS.threads,
                   "help": "worker threads per pod; every route stalls when all are busy"}),
    ("--checkpoints", {"type": _checkpoints, "default": ",".join(DEFAULTS.checkpoints),
                       "help": "comma-separated checkpoint files; the first is the default"}),
    ("--switch-s", {"type": float, "default": DEFAULTS.switch_s,
                    "help": "seconds to load another checkpoint"}),
    ("--startup-s", {"type": float, "default": DEFAULTS.startup_s,
                     "help": "seconds until the model is loaded; heavy requests wait"}),
    ("--vram-pixels", {"type": int, "default": DEFAULTS.vram_pixels,
                       "help": "CUDA out of memory above batch_size*width*height pixels"}),
    ("--fail-rate", {"type": float, "default": DEFAULTS.fail_rate,
                     "help": "probability of a random 500 per generation"}),
    ("--seed", {"type": int, "default": None,
                "help": "seed for failures, lock order and seeds; none: from the OS"}),
    ("--ui", {"action": "store_true",
              "help": "serve sd-webui's browser UI too (a real Gradio 3.41 app; "
                      "needs the ui extra: pip install 'sdproxy[ui]')"}),
)  # fmt: skip


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "sim",
        help="run simulated sd-webui pods",
        description="Run simulated sd-webui pods (sd-webui's API, one GPU lock per pod, "
        "cost-based service times) for tests, the demo and benchmarks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for flag, kwargs in FLAGS:
        parser.add_argument(flag, **kwargs)
    parser.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    try:
        return SimConfig(
            step_ms=args.step_ms,
            threads=args.threads,
            checkpoints=tuple(args.checkpoints),
            switch_s=args.switch_s,
            startup_s=args.startup_s,
            vram_pixels=args.vram_pixels,
            fail_rate=args.fail_rate,
            seed=args.seed,
            ui=args.ui,
        )
    except ValueError as exc:
        raise ConfigError(f"sim: {exc}") from exc


async def run(args: argparse.Namespace) -> int:
    """Serve ``--pods`` pods until SIGINT/SIGTERM."""
    config = config_from_args(args)
    if args.pods < 1 or not 0 <= args.port <= 65535 - args.pods + 1:
        raise ConfigError("sim: --pods must be >= 1 and the ports must fit below 65536")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with run_pods(config, count=args.pods, host=args.host, port=args.port) as urls:
            for index, url in enumerate(urls):
                print(f"sim pod {index} listening on {url}", flush=True)
            await stop.wait()
    except OSError as exc:
        raise ConfigError(f"sim: cannot listen: {exc}") from exc
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
