"""Runtime: the Discovery injection point and the static source.

A discovery source pushes FULL snapshots of the pods it knows to a sink whenever they
change; the composition root reconciles each snapshot into the admission core. Sources:
``StaticDiscovery`` (the --backend list), ``KubernetesDiscovery`` (EndpointSlice watch,
sdproxy.runtime.kube), and the local scaler (simulated pods it started itself).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from sdproxy.core.pods import Endpoint, PodId
from sdproxy.options import split_weight

Sink = Callable[[Sequence[Endpoint]], None]


@dataclass(frozen=True, kw_only=True)
class DiscoveryHealth:
    """Whether the source is in touch with its truth (for /-/status and metrics)."""

    connected: bool
    #: last error seen talking to the source, if any
    last_error: str | None = None


class Discovery(Protocol):
    """A source of pod snapshots."""

    name: str

    async def run(self, sink: Sink) -> None:
        """Push a snapshot at start and after every change; return only when cancelled."""
        ...

    def health(self) -> DiscoveryHealth:
        """Current connection state."""
        ...


def pod_id_for_url(url: str) -> PodId:
    """A stable pod id for a static backend URL: its host:port."""
    parts = urlsplit(url)
    return PodId(parts.netloc or url)


class FanOut:
    """One discovery source shared by several replicas in one process (``sdproxy demo
    --replicas N``): the source runs once, every replica's sink gets each snapshot."""

    def __init__(self, source: Discovery) -> None:
        self.source = source
        self.name = source.name
        self._sinks: list[Sink] = []
        self._last: list[Endpoint] | None = None
        self._task: asyncio.Task[None] | None = None

    def _fan(self, endpoints: Sequence[Endpoint]) -> None:
        self._last = list(endpoints)
        for sink in list(self._sinks):
            sink(self._last)

    async def run(self, sink: Sink) -> None:
        self._sinks.append(sink)
        if self._last is not None:
            sink(self._last)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.source.run(self._fan))
        try:
            await asyncio.Event().wait()
        finally:
            self._sinks.remove(sink)
            if not self._sinks and self._task is not None:
                self._task.cancel()
                self._task = None

    def health(self) -> DiscoveryHealth:
        return self.source.health()


class StaticDiscovery:
    """The --backend list: every backend is ready from the start (health is learned);
    a URL's ``#weight=N`` is its pod's relative GPU speed."""

    name = "static"

    def __init__(self, urls: Sequence[str]) -> None:
        self._endpoints = []
        for text in urls:
            url, weight = split_weight(text)
            self._endpoints.append(Endpoint(pod_id=pod_id_for_url(url), url=url, weight=weight))

    async def run(self, sink: Sink) -> None:
        sink(list(self._endpoints))
        await asyncio.Event().wait()  # nothing ever changes; wait to be cancelled

    def health(self) -> DiscoveryHealth:
        return DiscoveryHealth(connected=True)
