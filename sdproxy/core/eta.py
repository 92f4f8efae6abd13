"""Core: the speed model — GPU-seconds of a job on a pod, and a queued job's ETA.

Seconds per cost unit (one 512x512 sampling step, sdproxy.core.cost) are learned from
completed generations as exponentially weighted moving averages (weight 0.2 for the newest
sample), at three levels, each the fallback of the one before: per pod and checkpoint (an
SDXL fine-tune is slower than SD 1.5 on the same GPU), per pod (an H100 beside a T4),
and for the fleet, in "weight 1" seconds (a pod of ``weight`` 2 is guessed twice as fast
until it has run something: ``#weight=2`` on a static backend URL). Only full generations
count (an interrupted one says nothing about speed; nor does a request's own fault, such
as CUDA out of memory, answered at once).

A checkpoint switch costs ``switch_s`` seconds of GPU time for nothing, learned from the
jobs that switched: what they took beyond their sampling work, per switch. How many
switches a job causes is ``sdproxy.core.cost.switches`` (two with sd-webui's restore
afterwards: there and back).

A queued job's ETA is the work ahead of it plus half of what runs now (on average half
done), spread over the ready slots at the fleet's rate, plus its own work — each job
counted for at most ``max_job_s``: no job holds a slot longer than the proxy lets a pod
stay silent, so one absurd request (steps 1e9 costs 10^12 s) cannot push every ETA behind
it out to centuries. (The request bounds, ``sdproxy.core.limits``, refuse such requests,
but they are off unless configured.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

#: weight of the newest sample in the moving average
ALPHA = 0.2
#: first guess of a checkpoint switch (docs/sd-webui.md: 2-7 s from a fast disk)
DEFAULT_SWITCH_S = 3.0


def _ewma(old: float, sample: float) -> float:
    return old + ALPHA * (sample - old)


class SpeedModel:
    """Learned seconds per unit (fleet, pod, pod x checkpoint) and seconds per switch."""

    def __init__(
        self,
        *,
        seconds_per_unit: float,
        max_job_s: float = math.inf,
        switch_s: float = DEFAULT_SWITCH_S,
    ) -> None:
        #: the fleet's rate, for a pod of weight 1
        self.seconds_per_unit = seconds_per_unit
        self.max_job_s = max_job_s
        self.switch_s = switch_s
        self._pod: dict[str, float] = {}
        self._pod_checkpoint: dict[tuple[str, str], float] = {}

    # ---- what things cost --------------------------------------------------------------

    def rate(self, pod: str, *, weight: float = 1.0, checkpoint: str | None = None) -> float:
        """Seconds per unit on ``pod`` (running ``checkpoint``, if known)."""
        if checkpoint is not None:
            found = self._pod_checkpoint.get((pod, checkpoint))
            if found is not None:
                return found
        found = self._pod.get(pod)
        return found if found is not None else self.seconds_per_unit / max(weight, 1e-9)

    def job_s(self, cost: float, *, rate: float | None = None, switches: int = 0) -> float:
        """Seconds one job of ``cost`` units takes (at ``rate``, default the fleet's),
        with ``switches`` checkpoint loads; at most ``max_job_s``."""
        seconds = cost * (self.seconds_per_unit if rate is None else rate)
        return min(seconds + switches * self.switch_s, self.max_job_s)

    # ---- learning ----------------------------------------------------------------------

    def observe(
        self,
        *,
        cost: float,
        seconds: float,
        pod: str = "",
        weight: float = 1.0,
        checkpoint: str | None = None,
        switches: int = 0,
    ) -> None:
        """A generation of ``cost`` units took ``seconds`` on ``pod``, with ``switches``
        checkpoint loads predicted for it."""
        if cost <= 0 or seconds < 0:
            return
        if switches:
            sampling = cost * self.rate(pod, weight=weight, checkpoint=checkpoint)
            self.switch_s = _ewma(self.switch_s, max(0.0, seconds - sampling) / switches)
            return
        sample = seconds / cost
        if pod:
            rate = self.rate(pod, weight=weight)
            self._pod[pod] = _ewma(rate, sample)
            if checkpoint is not None:
                key = (pod, checkpoint)
                self._pod_checkpoint[key] = _ewma(self._pod_checkpoint.get(key, rate), sample)
        self.seconds_per_unit = _ewma(self.seconds_per_unit, sample * weight)

    def forget(self, pod: str) -> None:
        """The pod is gone (a new one of the same name is a new machine)."""
        self._pod.pop(pod, None)
        for key in [k for k in self._pod_checkpoint if k[0] == pod]:
            del self._pod_checkpoint[key]

    # ---- ETAs --------------------------------------------------------------------------

    def eta_s(
        self,
        *,
        ahead: Iterable[float],
        running: Iterable[float],
        slots: int,
        own: float,
        rate: float | None = None,
    ) -> float:
        """Seconds until a job of cost ``own`` finishes, with the costs of the queued
        jobs ahead of it, of the running jobs, and ``slots`` ready slots whose mean rate
        is ``rate`` (default: the fleet's)."""

        def job_s(cost: float) -> float:
            return self.job_s(cost, rate=rate)

        work = sum(map(job_s, ahead)) + sum(map(job_s, running)) / 2
        return work / max(1, slots) + job_s(own)
