"""Runtime: ``--scaler kubernetes``, the Deployment /scale subresource, safely.

Scaling in lets the ReplicaSet controller choose which pods to delete. It ranks pods by
``controller.kubernetes.io/pod-deletion-cost`` (lower goes first; default 0) once
not-ready pods are gone (https://kubernetes.io/docs/concepts/workloads/controllers/
replicaset/#pod-deletion-cost). So before lowering ``spec.replicas`` by k we give the k
most idle pods a cost below every unannotated (possibly busy) pod, and scale in by no more
than the number of idle pods we were given: a pod mid-generation is never chosen. Marks
left on pods that are no longer victims are removed (merge-patch null) — including, when
this replica becomes the leader, every mark a previous leader may have left on the pods
discovery lists (it died or lost the Lease before it could clear them; a stale low cost
would make the ReplicaSet delete that pod first even once it is busy).

Lifecycle: ``await start()`` builds the client and starts the Lease election task; the first
``scale_to`` calls it if nobody did. ``close()`` releases the Lease and closes the client.
Only the Lease holder patches anything; every API failure is logged and the next tick
tries again (``scale_to`` never raises for Kubernetes errors).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from sdproxy.core.pods import PodId
from sdproxy.errors import ConfigError, KubernetesError
from sdproxy.runtime.kube.api import KubeApi
from sdproxy.runtime.kube.lease import LeaderElector
from sdproxy.settings import ScalerSettings

log = logging.getLogger(__name__)

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
#: the cost of a pod we want gone; the most idle victim gets the lowest
IDLE_COST = -100

ApiFactory = Callable[[], Awaitable[KubeApi]]


class KubernetesScaler:
    """Scales one Deployment; acts only while holding the leader Lease."""

    name = "kubernetes"

    def __init__(
        self,
        settings: ScalerSettings,
        namespace: str,
        *,
        kubeconfig: str = "",
        api_factory: ApiFactory | None = None,
    ) -> None:
        self._settings = settings
        self._namespace = namespace
        self._api_factory = api_factory or (lambda: KubeApi.connect(kubeconfig))
        self._api: KubeApi | None = None
        self._elector: LeaderElector | None = None
        self._marked: set[PodId] = set()
        self._led = False

    async def start(self) -> None:
        """Connect and start the leader election (idempotent; raises ConfigError)."""
        if self._api is not None:
            return
        self._api = await self._api_factory()
        self._elector = LeaderElector(
            self._api,
            namespace=self._namespace,
            name=self._settings.lease_name,
            identity=self._settings.identity,
            duration_s=self._settings.lease_duration_s,
        )
        self._elector.start()

    def is_leader(self) -> bool:
        return self._elector is not None and self._elector.is_leader()

    async def close(self, *, release: bool = True) -> None:
        """Stop the election and close the client. ``release=False`` leaves the Lease to
        expire, as a crashed replica would (tests use it to prove the takeover)."""
        if self._elector is not None:
            await self._elector.close(release=release)
        if self._api is not None:
            await self._api.close()
        self._api = self._elector = None

    async def scale_to(
        self, desired: int, *, idle_pods: Sequence[PodId], known_pods: Sequence[PodId] = ()
    ) -> None:
        try:
            await self.start()
        except ConfigError as exc:
            log.error("kubernetes scaler cannot start: %s", exc)
            return
        if not self.is_leader():
            self._led = False
            return
        if not self._led:  # leadership just taken: any mark on a known pod may be stale
            self._led = True
            self._marked |= set(known_pods)
        try:
            await self._scale(max(0, desired), list(idle_pods))
        except KubernetesError as exc:
            log.warning("scaling Deployment %s failed: %s", self._settings.deployment, exc)

    async def _scale(self, desired: int, idle_pods: list[PodId]) -> None:
        assert self._api is not None
        current = await self._api.get_scale(self._namespace, self._settings.deployment)
        wanted = idle_pods[: current - desired] if desired < current else []
        # BEFORE the scale patch: the ReplicaSet reads the costs when it picks victims
        await self._clear_marks(keep=set(wanted))
        victims = await self._mark(wanted)
        if desired < current:
            if len(victims) < current - desired:
                log.info(
                    "scale-in limited to %d idle pods (wanted %d -> %d)",
                    len(victims),
                    current,
                    desired,
                )
            desired = current - len(victims)
        if desired != current:
            await self._api.patch_scale(self._namespace, self._settings.deployment, desired)
            log.info("Deployment %s scaled %d -> %d", self._settings.deployment, current, desired)

    async def _clear_marks(self, *, keep: set[PodId]) -> None:
        """Remove our mark from pods that are no longer victims (they may be busy now)."""
        assert self._api is not None
        for pod in sorted(self._marked - keep):
            await self._annotate(pod, None)
            self._marked.discard(pod)

    async def _mark(self, wanted: list[PodId]) -> list[PodId]:
        """Give the victims the lowest costs (most idle lowest); skip pods already gone."""
        marked: list[PodId] = []
        for rank, pod in enumerate(wanted):
            if await self._annotate(pod, str(IDLE_COST - (len(wanted) - 1 - rank))):
                self._marked.add(pod)
                marked.append(pod)
        return marked

    async def _annotate(self, pod: PodId, cost: str | None) -> bool:
        """Set (or with None remove) the deletion cost; False when the pod is gone."""
        assert self._api is not None
        try:
            await self._api.patch_pod_annotations(self._namespace, pod, {DELETION_COST: cost})
        except KubernetesError as exc:
            if exc.status == 404:
                return False
            raise
        return True
