"""Core: the shared queue of heavy jobs waiting for a slot (pure data structure).

One FIFO today, behind a small interface (push, push_front, pop, remove, position) so that
priority bands and per-tenant fairness in GPU-seconds can replace it without touching the
admission logic. Removal (client gone, interrupt, timeout) is O(1): entries are deleted
from the index and skipped lazily when they reach the head; the deque is compacted when
dead entries dominate, so memory stays proportional to live jobs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NewType

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


class FifoQueue:
    """First in, first out, with O(1) removal of any job."""

    def __init__(self) -> None:
        self._order: deque[Job] = deque()
        self._live: dict[TicketId, Job] = {}

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, ticket: TicketId) -> bool:
        return ticket in self._live

    def push(self, job: Job) -> None:
        self._live[job.ticket] = job
        self._order.append(job)

    def push_front(self, job: Job) -> None:
        """Put a job back at the head (its pod refused the connection: not its fault)."""
        self._live[job.ticket] = job
        self._order.appendleft(job)

    def _skip_dead(self) -> None:
        while self._order and self._live.get(self._order[0].ticket) is not self._order[0]:
            self._order.popleft()

    def peek(self) -> Job | None:
        self._skip_dead()
        return self._order[0] if self._order else None

    def pop(self) -> Job | None:
        job = self.peek()
        if job is not None:
            self._order.popleft()
            del self._live[job.ticket]
        return job

    def remove(self, ticket: TicketId) -> Job | None:
        job = self._live.pop(ticket, None)
        if len(self._order) > 2 * len(self._live) + 64:
            self._order = deque(j for j in self._order if self._live.get(j.ticket) is j)
        return job

    def __iter__(self) -> Iterator[Job]:
        return (j for j in self._order if self._live.get(j.ticket) is j)

    def position(self, ticket: TicketId) -> int | None:
        """1-based place in line (O(n): only asked for by a queued caller's progress poll)."""
        if ticket not in self._live:
            return None
        for index, job in enumerate(self, start=1):
            if job.ticket == ticket:
                return index
        return None
