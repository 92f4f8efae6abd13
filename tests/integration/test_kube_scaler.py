"""KubernetesScaler against the fake API server: /scale, pod-deletion-cost, errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from sdproxy.core.autoscale import AutoscaleConfig
from sdproxy.core.pods import Endpoint, PodId
from sdproxy.runtime.kube import DELETION_COST, KubernetesDiscovery, KubernetesScaler
from sdproxy.settings import DiscoverySettings, ScalerSettings
from tests.fakekube import FakeKube, wait_until

pytestmark = pytest.mark.timeout(30)


def scaler_settings(*, identity: str = "proxy-0", lease_duration_s: float = 1.0) -> ScalerSettings:
    return ScalerSettings(
        scaler="kubernetes",
        deployment="sd-webui",
        autoscale=AutoscaleConfig(idle_to_zero_s=60.0, scale_down_delay_s=60.0),
        scale_interval_s=1.0,
        lease_name="sdproxy-leader",
        lease_duration_s=lease_duration_s,
        identity=identity,
        local_base_port=7860,
        local_startup_s=1.0,
        local_step_ms=10.0,
    )


def pods(*names: str) -> list[PodId]:
    return [PodId(n) for n in names]


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube() as fake:
        fake.add_deployment("sd-webui", replicas=0)
        yield fake


@pytest.fixture
async def scaler(kube: FakeKube, tmp_path: Path) -> AsyncIterator[KubernetesScaler]:
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    scaler = KubernetesScaler(scaler_settings(), "sd", kubeconfig=str(kubeconfig))
    await scaler.start()
    try:
        await wait_until(scaler.is_leader, what="leadership")
        yield scaler
    finally:
        await scaler.close()


async def test_scale_up_patches_the_scale_subresource(
    kube: FakeKube, scaler: KubernetesScaler
) -> None:
    changes: list[tuple[str, int, int]] = []
    kube.on_scale = lambda name, old, new: changes.append((name, old, new))
    await scaler.scale_to(2, idle_pods=[])
    assert kube.replicas("sd-webui") == 2
    assert changes == [("sd-webui", 0, 2)]
    patch = kube.calls(verb="patch", resource="deployments/scale")
    assert [c.content_type for c in patch] == ["application/merge-patch+json"]
    assert kube.calls(verb="get", resource="deployments/scale")
    assert not kube.calls(resource="pods")  # scaling up touches no pod
    await scaler.scale_to(2, idle_pods=[])  # already there: read, no patch
    assert len(kube.calls(verb="patch", resource="deployments/scale")) == 1


async def test_scale_in_marks_idle_pods_before_patching_scale(
    kube: FakeKube, scaler: KubernetesScaler
) -> None:
    for i, name in enumerate(["busy-0", "idle-1", "idle-2"]):
        kube.add_endpoint(name, f"10.0.0.{i + 1}")
    kube.add_deployment("sd-webui", replicas=3)
    await scaler.scale_to(1, idle_pods=pods("idle-2", "idle-1"))  # most idle first
    assert kube.replicas("sd-webui") == 1
    cost = {name: int(kube.annotations(name)[DELETION_COST]) for name in ("idle-1", "idle-2")}
    assert cost["idle-2"] < cost["idle-1"] < 0  # the most idle pod goes first
    assert DELETION_COST not in kube.annotations("busy-0")
    # the ReplicaSet would remove exactly the idle pods
    assert set(kube.scale_in_victims(2)) == {"idle-1", "idle-2"}
    # and the costs were in place before the replica count went down
    order = [(c.verb, c.resource, c.subresource) for c in kube.requests if c.verb == "patch"]
    assert order == [
        ("patch", "pods", ""),
        ("patch", "pods", ""),
        ("patch", "deployments", "scale"),
    ]


async def test_scale_in_never_exceeds_the_idle_pods(
    kube: FakeKube, scaler: KubernetesScaler
) -> None:
    for i, name in enumerate(["busy-0", "busy-1", "idle-2"]):
        kube.add_endpoint(name, f"10.0.0.{i + 1}")
    kube.add_deployment("sd-webui", replicas=3)
    await scaler.scale_to(0, idle_pods=pods("idle-2"))
    assert kube.replicas("sd-webui") == 2  # only the idle pod may go
    assert kube.scale_in_victims(1) == ["idle-2"]
    await scaler.scale_to(0, idle_pods=[])
    assert kube.replicas("sd-webui") == 2


async def test_stale_marks_are_cleared_and_gone_pods_skipped(
    kube: FakeKube, scaler: KubernetesScaler
) -> None:
    for i, name in enumerate(["a", "b", "c"]):
        kube.add_endpoint(name, f"10.0.0.{i + 1}")
    kube.add_deployment("sd-webui", replicas=3)
    await scaler.scale_to(2, idle_pods=pods("a"))
    assert DELETION_COST in kube.annotations("a")
    # before the ReplicaSet acted, "a" got busy: the next tick removes its mark
    kube.add_deployment("sd-webui", replicas=3)
    await scaler.scale_to(3, idle_pods=[])
    assert DELETION_COST not in kube.annotations("a")
    # a victim that no longer exists is not counted as removable
    kube.remove_endpoint("b")
    await scaler.scale_to(1, idle_pods=pods("b", "c"))
    assert kube.replicas("sd-webui") == 2
    assert kube.scale_in_victims(1) == ["c"]


async def test_api_errors_are_logged_not_raised(
    kube: FakeKube, scaler: KubernetesScaler, caplog: pytest.LogCaptureFixture
) -> None:
    kube.outage("503")
    await scaler.scale_to(3, idle_pods=[])  # no exception
    kube.recover()
    assert "scaling Deployment sd-webui failed" in caplog.text
    await wait_until(scaler.is_leader, what="leadership after the outage")
    await scaler.scale_to(3, idle_pods=[])
    assert kube.replicas("sd-webui") == 3


async def test_missing_deployment_is_logged(
    kube: FakeKube, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    settings = scaler_settings()
    scaler = KubernetesScaler(
        ScalerSettings(**{**settings.__dict__, "deployment": "nope"}),
        "sd",
        kubeconfig=str(kubeconfig),
    )
    try:
        await scaler.scale_to(1, idle_pods=[])  # starts lazily; not leader yet or 404
        await wait_until(scaler.is_leader, what="leadership")
        await scaler.scale_to(1, idle_pods=[])
    finally:
        await scaler.close()
    assert "404" in caplog.text


async def test_scale_from_zero_hook_starts_a_pod_discovery_sees(
    kube: FakeKube, scaler: KubernetesScaler, tmp_path: Path
) -> None:
    """The on_scale hook plays the ReplicaSet: new replicas become endpoints."""

    def start_pods(name: str, old: int, new: int) -> None:
        for i in range(old, new):
            kube.add_endpoint(f"sd-webui-{i}", f"127.0.0.{i + 1}", port=7860)

    kube.on_scale = start_pods
    seen: list[list[Endpoint]] = []
    discovery = KubernetesDiscovery(
        DiscoverySettings(
            discovery="kubernetes",
            backend=(),
            namespace="sd",
            service="sd-webui",
            port_name="http",
            kubeconfig=str(kube.write_kubeconfig(tmp_path / "kc2")),
            warmup_timeout_s=1.0,
        ),
        backoff_initial_s=0.05,
    )

    def sink(endpoints: Sequence[Endpoint]) -> None:
        seen.append(list(endpoints))

    task = asyncio.create_task(discovery.run(sink))
    try:
        await wait_until(lambda: bool(seen), what="first (empty) snapshot")
        assert seen[-1] == []
        await scaler.scale_to(2, idle_pods=[])
        await wait_until(lambda: len(seen[-1]) == 2, what="two pods discovered")
        assert [e.url for e in seen[-1]] == ["http://127.0.0.1:7860", "http://127.0.0.2:7860"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_new_leader_clears_the_marks_an_old_leader_left(
    kube: FakeKube, scaler: KubernetesScaler
) -> None:
    """The old leader marked a victim and died before scaling in: that low cost would make
    the ReplicaSet delete the pod first at the next scale-in, even while it is busy."""
    for i, name in enumerate(["marked-0", "plain-1"]):
        kube.add_endpoint(name, f"10.0.0.{i + 1}")
    kube.add_deployment("sd-webui", replicas=2)
    kube.pods[("sd", "marked-0")]["metadata"]["annotations"] = {DELETION_COST: "-100"}
    await scaler.scale_to(2, idle_pods=[], known_pods=pods("marked-0", "plain-1"))
    assert DELETION_COST not in kube.annotations("marked-0")
    assert kube.replicas("sd-webui") == 2
    patched = {c.name for c in kube.calls(verb="patch", resource="pods")}
    assert patched == {"marked-0", "plain-1"}
    # only at the takeover: the next ticks touch no pod that is not a victim
    await scaler.scale_to(2, idle_pods=[], known_pods=pods("marked-0", "plain-1"))
    assert len(kube.calls(verb="patch", resource="pods")) == 2
