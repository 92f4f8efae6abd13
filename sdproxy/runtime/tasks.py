"""Runtime: background tasks kept with a strong reference (asyncio keeps only a weak one:
an unreferenced task may vanish mid-run), and one task per known pod.

``Background``: fire-and-forget work that must still finish before shutdown (draining an
abandoned generation). ``PodTasks``: a task per pod, started when discovery first lists it
and cancelled when it is gone (gate watchers, health checkers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from sdproxy.core.pods import PodId


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self) -> None:
        """Cancel every task and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        await self.wait()


class PodTasks:
    """One background task per known pod, started on ``follow`` and cancelled on
    ``forget`` or ``close`` (gate watchers, health checkers)."""

    def __init__(self, run: Callable[[PodId, str], Coroutine[Any, Any, None]], *, kind: str):
        self._run = run
        self._kind = kind
        self._tasks: dict[PodId, asyncio.Task[None]] = {}

    def follow(self, pod_id: PodId, url: str) -> None:
        if pod_id not in self._tasks:
            self._tasks[pod_id] = asyncio.get_running_loop().create_task(
                self._run(pod_id, url), name=f"{self._kind}-{pod_id}"
            )

    def forget(self, pod_id: PodId) -> None:
        task = self._tasks.pop(pod_id, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
