"""Core: the one vocabulary the admission core answers in — ``Effects``.

Every mutator of ``sdproxy.core.admission.Admission`` returns an ``Effects``: the jobs
bound to pods (``Dispatch``), the jobs that now wait (``Queued``), the jobs refused or
removed (``Reject``), the pod state changes (``Transition``), the pods cordoned for
scale-in, and ``wake_at`` — the earliest moment the core needs ``tick`` again (a queue
deadline, an ejection or cordon ending) or None. The runtime applies an ``Effects`` in one
place (``sdproxy.runtime.gate.Gate``) and sleeps until ``wake_at`` instead of polling.

``Outcome`` says how a dispatched job's exchange with its pod ended; it is the one input
of ``Admission.release`` (who frees a slot, and what that means, is decided there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from sdproxy.core.pods import PodId, PodState
from sdproxy.core.queue import TicketId


class RejectReason(StrEnum):
    """Why a job did not (or will no longer) reach a pod. Values are the client error
    codes (``sdproxy.errors.for_reject``) and the ``reason`` label of the metrics."""

    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    NO_BACKENDS = "no_backends"
    CANCELLED = "job_cancelled"
    SHUTTING_DOWN = "shutting_down"
    #: the caller left while its job waited (nobody to answer)
    CLIENT_GONE = "client_gone"
    #: the job's tenant has its ``max_queued`` jobs waiting
    CLIENT_QUOTA = "client_quota"
    #: the job's own deadline (X-Sdproxy-Deadline-S) is before its ETA (``Reject.eta_s``)
    DEADLINE_UNMEETABLE = "deadline_unmeetable"


class Outcome(StrEnum):
    """How a dispatched job's exchange with its pod ended."""

    #: the pod sent its whole answer (a success, or an error the pod had no part in
    #: but that is not the request's fault either: 4xx other than 422): a completion and
    #: an ETA sample
    COMPLETED = "completed"
    #: the pod answered the request's own fault (CUDA out of memory for its size, a 422
    #: for its fields): the pod keeps its place; no ETA sample, no failure counted
    REQUEST_FAULT = "request_fault"
    #: the pod answered a 5xx that is not the request's fault: a failure in a row; after
    #: ``--outlier-failures`` of them the pod is ejected (outlier ejection, back-off)
    POD_ERROR = "pod_error"
    #: the pod broke the exchange after receiving it: an error, and a short ejection
    FAILED = "failed"
    #: the client left; the pod was interrupted and its answer drained: neither
    INTERRUPTED = "interrupted"
    #: the slot is given back with no work behind it (the waiter vanished as it was
    #: bound, the client's body was refused): neither
    UNUSED = "unused"
    #: nothing reached the pod (connection refused): the pod is ejected and the job goes
    #: ahead of the queue for another pod (it already waited its turn)
    REFUSED = "refused"
    #: the pod's gate answered pod_busy (another replica won the slot): the job goes
    #: back ahead of the queue and the pod counts as full until its gate says otherwise;
    #: no ejection, the pod is healthy
    BUSY = "busy"


class InterruptReason(StrEnum):
    """Why a running generation was interrupted on its pod (metrics label)."""

    CLIENT_GONE = "client_gone"
    USER = "user"


@dataclass(frozen=True, kw_only=True)
class Dispatch:
    ticket: TicketId
    pod_id: PodId
    url: str
    #: seconds the job waited in the proxy
    queued_s: float
    #: estimated GPU-seconds of the job on that pod, checkpoint loads included (an
    #: estimate, not part of the decision: dispatches compare without it)
    cost_s: float = field(default=0.0, compare=False)


@dataclass(frozen=True, kw_only=True)
class Queued:
    ticket: TicketId
    #: 1-based place in the shared queue
    position: int


@dataclass(frozen=True, kw_only=True)
class Reject:
    ticket: TicketId
    reason: RejectReason
    #: DEADLINE_UNMEETABLE: the job's ETA when it was refused
    eta_s: float | None = field(default=None, compare=False)


class Transition(NamedTuple):
    """A pod changed state; ``old`` None: it appeared; ``new`` None: it is gone."""

    pod_id: PodId
    old: PodState | None
    new: PodState | None


@dataclass(frozen=True, kw_only=True)
class Effects:
    dispatches: tuple[Dispatch, ...] = ()
    queued: tuple[Queued, ...] = ()
    rejects: tuple[Reject, ...] = ()
    transitions: tuple[Transition, ...] = ()
    cordoned: tuple[PodId, ...] = ()
    #: when the core next needs a ``tick`` (None: only events can change anything)
    wake_at: float | None = None


@dataclass(kw_only=True)
class EffectsBuilder:
    """Collects what one mutator did; ``build`` freezes it."""

    dispatches: list[Dispatch] = field(default_factory=list)
    queued: list[Queued] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    cordoned: list[PodId] = field(default_factory=list)

    def build(self, wake_at: float | None) -> Effects:
        return Effects(
            dispatches=tuple(self.dispatches),
            queued=tuple(self.queued),
            rejects=tuple(self.rejects),
            transitions=tuple(self.transitions),
            cordoned=tuple(self.cordoned),
            wake_at=wake_at,
        )
