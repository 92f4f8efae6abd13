"""Core: the arrival forecast behind ``--predict`` — the day's shape, learned.

One job: count heavy arrivals per minute of the (UTC) day, remember them across days, and
answer "how many arrivals per second at that time of day" so the autoscaler can order pods
one cold start before the demand comes. Everything is a pure function of the values passed
in; the runtime persists ``to_document()`` as JSON (``--predict-state``).

The model, stated once (docs/autoscaling.md has the why):

- **Profile.** 1,440 one-minute slots. When a minute ends, its count is folded into its
  slot: the first day sets it, later days move it by ``DAY_ALPHA`` (an exponentially
  weighted mean over days, so a changed habit is learned in a few days).
- **Rate at a time of day.** The mean of the learned slots within ±``SMOOTH`` minutes
  (a quarter of an hour: a Poisson count of one minute is too noisy to size pods from),
  unless the slot's own count stands out of that mean, up or down, by more than
  ``SPIKE_SIGMAS`` Poisson standard deviations (a daily batch job that lasts two minutes,
  the quiet minutes just before a sharp start): then the slot's own rate. A slot never
  learned forecasts nothing.
- **Weekday.** The day's total is folded per weekday; a weekday's rate is the profile
  times its total over the mean of the learned weekdays' totals (1.0 until two weekdays
  are known). A day seen for less than ``FULL_DAY`` of its minutes is not folded.
- **Trust.** The last ``TRUST_MINUTES`` folded minutes keep (forecast, actual), the
  forecast being the slot's own learned count; when the
  forecast expected at least ``TRUST_MIN_EXPECTED`` arrivals and fewer than
  ``TRUST_RATIO`` of them came (a holiday, a shifted day), the forecast is not trusted and
  the autoscaler is reactive alone until actual traffic catches up with it. A forecast
  that is too LOW (a burst) needs no such rule: the reactive part sizes for what comes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

SLOT_S = 60.0
SLOTS = 1440
DAY_S = SLOT_S * SLOTS
SMOOTH = 7
SPIKE_SIGMAS = 3.0
#: a spike must also be this many arrivals over the smooth mean
SPIKE_MIN = 3.0
DAY_ALPHA = 0.3
FULL_DAY = 0.9
#: minutes without a tick (a stalled loop) still folded as zero arrivals; longer gaps
#: (the proxy was down) are not learned
GAP_MINUTES = 5
TRUST_MINUTES = 15
TRUST_MIN_EXPECTED = 20.0
TRUST_RATIO = 0.5
DOCUMENT_VERSION = 1


def _weekday(day: int) -> int:
    """Monday = 0 for a day number since the Unix epoch (1970-01-01 was a Thursday)."""
    return (day + 3) % 7


@dataclass(frozen=True, kw_only=True)
class Forecast:
    """What was learned, and the minute being counted now."""

    #: arrivals per minute, one slot per minute of the UTC day
    counts: tuple[float, ...] = (0.0,) * SLOTS
    #: days folded into each slot (0: never seen)
    days: tuple[int, ...] = (0,) * SLOTS
    #: daily totals per weekday (Monday first; 0: never seen)
    weekdays: tuple[float, ...] = (0.0,) * 7
    #: the absolute minute (Unix time // 60) being counted, and its arrivals so far
    minute: int | None = None
    count: int = 0
    #: the absolute day being totalled, its arrivals and the minutes of it seen
    day: int | None = None
    day_total: float = 0.0
    day_minutes: int = 0
    #: (forecast, actual) arrivals of the last folded minutes, oldest first
    recent: tuple[tuple[float, int], ...] = ()

    @property
    def learned(self) -> bool:
        return any(self.days)

    # -- learning ------------------------------------------------------------------------

    def observe(self, *, wall_s: float, arrivals: int) -> Forecast:
        """``arrivals`` heavy requests came since the previous call, which was at or
        before ``wall_s`` (Unix seconds)."""
        minute = math.floor(wall_s / SLOT_S)
        if self.minute is None or minute < self.minute:  # first call, or clock went back
            return replace(self, minute=minute, count=arrivals)
        if minute == self.minute:
            return replace(self, count=self.count + arrivals)
        out = self._fold(self.minute, self.count)
        if minute - self.minute <= GAP_MINUTES:
            for skipped in range(self.minute + 1, minute):
                out = out._fold(skipped, 0)
        return replace(out, minute=minute, count=arrivals)

    def _fold(self, minute: int, count: int) -> Forecast:
        slot, day = minute % SLOTS, minute // SLOTS
        out = self._roll_day(day)
        recent = out.recent
        if out.days[slot]:
            # the slot's own count, not the smoothed rate: the quarter-hour mean leaks a
            # morning's start into the minutes before it, where nothing comes yet
            expected = out.counts[slot] * out._weekday_factor(day)
            recent = (*recent[-(TRUST_MINUTES - 1) :], (expected, count))
        old, seen = out.counts[slot], out.days[slot]
        new = float(count) if seen == 0 else old + DAY_ALPHA * (count - old)
        return replace(
            out,
            counts=(*out.counts[:slot], new, *out.counts[slot + 1 :]),
            days=(*out.days[:slot], min(seen + 1, 9999), *out.days[slot + 1 :]),
            day_total=out.day_total + count,
            day_minutes=out.day_minutes + 1,
            recent=recent,
        )

    def _roll_day(self, day: int) -> Forecast:
        if self.day == day:
            return self
        weekdays = self.weekdays
        if self.day is not None and self.day_minutes >= FULL_DAY * SLOTS:
            total = self.day_total * SLOTS / self.day_minutes
            w = _weekday(self.day)
            old = weekdays[w]
            new = total if old <= 0.0 else old + DAY_ALPHA * (total - old)
            weekdays = (*weekdays[:w], new, *weekdays[w + 1 :])
        return replace(self, weekdays=weekdays, day=day, day_total=0.0, day_minutes=0)

    # -- forecasting ---------------------------------------------------------------------

    def _weekday_factor(self, day: int) -> float:
        known = [t for t in self.weekdays if t > 0.0]
        mine = self.weekdays[_weekday(day)]
        if len(known) < 2 or mine <= 0.0:
            return 1.0
        return mine / (sum(known) / len(known))

    def rate_at(self, wall_s: float) -> float:
        """Forecast arrivals per second at ``wall_s`` (0.0 where nothing was learned)."""
        minute = math.floor(wall_s / SLOT_S)
        slot = minute % SLOTS
        if not self.days[slot]:
            return 0.0
        total, known = 0.0, 0
        for i in range(slot - SMOOTH, slot + SMOOTH + 1):
            j = i % SLOTS
            if self.days[j]:
                total, known = total + self.counts[j], known + 1
        smooth = total / known
        own = self.counts[slot]
        # the slot's own count where it stands out of the mean (a short batch job, the
        # first or last busy minute of a step): the mean would blur it over the quarter
        per_minute = (
            own if abs(own - smooth) > SPIKE_SIGMAS * math.sqrt(smooth) + SPIKE_MIN else smooth
        )
        return per_minute / SLOT_S * self._weekday_factor(minute // SLOTS)

    def peak_rate(self, start_s: float, end_s: float) -> float:
        """The highest forecast rate over the minutes from ``start_s`` to ``end_s``."""
        first, last = math.floor(start_s / SLOT_S), math.floor(end_s / SLOT_S)
        return max(self.rate_at(m * SLOT_S) for m in range(first, max(first, last) + 1))

    @property
    def trusted(self) -> bool:
        """False while recent traffic fell far short of what was forecast."""
        expected = sum(e for e, _ in self.recent)
        actual = sum(a for _, a in self.recent)
        return expected < TRUST_MIN_EXPECTED or actual >= TRUST_RATIO * expected

    @property
    def recent_forecast(self) -> float:
        return sum(e for e, _ in self.recent)

    @property
    def recent_actual(self) -> int:
        return sum(a for _, a in self.recent)

    # -- persistence (the runtime writes and reads the file) -----------------------------

    def to_document(self) -> dict[str, Any]:
        """A small JSON-serialisable document of what was learned."""
        return {
            "version": DOCUMENT_VERSION,
            "slot_s": SLOT_S,
            "counts": [round(c, 3) for c in self.counts],
            "days": list(self.days),
            "weekdays": [round(t, 1) for t in self.weekdays],
        }

    @classmethod
    def from_document(cls, doc: Any) -> Forecast:
        """The inverse of ``to_document``; ValueError names what is wrong."""
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("version") != DOCUMENT_VERSION or doc.get("slot_s") != SLOT_S:
            raise ValueError(f"unknown version/slot_s {doc.get('version')}/{doc.get('slot_s')}")
        counts, days, weekdays = doc.get("counts"), doc.get("days"), doc.get("weekdays")
        if not (isinstance(counts, list) and len(counts) == SLOTS):
            raise ValueError(f"counts must be a list of {SLOTS} numbers")
        if not (isinstance(days, list) and len(days) == SLOTS):
            raise ValueError(f"days must be a list of {SLOTS} integers")
        if not (isinstance(weekdays, list) and len(weekdays) == 7):
            raise ValueError("weekdays must be a list of 7 numbers")
        numbers = (*counts, *weekdays)
        if not all(_finite_non_negative(v) for v in numbers):
            raise ValueError("counts and weekdays must be finite numbers >= 0")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in days):
            raise ValueError("days must be integers >= 0")
        return cls(
            counts=tuple(float(c) for c in counts),
            days=tuple(days),
            weekdays=tuple(float(t) for t in weekdays),
        )


def _finite_non_negative(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )
