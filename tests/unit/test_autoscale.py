"""Unit tests: sdproxy.core.autoscale — the pure scaling policy, tick by tick in virtual time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdproxy.core.autoscale import (
    AutoscaleConfig,
    AutoscaleState,
    Decision,
    Observation,
    decide,
    pods_needed,
)

CFG = AutoscaleConfig(
    min_pods=0, max_pods=10, idle_to_zero_s=300.0, scale_down_delay_s=60.0, max_scale_step=4
)


def obs(*, inflight: int = 0, queued: int = 0, ready: int = 0, starting: int = 0) -> Observation:
    return Observation(
        inflight=inflight, queued=queued, ready=ready, starting=starting, per_pod_limit=1
    )


def state(*, desired: int, heavy_at: float | None = None) -> AutoscaleState:
    return AutoscaleState(last_desired=desired, last_heavy_at=heavy_at)


class Clock:
    """Ticks the policy with a virtual clock, carrying the state like the runtime does."""

    def __init__(self, config: AutoscaleConfig = CFG, *, start: AutoscaleState | None = None):
        self.config, self.now = config, 0.0
        self.state = start or AutoscaleState()
        self.decisions: list[Decision] = []

    def tick(self, observation: Observation, *, dt: float = 2.0) -> int:
        decision, self.state = decide(observation, self.state, config=self.config, now=self.now)
        self.decisions.append(decision)
        self.now += dt
        return decision.desired

    def run(self, observations: Sequence[Observation], *, dt: float = 2.0) -> list[int]:
        return [self.tick(o, dt=dt) for o in observations]


# -- single decisions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("observation", "before", "expected"),
    [
        pytest.param(obs(queued=1), state(desired=0), 1, id="arrival-at-zero-scales-from-zero"),
        pytest.param(obs(queued=3), state(desired=0), 3, id="burst-at-zero-one-pod-each"),
        pytest.param(
            obs(inflight=2, queued=3, ready=2), state(desired=2), 5, id="queue-adds-deficit"
        ),
        pytest.param(
            obs(queued=3, starting=3), state(desired=3), 3, id="starting-pods-count-no-reorder"
        ),
        pytest.param(
            obs(inflight=1, queued=2, ready=1, starting=2),
            state(desired=3, heavy_at=0.0),
            3,
            id="cold-start-covered-hold",
        ),
        pytest.param(obs(queued=30), state(desired=2), 6, id="max-step-bounds-burst"),
        pytest.param(obs(queued=30), state(desired=8), 10, id="max-pods-clamps"),
        pytest.param(obs(inflight=1, ready=1), state(desired=1), 1, id="steady-one"),
    ],
)
def test_single_decision(observation: Observation, before: AutoscaleState, expected: int) -> None:
    decision, after = decide(observation, before, config=CFG, now=10.0)
    assert decision.desired == expected
    assert after.last_desired == expected
    assert decision.reason


def test_per_pod_limit_divides_demand() -> None:
    observation = Observation(inflight=4, queued=3, ready=2, starting=0, per_pod_limit=4)
    assert pods_needed(observation) == 2
    decision, _ = decide(observation, state(desired=2), config=CFG, now=0.0)
    assert decision.desired == 2


def test_first_decision_starts_from_observed_pods() -> None:
    decision, _ = decide(obs(inflight=2, ready=2), AutoscaleState(), config=CFG, now=0.0)
    assert (decision.previous, decision.desired, decision.changed) == (2, 2, False)


def test_min_pods_floor_even_when_idle() -> None:
    config = AutoscaleConfig(min_pods=2, max_pods=10, idle_to_zero_s=10.0, max_scale_step=4)
    assert Clock(config).run([obs()] * 100)[-1] == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"min_pods": -1}, id="negative-min"),
        pytest.param({"min_pods": 3, "max_pods": 2}, id="min-above-max"),
        pytest.param({"max_pods": 0}, id="max-zero"),
        pytest.param({"max_scale_step": 0}, id="step-zero"),
        pytest.param({"idle_to_zero_s": -1.0}, id="negative-idle"),
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AutoscaleConfig(**kwargs)


# -- tick by tick ------------------------------------------------------------------------


def test_cold_start_does_not_over_order() -> None:
    """Three requests wait 90 s for their pods: three pods are asked for, once."""
    clock = Clock()
    starting = [obs(queued=3, starting=min(3, 3 * i)) for i in range(45)]
    desired = clock.run([obs(queued=3), *starting])
    assert set(desired) == {3}
    assert sum(d.changed for d in clock.decisions) == 1


def test_burst_scales_up_at_once_then_down_after_window() -> None:
    clock = Clock()
    up = clock.run([obs(inflight=1, ready=1), obs(inflight=1, queued=5, ready=1)])
    assert up == [1, 5]  # one tick, bounded by max_scale_step 4 only
    busy = clock.run([obs(inflight=5, ready=5)] * 10)
    assert set(busy) == {5}
    after = clock.run([obs(inflight=1, ready=5)] * 40)
    drop = next(i for i, d in enumerate(after) if d < 5)
    assert clock.decisions[len(up) + len(busy) + drop].desired == 1
    assert 60.0 <= drop * 2.0 + 2.0 <= 64.0  # the window, measured from the last 5-pod need


def test_flapping_load_does_not_flap_pods() -> None:
    """Demand alternating 6 and 1 every 20 s (shorter than the 60 s window) holds 6 pods."""
    clock = Clock()
    pattern = [obs(inflight=6, ready=6)] * 10 + [obs(inflight=1, ready=6)] * 10
    desired = clock.run(pattern * 10)
    assert set(desired) == {6}


def test_steady_load_holds() -> None:
    clock = Clock()
    desired = clock.run([obs(inflight=3, queued=0, ready=3)] * 300)
    assert set(desired) == {3}
    assert "hold" in clock.decisions[-1].reason


def test_idle_keeps_one_warm_pod_then_zero() -> None:
    clock = Clock()
    clock.run([obs(inflight=2, ready=2)] * 5)  # heavy work ends at t = 8
    last_heavy = clock.now - 2.0
    idle = clock.run([obs(ready=2)] * 200)
    assert 1 in idle
    first_zero = next(i for i, d in enumerate(idle) if d == 0)
    zero_at = clock.now - (len(idle) - first_zero) * 2.0
    assert zero_at - last_heavy == pytest.approx(300.0, abs=2.0)
    assert "scale to zero" in clock.decisions[5 + first_zero].reason
    assert set(idle[first_zero:]) == {0}


def test_arrival_at_zero_is_immediate_after_idle() -> None:
    clock = Clock()
    clock.run([obs(inflight=1, ready=1)] + [obs(ready=1)] * 200)
    assert clock.state.last_desired == 0
    assert clock.tick(obs(queued=1)) == 1


def test_large_burst_respects_step_and_max() -> None:
    clock = Clock()
    desired = clock.run([obs(queued=40, starting=0)] * 5)
    assert desired == [4, 8, 10, 10, 10]


# -- properties --------------------------------------------------------------------------

observations = st.builds(
    Observation,
    inflight=st.integers(0, 50),
    queued=st.integers(0, 200),
    ready=st.integers(0, 30),
    starting=st.integers(0, 30),
    per_pod_limit=st.integers(1, 4),
)


@st.composite
def configs(draw: st.DrawFn) -> AutoscaleConfig:
    low = draw(st.integers(0, 5))
    return AutoscaleConfig(
        min_pods=low,
        max_pods=draw(st.integers(max(1, low), 25)),
        idle_to_zero_s=draw(st.floats(0.0, 600.0)),
        scale_down_delay_s=draw(st.floats(0.0, 300.0)),
        max_scale_step=draw(st.integers(1, 8)),
    )


@settings(max_examples=200, deadline=None)
@given(
    config=configs(),
    steps=st.lists(st.tuples(observations, st.floats(0.0, 120.0)), min_size=1, max_size=40),
)
def test_desired_within_bounds_and_step(
    config: AutoscaleConfig, steps: list[tuple[Observation, float]]
) -> None:
    state_, now = AutoscaleState(last_desired=config.min_pods), 0.0
    for observation, dt in steps:
        now += dt
        decision, state_ = decide(observation, state_, config=config, now=now)
        assert config.min_pods <= decision.desired <= config.max_pods
        assert abs(decision.desired - decision.previous) <= config.max_scale_step
        assert len(state_.history) >= 1
        if pods_needed(observation) > decision.previous:
            assert decision.desired > decision.previous or decision.desired == config.max_pods


@pytest.mark.parametrize(
    ("cold_start_s", "held_s"),
    [
        pytest.param(0.0, 60.0, id="unmeasured-uses-scale-down-delay"),
        pytest.param(30.0, 60.0, id="short-cold-start-uses-delay"),
        pytest.param(90.0, 90.0, id="long-cold-start-holds-one-cold-start"),
    ],
)
def test_scale_down_window_is_at_least_one_cold_start(cold_start_s: float, held_s: float) -> None:
    clock = Clock()

    def seen(inflight: int) -> Observation:
        return Observation(
            inflight=inflight, queued=0, ready=4, starting=0, cold_start_s=cold_start_s
        )

    clock.run([seen(4)])
    after = clock.run([seen(1)] * 60)
    drop = next(i for i, d in enumerate(after) if d < 4)
    assert (drop + 1) * 2.0 == pytest.approx(held_s, abs=2.0)
