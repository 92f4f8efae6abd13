"""Bench: the virtual-time pod model the autoscale scenario replays traces against.

One job: a deterministic discrete-event simulation of GPU pods behind sdproxy's shared
queue, driven by any policy that maps an observation to a desired pod count.

The model, stated once:

- A request arrives, joins ONE FIFO queue and is dispatched to any idle READY pod
  (one generation per pod at a time, ``--max-inflight 1``); the same dispatcher serves
  every policy, so only the policy differs. A request that waited ``queue_timeout_s``
  is dropped (sdproxy answers 503 queue_timeout) and counted.
- A pod is billed GPU-pod-seconds from the moment it is ordered until it is removed; it
  takes ``cold_start_s`` from order to READY (scheduling, image pull, model load).
- Scale-in never stops a running generation: surplus STARTING pods go first, newest
  first (the ReplicaSet controller deletes unready pods before ready ones), then idle
  READY pods; a busy surplus pod is removed when its generation finishes. This is
  sdproxy's scale-in (pod-deletion-cost); it also spares KPA the killed requests it
  can cause in reality, so the baselines are modelled generously.
- Policies are ticked every ``tick_s`` with the same ``SimObservation``.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sdproxy.core.queueing import ServiceStats


@dataclass(frozen=True, kw_only=True)
class Request:
    arrival_s: float
    service_s: float


@dataclass(frozen=True, kw_only=True)
class SimObservation:
    """What every policy sees at a tick."""

    inflight: int
    queued: int
    ready: int
    starting: int
    per_pod_limit: int
    #: time-weighted mean of in-flight + queued since the previous tick (what Knative's
    #: queue-proxy/activator report: average concurrency, not a point sample)
    mean_demand: float
    #: the last measured order-to-READY time (0 before any pod became ready), as
    #: sdproxy's runtime measures it from discovery; only sdproxy's policy reads it
    cold_start_s: float = 0.0
    #: requests that arrived so far, and the measured service-time mean and squared
    #: coefficient of variation (what sdproxy's runtime measures; only sdproxy reads them)
    arrivals: int = 0
    service_s: float = 0.0
    service_scv: float = 1.0
    #: virtual Unix time (the trace starts at ``SimConfig.epoch_s``, a Monday 00:00 UTC)
    wall_s: float = 0.0
    #: queue waits of the requests dispatched since the previous tick (sdproxy's runtime
    #: passes the same; only sdproxy's policy reads them)
    waits: tuple[float, ...] = ()


class Policy(Protocol):
    name: str

    def tick(self, obs: SimObservation, now: float) -> int:
        """The desired pod count at ``now``."""
        ...


@dataclass(kw_only=True)
class _Pod:
    ordered_s: float
    ready_s: float
    removed_s: float | None = None
    busy: bool = False
    is_ready: bool = False


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    cold_start_s: float = 90.0
    tick_s: float = 2.0
    queue_timeout_s: float = 600.0
    #: time-series sample spacing for plots
    sample_s: float = 60.0
    #: the virtual wall clock at t = 0: Monday 2026-11-30 00:00 UTC
    epoch_s: float = 1_795_996_800.0


@dataclass(kw_only=True)
class SimResult:
    waits: list[float] = field(default_factory=list)
    #: arrival time of each served request, in the order of ``waits``
    served_at: list[float] = field(default_factory=list)
    #: (ordered, removed) of every pod, for the bill of a part of the trace
    pod_intervals: list[tuple[float, float]] = field(default_factory=list)
    dropped: int = 0
    gpu_pod_seconds: float = 0.0
    pods_ordered: int = 0
    end_s: float = 0.0
    series_t: list[float] = field(default_factory=list)
    series_pods: list[int] = field(default_factory=list)
    series_ready: list[int] = field(default_factory=list)
    series_queued: list[int] = field(default_factory=list)


# event kinds, in the order simultaneous events are handled
_DONE, _READY = 0, 1


class Simulation:
    """One policy against one trace; ``run()`` returns the bill and the waits."""

    def __init__(self, *, trace: Sequence[Request], policy: Policy, config: SimConfig) -> None:
        self.trace, self.policy, self.cfg = trace, policy, config
        self.pods: list[_Pod] = []
        self.running: dict[int, float] = {}  # pod index -> service time of its request
        self.queue: deque[Request] = deque()
        self.events: list[tuple[float, int, int, int]] = []  # (t, kind, seq, pod index)
        self.seq = 0
        self.target = 0
        self.inflight = 0
        self.area = 0.0  # integral of demand dt since the last tick
        self.last_t = 0.0
        self.measured_cold_start = 0.0
        self.arrived = 0
        self.service = ServiceStats()
        self.tick_waits: list[float] = []
        self.out = SimResult()

    # -- bookkeeping ---------------------------------------------------------------
    def _advance(self, t: float) -> None:
        self.area += (self.inflight + len(self.queue)) * (t - self.last_t)
        self.last_t = t

    def _push(self, t: float, kind: int, pod: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, kind, self.seq, pod))

    def _alive(self) -> list[int]:
        return [i for i, p in enumerate(self.pods) if p.removed_s is None]

    def _remove(self, i: int, t: float) -> None:
        self.pods[i].removed_s = t

    # -- requests ------------------------------------------------------------------
    def _expire(self, t: float) -> None:
        while self.queue and t - self.queue[0].arrival_s > self.cfg.queue_timeout_s:
            self.queue.popleft()
            self.out.dropped += 1

    def _dispatch(self, t: float) -> None:
        self._expire(t)
        for i in self._alive():
            if not self.queue:
                return
            pod = self.pods[i]
            if pod.is_ready and not pod.busy:
                self._start(i, self.queue.popleft(), t)

    def _start(self, i: int, req: Request, t: float) -> None:
        self.pods[i].busy = True
        self.running[i] = req.service_s
        self.inflight += 1
        self.out.waits.append(t - req.arrival_s)
        self.tick_waits.append(t - req.arrival_s)
        self.out.served_at.append(req.arrival_s)
        self._push(t + req.service_s, _DONE, i)

    def _on_done(self, i: int, t: float) -> None:
        self.service = self.service.observe(self.running[i])
        self.pods[i].busy = False
        self.inflight -= 1
        if len(self._alive()) > self.target:  # surplus busy pod: finished, now removable
            self._remove(i, t)
        else:
            self._dispatch(t)

    # -- scaling -------------------------------------------------------------------
    def _observe(self, t: float) -> SimObservation:
        alive = [self.pods[i] for i in self._alive()]
        ready = sum(1 for p in alive if p.is_ready)
        mean = self.area / self.cfg.tick_s
        self.area = 0.0
        waits, self.tick_waits = tuple(self.tick_waits), []
        return SimObservation(
            inflight=self.inflight,
            queued=len(self.queue),
            ready=ready,
            starting=len(alive) - ready,
            per_pod_limit=1,
            mean_demand=mean,
            cold_start_s=self.measured_cold_start,
            arrivals=self.arrived,
            service_s=self.service.mean_s,
            service_scv=self.service.scv,
            wall_s=self.cfg.epoch_s + t,
            waits=waits,
        )

    def _scale(self, desired: int, t: float) -> None:
        self.target = max(0, desired)
        alive = self._alive()
        for _ in range(self.target - len(alive)):
            self.pods.append(_Pod(ordered_s=t, ready_s=t + self.cfg.cold_start_s))
            self._push(t + self.cfg.cold_start_s, _READY, len(self.pods) - 1)
            self.out.pods_ordered += 1
        surplus = len(alive) - self.target
        starting = [i for i in reversed(alive) if not self.pods[i].is_ready]
        idle = [i for i in reversed(alive) if self.pods[i].is_ready and not self.pods[i].busy]
        for i in (starting + idle)[: max(0, surplus)]:
            self._remove(i, t)

    def _on_tick(self, t: float) -> None:
        self._expire(t)
        obs = self._observe(t)
        self._scale(self.policy.tick(obs, t), t)
        if t >= len(self.out.series_t) * self.cfg.sample_s:
            self.out.series_t.append(t)
            self.out.series_pods.append(obs.ready + obs.starting)
            self.out.series_ready.append(obs.ready)
            self.out.series_queued.append(obs.queued)

    # -- the loop ------------------------------------------------------------------
    def _handle_event(self) -> None:
        t, kind, _, i = heapq.heappop(self.events)
        self._advance(t)
        if self.pods[i].removed_s is not None and kind == _READY:
            return
        if kind == _READY:
            self.pods[i].is_ready = True
            self.measured_cold_start = t - self.pods[i].ordered_s
            self._dispatch(t)
        else:
            self._on_done(i, t)

    def run(self, *, horizon_s: float) -> SimResult:
        """Replay the trace, then keep ticking until the queue is empty after the horizon."""
        k, tick_t = 0, 0.0
        while True:
            next_event = self.events[0][0] if self.events else math.inf
            next_arrival = self.trace[k].arrival_s if k < len(self.trace) else math.inf
            if next_event <= min(next_arrival, tick_t):
                self._handle_event()
            elif next_arrival <= tick_t:
                self._advance(next_arrival)
                self.queue.append(self.trace[k])
                self.arrived += 1
                k += 1
                self._dispatch(next_arrival)
            elif tick_t > horizon_s and not self.queue and not self.inflight:
                break
            else:
                self._advance(tick_t)
                self._on_tick(tick_t)
                tick_t += self.cfg.tick_s
        return self._close(max(horizon_s, self.last_t))

    def _close(self, end: float) -> SimResult:
        self.out.end_s = end
        self.out.pod_intervals = [
            (p.ordered_s, end if p.removed_s is None else p.removed_s) for p in self.pods
        ]
        self.out.gpu_pod_seconds = sum(b - a for a, b in self.out.pod_intervals)
        return self.out

    @staticmethod
    def billed(result: SimResult, start_s: float, end_s: float = math.inf) -> float:
        """GPU-pod-seconds billed between ``start_s`` and ``end_s``."""
        return sum(max(0.0, min(b, end_s) - max(a, start_s)) for a, b in result.pod_intervals)
