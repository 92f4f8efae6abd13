"""Unit: the slot book (bind/unbind, the transition table, check() catching bad books)."""

from __future__ import annotations

import pytest

from sdproxy.core.effects import Transition
from sdproxy.core.pods import TRANSITIONS, PodId, PodState, check_transition
from sdproxy.core.queue import Job, TicketId
from sdproxy.core.slots import SlotBook
from sdproxy.errors import IllegalTransition, StateError


def job(n: int, checkpoint: str | None = None, *, restore: bool = False) -> Job:
    return Job(ticket=TicketId(n), enqueued_at=0.0, checkpoint=checkpoint, restore=restore)


def ready_book(limit: int = 1) -> SlotBook:
    book = SlotBook(limit=limit)
    pod, appeared = book.add_pod(PodId("a"), "http://a", 0.0)
    assert appeared == Transition(PodId("a"), None, PodState.STARTING)
    assert book.set_state(pod, PodState.READY) == Transition(
        PodId("a"), PodState.STARTING, PodState.READY
    )
    assert book.set_state(pod, PodState.READY) is None
    return book


def test_bind_and_unbind_keep_both_indexes_together() -> None:
    book = ready_book(limit=2)
    pod = book.pods[PodId("a")]
    run = book.bind(job(1, "sdxl"), pod, 3.0)
    assert (run.pod_id, run.dispatched_at, pod.checkpoint, pod.last_used) == ("a", 3.0, "sdxl", 3.0)
    assert book.running(TicketId(1)) == run == pod.running[TicketId(1)]
    assert book.inflight == 1
    book.check()
    freed = book.unbind(TicketId(1))
    assert (freed.run, freed.job, freed.pod) == (run, job(1, "sdxl"), pod)
    assert book.inflight == 0 and pod.running == {}


def test_a_job_with_restore_afterwards_leaves_the_default_checkpoint() -> None:
    """sd-webui reloads the default after a job with override_settings_restore_afterwards
    (its default): the pod's checkpoint does not follow the job."""
    book = ready_book()
    pod = book.pods[PodId("a")]
    pod.checkpoint = "sd15"
    run = book.bind(job(1, "sdxl", restore=True), pod, 1.0)
    assert (pod.checkpoint, run.checkpoint) == ("sd15", "sd15")
    book.unbind(TicketId(1))
    book.bind(job(2, "sdxl"), pod, 2.0)
    assert pod.checkpoint == "sdxl"
    book.check()


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("twice", id="ticket-bound-twice"),
        pytest.param("full", id="pod-without-a-free-slot"),
        pytest.param("unbind", id="unbind-a-ticket-not-running"),
    ],
)
def test_illegal_bindings_raise(bad: str) -> None:
    book = ready_book()
    pod = book.pods[PodId("a")]
    book.bind(job(1), pod, 0.0)
    with pytest.raises(StateError):
        if bad == "twice":
            book.bind(job(1), pod, 0.0)
        elif bad == "full":
            book.bind(job(2), pod, 0.0)
        else:
            book.unbind(TicketId(9))
    book.check()  # a refused event left the books intact


def test_check_catches_books_that_disagree() -> None:
    book = ready_book(limit=1)
    pod = book.pods[PodId("a")]
    run = book.bind(job(1), pod, 0.0)
    pod.running[TicketId(2)] = run  # corrupt: over the limit, not in the ticket index
    with pytest.raises(StateError, match="limit"):
        book.check()
    pod.limit = 2
    with pytest.raises(StateError, match=r"wrong pod|disagrees"):
        book.check()


def test_a_gone_pod_is_forgotten_only_once_idle() -> None:
    book = ready_book()
    pod = book.pods[PodId("a")]
    book.bind(job(1), pod, 0.0)
    pod.listed = False
    book.set_state(pod, PodState.DRAINING)
    assert book.forget_if_gone(pod) is None  # still runs job 1
    book.unbind(TicketId(1))
    with pytest.raises(StateError, match="not forgotten"):
        book.check()
    assert book.forget_if_gone(pod) == Transition(PodId("a"), PodState.DRAINING, None)
    assert dict(book.pods) == {}


def test_every_state_change_outside_the_table_raises() -> None:
    states: list[PodState | None] = [None, *PodState]
    for old in states:
        for new in states:
            if new in TRANSITIONS[old]:
                check_transition(PodId("p"), old, new)
            else:
                with pytest.raises(IllegalTransition):
                    check_transition(PodId("p"), old, new)


def test_a_ready_pod_cannot_go_back_to_starting() -> None:
    book = ready_book()
    with pytest.raises(IllegalTransition, match="ready -> starting"):
        book.set_state(book.pods[PodId("a")], PodState.STARTING)
