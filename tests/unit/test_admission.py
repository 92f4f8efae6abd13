"""Unit: the admission core (slots, shared queue, dispatch), tick by tick on a virtual clock.

No event loop: every event is a plain call with ``now`` as an argument. The ``Driver``
wrapper calls the core's own ``check()`` after EVERY event (no pod over its limit, work
conservation, the slot book's indexes agree) and re-checks them independently here, so
each scenario also proves them. Mutators answer ``Effects``; the driver reads out the part
each scenario is about (the decision for the submitted ticket, the dispatches a release
caused, …).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from sdproxy.core.admission import Admission, AdmissionConfig, Running
from sdproxy.core.cost import estimate_steps
from sdproxy.core.effects import (
    Dispatch,
    Effects,
    Outcome,
    Queued,
    Reject,
    RejectReason,
    Transition,
)
from sdproxy.core.pods import Endpoint, PodId, PodState
from sdproxy.core.queue import Job, TicketId
from sdproxy.errors import StateError

Decision = Dispatch | Queued | Reject

BASE: dict[str, Any] = {"max_inflight": 1, "max_queue": 10, "queue_timeout_s": 30.0}


def url(name: str) -> str:
    return f"http://{name}:7860"


def ep(name: str, *, ready: bool = True, terminating: bool = False) -> Endpoint:
    return Endpoint(pod_id=PodId(name), url=url(name), ready=ready, terminating=terminating)


def T(n: int) -> TicketId:
    return TicketId(n)


def P(name: str) -> PodId:
    return PodId(name)


def dispatch(n: int, pod: str, *, queued_s: float = 0.0) -> Dispatch:
    return Dispatch(ticket=T(n), pod_id=P(pod), url=url(pod), queued_s=queued_s)


def queued(n: int, position: int) -> Queued:
    return Queued(ticket=T(n), position=position)


def reject(n: int, reason: RejectReason) -> Reject:
    return Reject(ticket=T(n), reason=reason)


def decision_for(fx: Effects, ticket: TicketId) -> Decision:
    """What an event decided for one ticket (exactly one answer per ticket)."""
    found = [e for e in (*fx.dispatches, *fx.queued, *fx.rejects) if e.ticket == ticket]
    assert len(found) == 1, f"ticket {ticket}: {found}"
    return found[0]


def reconciled(
    dispatches: list[Dispatch], rejects: list[Reject], transitions: list[Transition]
) -> tuple[tuple[Dispatch, ...], tuple[Reject, ...], tuple[Transition, ...]]:
    return tuple(dispatches), tuple(rejects), tuple(transitions)


def tr(pod: str, old: PodState | None, new: PodState | None) -> Transition:
    return Transition(P(pod), old, new)


def takes_work(pod: Any, now: float) -> bool:
    """Independently of the core: ready, a slot free (counting the gate's other senders),
    not ejected, not cordoned, its gate (if any) in sight and its sd-webui up."""
    return (
        pod.state is PodState.READY
        and len(pod.running) + pod.foreign < pod.limit
        and now >= pod.ejected_until
        and now >= pod.cordoned_until
        and (not pod.gated or (pod.gate_live and pod.gate_healthy))
    )


def assert_invariants(adm: Admission, now: float) -> None:
    """What must hold after every event, whatever happened (checked here independently
    of ``Admission.check``, which runs too)."""
    adm.check(now)
    on_pods = {t: pod.pod_id for pod in adm.pods.values() for t in pod.running}
    for pod in adm.pods.values():
        assert len(pod.running) <= pod.limit, f"{pod.pod_id} over its limit"
        assert pod.listed or pod.running, f"{pod.pod_id} gone and idle but not forgotten"
    if any(adm.tenants.can_run(job) for job in adm.queue):  # a tenant at its cap waits
        free = [p.pod_id for p in adm.pods.values() if takes_work(p, now)]
        assert free == [], f"jobs wait while {free} have a free slot"
    assert adm.inflight == len(on_pods)
    for ticket, pod_id in on_pods.items():
        run = adm.running(ticket)
        assert run is not None and run.pod_id == pod_id
        assert ticket not in adm.queue
    if adm.shut:
        assert len(adm.queue) == 0


class Driver:
    """An Admission plus a virtual clock; checks the invariants after every call."""

    def __init__(self, *pods: Endpoint, **config: Any) -> None:
        self.adm = Admission(AdmissionConfig(**{**BASE, **config}))
        self.now = 0.0
        if pods:
            self.reconcile(*pods)

    def at(self, now: float) -> Driver:
        assert now >= self.now, "the virtual clock never goes back"
        self.now = now
        return self

    def _checked(self, fx: Effects) -> Effects:
        assert_invariants(self.adm, self.now)
        self.last = fx
        return fx

    def submit(
        self,
        n: int,
        *,
        cost: float = 1.0,
        checkpoint: str | None = None,
        restore: bool = False,
        **fields: Any,
    ) -> Decision:
        """A job; by default one that leaves its checkpoint loaded (no restore)."""
        job = Job(
            ticket=T(n),
            enqueued_at=self.now,
            cost=cost,
            checkpoint=checkpoint,
            restore=restore,
            **fields,
        )
        return decision_for(self._checked(self.adm.submit(job, self.now)), T(n))

    def release(self, n: int, outcome: Outcome = Outcome.COMPLETED) -> list[Dispatch]:
        return list(self._checked(self.adm.release(T(n), outcome, self.now)).dispatches)

    def retry(self, n: int) -> Decision:
        """The pod refused the connection: ``release`` with ``Outcome.REFUSED``."""
        return decision_for(self._checked(self.adm.release(T(n), Outcome.REFUSED, self.now)), T(n))

    def cancel(self, n: int) -> bool:
        """Cancel a queued job; a ticket that is not queued is a caller's bug (raises)."""
        if T(n) not in self.adm.queue:
            with pytest.raises(StateError):
                self.adm.cancel(T(n), RejectReason.CANCELLED, self.now)
            return False
        fx = self._checked(self.adm.cancel(T(n), RejectReason.CANCELLED, self.now))
        assert fx.rejects == (reject(n, RejectReason.CANCELLED),)
        return True

    def tick(self) -> tuple[list[Dispatch], list[Reject]]:
        fx = self._checked(self.adm.tick(self.now))
        return list(fx.dispatches), list(fx.rejects)

    def reconcile(
        self, *endpoints: Endpoint
    ) -> tuple[tuple[Dispatch, ...], tuple[Reject, ...], tuple[Transition, ...]]:
        fx = self._checked(self.adm.reconcile(endpoints, self.now))
        return fx.dispatches, fx.rejects, fx.transitions

    def transitions(self, *endpoints: Endpoint) -> list[Transition]:
        return list(self.reconcile(*endpoints)[2])

    def mark_warm(self, name: str) -> list[Dispatch]:
        return list(self._checked(self.adm.mark_warm(P(name), self.now)).dispatches)

    def shutdown(self) -> list[Reject]:
        return list(self._checked(self.adm.shutdown(self.now)).rejects)

    def eject(self, name: str, now: float) -> None:
        self._checked(self.adm.eject(P(name), now))

    def cordon(self, *names: str, for_s: float) -> list[PodId]:
        fx = self._checked(self.adm.cordon([P(n) for n in names], self.now, for_s=for_s))
        return list(fx.cordoned)

    def observe_catalog(
        self, name: str, catalog: set[str], *, loaded: str | None, asked_at: float
    ) -> None:
        fx = self.adm.observe_catalog(
            P(name), catalog=catalog, loaded=loaded, asked_at=asked_at, now=self.now
        )
        self._checked(fx)

    def pod(self, name: str) -> Any:
        return self.adm.pods[P(name)]

    def queue(self) -> list[int]:
        return [job.ticket for job in self.adm.queue]


# ---- dispatch, queue, FIFO -----------------------------------------------------------


def test_free_pod_takes_a_job_at_once() -> None:
    d = Driver(ep("a"))
    assert d.at(1.5).submit(1) == dispatch(1, "a")
    assert d.adm.running(T(1)) == Running(
        ticket=T(1), pod_id=P("a"), url=url("a"), dispatched_at=1.5
    )
    assert d.adm.inflight == 1
    assert d.queue() == []


def test_busy_pod_queues_then_releases_in_fifo_order() -> None:
    d = Driver(ep("a"))
    assert d.at(0).submit(1) == dispatch(1, "a")
    assert d.at(1).submit(2) == queued(2, 1)
    assert d.at(2).submit(3) == queued(3, 2)
    assert d.at(3).submit(4) == queued(4, 3)
    assert d.queue() == [2, 3, 4]
    assert d.adm.oldest_wait_s(3) == 2.0
    assert d.at(10).release(1) == [dispatch(2, "a", queued_s=9.0)]
    assert d.at(11).release(2) == [dispatch(3, "a", queued_s=9.0)]
    assert d.at(12).release(3) == [dispatch(4, "a", queued_s=9.0)]
    assert d.at(13).release(4) == []
    assert d.adm.inflight == 0
    assert d.pod("a").running == {}
    assert d.pod("a").completed == 4
    assert d.pod("a").idle_since == 13


def test_job_is_bound_when_a_slot_frees_not_at_arrival() -> None:
    """Queued behind two busy pods, a job takes whichever pod frees first."""
    d = Driver(ep("a"), ep("b"))
    assert d.submit(1) == dispatch(1, "a")
    assert d.submit(2) == dispatch(2, "b")
    assert d.at(1).submit(3) == queued(3, 1)
    assert d.at(4).release(2) == [dispatch(3, "b", queued_s=3.0)]


def test_limit_above_one_fills_every_slot_least_loaded_first() -> None:
    d = Driver(ep("a"), ep("b"), max_inflight=2)
    assert d.at(1).submit(1) == dispatch(1, "a")  # tie: first listed
    assert d.at(2).submit(2) == dispatch(2, "b")  # least loaded
    assert d.at(3).submit(3) == dispatch(3, "b")  # equal load: most recently used packs
    assert d.at(4).submit(4) == dispatch(4, "a")
    assert d.at(5).submit(5) == queued(5, 1)
    assert sorted(d.pod("a").running) == [1, 4]
    assert sorted(d.pod("b").running) == [2, 3]
    assert d.at(6).release(2) == [dispatch(5, "b", queued_s=1.0)]


@pytest.mark.parametrize(
    ("max_queue", "expected"),
    [
        pytest.param(0, [reject(2, RejectReason.QUEUE_FULL)], id="no-queue-at-all"),
        pytest.param(
            2,
            [queued(2, 1), queued(3, 2), reject(4, RejectReason.QUEUE_FULL)],
            id="third-waiter-refused",
        ),
    ],
)
def test_queue_full_at_max_queue(max_queue: int, expected: list[Decision]) -> None:
    d = Driver(ep("a"), max_queue=max_queue)
    assert d.submit(1) == dispatch(1, "a")
    assert [d.submit(n) for n in range(2, 2 + len(expected))] == expected
    assert len(d.adm.queue) == max_queue


def test_queue_timeout_expires_waiters_oldest_first_on_tick() -> None:
    d = Driver(ep("a"), queue_timeout_s=30.0)
    d.submit(1)
    assert d.at(1).submit(2) == queued(2, 1)
    assert d.at(5).submit(3) == queued(3, 2)
    assert d.at(30.9).tick() == ([], [])
    assert d.at(31).tick() == ([], [reject(2, RejectReason.QUEUE_TIMEOUT)])
    assert d.queue() == [3]
    assert d.at(34.9).tick() == ([], [])
    assert d.at(35).tick() == ([], [reject(3, RejectReason.QUEUE_TIMEOUT)])
    assert d.at(36).release(1) == []


# ---- no pods, scale from zero, warm-up ------------------------------------------------


def test_no_pods_without_hold_answers_no_backends() -> None:
    d = Driver(hold_when_empty=False)
    assert d.submit(1) == reject(1, RejectReason.NO_BACKENDS)
    assert d.queue() == []


def test_starting_pod_counts_as_capacity_coming() -> None:
    d = Driver(ep("a", ready=False), hold_when_empty=False)
    assert d.pod("a").state is PodState.STARTING
    assert d.submit(1) == queued(1, 1)
    assert d.at(3).reconcile(ep("a")) == reconciled(
        dispatches=[dispatch(1, "a", queued_s=3.0)],
        rejects=[],
        transitions=[(P("a"), PodState.STARTING, PodState.READY)],
    )


def test_scale_from_zero_holds_the_queue_until_a_pod_is_ready() -> None:
    d = Driver(hold_when_empty=True)
    assert d.at(0).submit(1) == queued(1, 1)
    assert d.at(1).submit(2) == queued(2, 2)
    assert d.at(5).tick() == ([], [])
    assert d.at(6).reconcile(ep("a", ready=False)) == reconciled(
        dispatches=[], rejects=[], transitions=[(P("a"), None, PodState.STARTING)]
    )
    assert d.at(7).reconcile(ep("a")) == reconciled(
        dispatches=[dispatch(1, "a", queued_s=7.0)],
        rejects=[],
        transitions=[(P("a"), PodState.STARTING, PodState.READY)],
    )
    assert d.at(8).release(1) == [dispatch(2, "a", queued_s=7.0)]


def test_queue_is_rejected_when_the_last_pod_vanishes_without_hold() -> None:
    d = Driver(ep("a"), hold_when_empty=False)
    d.submit(1)
    d.submit(2)
    d.submit(3)
    assert d.at(1).reconcile() == reconciled(
        dispatches=[],
        rejects=[reject(2, RejectReason.NO_BACKENDS), reject(3, RejectReason.NO_BACKENDS)],
        transitions=[(P("a"), PodState.READY, PodState.DRAINING)],
    )
    assert d.submit(4) == reject(4, RejectReason.NO_BACKENDS)
    assert d.at(2).release(1) == []
    assert d.adm.pods == {}


def test_warmup_gates_a_new_pod_until_mark_warm() -> None:
    d = Driver(warmup=True)
    assert d.transitions(ep("a")) == [
        (P("a"), None, PodState.STARTING),
        (P("a"), PodState.STARTING, PodState.WARMING),
    ]
    assert d.at(1).submit(1) == queued(1, 1)  # warming counts as capacity coming
    assert d.at(2).tick() == ([], [])
    assert d.adm.pick_light(2) is None
    assert d.at(2).transitions(ep("a")) == []  # still warming
    assert d.at(4).mark_warm("a") == [dispatch(1, "a", queued_s=3.0)]
    assert d.pod("a").state is PodState.READY
    assert d.mark_warm("a") == []  # already warm
    assert d.mark_warm("nope") == []


def test_warming_pod_that_loses_readiness_goes_back_to_starting() -> None:
    d = Driver(ep("a"), warmup=True)
    assert d.transitions(ep("a", ready=False)) == [(P("a"), PodState.WARMING, PodState.STARTING)]
    assert d.mark_warm("a") == []
    assert d.pod("a").state is PodState.STARTING


# ---- draining -------------------------------------------------------------------------


def test_terminating_pod_takes_no_new_work_but_finishes_its_job() -> None:
    d = Driver(ep("a"), ep("b"))
    d.submit(1)
    d.submit(2)
    assert d.at(1).transitions(ep("a", terminating=True), ep("b")) == [
        (P("a"), PodState.READY, PodState.DRAINING)
    ]
    assert d.at(2).submit(3) == queued(3, 1)
    assert d.at(3).release(1) == []  # a's slot is free but a drains: 3 keeps waiting
    assert d.pod("a").state is PodState.DRAINING
    assert d.pod("a").completed == 1
    assert d.at(4).release(2) == [dispatch(3, "b", queued_s=2.0)]
    assert d.at(5).transitions(ep("b")) == [(P("a"), PodState.DRAINING, None)]
    assert list(d.adm.pods) == [P("b")]


def test_vanished_pod_is_forgotten_once_its_running_job_releases() -> None:
    d = Driver(ep("a"), ep("b"))
    d.submit(1)
    d.submit(2)
    d.submit(3)
    assert d.at(1).transitions(ep("b")) == [(P("a"), PodState.READY, PodState.DRAINING)]
    assert P("a") in d.adm.pods
    assert d.adm.pick_light(1) == d.pod("b")
    assert d.at(2).release(1) == []
    assert list(d.adm.pods) == [P("b")]
    assert d.at(3).release(2) == [dispatch(3, "b", queued_s=3.0)]


def test_not_ready_serving_pod_drains_and_comes_back() -> None:
    d = Driver(ep("a"), hold_when_empty=True)  # without hold: no_backends while draining
    d.submit(1)
    assert d.at(1).transitions(ep("a", ready=False)) == [
        (P("a"), PodState.READY, PodState.DRAINING)
    ]
    assert d.submit(2) == queued(2, 1)
    assert d.at(2).release(1) == []
    assert d.at(3).reconcile(ep("a")) == reconciled(
        dispatches=[dispatch(2, "a", queued_s=2.0)],
        rejects=[],
        transitions=[(P("a"), PodState.DRAINING, PodState.READY)],
    )


# ---- retry, ejection ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pods", "hold", "expected", "queue_after"),
    [
        pytest.param(["a", "b"], False, dispatch(1, "b", queued_s=1.0), [], id="other-pod-free"),
        # a first refusal may be a blip: the job waits for the pod's short ejection to end
        pytest.param(["a"], False, queued(1, 1), [1], id="only-pod-first-refusal"),
        pytest.param(["a"], True, queued(1, 1), [1], id="only-pod-hold"),
    ],
)
def test_retry_after_connection_refused(
    pods: list[str], hold: bool, expected: Decision, queue_after: list[int]
) -> None:
    d = Driver(*(ep(p) for p in pods), hold_when_empty=hold)
    assert d.submit(1) == dispatch(1, "a")
    assert d.at(1).retry(1) == expected
    assert d.pod("a").ejected_until == 3.0
    assert d.pod("a").running == {}
    assert d.queue() == queue_after


def test_only_pod_refusing_twice_is_no_backends_without_hold() -> None:
    d = Driver(ep("a"))
    assert d.submit(1) == dispatch(1, "a")
    assert d.at(1).retry(1) == queued(1, 1)
    assert d.at(3).tick() == ([dispatch(1, "a", queued_s=3.0)], [])  # ejection over
    assert d.at(3).retry(1) == reject(1, RejectReason.NO_BACKENDS)
    assert d.queue() == []


def test_retry_goes_ahead_of_the_queue_when_every_pod_is_busy() -> None:
    d = Driver(ep("a"), ep("b"))
    d.submit(1)
    d.submit(2)
    assert d.at(1).submit(3) == queued(3, 1)
    assert d.at(2).retry(1) == queued(1, 1)
    assert d.queue() == [1, 3]
    assert d.at(3).release(2) == [dispatch(1, "b", queued_s=3.0)]
    assert d.at(4).tick() == ([dispatch(3, "a", queued_s=3.0)], [])  # a's ejection over


def test_retry_during_shutdown_with_no_pod_left_is_shutting_down() -> None:
    d = Driver(ep("a"), hold_when_empty=True)
    d.submit(1)
    assert d.shutdown() == []
    assert d.at(1).retry(1) == reject(1, RejectReason.SHUTTING_DOWN)
    assert d.adm.inflight == 0


def test_retry_of_a_ticket_not_running_is_a_state_error() -> None:
    d = Driver(ep("a"))
    with pytest.raises(StateError):
        d.adm.release(T(99), Outcome.REFUSED, d.now)


def test_ejection_expires_and_tick_readmits_the_pod() -> None:
    d = Driver(ep("a"), ep("b"))
    assert d.submit(1) == dispatch(1, "a")
    assert d.retry(1) == dispatch(1, "b")  # a ejected until 2.0
    assert d.at(1).submit(2) == queued(2, 1)
    assert d.at(1.9).tick() == ([], [])
    assert d.adm.pick_light(1.9) == d.pod("b")
    assert d.at(2).tick() == ([dispatch(2, "a", queued_s=1.0)], [])


def test_ejection_doubles_per_repeat_up_to_32x_and_resets_on_success() -> None:
    d = Driver(ep("a"), eject_s=1.0)
    spans = []
    for _ in range(8):
        d.eject("a", 100.0)
        spans.append(d.pod("a").ejected_until - 100.0)
    assert spans == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 32.0, 32.0]
    assert d.at(200).submit(1) == dispatch(1, "a")
    d.release(1)
    assert d.pod("a").ejections == 0
    d.eject("nope", 0.0)  # unknown pod (discovery removed it): nothing happens


def test_failed_release_counts_an_error_not_a_completion() -> None:
    d = Driver(ep("a"))
    d.submit(1)
    assert d.at(1).release(1, Outcome.FAILED) == []
    assert (d.pod("a").errors, d.pod("a").completed) == (1, 0)
    with pytest.raises(StateError, match="not running"):  # a second release is a bug
        d.adm.release(T(1), Outcome.COMPLETED, d.now)
    assert (d.pod("a").errors, d.pod("a").completed) == (1, 0)
    assert d.pod("a").ejected_until == 3.0, "a pod that broke an exchange rests"


def test_stray_release_of_a_queued_ticket_raises_and_changes_nothing() -> None:
    """A release of a ticket that does not run is the caller's bug: it is refused and
    the queue's books are untouched."""
    d = Driver(ep("a"))
    d.submit(1)
    assert d.at(1).submit(2) == queued(2, 1)
    with pytest.raises(StateError):
        d.adm.release(T(2), Outcome.COMPLETED, d.now)
    assert_invariants(d.adm, d.now)
    assert d.queue() == [2]
    assert d.at(40).tick() == ([], [reject(2, RejectReason.QUEUE_TIMEOUT)])


# ---- cancel, shutdown -----------------------------------------------------------------


def test_cancel_removes_a_queued_job_only() -> None:
    d = Driver(ep("a"))
    d.submit(1)
    d.submit(2)
    d.submit(3)
    assert d.cancel(2) is True
    assert d.cancel(2) is False
    assert d.cancel(1) is False  # running: the runtime releases it instead
    assert d.cancel(42) is False
    assert d.adm.position(T(3)) == 1
    assert d.at(1).release(1) == [dispatch(3, "a", queued_s=1.0)]


def test_shutdown_rejects_the_queue_and_refuses_new_work() -> None:
    d = Driver(ep("a"))
    d.submit(1)
    d.submit(2)
    d.submit(3)
    assert d.shutdown() == [
        reject(2, RejectReason.SHUTTING_DOWN),
        reject(3, RejectReason.SHUTTING_DOWN),
    ]
    assert d.submit(4) == reject(4, RejectReason.SHUTTING_DOWN)
    assert d.adm.inflight == 1  # in-flight work drains normally
    assert d.at(1).release(1) == []
    assert d.adm.inflight == 0
    assert d.shutdown() == []


# ---- pod choice -----------------------------------------------------------------------


def test_checkpoint_affinity_beats_lower_load() -> None:
    d = Driver(ep("a"), ep("b"), max_inflight=2)
    assert d.at(1).submit(1, checkpoint="sdxl") == dispatch(1, "a")
    assert d.at(2).submit(2, checkpoint="sdxl") == dispatch(2, "a")  # b is less loaded
    assert d.at(3).submit(3, checkpoint="sd15") == dispatch(3, "b")
    assert d.pod("a").checkpoint == "sdxl"
    assert d.pod("b").checkpoint == "sd15"


def test_job_without_checkpoint_goes_to_the_least_loaded_pod() -> None:
    d = Driver(ep("a"), ep("b"), max_inflight=2)
    assert d.at(1).submit(1, checkpoint="sdxl") == dispatch(1, "a")
    assert d.at(2).submit(2) == dispatch(2, "b")
    assert d.pod("b").checkpoint is None


def test_affinity_never_holds_a_job_back_from_a_free_pod() -> None:
    d = Driver(ep("a"), ep("b"))
    assert d.submit(1, checkpoint="sd15") == dispatch(1, "a")
    assert d.submit(2, checkpoint="sdxl") == dispatch(2, "b")
    assert d.at(1).submit(3, checkpoint="sdxl") == queued(3, 1)
    assert d.at(2).release(1) == [dispatch(3, "a", queued_s=1.0)]  # b would have sdxl
    assert d.pod("a").checkpoint == "sdxl"


def test_a_checkpoint_the_pod_does_not_list_is_never_recorded() -> None:
    d = Driver(ep("a"), ep("b"), max_inflight=2)
    assert d.at(1).submit(1, checkpoint="typo") == dispatch(1, "a")
    assert d.pod("a").checkpoint == "typo"  # the pod's list is not known yet: it counts
    d.at(2).observe_catalog("a", {"sd15", "sdxl"}, loaded="sd15", asked_at=1.5)
    assert d.pod("a").checkpoint == "sd15"  # the pod's word, asked after the job was sent
    assert d.at(2.5).release(1) == []
    assert d.at(3).submit(2, checkpoint="nope") == dispatch(2, "a")  # most recently used
    assert d.pod("a").checkpoint == "sd15"  # a name it does not list: no state, no label
    assert d.at(4).submit(3, checkpoint="sdxl") == dispatch(3, "b")  # a is fuller
    assert d.pod("b").checkpoint == "sdxl"  # b's list is not known: any name counts
    d.adm.observe_gate(P("a"), foreign=0, limit=2, checkpoint="zzz", now=d.now)
    assert d.pod("a").checkpoint == "sd15"  # a gate's word is held to the same list
    d.adm.observe_gate(P("a"), foreign=0, limit=2, checkpoint="sdxl", now=d.now)
    assert d.pod("a").checkpoint == "sdxl"


@pytest.mark.parametrize(
    ("recorded", "loaded", "expected"),
    [
        pytest.param("sdxl", "sd15", "sdxl", id="a-newer-job-wins"),
        pytest.param("gone", "sd15", None, id="a-recorded-name-it-does-not-list-goes"),
    ],
)
def test_a_job_sent_after_the_question_keeps_its_checkpoint_if_listed(
    recorded: str, loaded: str, expected: str | None
) -> None:
    """The pod answered what it had loaded before the job reached it: the job is newer."""
    d = Driver(ep("a"))
    assert d.at(2).submit(1, checkpoint=recorded) == dispatch(1, "a")
    d.at(3).observe_catalog("a", {"sd15", "sdxl"}, loaded=loaded, asked_at=1.0)
    assert d.pod("a").checkpoint == expected


@pytest.mark.parametrize(
    ("loaded", "expected"),
    [
        pytest.param("sd15", "sd15", id="listed"),
        pytest.param(None, None, id="nothing-loaded-yet"),
        pytest.param("elsewhere", None, id="not-in-its-own-list"),
    ],
)
def test_what_the_pod_says_it_has_loaded(loaded: str | None, expected: str | None) -> None:
    d = Driver(ep("a"))
    d.at(1).observe_catalog("a", {"sd15", "sdxl"}, loaded=loaded, asked_at=0.5)
    assert d.pod("a").checkpoint == expected


def pick_light_driver() -> Driver:
    """a: 1 of 2 busy, b: idle but ejected until 10, c: idle, d: not ready, e: 2 of 2."""
    d = Driver(
        ep("a"), ep("b"), ep("c"), ep("d", ready=False), ep("e"), max_inflight=2, eject_s=10.0
    )
    d.eject("b", 0.0)
    assert d.at(1).submit(1) == dispatch(1, "a")
    assert d.at(2).submit(2) == dispatch(2, "c")
    assert d.at(3).submit(3) == dispatch(3, "e")
    assert d.at(4).submit(4) == dispatch(4, "e")  # equal load: most recently used
    assert d.release(2) == []
    return d


@pytest.mark.parametrize(
    ("now", "exclude", "expected"),
    [
        pytest.param(5.0, (), "c", id="least-loaded"),
        pytest.param(5.0, ("c",), "a", id="exclude"),
        pytest.param(5.0, ("a", "c"), "e", id="full-pod-still-serves-light"),
        pytest.param(5.0, ("a", "c", "e"), None, id="ejected-and-not-ready-never"),
        pytest.param(10.0, (), "b", id="ejection-over-first-listed-wins-tie"),
    ],
)
def test_pick_light(now: float, exclude: tuple[str, ...], expected: str | None) -> None:
    d = pick_light_driver()
    pick = d.adm.pick_light(now, exclude=[P(x) for x in exclude])
    assert (pick.pod_id if pick is not None else None) == expected


def test_idle_pods_lists_not_ready_first_then_longest_idle() -> None:
    d = Driver(ep("a"), ep("b"), ep("c"), ep("d", ready=False), warmup=True)
    d.at(1).mark_warm("a")
    d.at(2).mark_warm("b")
    assert d.adm.idle_pods(d.now) == [P("c"), P("d"), P("a"), P("b")]
    assert d.at(3).submit(1) == dispatch(1, "a")
    assert d.adm.idle_pods(d.now) == [P("c"), P("d"), P("b")]
    d.at(4).release(1)
    assert d.adm.idle_pods(d.now) == [P("c"), P("d"), P("b"), P("a")]
    assert d.adm.count(PodState.READY) == 2
    assert d.adm.count(PodState.STARTING, PodState.WARMING) == 2


def test_a_slot_given_back_without_a_generation_is_no_completion_and_no_eta_sample() -> None:
    d = Driver(ep("a"))
    d.submit(1)
    d.submit(2)
    assert d.at(10).release(1, Outcome.UNUSED) == [dispatch(2, "a", queued_s=10.0)]
    assert d.pod("a").completed == 0 and d.pod("a").errors == 0
    # 10 s for one unit would have pulled the ETA estimate up; it is untouched
    assert d.adm.eta.seconds_per_unit == d.adm.config.seconds_per_unit


def test_cordoned_pods_take_no_new_work_until_the_cordon_ends() -> None:
    """Scale-in picks idle pods and cordons them before the scale patch: nothing may be
    bound to a pod that is about to be deleted."""
    d = Driver(ep("a"), ep("b"))
    assert d.at(1).submit(1) == dispatch(1, "a")
    # a runs job 1: only b (idle) can be cordoned
    assert d.cordon("a", "b", for_s=10) == [P("b")]
    assert d.adm.idle_pods(d.now) == []
    assert d.at(2).submit(2) == queued(2, 1), "b is cordoned, a is busy"
    light = d.adm.pick_light(d.now)
    assert light is not None and light.pod_id == P("a")
    assert d.at(3).release(1) == [dispatch(2, "a", queued_s=1.0)]
    assert d.at(11).tick() == ([], [])
    assert takes_work(d.adm.pods[P("b")], d.now), "the scale-in did not happen: b serves again"


def test_cordoned_pods_are_not_capacity_coming() -> None:
    d = Driver(ep("a"))
    d.cordon("a", for_s=10)
    assert d.at(1).submit(1) == reject(1, RejectReason.NO_BACKENDS)


# ---- queries --------------------------------------------------------------------------


def test_position_and_eta_grow_along_the_queue() -> None:
    d = Driver(ep("a"), seconds_per_unit=1.0)
    d.submit(1, cost=1.0)
    d.submit(2, cost=2.0)
    d.submit(3, cost=3.0)
    d.submit(4, cost=1.0)
    assert [d.adm.position(T(n)) for n in (1, 2, 3, 4, 5)] == [None, 1, 2, 3, None]
    # ((work ahead + half the running work) / ready slots + own cost) * seconds per unit
    etas = [d.adm.eta_s(T(n)) for n in (2, 3, 4)]
    assert etas == [2.5, 5.5, 6.5]
    assert etas == sorted(etas)
    # a completion re-estimates seconds per unit (EWMA 0.2): job 1 took 6 s for 1 unit
    assert d.at(6).release(1) == [dispatch(2, "a", queued_s=6.0)]
    assert d.adm.eta_s(T(3)) == ((0 + 2.0 / 2) / 1 + 3.0) * 2.0


def test_eta_spreads_work_over_every_ready_slot() -> None:
    d = Driver(ep("a"), ep("b"), max_inflight=2, seconds_per_unit=1.0)
    for n in range(1, 6):
        d.submit(n, cost=2.0)
    assert d.adm.position(T(5)) == 1
    assert d.adm.eta_s(T(5)) == ((0 + 8.0 / 2) / 4 + 2.0) * 1.0


def test_an_absurd_job_ahead_adds_at_most_the_longest_a_job_may_run_to_an_eta() -> None:
    """steps 1e9, width and height 1e6, batch_size 1e9: even clamped, the cost model's
    plan is ~10^11 units; uncapped, every job behind it would wait 10^10 s (and show it)."""
    d = Driver(ep("a"), seconds_per_unit=0.1, max_job_s=1800.0)
    absurd = estimate_steps({"steps": 1e9, "width": 1e6, "height": 1e6, "batch_size": 1e9})
    assert absurd * 0.1 > 1e9
    d.submit(1, cost=absurd)  # runs
    d.submit(2, cost=absurd)  # waits
    d.submit(3, cost=10.0)  # waits behind it
    assert d.adm.eta_s(T(2)) == 1800.0 / 2 + 1800.0
    assert d.adm.eta_s(T(3)) == (1800.0 + 1800.0 / 2) + 10.0 * 0.1


# ---- property: a random storm of events -----------------------------------------------

QUEUED, RUNNING = "queued", "running"
DONE, CANCELLED = "done", "cancelled"
PODS = ("a", "b", "c", "d")
ENDPOINT_STATES = ("ready", "not_ready", "terminating", "gone")
CHECKPOINTS = (None, "sd15", "sdxl")


class AdmissionStorm(RuleBasedStateMachine):
    """Bursts, disconnects, refused connections, pod churn, ejections, cordons and time,
    in random order.

    A model records every ticket's fate from the Effects the core returns; invariants
    compare the model with the core (and run ``Admission.check``) after every step, and
    check that ``wake_at`` is honest: ticking any earlier changes nothing. Time only moves
    forward; every other event happens at the current time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.adm = Admission(AdmissionConfig(**BASE))
        self.now = 0.0
        self.fate: dict[TicketId, str] = {}
        self.discovery: dict[str, str] = {}
        self.next_ticket = 1
        self.wake_at: float | None = None

    @initialize(
        limit=st.integers(1, 3),
        max_queue=st.integers(0, 6),
        hold=st.booleans(),
        warmup=st.booleans(),
        pods=st.lists(st.sampled_from(PODS), unique=True, max_size=3),
    )
    def configure(
        self, limit: int, max_queue: int, hold: bool, warmup: bool, pods: list[str]
    ) -> None:
        config = AdmissionConfig(
            max_inflight=limit,
            max_queue=max_queue,
            queue_timeout_s=10.0,
            hold_when_empty=hold,
            warmup=warmup,
            eject_s=1.0,
        )
        self.adm = Admission(config)
        self.discovery = dict.fromkeys(pods, "ready")
        self._reconcile()

    # -- bookkeeping ---------------------------------------------------------------------

    def _tickets(self, fate: str) -> list[TicketId]:
        return sorted(t for t, f in self.fate.items() if f == fate)

    def _apply(self, fx: Effects) -> None:
        """Move every ticket the Effects name to its new fate, checking it came from a
        fate that allows it."""
        for d in fx.dispatches:
            assert self.fate.get(d.ticket) in ("new", QUEUED, "refused"), d
            run = self.adm.running(d.ticket)
            assert run is not None and run.pod_id == d.pod_id and run.url == d.url
            self.fate[d.ticket] = RUNNING
        for q in fx.queued:
            assert self.fate.get(q.ticket) in ("new", "refused"), q
            assert q.position == self.adm.position(q.ticket)
            self.fate[q.ticket] = QUEUED
        for r in fx.rejects:
            assert self.fate.get(r.ticket) in ("new", QUEUED, "refused"), r
            self.fate[r.ticket] = f"rejected:{r.reason}"
        last = {pod_id: new for pod_id, _old, new in fx.transitions}
        for pod_id, state in last.items():  # the last transition is where the pod is now
            pod = self.adm.pods.get(pod_id)
            assert (pod.state if pod is not None else None) is state
        self.wake_at = fx.wake_at

    def _reconcile(self) -> None:
        endpoints = [
            ep(name, ready=state == "ready", terminating=state == "terminating")
            for name, state in sorted(self.discovery.items())
            if state != "gone"
        ]
        self._apply(self.adm.reconcile(endpoints, self.now))

    # -- rules ---------------------------------------------------------------------------

    @rule(burst=st.lists(st.sampled_from(CHECKPOINTS), min_size=1, max_size=5))
    def submit(self, burst: list[str | None]) -> None:
        for checkpoint in burst:
            ticket, self.next_ticket = T(self.next_ticket), self.next_ticket + 1
            job = Job(ticket=ticket, enqueued_at=self.now, checkpoint=checkpoint)
            self.fate[ticket] = "new"
            self._apply(self.adm.submit(job, self.now))

    @precondition(lambda self: self.adm.inflight > 0)
    @rule(
        data=st.data(),
        outcome=st.sampled_from(
            [Outcome.COMPLETED, Outcome.FAILED, Outcome.INTERRUPTED, Outcome.UNUSED]
        ),
    )
    def release(self, data: st.DataObject, outcome: Outcome) -> None:
        ticket = data.draw(st.sampled_from(self._tickets(RUNNING)))
        self.fate[ticket] = DONE
        self._apply(self.adm.release(ticket, outcome, self.now))

    @precondition(lambda self: len(self.fate) > self.adm.inflight)
    @rule(data=st.data())
    def stray_release(self, data: st.DataObject) -> None:
        """Releasing a ticket that is not running (queued, finished) is refused."""
        idle = sorted(t for t, f in self.fate.items() if f != RUNNING)
        ticket = data.draw(st.sampled_from(idle))
        with pytest.raises(StateError):
            self.adm.release(ticket, Outcome.COMPLETED, self.now)

    @precondition(lambda self: self.adm.inflight > 0)
    @rule(data=st.data())
    def refused(self, data: st.DataObject) -> None:
        ticket = data.draw(st.sampled_from(self._tickets(RUNNING)))
        run = self.adm.running(ticket)
        assert run is not None
        refused_pod = self.adm.pods[run.pod_id]
        self.fate[ticket] = "refused"
        fx = self.adm.release(ticket, Outcome.REFUSED, self.now)
        assert refused_pod.ejected_until > self.now
        assert all(d.pod_id != refused_pod.pod_id for d in fx.dispatches)
        self._apply(fx)
        assert self.fate[ticket] != "refused", "a refused job got no new decision"

    @precondition(lambda self: len(self.fate) > 0)
    @rule(
        data=st.data(), reason=st.sampled_from([RejectReason.CANCELLED, RejectReason.CLIENT_GONE])
    )
    def cancel(self, data: st.DataObject, reason: RejectReason) -> None:
        ticket = data.draw(st.sampled_from(sorted(self.fate)))
        if self.fate[ticket] != QUEUED:
            with pytest.raises(StateError):
                self.adm.cancel(ticket, reason, self.now)
            return
        fx = self.adm.cancel(ticket, reason, self.now)
        assert reject(ticket, reason) in fx.rejects
        self._apply(fx)
        self.fate[ticket] = CANCELLED

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0, 11.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self._apply(self.adm.tick(self.now))

    @rule()
    def tick_at_wake_at(self) -> None:
        if self.wake_at is not None:
            self.now = max(self.now, self.wake_at)
        self._apply(self.adm.tick(self.now))

    @rule(pod=st.sampled_from(PODS), state=st.sampled_from(ENDPOINT_STATES))
    def discovery_changes(self, pod: str, state: str) -> None:
        self.discovery[pod] = state
        self._reconcile()

    @rule(pod=st.sampled_from(PODS))
    def warmed_up(self, pod: str) -> None:
        self._apply(self.adm.mark_warm(P(pod), self.now))

    @rule(pod=st.sampled_from(PODS))
    def light_call_failed(self, pod: str) -> None:
        self._apply(self.adm.eject(P(pod), self.now))

    @rule(pods=st.lists(st.sampled_from(PODS), unique=True, max_size=2))
    def scale_in_cordon(self, pods: list[str]) -> None:
        fx = self.adm.cordon([P(p) for p in pods], self.now, for_s=5.0)
        assert all(not self.adm.pods[p].running for p in fx.cordoned)
        self._apply(fx)

    @precondition(lambda self: self.adm.inflight > 0)
    @rule(data=st.data())
    def gate_said_busy(self, data: st.DataObject) -> None:
        ticket = data.draw(st.sampled_from(self._tickets(RUNNING)))
        run = self.adm.running(ticket)
        assert run is not None
        busy_pod = self.adm.pods[run.pod_id]
        self.fate[ticket] = "refused"
        rest = (busy_pod.ejected_until, busy_pod.ejections)
        fx = self.adm.release(ticket, Outcome.BUSY, self.now)
        assert (busy_pod.ejected_until, busy_pod.ejections) == rest, "a busy pod is healthy"
        assert all(d.pod_id != busy_pod.pod_id for d in fx.dispatches), "full until it says"
        self._apply(fx)
        assert self.fate[ticket] != "refused", "a refused job got no new decision"

    @rule(
        pod=st.sampled_from(PODS),
        foreign=st.integers(0, 3),
        limit=st.integers(1, 3),
        healthy=st.booleans(),
    )
    def gate_published(self, pod: str, foreign: int, limit: int, healthy: bool) -> None:
        fx = self.adm.observe_gate(
            P(pod), foreign=foreign, limit=limit, checkpoint=None, now=self.now, healthy=healthy
        )
        self._apply(fx)

    @rule(pod=st.sampled_from(PODS), lost=st.booleans())
    def gate_out_of_sight(self, pod: str, lost: bool) -> None:
        fx = (
            self.adm.gate_lost(P(pod), self.now) if lost else self.adm.gate_absent(P(pod), self.now)
        )
        self._apply(fx)

    @rule()
    def close_for_sigterm(self) -> None:
        """New jobs are refused; the queued ones keep draining."""
        self._apply(self.adm.close(self.now))

    @rule()
    def shutdown(self) -> None:
        in_line = [job.ticket for job in self.adm.queue]
        assert sorted(in_line) == self._tickets(QUEUED)
        fx = self.adm.shutdown(self.now)
        assert list(fx.rejects) == [reject(t, RejectReason.SHUTTING_DOWN) for t in in_line]
        self._apply(fx)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def core_invariants_hold(self) -> None:
        assert_invariants(self.adm, self.now)

    @invariant()
    def model_matches_core(self) -> None:
        for ticket, fate in self.fate.items():
            assert fate not in ("new", "refused"), f"{ticket} got no decision"
            assert (ticket in self.adm.queue) == (fate == QUEUED), (ticket, fate)
            assert (self.adm.running(ticket) is not None) == (fate == RUNNING), (ticket, fate)
        assert self.adm.inflight == len(self._tickets(RUNNING))
        assert len(self.adm.queue) == len(self._tickets(QUEUED))

    @invariant()
    def wake_at_is_honest(self) -> None:
        """Nothing changes before ``wake_at``: the runtime may sleep until then."""
        if len(self.adm.queue):
            assert self.wake_at is not None, "jobs wait but the core needs no wake-up"
        until = self.now + 100.0 if self.wake_at is None else self.wake_at
        if until <= self.now:
            return
        probe = copy.deepcopy(self.adm)
        fx = probe.tick(self.now + (until - self.now) / 2)
        assert fx.dispatches == () and fx.rejects == (), fx

    # -- the end: everything drains, nothing leaks ---------------------------------------

    def teardown(self) -> None:
        for _ in range(1000):
            for ticket in self._tickets(RUNNING):
                self.fate[ticket] = DONE
                self._apply(self.adm.release(ticket, Outcome.COMPLETED, self.now))
            if not self._tickets(QUEUED) and not self._tickets(RUNNING):
                break
            self.now += 100.0  # past every ejection, cordon and the queue timeout
            for name in PODS:  # every gate empties and is in sight again
                pod = self.adm.pods.get(P(name))
                if pod is not None and pod.gated:
                    fx = self.adm.observe_gate(
                        P(name), foreign=0, limit=pod.limit, checkpoint=None, now=self.now
                    )
                    self._apply(fx)
            self._apply(self.adm.tick(self.now))
        assert self.adm.inflight == 0
        assert len(self.adm.queue) == 0
        assert all(not pod.running for pod in self.adm.pods.values())
        assert all(pod.listed for pod in self.adm.pods.values())
        assert all(f not in (QUEUED, RUNNING, "new", "refused") for f in self.fate.values())


AdmissionStorm.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_admission_storm = AdmissionStorm.TestCase
