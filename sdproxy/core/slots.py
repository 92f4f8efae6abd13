"""Core: the slot book — which job runs on which pod, each pod's limit and lifecycle.

The one place a ticket is bound to or freed from a pod: ``bind`` and ``unbind`` keep the
ticket index and each pod's running set together, ``set_state`` changes a pod's state
only along ``sdproxy.core.pods.TRANSITIONS`` (anything else raises), and ``check``
verifies the invariants (tests call it after every event; ``--check-invariants`` makes
the runtime call it too):

- a pod never runs more than its limit (``len(pod.running) <= pod.limit``);
- the ticket index and the pods' running sets hold the same bindings;
- a pod no longer listed by discovery is kept only while it runs something.

The per-pod facts the policies read (ejection, cordon, counters, loaded checkpoint and
the checkpoints the pod lists) live on the one ``Pod`` record, so there is one truth per
pod.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sdproxy.core.effects import Transition
from sdproxy.core.pods import PodId, PodState, check_transition
from sdproxy.core.queue import Job, TicketId
from sdproxy.errors import StateError


@dataclass(frozen=True, kw_only=True)
class Running:
    ticket: TicketId
    pod_id: PodId
    url: str
    dispatched_at: float
    #: checkpoint loads the job was expected to cause there (sdproxy.core.cost.switches)
    switches: int = field(default=0, compare=False)
    #: its estimated GPU-seconds there (X-Sdproxy-Cost-S)
    cost_s: float = field(default=0.0, compare=False)
    #: the pod's checkpoint when it was bound (what it sampled with, if it names none)
    checkpoint: str | None = field(default=None, compare=False)


@dataclass(kw_only=True)
class Pod:
    pod_id: PodId
    url: str
    state: PodState
    limit: int
    #: bound tickets (written by SlotBook only)
    running: dict[TicketId, Running] = field(default_factory=dict)
    #: the pod's default checkpoint, loaded between jobs: the one it said it had loaded,
    #: or the last one a job left there (one sent without sd-webui's restore afterwards:
    #: with it, the pod goes back to its default); only ever one it lists (``catalog``)
    checkpoint: str | None = None
    #: relative speed (``#weight=2`` on a backend URL): the first guess of its rate
    weight: float = 1.0
    #: why it was last ejected: "ejected" (refused a connection, broke an exchange, failed
    #: a light call) or "outlier" (N failed generations in a row that were not the
    #: request's fault), shown by /-/status while it rests
    eject_reason: str = "ejected"
    #: generations in a row that failed for no reason of the request (outlier ejection)
    consecutive_failures: int = 0
    #: the checkpoint keys the pod lists (GET sd-models, read when it became ready); None
    #: until read: then any name counts (checkpoint keys are length-capped)
    catalog: frozenset[str] | None = None
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
    #: behind a pod-side gate (sdproxy gate) whose occupancy this replica follows
    gated: bool = False
    #: the gate's change stream is live (a gated pod we cannot see takes no work)
    gate_live: bool = False
    #: heavy requests the gate runs for other senders (other replicas, direct callers)
    foreign: int = 0
    #: the gate says its sd-webui answers (a pod whose sd-webui is down takes no work)
    gate_healthy: bool = True
    #: active health checks: out after ``fall`` failures in a row, back after ``rise``
    #: passes (sdproxy.core.health)
    checked_out: bool = False
    check_failures: int = 0
    check_passes: int = 0
    #: held by browser UI sessions (sdproxy.core.uisessions): its heavy slots are the
    #: UI's, so it takes no API jobs, and it is not scaled in, while they last
    ui_held: bool = False

    def cordoned(self, now: float) -> bool:
        return now < self.cordoned_until

    def lists(self, checkpoint: str) -> bool:
        """Whether ``checkpoint`` is one this pod has: a name it does not list (a typo, a
        client's garbage) is never recorded as its checkpoint — sd-webui generates with
        its default instead — so it keeps no state and sets no metric label."""
        return self.catalog is None or checkpoint in self.catalog

    def observe_catalog(
        self, catalog: frozenset[str], *, loaded: str | None, asked_at: float
    ) -> None:
        """The pod's own word, asked at ``asked_at``: what it lists and has ``loaded``
        (None: nothing yet). A job bound since then is newer news than the answer."""
        self.catalog = catalog
        if self.last_used <= asked_at:
            self.checkpoint = loaded if loaded is not None and self.lists(loaded) else None
        elif self.checkpoint is not None and not self.lists(self.checkpoint):
            self.checkpoint = None

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def out_reason(self, now: float) -> str | None:
        """Why a READY pod takes no new work right now (None: it does)."""
        if self.gated and not self.gate_live:
            return "gate_lost"
        if self.gated and not self.gate_healthy:
            return "pod_down"
        if self.checked_out:
            return "health_check"
        if self.ejected(now):
            return self.eject_reason
        if self.cordoned(now):
            return "cordoned"
        return None

    @property
    def has_slot(self) -> bool:
        """A slot is free counting what this replica runs AND what its gate reports for
        everyone else."""
        return len(self.running) + self.foreign < self.limit


@dataclass(frozen=True, kw_only=True)
class Freed:
    """What ``unbind`` hands back: the run, its job and its pod (if still known)."""

    run: Running
    job: Job
    pod: Pod | None


class SlotBook:
    """Pods, their limits and the ticket -> pod bindings."""

    def __init__(self, *, limit: int) -> None:
        self.limit = limit
        self._pods: dict[PodId, Pod] = {}
        self._bound: dict[TicketId, tuple[Running, Job]] = {}

    @property
    def pods(self) -> Mapping[PodId, Pod]:
        return self._pods

    @property
    def inflight(self) -> int:
        return len(self._bound)

    def running(self, ticket: TicketId) -> Running | None:
        bound = self._bound.get(ticket)
        return None if bound is None else bound[0]

    def running_jobs(self) -> list[Job]:
        return [job for _run, job in self._bound.values()]

    # ---- pods -------------------------------------------------------------------------

    def add_pod(self, pod_id: PodId, url: str, now: float) -> tuple[Pod, Transition]:
        if pod_id in self._pods:
            raise StateError(f"pod {pod_id} is already known")
        check_transition(pod_id, None, PodState.STARTING)
        pod = Pod(pod_id=pod_id, url=url, state=PodState.STARTING, limit=self.limit)
        pod.idle_since = now
        self._pods[pod_id] = pod
        return pod, Transition(pod_id, None, PodState.STARTING)

    def set_state(self, pod: Pod, state: PodState) -> Transition | None:
        """Move ``pod`` to ``state`` (None if it is there already)."""
        if pod.state is state:
            return None
        check_transition(pod.pod_id, pod.state, state)
        old, pod.state = pod.state, state
        return Transition(pod.pod_id, old, state)

    def forget_if_gone(self, pod: Pod) -> Transition | None:
        """Drop a pod that discovery no longer lists once it runs nothing."""
        if pod.listed or pod.running:
            return None
        check_transition(pod.pod_id, pod.state, None)
        del self._pods[pod.pod_id]
        return Transition(pod.pod_id, pod.state, None)

    # ---- bindings ---------------------------------------------------------------------

    def bind(
        self, job: Job, pod: Pod, now: float, *, switches: int = 0, cost_s: float = 0.0
    ) -> Running:
        if job.ticket in self._bound:
            raise StateError(f"ticket {job.ticket} is already running")
        if not pod.has_slot or self._pods.get(pod.pod_id) is not pod:
            raise StateError(f"pod {pod.pod_id} has no free slot for ticket {job.ticket}")
        run = Running(
            ticket=job.ticket,
            pod_id=pod.pod_id,
            url=pod.url,
            dispatched_at=now,
            switches=switches,
            cost_s=cost_s,
            checkpoint=pod.checkpoint,
        )
        pod.running[job.ticket] = run
        pod.last_used = now
        # with restore afterwards the pod goes back to its default: nothing changes
        if job.checkpoint is not None and not job.restore and pod.lists(job.checkpoint):
            pod.checkpoint = job.checkpoint
        self._bound[job.ticket] = (run, job)
        return run

    def unbind(self, ticket: TicketId) -> Freed:
        """Free a running ticket's slot; raises ``StateError`` if it does not run."""
        bound = self._bound.pop(ticket, None)
        if bound is None:
            raise StateError(f"ticket {ticket} is not running")
        run, job = bound
        pod = self._pods.get(run.pod_id)
        if pod is not None:
            del pod.running[ticket]
        return Freed(run=run, job=job, pod=pod)

    # ---- invariants -------------------------------------------------------------------

    def check(self) -> None:
        """Raise ``StateError`` if an invariant of the book does not hold."""
        on_pods: dict[TicketId, PodId] = {}
        for pod in self._pods.values():
            if len(pod.running) > pod.limit:
                raise StateError(f"{pod.pod_id} runs {len(pod.running)} > limit {pod.limit}")
            if not pod.listed and not pod.running:
                raise StateError(f"{pod.pod_id} is gone and idle but not forgotten")
            for ticket, run in pod.running.items():
                if run.pod_id != pod.pod_id:
                    raise StateError(f"ticket {ticket} filed under the wrong pod")
                on_pods[ticket] = pod.pod_id
        indexed = {t: run.pod_id for t, (run, _job) in self._bound.items()}
        if indexed != on_pods:
            raise StateError(f"ticket index {indexed} disagrees with the pods {on_pods}")
