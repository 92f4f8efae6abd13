"""Runtime: active health checks — catch a pod that accepts connections but no longer
answers (hung, SIGSTOPped, wedged), which connection errors never reveal.

Every ``--health-interval-s`` (HAProxy's default: 2 s) each known pod is asked
``GET /sdapi/v1/progress?skip_current_image=true`` — cheap, answered by sd-webui's worker
pool even while it generates — with ``--health-timeout-s``. Each result goes to the core
(``Gate.health_checked``), which takes the pod out after ``--health-fall`` failures in a
row and back after ``--health-rise`` passes (sdproxy.core.health); ``/-/status`` shows
``out: "health_check"`` meanwhile.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from sdproxy.core.pods import PodId
from sdproxy.runtime.gate import Gate
from sdproxy.runtime.tasks import PodTasks

log = logging.getLogger("sdproxy.healthcheck")
CHECK_PATH = "/sdapi/v1/progress?skip_current_image=true"


class HealthChecker(PodTasks):
    def __init__(
        self, *, session: aiohttp.ClientSession, gate: Gate, interval_s: float, timeout_s: float
    ) -> None:
        super().__init__(self._check_forever, kind="healthcheck")
        self.session = session
        self.gate = gate
        self.interval_s = interval_s
        self.timeout_s = timeout_s

    async def _check_forever(self, pod_id: PodId, url: str) -> None:
        was_out = False
        while True:
            ok = await self._answers(url)
            self.gate.health_checked(pod_id, ok)
            pod = self.gate.admission.pods.get(pod_id)
            out = pod is not None and pod.checked_out
            if out != was_out:
                log.warning("pod %s %s", pod_id, "failed its health checks: out" if out else "back")
                was_out = out
            await asyncio.sleep(self.interval_s)

    async def _answers(self, url: str) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self.session.get(url + CHECK_PATH, timeout=timeout) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False
