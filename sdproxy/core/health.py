"""Core: pod health — when a pod is ejected, when it serves again, whether capacity comes.

The HEALTH policy, in one file:

- ``usable``: the one predicate for "may take new work": READY, not ejected, not
  cordoned, and — behind a pod-side gate — its gate in sight (a replica cut off from a
  gate stops sending to it). A pod with a free slot that is usable takes heavy work; any
  usable pod answers light calls.
- ``eject``: a pod that refused a connection or broke an exchange rests for
  ``eject_s``, doubled per repeat up to 32x; a completed generation resets the count.
- ``capacity_coming``: whether a waiting job can still expect a pod (a starting or
  warming pod, a ready one, or one refused only once — a blip), which decides between
  holding the queue and answering ``no_backends``.
- ``next_change``: the earliest moment an ejection or cordon ends (the core's wake-up).
"""

from __future__ import annotations

from collections.abc import Iterable

from sdproxy.core.pods import PodState
from sdproxy.core.slots import Pod

#: the back-off stops doubling after this many repeats (2**5 = 32x)
MAX_DOUBLINGS = 5


class Health:
    """Ejection back-off and the usable / capacity-coming judgements."""

    def __init__(self, *, eject_s: float) -> None:
        self.eject_s = eject_s

    @staticmethod
    def usable(pod: Pod, now: float) -> bool:
        return (
            pod.state is PodState.READY
            and not pod.ejected(now)
            and not pod.cordoned(now)
            and (not pod.gated or (pod.gate_live and pod.gate_healthy))
        )

    def eject(self, pod: Pod, now: float) -> None:
        pod.ejected_until = now + self.eject_s * 2 ** min(pod.ejections, MAX_DOUBLINGS)
        pod.ejections += 1

    @staticmethod
    def succeeded(pod: Pod) -> None:
        pod.ejections = 0

    @staticmethod
    def capacity_coming(pods: Iterable[Pod], now: float) -> bool:
        for pod in pods:
            if pod.cordoned(now):
                continue
            if pod.state in (PodState.STARTING, PodState.WARMING):
                return True
            # a pod refused once may have blipped: it is back after its first ejection;
            # one refused again is treated as down until its ejection ends
            if pod.state is PodState.READY and (not pod.ejected(now) or pod.ejections <= 1):
                return True
        return False

    @staticmethod
    def next_change(pods: Iterable[Pod], now: float) -> float | None:
        ends = [t for p in pods for t in (p.ejected_until, p.cordoned_until) if t > now]
        return min(ends, default=None)
