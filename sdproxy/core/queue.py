"""Core: the shared queue of heavy jobs waiting for a slot — the ORDER policy.

``Queue`` is the interface the admission core uses, and the one place that decides in
which order jobs are served: ``next_for(accepts)`` is "the next job, in service order,
that this placement accepts" (not only the head, so a scheduler that matches jobs to
pods — checkpoint affinity, tenants — plugs in here without touching admission),
``expired`` drops every job whose own deadline passed wherever it stands, ``requeue``
puts a job whose pod refused the connection ahead of the others, and ``position`` is the
job's place in service order.

``FifoQueue`` (``--policy fifo``): first in, first out. Removal (client gone, interrupt,
timeout) is O(1): entries leave the index at once and are skipped lazily in the deque and
the deadline heap, both compacted when dead entries dominate, so memory stays proportional
to live jobs.

``FairQueue`` (``--policy fair``, the default): strict priority classes (``Job.priority``,
higher first), and within a class a weighted fair share of GPU work between tenants —
start-time fair queueing, the virtual-time idea VTC applies to LLM tokens (Sheng et al.,
"Fairness in Serving Large Language Models", OSDI '24; docs/prior-art.md): each tenant has
a finish tag that grows by a job's cost / its weight; a new job starts at
``max(virtual time, its tenant's finish tag)``, the queue serves the smallest start tag
and the virtual time follows the tags served. So a tenant alone gets everything
(work-conserving), an idle tenant banks no credit, and a tenant that floods 500 jobs
queues them behind its own tags, not ahead of everyone else's next job. ``charge``
corrects a tenant's tag by what a job really cost once it ran (GPU-seconds, switches
included), so the share is in served GPU time, not in estimates. Within a tenant: FIFO.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping
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
    #: priority class (``Priority``: higher first; strict between classes); FIFO ignores it
    priority: int = 1
    #: whose job it is (fair share and per-tenant limits); "" is the anonymous tenant
    tenant: str = ""
    #: ``override_settings_restore_afterwards`` (sd-webui's default: true): the pod goes
    #: back to its default checkpoint after the job; False: the job's checkpoint stays
    restore: bool = True
    #: the caller's own deadline (``X-Sdproxy-Deadline-S``), seconds after ``enqueued_at``
    deadline_s: float | None = None


class Priority:
    """The ``X-Sdproxy-Priority`` classes as ``Job.priority`` values."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    BY_NAME: Mapping[str, int] = {"low": LOW, "normal": NORMAL, "high": HIGH}
    NAMES: Mapping[int, str] = {v: k for k, v in BY_NAME.items()}


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

    def take(self, ticket: TicketId) -> Job | None:
        """Take a job out to serve it (``remove``, and the policy's clock moves on)."""
        ...

    def charge(self, job: Job, units: float) -> None:
        """``job`` ran and really cost ``units`` (its estimate was ``job.cost``)."""
        ...

    def depth_by_priority(self) -> Mapping[int, int]:
        """Queued jobs per priority class (O(1): read by every status scrape)."""
        ...


@dataclass(frozen=True, slots=True)
class _Entry:
    """One placement of a job in line (a requeued job gets a new one, so a stale entry
    of the same job is never mistaken for the live one)."""

    job: Job


class _Depths:
    """Queued jobs per priority class, kept as jobs come and go."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def add(self, priority: int, delta: int) -> None:
        count = self.counts.get(priority, 0) + delta
        if count:
            self.counts[priority] = count
        else:
            self.counts.pop(priority, None)


class _Deadlines:
    """Each queued job's deadline, the earliest first: a heap with lazy deletion (a
    removed or re-dated ticket's old entry is skipped, and the heap rebuilt when most of
    it is dead). Both queue policies keep theirs here."""

    def __init__(self) -> None:
        self._deadline: dict[TicketId, float] = {}
        self._heap: list[tuple[float, TicketId]] = []

    def add(self, ticket: TicketId, deadline: float) -> None:
        self._deadline[ticket] = deadline
        heapq.heappush(self._heap, (deadline, ticket))

    def discard(self, ticket: TicketId) -> None:
        self._deadline.pop(ticket, None)
        if len(self._heap) > 2 * len(self._deadline) + 64:
            self._heap = [(d, t) for d, t in self._heap if self._deadline.get(t) == d]
            heapq.heapify(self._heap)

    def first(self) -> tuple[float, TicketId] | None:
        """The earliest live (deadline, ticket)."""
        while self._heap:
            deadline, ticket = self._heap[0]
            if self._deadline.get(ticket) == deadline:
                return deadline, ticket
            heapq.heappop(self._heap)
        return None

    def due(self, now: float) -> list[TicketId]:
        """The tickets whose deadline is at or before ``now`` (forgotten here)."""
        out: list[TicketId] = []
        while (head := self.first()) is not None and head[0] <= now:
            heapq.heappop(self._heap)
            del self._deadline[head[1]]
            out.append(head[1])
        return out


class FifoQueue:
    """First in, first out, with O(1) removal of any job."""

    def __init__(self) -> None:
        self._order: deque[_Entry] = deque()
        self._live: dict[TicketId, _Entry] = {}
        self._deadlines = _Deadlines()
        self._depths = _Depths()

    def __len__(self) -> int:
        return len(self._live)

    def depth_by_priority(self) -> Mapping[int, int]:
        return self._depths.counts

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
        self._depths.add(job.priority, 1)
        self._deadlines.add(job.ticket, deadline)
        return entry

    def take(self, ticket: TicketId) -> Job | None:
        return self.remove(ticket)

    def charge(self, job: Job, units: float) -> None:
        """FIFO keeps no account."""

    def remove(self, ticket: TicketId) -> Job | None:
        entry = self._live.pop(ticket, None)
        if entry is not None:
            self._depths.add(entry.job.priority, -1)
        self._deadlines.discard(ticket)
        if len(self._order) > 2 * len(self._live) + 64:
            self._order = deque(e for e in self._order if self._alive(e))
        return None if entry is None else entry.job

    def _skip_dead(self) -> None:
        while self._order and not self._alive(self._order[0]):
            self._order.popleft()

    def next_for(self, accepts: Callable[[Job], bool]) -> Job | None:
        self._skip_dead()
        return next((job for job in self if accepts(job)), None)

    def expired(self, now: float) -> list[Job]:
        return [job for t in self._deadlines.due(now) if (job := self.remove(t)) is not None]

    def next_deadline(self) -> float | None:
        head = self._deadlines.first()
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


#: a requeued job's start tag: ahead of every other job of its class
AHEAD = -math.inf


class FairQueue:
    """Strict priority classes; weighted fair share of GPU work between tenants within a
    class (start-time fair queueing); FIFO within a tenant. Every operation is O(log n)
    plus a list shift (``bisect.insort``: a memmove, fast at the queue's size bound)."""

    def __init__(self, *, weights: Mapping[str, float] | None = None) -> None:
        self._weights = dict(weights or {})
        #: service order: (-priority, start tag, sequence) -> the job
        self._order: list[tuple[int, float, int]] = []
        self._jobs: dict[tuple[int, float, int], Job] = {}
        self._key: dict[TicketId, tuple[int, float, int]] = {}
        self._deadlines = _Deadlines()
        #: (enqueued_at, sequence, ticket): the oldest job in O(log n), dead ones skipped
        self._ages: list[tuple[float, int, TicketId]] = []
        self._depths = _Depths()
        self._seq = itertools.count()
        #: the system's virtual time: the largest start tag served so far
        self.virtual = 0.0
        #: each tenant's finish tag (the tag its next job starts at, at the earliest)
        self.finish: dict[str, float] = {}
        #: each tenant's latest start tag: a correction never puts its next job before
        #: one it already has in line (FIFO within a tenant)
        self._last_start: dict[str, float] = {}

    def weight(self, tenant: str) -> float:
        return self._weights.get(tenant, 1.0)

    def __len__(self) -> int:
        return len(self._key)

    def __contains__(self, ticket: TicketId) -> bool:
        return ticket in self._key

    def __iter__(self) -> Iterator[Job]:
        return (self._jobs[key] for key in self._order)  # no change while iterating

    def push(self, job: Job, *, deadline: float) -> int:
        start = max(self.virtual, self.finish.get(job.tenant, 0.0))
        self.finish[job.tenant] = start + job.cost / self.weight(job.tenant)
        self._last_start[job.tenant] = start
        return self._insert(job, start, deadline)

    def requeue(self, job: Job, *, deadline: float) -> int:
        return self._insert(job, AHEAD, deadline)

    def _insert(self, job: Job, start: float, deadline: float) -> int:
        if job.ticket in self._key:
            raise ValueError(f"ticket {job.ticket} is queued already")
        key = (-job.priority, start, next(self._seq))
        self._key[job.ticket] = key
        self._jobs[key] = job
        self._depths.add(job.priority, 1)
        bisect.insort(self._order, key)
        heapq.heappush(self._ages, (job.enqueued_at, key[2], job.ticket))
        self._deadlines.add(job.ticket, deadline)
        return bisect.bisect_left(self._order, key) + 1

    def remove(self, ticket: TicketId) -> Job | None:
        key = self._key.pop(ticket, None)
        if key is None:
            return None
        del self._order[bisect.bisect_left(self._order, key)]
        self._depths.add(-key[0], -1)
        self._deadlines.discard(ticket)
        if len(self._ages) > 2 * len(self._key) + 64:
            self._ages = [a for a in self._ages if self._age_alive(a)]
            heapq.heapify(self._ages)
        return self._jobs.pop(key)

    def _age_alive(self, age: tuple[float, int, TicketId]) -> bool:
        key = self._key.get(age[2])
        return key is not None and key[2] == age[1]

    def take(self, ticket: TicketId) -> Job | None:
        key = self._key.get(ticket)
        if key is not None and key[1] > self.virtual:
            self.virtual = key[1]
        return self.remove(ticket)

    def charge(self, job: Job, units: float) -> None:
        """The job's tenant pays what the job really cost (0 for one that left without
        running): its finish tag moves by the difference — never below the virtual time
        (an overestimate banks no credit) nor below its latest job's start tag."""
        if job.tenant in self.finish:
            moved = self.finish[job.tenant] + (units - job.cost) / self.weight(job.tenant)
            floor = max(self.virtual, self._last_start.get(job.tenant, 0.0))
            self.finish[job.tenant] = max(moved, floor)

    def next_for(self, accepts: Callable[[Job], bool]) -> Job | None:
        return next((job for job in self if accepts(job)), None)

    def expired(self, now: float) -> list[Job]:
        return [job for t in self._deadlines.due(now) if (job := self.remove(t)) is not None]

    def next_deadline(self) -> float | None:
        head = self._deadlines.first()
        return None if head is None else head[0]

    def oldest(self) -> Job | None:
        """The job that entered first (not the head: fair order is not arrival order)."""
        while self._ages and not self._age_alive(self._ages[0]):
            heapq.heappop(self._ages)
        if not self._ages:
            return None
        return self._jobs[self._key[self._ages[0][2]]]

    def position(self, ticket: TicketId) -> int | None:
        key = self._key.get(ticket)
        return None if key is None else bisect.bisect_left(self._order, key) + 1

    def depth_by_priority(self) -> Mapping[int, int]:
        return self._depths.counts
