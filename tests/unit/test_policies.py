"""Unit: the small policy pieces on their own — placement, light choice, health, ETA,
scale-in order — and the reject-reason table in errors.py."""

from __future__ import annotations

import pytest

from sdproxy import errors
from sdproxy.core.effects import RejectReason
from sdproxy.core.eta import SpeedModel
from sdproxy.core.health import Health
from sdproxy.core.light import LeastLoadedLight
from sdproxy.core.placement import AffinityPlacement
from sdproxy.core.pods import PodId, PodState
from sdproxy.core.queue import Job, TicketId
from sdproxy.core.scalein import scale_in_order
from sdproxy.core.slots import Pod, Running


def pod(name: str, *, running: int = 0, limit: int = 2, **kw: object) -> Pod:
    p = Pod(pod_id=PodId(name), url=f"http://{name}", state=PodState.READY, limit=limit)
    for n in range(running):
        t = TicketId(100 + n)
        p.running[t] = Running(ticket=t, pod_id=p.pod_id, url=p.url, dispatched_at=0.0)
    for key, value in kw.items():
        setattr(p, key, value)
    return p


def job(checkpoint: str | None = None) -> Job:
    return Job(ticket=TicketId(1), enqueued_at=0.0, checkpoint=checkpoint)


@pytest.mark.parametrize(
    ("pods", "checkpoint", "expected"),
    [
        pytest.param([pod("a", running=1), pod("b")], None, "b", id="least-loaded"),
        pytest.param(
            [pod("a", running=1, checkpoint="x"), pod("b")], "x", "a", id="affinity-beats-load"
        ),
        pytest.param(
            [pod("a", last_used=1.0), pod("b", last_used=5.0)], None, "b", id="most-recent-packs"
        ),
        pytest.param([], None, None, id="no-free-pod"),
    ],
)
def test_affinity_placement(pods: list[Pod], checkpoint: str | None, expected: str | None) -> None:
    chosen = AffinityPlacement().choose(job(checkpoint), pods)
    assert (chosen.pod_id if chosen else None) == expected


def test_light_choice_least_loaded_usable_not_excluded() -> None:
    pods = [pod("a", running=1), pod("b", running=2), pod("c", state=PodState.STARTING)]
    light = LeastLoadedLight()
    usable = Health.usable
    first = light.pick(pods, usable=lambda p: usable(p, 0.0))
    assert first is not None and first.pod_id == "a"
    chosen = light.pick(pods, usable=lambda p: usable(p, 0.0), exclude=[PodId("a")])
    assert chosen is not None and chosen.pod_id == "b", "a full pod still answers light calls"
    assert light.pick(pods, usable=lambda p: False) is None


def test_health_ejection_doubles_and_capacity_coming() -> None:
    health = Health(eject_s=1.0)
    a = pod("a")
    health.eject(a, 10.0)
    assert (a.ejected_until, a.ejections) == (11.0, 1)
    assert not health.usable(a, 10.5) and health.usable(a, 11.0)
    assert health.capacity_coming([a], 10.5), "refused once: may be a blip"
    health.eject(a, 11.0)
    assert a.ejected_until == 13.0
    assert not health.capacity_coming([a], 12.0), "refused twice: down until it rests"
    assert health.capacity_coming([a], 13.0)
    assert health.next_change([a], 12.0) == 13.0
    assert health.next_change([a], 13.0) is None
    health.succeeded(a)
    assert a.ejections == 0


def test_cordoned_pods_are_neither_usable_nor_coming() -> None:
    health = Health(eject_s=1.0)
    a = pod("a", cordoned_until=5.0)
    assert not health.usable(a, 1.0) and not health.capacity_coming([a], 1.0)
    assert health.next_change([a], 1.0) == 5.0
    assert health.usable(a, 5.0)


def test_eta_moving_average_and_formula() -> None:
    eta = SpeedModel(seconds_per_unit=1.0)
    assert eta.eta_s(ahead=[1.0, 2.0], running=[2.0], slots=2, own=1.0) == ((3 + 1) / 2 + 1) * 1
    eta.observe(cost=2.0, seconds=12.0)  # 6 s per unit: 1 + 0.2 * 5
    assert eta.seconds_per_unit == pytest.approx(2.0)
    eta.observe(cost=0.0, seconds=99.0)  # no work: no sample
    assert eta.seconds_per_unit == pytest.approx(2.0)
    assert eta.eta_s(ahead=[], running=[], slots=0, own=1.0) == pytest.approx(2.0)


def test_no_job_counts_for_more_than_the_longest_a_job_may_run() -> None:
    eta = SpeedModel(seconds_per_unit=0.1, max_job_s=1800.0)
    assert eta.job_s(1e13) == 1800.0 and eta.job_s(10.0) == pytest.approx(1.0)
    assert eta.eta_s(ahead=[1e13], running=[1e13], slots=2, own=10.0) == pytest.approx(
        (1800 + 1800 / 2) / 2 + 1.0
    )


def test_scale_in_order_not_ready_first_then_longest_idle_never_busy() -> None:
    pods = [
        pod("busy", running=1, idle_since=0.0),
        pod("recent", idle_since=9.0),
        pod("old", idle_since=1.0),
        pod("starting", state=PodState.STARTING),
        pod("cordoned", idle_since=0.0, cordoned_until=99.0),
    ]
    assert scale_in_order(pods, 10.0) == ["starting", "old", "recent"]


def test_every_reject_reason_has_one_client_error_or_is_silent() -> None:
    codes = {r.value for r in RejectReason}
    assert errors.answered_rejects() | errors.SILENT_REJECTS == codes
    assert not errors.answered_rejects() & errors.SILENT_REJECTS
    for code in errors.answered_rejects():
        err = errors.for_reject(code)
        assert err.code == code and 400 <= err.status < 600
