"""Unit: the queue policy (FifoQueue): order, requeue, O(1) remove, next_for, deadlines."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdproxy.core.queue import FifoQueue, Job, TicketId


def job(n: int, *, checkpoint: str | None = None) -> Job:
    return Job(ticket=TicketId(n), enqueued_at=float(n), checkpoint=checkpoint)


def filled(*tickets: int, timeout: float = 100.0) -> FifoQueue:
    q = FifoQueue()
    for n in tickets:
        q.push(job(n), deadline=n + timeout)
    return q


def order(q: FifoQueue) -> list[int]:
    return [j.ticket for j in q]


def test_empty_queue() -> None:
    q = FifoQueue()
    assert (len(q), q.oldest(), q.next_deadline(), order(q)) == (0, None, None, [])
    assert q.next_for(lambda _j: True) is None
    assert q.expired(1e9) == []
    assert q.remove(TicketId(1)) is None
    assert q.position(TicketId(1)) is None
    assert TicketId(1) not in q


def test_first_in_first_out_and_push_answers_the_position() -> None:
    q = FifoQueue()
    assert [q.push(job(n), deadline=99.0) for n in (1, 2, 3)] == [1, 2, 3]
    assert order(q) == [1, 2, 3]
    assert q.oldest() == job(1)
    assert q.next_for(lambda _j: True) == job(1)
    assert len(q) == 3, "next_for leaves the job in line"


def test_requeue_goes_ahead_of_everyone() -> None:
    q = filled(2, 3)
    assert q.requeue(job(1), deadline=50.0) == 1
    assert order(q) == [1, 2, 3]
    assert q.position(TicketId(1)) == 1


def test_pushing_a_queued_ticket_again_is_refused() -> None:
    q = filled(1)
    with pytest.raises(ValueError, match="queued already"):
        q.push(job(1), deadline=5.0)


def test_the_same_job_requeued_twice_is_live_once() -> None:
    """A refused job is requeued, bound, refused again and requeued as the same object:
    the stale entry left in line must not make it appear twice."""
    q = filled(2)
    first = job(1)
    q.requeue(first, deadline=10.0)
    assert q.remove(TicketId(1)) is first  # bound to a pod
    q.requeue(first, deadline=10.0)  # refused again
    assert order(q) == [1, 2]
    assert len(q) == 2
    assert [j.ticket for j in q.expired(10.0)] == [1]
    assert order(q) == [2]


def test_next_for_skips_jobs_the_placement_declines() -> None:
    q = FifoQueue()
    for n, ckpt in ((1, "sdxl"), (2, "sd15"), (3, "sd15")):
        q.push(job(n, checkpoint=ckpt), deadline=99.0)
    chosen = q.next_for(lambda j: j.checkpoint == "sd15")
    assert chosen is not None and chosen.ticket == 2
    assert q.next_for(lambda j: j.checkpoint == "other") is None
    assert order(q) == [1, 2, 3]


def test_jobs_expire_by_their_own_deadline_wherever_they_stand() -> None:
    q = FifoQueue()
    q.push(job(1), deadline=30.0)
    q.push(job(2), deadline=5.0)  # a short deadline behind a long one
    q.push(job(3), deadline=20.0)
    assert q.next_deadline() == 5.0
    assert q.expired(4.9) == []
    assert q.expired(5.0) == [job(2)]
    assert order(q) == [1, 3]
    assert q.next_deadline() == 20.0
    assert [j.ticket for j in q.expired(100.0)] == [3, 1]  # earliest deadline first
    assert q.next_deadline() is None


def test_a_removed_job_never_expires() -> None:
    q = filled(1, 2, timeout=1.0)
    q.remove(TicketId(1))
    assert q.next_deadline() == 3.0
    assert q.expired(10.0) == [job(2)]


@pytest.mark.parametrize(
    ("removed", "expected_order", "positions"),
    [
        pytest.param([1], [2, 3, 4], {2: 1, 3: 2, 4: 3}, id="head"),
        pytest.param([3], [1, 2, 4], {1: 1, 2: 2, 4: 3}, id="middle"),
        pytest.param([4], [1, 2, 3], {1: 1, 2: 2, 3: 3}, id="tail"),
        pytest.param([1, 2, 3, 4], [], {}, id="all"),
    ],
)
def test_remove_anywhere(
    removed: list[int], expected_order: list[int], positions: dict[int, int]
) -> None:
    q = filled(1, 2, 3, 4)
    for n in removed:
        assert q.remove(TicketId(n)) == job(n)
        assert q.remove(TicketId(n)) is None
        assert TicketId(n) not in q
    assert order(q) == expected_order
    assert len(q) == len(expected_order)
    assert {n: q.position(TicketId(n)) for n in expected_order} == positions
    assert q.oldest() == (job(expected_order[0]) if expected_order else None)


def test_many_removals_compact_the_backing_deque_and_heap() -> None:
    """Memory stays proportional to live jobs: dead entries are dropped in bulk."""
    q = filled(*range(1, 1001))
    for n in range(2, 1001):
        q.remove(TicketId(n))
    assert len(q) == 1
    assert len(q._order) <= 2 * len(q) + 64
    assert len(q._deadlines._heap) <= 2 * len(q) + 64
    assert order(q) == [1]


def test_compaction_keeps_order_and_positions() -> None:
    q = filled(*range(1, 301))
    for n in range(1, 301):
        if n % 10:  # keep every tenth
            q.remove(TicketId(n))
    assert order(q) == list(range(10, 301, 10))
    assert q.position(TicketId(300)) == 30
    assert q.oldest() == job(10)
    assert q.next_deadline() == 110.0


ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 30), st.integers(0, 50)),
        st.tuples(st.just("requeue"), st.integers(0, 30), st.integers(0, 50)),
        st.tuples(st.just("take_head"), st.just(0), st.just(0)),
        st.tuples(st.just("remove"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("expire"), st.just(0), st.integers(0, 50)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_behaves_like_a_list(script: list[tuple[str, int, int]]) -> None:
    """Against a plain list model of (ticket, deadline). A job taken from the head may
    come back (requeued as the same object, like a refused job)."""
    q, model = FifoQueue(), []
    jobs: dict[int, Job] = {}
    for op, n, t in script:
        if op in ("push", "requeue") and all(m[0] != n for m in model):
            jobs.setdefault(n, job(n))
            if op == "push":
                assert q.push(jobs[n], deadline=float(t)) == len(model) + 1
                model.append((n, t))
            else:
                assert q.requeue(jobs[n], deadline=float(t)) == 1
                model.insert(0, (n, t))
        elif op == "take_head":
            head = q.next_for(lambda _j: True)
            assert (head.ticket if head else None) == (model[0][0] if model else None)
            if head is not None:
                q.remove(head.ticket)
                model.pop(0)
        elif op == "remove":
            removed = q.remove(TicketId(n))
            assert (removed is not None) == any(m[0] == n for m in model)
            model = [m for m in model if m[0] != n]
        elif op == "expire":
            gone = sorted(j.ticket for j in q.expired(float(t)))
            assert gone == sorted(m[0] for m in model if m[1] <= t)
            model = [m for m in model if m[1] > t]
        assert order(q) == [m[0] for m in model]
        assert q.next_deadline() == (min(float(m[1]) for m in model) if model else None)
        if op in ("remove", "take_head", "expire"):  # compaction bounds the dead entries
            assert len(q._order) <= 2 * len(model) + 64
            assert len(q._deadlines._heap) <= 2 * len(model) + 64
    assert [q.position(TicketId(m[0])) for m in model] == list(range(1, len(model) + 1))
