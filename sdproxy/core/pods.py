"""Core: pod identities, endpoint snapshots, lifecycle states and their transition table.

A pod moves STARTING -> (WARMING) -> READY -> DRAINING -> gone. Discovery sources report
``Endpoint`` snapshots; the admission core turns them into states. Only READY pods take
new work; a DRAINING pod finishes what it runs (Kubernetes: the EndpointSlice
``terminating`` condition, or the pod vanished from the slice). ``TRANSITIONS`` is the
one table of legal changes; ``check_transition`` raises on anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NewType

from sdproxy.errors import IllegalTransition

PodId = NewType("PodId", str)


class PodState(StrEnum):
    STARTING = "starting"  # exists, not ready yet (container starting, model loading)
    WARMING = "warming"  # ready per Kubernetes, warm-up generation not yet succeeded
    READY = "ready"  # takes new work
    DRAINING = "draining"  # terminating or gone from discovery: finishes in-flight work only


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """What a discovery source knows about one pod (EndpointSlice endpoint semantics)."""

    pod_id: PodId
    #: base URL, e.g. http://10.0.0.7:7860 (no trailing slash)
    url: str
    #: EndpointSlice conditions.ready: serving and not terminating
    ready: bool = True
    #: EndpointSlice conditions.terminating
    terminating: bool = False
    #: relative speed of its GPU (``#weight=2`` on a static backend URL): the first
    #: guess of its rate, until it has run something (sdproxy.core.eta)
    weight: float = 1.0


#: legal state changes; None is "not known" (before it appeared, after it is gone)
TRANSITIONS: dict[PodState | None, frozenset[PodState | None]] = {
    None: frozenset({PodState.STARTING}),
    # ready per Kubernetes (warm-up or not), or terminating before it ever served
    PodState.STARTING: frozenset({PodState.WARMING, PodState.READY, PodState.DRAINING}),
    # warmed up; lost readiness while warming; terminating
    PodState.WARMING: frozenset({PodState.READY, PodState.STARTING, PodState.DRAINING}),
    # not ready, terminating or gone from discovery: it finishes what it runs
    PodState.READY: frozenset({PodState.DRAINING}),
    # ready again (with or without a new warm-up), or idle and gone: forgotten
    PodState.DRAINING: frozenset({PodState.READY, PodState.WARMING, None}),
}


def check_transition(pod_id: PodId, old: PodState | None, new: PodState | None) -> None:
    """Raise ``IllegalTransition`` unless ``old -> new`` is in ``TRANSITIONS``."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"pod {pod_id}: {old} -> {new} is not a legal transition")


def target_state(current: PodState, ep: Endpoint, *, warmup: bool) -> PodState:
    """Where a known pod goes on a discovery snapshot ``ep``."""
    if ep.terminating:
        return PodState.DRAINING
    if not ep.ready:  # a pod that was serving finishes its work; others wait to start
        was_serving = current in (PodState.READY, PodState.DRAINING)
        return PodState.DRAINING if was_serving else PodState.STARTING
    if current is PodState.READY:
        return PodState.READY
    return PodState.WARMING if warmup else PodState.READY
