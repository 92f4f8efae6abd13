"""Core: browser UI sessions (sdproxy.core.uisessions) and the admission hold for them."""

from __future__ import annotations

import dataclasses

import pytest

from sdproxy.core.admission import Admission, AdmissionConfig, Job, TicketId
from sdproxy.core.pods import Endpoint, PodId
from sdproxy.core.uisessions import Candidate, EndReason, UiConfig, UiSessions

A, B = PodId("a"), PodId("b")


def sessions(**overrides: float) -> UiSessions:
    return UiSessions(dataclasses.replace(UiConfig(ui=True, ui_idle_s=100.0), **overrides))


def pods(*ids: PodId, load: int = 0) -> list[Candidate]:
    return [Candidate(pod_id=p, api_load=load) for p in ids]


def test_one_session_per_pod_then_the_lobby_in_arrival_order() -> None:
    ui = sessions()
    for sid in ("s1", "s2", "s3", "s4"):
        ui.join(sid, now=0.0)
    admitted = ui.admit(pods(A, B), now=1.0)
    assert [(a.session.sid, a.session.pod_id, a.waited_s) for a in admitted] == [
        ("s1", A, 1.0),
        ("s2", B, 1.0),
    ]
    assert ui.held_pods() == {A, B}
    assert (ui.position("s3"), ui.position("s4")) == (1, 2)
    ui.leave("s2", now=4.0)
    (next_in,) = ui.admit(pods(A, B), now=5.0)
    assert (next_in.session.sid, next_in.session.pod_id, next_in.waited_s) == ("s3", B, 5.0)
    assert ui.position("s4") == 1


def test_sessions_per_pod_fill_the_emptiest_pod_and_prefer_pods_without_api_work() -> None:
    ui = sessions(ui_sessions_per_pod=2)
    for sid in ("s1", "s2", "s3", "s4", "s5"):
        ui.join(sid, now=0.0)
    busy_a = [Candidate(pod_id=A, api_load=1), Candidate(pod_id=B, api_load=0)]
    admitted = ui.admit(busy_a, now=0.0)
    assert [a.session.pod_id for a in admitted] == [B, A, B, A]
    assert ui.per_pod() == {A: 2, B: 2}
    assert ui.position("s5") == 1


@pytest.mark.parametrize(
    ("active", "last_request_at", "now", "ends"),
    [
        pytest.param(0, 0.0, 99.9, False, id="idle-less-than-ui-idle-s"),
        pytest.param(0, 0.0, 100.0, True, id="idle-ui-idle-s"),
        pytest.param(1, 0.0, 500.0, False, id="open-websocket-never-idles"),
        pytest.param(0, 50.0, 149.0, False, id="a-request-restarts-the-clock"),
    ],
)
def test_idle_release(active: int, last_request_at: float, now: float, ends: bool) -> None:
    ui = sessions()
    ui.join("s1", now=0.0)
    ui.admit(pods(A), now=0.0)
    for _ in range(active):
        ui.opened("s1", now=0.0)
    ui.touch("s1", now=last_request_at)
    ended = ui.expire(now)
    assert [(e.sid, e.reason) for e in ended] == ([("s1", EndReason.IDLE)] if ends else [])
    assert (ui.find("s1") is None) is ends
    assert (ui.ended_reason("s1") is EndReason.IDLE) is ends


def test_next_wake_is_the_first_idle_end_or_stale_waiter() -> None:
    ui = sessions()
    assert ui.next_wake(0.0) is None
    ui.join("s1", now=0.0)
    ui.admit(pods(A), now=0.0)
    assert ui.next_wake(0.0) == ui.config.lobby_stale_s, "until its browser takes it"
    ui.touch("s1", now=0.0)
    assert ui.next_wake(0.0) == 100.0
    ui.join("s2", now=10.0)
    assert ui.next_wake(10.0) == 10.0 + ui.config.lobby_stale_s
    ui.opened("s1", now=10.0)
    ui.touch("s2", now=30.0)
    assert ui.next_wake(30.0) == 30.0 + ui.config.lobby_stale_s


def test_a_waiter_that_stops_polling_leaves_the_lobby() -> None:
    ui = sessions()
    ui.join("s1", now=0.0)
    ui.join("s2", now=0.0)
    ui.touch("s2", now=10.0)
    ui.expire(now=ui.config.lobby_stale_s)
    assert list(ui.lobby) == ["s2"]


@pytest.mark.parametrize(
    ("came", "ends"),
    [
        pytest.param(None, True, id="the-tab-was-closed-while-it-waited"),
        pytest.param("touch", False, id="the-page-moved-in"),
        pytest.param("opened", False, id="its-websocket-opened"),
        pytest.param("peer", False, id="it-moved-in-at-another-replica"),
    ],
)
def test_a_session_no_browser_comes_to_take_ends_after_lobby_stale_s(
    came: str | None, ends: bool
) -> None:
    """A waiter admitted after it stopped polling would hold the pod (its GPU idle, no
    API job there) for ui_idle_s; it gives it back after lobby_stale_s."""
    ui = sessions()
    ui.join("s1", now=0.0)
    ui.join("s2", now=0.0)
    ui.touch("s1", now=10.0)  # its last poll, then the tab closes
    (admitted,) = ui.admit(pods(A), now=12.0)
    assert admitted.session.sid == "s1"
    if came == "touch":
        ui.touch("s1", now=12.5)
    elif came == "opened":
        ui.opened("s1", now=12.5)
        ui.closed("s1", now=13.0)
    elif came == "peer":
        ui.observe_peers(seen={"s1": 12.5}, ended={}, now=13.0)
    stale = 12.0 + ui.config.lobby_stale_s
    ui.touch("s2", now=stale - 1.0)  # the next waiter still polls
    assert ui.expire(now=stale - 0.1) == []
    ended = ui.expire(now=stale)
    assert [(e.sid, e.reason) for e in ended] == ([("s1", EndReason.IDLE)] if ends else [])
    admitted_next = ui.admit(pods(A), now=stale)
    assert [a.session.sid for a in admitted_next] == (["s2"] if ends else [])


def test_an_unclaimed_session_never_outlives_ui_idle_s() -> None:
    ui = UiSessions(UiConfig(ui=True, ui_idle_s=2.0))
    ui.join("s1", now=0.0)
    ui.admit(pods(A), now=0.0)
    assert ui.next_wake(0.0) == 2.0
    assert [e.sid for e in ui.expire(now=2.0)] == ["s1"]


def test_a_pod_that_goes_away_ends_its_sessions_and_frees_the_lobby() -> None:
    ui = sessions()
    ui.join("s1", now=0.0)
    ui.join("s2", now=0.0)
    ui.admit(pods(A), now=0.0)
    ended = ui.pods_gone(alive=[B], now=0.0)
    assert [(e.sid, e.pod_id, e.reason) for e in ended] == [("s1", A, EndReason.POD_GONE)]
    (admitted,) = ui.admit(pods(B), now=1.0)
    assert admitted.session.sid == "s2"


def test_an_ended_browser_that_rejoins_stands_in_line_again() -> None:
    ui = sessions()
    ui.join("s1", now=0.0)
    ui.admit(pods(A), now=0.0)
    assert ui.leave("s1", now=1.0) is not None
    assert ui.ended_reason("s1") is EndReason.LEFT
    ui.join("s1", now=1.0)
    assert ui.ended_reason("s1") is None
    assert ui.position("s1") == 1


def test_adopt_takes_another_replicas_session_only_onto_a_pod_with_room() -> None:
    ui = sessions()
    assert ui.adopt("s1", A, pods(A, B), now=0.0)
    found = ui.find("s1")
    assert found is not None and found.pod_id == A
    assert not ui.adopt("s2", A, pods(A, B), now=0.0), "A is full"
    assert not ui.adopt("s3", PodId("gone"), pods(A, B), now=0.0), "not a candidate"
    ui.leave("s1", now=1.0)
    assert not ui.adopt("s1", A, pods(A, B), now=1.0), "ended here: not taken back"
    ui.join("s4", now=1.0)
    assert not ui.adopt("s5", B, pods(A, B), now=1.0), "someone waits ahead of it"


def test_eta_counts_down_the_sessions_idle_deadlines() -> None:
    ui = sessions()
    ui.join("s1", now=0.0)
    ui.admit(pods(A), now=0.0)
    ui.join("s2", now=40.0)
    assert ui.eta_s("s2", now=40.0) == 60.0
    ui.opened("s1", now=40.0)
    assert ui.eta_s("s2", now=40.0) == 100.0


# ---- the admission hold ------------------------------------------------------------------


def admission_with(*pod_ids: PodId) -> Admission:
    adm = Admission(AdmissionConfig(max_inflight=1))
    adm.reconcile([Endpoint(pod_id=p, url=f"http://{p}", ready=True) for p in pod_ids], 0.0)
    return adm


def job(n: int, at: float = 0.0) -> Job:
    return Job(ticket=TicketId(n), enqueued_at=at)


def test_a_pod_held_for_the_ui_takes_no_api_job() -> None:
    adm = admission_with(A, B)
    adm.hold_for_ui([A], now=0.0)
    first = adm.submit(job(1), now=0.0)
    assert [d.pod_id for d in first.dispatches] == [B]
    second = adm.submit(job(2), now=0.0)
    assert second.dispatches == () and adm.is_queued(TicketId(2))
    adm.check(0.0)
    released = adm.hold_for_ui([], now=1.0)
    assert [(d.ticket, d.pod_id) for d in released.dispatches] == [(TicketId(2), A)]
    adm.check(1.0)


def test_a_held_pod_is_never_cordoned_nor_a_scale_in_candidate() -> None:
    adm = admission_with(A, B)
    adm.hold_for_ui([A], now=0.0)
    assert adm.idle_pods(now=5.0) == [B]
    assert list(adm.cordon([A, B], now=5.0, for_s=30.0).cordoned) == [B]


def test_queue_holds_rather_than_no_backends_while_every_pod_is_held() -> None:
    adm = admission_with(A)
    adm.hold_for_ui([A], now=0.0)
    effects = adm.submit(job(1), now=0.0)
    assert effects.rejects == () and adm.is_queued(TicketId(1))


def test_what_the_other_replicas_saw_and_ended_counts_here() -> None:
    ui = sessions()
    for sid in ("s1", "s2"):
        ui.join(sid, now=0.0)
    ui.admit(pods(A, B), now=0.0)
    ended = ui.observe_peers(seen={"s1": 90.0}, ended={"s2": EndReason.LEFT}, now=95.0)
    assert [(e.sid, e.reason) for e in ended] == [("s2", EndReason.LEFT)]
    assert ui.expire(now=150.0) == [], "s1 was in use at another replica at 90"
    assert [e.sid for e in ui.expire(now=190.0)] == ["s1"]
    assert ui.ended_since(150.0) == {"s1": EndReason.IDLE}


def test_sessions_held_elsewhere_count_against_a_pods_capacity() -> None:
    ui = sessions()
    ui.join("s1", now=0.0)
    assert ui.admit([Candidate(pod_id=A, elsewhere=1)], now=0.0) == []
    assert ui.adopt("s9", A, [Candidate(pod_id=A, elsewhere=1)], now=0.0, held_elsewhere=True)
    assert not ui.adopt("s8", A, pods(A), now=0.0, peers_known=True), "no replica holds it"
