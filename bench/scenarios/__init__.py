"""Bench scenarios: each module has ``async def run(ctx: Context) -> dict`` (see report).

``systems`` starts one system after another in front of the same simulated pods and
turns a missing binary or a failed start into a row that says so (with the install
command), so one absent peer never hides the others' numbers.
"""

from __future__ import annotations

import contextlib
import importlib
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.targets import Target, TargetUnavailable, start_system

SCENARIOS = (
    "overload",
    "overhead",
    "bigbody",
    "queue",
    "replicas",
    "jobs",
    "checkpoints",
    "tenants",
)


@dataclass(frozen=True, kw_only=True)
class Context:
    quick: bool
    out_dir: Path
    work_dir: Path
    seed: int = 1


def load(name: str) -> ModuleType:
    if name not in SCENARIOS:
        raise KeyError(name)
    return importlib.import_module(f"bench.scenarios.{name}")


Measure = Callable[[Target], Awaitable[dict[str, Any]]]
Start = Callable[[contextlib.ExitStack, str], Target]


async def for_each_system(
    names: Sequence[str],
    *,
    backends: Sequence[str],
    work_dir: Path,
    measure: Measure,
    start: Start | None = None,
) -> dict[str, dict[str, Any]]:
    """Start each system (``start``, else ``start_system``), ``measure`` it, stop it; a
    row per system, errors included."""
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        with contextlib.ExitStack() as stack:
            try:
                if start is not None:
                    target = start(stack, name)
                else:
                    target = start_system(stack, name, backends=backends, work_dir=work_dir)
            except TargetUnavailable as exc:
                rows[name] = {"skipped": str(exc).splitlines()[0], "detail": str(exc)}
                continue
            try:
                rows[name] = await measure(target)
            except Exception as exc:  # one broken system must not hide the others
                rows[name] = {
                    "error": f"{type(exc).__name__}: {exc}",
                    "detail": traceback.format_exc(limit=5),
                }
    return rows
