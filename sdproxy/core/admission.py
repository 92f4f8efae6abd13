"""Core: per-pod slots, the shared queue and dispatch decisions (sans-IO state machine).

The runtime calls in with events (a job arrives, a job finishes, pods change, time passes)
and gets decisions back (``Dispatch``, ``Queued``, ``Reject``); it performs them. Invariants:

- a pod never runs more than its limit of heavy jobs (``len(pod.running) <= pod.limit``);
- work-conserving: no job waits while a READY, non-ejected pod has a free slot;
- a job is bound to a pod only at the moment a slot frees (HAProxy, the Inference
  Extension), never at arrival (what makes Knative queue behind a busy pod);
- every submitted job ends in exactly one of: dispatched then released, rejected, cancelled.

Pod choice among free pods: the pod that has the requested checkpoint loaded, then the
least loaded, then the most recently used (packs work so idle pods can be scaled in).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from sdproxy.core.pods import Endpoint, PodId, PodState
from sdproxy.core.queue import FifoQueue, Job, TicketId

__all__ = [
    "Admission",
    "AdmissionConfig",
    "Dispatch",
    "Job",
    "Pod",
    "Queued",
    "Reconciled",
    "Reject",
    "RejectReason",
    "Running",
    "TicketId",
]


class RejectReason(StrEnum):
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    NO_BACKENDS = "no_backends"
    CANCELLED = "job_cancelled"
    SHUTTING_DOWN = "shutting_down"


@dataclass(frozen=True, kw_only=True)
class Dispatch:
    ticket: TicketId
    pod_id: PodId
    url: str
    #: seconds the job waited in the proxy
    queued_s: float


@dataclass(frozen=True, kw_only=True)
class Queued:
    ticket: TicketId
    #: 1-based place in the shared queue
    position: int


@dataclass(frozen=True, kw_only=True)
class Reject:
    ticket: TicketId
    reason: RejectReason


@dataclass(frozen=True, kw_only=True)
class Running:
    ticket: TicketId
    pod_id: PodId
    url: str
    dispatched_at: float


Decision = Dispatch | Queued | Reject


@dataclass(frozen=True, kw_only=True)
class AdmissionConfig:
    #: heavy jobs per pod at once
    max_inflight: int
    #: queued jobs before queue_full
    max_queue: int
    queue_timeout_s: float
    #: queue (rather than answer no_backends) while no pod is ready: pods may still come
    #: (an autoscaler or Kubernetes can add them)
    hold_when_empty: bool = False
    #: new ready pods must pass a warm-up generation before taking work
    warmup: bool = False
    #: first ejection of a pod that refused a connection; doubles per repeat, up to 32x
    eject_s: float = 2.0
    #: initial guess of seconds per cost unit (one 512x512 step on an A10: ~0.1 s)
    seconds_per_unit: float = 0.1


@dataclass(kw_only=True)
class Pod:
    pod_id: PodId
    url: str
    state: PodState
    limit: int
    running: dict[TicketId, Running] = field(default_factory=dict)
    #: checkpoint of the last job sent (sd-webui keeps it loaded until another is needed)
    checkpoint: str | None = None
    ejected_until: float = 0.0
    ejections: int = 0
    completed: int = 0
    errors: int = 0
    #: when the pod last became idle (or appeared); orders scale-in candidates
    idle_since: float = 0.0
    last_used: float = 0.0
    #: still listed by discovery (False: draining until its running jobs finish)
    listed: bool = True
    #: chosen for scale-in: takes no new work until then (its deletion is on the way)
    cordoned_until: float = 0.0

    def cordoned(self, now: float) -> bool:
        return now < self.cordoned_until

    def free(self, now: float) -> bool:
        return (
            self.state is PodState.READY
            and len(self.running) < self.limit
            and now >= self.ejected_until
            and now >= self.cordoned_until
        )


@dataclass(frozen=True, kw_only=True)
class Reconciled:
    """Outcome of a discovery snapshot."""

    dispatches: list[Dispatch]
    rejects: list[Reject]
    #: (pod, old state or None if new, new state or None if gone)
    transitions: list[tuple[PodId, PodState | None, PodState | None]]


class Admission:
    """The slots and queue of one proxy replica."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self.queue = FifoQueue()
        self.pods: dict[PodId, Pod] = {}
        self._running: dict[TicketId, Running] = {}
        self._spu = config.seconds_per_unit
        self._jobs: dict[TicketId, Job] = {}
        self.closed = False

    # ---- heavy jobs -------------------------------------------------------------------

    def submit(self, job: Job, now: float) -> Decision:
        """A heavy job arrives: dispatch it, queue it, or reject it."""
        if self.closed:
            return Reject(ticket=job.ticket, reason=RejectReason.SHUTTING_DOWN)
        if not len(self.queue):
            pod = self._choose(job, now)
            if pod is not None:
                return self._bind(job, pod, now)
        if len(self.queue) >= self.config.max_queue:
            return Reject(ticket=job.ticket, reason=RejectReason.QUEUE_FULL)
        if self._hopeless(now):
            return Reject(ticket=job.ticket, reason=RejectReason.NO_BACKENDS)
        self.queue.push(job)
        self._jobs[job.ticket] = job
        return Queued(ticket=job.ticket, position=len(self.queue))

    def release(
        self, ticket: TicketId, now: float, *, pod_failed: bool = False, ran: bool = True
    ) -> list[Dispatch]:
        """A dispatched job's response has finished (the pod's slot is free again).

        ``ran=False``: the slot is given back without a full generation behind it (the
        waiter vanished as it was bound, the client left and the pod was interrupted):
        neither a completion nor an error, and no sample for the ETA estimate."""
        run = self._running.pop(ticket, None)
        if run is None:  # not running (queued, finished, unknown): a stray release is a no-op
            return []
        job = self._jobs.pop(ticket, None)
        pod = self.pods.get(run.pod_id)
        if pod is not None:
            del pod.running[ticket]
            if pod_failed:
                pod.errors += 1
            elif ran:
                pod.completed += 1
                pod.ejections = 0
                if job is not None and job.cost > 0:
                    sample = (now - run.dispatched_at) / job.cost
                    self._spu += 0.2 * (sample - self._spu)  # EWMA for ETAs
            if not pod.running:
                pod.idle_since = now
            self._forget_if_gone(pod)
        return self._drain(now)

    def retry(self, ticket: TicketId, now: float) -> Decision:
        """The pod refused the connection before the request was sent: eject it and give
        the job another pod, ahead of everyone else (it already waited its turn)."""
        run = self._running.pop(ticket, None)
        job = self._jobs.get(ticket)
        if run is None or job is None:
            return Reject(ticket=ticket, reason=RejectReason.CANCELLED)
        pod = self.pods.get(run.pod_id)
        if pod is not None:
            del pod.running[ticket]
            self.eject(pod.pod_id, now)
            self._forget_if_gone(pod)
        other = self._choose(job, now)
        if other is not None:
            return self._bind(job, other, now)
        if self._hopeless(now) or self.closed:
            del self._jobs[ticket]
            reason = RejectReason.SHUTTING_DOWN if self.closed else RejectReason.NO_BACKENDS
            return Reject(ticket=ticket, reason=reason)
        self.queue.push_front(job)
        return Queued(ticket=ticket, position=1)

    def cancel(self, ticket: TicketId) -> bool:
        """Remove a queued job (client gone, interrupted). False if it is not queued."""
        if self.queue.remove(ticket) is None:
            return False
        del self._jobs[ticket]
        return True

    def tick(self, now: float) -> tuple[list[Dispatch], list[Reject]]:
        """Time passes: expire jobs past the queue timeout; re-admit ejected pods."""
        rejects: list[Reject] = []
        deadline = now - self.config.queue_timeout_s
        while (head := self.queue.peek()) is not None and head.enqueued_at <= deadline:
            self.queue.pop()
            del self._jobs[head.ticket]
            rejects.append(Reject(ticket=head.ticket, reason=RejectReason.QUEUE_TIMEOUT))
        rejects.extend(self._reject_all_if_hopeless(now))
        return self._drain(now), rejects

    def shutdown(self) -> list[Reject]:
        """Stop admitting; every queued job is answered shutting_down."""
        self.closed = True
        return self._reject_all(RejectReason.SHUTTING_DOWN)

    # ---- pods -------------------------------------------------------------------------

    def reconcile(self, endpoints: Iterable[Endpoint], now: float) -> Reconciled:
        """Apply a full discovery snapshot."""
        transitions: list[tuple[PodId, PodState | None, PodState | None]] = []
        seen: set[PodId] = set()
        for ep in endpoints:
            seen.add(ep.pod_id)
            transitions.extend(self._apply_endpoint(ep, now))
        for pod in list(self.pods.values()):
            if pod.pod_id not in seen and pod.listed:
                pod.listed = False
                transitions.extend(self._set_state(pod, PodState.DRAINING))
                if self._forget_if_gone(pod):
                    transitions.append((pod.pod_id, PodState.DRAINING, None))
        dispatches = self._drain(now)
        return Reconciled(
            dispatches=dispatches,
            rejects=self._reject_all_if_hopeless(now),
            transitions=transitions,
        )

    def mark_warm(self, pod_id: PodId, now: float) -> list[Dispatch]:
        """The pod's warm-up generation succeeded: it takes work from now on."""
        pod = self.pods.get(pod_id)
        if pod is None or pod.state is not PodState.WARMING:
            return []
        pod.state = PodState.READY
        pod.idle_since = now
        return self._drain(now)

    def eject(self, pod_id: PodId, now: float) -> None:
        """Take a pod out of rotation for a while (connection refused or reset)."""
        pod = self.pods.get(pod_id)
        if pod is None:
            return
        pod.ejected_until = now + self.config.eject_s * 2 ** min(pod.ejections, 5)
        pod.ejections += 1

    def cordon(self, pod_ids: Iterable[PodId], now: float, *, for_s: float) -> list[PodId]:
        """Take idle pods about to be scaled in out of rotation for ``for_s`` seconds, so no
        request is bound to a pod between the scale decision and its deletion (which would
        kill a generation). Pods that run something are skipped; returns the cordoned."""
        out = []
        for pod_id in pod_ids:
            pod = self.pods.get(pod_id)
            if pod is not None and pod.listed and not pod.running:
                pod.cordoned_until = now + for_s
                out.append(pod_id)
        return out

    def pick_light(self, now: float, *, exclude: Sequence[PodId] = ()) -> Pod | None:
        """A ready pod for a light request: least loaded, not ejected, not cordoned."""
        best: Pod | None = None
        for pod in self.pods.values():
            if pod.state is not PodState.READY or now < pod.ejected_until or pod.cordoned(now):
                continue
            if pod.pod_id in exclude:
                continue
            if best is None or len(pod.running) / pod.limit < len(best.running) / best.limit:
                best = pod
        return best

    # ---- queries ----------------------------------------------------------------------

    def running(self, ticket: TicketId) -> Running | None:
        return self._running.get(ticket)

    def position(self, ticket: TicketId) -> int | None:
        return self.queue.position(ticket)

    def eta_s(self, ticket: TicketId) -> float:
        """Seconds until a queued job should finish: work ahead of it spread over capacity."""
        ahead = 0.0
        own = 1.0
        for job in self.queue:
            if job.ticket == ticket:
                own = job.cost
                break
            ahead += job.cost
        running = sum(self._jobs[t].cost for t in self._running if t in self._jobs) / 2
        capacity = max(1, sum(p.limit for p in self.pods.values() if p.state is PodState.READY))
        return ((ahead + running) / capacity + own) * self._spu

    @property
    def inflight(self) -> int:
        return len(self._running)

    def oldest_wait_s(self, now: float) -> float:
        head = self.queue.peek()
        return 0.0 if head is None else max(0.0, now - head.enqueued_at)

    def count(self, *states: PodState) -> int:
        return sum(1 for p in self.pods.values() if p.state in states)

    def idle_pods(self, now: float) -> list[PodId]:
        """Pods that run nothing and are not already cordoned: not yet ready first, then
        ready pods idle longest first (the scale-in candidates)."""
        pods = [p for p in self.pods.values() if not p.cordoned(now)]
        waiting = [p for p in pods if p.state in (PodState.STARTING, PodState.WARMING)]
        ready = [p for p in pods if p.state is PodState.READY and not p.running]
        ready.sort(key=lambda p: p.idle_since)
        return [p.pod_id for p in waiting + ready]

    # ---- internals --------------------------------------------------------------------

    def _choose(self, job: Job, now: float) -> Pod | None:
        best: Pod | None = None
        best_key: tuple[bool, float, float] | None = None
        for pod in self.pods.values():
            if not pod.free(now):
                continue
            affinity = job.checkpoint is not None and pod.checkpoint == job.checkpoint
            key = (not affinity, len(pod.running) / pod.limit, -pod.last_used)
            if best_key is None or key < best_key:
                best, best_key = pod, key
        return best

    def _bind(self, job: Job, pod: Pod, now: float) -> Dispatch:
        run = Running(ticket=job.ticket, pod_id=pod.pod_id, url=pod.url, dispatched_at=now)
        pod.running[job.ticket] = run
        pod.last_used = now
        if job.checkpoint is not None:
            pod.checkpoint = job.checkpoint
        self._running[job.ticket] = run
        self._jobs[job.ticket] = job
        return Dispatch(
            ticket=job.ticket, pod_id=pod.pod_id, url=pod.url, queued_s=now - job.enqueued_at
        )

    def _drain(self, now: float) -> list[Dispatch]:
        """Work conservation: bind queued jobs while any pod has a free slot."""
        out: list[Dispatch] = []
        while (job := self.queue.peek()) is not None:
            pod = self._choose(job, now)
            if pod is None:
                break
            self.queue.pop()
            out.append(self._bind(job, pod, now))
        return out

    def _capacity_coming(self, now: float) -> bool:
        for pod in self.pods.values():
            if pod.cordoned(now):
                continue
            if pod.state in (PodState.STARTING, PodState.WARMING):
                return True
            # a pod refused once may have blipped: it is back after its first ejection;
            # one refused again is treated as down until its ejection ends
            if pod.state is PodState.READY and (now >= pod.ejected_until or pod.ejections <= 1):
                return True
        return False

    def _hopeless(self, now: float) -> bool:
        return not self.config.hold_when_empty and not self._capacity_coming(now)

    def _reject_all_if_hopeless(self, now: float) -> list[Reject]:
        if not len(self.queue) or not self._hopeless(now):
            return []
        return self._reject_all(RejectReason.NO_BACKENDS)

    def _reject_all(self, reason: RejectReason) -> list[Reject]:
        out = []
        while (job := self.queue.pop()) is not None:
            del self._jobs[job.ticket]
            out.append(Reject(ticket=job.ticket, reason=reason))
        return out

    def _apply_endpoint(
        self, ep: Endpoint, now: float
    ) -> list[tuple[PodId, PodState | None, PodState | None]]:
        pod = self.pods.get(ep.pod_id)
        if pod is None:
            pod = Pod(
                pod_id=ep.pod_id,
                url=ep.url,
                state=PodState.STARTING,
                limit=self.config.max_inflight,
                idle_since=now,
            )
            self.pods[ep.pod_id] = pod
            first: list[tuple[PodId, PodState | None, PodState | None]] = [
                (ep.pod_id, None, PodState.STARTING)
            ]
        else:
            first = []
        pod.url = ep.url
        pod.listed = True
        return first + self._set_state(pod, self._target_state(pod, ep))

    def _target_state(self, pod: Pod, ep: Endpoint) -> PodState:
        if ep.terminating:
            return PodState.DRAINING
        if not ep.ready:  # a pod that was serving finishes its work; others wait to start
            was_serving = pod.state in (PodState.READY, PodState.DRAINING)
            return PodState.DRAINING if was_serving else PodState.STARTING
        if pod.state is PodState.READY:
            return PodState.READY
        return PodState.WARMING if self.config.warmup else PodState.READY

    @staticmethod
    def _set_state(
        pod: Pod, state: PodState
    ) -> list[tuple[PodId, PodState | None, PodState | None]]:
        if pod.state is state:
            return []
        old, pod.state = pod.state, state
        return [(pod.pod_id, old, state)]

    def _forget_if_gone(self, pod: Pod) -> bool:
        if pod.listed or pod.running:
            return False
        del self.pods[pod.pod_id]
        return True
