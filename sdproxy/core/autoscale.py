"""Core: the autoscaling policy — how many GPU pods to ask for, as a pure function.

``decide(observation, state, config=..., now=...) -> (Decision, AutoscaleState)`` runs once
per scaler tick; the runtime reads the clock, builds the ``Observation`` and executes the
``Decision`` (and logs its ``reason``). No I/O, no clock, no randomness here.

The rules, in order (why each differs from Knative's KPA, see docs/prior-art.md):

1. **Need** = ceil((in flight + queued) / per-pod limit): one pod per generation at
   ``max_inflight = 1``. KPA divides by ``container-concurrency-target-percentage`` 0.7
   and so asks for two pods for one request at ``containerConcurrency: 1``.
2. **Scale up at once** when need exceeds the pods already asked for. Starting pods
   count as capacity that is coming, so a queue that waits for a cold start does not
   order a second pod for the same request on every tick.
3. **Scale down only after a stable window**: the target is the largest need seen in the
   last ``max(scale_down_delay_s, measured cold start)`` (the HorizontalPodAutoscaler's
   downscale ``stabilizationWindowSeconds`` rule; KPA uses an average over
   ``stable-window`` 60 s instead, which drops capacity while bursts still come back).
   Load that flaps faster than the window holds its peak, so the count does not flap.
   Why at least one cold start (ski rental): a pod removed and needed again within one
   cold start saves less billing than the cold start its replacement is billed, and
   makes requests wait that cold start too; the bench's autoscale scenario measures it.
4. **Keep one warm pod** while heavy work was seen within ``idle_to_zero_s``; after that
   the count may fall to ``min_pods`` (zero). A request that arrives at zero pods is
   need 1 > 0, rule 2: scale from zero on the same tick.
5. **Bounds**: at most ``max_scale_step`` pods added or removed per decision, then clamp to
   ``[min_pods, max_pods]``.

With ``wait_target_s`` > 0 (``--wait-target-s``) rule 1 sizes for a waiting time instead
of one pod per request: need = the fewest pods whose predicted p95 queue wait is at or
under the target (``sdproxy.core.queueing``: M/G/c, Erlang C with the arrival rate
measured over ``RATE_WINDOW_S`` and the measured service-time mean and variance), and
never fewer than the queue already there needs to drain within the target
(queued × service time / target servers, at most one per request) nor than run now.
Rules 2-5 apply to that need unchanged, so scale-in happens when fewer pods would have
met the target over the whole scale-down window. The target the model is solved for is
``wait_target_s`` × a factor in [1/32, 1] that an outer loop (``sdproxy.core.waitcontrol``)
moves by the queue waits measured (``Observation.waits``): down while more than 4 % of the
last hour's waits exceed ``wait_target_s``, back up while fewer than 2 % do.

With ``predict`` (``--predict``) the need is also at least the pods the forecast rate
(``sdproxy.core.forecast``: learned per minute of the day and weekday) needs at any
minute of the next cold start, so pods are READY when the predicted demand arrives; a
forecast recent traffic fell far short of is ignored (reactive alone), and one that is
too low changes nothing (the reactive need is the larger).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from sdproxy.core.forecast import Forecast
from sdproxy.core.queueing import servers_for_wait
from sdproxy.core.waitcontrol import WaitControl

#: the queue-wait quantile ``wait_target_s`` bounds
WAIT_QUANTILE = 0.95
#: arrivals are counted over this window for the measured rate
RATE_WINDOW_S = 120.0


@dataclass(frozen=True, kw_only=True)
class Observation:
    """What the runtime sees at one tick (admission counters + discovery)."""

    #: heavy requests running on pods now
    inflight: int
    #: heavy requests waiting in the shared queue
    queued: int
    #: pods taking work
    ready: int
    #: pods ordered but not ready yet (container starting, model loading, warm-up)
    starting: int
    #: heavy requests one pod runs at once (``--max-inflight``, sd-webui: 1)
    per_pod_limit: int = 1
    #: recent time from a pod being asked for to READY, as the runtime measured it
    #: (0: not measured yet); it lengthens the scale-down window, rule 3
    cold_start_s: float = 0.0
    #: heavy requests that arrived since the runtime started (a monotonic counter)
    arrivals: int = 0
    #: measured mean time of one generation (0: not measured yet) and its squared
    #: coefficient of variation (variance / mean²)
    service_s: float = 0.0
    service_scv: float = 1.0
    #: Unix time, for the time of day ``predict`` learns (None: not given)
    wall_s: float | None = None
    #: queue waits (seconds) of the heavy requests bound to a slot since the previous
    #: tick: what the wait target's outer loop (``sdproxy.core.waitcontrol``) measures
    waits: tuple[float, ...] = ()

    @property
    def demand(self) -> int:
        return self.inflight + self.queued


@dataclass(frozen=True, kw_only=True)
class AutoscaleConfig:
    """The policy's knobs. Each field is also the ``sdproxy serve`` option of the same name
    (``max_scale_step`` is ``--max-scale-step``): the settings module reads the ``help`` and
    ``min`` metadata, so a knob, its bound and its help text are declared here, once."""

    min_pods: int = field(default=0, metadata={"help": "never fewer pods", "min": 0})
    max_pods: int = field(default=4, metadata={"help": "never more pods", "min": 1})
    idle_to_zero_s: float = field(
        default=300.0,
        metadata={"help": "no heavy work for this long lets the count fall to min_pods", "min": 0},
    )
    scale_down_delay_s: float = field(
        default=60.0,
        metadata={
            "help": "a lower need must last this long before pods are removed (never less "
            "than one measured cold start: a shorter delay acts as the cold start)",
            "min": 0,
        },
    )
    max_scale_step: int = field(
        default=4, metadata={"help": "most pods added or removed in one decision", "min": 1}
    )
    wait_target_s: float = field(
        default=0.0,
        metadata={
            "help": "keep the p95 queue wait at or under this with the fewest pods (M/G/c "
            "model of the measured arrival rate and service time, its target tightened while "
            "the measured waits miss it); 0: one pod per request in flight or queued",
            "min": 0,
        },
    )
    predict: bool = field(
        default=False,
        metadata={
            "help": "learn the arrival rate by time of day and weekday and order pods one "
            "cold start ahead of the forecast (reactive when the forecast is wrong)",
            "switch": True,
        },
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            low, value = f.metadata.get("min"), getattr(self, f.name)
            if low is not None and value < low:
                raise ValueError(f"{f.name} must be >= {low}, got {value}")
        if self.max_pods < self.min_pods:
            raise ValueError(f"max_pods must be >= min_pods, got {self.max_pods} < {self.min_pods}")


@dataclass(frozen=True, kw_only=True)
class AutoscaleState:
    """What the policy remembers between ticks (start from ``AutoscaleState()``)."""

    #: the count asked for last time; None before the first decision
    last_desired: int | None = None
    #: last time heavy work was in flight or queued
    last_heavy_at: float | None = None
    #: (time, need) samples inside the scale-down window, oldest first
    history: tuple[tuple[float, int], ...] = ()
    #: (time, arrivals counter) samples covering the rate window, oldest first
    arrivals: tuple[tuple[float, int], ...] = ()
    #: what ``predict`` learned (None until the first tick with ``predict`` and wall time)
    forecast: Forecast | None = None
    #: the wait target's outer loop: measured waits and the model target's factor
    wait_control: WaitControl = field(default_factory=WaitControl)


@dataclass(frozen=True, kw_only=True)
class Decision:
    """Ask for ``desired`` pods; ``reason`` is for the scale-event log line."""

    desired: int
    previous: int
    reason: str
    #: measured arrivals per second over the rate window
    rate: float = 0.0
    #: forecast arrivals per second now, and the highest over the next cold start
    #: (None without ``predict`` or before anything was learned)
    forecast_rate: float | None = None
    forecast_peak: float | None = None
    #: whether the forecast is followed (False: recent traffic fell far short of it)
    forecast_trusted: bool = True
    #: the target the queueing model was solved for (``wait_target_s`` × the outer
    #: loop's factor; 0 without a wait target) and the share of the waits measured over
    #: ``wait_target_s`` in the loop's window (None: none measured)
    model_target_s: float = 0.0
    wait_over_share: float | None = None

    @property
    def changed(self) -> bool:
        return self.desired != self.previous


def pods_needed(observation: Observation) -> int:
    """Rule 1: pods to run every heavy request in flight or waiting, at once."""
    limit = max(1, observation.per_pod_limit)
    return math.ceil(observation.demand / limit)


def decide(
    observation: Observation, state: AutoscaleState, *, config: AutoscaleConfig, now: float
) -> tuple[Decision, AutoscaleState]:
    """One tick of the policy (rules in the module docstring)."""
    arrivals, rate, came = _arrival_rate(observation, state, now)
    forecast = state.forecast
    if config.predict and observation.wall_s is not None:
        forecast = (forecast or Forecast()).observe(wall_s=observation.wall_s, arrivals=came)
    control = state.wait_control
    if config.wait_target_s > 0.0:
        control = control.observe(observation.waits, target_s=config.wait_target_s, now=now)
    model_target = config.wait_target_s * control.factor
    sizing = _size(
        observation, rate=rate, forecast=forecast, model_target_s=model_target, config=config
    )
    need = sizing.need
    last_heavy = now if observation.demand > 0 else state.last_heavy_at
    window_s = max(config.scale_down_delay_s, observation.cold_start_s)
    window_start = now - window_s
    history = (*(s for s in state.history if s[0] >= window_start), (now, need))
    previous = state.last_desired
    if previous is None:
        previous = observation.ready + observation.starting
    target, reason = _target(
        observation=observation,
        sizing=sizing,
        held=max(n for _, n in history),
        previous=previous,
        idle_s=None if last_heavy is None else now - last_heavy,
        window_s=window_s,
        config=config,
    )
    desired = _bounded(target, previous=previous, config=config)
    if desired != target:
        reason += f"; bounded to {desired} (max_scale_step {config.max_scale_step}, "
        reason += f"pods {config.min_pods}..{config.max_pods})"
    new_state = AutoscaleState(
        last_desired=desired,
        last_heavy_at=last_heavy,
        history=history,
        arrivals=arrivals,
        forecast=forecast,
        wait_control=control,
    )
    decision = Decision(
        desired=desired,
        previous=previous,
        reason=reason,
        rate=rate,
        forecast_rate=sizing.forecast_rate,
        forecast_peak=sizing.forecast_peak,
        forecast_trusted=forecast.trusted if forecast is not None else True,
        model_target_s=model_target,
        wait_over_share=control.share_over,
    )
    return decision, new_state


def _arrival_rate(
    observation: Observation, state: AutoscaleState, now: float
) -> tuple[tuple[tuple[float, int], ...], float, int]:
    """(samples covering the rate window, arrivals per second over it, arrivals since
    the previous tick). A counter that went back (the runtime restarted) starts over."""
    total = observation.arrivals
    samples = state.arrivals
    if samples and total < samples[-1][1]:
        samples, came = (), 0  # how many came since is unknown: none learned
    else:
        came = total - samples[-1][1] if samples else total
    samples = (*samples, (now, total))
    cut = 0
    while cut + 1 < len(samples) and samples[cut + 1][0] <= now - RATE_WINDOW_S:
        cut += 1
    samples = samples[cut:]
    t0, n0 = samples[0]
    rate = (total - n0) / max(now - t0, RATE_WINDOW_S)
    return samples, rate, came


@dataclass(frozen=True, kw_only=True)
class _Sizing:
    """Rule 1's answer: the pods needed now, those the forecast needs, and why."""

    need: int
    #: pods the forecast needs over the next cold start (0: none, or not followed)
    ahead: int
    why: str
    forecast_rate: float | None = None
    forecast_peak: float | None = None


def _size(
    observation: Observation,
    *,
    rate: float,
    forecast: Forecast | None,
    model_target_s: float,
    config: AutoscaleConfig,
) -> _Sizing:
    """Rule 1: one pod per request, or the wait-target model (solved for the corrected
    target); then the forecast's floor."""
    per_pod = max(1, observation.per_pod_limit)
    service, target = observation.service_s, model_target_s
    model = _ModelInputs(
        service_s=service,
        scv=observation.service_scv,
        target_s=target,
        servers_limit=config.max_pods * per_pod,
    )
    if target > 0.0 and service > 0.0:
        servers = model.servers(rate)
        backlog = min(observation.demand, math.ceil(observation.queued * service / target))
        need = math.ceil(max(servers, backlog, observation.inflight) / per_pod)
        why = (
            f"wait target {config.wait_target_s:g}s (model {target:.3g}s): {rate:.3f}/s x "
            f"{service:.1f}s needs {servers} slots, the queue {backlog}"
        )
    else:
        need = pods_needed(observation)
        why = ""
    if forecast is None or observation.wall_s is None or not forecast.learned:
        return _Sizing(need=need, ahead=0, why=why)
    wall = observation.wall_s
    now_rate = forecast.rate_at(wall)
    peak = forecast.peak_rate(wall, wall + observation.cold_start_s)
    ahead = 0
    # worth ordering only if a pod ordered now would see work before it is given back
    worth = peak * (observation.cold_start_s + config.idle_to_zero_s) >= 1.0
    if forecast.trusted and worth and service > 0.0:
        ahead = math.ceil(model.servers(peak) / per_pod)
        if ahead > need:
            why = f"{why}; " if why else ""
            why += f"forecast {peak:.3f}/s within the next cold start needs {ahead}"
            need = ahead
    return _Sizing(need=need, ahead=ahead, why=why, forecast_rate=now_rate, forecast_peak=peak)


@dataclass(frozen=True, kw_only=True)
class _ModelInputs:
    service_s: float
    scv: float
    target_s: float
    servers_limit: int

    def servers(self, rate: float) -> int:
        return servers_for_wait(
            rate=rate,
            service_s=self.service_s,
            scv=self.scv,
            target_s=self.target_s,
            quantile=WAIT_QUANTILE,
            limit=self.servers_limit,
        )


def _target(
    *,
    observation: Observation,
    sizing: _Sizing,
    held: int,
    previous: int,
    idle_s: float | None,
    window_s: float,
    config: AutoscaleConfig,
) -> tuple[int, str]:
    """Rules 2-4: the unbounded target and why."""
    need = sizing.need
    seen = (
        f"demand {observation.demand} (in flight {observation.inflight}, queued "
        f"{observation.queued}), pods ready {observation.ready} starting {observation.starting}"
    )
    if sizing.why:
        seen += f"; {sizing.why}"
    if need > previous:
        return need, f"scale up: {seen}, need {need} > {previous} asked for"
    if idle_s is not None and idle_s >= config.idle_to_zero_s:
        if sizing.ahead > 0:
            return min(previous, sizing.ahead), f"hold for the forecast: {seen}"
        if previous > 0:
            return 0, f"scale to zero: no heavy work for {idle_s:.0f}s"
        return 0, "hold at zero: idle"
    floor = 0 if idle_s is None else 1  # rule 4: one warm pod until idle_to_zero_s
    target = min(previous, max(held, floor))
    if target < previous:
        why = f"scale down: peak need {held} over the last {window_s:.0f}s"
        if held < floor:
            why += f", one warm pod kept (idle {idle_s:.0f}s < {config.idle_to_zero_s:.0f}s)"
        return target, f"{why}; {seen}"
    return previous, f"hold: {seen}, need {need}, window peak {held}"


def _bounded(target: int, *, previous: int, config: AutoscaleConfig) -> int:
    """Rule 5: step bound around the previous count, then the min/max clamp."""
    step = config.max_scale_step
    stepped = max(previous - step, min(previous + step, target))
    return max(config.min_pods, min(config.max_pods, stepped))
