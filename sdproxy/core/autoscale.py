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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields


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
        metadata={"help": "a lower need must last this long before pods are removed", "min": 0},
    )
    max_scale_step: int = field(
        default=4, metadata={"help": "most pods added or removed in one decision", "min": 1}
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


@dataclass(frozen=True, kw_only=True)
class Decision:
    """Ask for ``desired`` pods; ``reason`` is for the scale-event log line."""

    desired: int
    previous: int
    reason: str

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
    need = pods_needed(observation)
    last_heavy = now if observation.demand > 0 else state.last_heavy_at
    window_s = max(config.scale_down_delay_s, observation.cold_start_s)
    window_start = now - window_s
    history = (*(s for s in state.history if s[0] >= window_start), (now, need))
    previous = state.last_desired
    if previous is None:
        previous = observation.ready + observation.starting
    target, reason = _target(
        observation=observation,
        need=need,
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
    new_state = AutoscaleState(last_desired=desired, last_heavy_at=last_heavy, history=history)
    return Decision(desired=desired, previous=previous, reason=reason), new_state


def _target(
    *,
    observation: Observation,
    need: int,
    held: int,
    previous: int,
    idle_s: float | None,
    window_s: float,
    config: AutoscaleConfig,
) -> tuple[int, str]:
    """Rules 2-4: the unbounded target and why."""
    seen = (
        f"demand {observation.demand} (in flight {observation.inflight}, queued "
        f"{observation.queued}), pods ready {observation.ready} starting {observation.starting}"
    )
    if need > previous:
        return need, f"scale up: {seen}, need {need} > {previous} asked for"
    if idle_s is not None and idle_s >= config.idle_to_zero_s:
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
