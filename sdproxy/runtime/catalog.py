"""Runtime: what a ready pod has — the checkpoints it lists and the one it has loaded.

When a pod becomes ready (after its warm-up, with ``--warmup``) one task asks it
``GET /sdapi/v1/sd-models`` and ``GET /sdapi/v1/options`` and hands the core plain data
(``Gate.observe_catalog``): the checkpoint keys it lists — every name sd-webui resolves
for an entry (title, model_name, the file's stem, its hashes once computed;
modules/sd_models.py ``CheckpointInfo.ids``), as ``checkpoint_key`` makes them — and the
key of its ``sd_model_checkpoint`` (null until its first load). From then on a request
naming a checkpoint the pod does not list is not recorded as that pod's checkpoint (it
keeps no state and sets no ``pod_checkpoint_info`` label: sd-webui generates with its
default instead), and ``/-/status`` shows the loaded checkpoint before any request named
one. A pod that does not answer is asked again, ``ASK_ATTEMPTS`` times in all, while it
stays ready; until it answers, any (length-capped) name counts, as before. The list is
read once per readiness: a checkpoint added to a running pod counts once the pod is
ready again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from sdproxy.core.pods import PodId, PodState
from sdproxy.core.sdapi import checkpoint_key
from sdproxy.runtime.gate import Gate

log = logging.getLogger("sdproxy.catalog")

SD_MODELS_PATH = "/sdapi/v1/sd-models"
OPTIONS_PATH = "/sdapi/v1/options"
ASK_ATTEMPTS = 3
#: the proxy's session does not decompress (it relays the pod's own bytes), and sd-webui
#: gzips every answer of 1000 bytes or more that the request allows: ask for it plain
PLAIN = {"Accept-Encoding": "identity"}


def catalog_keys(models: list[Any]) -> frozenset[str]:
    """Every checkpoint key a request may name one of ``models`` (sd-models entries) by."""
    keys: set[str] = set()
    for model in models:
        if not isinstance(model, dict):
            continue
        filename = model.get("filename")
        stem = filename.replace("\\", "/").rsplit("/", 1)[-1] if isinstance(filename, str) else None
        names = (model.get("title"), model.get("model_name"), stem)
        for name in (*names, model.get("hash"), model.get("sha256")):
            key = checkpoint_key(name) if isinstance(name, str) else None
            if key is not None:
                keys.add(key)
    return frozenset(keys)


class Catalogs:
    """One task per pod that became ready, until the pod has answered."""

    def __init__(self, *, session: aiohttp.ClientSession, gate: Gate, timeout_s: float) -> None:
        self.session = session
        self.gate = gate
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._tasks: dict[PodId, asyncio.Task[None]] = {}

    def learn(self, pod_id: PodId) -> None:
        if pod_id in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._learn(pod_id), name=f"catalog-{pod_id}")
        self._tasks[pod_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(pod_id, None))

    def _ready_url(self, pod_id: PodId) -> str | None:
        pod = self.gate.admission.pods.get(pod_id)
        return pod.url if pod is not None and pod.state is PodState.READY else None

    async def _learn(self, pod_id: PodId) -> None:
        delay = 0.5
        for attempt in range(1, ASK_ATTEMPTS + 1):
            url = self._ready_url(pod_id)
            if url is None:
                return
            asked_at = self.gate.now()
            answer = await self._ask(url)
            if answer is not None:
                catalog, loaded = answer
                self.gate.observe_catalog(pod_id, catalog=catalog, loaded=loaded, asked_at=asked_at)
                return
            if attempt < ASK_ATTEMPTS:
                await asyncio.sleep(delay)
                delay *= 2
        log.warning("pod %s did not list its checkpoints; any checkpoint name counts", pod_id)

    async def _ask(self, url: str) -> tuple[frozenset[str], str | None] | None:
        try:
            models = await self._get(url + SD_MODELS_PATH)
            options = await self._get(url + OPTIONS_PATH)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("asking %s for its checkpoints failed: %r", url, exc)
            return None
        if not isinstance(models, list):
            return None
        loaded = options.get("sd_model_checkpoint") if isinstance(options, dict) else None
        return catalog_keys(models), checkpoint_key(loaded) if isinstance(loaded, str) else None

    async def _get(self, url: str) -> Any:
        async with self.session.get(url, headers=PLAIN, timeout=self.timeout) as resp:
            if resp.status != 200:
                raise ValueError(f"{url} answered {resp.status}")
            return await resp.json(content_type=None)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
