"""Unit: the shared FIFO queue (push, push_front, pop, O(1) remove, compaction)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdproxy.core.queue import FifoQueue, Job, TicketId


def job(n: int) -> Job:
    return Job(ticket=TicketId(n), enqueued_at=float(n))


def filled(*tickets: int) -> FifoQueue:
    q = FifoQueue()
    for n in tickets:
        q.push(job(n))
    return q


def order(q: FifoQueue) -> list[int]:
    return [j.ticket for j in q]


def test_empty_queue() -> None:
    q = FifoQueue()
    assert (len(q), q.peek(), q.pop(), order(q)) == (0, None, None, [])
    assert q.remove(TicketId(1)) is None
    assert q.position(TicketId(1)) is None
    assert TicketId(1) not in q


def test_first_in_first_out() -> None:
    q = filled(1, 2, 3)
    assert q.peek() == job(1)
    assert [q.pop(), q.pop(), q.pop(), q.pop()] == [job(1), job(2), job(3), None]
    assert len(q) == 0


def test_push_front_goes_ahead_of_everyone() -> None:
    q = filled(2, 3)
    q.push_front(job(1))
    assert order(q) == [1, 2, 3]
    assert q.position(TicketId(1)) == 1
    assert q.pop() == job(1)


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
    assert [q.pop() for _ in expected_order] == [job(n) for n in expected_order]
    assert q.pop() is None


def test_removed_head_is_skipped_by_peek_and_pop() -> None:
    q = filled(1, 2)
    q.remove(TicketId(1))
    assert q.peek() == job(2)
    assert q.pop() == job(2)
    assert q.peek() is None


def test_a_ticket_pushed_again_after_removal_is_live_once_at_the_back() -> None:
    q = filled(1, 2)
    q.remove(TicketId(1))
    again = Job(ticket=TicketId(1), enqueued_at=9.0)
    q.push(again)
    assert order(q) == [2, 1]
    assert len(q) == 2
    assert q.pop() == job(2)
    assert q.pop() is again


def test_many_removals_compact_the_backing_deque() -> None:
    """Memory stays proportional to live jobs: dead entries are dropped in bulk."""
    q = filled(*range(1, 1001))
    for n in range(2, 1001):  # keep only 1 at the head, so pop never skips the dead
        q.remove(TicketId(n))
    assert len(q) == 1
    assert len(q._order) <= 2 * len(q) + 64
    assert order(q) == [1]
    assert q.pop() == job(1)


def test_compaction_keeps_order_and_positions() -> None:
    q = filled(*range(1, 301))
    for n in range(1, 301):
        if n % 10:  # keep every tenth
            q.remove(TicketId(n))
    assert order(q) == list(range(10, 301, 10))
    assert len(q._order) <= 2 * len(q) + 64
    assert q.position(TicketId(300)) == 30
    assert q.peek() == job(10)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 30)),
        st.tuples(st.just("push_front"), st.integers(0, 30)),
        st.tuples(st.just("pop"), st.just(0)),
        st.tuples(st.just("remove"), st.integers(0, 30)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_behaves_like_a_list(script: list[tuple[str, int]]) -> None:
    """Against a plain list model. Tickets are unique while live and each push is a new
    Job object, as admission uses it (a popped job may be pushed back, a removed one never).
    """
    q, model = FifoQueue(), []
    for op, n in script:
        ticket = TicketId(n)
        if op in ("push", "push_front") and ticket not in model:
            if op == "push":
                q.push(job(n))
                model.append(ticket)
            else:
                q.push_front(job(n))
                model.insert(0, ticket)
        elif op == "pop":
            popped = q.pop()
            assert (popped.ticket if popped else None) == (model.pop(0) if model else None)
        elif op == "remove":
            removed = q.remove(ticket)
            assert (removed is not None) == (ticket in model)
            if ticket in model:
                model.remove(ticket)
        assert order(q) == model
        assert len(q) == len(model)
        if op == "remove":  # compaction bounds the dead entries left behind
            assert len(q._order) <= 2 * len(model) + 64
    assert [q.position(t) for t in model] == list(range(1, len(model) + 1))
