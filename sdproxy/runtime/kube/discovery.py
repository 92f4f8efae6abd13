"""Runtime: ``--discovery kubernetes``, an EndpointSlice list+watch (a small reflector).

Lists ``discovery.k8s.io/v1`` EndpointSlices labelled ``kubernetes.io/service-name=<svc>``,
then watches from the list's resourceVersion with bookmarks (client-go's reflector loop,
https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes):

- a watch that ends normally (server timeout) resumes from the last resourceVersion seen
  (an event's or a BOOKMARK's);
- 410 Gone (resourceVersion compacted away) re-lists: at once the first time; when 410s
  follow each other within ``GONE_WINDOW_S`` (a storm: an API server compacting hard, a
  bad proxy in the way), after a growing pause (``GONE_PAUSE_S`` doubling up to
  ``GONE_PAUSE_MAX_S``), so a storm costs the API server one LIST per few seconds per
  replica, not one per round trip; the source stays connected and the pods routable;
- any other failure marks the source disconnected, backs off (exponential, jittered) and
  re-lists, which both proves the API server is back and catches up on missed changes.

The sink gets a full snapshot at the first list and after every change. Failures never
push anything: the proxy keeps routing to the last known pods and ``health()`` says
``connected=False`` with the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from sdproxy.core.pods import Endpoint
from sdproxy.errors import ConfigError, KubernetesError
from sdproxy.runtime.discovery import DiscoveryHealth, Sink
from sdproxy.runtime.kube.api import KubeApi, WatchEvent
from sdproxy.runtime.kube.slices import endpoints_from_slices
from sdproxy.settings import DiscoverySettings

log = logging.getLogger(__name__)

SERVICE_LABEL = "kubernetes.io/service-name"  # set by the EndpointSlice controller
ApiFactory = Callable[[], Awaitable[KubeApi]]


#: a re-list after consecutive 410s waits this long, doubling per 410, at most the max
GONE_PAUSE_S = 0.25
GONE_PAUSE_MAX_S = 4.0
GONE_WINDOW_S = 30.0


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): re-list."""


class KubernetesDiscovery:
    """Pods of one Service from its EndpointSlices."""

    name = "kubernetes"

    def __init__(
        self,
        settings: DiscoverySettings,
        *,
        api_factory: ApiFactory | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        watch_timeout_s: int = 300,
    ) -> None:
        self._settings = settings
        self._api_factory = api_factory or (lambda: KubeApi.connect(settings.kubeconfig))
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._watch_timeout_s = watch_timeout_s
        self._selector = f"{SERVICE_LABEL}={settings.service}"
        self._slices: dict[str, dict[str, Any]] = {}
        self._resource_version = ""
        self._pushed: list[Endpoint] | None = None
        self._health = DiscoveryHealth(connected=False, last_error=None)
        self._failures = 0
        #: 410s less than GONE_WINDOW_S apart, and when the last came: a storm
        self._gone = 0
        self._gone_at = -GONE_WINDOW_S

    def health(self) -> DiscoveryHealth:
        return self._health

    async def run(self, sink: Sink) -> None:
        """List, watch, recover; return only when cancelled."""
        api = await self._connect()
        try:
            while True:
                try:
                    await self._list(api, sink)
                    await self._watch_until_error(api, sink)
                except _Gone:
                    await self._expired()
                except KubernetesError as exc:
                    await self._failed(str(exc))
                except Exception as exc:  # never crash the proxy; log it and re-list
                    log.exception("EndpointSlice discovery failed unexpectedly")
                    await self._failed(f"{type(exc).__name__}: {exc}")
        finally:
            await api.close()

    async def _connect(self) -> KubeApi:
        while True:
            try:
                return await self._api_factory()
            except ConfigError as exc:
                await self._failed(str(exc))

    async def _expired(self) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._gone_at > GONE_WINDOW_S:
            self._gone = 0
        self._gone_at = now
        self._gone += 1
        if self._gone == 1:
            log.info("EndpointSlice watch: resourceVersion expired (410); re-listing")
            return
        pause = min(GONE_PAUSE_MAX_S, GONE_PAUSE_S * 2 ** (self._gone - 2))
        log.warning(
            "EndpointSlice watch: %d expiries (410) in a row; re-listing in %.2fs",
            self._gone,
            pause,
        )
        await asyncio.sleep(pause * random.uniform(0.5, 1.0))

    async def _failed(self, error: str) -> None:
        """Record the error, keep the last snapshot, wait before trying again."""
        self._health = DiscoveryHealth(connected=False, last_error=error)
        self._failures += 1
        delay = min(self._backoff_max_s, self._backoff_initial_s * 2 ** (self._failures - 1))
        delay *= random.uniform(0.5, 1.0)
        log.warning(
            "EndpointSlice discovery: %s; keeping %d known pods, retry in %.1fs",
            error,
            len(self._pushed or []),
            delay,
        )
        await asyncio.sleep(delay)

    def _connected(self) -> None:
        self._failures = 0
        if not self._health.connected:
            self._health = DiscoveryHealth(connected=True, last_error=None)

    async def _list(self, api: KubeApi, sink: Sink) -> None:
        items, resource_version = await api.list_endpoint_slices(
            self._settings.namespace, self._selector
        )
        self._slices = {_name(item): item for item in items}
        self._resource_version = resource_version
        self._connected()
        self._push(sink)

    async def _watch_until_error(self, api: KubeApi, sink: Sink) -> None:
        """Watch, resuming after each normal end; raise on 410 or errors."""
        while True:
            events = api.watch_endpoint_slices(
                self._settings.namespace,
                self._selector,
                resource_version=self._resource_version,
                timeout_s=self._watch_timeout_s,
            )
            try:
                async with contextlib.aclosing(events):
                    async for event in events:
                        self._apply(event, sink)
            except KubernetesError as exc:
                if exc.status == 410:
                    raise _Gone from exc
                raise

    def _apply(self, event: WatchEvent, sink: Sink) -> None:
        metadata = event.obj.get("metadata") or {}
        if metadata.get("resourceVersion"):
            self._resource_version = str(metadata["resourceVersion"])
        self._connected()
        if event.type == "BOOKMARK":
            return
        if event.type in ("ADDED", "MODIFIED"):
            self._slices[_name(event.obj)] = event.obj
        elif event.type == "DELETED":
            self._slices.pop(_name(event.obj), None)
        else:
            log.warning("EndpointSlice watch: ignored event type %r", event.type)
            return
        self._push(sink)

    def _push(self, sink: Sink) -> None:
        snapshot = endpoints_from_slices(self._slices.values(), port_name=self._settings.port_name)
        if snapshot != self._pushed:
            self._pushed = snapshot
            sink(list(snapshot))


def _name(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))
