"""Unit tests: sdproxy.core.waitcontrol — the wait target's outer loop, tick by tick."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdproxy.core import waitcontrol as wc
from sdproxy.core.waitcontrol import WaitControl

TARGET = 10.0
TICK = 2.0


def waits(n: int, over: int) -> tuple[float, ...]:
    """``n`` queue waits of which ``over`` exceed the 10 s target."""
    return (30.0,) * over + (0.5,) * (n - over)


def run(control: WaitControl, ticks: int, batch: tuple[float, ...], *, t0: float) -> WaitControl:
    for i in range(ticks):
        control = control.observe(batch, target_s=TARGET, now=t0 + i * TICK)
    return control


def test_starts_at_the_operators_target_and_holds_without_enough_samples() -> None:
    c = WaitControl()
    assert c.factor == 1.0 and c.share_over is None
    # every wait over the target, but only 50 of them in the window: too few to judge
    c = run(c, 50, waits(1, 1), t0=0.0)
    assert c.waited == 50 and c.share_over == 1.0
    assert c.factor == 1.0


def test_shrinks_by_half_per_halving_time_while_over() -> None:
    c = run(WaitControl(), 60, waits(10, 5), t0=0.0)  # 600 waits, half over
    start, at = c.factor, 59 * TICK
    c = run(c, int(wc.HALVE_S / TICK), waits(10, 5), t0=at + TICK)
    assert c.factor == pytest.approx(start * 0.5, rel=0.02)


def test_bounded_below_and_above() -> None:
    c = run(WaitControl(), 3000, waits(10, 10), t0=0.0)  # 100 minutes, every wait over
    assert c.factor == wc.FACTOR_MIN
    c = run(c, 3000, waits(10, 10), t0=6000.0)
    assert c.factor == wc.FACTOR_MIN  # never below
    # then no wait over the target: back to the operator's own target, never looser
    c = run(c, 10_000, waits(10, 0), t0=12_000.0)
    assert c.factor == 1.0


def test_hysteresis_holds_between_the_thresholds() -> None:
    c = WaitControl(factor=0.25)
    share = (wc.SHRINK_ABOVE + wc.RELAX_BELOW) / 2  # 3 %
    c = run(c, 2000, waits(100, round(100 * share)), t0=0.0)
    assert c.share_over == pytest.approx(share)
    assert c.factor == 0.25


def test_the_window_forgets_old_waits() -> None:
    """A burst's waits count for WINDOW_S, then quiet waits relax the factor again."""
    c = run(WaitControl(), 150, waits(10, 10), t0=0.0)  # 5 minutes of a burst
    low = c.factor
    assert low < 1.0
    t = 150 * TICK + wc.WINDOW_S
    c = run(c, 30, waits(10, 0), t0=t)  # an hour later: only quiet waits in the window
    assert c.share_over == 0.0
    assert c.factor > low


def test_a_stalled_loop_moves_the_factor_by_one_step_only() -> None:
    c = run(WaitControl(), 60, waits(10, 10), t0=0.0)
    before = c.factor
    c = c.observe(waits(10, 10), target_s=TARGET, now=118.0 + 900.0)  # 15 minutes later
    assert c.factor == pytest.approx(before * 0.5 ** (wc.MAX_STEP_S / wc.HALVE_S))


def test_buckets_stay_few_whatever_the_load() -> None:
    c = run(WaitControl(), 5000, waits(200, 1), t0=0.0)  # 2.8 hours, 100 waits/s
    assert len(c.buckets) <= wc.WINDOW_S / wc.BUCKET_S + 1


def plant(factor: float) -> int:
    """A toy system of 100 waits a tick: the share over the target grows with the model
    target (factor 1: 20 % over; 0.1: 2 %)."""
    return round(20 * factor)


def test_closed_loop_converges_into_the_band_and_stays() -> None:
    """Steered by a system whose waits improve with a smaller model target, the factor
    settles where the measured share is inside the hysteresis band (2-4 %: factors
    0.1-0.2 here) within three hours, and stays there. On the way it overshoots: the
    window still holds the waits of the larger factor after the factor fell."""
    c, t, trail = WaitControl(), 0.0, []
    for _ in range(6 * 1800):  # 6 hours of 2 s ticks
        c = c.observe(waits(100, plant(c.factor)), target_s=TARGET, now=t)
        trail.append(c.factor)
        t += TICK
    assert min(trail) == wc.FACTOR_MIN  # the overshoot, bounded
    settled = trail[3 * 1800 :]  # the last 3 hours
    assert all(0.1 <= f <= 0.2 for f in settled), (min(settled), max(settled))
    assert max(settled) == min(settled)  # no hunting inside the band
    share = c.share_over
    assert share is not None and wc.RELAX_BELOW <= share <= wc.SHRINK_ABOVE + 0.01


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.integers(0, 50), st.floats(0.0, 120.0)),
        min_size=1,
        max_size=200,
    )
)
def test_factor_always_within_bounds(steps: list[tuple[int, int, float]]) -> None:
    c, t = WaitControl(), 0.0
    for n, over, dt in steps:
        t += dt
        c = c.observe(waits(n + over, over), target_s=TARGET, now=t)
        assert wc.FACTOR_MIN <= c.factor <= 1.0
        share = c.share_over
        assert share is None or 0.0 <= share <= 1.0
