"""Core: tenants — who a job belongs to, their weight and limits, what they were served.

A tenant is named by the ``X-Sdproxy-Tenant`` header, or, when ``[tenants.<name>]``
tables are configured, by the API key the request carries (the runtime maps it:
``sdproxy.runtime.tenants``). Its ``weight`` is its share of GPU time against the other
tenants of a priority class (``sdproxy.core.queue.FairQueue``); ``max_queued`` bounds its
waiting jobs (then ``429 client_quota``), ``max_running`` its jobs on pods at once (0: no
cap; a tenant at its cap waits while others use the pods: the cap is what it is for),
``max_priority`` the highest class it may ask for (a higher one is lowered to it). A
tenant that is not configured (named by the header only, or the anonymous one) has weight
1, no ``max_queued`` of its own (``--max-queue`` bounds it) and no caps.

``TenantBook`` counts, per tenant, the jobs queued and running and the GPU-seconds served
(``sdproxy_tenant_gpu_seconds_total``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sdproxy.core.queue import Job, Priority


@dataclass(frozen=True, kw_only=True)
class Tenant:
    name: str
    keys: tuple[str, ...] = ()
    weight: float = 1.0
    max_queued: int = 1000
    max_running: int = 0
    max_priority: int = Priority.HIGH


@dataclass(kw_only=True)
class TenantBook:
    """Configured tenants (an unconfigured one gets the defaults) and their counters."""

    tenants: Mapping[str, Tenant] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    served_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, tenants: Iterable[Tenant]) -> TenantBook:
        return cls(tenants={t.name: t for t in tenants})

    def get(self, name: str) -> Tenant:
        found = self.tenants.get(name)
        return found if found is not None else Tenant(name=name)

    def weights(self) -> dict[str, float]:
        return {name: t.weight for name, t in self.tenants.items()}

    def can_run(self, job: Job) -> bool:
        cap = self.get(job.tenant).max_running
        return cap <= 0 or self.running.get(job.tenant, 0) < cap

    def queue_full(self, job: Job) -> bool:
        """Only a configured tenant has a ``max_queued``: one named by the header alone
        (or the anonymous tenant) is bounded by --max-queue, as before tenants existed."""
        tenant = self.tenants.get(job.tenant)
        return tenant is not None and self.queued.get(job.tenant, 0) >= tenant.max_queued

    def capped(self, job: Job) -> int:
        """The job's priority, lowered to its tenant's ``max_priority``."""
        return min(job.priority, self.get(job.tenant).max_priority)

    def add(self, counter: dict[str, int], tenant: str, delta: int) -> None:
        value = counter.get(tenant, 0) + delta
        if value:
            counter[tenant] = value
        else:
            counter.pop(tenant, None)

    def serve(self, tenant: str, seconds: float) -> None:
        self.served_s[tenant] = self.served_s.get(tenant, 0.0) + max(0.0, seconds)
