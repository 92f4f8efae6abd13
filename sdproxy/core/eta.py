"""Core: the ETA estimator — how long until a queued job is done.

Seconds per cost unit (one 512x512 sampling step, sdproxy.core.cost) are learned from
completed generations as an exponentially weighted moving average (weight 0.2 for the
newest sample); only full generations count (an interrupted one says nothing about speed).
A queued job's ETA is the work ahead of it plus half of what runs now (on average half
done), spread over the ready slots, plus its own work — all times seconds per unit, each
job counted for at most ``max_job_s``: no job holds a slot longer than the proxy lets a pod
stay silent, so one absurd request (steps 1e9 costs 10^12 s) cannot push every ETA
behind it out to centuries. (The request bounds, ``sdproxy.core.limits``, refuse such
requests, but they are off unless configured.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

#: weight of the newest sample in the moving average
ALPHA = 0.2


class EwmaEta:
    def __init__(self, *, seconds_per_unit: float, max_job_s: float = math.inf) -> None:
        self.seconds_per_unit = seconds_per_unit
        self.max_job_s = max_job_s

    def observe(self, *, cost: float, seconds: float) -> None:
        """A generation of ``cost`` units took ``seconds``."""
        if cost > 0:
            self.seconds_per_unit += ALPHA * (seconds / cost - self.seconds_per_unit)

    def eta_s(
        self, *, ahead: Iterable[float], running: Iterable[float], slots: int, own: float
    ) -> float:
        """Seconds until a job of cost ``own`` finishes, with the costs of the queued
        jobs ahead of it, of the running jobs, and ``slots`` ready slots."""
        work = sum(map(self.job_s, ahead)) + sum(map(self.job_s, running)) / 2
        return work / max(1, slots) + self.job_s(own)

    def job_s(self, cost: float) -> float:
        """Seconds one job of ``cost`` units takes, at most ``max_job_s``."""
        return min(cost * self.seconds_per_unit, self.max_job_s)
