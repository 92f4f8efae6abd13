"""Runtime: the gate owns the admission core on the event loop and applies its Effects.

Every event reaches the core through here, at ``self.now()`` (the one place the loop's
clock is read for admission), and every ``Effects`` the core answers is applied in one
place, ``_apply``: dispatches resolve the futures of waiting requests (a dispatch whose
waiter vanished gives its slot straight back), rejects fail them with the client error
from ``sdproxy.errors.for_reject`` and are counted, transitions go to the composition
root, and ``wake_at`` arms the ticker, which sleeps until the core next needs time to
pass instead of polling.

A request that got a pod holds a ``Slot``: the one object that frees it, exactly once,
with an ``Outcome`` (or, when the pod refused the connection, trades it for another).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import Callable, Iterable, Sequence

from sdproxy import errors
from sdproxy.core.admission import Admission, Job, Pod, TicketId
from sdproxy.core.effects import Dispatch, Effects, Outcome, RejectReason, Transition
from sdproxy.core.pods import Endpoint, PodId
from sdproxy.core.queueing import ServiceStats

#: never sleep less than this between ticks (the clock may lag the timer a little)
MIN_SLEEP_S = 0.001
#: queue waits kept for the autoscaler between two of its ticks (beyond: the oldest go)
WAITS_KEPT = 10_000


class Slot:
    """A pod slot bound to one request. ``release`` frees it once; later calls are
    no-ops, so every exit path of a request may call it."""

    __slots__ = ("_gate", "bound_at", "dispatch", "released")

    def __init__(self, gate: Gate, dispatch: Dispatch) -> None:
        self._gate = gate
        self.dispatch = dispatch
        self.released = False
        self.bound_at = gate.now()

    @property
    def ticket(self) -> TicketId:
        return self.dispatch.ticket

    @property
    def pod_id(self) -> PodId:
        return self.dispatch.pod_id

    @property
    def url(self) -> str:
        return self.dispatch.url

    def release(self, outcome: Outcome) -> None:
        if not self.released:
            self.released = True
            now = self._gate.now()
            if outcome is Outcome.COMPLETED:
                self._gate.service = self._gate.service.observe(now - self.bound_at)
            self._gate.apply(self._gate.admission.release(self.ticket, outcome, now))

    async def refused(self) -> Slot:
        """The pod refused the connection (nothing was sent): wait for another pod."""
        return await self._rebind(Outcome.REFUSED)

    async def busy(self) -> Slot:
        """The pod's gate answered pod_busy (nothing was sent): wait for a slot again,
        ahead of the queue."""
        return await self._rebind(Outcome.BUSY)

    async def _rebind(self, outcome: Outcome) -> Slot:
        if self.released:
            raise errors.StateError(f"ticket {self.ticket}: slot already released")
        self.released = True
        gate = self._gate
        return await gate.wait_for(
            self.ticket, lambda: gate.admission.release(self.ticket, outcome, gate.now())
        )


class Gate:
    """Owns the Admission core for the event loop."""

    def __init__(
        self,
        admission: Admission,
        *,
        clock: Callable[[], float],
        on_reject: Callable[[RejectReason], None] = lambda _r: None,
        on_transitions: Callable[[Sequence[Transition]], None] = lambda _t: None,
        check_invariants: bool = False,
    ) -> None:
        self.admission = admission
        self.now = clock
        self._tickets = itertools.count(1)
        self._waiters: dict[TicketId, asyncio.Future[Dispatch]] = {}
        self._on_reject = on_reject
        self._on_transitions = on_transitions
        self._check = check_invariants
        self._wake_at: float | None = None
        self._armed: float | None = None
        self._rearm = asyncio.Event()
        self._change: asyncio.Future[None] | None = None
        #: heavy requests that asked for a slot (the autoscaler's arrival counter) and
        #: the service times of completed ones (its queueing model, --wait-target-s)
        self.arrivals = 0
        self.service = ServiceStats()
        #: queue waits of the requests bound since the autoscaler last took them
        self._waits: collections.deque[float] = collections.deque(maxlen=WAITS_KEPT)

    def take_waits(self) -> tuple[float, ...]:
        """The queue waits (seconds) of the heavy requests bound to a slot since the
        previous call (the --wait-target-s outer loop measures them), oldest first."""
        waits = tuple(self._waits)
        self._waits.clear()
        return waits

    def new_ticket(self) -> TicketId:
        return TicketId(next(self._tickets))

    # ---- heavy requests ---------------------------------------------------------------

    async def acquire(self, job: Job) -> Slot:
        """Wait for a slot. Raises the client-facing error if rejected; if the caller is
        cancelled (client gone) the job leaves the queue and never reaches a pod."""
        self.arrivals += 1
        return await self.wait_for(job.ticket, lambda: self.admission.submit(job, self.now()))

    def enqueue(self, job: Job) -> tuple[asyncio.Future[Dispatch], int | None]:
        """Submit ``job`` now, without waiting (an asynchronous job: its rejection is
        known at once, ``fut.done()``); then ``await slot_of(job.ticket, fut)``. Also
        returns the job's queue position as the core answered it (None: not queued)."""
        position: list[int] = []

        def submit() -> Effects:
            effects = self.admission.submit(job, self.now())
            position.extend(q.position for q in effects.queued if q.ticket == job.ticket)
            return effects

        fut = self._register(job.ticket, submit)
        return fut, position[0] if position else None

    async def wait_for(self, ticket: TicketId, event: Callable[[], Effects]) -> Slot:
        """Register ``ticket``'s waiter, apply ``event``, and wait for its dispatch."""
        return await self.slot_of(ticket, self._register(ticket, event))

    def _register(self, ticket: TicketId, event: Callable[[], Effects]) -> asyncio.Future[Dispatch]:
        fut: asyncio.Future[Dispatch] = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = fut
        self.apply(event())
        return fut

    async def slot_of(self, ticket: TicketId, fut: asyncio.Future[Dispatch]) -> Slot:
        """Wait for ``ticket``'s dispatch (``fut``); a cancelled wait gives it up."""
        try:
            return Slot(self, await fut)
        except asyncio.CancelledError:
            self._waiters.pop(ticket, None)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # bound as the caller left: give the slot back, unused
                self._on_reject(RejectReason.CLIENT_GONE)
                self.apply(self.admission.release(ticket, Outcome.UNUSED, self.now()))
            elif self.admission.is_queued(ticket):
                self.apply(self.admission.cancel(ticket, RejectReason.CLIENT_GONE, self.now()))
            raise

    def cancel_queued(self, ticket: TicketId) -> bool:
        """Interrupt a queued job: its waiting request gets 409 job_cancelled."""
        if not self.admission.is_queued(ticket):
            return False
        self.apply(self.admission.cancel(ticket, RejectReason.CANCELLED, self.now()))
        return True

    # ---- pods and time ----------------------------------------------------------------

    def reconcile(self, endpoints: Sequence[Endpoint]) -> None:
        self.apply(self.admission.reconcile(endpoints, self.now()))

    def mark_warm(self, pod_id: PodId) -> None:
        self.apply(self.admission.mark_warm(pod_id, self.now()))

    def eject(self, pod_id: PodId) -> None:
        self.apply(self.admission.eject(pod_id, self.now()))

    def hold_for_ui(self, pod_ids: Iterable[PodId]) -> None:
        self.apply(self.admission.hold_for_ui(pod_ids, self.now()))

    def cordon(self, pod_ids: Iterable[PodId], *, for_s: float) -> list[PodId]:
        effects = self.admission.cordon(pod_ids, self.now(), for_s=for_s)
        self.apply(effects)
        return list(effects.cordoned)

    def observe_gate(
        self,
        pod_id: PodId,
        *,
        foreign: int,
        limit: int,
        checkpoint: str | None,
        healthy: bool = True,
    ) -> None:
        self.apply(
            self.admission.observe_gate(
                pod_id,
                foreign=foreign,
                limit=limit,
                checkpoint=checkpoint,
                healthy=healthy,
                now=self.now(),
            )
        )

    def observe_catalog(
        self, pod_id: PodId, *, catalog: Iterable[str], loaded: str | None, asked_at: float
    ) -> None:
        self.apply(
            self.admission.observe_catalog(
                pod_id, catalog=catalog, loaded=loaded, asked_at=asked_at, now=self.now()
            )
        )

    def health_checked(self, pod_id: PodId, ok: bool) -> None:
        self.apply(self.admission.health_checked(pod_id, ok, self.now()))

    def gate_lost(self, pod_id: PodId) -> None:
        self.apply(self.admission.gate_lost(pod_id, self.now()))

    def gate_absent(self, pod_id: PodId) -> None:
        self.apply(self.admission.gate_absent(pod_id, self.now()))

    def pick_light(self, *, exclude: Sequence[PodId] = ()) -> Pod | None:
        return self.admission.pick_light(self.now(), exclude=exclude)

    def tick(self) -> None:
        self.apply(self.admission.tick(self.now()))

    def close(self) -> None:
        """SIGTERM: refuse new jobs, keep serving the queued ones."""
        self.apply(self.admission.close(self.now()))

    def shutdown(self) -> None:
        """The drain time is over: answer whatever still waits shutting_down."""
        self.apply(self.admission.shutdown(self.now()))

    # ---- the one place Effects are applied ---------------------------------------------

    def apply(self, effects: Effects) -> None:
        # in creation order, so the newest wake_at is applied last
        work = collections.deque([effects])
        while work:
            fx = work.popleft()
            for d in fx.dispatches:
                fut = self._waiters.pop(d.ticket, None)
                if fut is None or fut.done():  # waiter vanished: never leak the slot
                    work.append(self.admission.release(d.ticket, Outcome.UNUSED, self.now()))
                else:
                    self._waits.append(max(0.0, d.queued_s))
                    fut.set_result(d)
            for r in fx.rejects:
                self._on_reject(r.reason)
                fut = self._waiters.pop(r.ticket, None)
                if fut is not None and not fut.done():
                    fut.set_exception(errors.for_reject(r.reason, r.eta_s))
            if fx.transitions:
                self._on_transitions(fx.transitions)
            self._set_wake(fx.wake_at)
        if self._check:
            self.admission.check(self.now())
        change, self._change = self._change, None
        if change is not None and not change.done():
            change.set_result(None)

    async def until(self, done: Callable[[Admission], bool], *, timeout_s: float) -> bool:
        """Wait (without polling) until ``done(admission)`` holds after some event, or
        ``timeout_s`` passes; returns whether it holds."""
        deadline = self.now() + timeout_s
        while not done(self.admission):
            remaining = deadline - self.now()
            if remaining <= 0:
                return False
            if self._change is None:
                self._change = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._change), remaining)
        return True

    def _set_wake(self, wake_at: float | None) -> None:
        self._wake_at = wake_at
        if wake_at is not None and (self._armed is None or wake_at < self._armed):
            self._rearm.set()

    async def run_ticker(self) -> None:
        """Tick when the core asked to (``wake_at``), forever."""
        while True:
            self._rearm.clear()
            self._armed = self._wake_at
            delay = None if self._armed is None else max(MIN_SLEEP_S, self._armed - self.now())
            try:
                await asyncio.wait_for(self._rearm.wait(), delay)
            except TimeoutError:
                self._armed = None
                self.tick()
