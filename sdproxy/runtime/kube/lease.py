"""Runtime: leader election on a coordination.k8s.io/v1 Lease (client-go's algorithm).

Only the Lease holder may patch the Deployment's scale, so several proxy replicas never
fight over the replica count. Like client-go's leaderelection package:

- the holder renews every ``duration/3``; the others retry at the same period;
- a candidate takes over only when the Lease record has not changed for a whole
  ``leaseDurationSeconds`` as measured on ITS OWN monotonic clock since it first saw that
  record (so clock skew between nodes does not matter; the timestamps are informative);
- every write is a PUT carrying the resourceVersion read just before: 409 Conflict means
  another replica won the race;
- a leader that cannot renew stops acting after ``renew_deadline`` (2/3 of the duration,
  before anyone can take over), and ``close()`` releases the Lease (empty holder) so a
  successor need not wait for expiry.

Lease timestamps are wall-clock MicroTime (RFC 3339 with microseconds) as the API requires;
every interval is measured on the event loop's monotonic clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sdproxy.errors import KubernetesError
from sdproxy.runtime.kube.api import JsonObj, KubeApi

log = logging.getLogger(__name__)

Clock = Callable[[], float]
WallClock = Callable[[], datetime]


def micro_time(moment: datetime) -> str:
    """Kubernetes MicroTime: 2006-01-02T15:04:05.000000Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utc_now() -> datetime:
    return datetime.now(UTC)


class LeaderElector:
    """Acquires and renews one Lease in the background; ``is_leader()`` is the verdict."""

    def __init__(
        self,
        api: KubeApi,
        *,
        namespace: str,
        name: str,
        identity: str,
        duration_s: float,
        clock: Clock | None = None,
        wall_clock: WallClock = _utc_now,
    ) -> None:
        self._api = api
        self._namespace = namespace
        self._name = name
        self.identity = identity
        self._duration_s = duration_s
        self._clock = clock or asyncio.get_running_loop().time
        self._wall_clock = wall_clock
        self._leader_until = -math.inf  # monotonic deadline of our last successful renewal
        self._observed: tuple[str, float] | None = None  # (resourceVersion, first seen at)
        self._task: asyncio.Task[None] | None = None

    @property
    def period_s(self) -> float:
        return self._duration_s / 3

    def is_leader(self) -> bool:
        return self._clock() < self._leader_until

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"lease:{self._name}")

    async def close(self, *, release: bool = True) -> None:
        """Stop renewing; with ``release`` (and while leading) hand the Lease back."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if release and self.is_leader():
            try:
                await self._release()
            except KubernetesError as exc:
                log.warning("could not release Lease %s: %s", self._name, exc)
        self._leader_until = -math.inf

    async def _loop(self) -> None:
        while True:
            started = self._clock()
            try:
                await self.try_acquire_or_renew()
            except KubernetesError as exc:
                log.warning("Lease %s: %s (leader: %s)", self._name, exc, self.is_leader())
            except Exception:  # never let the election task die silently
                log.exception("Lease %s: unexpected error", self._name)
            await asyncio.sleep(max(0.0, started + self.period_s - self._clock()))

    async def try_acquire_or_renew(self) -> bool:
        """One round of the election; True when we hold the Lease afterwards."""
        now = self._clock()
        lease = await self._api.read_lease(self._namespace, self._name)
        if lease is None:
            try:
                await self._api.create_lease(self._namespace, self._body(None))
            except KubernetesError as exc:
                if exc.status == 409:  # AlreadyExists: another replica created it first
                    return False
                raise
            return self._won(now, "acquired (new Lease)")
        spec: dict[str, Any] = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        version = str(lease["metadata"].get("resourceVersion", ""))
        if self._observed is None or self._observed[0] != version:
            self._observed = (version, now)
        if holder and holder != self.identity and not self._expired(spec, now):
            self._leader_until = -math.inf
            return False
        try:
            await self._api.replace_lease(self._namespace, self._name, self._body(lease))
        except KubernetesError as exc:
            if exc.status == 409:  # someone else wrote the Lease first: we lost the race
                self._leader_until = -math.inf
                return False
            raise
        return self._won(now, "renewed" if holder == self.identity else f"taken from {holder!r}")

    def _expired(self, spec: dict[str, Any], now: float) -> bool:
        assert self._observed is not None
        duration = float(spec.get("leaseDurationSeconds") or self._duration_s)
        return now >= self._observed[1] + duration

    def _won(self, started: float, how: str) -> bool:
        if not self.is_leader():
            log.info("Lease %s %s by %s", self._name, how, self.identity)
        # renew deadline: stop acting before anyone else may take over (client-go: 2/3)
        self._leader_until = started + self._duration_s * 2 / 3
        return True

    def _body(self, lease: JsonObj | None) -> JsonObj:
        now = micro_time(self._wall_clock())
        spec: dict[str, Any] = dict((lease or {}).get("spec") or {})
        for key in ("acquireTime", "renewTime"):  # the client reads them back as +00:00
            if isinstance(spec.get(key), str):
                spec[key] = micro_time(datetime.fromisoformat(spec[key]))
        if spec.get("holderIdentity") != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (lease is not None)
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=max(1, math.ceil(self._duration_s)),
            renewTime=now,
        )
        metadata: dict[str, Any] = {"name": self._name, "namespace": self._namespace}
        if lease is not None:
            metadata["resourceVersion"] = lease["metadata"]["resourceVersion"]
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": spec,
        }

    async def _release(self) -> None:
        lease = await self._api.read_lease(self._namespace, self._name)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        body = self._body(lease)
        body["spec"].update(holderIdentity=None, leaseDurationSeconds=1)
        await self._api.replace_lease(self._namespace, self._name, body)
        log.info("Lease %s released by %s", self._name, self.identity)
