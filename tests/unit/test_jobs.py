"""JobIndex and Caller: a caller's job-bound calls find its newest job still in the proxy,
and only callers entitled to it (the trust model in sdproxy.runtime.jobs)."""

from __future__ import annotations

import pytest

from sdproxy.core.queue import TicketId
from sdproxy.runtime.jobs import Caller, JobIndex, job_key

ADDRESS = "10.0.0.1"


def caller(header: str) -> Caller:
    return Caller(header=header, cookie=None, address=ADDRESS, new_cookie=None)


def who(
    *,
    header: str | None = None,
    cookie: str | None = None,
    new_cookie: str | None = None,
    job: str | None = None,
    by_address: bool = True,
) -> Caller:
    return Caller(
        header=header,
        cookie=cookie,
        address=ADDRESS,
        new_cookie=new_cookie,
        job=job,
        by_address=by_address,
    )


def test_a_caller_with_two_jobs_finds_the_older_when_the_newer_ends() -> None:
    index = JobIndex()
    a = caller("tab-user")
    index.add(a, TicketId(1), job_id="one")
    index.add(a, TicketId(2), job_id="two")
    assert index.find(a) == TicketId(2)
    index.remove(TicketId(2))
    assert index.find(a) == TicketId(1), "job 1 still runs: progress/interrupt must find it"
    index.remove(TicketId(1))
    assert index.find(a) is None
    assert len(index) == 0 and index.owned(a) == []


def test_callers_do_not_see_each_others_jobs() -> None:
    index = JobIndex()
    index.add(caller("a"), TicketId(1), job_id="one")
    assert index.find(caller("b")) is None


ANONYMOUS = who(new_cookie="given")


@pytest.mark.parametrize(
    ("submitter", "poller", "found"),
    [
        pytest.param(who(header="alice"), who(new_cookie="x"), False, id="header-vs-address"),
        pytest.param(who(cookie="c1"), who(new_cookie="x"), False, id="cookie-vs-address"),
        pytest.param(
            who(header="alice", cookie="c1"), who(cookie="c1"), False, id="header-not-its-cookie"
        ),
        pytest.param(who(header="alice"), who(header="alice"), True, id="same-header"),
        pytest.param(who(cookie="c1"), who(cookie="c1"), True, id="same-cookie"),
        pytest.param(ANONYMOUS, who(new_cookie="x"), True, id="anonymous-by-address"),
        pytest.param(ANONYMOUS, who(cookie="given"), True, id="anonymous-by-its-new-cookie"),
        pytest.param(ANONYMOUS, who(header="bob"), False, id="anonymous-vs-named"),
        pytest.param(
            who(new_cookie="given", by_address=False),
            who(new_cookie="x", by_address=False),
            False,
            id="address-identity-off",
        ),
        pytest.param(who(header="alice"), who(job="the-id"), True, id="job-id-whoever-asks"),
        pytest.param(who(header="alice"), who(header="alice", job="other"), False, id="wrong-id"),
    ],
)
def test_who_reaches_a_job(submitter: Caller, poller: Caller, found: bool) -> None:
    index = JobIndex()
    keys = index.add(submitter, TicketId(1), job_id="the-id")
    assert (index.find(poller) == TicketId(1)) is found
    assert job_key("the-id") in keys and "the-id" not in "".join(keys), "the id is hashed"


def test_a_caller_without_identity_owns_its_jobs_by_address_whatever_the_switch() -> None:
    """The quota counts a caller without identity by its address (it gets a new cookie on
    every answer), even where the address does not reach its jobs."""
    index = JobIndex()
    index.add(who(new_cookie="first", by_address=False), TicketId(1), job_id="one")
    index.add(who(new_cookie="second", by_address=False), TicketId(2), job_id="two")
    index.add(who(header="alice"), TicketId(3), job_id="three")
    assert index.owned(who(new_cookie="third")) == [TicketId(1), TicketId(2)]
    assert index.owned(who(header="alice")) == [TicketId(3)]
