"""The one entry point: ``sdproxy <command>``. The only place uvloop is installed.

Commands:
  serve  the proxy (sdproxy.runtime.app)
  gate   the sidecar in front of one sd-webui pod (sdproxy.runtime.podgate)
  sim    simulated sd-webui pods (sdproxy.sim.command)
  demo   simulated pods + proxy + local autoscaler on loopback (sdproxy.runtime.demo)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from sdproxy import __version__, settings
from sdproxy.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdproxy",
        description="Concurrency-limiting, autoscaling reverse proxy for sd-webui pods.",
    )
    parser.add_argument("--version", action="version", version=f"sdproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy", description="Run the proxy.")
    settings.add_arguments(serve)
    serve.set_defaults(handler=_serve)

    gate = sub.add_parser(
        "gate",
        help="run the pod-side gate (a sidecar in front of one sd-webui)",
        description="Run the pod-side gate: exact per-pod limits whoever sends the work.",
    )
    settings.add_arguments(gate, settings.GateSettings)
    gate.set_defaults(handler=_gate)

    from sdproxy.sim import command as sim_command

    sim_command.register(sub)

    from sdproxy.runtime import demo

    demo.register(sub)
    return parser


def run_async(main: Coroutine[Any, Any, int]) -> int:
    """Run a command's coroutine on uvloop (the only place the loop is chosen)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def _serve(args: argparse.Namespace) -> int:
    from sdproxy.runtime.app import serve

    return await serve(settings.load(args))


async def _gate(args: argparse.Namespace) -> int:
    from sdproxy.runtime.podgate import serve_gate

    return await serve_gate(settings.load_gate(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen command; returns the exit code.

    Each sub-command registers ``handler``: an async function of the parsed arguments.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.handler
    try:
        return run_async(handler(args))
    except ConfigError as exc:
        print(f"sdproxy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
