"""Core: which pod answers a light call (samplers, options, progress of nobody's job).

Light calls bypass the queue: any usable pod answers (sdproxy.core.health), the least
loaded first (running / limit), the first listed on a tie. A full pod still answers —
sd-webui serves reads from its worker pool while it generates — but an idle one is
preferred, since a generating pod answers slower.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable

from sdproxy.core.pods import PodId
from sdproxy.core.slots import Pod


class LeastLoadedLight:
    def pick(
        self,
        pods: Iterable[Pod],
        *,
        usable: Callable[[Pod], bool],
        exclude: Container[PodId] = (),
    ) -> Pod | None:
        best: Pod | None = None
        for pod in pods:
            if pod.pod_id in exclude or not usable(pod):
                continue
            if best is None or len(pod.running) / pod.limit < len(best.running) / best.limit:
                best = pod
        return best
