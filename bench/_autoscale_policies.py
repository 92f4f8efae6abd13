"""Bench: the autoscaling policies compared in the autoscale scenario.

One job: turn each contender into a ``tick(observation, now) -> desired pods`` function
for the pod model in ``bench._autoscale_sim``. sdproxy's is the real core function; the
baselines live here (they are yardsticks, not product code), written from their
published algorithms and defaults (docs/prior-art.md):

- ``KpaPolicy``: Knative Serving's KPA decider (knative/serving
  pkg/autoscaler/scaling/autoscaler.go, config-autoscaler defaults).
- ``KedaPolicy``: the KEDA HTTP add-on's pending/target metric fed to a
  HorizontalPodAutoscaler with its default behaviour, KEDA doing 0 <-> 1.
- ``OraclePolicy``: knows every future arrival and service time (definition below).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from bench._autoscale_sim import Request, SimObservation
from sdproxy.core.autoscale import AutoscaleConfig, AutoscaleState, Observation, decide


def _clamp(n: int, *, low: int, high: int) -> int:
    return max(low, min(high, n))


class SdproxyPolicy:
    """sdproxy.core.autoscale.decide, exactly as the runtime calls it."""

    def __init__(self, config: AutoscaleConfig, *, name: str = "sdproxy") -> None:
        self.name = name
        self.config = config
        self.state = AutoscaleState()

    def tick(self, obs: SimObservation, now: float) -> int:
        observation = Observation(
            inflight=obs.inflight,
            queued=obs.queued,
            ready=obs.ready,
            starting=obs.starting,
            per_pod_limit=obs.per_pod_limit,
            cold_start_s=obs.cold_start_s,
            arrivals=obs.arrivals,
            service_s=obs.service_s,
            service_scv=obs.service_scv,
            wall_s=obs.wall_s,
            waits=obs.waits,
        )
        decision, self.state = decide(observation, self.state, config=self.config, now=now)
        return decision.desired


class KpaPolicy:
    """Knative KPA at ``containerConcurrency: 1`` with the config-autoscaler defaults."""

    # defaults: container-concurrency-target-percentage 70 (target_utilization 0.7),
    # stable-window 60 s, panic window 10 % of it (panic-window-percentage)
    panic_threshold = 2.0  # panic-threshold-percentage: 200
    max_scale_up_rate = 1000.0  # max-scale-up-rate
    max_scale_down_rate = 2.0  # max-scale-down-rate
    grace_s = 30.0  # scale-to-zero-grace-period

    def __init__(
        self,
        *,
        max_pods: int,
        target_utilization: float = 0.7,
        stable_window_s: float = 60.0,
        name: str = "knative-kpa",
    ) -> None:
        self.max_pods = max_pods
        self.name = name
        self.target_utilization = target_utilization
        self.stable_window_s = stable_window_s
        self.panic_window_s = stable_window_s / 10.0  # panic-window-percentage: 10
        self.samples: deque[tuple[float, float]] = deque()
        self.panic_since: float | None = None
        self.max_panic_pods = 0
        self.zero_wanted_since: float | None = None

    def _averages(self, obs: SimObservation, now: float) -> tuple[float, float]:
        # queue-proxy/activator report average concurrency; the decider averages the
        # buckets in each window (the activator's held requests count while it is in path)
        self.samples.append((now, obs.mean_demand))
        while self.samples and self.samples[0][0] <= now - self.stable_window_s:
            self.samples.popleft()
        panic = [v for t, v in self.samples if t > now - self.panic_window_s]
        return sum(v for _, v in self.samples) / len(self.samples), sum(panic) / len(panic)

    def _decide(self, obs: SimObservation, now: float) -> int:
        stable, panic = self._averages(obs, now)
        target = self.target_utilization * obs.per_pod_limit
        ready = max(1.0, float(obs.ready))
        up = math.ceil(self.max_scale_up_rate * ready)
        down = math.floor(ready / self.max_scale_down_rate)
        dspc = _clamp(math.ceil(stable / target), low=down, high=up)
        dppc = _clamp(math.ceil(panic / target), low=down, high=up)
        over = dppc / ready >= self.panic_threshold
        if over:
            self.panic_since = now  # begin panicking, or extend the panic
        elif self.panic_since is not None and now > self.panic_since + self.stable_window_s:
            self.panic_since, self.max_panic_pods = None, 0  # un-panic after a calm window
        if self.panic_since is None:
            return dspc
        # "We do not scale down while in panic mode. Only increases will be applied."
        self.max_panic_pods = max(self.max_panic_pods, dspc, dppc)
        return self.max_panic_pods

    def tick(self, obs: SimObservation, now: float) -> int:
        desired = _clamp(self._decide(obs, now), low=0, high=self.max_pods)
        if desired > 0 or obs.ready + obs.starting == 0:
            self.zero_wanted_since = None
            return desired
        # the decider wants zero (no request in the 60 s stable window); the KPA
        # reconciler keeps the last pod for scale-to-zero-grace-period more
        if self.zero_wanted_since is None:
            self.zero_wanted_since = now
        return 0 if now - self.zero_wanted_since >= self.grace_s else 1


class KedaPolicy:
    """KEDA HTTP add-on: desired = ceil(pending / targetPendingRequests) through an HPA.

    targetPendingRequests = 1 (one generation per GPU pod; the add-on's default of 100
    would never scale). The HPA defaults (kube-controller-manager, autoscaling/v2
    behavior): sync every 15 s, tolerance 10 %, scale-up at most max(4 pods, 100 %) per
    15 s, scale-down stabilisation window 300 s (the max recommendation in the window).
    KEDA itself does 0 -> 1 as soon as the interceptor reports pending requests (the
    add-on's scaler is ``external-push``) and 1 -> 0 after ``cooldownPeriod`` 300 s
    with no pending request.
    """

    sync_s = 15.0
    tolerance = 0.1

    def __init__(
        self,
        *,
        max_pods: int,
        stabilization_s: float = 300.0,
        cooldown_s: float = 300.0,
        name: str = "keda-http",
    ) -> None:
        self.max_pods = max_pods
        self.name = name
        self.stabilization_s = stabilization_s
        self.cooldown_s = cooldown_s
        self.replicas = 0
        self.next_sync = 0.0
        self.recommendations: deque[tuple[float, int]] = deque()
        self.last_active: float | None = None

    def _hpa(self, pending: int, now: float) -> int:
        current = self.replicas
        raw = math.ceil(pending / 1)
        if current > 0 and abs(pending / current - 1.0) <= self.tolerance:
            raw = current
        self.recommendations.append((now, raw))
        while self.recommendations[0][0] < now - self.stabilization_s:
            self.recommendations.popleft()
        stabilized = max(n for _, n in self.recommendations) if raw < current else raw
        limit = max(current + 4, 2 * current)
        return _clamp(stabilized, low=1, high=min(limit, self.max_pods))

    def tick(self, obs: SimObservation, now: float) -> int:
        pending = obs.inflight + obs.queued
        if pending > 0:
            self.last_active = now
        if self.replicas == 0:
            if pending > 0:  # KEDA activation: 0 -> 1; the HPA scales from there
                self.replicas, self.next_sync = 1, now + self.sync_s
            return self.replicas
        if self.last_active is not None and now - self.last_active >= self.cooldown_s:
            self.replicas, self.recommendations = 0, deque()
            return 0
        if now >= self.next_sync:
            self.replicas = self._hpa(pending, now)
            self.next_sync = now + self.sync_s
        return self.replicas


class OraclePolicy:
    """Perfect knowledge of the future: the cheapest pod count that never makes a request wait.

    From the trace it computes c(t), the number of generations that would run at time t
    if every request started the moment it arrived (1 s grid, rounded outwards). A pod
    ordered now is READY after the cold start, and removing a pod then re-ordering it
    costs a cold start of billing, so for each pod "level" k the cheapest plan orders it
    exactly one cold start before c reaches k and keeps it through any gap shorter than
    a cold start. Both are one rule: desired(t) = max c over [t, t + cold start + tick].
    This is a zero-wait yardstick: a policy that lets requests wait may spend less.
    """

    name = "oracle"

    def __init__(
        self, *, trace: Sequence[Request], lookahead_s: float, horizon_s: float, max_pods: int
    ) -> None:
        n = int(horizon_s) + int(lookahead_s) + 64
        diff = [0] * (n + 1)
        for r in trace:
            start = int(r.arrival_s)
            diff[start] += 1
            diff[min(n, math.ceil(r.arrival_s + r.service_s))] -= 1
        conc, running = [0] * n, 0
        for i in range(n):
            running += diff[i]
            conc[i] = running
        self.plan = _forward_max(conc, width=math.ceil(lookahead_s) + 1)
        self.max_pods = max_pods

    def tick(self, obs: SimObservation, now: float) -> int:
        i = min(int(now), len(self.plan) - 1)
        return min(self.max_pods, self.plan[i])


def _forward_max(values: Sequence[int], *, width: int) -> list[int]:
    """out[i] = max(values[i : i + width]) in O(n) (monotone deque)."""
    out = [0] * len(values)
    window: deque[int] = deque()
    for i in range(len(values) - 1, -1, -1):
        while window and values[window[-1]] <= values[i]:
            window.pop()
        window.append(i)
        if window[0] >= i + width:
            window.popleft()
        out[i] = values[window[0]]
    return out
