"""JobIndex: a caller's job-bound calls find its newest job still in the proxy."""

from __future__ import annotations

from sdproxy.core.queue import TicketId
from sdproxy.runtime.jobs import Caller, JobIndex


def caller(header: str) -> Caller:
    return Caller(header=header, cookie=None, address="10.0.0.1", new_cookie=None)


def test_a_caller_with_two_jobs_finds_the_older_when_the_newer_ends() -> None:
    index = JobIndex()
    a = caller("tab-user")
    index.add(a, TicketId(1))
    index.add(a, TicketId(2))
    assert index.find(a) == TicketId(2)
    index.remove(TicketId(2))
    assert index.find(a) == TicketId(1), "job 1 still runs: progress/interrupt must find it"
    index.remove(TicketId(1))
    assert index.find(a) is None
    assert len(index) == 0


def test_callers_do_not_see_each_others_jobs() -> None:
    index = JobIndex()
    index.add(caller("a"), TicketId(1))
    assert index.find(caller("b")) is None
