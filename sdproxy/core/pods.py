"""Core: pod identities, endpoint snapshots and pod lifecycle states (pure data).

A pod moves STARTING -> (WARMING) -> READY -> DRAINING -> gone. Discovery sources report
``Endpoint`` snapshots; the admission core turns them into states. Only READY pods take
new work; a DRAINING pod finishes what it runs (Kubernetes: the EndpointSlice
``terminating`` condition, or the pod vanished from the slice).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NewType

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
