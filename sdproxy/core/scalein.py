"""Core: which pods go first when the autoscaler removes pods (scale-in order).

Only pods that run nothing and are not cordoned already are candidates: first those not
ready yet (starting, warming: nobody waits for them), then ready pods idle longest first
(the least likely to be needed next). A busy pod is never a candidate: removing it would
kill a generation.
"""

from __future__ import annotations

from collections.abc import Iterable

from sdproxy.core.pods import PodId, PodState
from sdproxy.core.slots import Pod


def scale_in_order(pods: Iterable[Pod], now: float) -> list[PodId]:
    candidates = [p for p in pods if not p.cordoned(now)]
    waiting = [p for p in candidates if p.state in (PodState.STARTING, PodState.WARMING)]
    ready = [p for p in candidates if p.state is PodState.READY and not p.running]
    ready.sort(key=lambda p: p.idle_since)
    return [p.pod_id for p in waiting + ready]
