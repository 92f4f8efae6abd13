"""Unit: scheduling that knows Stable Diffusion, tick by tick on a virtual clock.

Checkpoint-aware dispatch (switch-free jobs first, bounded by the head's age; switches as
sd-webui makes them: two with restore afterwards), the fair queue (strict priorities,
tenants' weighted share of GPU work, no banked credit), per-tenant limits, deadlines,
request faults vs outlier ejection, and learned speeds of mixed GPUs. Every event goes
through the ``Driver`` of test_admission, which checks the core's invariants after it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from sdproxy.core.admission import Admission, AdmissionConfig
from sdproxy.core.cost import switches
from sdproxy.core.effects import Effects, Outcome, Reject, RejectReason
from sdproxy.core.eta import SpeedModel
from sdproxy.core.pods import Endpoint, PodId
from sdproxy.core.queue import FairQueue, FifoQueue, Job, Priority, TicketId
from sdproxy.core.tenants import Tenant
from tests.unit.test_admission import Driver, dispatch, ep, queued, url

HIGH, NORMAL, LOW = Priority.HIGH, Priority.NORMAL, Priority.LOW


def T(n: int) -> TicketId:
    return TicketId(n)


def loaded(d: Driver, **checkpoints: str) -> Driver:
    """The pods say which checkpoint they have loaded (their default)."""
    for name, checkpoint in checkpoints.items():
        d.observe_catalog(name, {"sd15", "sdxl", "anime"}, loaded=checkpoint, asked_at=d.now)
    return d


def reason_of(decision: object) -> RejectReason:
    """The reason of a decision that must be a rejection."""
    assert isinstance(decision, Reject), decision
    return decision.reason


# ---- what a job switches ------------------------------------------------------------


@pytest.mark.parametrize(
    ("wanted", "restore", "on_pod", "expected"),
    [
        pytest.param(None, True, "sd15", 0, id="names-none-runs-on-the-default"),
        pytest.param("sd15", True, "sd15", 0, id="names-the-default"),
        pytest.param("sdxl", True, "sd15", 2, id="restore-afterwards-there-and-back"),
        pytest.param("sdxl", False, "sd15", 1, id="no-restore-one-load-that-stays"),
        pytest.param("sdxl", True, None, 2, id="unknown-default-counts-as-another"),
    ],
)
def test_switches_follow_sd_webui(
    wanted: str | None, restore: bool, on_pod: str | None, expected: int
) -> None:
    assert switches(wanted, restore=restore, loaded=on_pod) == expected


def test_the_cost_of_a_switching_job_counts_both_loads() -> None:
    d = loaded(Driver(ep("a"), seconds_per_unit=0.1), a="sd15")
    fx = d.adm.submit(Job(ticket=T(1), enqueued_at=0.0, cost=20.0, checkpoint="sdxl"), 0.0)
    assert fx.dispatches[0].cost_s == pytest.approx(20 * 0.1 + 2 * 3.0)
    assert d.pod("a").checkpoint == "sd15", "restore afterwards: the default stays"
    d.release(1)
    fx = d.adm.submit(Job(ticket=T(2), enqueued_at=0.0, cost=20.0), 0.0)
    assert fx.dispatches[0].cost_s == pytest.approx(2.0), "names none: runs on sd15"


# ---- checkpoint-aware dispatch ------------------------------------------------------


def test_a_free_pod_takes_a_younger_job_it_need_not_switch_for() -> None:
    d = loaded(Driver(ep("a"), ep("b")), a="sd15", b="sdxl")
    assert d.at(0).submit(1, checkpoint="sd15") == dispatch(1, "a")
    assert d.submit(2, checkpoint="sdxl") == dispatch(2, "b")
    assert d.at(1).submit(3, checkpoint="sdxl") == queued(3, 1)  # older, needs b
    assert d.at(2).submit(4, checkpoint="sd15") == queued(4, 2)
    # a frees: it has sd15, so job 4 goes ahead of job 3 (which would switch a twice)
    assert d.at(5).release(1) == [dispatch(4, "a", queued_s=3.0)]
    assert d.at(6).release(2) == [dispatch(3, "b", queued_s=5.0)]


def test_a_job_naming_no_checkpoint_fits_every_pod() -> None:
    d = loaded(Driver(ep("a")), a="sd15")
    d.at(0).submit(1)
    d.submit(2, checkpoint="sdxl", restore=True)
    d.at(1).submit(3)
    assert d.at(2).release(1) == [dispatch(3, "a", queued_s=1.0)]


def test_the_head_goes_first_once_it_was_passed_over_for_the_bound() -> None:
    """The bound counts from the first time the head was passed, not from its arrival:
    affinity adds at most --affinity-max-skip-s to a job's wait once it is its turn."""
    d = loaded(Driver(ep("a"), affinity_max_skip_s=10.0), a="sd15")
    d.at(0).submit(1, checkpoint="sd15")
    assert d.at(1).submit(2, checkpoint="sdxl", restore=True) == queued(2, 1)
    for n in range(3, 7):
        d.at(n).submit(n, checkpoint="sd15")
    assert d.at(20).release(1) == [dispatch(3, "a", queued_s=17.0)]  # first pass: 20
    assert d.at(25).release(3) == [dispatch(4, "a", queued_s=21.0)]  # passed 5 s
    # 2 has been passed for 10 s: it goes now, though a must switch for it (and back)
    assert d.at(30).release(4) == [dispatch(2, "a", queued_s=29.0)]
    assert d.at(40).release(2) == [dispatch(5, "a", queued_s=35.0)]


def test_a_bound_of_zero_never_passes_the_head() -> None:
    d = loaded(Driver(ep("a"), affinity_max_skip_s=0.0), a="sd15")
    d.at(0).submit(1, checkpoint="sd15")
    d.at(1).submit(2, checkpoint="sdxl", restore=True)
    d.at(2).submit(3, checkpoint="sd15")
    assert d.at(3).release(1) == [dispatch(2, "a", queued_s=2.0)]


def test_fifo_policy_serves_the_head_whatever_it_switches() -> None:
    d = loaded(Driver(ep("a"), policy="fifo"), a="sd15")
    assert isinstance(d.adm.queue, FifoQueue)
    d.at(0).submit(1, checkpoint="sd15")
    d.at(1).submit(2, checkpoint="sdxl", restore=True)
    d.at(2).submit(3, checkpoint="sd15")
    assert d.at(3).release(1) == [dispatch(2, "a", queued_s=2.0)]


def test_affinity_never_jumps_a_priority_class() -> None:
    d = loaded(Driver(ep("a")), a="sd15")
    d.at(0).submit(1)
    d.at(1).submit(2, checkpoint="sdxl", restore=True, priority=HIGH)
    d.at(2).submit(3, checkpoint="sd15", priority=NORMAL)
    assert d.at(3).release(1) == [dispatch(2, "a", queued_s=2.0)]


def test_the_cheapest_free_pod_wins_among_several() -> None:
    """Two free pods, one with the job's checkpoint (no load) and a faster one: the
    estimate decides (a switch at 3 s costs more than the speed difference here)."""
    fast = Endpoint(pod_id=PodId("fast"), url=url("fast"), weight=2.0)
    d = loaded(Driver(ep("slow"), fast, max_inflight=1), slow="sdxl", fast="sd15")
    assert d.submit(1, cost=10.0, checkpoint="sdxl", restore=True) == dispatch(1, "slow")
    assert d.submit(2, cost=10.0) == dispatch(2, "fast")  # 0.5 s there, 1 s on slow


# ---- learned speeds -----------------------------------------------------------------


def test_speed_is_learned_per_pod_and_checkpoint_with_a_weighted_first_guess() -> None:
    speed = SpeedModel(seconds_per_unit=0.1)
    assert speed.rate("t4", weight=0.5) == pytest.approx(0.2)
    speed.observe(cost=10.0, seconds=4.0, pod="t4", weight=0.5, checkpoint="sdxl")
    # the pod's rate moves from its guess 0.2 toward 0.4; the checkpoint's from the pod's
    assert speed.rate("t4", weight=0.5) == pytest.approx(0.2 + 0.2 * 0.2)
    assert speed.rate("t4", checkpoint="sdxl") == pytest.approx(0.24)
    assert speed.rate("t4", checkpoint="sd15") == pytest.approx(0.24)  # falls back
    assert speed.rate("h100", weight=1.0) == pytest.approx(0.1 + 0.2 * (0.2 - 0.1))


def test_switch_cost_is_learned_from_jobs_that_switched() -> None:
    speed = SpeedModel(seconds_per_unit=0.1, switch_s=3.0)
    # 10 units at 0.1 s = 1 s of sampling; 21 s in all with two loads: 10 s per load
    speed.observe(cost=10.0, seconds=21.0, pod="a", switches=2)
    assert speed.switch_s == pytest.approx(3.0 + 0.2 * 7.0)
    assert speed.rate("a") == pytest.approx(0.1), "a switching job is no speed sample"


def test_admission_learns_switch_cost_from_a_real_release() -> None:
    d = loaded(Driver(ep("a"), seconds_per_unit=0.1), a="sd15")
    d.at(0).submit(1, cost=10.0, checkpoint="sdxl", restore=True)
    d.at(21.0).release(1)
    assert d.adm.eta.switch_s == pytest.approx(3.0 + 0.2 * 7.0)


# ---- the fair queue -----------------------------------------------------------------


def fair_job(n: int, tenant: str, *, cost: float = 1.0, priority: int = NORMAL) -> Job:
    return Job(ticket=T(n), enqueued_at=float(n), cost=cost, tenant=tenant, priority=priority)


def served(q: FairQueue, count: int) -> list[str]:
    out = []
    for _ in range(count):
        job = next(iter(q))
        q.take(job.ticket)
        out.append(job.tenant)
    return out


def test_a_flooding_tenant_does_not_push_the_others_back() -> None:
    q = FairQueue()
    for n in range(1, 11):
        q.push(fair_job(n, "a"), deadline=1e9)
    q.push(fair_job(20, "b"), deadline=1e9)
    q.push(fair_job(21, "b"), deadline=1e9)
    assert q.position(T(20)) == 2  # behind a's first job only
    assert served(q, 5) == ["a", "b", "a", "b", "a"]


def test_weights_share_in_proportion() -> None:
    q = FairQueue(weights={"a": 2.0})
    for n in range(1, 13):
        q.push(fair_job(n, "a" if n <= 6 else "b"), deadline=1e9)
    assert served(q, 6) == ["a", "b", "a", "a", "b", "a"]


def test_an_idle_tenant_banks_no_credit() -> None:
    q = FairQueue()
    for n in range(1, 6):
        q.push(fair_job(n, "a"), deadline=1e9)
    served(q, 5)
    q.push(fair_job(10, "a"), deadline=1e9)
    q.push(fair_job(11, "b"), deadline=1e9)  # b was idle all along: no backlog of credit
    q.push(fair_job(12, "b"), deadline=1e9)
    q.push(fair_job(13, "a"), deadline=1e9)
    assert served(q, 4) == ["b", "a", "b", "a"]


def test_cost_is_what_is_shared_not_job_counts() -> None:
    q = FairQueue()
    for n in range(1, 4):
        q.push(fair_job(n, "big", cost=3.0), deadline=1e9)
    for n in range(10, 16):
        q.push(fair_job(n, "small", cost=1.0), deadline=1e9)
    assert served(q, 6) == ["big", "small", "small", "small", "big", "small"]


def test_charge_makes_a_tenant_pay_what_its_job_really_cost() -> None:
    q = FairQueue()
    first = fair_job(1, "a")
    q.push(first, deadline=1e9)
    q.take(first.ticket)
    q.charge(first, 5.0)  # estimated 1 unit, really 5 (it switched checkpoints)
    q.push(fair_job(2, "a"), deadline=1e9)
    q.push(fair_job(3, "b"), deadline=1e9)
    q.push(fair_job(4, "b"), deadline=1e9)
    assert [j.tenant for j in q] == ["b", "b", "a"]


def test_priorities_are_strict_and_requeue_goes_ahead_in_its_class() -> None:
    q = FairQueue()
    q.push(fair_job(1, "a", priority=LOW), deadline=1e9)
    q.push(fair_job(2, "a"), deadline=1e9)
    q.push(fair_job(3, "b", priority=HIGH), deadline=1e9)
    q.requeue(fair_job(4, "c"), deadline=1e9)
    assert [j.ticket for j in q] == [3, 4, 2, 1]
    assert [q.position(T(n)) for n in (3, 4, 2, 1)] == [1, 2, 3, 4]
    assert q.depth_by_priority() == {HIGH: 1, NORMAL: 2, LOW: 1}


def test_fair_queue_expires_and_removes_anywhere() -> None:
    q = FairQueue()
    for n in range(1, 5):
        q.push(fair_job(n, "a"), deadline=10.0 + n)
    assert q.remove(T(2)) is not None and q.remove(T(2)) is None
    assert q.next_deadline() == 11.0
    assert [j.ticket for j in q.expired(13.0)] == [1, 3]
    assert (len(q), q.oldest(), T(4) in q) == (1, fair_job(4, "a"), True)


# ---- tenants, priorities, deadlines through admission ---------------------------------


def test_tenant_max_running_leaves_the_pods_to_the_others() -> None:
    d = Driver(ep("a"), ep("b"), ep("c"))
    d.adm = Admission(d.adm.config, tenants=[Tenant(name="batch", max_running=1)])
    d.reconcile(ep("a"), ep("b"), ep("c"))
    assert d.submit(1, tenant="batch") == dispatch(1, "a")
    assert d.submit(2, tenant="batch") == queued(2, 1)  # pods b and c stay free for others
    assert d.submit(3, tenant="web") == dispatch(3, "b")
    assert d.at(1).release(1) == [dispatch(2, "a", queued_s=1.0)]


def test_tenant_max_queued_and_max_priority() -> None:
    d = Driver(ep("a"))
    d.adm = Admission(d.adm.config, tenants=[Tenant(name="t", max_queued=1, max_priority=NORMAL)])
    d.reconcile(ep("a"))
    d.submit(1, tenant="t")
    assert d.submit(2, tenant="t", priority=HIGH) == queued(2, 1)
    assert next(iter(d.adm.queue)).priority == NORMAL, "capped at the tenant's maximum"
    assert reason_of(d.submit(3, tenant="t")) is RejectReason.CLIENT_QUOTA
    # t already runs one: the other tenant's first job goes ahead of t's second
    assert d.submit(4, tenant="other") == queued(4, 1)


def test_gpu_seconds_served_are_counted_per_tenant() -> None:
    d = Driver(ep("a"))
    d.at(0).submit(1, tenant="x")
    d.submit(2, tenant="y")
    d.at(4).release(1)
    d.at(5).release(2, Outcome.REQUEST_FAULT)
    assert d.adm.tenants.served_s == {"x": 4.0, "y": 1.0}


def test_an_unmeetable_deadline_is_refused_at_once_with_the_eta() -> None:
    d = Driver(ep("a"), seconds_per_unit=1.0)
    d.at(0).submit(1, cost=10.0)
    # half of the running job (on average half done) and its own 5 s: 10 s > 9 s
    fx = d.adm.submit(Job(ticket=T(2), enqueued_at=0.0, cost=5.0, deadline_s=9.0), 0.0)
    (refusal,) = fx.rejects
    assert refusal.reason is RejectReason.DEADLINE_UNMEETABLE
    assert refusal.eta_s == pytest.approx(10.0 / 2 + 5.0)
    assert d.adm.queue.position(T(2)) is None and d.adm.tenants.queued == {}
    fx = d.adm.submit(Job(ticket=T(3), enqueued_at=0.0, cost=5.0, deadline_s=11.0), 0.0)
    assert fx.queued and not fx.rejects


def test_a_deadline_longer_than_the_job_on_a_free_pod_dispatches() -> None:
    d = Driver(ep("a"), seconds_per_unit=1.0)
    refused = d.submit(1, cost=5.0, deadline_s=4.0)
    assert reason_of(refused) is RejectReason.DEADLINE_UNMEETABLE
    assert d.submit(2, cost=5.0, deadline_s=6.0) == dispatch(2, "a")


def test_a_queued_job_whose_own_deadline_passes_times_out() -> None:
    d = Driver(ep("a"), seconds_per_unit=0.01, queue_timeout_s=300.0)
    d.at(0).submit(1)
    assert d.submit(2, deadline_s=5.0) == queued(2, 1)
    assert d.last.wake_at == 5.0
    assert d.at(5).tick()[1][0].reason is RejectReason.QUEUE_TIMEOUT


# ---- request faults vs pod faults ---------------------------------------------------


def test_a_request_fault_keeps_the_pod_and_teaches_no_speed() -> None:
    d = Driver(ep("a"), ep("b"), outlier_failures=2)
    d.at(0).submit(1)
    d.at(0.1).release(1, Outcome.REQUEST_FAULT)
    assert d.adm.eta.seconds_per_unit == d.adm.config.seconds_per_unit
    assert d.pod("a").out_reason(0.1) is None


def test_consecutive_pod_errors_eject_the_pod_as_an_outlier() -> None:
    d = Driver(ep("a"), outlier_failures=3, eject_s=2.0)
    for n, at in ((1, 0.0), (2, 1.0)):
        d.at(at).submit(n)
        d.at(at + 0.5).release(n, Outcome.POD_ERROR)
    d.at(2).submit(3)
    d.at(2.5).release(3)  # a success in between: the count starts again
    for n, at in ((4, 3.0), (5, 4.0)):
        d.at(at).submit(n)
        d.at(at + 0.5).release(n, Outcome.POD_ERROR)
    assert d.pod("a").out_reason(4.5) is None
    d.at(5).submit(6)
    d.at(5.5).release(6, Outcome.POD_ERROR)
    assert d.pod("a").out_reason(5.5) == "outlier"
    assert d.pod("a").ejected_until == 7.5
    assert d.pod("a").errors == 5


def test_a_broken_exchange_rests_the_pod_as_ejected_not_as_an_outlier() -> None:
    d = Driver(ep("a"), ep("b"))
    d.submit(1)
    d.release(1, Outcome.FAILED)
    assert d.pod("a").out_reason(0.0) == "ejected"


def test_check_catches_a_tenant_over_its_running_cap() -> None:
    adm = Admission(AdmissionConfig(), tenants=[Tenant(name="t", max_running=1)])
    adm.reconcile([ep("a"), ep("b")], 0.0)
    adm.submit(Job(ticket=T(1), enqueued_at=0.0, tenant="t"), 0.0)
    adm.tenants.running["t"] = 0  # the book lost count: the cap would let a second run
    adm.submit(Job(ticket=T(2), enqueued_at=0.0, tenant="t"), 0.0)
    from sdproxy.errors import StateError

    with pytest.raises(StateError):
        adm.check(0.0)


# ---- a storm of tenants, checkpoints and completions ----------------------------------

TENANTS = {
    "a": Tenant(name="a"),
    "b": Tenant(name="b"),
    "c": Tenant(name="c", weight=2.0, max_running=1),
}
#: most units one job can be charged: 3 of sampling and two loads at 3 s (1 s per unit)
MAX_CHARGE = 3 + 2 * 3


class FairStorm(RuleBasedStateMachine):
    """Tenants submit jobs of every size and checkpoint; pods finish them at exactly
    their estimated time (a discrete-event run: time jumps to the next completion), so
    the learned speeds stay exact and fairness can be held to a bound.

    After every step: the core's invariants (limits, tenants' max_running, work
    conservation), the age bound (affinity passes the job whose turn it is only while it
    has been passed over for less than ``affinity_max_skip_s``), and, with no skipping, no tenant
    starves: while it waits and may run, each other tenant is served at most what start-
    time fair queueing allows (its weight share of the most one job can be charged).
    """

    def __init__(self) -> None:
        super().__init__()
        self.adm = Admission(AdmissionConfig())
        self.now = 0.0
        self.next_ticket = 1
        self.passed: dict[str, int] = {}
        #: when each head was first seen passed over (the age bound counts from there)
        self.first_passed: dict[TicketId, float] = {}

    @initialize(skip=st.sampled_from([0.0, 4.0]), policy=st.just("fair"))
    def configure(self, skip: float, policy: Literal["fair", "fifo"]) -> None:
        config = AdmissionConfig(
            max_inflight=1,
            max_queue=60,
            queue_timeout_s=1e9,
            seconds_per_unit=1.0,
            affinity_max_skip_s=skip,
            policy=policy,
        )
        self.skip = skip
        self.adm = Admission(config, tenants=TENANTS.values())
        self.adm.reconcile([ep("p"), ep("q")], 0.0)
        for name, checkpoint in (("p", "x"), ("q", "y")):
            self.adm.observe_catalog(
                PodId(name), catalog={"x", "y", "z"}, loaded=checkpoint, asked_at=0.0, now=0.0
            )

    def _eligible(self, released: Job | None) -> Callable[[Job], bool]:
        running = dict(self.adm.tenants.running)
        if released is not None:
            running[released.tenant] -= 1

        def eligible(job: Job) -> bool:
            cap = self.adm.tenants.get(job.tenant).max_running
            return cap <= 0 or running.get(job.tenant, 0) < cap

        return eligible

    def _apply(self, fx: Effects, head: Job | None) -> None:
        self.adm.check(self.now)
        passed_head = head is not None and head.ticket in self.adm.queue and fx.dispatches
        if head is not None and passed_head and fx.dispatches[0].ticket != head.ticket:
            first = self.first_passed.setdefault(head.ticket, self.now)
            waited = self.now - first
            assert waited < self.skip, f"ticket {head.ticket} passed over for {waited} s"
        waiting = {job.tenant for job in self.adm.queue if self.adm.tenants.can_run(job)}
        tenants = [self._tenant_of(d.ticket) for d in fx.dispatches]
        for i, tenant in enumerate(tenants):
            for other in waiting | set(tenants[i + 1 :]):
                if other != tenant:
                    self.passed[other] = self.passed.get(other, 0) + 1
            self.passed[tenant] = 0
        for tenant in set(self.passed) - waiting:
            self.passed[tenant] = 0
        if self.skip == 0:
            for tenant, count in self.passed.items():
                w = TENANTS[tenant].weight
                bound = sum(
                    math.ceil(MAX_CHARGE * t.weight / w) + 1
                    for name, t in TENANTS.items()
                    if name != tenant
                )
                assert count <= bound, f"tenant {tenant} passed {count} times (bound {bound})"

    def _tenant_of(self, ticket: TicketId) -> str:
        for job in self.adm.book.running_jobs():
            if job.ticket == ticket:
                return job.tenant
        raise AssertionError(f"ticket {ticket} dispatched but not running")

    def _head(self, released: Job | None = None) -> Job | None:
        return self.adm.queue.next_for(self._eligible(released))

    @rule(
        tenant=st.sampled_from(sorted(TENANTS)),
        cost=st.integers(1, 3),
        checkpoint=st.sampled_from([None, "x", "y", "z"]),
        restore=st.booleans(),
        burst=st.integers(1, 20),
    )
    def submit(
        self, tenant: str, cost: int, checkpoint: str | None, restore: bool, burst: int
    ) -> None:
        for _ in range(burst):
            job = Job(
                ticket=T(self.next_ticket),
                enqueued_at=self.now,
                cost=float(cost),
                checkpoint=checkpoint,
                restore=restore,
                tenant=tenant,
            )
            self.next_ticket += 1
            head = self._head()
            self._apply(self.adm.submit(job, self.now), head)

    @precondition(lambda self: self.adm.inflight > 0)
    @rule()
    def finish_next(self) -> None:
        """Time jumps to the earliest completion; that job ends as estimated."""
        runs = [run for pod in self.adm.pods.values() for run in pod.running.values()]
        run = min(runs, key=lambda r: (r.dispatched_at + r.cost_s, r.ticket))
        self.now = max(self.now, run.dispatched_at + run.cost_s)
        job = next(j for j in self.adm.book.running_jobs() if j.ticket == run.ticket)
        head = self._head(released=job)
        self._apply(self.adm.release(run.ticket, Outcome.COMPLETED, self.now), head)

    @rule(dt=st.floats(0.0, 3.0))
    def wait(self, dt: float) -> None:
        """Time passes with nothing finishing (arrivals spread out)."""
        runs = [
            r.dispatched_at + r.cost_s for p in self.adm.pods.values() for r in p.running.values()
        ]
        self.now = min([self.now + dt, *runs])
        self._apply(self.adm.tick(self.now), self._head())


TestFairStorm = FairStorm.TestCase
TestFairStorm.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_a_correction_never_puts_a_tenants_job_before_its_own_older_ones() -> None:
    q = FairQueue()
    q.push(fair_job(1, "a", cost=5.0), deadline=1e9)
    q.push(fair_job(2, "a", cost=1.0), deadline=1e9)
    q.charge(fair_job(1, "a", cost=5.0), 0.0)  # it left without running: refunded
    q.push(fair_job(3, "a", cost=1.0), deadline=1e9)
    assert [j.ticket for j in q] == [1, 2, 3]


def test_a_cancelled_job_costs_its_tenant_nothing() -> None:
    d = Driver(ep("a"), seconds_per_unit=1.0)
    d.at(0).submit(1, tenant="x")  # runs at once: charged like any served job
    d.submit(2, tenant="x", cost=10.0)
    d.submit(3, tenant="y")
    d.cancel(2)
    d.submit(4, tenant="x")
    d.submit(5, tenant="y")
    # x's finish tag went back by the cancelled job: 4 starts where 2 would have
    assert d.queue() == [3, 4, 5]


def test_a_freed_pod_looks_a_bounded_way_down_the_queue() -> None:
    from sdproxy.core.placement import LOOKAHEAD

    d = loaded(Driver(ep("a"), max_queue=LOOKAHEAD + 10), a="sd15")
    d.at(0).submit(1)
    for n in range(2, LOOKAHEAD + 4):  # the head and LOOKAHEAD more all need sdxl
        d.submit(n, checkpoint="sdxl", restore=True)
    d.submit(LOOKAHEAD + 4, checkpoint="sd15")  # beyond the look-ahead
    assert d.at(1).release(1) == [dispatch(2, "a", queued_s=1.0)]


def test_an_unconfigured_tenant_is_bounded_by_the_queue_only() -> None:
    """The 1000 of max_queued is a configured tenant's default, not everyone's: the
    anonymous tenant may fill --max-queue (the queue bench queues 10,000)."""
    d = Driver(ep("a"), max_queue=1500)
    d.submit(1)
    decisions = [d.submit(n) for n in range(2, 1503)]
    assert all(isinstance(x, type(queued(0, 1))) for x in decisions[:1500])
    assert reason_of(decisions[-1]) is RejectReason.QUEUE_FULL


def test_the_oldest_job_is_the_first_in_not_the_head() -> None:
    q = FairQueue()
    q.push(fair_job(5, "a"), deadline=1e9)  # entered at 5
    q.push(fair_job(3, "b", priority=LOW), deadline=1e9)  # entered at 3, served last
    q.push(fair_job(4, "c", priority=HIGH), deadline=1e9)
    assert (next(iter(q)).ticket, q.oldest()) == (4, fair_job(3, "b", priority=LOW))
    q.remove(T(3))
    assert q.oldest() == fair_job(4, "c", priority=HIGH)
    q.requeue(fair_job(3, "b", priority=LOW), deadline=1e9)
    assert q.oldest() == fair_job(3, "b", priority=LOW)
    assert q.depth_by_priority() == {LOW: 1, NORMAL: 1, HIGH: 1}
    for n in (3, 4, 5):
        q.take(T(n))
    assert (q.oldest(), dict(q.depth_by_priority())) == (None, {})
