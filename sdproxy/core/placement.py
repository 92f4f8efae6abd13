"""Core: placement — which queued job goes to which free pod (the PLACEMENT policy).

When slots are free the admission core asks ``match(queue, free, now, eligible)`` for one
(job, pod) pair at a time, until it answers None; a new job that finds the queue empty is
placed with ``choose(job, free)``. ``eligible`` filters jobs the placement may not take
now (a tenant at its ``max_running``). Both policies are work-conserving: while a free pod
and an eligible job exist, they pair them (``Admission.check`` holds them to it).

``AffinityPlacement`` (``--policy fifo``): the queue's first eligible job, to the free
pod that has its checkpoint loaded, then the least loaded (running / limit), then the most
recently used (packing work leaves other pods idle, so they can be scaled in).

``CheckpointPlacement`` (``--policy fair``, the default): a free pod takes, among the jobs
of the highest priority class waiting, the first in service order that it can run
WITHOUT a checkpoint switch — ahead of an older job that would force one — unless the
job whose turn it is (the head) has been passed over for ``max_skip_s``
(``--affinity-max-skip-s``) since it was first passed: then the head goes first,
wherever it costs least. A switch costs seconds of GPU time for nothing; waiting a little
costs the passed job less than that, and the bound keeps it from starving. The bound
counts from the first pass, not from arrival: in an overloaded queue every head has
waited longer than any bound by the time it is the head, and a bound on arrival age
would turn affinity off exactly when switches cost the most; this way affinity adds at
most ``max_skip_s`` to any job's wait once it is its turn.

Switches follow sd-webui (``sdproxy.core.cost.switches``): a job naming another
checkpoint costs two loads under restore-afterwards, one without, a job naming none runs
on the pod's default. The search looks at most ``LOOKAHEAD`` jobs past the head (in a
deep queue each dispatch costs a bounded scan, not one of every job). Among free pods the
choice is the least estimated GPU-seconds (learned rate per pod and checkpoint, switches
at the learned switch cost: ``sdproxy.core.eta``), then the least loaded, then the most
recently used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from sdproxy.core.cost import switches
from sdproxy.core.eta import SpeedModel
from sdproxy.core.queue import Job, Queue, TicketId
from sdproxy.core.slots import Pod

#: queued jobs a freed pod looks through for one it can run without a switch
LOOKAHEAD = 256


class Placement(Protocol):
    def choose(self, job: Job, free: Sequence[Pod]) -> Pod | None:
        """The pod for ``job`` among ``free`` (each usable, with a free slot), or None."""
        ...

    def match(
        self,
        queue: Queue,
        free: Sequence[Pod],
        now: float,
        eligible: Callable[[Job], bool],
        *,
        commit: bool = True,
    ) -> tuple[Job, Pod] | None:
        """The next (queued job, free pod) pair to dispatch, or None; ``commit`` False:
        only asked (invariant checks), the pair will not be dispatched."""
        ...


def pod_switches(job: Job, pod: Pod) -> int:
    """Checkpoint loads ``job`` causes on ``pod`` (a name the pod does not list is
    ignored by sd-webui: it generates with its default)."""
    wanted = job.checkpoint if job.checkpoint is None or pod.lists(job.checkpoint) else None
    return switches(wanted, restore=job.restore, loaded=pod.checkpoint)


def job_cost_s(speed: SpeedModel, job: Job, pod: Pod) -> tuple[float, int]:
    """(estimated GPU-seconds, checkpoint loads) of ``job`` on ``pod``."""
    loads = pod_switches(job, pod)
    rate = speed.rate(pod.pod_id, weight=pod.weight, checkpoint=job.checkpoint or pod.checkpoint)
    return speed.job_s(job.cost, rate=rate, switches=loads), loads


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

    def match(
        self,
        queue: Queue,
        free: Sequence[Pod],
        now: float,
        eligible: Callable[[Job], bool],
        *,
        commit: bool = True,
    ) -> tuple[Job, Pod] | None:
        job = queue.next_for(eligible) if free else None
        pod = self.choose(job, free) if job is not None else None
        return None if job is None or pod is None else (job, pod)


class CheckpointPlacement:
    """Switch-free jobs first within the top priority class, bounded by the head's age;
    the cheapest pod (estimated GPU-seconds) for each."""

    def __init__(self, speed: SpeedModel, *, max_skip_s: float) -> None:
        self.speed = speed
        self.max_skip_s = max_skip_s
        #: when each passed-over head was first passed (entries of jobs gone are pruned)
        self.passed: dict[TicketId, float] = {}

    def choose(self, job: Job, free: Sequence[Pod]) -> Pod | None:
        best: Pod | None = None
        best_key: tuple[float, float, float] | None = None
        for pod in free:
            cost_s, _loads = job_cost_s(self.speed, job, pod)
            key = (cost_s, len(pod.running) / pod.limit, -pod.last_used)
            if best_key is None or key < best_key:
                best, best_key = pod, key
        return best

    def match(
        self,
        queue: Queue,
        free: Sequence[Pod],
        now: float,
        eligible: Callable[[Job], bool],
        *,
        commit: bool = True,
    ) -> tuple[Job, Pod] | None:
        if not free:
            return None
        head: Job | None = None
        pair: tuple[Job, Pod] | None = None
        looked = 0
        for job in queue:
            if not eligible(job):
                continue
            looked += 1
            if looked > LOOKAHEAD + 1:
                break
            if head is None:
                head = job
                if now - self.passed.get(job.ticket, now) >= self.max_skip_s:
                    break  # passed over long enough (or a bound of 0): its turn now
            elif job.priority != head.priority:
                break  # strict between classes: affinity never jumps one
            fits = [pod for pod in free if pod_switches(job, pod) == 0]
            if fits:
                pair = job, self._cheapest(job, fits)
                break
        if head is None:
            return None
        if pair is None:
            pair = head, self._cheapest(head, free)
        if commit:
            self._note(pair[0], head, now, queue)
        return pair

    def _note(self, chosen: Job, head: Job, now: float, queue: Queue) -> None:
        """``chosen`` goes now: if it is not the head, the head was passed over."""
        self.passed.pop(chosen.ticket, None)
        if chosen.ticket != head.ticket:
            self.passed.setdefault(head.ticket, now)
        if len(self.passed) > 2 * len(queue) + 64:  # cancelled or expired heads: forget
            self.passed = {t: at for t, at in self.passed.items() if t in queue}

    def _cheapest(self, job: Job, pods: Sequence[Pod]) -> Pod:
        pod = self.choose(job, pods)
        assert pod is not None, "pods is not empty"
        return pod
