"""Core: pod health — when a pod is ejected, when it serves again, whether capacity comes.

The HEALTH policy, in one file:

- ``usable``: the one predicate for "may take new work": READY and no reason to keep
  it out (``Pod.out_reason``: its gate out of sight or its sd-webui down behind it,
  failed health checks, ejected, cordoned). A pod with a free slot that is usable takes
  heavy work; any usable pod answers light calls.
- ``checked``: active health checks (HAProxy's defaults: every 2 s, out after ``fall``
  = 3 failures in a row, back after ``rise`` = 2 passes) catch a pod that still accepts
  connections but no longer answers (hung, SIGSTOPped), which ejection never sees.
- ``eject``: a pod that refused a connection or broke an exchange rests for
  ``eject_s``, doubled per repeat up to 32x; a completed generation resets the count.
  ``failed_generation``: a pod that answers ``--outlier-failures`` generations in a row
  with a 5xx that is not the request's fault (outlier ejection) rests the same way;
  ``Pod.eject_reason`` says which it was.
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

    def __init__(self, *, eject_s: float, fall: int = 3, rise: int = 2) -> None:
        self.eject_s = eject_s
        self.fall = fall
        self.rise = rise

    @staticmethod
    def usable(pod: Pod, now: float) -> bool:
        return pod.state is PodState.READY and pod.out_reason(now) is None

    def checked(self, pod: Pod, ok: bool) -> None:
        if ok:
            pod.check_passes, pod.check_failures = pod.check_passes + 1, 0
            if pod.checked_out and pod.check_passes >= self.rise:
                pod.checked_out = False
        else:
            pod.check_failures, pod.check_passes = pod.check_failures + 1, 0
            if pod.check_failures >= self.fall:
                pod.checked_out = True

    def eject(self, pod: Pod, now: float, reason: str = "ejected") -> None:
        pod.eject_reason = reason
        pod.consecutive_failures = 0
        pod.ejected_until = now + self.eject_s * 2 ** min(pod.ejections, MAX_DOUBLINGS)
        pod.ejections += 1

    @staticmethod
    def succeeded(pod: Pod) -> None:
        pod.ejections = 0
        pod.consecutive_failures = 0

    def failed_generation(self, pod: Pod, now: float, *, limit: int) -> None:
        """A generation failed for no reason of the request (a 5xx that is not CUDA out
        of memory): ``limit`` in a row eject the pod as an outlier (Envoy's
        consecutive_5xx), with the same back-off."""
        pod.consecutive_failures += 1
        if pod.consecutive_failures >= limit:
            self.eject(pod, now, "outlier")

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
