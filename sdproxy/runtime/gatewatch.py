"""Runtime: follow each pod's gate (``sdproxy gate``) so this replica sees every pod's true
occupancy, whoever sent the work.

One task per known pod reads the gate's change stream (``GET /-/gate/events``,
server-sent events). Each occupancy event becomes ``Gate.observe_gate``: the heavy
requests the gate runs for OTHER senders (other replicas, direct callers) — this
replica's own are in its slot book already — plus the gate's limit and loaded checkpoint.
A backend answering 404 has no gate (a plain sd-webui): this replica's own books rule, as
with one replica (``gate_absent``; asked again every ``RECHECK_S``). A stream that breaks
or stays silent for ``SILENCE_S`` (the gate sends a heartbeat every second) means this
replica lost sight of the gate (``gate_lost``): it sends that pod nothing until the stream
is back, while replicas that still see it keep using it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp

from sdproxy.core.pods import PodId
from sdproxy.runtime.gate import Gate
from sdproxy.runtime.jobs import caller_keys_of
from sdproxy.runtime.podgate import EVENTS_PATH
from sdproxy.runtime.tasks import PodTasks

log = logging.getLogger("sdproxy.gatewatch")

#: no event or heartbeat for this long: the link to the gate is considered cut
SILENCE_S = 3.0
#: how often a backend without a gate is asked again (a gate may be added later)
RECHECK_S = 30.0
BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


def foreign_claims(occupancy: dict[str, Any], replica: str) -> int:
    """Heavy requests the gate runs that this replica did not send."""
    return sum(1 for claim in occupancy.get("running", []) if claim.get("replica") != replica)


class GateWatch(PodTasks):
    """The watchers of one front replica."""

    def __init__(
        self, *, session: aiohttp.ClientSession, gate: Gate, replica: str, connect_s: float
    ) -> None:
        super().__init__(self._watch, kind="gatewatch")
        self.session = session
        self.gate = gate
        self.replica = replica
        self.connect_s = connect_s
        #: the last occupancy each gate published
        self.latest: dict[PodId, dict[str, Any]] = {}

    def forget(self, pod_id: PodId) -> None:
        super().forget(pod_id)
        self.latest.pop(pod_id, None)

    async def _watch(self, pod_id: PodId, url: str) -> None:
        failures = 0
        while True:
            try:
                gated = await self._stream(pod_id, url)
                failures = 0
                if not gated:
                    self.gate.gate_absent(pod_id)
                    await asyncio.sleep(RECHECK_S)
                    continue
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                pod = self.gate.admission.pods.get(pod_id)
                if failures == 0 and pod is not None and pod.gated:
                    log.warning("gate of pod %s out of sight: %r; sending it nothing", pod_id, exc)
                else:
                    log.debug("gate of %s out of sight: %r", pod_id, exc)
            self.gate.gate_lost(pod_id)
            await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
            failures += 1

    async def _stream(self, pod_id: PodId, url: str) -> bool:
        """Follow the stream until it ends; False if the backend has no gate."""
        timeout = aiohttp.ClientTimeout(total=None, connect=self.connect_s, sock_read=SILENCE_S)
        async with self.session.get(url + EVENTS_PATH, timeout=timeout) as resp:
            if resp.status == 404:
                return False
            if resp.status != 200:
                raise ValueError(f"gate stream answered {resp.status}")
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith("data:"):
                    self._observe(pod_id, json.loads(line[5:]))
        return True

    def find_caller(self, key: str) -> PodId | None:
        """The gated pod running a generation of the caller matched by ``key``."""
        for pod_id, occupancy in self.latest.items():
            for claim in occupancy.get("running", []):
                if key in caller_keys_of(claim.get("caller")):
                    return pod_id
        return None

    def _observe(self, pod_id: PodId, occupancy: dict[str, Any]) -> None:
        pod = self.gate.admission.pods.get(pod_id)
        if pod is not None and pod.gated and not pod.gate_live:
            log.warning("gate of pod %s in sight again", pod_id)
        self.latest[pod_id] = occupancy
        self.gate.observe_gate(
            pod_id,
            foreign=foreign_claims(occupancy, self.replica),
            limit=int(occupancy["limit"]),
            checkpoint=occupancy.get("checkpoint"),
            healthy=bool(occupancy.get("upstream_ok", True)),
        )
