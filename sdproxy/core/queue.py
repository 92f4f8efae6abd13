"""Core: the shared queue of heavy jobs waiting for a slot — the ORDER policy.

``Queue`` is the interface the admission core uses, and the one place that decides in
which order jobs are served: ``next_for(accepts)`` is "the next job, in service order,
that this placement accepts" (not only the head, so a scheduler that matches jobs to
pods — checkpoint affinity, tenants — plugs in here without touching admission),
``expired`` drops every job whose own deadline passed wherever it stands, ``requeue``
puts a job whose pod refused the connection ahead of the others, and ``position`` is the
job's place in service order.

``FifoQueue``: first in, first out. Removal (client gone, interrupt, timeout) is O(1):
entries leave the index at once and are skipped lazily in the deque and the deadline heap,
both compacted when dead entries dominate, so memory stays proportional to live jobs.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NewType, Protocol

TicketId = NewType("TicketId", int)


@dataclass(frozen=True, kw_only=True)
class Job:
    """A heavy request as the scheduler sees it."""

    ticket: TicketId
    #: when it entered the proxy (monotonic seconds)
    enqueued_at: float
    #: estimated GPU work in 512x512-step units (sdproxy.core.cost)
    cost: float = 1.0
    #: checkpoint the request needs, if it names one (for pod affinity)
    checkpoint: str | None = None
    #: reserved for priority bands (higher first); FIFO ignores it today
    priority: int = 0


class Queue(Protocol):
    """Waiting jobs in service order."""

    def __len__(self) -> int: ...

    def __contains__(self, ticket: TicketId) -> bool: ...

    def __iter__(self) -> Iterator[Job]:
        """Live jobs in service order."""
        ...

    def push(self, job: Job, *, deadline: float) -> int:
        """Add a new job that must leave by ``deadline``; returns its 1-based position."""
        ...

    def requeue(self, job: Job, *, deadline: float) -> int:
        """Put back a job whose pod refused it (not its fault); returns its position."""
        ...

    def remove(self, ticket: TicketId) -> Job | None:
        """Take a job out wherever it stands (None if it is not queued)."""
        ...

    def next_for(self, accepts: Callable[[Job], bool]) -> Job | None:
        """The first job in service order that ``accepts`` takes (left in the queue)."""
        ...

    def expired(self, now: float) -> list[Job]:
        """Remove and return every job whose deadline is at or before ``now``."""
        ...

    def next_deadline(self) -> float | None:
        """The earliest deadline of a queued job."""
        ...

    def oldest(self) -> Job | None:
        """The job that has waited longest."""
        ...

    def position(self, ticket: TicketId) -> int | None:
        """1-based place in service order (None if not queued)."""
        ...


@dataclass(frozen=True, slots=True)
class _Entry:
    """One placement of a job in line (a requeued job gets a new one, so a stale entry
    of the same job is never mistaken for the live one)."""

    job: Job


class FifoQueue:
    """First in, first out, with O(1) removal of any job."""

    def __init__(self) -> None:
        self._order: deque[_Entry] = deque()
        self._live: dict[TicketId, _Entry] = {}
        self._deadline: dict[TicketId, float] = {}
        self._heap: list[tuple[float, TicketId]] = []

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, ticket: TicketId) -> bool:
        return ticket in self._live

    def _alive(self, entry: _Entry) -> bool:
        return self._live.get(entry.job.ticket) is entry

    def __iter__(self) -> Iterator[Job]:
        return (e.job for e in self._order if self._alive(e))

    def push(self, job: Job, *, deadline: float) -> int:
        self._order.append(self._track(job, deadline))
        return len(self._live)

    def requeue(self, job: Job, *, deadline: float) -> int:
        self._order.appendleft(self._track(job, deadline))
        return 1

    def _track(self, job: Job, deadline: float) -> _Entry:
        if job.ticket in self._live:
            raise ValueError(f"ticket {job.ticket} is queued already")
        entry = _Entry(job)
        self._live[job.ticket] = entry
        self._deadline[job.ticket] = deadline
        heapq.heappush(self._heap, (deadline, job.ticket))
        return entry

    def remove(self, ticket: TicketId) -> Job | None:
        entry = self._live.pop(ticket, None)
        self._deadline.pop(ticket, None)
        if len(self._order) > 2 * len(self._live) + 64:
            self._order = deque(e for e in self._order if self._alive(e))
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [(d, t) for d, t in self._heap if self._deadline.get(t) == d]
            heapq.heapify(self._heap)
        return None if entry is None else entry.job

    def _skip_dead(self) -> None:
        while self._order and not self._alive(self._order[0]):
            self._order.popleft()

    def next_for(self, accepts: Callable[[Job], bool]) -> Job | None:
        self._skip_dead()
        return next((job for job in self if accepts(job)), None)

    def _live_deadline(self) -> tuple[float, TicketId] | None:
        while self._heap:
            deadline, ticket = self._heap[0]
            if self._deadline.get(ticket) == deadline:
                return deadline, ticket
            heapq.heappop(self._heap)
        return None

    def expired(self, now: float) -> list[Job]:
        out: list[Job] = []
        while (head := self._live_deadline()) is not None and head[0] <= now:
            heapq.heappop(self._heap)
            job = self.remove(head[1])
            if job is not None:
                out.append(job)
        return out

    def next_deadline(self) -> float | None:
        head = self._live_deadline()
        return None if head is None else head[0]

    def oldest(self) -> Job | None:
        # FIFO: the head has waited longest (a requeued job ran before anything queued)
        self._skip_dead()
        return self._order[0].job if self._order else None

    def position(self, ticket: TicketId) -> int | None:
        """O(n): only asked for by a queued caller's progress poll."""
        if ticket not in self._live:
            return None
        for index, job in enumerate(self, start=1):
            if job.ticket == ticket:
                return index
        return None
