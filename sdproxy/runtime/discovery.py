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


class StaticDiscovery:
    """The --backend list: every backend is ready from the start (health is learned)."""

    name = "static"

    def __init__(self, urls: Sequence[str]) -> None:
        self._endpoints = [Endpoint(pod_id=pod_id_for_url(u), url=u) for u in urls]

    async def run(self, sink: Sink) -> None:
        sink(list(self._endpoints))
        await asyncio.Event().wait()  # nothing ever changes; wait to be cancelled

    def health(self) -> DiscoveryHealth:
        return DiscoveryHealth(connected=True)
