"""Runtime: the typed status snapshot — one document for /-/status, the page and metrics.

``Status`` is built once per request or scrape by the composition root
(``Services.snapshot``) from the admission core, the autoscaler and discovery. The JSON
of ``/-/status`` is ``Status.to_json()``; the state gauges in /metrics read the same
object's fields (``sdproxy.runtime.metrics.StateCollector``), so the two can never
disagree; ``Status.from_json`` reads the document back (tests, other replicas).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sdproxy.core.pods import PodState
from sdproxy.core.slots import Pod


@dataclass(frozen=True, kw_only=True)
class QueueStatus:
    depth: int
    max: int
    oldest_wait_s: float
    timeout_s: float
    #: queued jobs per priority class (high, normal, low: every class present)
    by_priority: Mapping[str, int] = field(default_factory=dict)
    #: --policy: fair | fifo
    policy: str = "fair"


@dataclass(frozen=True, kw_only=True)
class TenantStatus:
    name: str
    weight: float
    queued: int
    running: int
    #: GPU time its jobs held pods, in seconds, since the proxy started
    gpu_seconds: float


@dataclass(frozen=True, kw_only=True)
class PodStatus:
    id: str
    url: str
    state: PodState
    inflight: int
    limit: int
    checkpoint: str | None
    completed: int
    errors: int
    ejected: bool
    cordoned: bool
    #: "direct" (no gate: this replica's books), "gated" (its gate's occupancy is
    #: followed), "gate_lost" (this replica cannot see its gate: sends it nothing),
    #: "pod_down" (its gate says sd-webui does not answer: sends it nothing)
    mode: str
    #: heavy requests its gate runs for other senders
    foreign: int
    #: why a ready pod takes no new work: gate_lost, pod_down, health_check, ejected
    #: (refused, broke an exchange or a light call), outlier (failed generations in a
    #: row), cordoned (None: it takes work)
    out: str | None
    #: relative GPU speed (#weight=N)
    weight: float = 1.0
    #: learned seconds per 512x512 step on it
    seconds_per_unit: float | None = None

    @classmethod
    def of(cls, pod: Pod, now: float) -> PodStatus:
        return cls(
            id=pod.pod_id,
            url=pod.url,
            state=pod.state,
            inflight=len(pod.running),
            limit=pod.limit,
            checkpoint=pod.checkpoint,
            completed=pod.completed,
            errors=pod.errors,
            ejected=pod.ejected(now),
            cordoned=pod.cordoned(now),
            mode=_mode(pod),
            foreign=pod.foreign,
            out=pod.out_reason(now),
            weight=pod.weight,
        )


def _mode(pod: Pod) -> str:
    if not pod.gated:
        return "direct"
    if not pod.gate_live:
        return "gate_lost"
    return "gated" if pod.gate_healthy else "pod_down"


@dataclass(frozen=True, kw_only=True)
class ScaleEvent:
    at: str
    previous: int
    desired: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "from": self.previous, "to": self.desired, "reason": self.reason}


@dataclass(frozen=True, kw_only=True)
class AutoscalerStatus:
    scaler: str
    leader: bool
    #: None until the policy first ran
    desired: int | None
    ready: int
    starting: int
    min_pods: int
    max_pods: int
    events: tuple[ScaleEvent, ...] = ()
    #: --wait-target-s (0: one pod per request) and the measured heavy arrivals per second
    wait_target_s: float = 0.0
    #: the target the queueing model is solved for now (--wait-target-s corrected by the
    #: measured waits) and the share of this replica's recent queue waits over
    #: --wait-target-s (None: none measured, or no target)
    model_target_s: float = 0.0
    wait_over_target_share: float | None = None
    arrival_rate_per_s: float = 0.0
    #: --predict: the forecast rate now and its peak over the next cold start, whether it
    #: is followed, and forecast vs actual arrivals over the last minutes (None: off or
    #: nothing learned yet)
    predict: bool = False
    forecast_rate_per_s: float | None = None
    forecast_peak_per_s: float | None = None
    forecast_trusted: bool = True
    forecast_recent: float | None = None
    actual_recent: int | None = None


@dataclass(frozen=True, kw_only=True)
class UiStatus:
    """The browser UI (``--ui``): sessions per pod and the lobby."""

    sessions: Mapping[str, int]
    sessions_per_pod: int
    idle_s: float
    lobby_depth: int
    lobby_oldest_wait_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "sessions": dict(self.sessions),
            "sessions_per_pod": self.sessions_per_pod,
            "idle_s": self.idle_s,
            "lobby_depth": self.lobby_depth,
            "lobby_oldest_wait_s": round(self.lobby_oldest_wait_s, 3),
        }


@dataclass(frozen=True, kw_only=True)
class DiscoveryStatus:
    source: str
    connected: bool
    last_error: str | None = None


@dataclass(frozen=True, kw_only=True)
class RecentJob:
    """One recent asynchronous job as the status page shows it: no body, no prompt, and
    only the first characters of its id (the whole id is the job's capability)."""

    id: str
    tenant: str | None
    status: str
    wait_s: float
    pod: str | None


@dataclass(frozen=True, kw_only=True)
class JobsStatus:
    #: jobs in the store by status (every status, 0 included; expired ones not counted)
    counts: Mapping[str, int]
    store_bytes: int
    max_bytes: int
    ttl_s: float
    recent: tuple[RecentJob, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "store_bytes": self.store_bytes,
            "max_bytes": self.max_bytes,
            "ttl_s": self.ttl_s,
            "recent": [
                {
                    "id": j.id,
                    "tenant": j.tenant,
                    "status": j.status,
                    "wait_s": j.wait_s,
                    "pod": j.pod,
                }
                for j in self.recent
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobsStatus:
        return cls(
            counts=dict(data["counts"]),
            store_bytes=int(data["store_bytes"]),
            max_bytes=int(data["max_bytes"]),
            ttl_s=float(data["ttl_s"]),
            recent=tuple(RecentJob(**j) for j in data["recent"]),
        )


@dataclass(frozen=True, kw_only=True)
class Status:
    version: str
    uptime_s: float
    queue: QueueStatus
    inflight: int
    pods: tuple[PodStatus, ...]
    autoscaler: AutoscalerStatus
    discovery: DiscoveryStatus
    shutting_down: bool
    tenants: tuple[TenantStatus, ...] = ()
    #: None without --ui
    ui: UiStatus | None = None
    #: the asynchronous job store (None: not running yet)
    jobs: JobsStatus | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "uptime_s": round(self.uptime_s, 3),
            "queue": {
                "depth": self.queue.depth,
                "max": self.queue.max,
                "oldest_wait_s": round(self.queue.oldest_wait_s, 3),
                "timeout_s": self.queue.timeout_s,
                "by_priority": dict(self.queue.by_priority),
                "policy": self.queue.policy,
            },
            "inflight": self.inflight,
            "pods": [_pod_json(p) for p in self.pods],
            "autoscaler": _autoscaler_json(self.autoscaler),
            "discovery": {
                "source": self.discovery.source,
                "connected": self.discovery.connected,
                "last_error": self.discovery.last_error,
            },
            "shutting_down": self.shutting_down,
            "tenants": [
                {
                    "name": t.name,
                    "weight": t.weight,
                    "queued": t.queued,
                    "running": t.running,
                    "gpu_seconds": round(t.gpu_seconds, 3),
                }
                for t in self.tenants
            ],
            # only with --ui: the document of a proxy without it is unchanged
            **({"ui": self.ui.to_json()} if self.ui is not None else {}),
            **({"jobs": self.jobs.to_json()} if self.jobs is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Status:
        """Read a /-/status document (KeyError/ValueError if it is not one)."""
        auto = data["autoscaler"]
        return cls(
            version=str(data["version"]),
            uptime_s=float(data["uptime_s"]),
            queue=QueueStatus(**data["queue"]),
            inflight=int(data["inflight"]),
            pods=tuple(_pod_from(p) for p in data["pods"]),
            autoscaler=AutoscalerStatus(
                **{k: v for k, v in auto.items() if k != "events"},
                events=tuple(_event_from(e) for e in auto["events"]),
            ),
            discovery=DiscoveryStatus(**data["discovery"]),
            shutting_down=bool(data["shutting_down"]),
            tenants=tuple(TenantStatus(**t) for t in data.get("tenants", ())),
            ui=UiStatus(**data["ui"]) if data.get("ui") else None,
            jobs=JobsStatus.from_json(data["jobs"]) if data.get("jobs") else None,
        )


def _pod_json(pod: PodStatus) -> dict[str, Any]:
    return {
        "id": pod.id,
        "url": pod.url,
        "state": pod.state.value,
        "inflight": pod.inflight,
        "limit": pod.limit,
        "checkpoint": pod.checkpoint,
        "completed": pod.completed,
        "errors": pod.errors,
        "ejected": pod.ejected,
        "cordoned": pod.cordoned,
        "mode": pod.mode,
        "foreign": pod.foreign,
        "out": pod.out,
        "weight": pod.weight,
        "seconds_per_unit": pod.seconds_per_unit,
    }


def _pod_from(data: Mapping[str, Any]) -> PodStatus:
    return PodStatus(**{**data, "state": PodState(data["state"])})


def _autoscaler_json(auto: AutoscalerStatus) -> dict[str, Any]:
    return {
        "scaler": auto.scaler,
        "leader": auto.leader,
        "desired": auto.desired,
        "ready": auto.ready,
        "starting": auto.starting,
        "min_pods": auto.min_pods,
        "max_pods": auto.max_pods,
        "events": [e.to_json() for e in auto.events],
        "wait_target_s": auto.wait_target_s,
        "model_target_s": round(auto.model_target_s, 4),
        "wait_over_target_share": _round(auto.wait_over_target_share),
        "arrival_rate_per_s": round(auto.arrival_rate_per_s, 4),
        "predict": auto.predict,
        "forecast_rate_per_s": _round(auto.forecast_rate_per_s),
        "forecast_peak_per_s": _round(auto.forecast_peak_per_s),
        "forecast_trusted": auto.forecast_trusted,
        "forecast_recent": _round(auto.forecast_recent),
        "actual_recent": auto.actual_recent,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _event_from(data: Mapping[str, Any]) -> ScaleEvent:
    return ScaleEvent(
        at=data["at"], previous=data["from"], desired=data["to"], reason=data["reason"]
    )


def count_states(pods: Sequence[PodStatus]) -> dict[PodState, int]:
    """Pods per lifecycle state, every state present (0 when none)."""
    counts = dict.fromkeys(PodState, 0)
    for pod in pods:
        counts[pod.state] += 1
    return counts
