"""Bench: time series taken while a scenario runs.

- ``RssSampler``: a thread reading a process's RSS (psutil) every few milliseconds, so the
  peak is caught even when the event loop is busy; peak = max of the samples.
- ``StackSampler``: an asyncio task reading, every interval, the system's queue depth
  (sdproxy ``/-/status``, HAProxy's stats socket) and each simulated pod's
  ``/sim/stats`` (``heavy_inflight``), straight from the pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.targets import Proc, Target

MIB = 1024 * 1024


class RssSampler:
    """Sample ``proc``'s RSS (with its children) every ``interval_s`` in a thread."""

    def __init__(self, proc: Proc | None, *, interval_s: float = 0.02, t0: float) -> None:
        self.proc = proc
        self.interval_s = interval_s
        self.t0 = t0
        self.series: list[tuple[float, float]] = []  # (t, MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        if self.proc is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)

    def _run(self) -> None:
        assert self.proc is not None
        limit = 2_000_000
        while not self._stop.is_set() and len(self.series) < limit:
            rss = self.proc.rss_bytes()
            self.series.append((time.perf_counter() - self.t0, rss / MIB))
            self._stop.wait(self.interval_s)

    @property
    def peak_mib(self) -> float | None:
        return max((v for _, v in self.series), default=None)

    @property
    def first_mib(self) -> float | None:
        return self.series[0][1] if self.series else None


@dataclass
class StackSampler:
    """Poll queue depth and pods' heavy_inflight every ``interval_s`` until stopped."""

    target: Target
    pods: Sequence[str]
    session: aiohttp.ClientSession
    t0: float
    interval_s: float = 0.1
    rows: list[dict[str, Any]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StackSampler:
        self._task = asyncio.create_task(self._run(), name="stack-sampler")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        limit = 1_000_000
        while len(self.rows) < limit:
            started = time.perf_counter()
            depth, inflight = await asyncio.gather(
                self.target.queue_depth(self.session), self._pods_inflight()
            )
            self.rows.append(
                {
                    "t": round(started - self.t0, 3),
                    "queue_depth": depth,
                    "busy_pods": sum(1 for n in inflight if n and n > 0),
                    "pod_inflight": inflight,
                }
            )
            await asyncio.sleep(max(0.0, self.interval_s - (time.perf_counter() - started)))

    async def _pods_inflight(self) -> list[int | None]:
        async def one(url: str) -> int | None:
            try:
                async with self.session.get(url + "/sim/stats") as resp:
                    data = await resp.json()
                return int(data.get("heavy_inflight", 0))
            except (aiohttp.ClientError, TimeoutError, ValueError, TypeError):
                return None

        return list(await asyncio.gather(*(one(u) for u in self.pods)))


async def sim_stats(session: aiohttp.ClientSession, pods: Sequence[str]) -> list[dict[str, Any]]:
    """Every pod's ``/sim/stats`` (empty dict where a pod did not answer)."""

    async def one(url: str) -> dict[str, Any]:
        try:
            async with session.get(url + "/sim/stats") as resp:
                data: dict[str, Any] = await resp.json()
                return data
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return {}

    return list(await asyncio.gather(*(one(u) for u in pods)))


async def sim_reset(session: aiohttp.ClientSession, pods: Sequence[str]) -> None:
    """``POST /sim/reset`` on every pod (counters and maxima start again)."""

    async def one(url: str) -> None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.post(url + "/sim/reset") as resp:
                await resp.read()

    await asyncio.gather(*(one(u) for u in pods))
