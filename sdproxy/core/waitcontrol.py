"""Core: the outer loop of ``--wait-target-s`` — correct the model by the waits measured.

One job: the queueing model (``sdproxy.core.queueing``) predicts the steady-state wait of
Poisson arrivals; bursts, cold starts and a wrong service-time estimate are outside it, so
the p95 it promises is not the p95 requests get. ``WaitControl`` watches the queue waits
that requests really had and scales the target the model is solved for, the *model
target* = operator target × ``factor``, with ``factor`` in [``FACTOR_MIN``, 1]:

- **Measured.** The p95 wait is at or under S exactly when at most 5 % of the waits exceed
  S, so the loop counts, over the last ``WINDOW_S``, the waits and those over S (one
  bucket per ``BUCKET_S``, so the state stays small whatever the load): ``share_over``.
- **Shrink** while the share is over ``SHRINK_ABOVE`` (a margin under the 5 % a p95 may
  spend): ``factor`` falls by half every ``HALVE_S``. More pods for the same load, and
  the queue-drain rule (queued × service time / model target) orders more at once.
- **Relax** while the share is under ``RELAX_BELOW``: ``factor`` doubles every
  ``DOUBLE_S``, back toward 1 (the operator's own target). In between (hysteresis) it
  holds, so the loop does not hunt around the budget.
- **Bounded.** ``factor`` never leaves [``FACTOR_MIN``, 1]: the loop never sizes for a
  looser target than asked, and at the bottom the model already asks for pods enough
  that hardly anyone waits (a smaller target adds nothing but cost).
- **Blind without samples.** Fewer than ``MIN_SAMPLES`` waits in the window (night): it
  holds; a window that emptied keeps the last factor, so a quiet hour does not forget
  what the bursts taught.

Pure: waits and time are arguments; the runtime passes the waits of the requests bound to
a slot since its previous tick.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: the share of waits a p95 may spend over the target
BUDGET = 0.05
#: shrink the model target above this share over, relax it below this one
SHRINK_ABOVE = 0.8 * BUDGET
RELAX_BELOW = 0.4 * BUDGET
#: how fast: the factor halves in HALVE_S while over, doubles in DOUBLE_S while under
HALVE_S = 300.0
DOUBLE_S = 1800.0
#: the smallest factor (model target = operator target / 32)
FACTOR_MIN = 1.0 / 32.0
#: the measured share covers this long, in buckets of BUCKET_S
WINDOW_S = 3600.0
BUCKET_S = 60.0
#: fewer waits than this in the window: too few to judge, hold
MIN_SAMPLES = 100
#: a longer gap between two observations counts as this long (a stalled loop does not
#: move the factor all the way at once)
MAX_STEP_S = 60.0


@dataclass(frozen=True, kw_only=True)
class WaitControl:
    """The correction factor and the windowed counts it is steered by."""

    factor: float = 1.0
    #: (bucket start, waits, waits over the target), oldest first, inside WINDOW_S
    buckets: tuple[tuple[float, int, int], ...] = ()
    last_at: float | None = None

    @property
    def waited(self) -> int:
        return sum(n for _, n, _ in self.buckets)

    @property
    def share_over(self) -> float | None:
        """Share of the window's waits over the target (None: none measured)."""
        n = self.waited
        return None if n == 0 else sum(o for _, _, o in self.buckets) / n

    def observe(self, waits: Sequence[float], *, target_s: float, now: float) -> WaitControl:
        """Fold in the waits measured since the previous call, then move the factor."""
        over = sum(1 for w in waits if w > target_s)
        start = math.floor(now / BUCKET_S) * BUCKET_S
        kept = tuple(b for b in self.buckets if b[0] > now - WINDOW_S)
        if kept and kept[-1][0] == start:
            _, n0, o0 = kept[-1]
            kept = (*kept[:-1], (start, n0 + len(waits), o0 + over))
        elif waits:
            kept = (*kept, (start, len(waits), over))
        step = 0.0 if self.last_at is None else min(MAX_STEP_S, max(0.0, now - self.last_at))
        moved = WaitControl(factor=self.factor, buckets=kept, last_at=now)
        share = moved.share_over
        factor = self.factor
        if share is not None and moved.waited >= MIN_SAMPLES:
            if share > SHRINK_ABOVE:
                factor *= 0.5 ** (step / HALVE_S)
            elif share < RELAX_BELOW:
                factor *= 2.0 ** (step / DOUBLE_S)
        factor = min(1.0, max(FACTOR_MIN, factor))
        return WaitControl(factor=factor, buckets=kept, last_at=now)
