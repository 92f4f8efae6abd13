"""Bench CLI: ``python -m bench <scenario|all> [--quick] [--out DIR]``.

Scenarios: overload, overhead, bigbody, queue, replicas, jobs, checkpoints, tenants
(bench/scenarios/) and autoscale
(bench/autoscale.py, imported only when asked for). Each writes ``<scenario>.json``,
``<scenario>.md`` and PNG plots into DIR (default ``bench/out/<timestamp>``); ``all``
also writes ``summary.md``. Exit status: 0 when every scenario produced its JSON with
every target measured (met or not), 1 otherwise, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import report, scenarios
from bench.targets import raise_fd_limit, versions

ALL = (*scenarios.SCENARIOS, "autoscale")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Side-by-side load tests of sdproxy, HAProxy and round-robin (nginx).",
    )
    parser.add_argument("scenario", choices=(*ALL, "all"), help="what to run")
    parser.add_argument("--quick", action="store_true", help="small and short (CI smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="output dir (bench/out/<time>)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for arrivals")
    return parser


def run_one(
    name: str, *, quick: bool, out_dir: Path, seed: int, command: str = ""
) -> dict[str, Any]:
    """Run one scenario to its result dict (written to ``out_dir`` by the caller)."""
    started = time.time()
    t = time.perf_counter()
    if name == "autoscale":
        result = _run_autoscale(quick=quick, out_dir=out_dir, seed=seed)
    else:
        module = scenarios.load(name)
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            ctx = scenarios.Context(quick=quick, out_dir=out_dir, work_dir=Path(tmp), seed=seed)
            result = _run_async(module.run(ctx))
    result.setdefault("scenario", name)
    result["quick"] = quick
    result["started_unix"] = round(started, 1)
    result["duration_s"] = round(time.perf_counter() - t, 1)
    result["machine"] = report.machine_info()
    result["peers"] = versions()
    if command:
        result["command"] = command
    report.write(result, out_dir)
    return result


def _run_async(coro: Any) -> dict[str, Any]:
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            out: dict[str, Any] = runner.run(coro)
            return out
    except ImportError:  # pragma: no cover
        return dict(asyncio.run(coro))


def _run_autoscale(*, quick: bool, out_dir: Path, seed: int) -> dict[str, Any]:
    try:
        from bench import autoscale  # written separately; may not exist yet
    except ImportError as exc:
        return {
            "scenario": "autoscale",
            "error": f"bench.autoscale is not available: {exc}",
            "targets": {},
        }
    result: dict[str, Any] = dict(autoscale.run_autoscale(quick=quick, seed=seed))
    result.setdefault("scenario", "autoscale")
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = autoscale.plot_autoscale(result, out_dir)
    result["plots"] = [Path(p).name for p in plots]
    return result


def missing_targets(result: dict[str, Any]) -> list[str]:
    targets = result.get("targets") or {}
    if not targets:
        return ["(no targets)"]
    return [name for name, t in targets.items() if t.get("value") is None]


def summary_markdown(results: Sequence[dict[str, Any]], *, argv: Sequence[str]) -> str:
    machine = report.machine_info()
    peers = versions()
    lines = [
        "# Benchmark summary",
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['mem_gib']} GiB, "
        f"{machine['os']}, Python {machine['python']}",
        f"- commit: {machine['commit']}",
        f"- peers: {'; '.join(f'{k}: {v}' for k, v in peers.items())}",
        f"- command: `python -m bench {' '.join(argv)}`",
        "",
    ]
    for result in results:
        lines.append(report.scenario_markdown(result))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_fd_limit()
    out_dir: Path = args.out or Path("bench/out") / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ALL if args.scenario == "all" else (args.scenario,)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m bench", *argv_list])
    results: list[dict[str, Any]] = []
    failed = False
    try:
        for name in names:
            print(f"== {name}{' (quick)' if args.quick else ''}", file=sys.stderr, flush=True)
            result = run_one(
                name, quick=args.quick, out_dir=out_dir, seed=args.seed, command=command
            )
            results.append(result)
            _print_brief(result)
            if missing_targets(result):
                failed = True
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130
    if args.scenario == "all":
        (out_dir / "summary.md").write_text(summary_markdown(results, argv=argv_list))
    print(f"results in {out_dir}", file=sys.stderr)
    return 1 if failed else 0


def _print_brief(result: dict[str, Any]) -> None:
    for row_name, row in (result.get("systems") or {}).items():
        why = row.get("skipped") or row.get("error")
        if why:
            print(f"   {row_name}: {why}", file=sys.stderr)
    for name, t in (result.get("targets") or {}).items():
        state = "met" if t.get("met") else ("NOT MET" if t.get("value") is not None else "MISSING")
        print(f"   {name} = {t.get('value')} ({t.get('target')}): {state}", file=sys.stderr)
    if result.get("error"):
        print(f"   error: {result['error']}", file=sys.stderr)
    print(json.dumps({"scenario": result.get("scenario")}), file=sys.stdout, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
