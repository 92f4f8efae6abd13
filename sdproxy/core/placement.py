"""Core: placement — which free pod a heavy job goes to (the PLACEMENT policy).

``AffinityPlacement`` (today's rule): among the pods with a free slot, the one that has
the job's checkpoint loaded, then the least loaded (running / limit), then the most
recently used (packing work leaves other pods idle, so they can be scaled in). It never
holds a job back from a free pod: affinity only breaks ties between free pods.

A ``Placement`` may also decline a job (return None with free pods present) — a
scheduler that prefers to wait for the right checkpoint; the queue then offers the next
job in service order (``Queue.next_for``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sdproxy.core.queue import Job
from sdproxy.core.slots import Pod


class Placement(Protocol):
    def choose(self, job: Job, free: Sequence[Pod]) -> Pod | None:
        """The pod for ``job`` among ``free`` (each usable, with a free slot), or None."""
        ...


class AffinityPlacement:
    """Checkpoint affinity, then least loaded, then most recently used."""

    def choose(self, job: Job, free: Sequence[Pod]) -> Pod | None:
        best: Pod | None = None
        best_key: tuple[bool, float, float] | None = None
        for pod in free:
            affinity = job.checkpoint is not None and pod.checkpoint == job.checkpoint
            key = (not affinity, len(pod.running) / pod.limit, -pod.last_used)
            if best_key is None or key < best_key:
                best, best_key = pod, key
        return best
