"""Runtime: run the autoscaling policy every tick and hand its decision to a Scaler.

Reads the admission core's counters, calls the pure ``sdproxy.core.autoscale.decide``
with the policy config the settings hold (``ScalerSettings.autoscale``, no mapping),
and on a change (or every ``REASSERT_S``, so a scale someone else changed is put back)
asks the Scaler for the count, passing the idle pods that may be removed. Only the
leader acts; every replica computes and exports the desired count, so the Kubernetes
scaler and ``--scaler none`` (KEDA reading ``sdproxy_desired_pods``) follow the same
decisions.

The policy's inputs beyond the counters: the heavy arrival counter, the service-time
moments and the queue waits of the requests bound since the previous tick that the Gate
measures (``--wait-target-s`` and its outer loop), the measured cold start, and the wall
clock (``--predict`` learns by time of day). With ``--predict-state FILE`` what the
forecast learned (and the last cold start) is read at start and written every
``SAVE_S`` and at exit, atomically (a temporary file renamed over it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sdproxy.core.autoscale import AutoscaleState, Decision, Observation, decide
from sdproxy.core.forecast import Forecast
from sdproxy.core.pods import PodId, PodState
from sdproxy.errors import ConfigError
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
#: how often the learned forecast is written to --predict-state
SAVE_S = 60.0


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
        wall_clock: Callable[[], float] = time.time,
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
        #: heavy arrivals the rate is measured from: this replica's by default, every
        #: replica's from the composition root
        self.arrivals: Callable[[], int] = lambda: gate.arrivals
        self.scaler = scaler
        self.metrics = metrics
        self.clock = clock
        self.wall_clock = wall_clock
        self.state = AutoscaleState()
        self.desired: int | None = None
        self.last: Decision | None = None
        self.events: deque[ScaleEvent] = deque(maxlen=20)
        self._asserted_at = -REASSERT_S
        self._saved_at = clock()
        #: slowest recent pod start (appeared -> ready), fed to the policy's scale-in window
        self.cold_start_s = 0.0
        self._floor_reported = False
        self.state_file = Path(settings.predict_state) if settings.predict_state else None
        if self.state_file is not None:
            self._load(self.state_file)
        self._report_floor()

    def _load(self, path: Path) -> None:
        """Read --predict-state (a missing file starts empty; a broken one stops start-up)."""
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            log.info("--predict-state %s does not exist yet: the forecast starts empty", path)
            return
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--predict-state {path}: cannot read it: {exc}") from exc
        try:
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            forecast = Forecast.from_document(doc.get("forecast"))
            cold = float(doc.get("cold_start_s", 0.0))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--predict-state {path}: not a forecast file: {exc}") from exc
        self.state = AutoscaleState(forecast=forecast)
        self.cold_start_s = max(0.0, cold)

    def document(self) -> dict[str, Any]:
        """What --predict-state holds."""
        forecast = self.state.forecast or Forecast()
        return {"forecast": forecast.to_document(), "cold_start_s": round(self.cold_start_s, 1)}

    async def save(self) -> None:
        """Write --predict-state atomically (nothing without it)."""
        if self.state_file is None:
            return
        self._saved_at = self.clock()
        text = json.dumps(self.document(), separators=(",", ":"))
        try:
            await asyncio.to_thread(_write_atomically, self.state_file, text)
        except OSError as exc:
            log.warning("--predict-state %s: cannot write it: %s", self.state_file, exc)

    def _report_floor(self) -> None:
        """Say so once when --scale-down-delay-s is shorter than the cold-start floor."""
        delay = self.settings.autoscale.scale_down_delay_s
        if self._floor_reported or self.cold_start_s <= delay:
            return
        self._floor_reported = True
        log_event(
            "scale_down_delay_floor",
            log_level=logging.WARNING,
            scale_down_delay_s=delay,
            cold_start_s=round(self.cold_start_s, 1),
            detail=f"--scale-down-delay-s {delay:g} is shorter than the measured cold start "
            f"{self.cold_start_s:.0f}s: pods are removed only after a lower need lasted "
            f"{self.cold_start_s:.0f}s",
        )

    def model_status(self) -> dict[str, Any]:
        """The model fields of /-/status (AutoscalerStatus): rate, forecast vs actual."""
        config, last = self.settings.autoscale, self.last
        forecast = self.state.forecast
        learned = forecast is not None and forecast.learned
        return {
            "wait_target_s": config.wait_target_s,
            "model_target_s": last.model_target_s if last else config.wait_target_s,
            "wait_over_target_share": last.wait_over_share if last else None,
            "arrival_rate_per_s": last.rate if last else 0.0,
            "predict": config.predict,
            "forecast_rate_per_s": last.forecast_rate if last else None,
            "forecast_peak_per_s": last.forecast_peak if last else None,
            "forecast_trusted": last.forecast_trusted if last else True,
            "forecast_recent": forecast.recent_forecast if learned and forecast else None,
            "actual_recent": forecast.recent_actual if learned and forecast else None,
        }

    def note_cold_start(self, seconds: float) -> None:
        """A pod became ready ``seconds`` after it appeared (decays toward newer samples)."""
        self.cold_start_s = max(seconds, 0.8 * self.cold_start_s + 0.2 * seconds)
        self._report_floor()

    def observe(self) -> Observation:
        adm = self.admission
        inflight, queued = self.demand()
        service = self.gate.service
        return Observation(
            inflight=inflight,
            queued=queued,
            ready=adm.count(PodState.READY),
            starting=adm.count(PodState.STARTING, PodState.WARMING),
            per_pod_limit=adm.config.max_inflight,
            cold_start_s=self.cold_start_s,
            arrivals=self.arrivals(),
            service_s=service.mean_s,
            service_scv=service.scv,
            wall_s=self.wall_clock(),
            waits=self.gate.take_waits(),
        )

    async def step(self) -> Decision:
        now = self.clock()
        decision, self.state = decide(
            self.observe(), self.state, config=self.settings.autoscale, now=now
        )
        self.desired = decision.desired
        self.last = decision
        if self.state_file is not None and now - self._saved_at >= SAVE_S:
            await self.save()
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
        """Tick forever; a failing scaler is logged and retried on the next tick. The
        forecast is written once more when the loop is stopped."""
        try:
            while True:
                try:
                    await self.step()
                except Exception:  # the loop must outlive any one scaler failure
                    log.exception("autoscaler tick failed")
                await asyncio.sleep(self.settings.scale_interval_s)
        finally:
            if self.state_file is not None:
                _write_atomically(self.state_file, json.dumps(self.document()))


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
