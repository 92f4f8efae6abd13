"""Runtime: run the autoscaling policy every tick and hand its decision to a Scaler.

Reads the admission core's counters, calls the pure ``sdproxy.core.autoscale.decide``
with the policy config the settings hold (``ScalerSettings.autoscale``, no mapping),
and on a change (or every ``REASSERT_S``, so a scale someone else changed is put back)
asks the Scaler for the count, passing the idle pods that may be removed. Only the
leader acts; every replica computes and exports the desired count.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

from sdproxy.core.autoscale import AutoscaleState, Decision, Observation, decide
from sdproxy.core.pods import PodId, PodState
from sdproxy.runtime.gate import Gate
from sdproxy.runtime.logs import log_event
from sdproxy.runtime.metrics import Metrics
from sdproxy.runtime.scaling import NoScaler, Scaler
from sdproxy.runtime.status import ScaleEvent
from sdproxy.settings import ScalerSettings

log = logging.getLogger("sdproxy.autoscaler")
REASSERT_S = 30.0
#: how long pods chosen for scale-in take no work; if one is still listed after that (the
#: scale patch failed or was undone), it serves again
CORDON_S = 30.0


class Autoscaler:
    """The policy loop of one proxy replica."""

    def __init__(
        self,
        *,
        settings: ScalerSettings,
        gate: Gate,
        scaler: Scaler,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.gate = gate
        self.admission = gate.admission
        #: (in flight, queued) the policy sizes for: this replica's own by default; the
        #: composition root gives the global demand over every replica (sdproxy.runtime.peers)
        self.demand: Callable[[], tuple[int, int]] = lambda: (
            self.admission.inflight,
            len(self.admission.queue),
        )
        self.scaler = scaler
        self.metrics = metrics
        self.clock = clock
        self.state = AutoscaleState()
        self.desired: int | None = None
        self.events: deque[ScaleEvent] = deque(maxlen=20)
        self._asserted_at = -REASSERT_S
        #: slowest recent pod start (appeared -> ready), fed to the policy's scale-in window
        self.cold_start_s = 0.0

    def note_cold_start(self, seconds: float) -> None:
        """A pod became ready ``seconds`` after it appeared (decays toward newer samples)."""
        self.cold_start_s = max(seconds, 0.8 * self.cold_start_s + 0.2 * seconds)

    def observe(self) -> Observation:
        adm = self.admission
        inflight, queued = self.demand()
        return Observation(
            inflight=inflight,
            queued=queued,
            ready=adm.count(PodState.READY),
            starting=adm.count(PodState.STARTING, PodState.WARMING),
            per_pod_limit=adm.config.max_inflight,
            cold_start_s=self.cold_start_s,
        )

    async def step(self) -> Decision:
        now = self.clock()
        decision, self.state = decide(
            self.observe(), self.state, config=self.settings.autoscale, now=now
        )
        self.desired = decision.desired
        if decision.changed:
            self._record(decision)
        if self.scaler.is_leader() and (decision.changed or now - self._asserted_at >= REASSERT_S):
            self._asserted_at = now
            victims = self._cordon_surplus(decision.desired, now)
            await self.scaler.scale_to(
                decision.desired, idle_pods=victims, known_pods=list(self.admission.pods)
            )
        return decision

    def _cordon_surplus(self, desired: int, now: float) -> list[PodId]:
        """Pick the idle pods to remove and stop binding work to them BEFORE asking for
        fewer pods: a request bound in between would die with its pod mid-generation."""
        if isinstance(self.scaler, NoScaler):
            return []  # nothing removes pods: the count is only exported
        adm = self.admission
        serving = (PodState.READY, PodState.STARTING, PodState.WARMING)
        active = sum(1 for p in adm.pods.values() if p.state in serving and not p.cordoned(now))
        surplus = active - desired
        if surplus <= 0:
            return []
        return self.gate.cordon(adm.idle_pods(now)[:surplus], for_s=CORDON_S)

    def _record(self, decision: Decision) -> None:
        direction = "up" if decision.desired > decision.previous else "down"
        self.metrics.scale_event(direction)
        self.events.append(
            ScaleEvent(
                at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                previous=decision.previous,
                desired=decision.desired,
                reason=decision.reason,
            )
        )
        log_event(
            "scale",
            direction=direction,
            previous=decision.previous,
            desired=decision.desired,
            reason=decision.reason,
        )

    async def run(self) -> None:
        """Tick forever; a failing scaler is logged and retried on the next tick."""
        while True:
            try:
                await self.step()
            except Exception:  # the loop must outlive any one scaler failure
                log.exception("autoscaler tick failed")
            await asyncio.sleep(self.settings.scale_interval_s)
