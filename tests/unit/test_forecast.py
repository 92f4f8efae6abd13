"""Unit tests: sdproxy.core.forecast — learning the day's shape minute by minute."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sdproxy.core.forecast import SLOT_S, SLOTS, TRUST_MINUTES, Forecast

MONDAY = 1_795_996_800.0  # 2026-11-30 00:00 UTC
DAY = SLOT_S * SLOTS


def feed(forecast: Forecast, start: float, per_minute: dict[int, int], *, minutes: int) -> Forecast:
    """Tick every 10 s for ``minutes`` minutes from ``start``; ``per_minute[m]`` arrivals
    in minute m of that span, spread over its ticks."""
    for m in range(minutes):
        n = per_minute.get(m, 0)
        for k in range(6):
            share = n // 6 + (1 if k < n % 6 else 0)
            forecast = forecast.observe(wall_s=start + m * SLOT_S + k * 10.0, arrivals=share)
    return forecast


def test_nothing_learned_forecasts_nothing() -> None:
    f = Forecast()
    assert not f.learned
    assert f.rate_at(MONDAY) == 0.0
    assert f.trusted


def test_a_day_teaches_the_next_day() -> None:
    """Day 1: 30 arrivals a minute from 09:00 to 10:00. Day 2 forecasts 0.5/s at 09:30,
    nothing at 03:00, and the ramp one cold start ahead of 09:00."""
    busy = {m: 30 for m in range(9 * 60, 10 * 60)}
    f = feed(Forecast(), MONDAY, busy, minutes=SLOTS + 1)
    assert f.learned
    assert f.rate_at(MONDAY + DAY + 9.5 * 3600) == pytest.approx(0.5)
    assert f.rate_at(MONDAY + DAY + 3 * 3600) == 0.0
    before = MONDAY + DAY + 9 * 3600 - 90.0
    assert f.rate_at(before) < 0.5 * 0.5  # the quarter-hour mean still ramps up
    assert f.peak_rate(before, before + 90.0) > f.rate_at(before)


def test_a_short_daily_burst_is_kept_sharp() -> None:
    """A two-minute batch job of 150 a minute over 10 a minute stands out of the
    quarter-hour mean, so its own minutes are forecast."""
    base = {m: 10 for m in range(SLOTS)}
    base.update({600: 150, 601: 150})
    f = feed(Forecast(), MONDAY, base, minutes=SLOTS + 1)
    tomorrow = MONDAY + DAY
    assert f.rate_at(tomorrow + 600 * SLOT_S) == pytest.approx(150 / SLOT_S)
    assert f.rate_at(tomorrow + 610 * SLOT_S) == pytest.approx(10 / SLOT_S, rel=0.01)


def test_later_days_move_the_profile_by_a_fraction() -> None:
    f = feed(Forecast(), MONDAY, {m: 60 for m in range(SLOTS)}, minutes=SLOTS)
    f = feed(f, MONDAY + DAY, {m: 0 for m in range(SLOTS)}, minutes=SLOTS + 1)
    assert 0.0 < f.rate_at(MONDAY + 2 * DAY + 3600) < 1.0  # 0.7 of 1/s


def test_forecast_far_above_actual_is_not_trusted() -> None:
    """A holiday: the forecast says 60 a minute, nothing comes."""
    f = feed(Forecast(), MONDAY, {m: 60 for m in range(SLOTS)}, minutes=SLOTS + 1)
    assert f.trusted
    f = feed(f, MONDAY + DAY + SLOT_S, {}, minutes=TRUST_MINUTES)
    assert not f.trusted
    assert f.recent_forecast > 10 * TRUST_MINUTES
    assert f.recent_actual == 0
    f = feed(f, MONDAY + DAY + (TRUST_MINUTES + 1) * SLOT_S, {m: 60 for m in range(20)}, minutes=20)
    assert f.trusted  # traffic came back


def test_weekday_factor() -> None:
    """Monday 60/min, Tuesday 20/min: once both are known, Tuesday's forecast is lower."""
    f = feed(Forecast(), MONDAY, {m: 60 for m in range(SLOTS)}, minutes=SLOTS)
    # a day's total is folded when the next day's first minute is
    f = feed(f, MONDAY + DAY, {m: 20 for m in range(SLOTS)}, minutes=SLOTS + 2)
    week = 7 * DAY
    monday, tuesday = f.rate_at(MONDAY + week + 3600), f.rate_at(MONDAY + week + DAY + 3600)
    assert monday > tuesday
    assert monday / tuesday == pytest.approx(3.0, rel=0.01)


def test_a_long_gap_is_not_learned_as_silence() -> None:
    f = feed(Forecast(), MONDAY, {0: 30}, minutes=2)
    f = f.observe(wall_s=MONDAY + 3600, arrivals=0)  # the proxy was down for an hour
    assert sum(f.days) == 2  # minutes 0 and 1, not the hour in between


def test_document_round_trip_is_small_json() -> None:
    f = feed(Forecast(), MONDAY, {m: 7 for m in range(SLOTS)}, minutes=SLOTS + 1)
    text = json.dumps(f.to_document())
    assert len(text) < 20_000
    back = Forecast.from_document(json.loads(text))
    assert back.rate_at(MONDAY + DAY + 100) == pytest.approx(f.rate_at(MONDAY + DAY + 100))


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param([], id="not-object"),
        pytest.param({"version": 2, "slot_s": 60.0}, id="version"),
        pytest.param({"version": 1, "slot_s": 60.0, "counts": [1.0]}, id="short"),
        pytest.param(
            {
                "version": 1,
                "slot_s": 60.0,
                "counts": [-1.0] * SLOTS,
                "days": [0] * SLOTS,
                "weekdays": [0.0] * 7,
            },
            id="negative",
        ),
        pytest.param(
            {
                "version": 1,
                "slot_s": 60.0,
                "counts": [0.0] * SLOTS,
                "days": [0.5] * SLOTS,
                "weekdays": [0.0] * 7,
            },
            id="days-not-int",
        ),
    ],
)
def test_bad_document_is_a_clear_error(doc: Any) -> None:
    with pytest.raises(ValueError):
        Forecast.from_document(doc)
