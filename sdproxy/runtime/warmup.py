"""Runtime: warm-up gating — a new pod takes traffic only after a tiny generation.

sd-webui answers HTTP before its model is loaded (modules/initialize.py loads it in a
background thread) and the first request blocks until it is; so readiness alone says
nothing. Each pod that enters WARMING gets one task that POSTs a 1-step 64x64 txt2img,
retrying with backoff until it succeeds (then ``Gate.mark_warm``) or the pod is no longer
WARMING.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from sdproxy.core.pods import PodId, PodState
from sdproxy.runtime.gate import Gate

log = logging.getLogger("sdproxy.warmup")

WARMUP_BODY = {
    "prompt": "sdproxy warm-up",
    "steps": 1,
    "width": 64,
    "height": 64,
    "batch_size": 1,
    "n_iter": 1,
    "save_images": False,
    "send_images": False,
}


class Warmer:
    """One warm-up task per WARMING pod."""

    def __init__(self, *, session: aiohttp.ClientSession, gate: Gate, timeout_s: float) -> None:
        self.session = session
        self.gate = gate
        self.timeout_s = timeout_s
        self._tasks: dict[PodId, asyncio.Task[None]] = {}

    def warm(self, pod_id: PodId) -> None:
        if pod_id in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._warm(pod_id), name=f"warmup-{pod_id}")
        self._tasks[pod_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(pod_id, None))

    def _warming_url(self, pod_id: PodId) -> str | None:
        pod = self.gate.admission.pods.get(pod_id)
        return pod.url if pod is not None and pod.state is PodState.WARMING else None

    async def _warm(self, pod_id: PodId) -> None:
        delay = 0.5
        while (url := self._warming_url(pod_id)) is not None:
            if await self._try(url):
                log.info("pod %s warmed up", pod_id)
                self.gate.mark_warm(pod_id)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _try(self, url: str) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self.session.post(
                url + "/sdapi/v1/txt2img", json=WARMUP_BODY, timeout=timeout
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("warm-up of %s failed: %r", url, exc)
            return False

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
