"""Runtime: the Scaler injection point and the no-op scaler.

The autoscaler loop (sdproxy.runtime.autoscaler) runs the pure policy in
sdproxy.core.autoscale every tick and hands the desired pod count to a Scaler:
``NoScaler`` (only the sdproxy_desired_pods metric, for KEDA/HPA), ``LocalScaler``
(simulated pods as local processes, sdproxy.runtime.local) or ``KubernetesScaler``
(Deployment /scale + pod-deletion-cost + Lease leader election, sdproxy.runtime.kube).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sdproxy.core.pods import PodId


class Scaler(Protocol):
    """Acts on the desired number of pods."""

    name: str

    async def scale_to(
        self, desired: int, *, idle_pods: Sequence[PodId], known_pods: Sequence[PodId] = ()
    ) -> None:
        """Ask for ``desired`` pods. ``idle_pods`` (no heavy work in flight, most idle
        first) are the ones to remove when scaling in; never remove a busy pod.
        ``known_pods``: every pod discovery lists (a new leader clears what an old one
        left on them)."""
        ...

    def is_leader(self) -> bool:
        """Whether this replica may act (leader election); always True without one."""
        ...

    async def close(self) -> None:
        """Release what the scaler holds (Lease, processes)."""
        ...


class NoScaler:
    """--scaler none: the desired count is only exported as a metric."""

    name = "none"

    async def scale_to(
        self, desired: int, *, idle_pods: Sequence[PodId], known_pods: Sequence[PodId] = ()
    ) -> None:
        return None

    def is_leader(self) -> bool:
        return True

    async def close(self) -> None:
        return None
