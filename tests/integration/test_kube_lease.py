"""Leader election on a coordination.k8s.io/v1 Lease between proxy replicas."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sdproxy.runtime.kube import KubeApi, KubernetesError, KubernetesScaler, LeaderElector
from tests.fakekube import FakeKube, wait_until
from tests.integration.test_kube_scaler import scaler_settings

pytestmark = pytest.mark.timeout(30)

MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube() as fake:
        fake.add_deployment("sd-webui", replicas=1)
        yield fake


@pytest.fixture
def kubeconfig(kube: FakeKube, tmp_path: Path) -> str:
    return str(kube.write_kubeconfig(tmp_path / "kubeconfig"))


def replica(kubeconfig: str, identity: str, *, duration_s: float = 1.0) -> KubernetesScaler:
    settings = scaler_settings(identity=identity, lease_duration_s=duration_s)
    return KubernetesScaler(settings, "sd", kubeconfig=kubeconfig)


async def test_only_the_leader_patches_the_scale(kube: FakeKube, kubeconfig: str) -> None:
    a, b = replica(kubeconfig, "proxy-a"), replica(kubeconfig, "proxy-b")
    await a.start()
    await b.start()
    try:
        await wait_until(lambda: a.is_leader() or b.is_leader(), what="a leader")
        await asyncio.sleep(0.5)  # several renewal rounds: still exactly one leader
        assert a.is_leader() != b.is_leader()
        leader, follower = (a, b) if a.is_leader() else (b, a)
        lease = kube.lease("sdproxy-leader")
        assert lease is not None
        spec = lease["spec"]
        assert spec["holderIdentity"] == ("proxy-a" if leader is a else "proxy-b")
        assert spec["leaseDurationSeconds"] == 1
        assert MICRO_TIME.match(spec["renewTime"]) and MICRO_TIME.match(spec["acquireTime"])

        await follower.scale_to(4, idle_pods=[])
        assert kube.replicas("sd-webui") == 1
        assert not kube.calls(resource="deployments/scale")  # the follower did not even read
        await leader.scale_to(4, idle_pods=[])
        assert kube.replicas("sd-webui") == 4
    finally:
        await a.close()
        await b.close()


async def test_leader_renews_its_lease(kube: FakeKube, kubeconfig: str) -> None:
    a = replica(kubeconfig, "proxy-a")
    await a.start()
    try:
        await wait_until(a.is_leader, what="leadership")
        first = kube.lease("sdproxy-leader")
        assert first is not None
        await wait_until(
            lambda: (
                (kube.lease("sdproxy-leader") or {})["spec"]["renewTime"]
                != first["spec"]["renewTime"]
            ),
            what="a renewal",
        )
        await asyncio.sleep(1.5)  # longer than the lease: renewals keep it ours
        assert a.is_leader()
        lease = kube.lease("sdproxy-leader")
        assert lease is not None
        assert lease["spec"]["acquireTime"] == first["spec"]["acquireTime"]
        assert lease["spec"]["leaseTransitions"] == 0
    finally:
        await a.close()


async def test_crashed_leader_is_replaced_after_the_lease_expires(
    kube: FakeKube, kubeconfig: str
) -> None:
    a = replica(kubeconfig, "proxy-a")
    await a.start()
    await wait_until(a.is_leader, what="a leads")
    b = replica(kubeconfig, "proxy-b")
    await b.start()
    try:
        await asyncio.sleep(0.4)
        assert not b.is_leader()
        await a.close(release=False)  # crash: the Lease stays, naming proxy-a
        waited = await wait_until(b.is_leader, timeout_s=10, what="b takes over")
        # not before the 1 s lease ran out (minus at most one renewal period)
        assert waited > 0.5
        lease = kube.lease("sdproxy-leader")
        assert lease is not None
        assert lease["spec"]["holderIdentity"] == "proxy-b"
        assert lease["spec"]["leaseTransitions"] == 1
        await b.scale_to(3, idle_pods=[])
        assert kube.replicas("sd-webui") == 3
    finally:
        await b.close()


async def test_released_lease_is_taken_without_waiting_for_expiry(
    kube: FakeKube, kubeconfig: str
) -> None:
    a = replica(kubeconfig, "proxy-a", duration_s=4.0)
    await a.start()
    await wait_until(a.is_leader, what="a leads")
    b = replica(kubeconfig, "proxy-b", duration_s=4.0)
    await b.start()
    try:
        await asyncio.sleep(0.2)
        await a.close()  # graceful: holderIdentity cleared
        released = kube.lease("sdproxy-leader")
        assert released is not None and not released["spec"].get("holderIdentity")
        waited = await wait_until(b.is_leader, timeout_s=10, what="b takes over")
        assert waited < 3.0  # one retry period (4/3 s), not the 4 s lease
    finally:
        await b.close()


async def test_racing_candidates_one_wins_the_other_gets_409(
    kube: FakeKube, kubeconfig: str
) -> None:
    api_a, api_b = await KubeApi.connect(kubeconfig), await KubeApi.connect(kubeconfig)
    try:
        a = LeaderElector(api_a, namespace="sd", name="race", identity="a", duration_s=1.0)
        b = LeaderElector(api_b, namespace="sd", name="race", identity="b", duration_s=1.0)
        for _ in range(5):
            results = await asyncio.gather(a.try_acquire_or_renew(), b.try_acquire_or_renew())
            assert sorted(results) == [False, True]
            assert a.is_leader() != b.is_leader()
        # a stale resourceVersion is refused with 409 Conflict
        lease = kube.lease("race")
        assert lease is not None
        lease["metadata"]["resourceVersion"] = "1"
        with pytest.raises(KubernetesError) as caught:
            await api_a.replace_lease("sd", "race", lease)
        assert caught.value.status == 409
    finally:
        await api_a.close()
        await api_b.close()


async def test_leader_that_cannot_renew_stops_acting(kube: FakeKube, kubeconfig: str) -> None:
    a = replica(kubeconfig, "proxy-a")
    await a.start()
    try:
        await wait_until(a.is_leader, what="a leads")
        kube.outage("reset")
        # it gives up before anyone could take over (renew deadline = 2/3 of the lease)
        waited = await wait_until(lambda: not a.is_leader(), timeout_s=5, what="a steps down")
        assert waited < 1.0
        kube.recover()
        await wait_until(a.is_leader, what="a leads again")
    finally:
        await a.close()
