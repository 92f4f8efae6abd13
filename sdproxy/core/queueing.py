"""Core: the queueing model behind ``--wait-target-s`` — how many pods keep waits short.

One job: given an arrival rate λ (requests per second), the service-time distribution
(mean ``service_s``, squared coefficient of variation ``scv`` = variance / mean²) and a
wait target, return the fewest servers c whose predicted ``quantile`` queue wait is at or
under the target. The model (documented with its assumptions in docs/autoscaling.md):

- **M/M/c, Erlang C.** With offered load a = λ·service_s (erlangs) and c servers
  (c > a), the probability that an arrival waits is Erlang C, ``C(c, a)``, and the wait
  of those who do is exponential with rate (c − a) / service_s, so
  ``P(W > t) = C(c, a) · exp(−(c − a) · t / service_s)``.
- **M/G/c, Allen–Cunneen.** For a general service time the wait scales by
  (1 + scv) / 2 (exact for M/M/c, scv = 1; deterministic service, scv = 0, halves it).
  The p-quantile of the wait is therefore 0 when ``C(c, a) <= 1 − p`` and otherwise
  ``k · service_s · ln(C / (1 − p)) / (c − a)`` with k = (1 + scv) / 2.
- Erlang C comes from the Erlang B recurrence (B(0) = 1, B(n) = a·B / (n + a·B)),
  which is numerically stable for any c, and C = c·B / (c − a·(1 − B)).

``ServiceStats`` is the running estimate of the service-time distribution the runtime
feeds from completed generations (exponentially weighted mean and second moment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: weight of the newest sample in the service-time moments
SERVICE_ALPHA = 0.05


def erlang_c(servers: int, load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue (1.0 when c <= a)."""
    if load <= 0.0:
        return 0.0
    if servers <= load:
        return 1.0
    b = 1.0
    for n in range(1, servers + 1):
        b = load * b / (n + load * b)
    return servers * b / (servers - load * (1.0 - b))


def wait_quantile_s(
    *, servers: int, rate: float, service_s: float, scv: float, quantile: float
) -> float:
    """The ``quantile`` of the queue wait (seconds) with ``servers``; inf if unstable."""
    if rate <= 0.0 or service_s <= 0.0:
        return 0.0
    load = rate * service_s
    if servers <= load:
        return math.inf
    waits = erlang_c(servers, load)
    tail = 1.0 - quantile
    if waits <= tail:
        return 0.0
    k = (1.0 + max(0.0, scv)) / 2.0
    return k * service_s * math.log(waits / tail) / (servers - load)


def servers_for_wait(
    *, rate: float, service_s: float, scv: float, target_s: float, quantile: float, limit: int
) -> int:
    """Fewest servers whose ``quantile`` wait is <= ``target_s`` (at most ``limit``;
    0 when nothing arrives)."""
    if rate <= 0.0 or service_s <= 0.0:
        return 0
    load = rate * service_s
    c = math.floor(load) + 1
    while c < limit and (
        wait_quantile_s(servers=c, rate=rate, service_s=service_s, scv=scv, quantile=quantile)
        > target_s
    ):
        c += 1
    return max(1, min(c, limit))


@dataclass(frozen=True, kw_only=True)
class ServiceStats:
    """Exponentially weighted first and second moments of the service time."""

    #: completed generations seen (the first sample sets the moments)
    count: int = 0
    mean_s: float = 0.0
    second: float = 0.0

    def observe(self, seconds: float) -> ServiceStats:
        if seconds < 0.0 or not math.isfinite(seconds):
            return self
        if self.count == 0:
            return ServiceStats(count=1, mean_s=seconds, second=seconds * seconds)
        a = SERVICE_ALPHA if self.count >= 1 / SERVICE_ALPHA else 1.0 / (self.count + 1)
        return ServiceStats(
            count=self.count + 1,
            mean_s=self.mean_s + a * (seconds - self.mean_s),
            second=self.second + a * (seconds * seconds - self.second),
        )

    @property
    def scv(self) -> float:
        """Squared coefficient of variation (1.0, exponential, until two samples)."""
        if self.count < 2 or self.mean_s <= 0.0:
            return 1.0
        variance = max(0.0, self.second - self.mean_s * self.mean_s)
        return variance / (self.mean_s * self.mean_s)
