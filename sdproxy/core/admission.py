"""Core: admission — heavy jobs meet pod slots (a sans-IO state machine).

The runtime calls in with events (a job arrives, an exchange ends, pods change, time
passes) and gets one ``Effects`` back from every mutator (sdproxy.core.effects). This
module only composes the pieces, each of which answers one question in its own file:

- in which order jobs are served ............ the queue (``sdproxy.core.queue``)
- which queued job goes to which free pod .... placement (``sdproxy.core.placement``)
- whose job it is, their share and limits .... tenants (``sdproxy.core.tenants``)
- which pod answers a light call ............. ``sdproxy.core.light``
- when a pod is ejected, whether pods come ... health (``sdproxy.core.health``)
- what a release does, who owns a slot ....... ``release`` below + ``sdproxy.core.slots``
- what a job costs on a pod, how long it waits ``sdproxy.core.eta`` (learned speeds)
- a pod's state from discovery ............... ``sdproxy.core.pods`` (``target_state``)
- which idle pods go first on scale-in ....... ``sdproxy.core.scalein``

``--policy`` picks the pair: ``fair`` (the default: ``FairQueue`` + ``CheckpointPlacement``)
or ``fifo`` (``FifoQueue`` + ``AffinityPlacement``, the plain order kept for comparison).

Invariants (``check``): a pod never runs more than its limit, a tenant never more than its
``max_running``; a job is queued or bound, never both; work-conserving — no job waits while
its placement would pair it with a free pod; a
job is bound to a pod only when a slot frees (never at arrival); after shutdown nothing
waits. Every mutator ends in ``_settle``: drain the queue onto free slots, answer the
queue ``no_backends`` if no pod can come, and compute ``wake_at``.

Stray events are errors (``StateError``): releasing a ticket that does not run,
cancelling one that is not queued. Races the runtime cannot avoid are not: a warm-up that
finishes after its pod changed state, ejecting a pod that discovery already removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from sdproxy.core.effects import (
    Dispatch,
    Effects,
    EffectsBuilder,
    Outcome,
    Queued,
    Reject,
    RejectReason,
)
from sdproxy.core.eta import SpeedModel
from sdproxy.core.health import Health
from sdproxy.core.light import LeastLoadedLight
from sdproxy.core.placement import (
    AffinityPlacement,
    CheckpointPlacement,
    Placement,
    job_cost_s,
)
from sdproxy.core.pods import Endpoint, PodId, PodState, target_state
from sdproxy.core.queue import FairQueue, FifoQueue, Job, Queue, TicketId
from sdproxy.core.scalein import scale_in_order
from sdproxy.core.slots import Freed, Pod, Running, SlotBook
from sdproxy.core.tenants import Tenant, TenantBook
from sdproxy.errors import StateError

__all__ = ["Admission", "AdmissionConfig", "Job", "Pod", "Running", "Tenant", "TicketId"]

#: outcomes after which the job's tenant is charged the GPU time it held
_USED_GPU = frozenset(
    {
        Outcome.COMPLETED,
        Outcome.FAILED,
        Outcome.INTERRUPTED,
        Outcome.REQUEST_FAULT,
        Outcome.POD_ERROR,
    }
)


@dataclass(frozen=True, kw_only=True)
class AdmissionConfig:
    """Admission's knobs. A field with ``help`` is also the ``sdproxy serve`` option of
    the same name (``--max-inflight``): the settings read the metadata, so a knob, its
    bound and its help text are declared here, once. ``derived`` fields get no flag."""

    max_inflight: int = field(
        default=1, metadata={"help": "heavy requests one pod runs at once (sd-webui: 1)", "min": 1}
    )
    max_queue: int = field(
        default=1000, metadata={"help": "shared-queue bound; beyond it 503 queue_full", "min": 0}
    )
    queue_timeout_s: float = field(
        default=600.0, metadata={"help": "longest wait in the queue (then 503)", "gt": 0}
    )
    warmup: bool = field(
        default=False,
        metadata={
            "help": "a new pod takes traffic only after a 1-step 64x64 txt2img",
            "switch": True,
        },
    )
    health_fall: int = field(
        default=3, metadata={"help": "failed health checks in a row that take a pod out", "min": 1}
    )
    health_rise: int = field(
        default=2, metadata={"help": "passed health checks in a row that bring it back", "min": 1}
    )
    policy: Literal["fair", "fifo"] = field(
        default="fair",
        metadata={
            "help": "queue order and pod choice: fair (priorities, tenants' fair share of "
            "GPU-seconds, checkpoint-aware dispatch) | fifo (first in, plain affinity)"
        },
    )
    affinity_max_skip_s: float = field(
        default=30.0,
        metadata={
            "help": "a job may be passed by jobs that need no checkpoint switch for this "
            "long, then it goes next (policy fair)",
            "min": 0,
        },
    )
    outlier_failures: int = field(
        default=5,
        metadata={
            "help": "generations in a row a pod fails (5xx, not the request's fault) "
            "before it is ejected",
            "min": 1,
        },
    )
    #: queue (rather than answer no_backends) while no pod is ready: pods may still come
    hold_when_empty: bool = field(
        default=False, metadata={"derived": "an autoscaler or Kubernetes discovery can add pods"}
    )
    #: first ejection of a pod that refused a connection; doubles per repeat, up to 32x
    eject_s: float = field(default=2.0, metadata={"derived": "a constant"})
    #: initial guess of seconds per cost unit (one 512x512 step on an A10: ~0.1 s)
    seconds_per_unit: float = field(default=0.1, metadata={"derived": "a constant"})
    #: the longest one job can hold a slot, the most it adds to any ETA (sd-webui says
    #: nothing until a generation is done, so a pod silent for --backend-timeout-s is cut)
    max_job_s: float = field(default=1800.0, metadata={"derived": "--backend-timeout-s"})


class Admission:
    """The slots and queue of one proxy replica."""

    def __init__(
        self,
        config: AdmissionConfig,
        *,
        tenants: Iterable[Tenant] = (),
        queue: Queue | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.config = config
        self.tenants = TenantBook.of(tenants)
        #: the speed model: GPU-seconds of a job on a pod, ETAs (sdproxy.core.eta)
        self.eta = SpeedModel(seconds_per_unit=config.seconds_per_unit, max_job_s=config.max_job_s)
        fair = config.policy == "fair"
        if queue is None:
            queue = FairQueue(weights=self.tenants.weights()) if fair else FifoQueue()
        if placement is None:
            placement = (
                CheckpointPlacement(self.eta, max_skip_s=config.affinity_max_skip_s)
                if fair
                else AffinityPlacement()
            )
        self.queue: Queue = queue
        self.placement: Placement = placement
        self.book = SlotBook(limit=config.max_inflight)
        self.health = Health(
            eject_s=config.eject_s, fall=config.health_fall, rise=config.health_rise
        )
        self.light = LeastLoadedLight()
        #: refuses new jobs (SIGTERM); what is queued still drains onto pods
        self.closed = False
        #: gave up on the queue too: nothing waits any more
        self.shut = False

    # ---- heavy jobs -------------------------------------------------------------------

    def submit(self, job: Job, now: float) -> Effects:
        """A heavy job arrives: bind it to a free pod, queue it, or reject it."""
        fx = EffectsBuilder()
        if self.closed:
            return self._refuse(fx, job.ticket, RejectReason.SHUTTING_DOWN, now)
        job = replace(job, priority=self.tenants.capped(job))
        if not len(self.queue) and self.tenants.can_run(job):
            free = self._free(now)
            pod = self.placement.choose(job, free) if free else None
            if pod is not None:
                cost_s, _loads = job_cost_s(self.eta, job, pod)
                if self._late(job, cost_s, now):
                    return self._refuse(
                        fx, job.ticket, RejectReason.DEADLINE_UNMEETABLE, now, cost_s
                    )
                # through the queue's books (its virtual time, the tenant's tag) as any
                # served job, without waiting in it
                self.queue.push(job, deadline=self._deadline(job))
                self.queue.take(job.ticket)
                fx.dispatches.append(self._bind(job, pod, now))
                return self._settle(fx, now)
        if len(self.queue) >= self.config.max_queue:
            return self._refuse(fx, job.ticket, RejectReason.QUEUE_FULL, now)
        if self.tenants.queue_full(job):
            return self._refuse(fx, job.ticket, RejectReason.CLIENT_QUOTA, now)
        if self._hopeless(now):
            return self._refuse(fx, job.ticket, RejectReason.NO_BACKENDS, now)
        position = self._enqueue(job, requeue=False)
        if job.deadline_s is not None:
            eta = self.eta_s(job.ticket)
            if self._late(job, eta, now):
                self._dequeue(job.ticket)
                return self._refuse(fx, job.ticket, RejectReason.DEADLINE_UNMEETABLE, now, eta)
        return self._settle(fx, now, queued=(job.ticket, position))

    def _late(self, job: Job, eta_s: float, now: float) -> bool:
        """Whether a job with ``eta_s`` to go would end after its own deadline."""
        if job.deadline_s is None:
            return False
        return now + eta_s > job.enqueued_at + job.deadline_s

    def _deadline(self, job: Job) -> float:
        wait = self.config.queue_timeout_s
        if job.deadline_s is not None:
            wait = min(wait, job.deadline_s)
        return job.enqueued_at + wait

    def _enqueue(self, job: Job, *, requeue: bool) -> int:
        deadline = self._deadline(job)
        if requeue:
            position = self.queue.requeue(job, deadline=deadline)
        else:
            position = self.queue.push(job, deadline=deadline)
        self.tenants.add(self.tenants.queued, job.tenant, 1)
        return position

    def _dequeue(self, ticket: TicketId, *, serve: bool = False) -> Job | None:
        job = self.queue.take(ticket) if serve else self.queue.remove(ticket)
        if job is not None:
            self._left(job, served=serve)
        return job

    def _left(self, job: Job, *, served: bool) -> None:
        """``job`` left the queue; one that will not run costs its tenant nothing."""
        self.tenants.add(self.tenants.queued, job.tenant, -1)
        if not served:
            self.queue.charge(job, 0.0)

    def release(self, ticket: TicketId, outcome: Outcome, now: float) -> Effects:
        """A dispatched job's exchange with its pod ended as ``outcome``: free its slot
        (see ``Outcome`` for what each one counts) and admit whoever is next."""
        freed = self.book.unbind(ticket)
        self.tenants.add(self.tenants.running, freed.job.tenant, -1)
        fx = EffectsBuilder()
        pod = freed.pod
        if outcome in _USED_GPU:
            self._charge(freed, now)
        if pod is not None:
            if outcome is Outcome.COMPLETED:
                pod.completed += 1
                self.health.succeeded(pod)
                run = freed.run
                self.eta.observe(
                    cost=freed.job.cost,
                    seconds=now - run.dispatched_at,
                    pod=pod.pod_id,
                    weight=pod.weight,
                    checkpoint=freed.job.checkpoint or run.checkpoint,
                    switches=run.switches,
                )
            elif outcome is Outcome.REQUEST_FAULT:
                pod.completed += 1
            elif outcome is Outcome.POD_ERROR:
                pod.errors += 1
                self.health.failed_generation(pod, now, limit=self.config.outlier_failures)
            elif outcome is Outcome.FAILED:
                pod.errors += 1
                self.health.eject(pod, now)
            elif outcome is Outcome.REFUSED:
                self.health.eject(pod, now)
            elif outcome is Outcome.BUSY:
                pod.foreign = max(pod.foreign, pod.limit - len(pod.running))
            if not pod.running:
                pod.idle_since = now
            self._forget_if_gone(fx, pod)
        if outcome not in (Outcome.REFUSED, Outcome.BUSY):
            return self._settle(fx, now)
        if self.shut:
            fx.rejects.append(Reject(ticket=ticket, reason=RejectReason.SHUTTING_DOWN))
            return self._settle(fx, now)
        position = self._enqueue(freed.job, requeue=True)
        return self._settle(fx, now, queued=(ticket, position))

    def _charge(self, freed: Freed, now: float) -> None:
        """The job's tenant was served the GPU time it held: counted, and charged to its
        fair share in units at the pod's rate (checkpoint loads included)."""
        seconds = now - freed.run.dispatched_at
        job = freed.job
        self.tenants.serve(job.tenant, seconds)
        pod = freed.pod
        weight = pod.weight if pod is not None else 1.0
        rate = self.eta.rate(freed.run.pod_id, weight=weight, checkpoint=job.checkpoint)
        self.queue.charge(job, seconds / rate if rate > 0 else job.cost)

    def cancel(self, ticket: TicketId, reason: RejectReason, now: float) -> Effects:
        """Take a queued job out (its caller left, or asked to stop it)."""
        if self._dequeue(ticket) is None:
            raise StateError(f"ticket {ticket} is not queued")
        fx = EffectsBuilder(rejects=[Reject(ticket=ticket, reason=reason)])
        return self._settle(fx, now)

    def tick(self, now: float) -> Effects:
        """Time passes: expire jobs past their deadline; re-admit rested pods."""
        fx = EffectsBuilder()
        for job in self.queue.expired(now):
            self._left(job, served=False)
            fx.rejects.append(Reject(ticket=job.ticket, reason=RejectReason.QUEUE_TIMEOUT))
        return self._settle(fx, now)

    def close(self, now: float) -> Effects:
        """Stop admitting new jobs (answered shutting_down); the queued ones are still
        served as slots free (a rolling update loses nothing that fits the drain time)."""
        self.closed = True
        return self._settle(EffectsBuilder(), now)

    def shutdown(self, now: float) -> Effects:
        """Stop admitting; every job still queued is answered shutting_down."""
        self.closed = self.shut = True
        fx = EffectsBuilder()
        self._reject_all(fx, RejectReason.SHUTTING_DOWN)
        return self._settle(fx, now)

    # ---- pods -------------------------------------------------------------------------

    def reconcile(self, endpoints: Iterable[Endpoint], now: float) -> Effects:
        """Apply a full discovery snapshot."""
        fx = EffectsBuilder()
        seen: set[PodId] = set()
        for ep in endpoints:
            seen.add(ep.pod_id)
            self._apply_endpoint(fx, ep, now)
        for pod in list(self.book.pods.values()):
            if pod.pod_id not in seen and pod.listed:
                pod.listed = False
                self._set_state(fx, pod, PodState.DRAINING)
                self._forget_if_gone(fx, pod)
        return self._settle(fx, now)

    def mark_warm(self, pod_id: PodId, now: float) -> Effects:
        """The pod's warm-up generation succeeded: it takes work from now on (a no-op if
        the pod changed state while it warmed up)."""
        fx = EffectsBuilder()
        pod = self.book.pods.get(pod_id)
        if pod is not None and pod.state is PodState.WARMING:
            self._set_state(fx, pod, PodState.READY)
            pod.idle_since = now
        return self._settle(fx, now)

    def eject(self, pod_id: PodId, now: float) -> Effects:
        """Rest a pod that failed a light call (a no-op for a pod already gone)."""
        pod = self.book.pods.get(pod_id)
        if pod is not None:
            self.health.eject(pod, now)
        return self._settle(EffectsBuilder(), now)

    def cordon(self, pod_ids: Iterable[PodId], now: float, *, for_s: float) -> Effects:
        """Take idle pods about to be scaled in out of rotation for ``for_s`` seconds, so no
        request is bound to a pod between the scale decision and its deletion (which would
        kill a generation). Busy pods are skipped; ``Effects.cordoned`` lists the others."""
        fx = EffectsBuilder()
        for pod_id in pod_ids:
            pod = self.book.pods.get(pod_id)
            if pod is not None and pod.listed and not pod.running and not pod.ui_held:
                pod.cordoned_until = now + for_s
                fx.cordoned.append(pod_id)
        return self._settle(fx, now)

    def hold_for_ui(self, pod_ids: Iterable[PodId], now: float) -> Effects:
        """Exactly ``pod_ids`` are held by browser UI sessions (sdproxy.core.uisessions):
        they take no new API jobs (what they run finishes) and are not scaled in."""
        held = set(pod_ids)
        for pod in self.book.pods.values():
            if pod.ui_held and pod.pod_id not in held and not pod.running:
                pod.idle_since = now  # idle from now: the UI used it until now
            pod.ui_held = pod.pod_id in held
        return self._settle(EffectsBuilder(), now)

    def observe_gate(
        self,
        pod_id: PodId,
        *,
        foreign: int,
        limit: int,
        checkpoint: str | None,
        now: float,
        healthy: bool = True,
    ) -> Effects:
        """The pod's gate published its occupancy: ``foreign`` heavy requests of other
        senders, its ``limit`` (the gate is the authority), its loaded checkpoint, and
        whether its sd-webui answers (``healthy``: a pod down takes no work)."""
        pod = self.book.pods.get(pod_id)
        if pod is not None:
            pod.gated = pod.gate_live = True
            pod.gate_healthy = healthy
            pod.foreign = max(0, foreign)
            pod.limit = max(limit, len(pod.running))
            if checkpoint is not None and pod.lists(checkpoint):
                pod.checkpoint = checkpoint
        return self._settle(EffectsBuilder(), now)

    def observe_catalog(
        self,
        pod_id: PodId,
        *,
        catalog: Iterable[str],
        loaded: str | None,
        asked_at: float,
        now: float,
    ) -> Effects:
        """The pod said (asked at ``asked_at``) which checkpoint keys it lists and which
        it has ``loaded``: from now on only a listed name is recorded as its checkpoint."""
        pod = self.book.pods.get(pod_id)
        if pod is not None:
            pod.observe_catalog(frozenset(catalog), loaded=loaded, asked_at=asked_at)
        return self._settle(EffectsBuilder(), now)

    def health_checked(self, pod_id: PodId, ok: bool, now: float) -> Effects:
        """An active health check of the pod passed or failed (``sdproxy.core.health``)."""
        pod = self.book.pods.get(pod_id)
        if pod is not None:
            self.health.checked(pod, ok)
        return self._settle(EffectsBuilder(), now)

    def gate_lost(self, pod_id: PodId, now: float) -> Effects:
        """This replica lost sight of the pod's gate: it sends the pod nothing until the
        gate's stream is back (other replicas may still see it and use it)."""
        pod = self.book.pods.get(pod_id)
        if pod is not None and pod.gated:
            pod.gate_live = False
        return self._settle(EffectsBuilder(), now)

    def gate_absent(self, pod_id: PodId, now: float) -> Effects:
        """The backend has no gate (a plain sd-webui): this replica's own books rule."""
        pod = self.book.pods.get(pod_id)
        if pod is not None:
            pod.gated = pod.gate_live = False
            pod.foreign = 0
        return self._settle(EffectsBuilder(), now)

    # ---- queries ----------------------------------------------------------------------

    @property
    def pods(self) -> Mapping[PodId, Pod]:
        return self.book.pods

    @property
    def inflight(self) -> int:
        return self.book.inflight

    def running(self, ticket: TicketId) -> Running | None:
        return self.book.running(ticket)

    def is_queued(self, ticket: TicketId) -> bool:
        return ticket in self.queue

    def position(self, ticket: TicketId) -> int | None:
        return self.queue.position(ticket)

    def eta_s(self, ticket: TicketId) -> float:
        """Seconds until a queued job should finish (``sdproxy.core.eta``), at the ready
        pods' mean learned rate."""
        ahead: list[float] = []
        own = 1.0
        for job in self.queue:
            if job.ticket == ticket:
                own = job.cost
                break
            ahead.append(job.cost)
        return self._eta(ahead, own)

    def eta_at(self, position: int, cost: float) -> float:
        """``eta_s`` of a job of ``cost`` at ``position``, taking the jobs ahead to cost as
        much together as that many of it: O(1), for the answer to a submit (``eta_s``
        sums the real costs, O(n); the two differ when jobs ahead cost otherwise)."""
        return self._eta([cost * max(0, position - 1)], cost)

    def _eta(self, ahead: Iterable[float], own: float) -> float:
        running = [job.cost for job in self.book.running_jobs()]
        ready = [p for p in self.book.pods.values() if p.state is PodState.READY]
        slots = sum(p.limit for p in ready)
        rate = None
        if slots:
            # slots per second of work: the mean rate is slots over the summed speeds
            speed = sum(p.limit / self.eta.rate(p.pod_id, weight=p.weight) for p in ready)
            rate = slots / speed
        return self.eta.eta_s(ahead=ahead, running=running, slots=slots, own=own, rate=rate)

    def depth_by_priority(self) -> Mapping[int, int]:
        """Queued jobs per priority class."""
        return self.queue.depth_by_priority()

    def oldest_wait_s(self, now: float) -> float:
        head = self.queue.oldest()
        return 0.0 if head is None else max(0.0, now - head.enqueued_at)

    def count(self, *states: PodState) -> int:
        return sum(1 for p in self.book.pods.values() if p.state in states)

    def idle_pods(self, now: float) -> list[PodId]:
        """The scale-in candidates, first to remove first (``sdproxy.core.scalein``)."""
        return scale_in_order((p for p in self.book.pods.values() if not p.ui_held), now)

    def pick_light(self, now: float, *, exclude: Sequence[PodId] = ()) -> Pod | None:
        """A pod for a light call (``sdproxy.core.light``)."""
        usable = self.health.usable
        return self.light.pick(
            self.book.pods.values(), usable=lambda p: usable(p, now), exclude=exclude
        )

    def check(self, now: float) -> None:
        """Raise ``StateError`` unless every invariant holds (see the module docstring)."""
        self.book.check()
        for job in self.queue:
            if self.book.running(job.ticket) is not None:
                raise StateError(f"ticket {job.ticket} is both queued and running")
        free = self._free(now)
        if free and self.placement.match(self.queue, free, now, self.tenants.can_run, commit=False):
            raise StateError(f"jobs wait while {[p.pod_id for p in free]} have a free slot")
        if self.shut and len(self.queue):
            raise StateError("jobs wait after shutdown")
        running: dict[str, int] = {}
        for job in self.book.running_jobs():
            running[job.tenant] = running.get(job.tenant, 0) + 1
        queued: dict[str, int] = {}
        depths: dict[int, int] = {}
        for job in self.queue:
            queued[job.tenant] = queued.get(job.tenant, 0) + 1
            depths[job.priority] = depths.get(job.priority, 0) + 1
        if depths != dict(self.queue.depth_by_priority()):
            raise StateError(f"queue depths {self.queue.depth_by_priority()} are off")
        if running != self.tenants.running or queued != self.tenants.queued:
            raise StateError(f"tenant counts {self.tenants.running} {self.tenants.queued} are off")
        for tenant, count in running.items():
            cap = self.tenants.get(tenant).max_running
            if cap > 0 and count > cap:
                raise StateError(f"tenant {tenant!r} runs {count} > max_running {cap}")

    # ---- internals --------------------------------------------------------------------

    def _free(self, now: float) -> list[Pod]:
        """Pods that take a new API job: a slot free, usable, not held by the UI."""
        return [
            p
            for p in self.book.pods.values()
            if p.has_slot and not p.ui_held and self.health.usable(p, now)
        ]

    def _bind(self, job: Job, pod: Pod, now: float) -> Dispatch:
        cost_s, loads = job_cost_s(self.eta, job, pod)
        self.book.bind(job, pod, now, switches=loads, cost_s=cost_s)
        self.tenants.add(self.tenants.running, job.tenant, 1)
        return Dispatch(
            ticket=job.ticket,
            pod_id=pod.pod_id,
            url=pod.url,
            queued_s=now - job.enqueued_at,
            cost_s=cost_s,
        )

    def _refuse(
        self,
        fx: EffectsBuilder,
        ticket: TicketId,
        reason: RejectReason,
        now: float,
        eta_s: float | None = None,
    ) -> Effects:
        fx.rejects.append(Reject(ticket=ticket, reason=reason, eta_s=eta_s))
        return self._settle(fx, now)

    def _settle(
        self, fx: EffectsBuilder, now: float, *, queued: tuple[TicketId, int] | None = None
    ) -> Effects:
        """End of every mutator: work conservation, hopelessness, the next wake-up. A job
        queued by this event reports its place if it is still waiting."""
        dispatched = len(fx.dispatches)
        self._drain(fx, now)
        if len(self.queue) and self._hopeless(now):
            self._reject_all(fx, RejectReason.NO_BACKENDS)
        if queued is not None and queued[0] in self.queue:
            ticket, position = queued
            if len(fx.dispatches) != dispatched:  # jobs ahead left: ask the queue
                position = self.queue.position(ticket) or position
            fx.queued.append(Queued(ticket=ticket, position=position))
        return fx.build(self._wake_at(now))

    def _drain(self, fx: EffectsBuilder, now: float) -> None:
        """Bind queued jobs to free pods, one pair at a time as the placement matches
        them, until no free pod or no job it would pair is left."""
        while len(self.queue) and (free := self._free(now)):
            pair = self.placement.match(self.queue, free, now, self.tenants.can_run)
            if pair is None:
                return
            job, pod = pair
            self._dequeue(job.ticket, serve=True)
            fx.dispatches.append(self._bind(job, pod, now))

    def _wake_at(self, now: float) -> float | None:
        if not len(self.queue):
            return None
        times = [self.queue.next_deadline(), self.health.next_change(self.book.pods.values(), now)]
        return min((t for t in times if t is not None), default=None)

    def _hopeless(self, now: float) -> bool:
        if self.config.hold_when_empty:
            return False
        return not self.health.capacity_coming(self.book.pods.values(), now)

    def _reject_all(self, fx: EffectsBuilder, reason: RejectReason) -> None:
        for job in list(self.queue):
            self._dequeue(job.ticket)
            fx.rejects.append(Reject(ticket=job.ticket, reason=reason))

    def _set_state(self, fx: EffectsBuilder, pod: Pod, state: PodState) -> None:
        transition = self.book.set_state(pod, state)
        if transition is not None:
            fx.transitions.append(transition)

    def _forget_if_gone(self, fx: EffectsBuilder, pod: Pod) -> None:
        transition = self.book.forget_if_gone(pod)
        if transition is not None:
            fx.transitions.append(transition)

    def _apply_endpoint(self, fx: EffectsBuilder, ep: Endpoint, now: float) -> None:
        pod = self.book.pods.get(ep.pod_id)
        if pod is None:
            pod, appeared = self.book.add_pod(ep.pod_id, ep.url, now)
            self.eta.forget(ep.pod_id)
            fx.transitions.append(appeared)
        pod.url = ep.url
        pod.weight = ep.weight
        pod.listed = True
        self._set_state(fx, pod, target_state(pod.state, ep, warmup=self.config.warmup))
