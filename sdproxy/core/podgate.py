"""Core: the pod-side gate's admission — at most ``limit`` heavy requests on ONE pod,
whoever sends them (a sans-IO state machine; sdproxy.runtime.podgate does the I/O).

Each front replica keeps its own queue; the gate in front of each sd-webui pod is the single
authority on what that pod runs. ``claim`` takes a slot or answers None (the runtime then
answers ``503 pod_busy`` before any byte of the body reaches sd-webui, so the sender may
safely try another pod); ``release`` frees it when sd-webui's response has ended.
``occupancy`` is what the gate publishes (``GET /-/gate`` and its change stream): the
claims it runs — request id, sending replica, caller — and the loaded checkpoint, with a
``version`` that grows on every change so watchers can tell new from stale.

The slots are the same slot book the front replicas use (sdproxy.core.slots), with one pod.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdproxy.core.pods import PodId, PodState
from sdproxy.core.queue import Job, TicketId
from sdproxy.core.slots import SlotBook
from sdproxy.errors import StateError

SELF = PodId("self")


@dataclass(frozen=True, kw_only=True)
class Claim:
    """One heavy request the gate runs."""

    request_id: str
    #: the front replica that sent it (X-Sdproxy-Replica), None for a direct caller
    replica: str | None
    #: the caller identities the sender named (X-Sdproxy-Caller), for job-bound calls
    #: through another replica
    caller: str | None
    route: str
    started_at: float


@dataclass(frozen=True, kw_only=True)
class Occupancy:
    version: int
    inflight: int
    limit: int
    checkpoint: str | None
    claims: tuple[Claim, ...]


class PodGate:
    def __init__(self, *, limit: int) -> None:
        self._book = SlotBook(limit=limit)
        pod, _ = self._book.add_pod(SELF, "", 0.0)
        self._book.set_state(pod, PodState.READY)
        self._pod = pod
        self._claims: dict[TicketId, Claim] = {}
        self._next = 1
        self.version = 0

    @property
    def limit(self) -> int:
        return self._pod.limit

    @property
    def inflight(self) -> int:
        return self._book.inflight

    def claim(
        self, claim: Claim, *, checkpoint: str | None = None, restore: bool = True
    ) -> TicketId | None:
        """Take a slot for ``claim``; None when the pod runs its limit already."""
        if not self._pod.has_slot:
            return None
        ticket, self._next = TicketId(self._next), self._next + 1
        job = Job(
            ticket=ticket, enqueued_at=claim.started_at, checkpoint=checkpoint, restore=restore
        )
        self._book.bind(job, self._pod, claim.started_at)
        self._claims[ticket] = claim
        self.version += 1
        return ticket

    def release(self, ticket: TicketId) -> Claim:
        """sd-webui's response for ``ticket`` has ended: free its slot."""
        claim = self._claims.pop(ticket, None)
        if claim is None:
            raise StateError(f"gate ticket {ticket} is not running")
        self._book.unbind(ticket)
        self.version += 1
        return claim

    def occupancy(self) -> Occupancy:
        return Occupancy(
            version=self.version,
            inflight=self._book.inflight,
            limit=self._pod.limit,
            checkpoint=self._pod.checkpoint,
            claims=tuple(self._claims.values()),
        )

    def check(self) -> None:
        self._book.check()
        if set(self._claims) != set(self._pod.running):
            raise StateError("gate claims disagree with its slot book")
