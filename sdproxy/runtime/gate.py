"""Runtime: the gate turns the admission core's decisions into awaitables.

Each queued heavy request waits on a future keyed by its ticket; whenever the core binds
queued tickets to pods (a release, a new pod, a tick) the gate resolves those futures.
The single place where the loop's monotonic clock is read for admission is ``self.now``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable, Sequence

from sdproxy import errors
from sdproxy.core.admission import (
    Admission,
    Dispatch,
    Job,
    Queued,
    Reject,
    RejectReason,
    TicketId,
)
from sdproxy.core.pods import Endpoint, PodId, PodState

_REJECT_ERRORS: dict[RejectReason, Callable[[], errors.ClientFacingError]] = {
    RejectReason.QUEUE_FULL: lambda: errors.QueueFull(
        "the proxy's queue is full; retry later", retry_after_s=5
    ),
    RejectReason.QUEUE_TIMEOUT: lambda: errors.QueueTimeout(
        "waited too long in the proxy's queue for a free pod"
    ),
    RejectReason.NO_BACKENDS: lambda: errors.NoBackends(
        "no ready sd-webui pod and none is starting", retry_after_s=10
    ),
    RejectReason.CANCELLED: lambda: errors.JobCancelled(
        "the job was interrupted while it waited in the queue"
    ),
    RejectReason.SHUTTING_DOWN: lambda: errors.ShuttingDown(
        "the proxy is shutting down", retry_after_s=1
    ),
}


def error_for(reason: RejectReason) -> errors.ClientFacingError:
    """The client-facing error for a core rejection."""
    return _REJECT_ERRORS[reason]()


Transitions = list[tuple[PodId, PodState | None, PodState | None]]


class Gate:
    """Owns the Admission core for the event loop."""

    def __init__(
        self,
        admission: Admission,
        *,
        clock: Callable[[], float],
        on_reject: Callable[[RejectReason], None] = lambda _r: None,
        on_transitions: Callable[[Transitions], None] = lambda _t: None,
    ) -> None:
        self.admission = admission
        self.now = clock
        self._tickets = itertools.count(1)
        self._waiters: dict[TicketId, asyncio.Future[Dispatch]] = {}
        self._on_reject = on_reject
        self._on_transitions = on_transitions

    def new_ticket(self) -> TicketId:
        return TicketId(next(self._tickets))

    async def acquire(self, job: Job) -> Dispatch:
        """Wait for a slot. Raises the client-facing error if rejected; if the caller is
        cancelled (client gone) the job leaves the queue and never reaches a pod."""
        decision = self.admission.submit(job, self.now())
        return await self._await(decision)

    async def retry(self, ticket: TicketId) -> Dispatch:
        """The bound pod refused the connection: get another pod (see Admission.retry)."""
        return await self._await(self.admission.retry(ticket, self.now()))

    async def _await(self, decision: Dispatch | Queued | Reject) -> Dispatch:
        if isinstance(decision, Dispatch):
            return decision
        if isinstance(decision, Reject):
            self._on_reject(decision.reason)
            raise error_for(decision.reason)
        fut: asyncio.Future[Dispatch] = asyncio.get_running_loop().create_future()
        self._waiters[decision.ticket] = fut
        try:
            return await fut
        except asyncio.CancelledError:
            self._waiters.pop(decision.ticket, None)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(decision.ticket, ran=False)  # bound as it left: give it back
            else:  # the caller left (client gone): counted by the caller, not as cancelled
                self.admission.cancel(decision.ticket)
            raise

    def release(self, ticket: TicketId, *, pod_failed: bool = False, ran: bool = True) -> None:
        """The job's response finished: free the slot and admit whoever is next."""
        released = self.admission.release(ticket, self.now(), pod_failed=pod_failed, ran=ran)
        self._resolve(released, [])

    def cancel_queued(self, ticket: TicketId) -> bool:
        """Interrupt a queued job: its waiting request gets 409 job_cancelled."""
        if not self.admission.cancel(ticket):
            return False
        self._fail(ticket, RejectReason.CANCELLED)
        return True

    def reconcile(self, endpoints: Sequence[Endpoint]) -> None:
        result = self.admission.reconcile(endpoints, self.now())
        self._on_transitions(result.transitions)
        self._resolve(result.dispatches, result.rejects)

    def mark_warm(self, pod_id: PodId) -> None:
        before = self.admission.pods.get(pod_id)
        old = before.state if before else None
        self._resolve(self.admission.mark_warm(pod_id, self.now()), [])
        after = self.admission.pods.get(pod_id)
        if after is not None and old is not after.state:
            self._on_transitions([(pod_id, old, after.state)])

    def tick(self) -> None:
        dispatches, rejects = self.admission.tick(self.now())
        self._resolve(dispatches, rejects)

    def shutdown(self) -> None:
        self._resolve([], self.admission.shutdown())

    def _resolve(self, dispatches: Iterable[Dispatch], rejects: Iterable[Reject]) -> None:
        pending = list(dispatches)
        while pending:
            d = pending.pop()
            fut = self._waiters.pop(d.ticket, None)
            if fut is None or fut.done():  # waiter vanished: never leak the slot
                pending.extend(self.admission.release(d.ticket, self.now(), ran=False))
                continue
            fut.set_result(d)
        for r in rejects:
            self._fail(r.ticket, r.reason)

    def _fail(self, ticket: TicketId, reason: RejectReason) -> None:
        self._on_reject(reason)
        fut = self._waiters.pop(ticket, None)
        if fut is not None and not fut.done():
            fut.set_exception(error_for(reason))

    async def run_ticker(self, interval_s: float = 0.25) -> None:
        """Expire queue timeouts and re-admit ejected pods, forever."""
        while True:
            await asyncio.sleep(interval_s)
            self.tick()
