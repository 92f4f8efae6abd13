"""KubernetesDiscovery against the fake API server through the real kubernetes_asyncio client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from sdproxy.core.pods import Endpoint, PodId
from sdproxy.runtime.kube import KubernetesDiscovery
from sdproxy.runtime.kube.slices import endpoints_from_slices
from sdproxy.settings import DiscoverySettings
from tests.fakekube import FakeKube, wait_until

pytestmark = pytest.mark.timeout(30)


def discovery_settings(kubeconfig: Path, *, port_name: str = "") -> DiscoverySettings:
    return DiscoverySettings(
        discovery="kubernetes",
        backend=(),
        namespace="sd",
        service="sd-webui",
        port_name=port_name,
        kubeconfig=str(kubeconfig),
        warmup_timeout_s=10.0,
    )


class Snapshots:
    """A sink that records every snapshot it is pushed."""

    def __init__(self) -> None:
        self.history: list[list[Endpoint]] = []

    def __call__(self, endpoints: Sequence[Endpoint]) -> None:
        self.history.append(list(endpoints))

    @property
    def last(self) -> dict[str, Endpoint]:
        return {e.pod_id: e for e in self.history[-1]} if self.history else {}


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube() as fake:
        yield fake


@contextlib.asynccontextmanager
async def running(
    discovery: KubernetesDiscovery, sink: Snapshots
) -> AsyncIterator[KubernetesDiscovery]:
    task = asyncio.create_task(discovery.run(sink), name="test-discovery")
    try:
        yield discovery
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def make(kube: FakeKube, tmp_path: Path, **kwargs: float) -> KubernetesDiscovery:
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    return KubernetesDiscovery(
        discovery_settings(kubeconfig),
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        watch_timeout_s=int(kwargs.get("watch_timeout_s", 30)),
    )


async def test_initial_list_then_add_not_ready_terminating_and_removal(
    kube: FakeKube, tmp_path: Path
) -> None:
    kube.add_endpoint("pod-a", "10.0.0.1")
    kube.add_endpoint("pod-b", "10.0.0.2", ready=False)
    sink = Snapshots()
    async with running(make(kube, tmp_path), sink) as discovery:
        await wait_until(lambda: len(sink.last) == 2, what="initial list")
        assert sink.last[PodId("pod-a")] == Endpoint(
            pod_id=PodId("pod-a"), url="http://10.0.0.1:7860", ready=True, terminating=False
        )
        assert not sink.last[PodId("pod-b")].ready
        assert discovery.health().connected

        kube.add_endpoint("pod-c", "10.0.0.3")
        await wait_until(lambda: "pod-c" in sink.last, what="ADDED pod-c")

        kube.set_endpoint("pod-b", ready=True, serving=True)
        await wait_until(lambda: sink.last["pod-b"].ready, what="pod-b ready")

        kube.set_endpoint("pod-a", ready=False, terminating=True)
        await wait_until(lambda: sink.last["pod-a"].terminating, what="pod-a terminating")
        assert not sink.last["pod-a"].ready

        kube.remove_endpoint("pod-a")
        await wait_until(lambda: "pod-a" not in sink.last, what="pod-a removed")
        kube.delete_slice("sd-webui-abcde")
        await wait_until(lambda: sink.last == {}, what="slice DELETED")
    assert kube.calls(verb="list", resource="endpointslices")
    assert kube.calls(verb="watch", resource="endpointslices")
    # one snapshot per change, no duplicates
    assert all(a != b for a, b in zip(sink.history, sink.history[1:], strict=False))


async def test_slices_are_merged_and_only_the_service_is_watched(
    kube: FakeKube, tmp_path: Path
) -> None:
    kube.add_endpoint("pod-a", "10.0.0.1", slice_name="sd-webui-1")
    kube.add_endpoint("pod-b", "10.0.0.2", slice_name="sd-webui-2")
    kube.add_endpoint("other", "10.0.0.9", service="something-else")
    sink = Snapshots()
    async with running(make(kube, tmp_path), sink):
        await wait_until(lambda: set(sink.last) == {"pod-a", "pod-b"}, what="two slices")
        # the same pod in a second slice (EndpointSlice churn) shows up once, ready wins
        kube.add_endpoint("pod-a", "10.0.0.1", slice_name="sd-webui-2", ready=False)
        kube.add_endpoint("other-2", "10.0.0.8", service="something-else")
        kube.add_endpoint("pod-c", "10.0.0.3", slice_name="sd-webui-2")
        await wait_until(lambda: "pod-c" in sink.last, what="pod-c")
        assert set(sink.last) == {"pod-a", "pod-b", "pod-c"}
        assert sink.last["pod-a"].ready


@pytest.mark.parametrize(
    ("slice_ports", "port_name", "endpoint", "expected"),
    [
        pytest.param(
            [{"name": "metrics", "port": 9000}, {"name": "http", "port": 7860}],
            "http",
            {"addresses": ["10.0.0.1"], "targetRef": {"name": "p"}},
            Endpoint(pod_id=PodId("p"), url="http://10.0.0.1:7860"),
            id="named-port",
        ),
        pytest.param(
            [{"name": "a", "port": 8080}, {"name": "b", "port": 7860}],
            "",
            {"addresses": ["10.0.0.1"], "conditions": {}, "targetRef": {"name": "p"}},
            Endpoint(pod_id=PodId("p"), url="http://10.0.0.1:8080"),
            id="first-port-nil-conditions-ready",
        ),
        pytest.param(
            [{"port": 7860}],
            "",
            {"addresses": ["fd00::7"], "conditions": {"ready": True}},
            Endpoint(pod_id=PodId("fd00::7"), url="http://[fd00::7]:7860"),
            id="no-targetRef-ipv6",
        ),
        pytest.param(
            [{"port": 7860}],
            "",
            {"addresses": ["10.0.0.1"], "conditions": {"serving": True, "terminating": True}},
            Endpoint(
                pod_id=PodId("10.0.0.1"), url="http://10.0.0.1:7860", ready=False, terminating=True
            ),
            id="terminating-but-serving-drains",
        ),
    ],
)
def test_endpoint_mapping(
    slice_ports: list[dict[str, object]],
    port_name: str,
    endpoint: dict[str, object],
    expected: Endpoint,
) -> None:
    obj = {"metadata": {"name": "s"}, "ports": slice_ports, "endpoints": [endpoint]}
    assert endpoints_from_slices([obj], port_name=port_name) == [expected]


@pytest.mark.parametrize(
    ("labels", "weight"),
    [
        pytest.param({"sdproxy.io/weight": "2"}, 2.0, id="two"),
        pytest.param({"sdproxy.io/weight": "0.5"}, 0.5, id="half"),
        pytest.param({"sdproxy.io/weight": "fast"}, 1.0, id="not-a-number-ignored"),
        pytest.param({"sdproxy.io/weight": "0"}, 1.0, id="zero-ignored"),
        pytest.param({}, 1.0, id="none"),
    ],
)
def test_a_slice_label_gives_its_pods_a_weight(labels: dict[str, str], weight: float) -> None:
    obj = {
        "metadata": {"name": "s", "labels": labels},
        "ports": [{"port": 7860}],
        "endpoints": [{"addresses": ["10.0.0.1"], "targetRef": {"name": "p"}}],
    }
    (endpoint,) = endpoints_from_slices([obj], port_name="")
    assert endpoint.weight == weight


def test_slice_without_the_named_port_is_skipped() -> None:
    obj = {
        "metadata": {"name": "s"},
        "ports": [{"name": "x", "port": 1}],
        "endpoints": [{"addresses": ["10.0.0.1"]}],
    }
    assert endpoints_from_slices([obj], port_name="http") == []


async def test_bookmark_advances_resource_version_so_no_relist(
    kube: FakeKube, tmp_path: Path
) -> None:
    kube.add_endpoint("pod-a", "10.0.0.1")
    sink = Snapshots()
    async with running(make(kube, tmp_path, watch_timeout_s=1), sink):
        await wait_until(lambda: kube.watch_count() == 1, what="watch open")
        # changes the watch does not see (another service) move the resourceVersion on
        kube.add_endpoint("other", "10.0.0.9", service="something-else")
        kube.add_endpoint("other-2", "10.0.0.8", service="something-else")
        kube.bookmark()  # tells the client the current resourceVersion
        await asyncio.sleep(0.2)  # let the event reach the client before the history goes
        kube.compact()
        # the server ends the watch after 1 s; the client resumes from the bookmark
        watches = len(kube.calls(verb="watch"))
        await wait_until(lambda: len(kube.calls(verb="watch")) > watches + 1, what="re-watch")
    assert len(kube.calls(verb="list")) == 1  # no 410, no re-list
    assert set(sink.last) == {"pod-a"}


async def test_410_gone_relists_and_catches_up(kube: FakeKube, tmp_path: Path) -> None:
    kube.add_endpoint("pod-a", "10.0.0.1")
    sink = Snapshots()
    async with running(make(kube, tmp_path, watch_timeout_s=1), sink) as discovery:
        await wait_until(lambda: kube.watch_count() == 1, what="watch open")
        kube.add_endpoint("other", "10.0.0.9", service="something-else")
        kube.compact()  # the client's resourceVersion is now too old
        await wait_until(lambda: len(kube.calls(verb="list")) == 2, what="re-list after 410")
        kube.add_endpoint("pod-b", "10.0.0.2")
        await wait_until(lambda: set(sink.last) == {"pod-a", "pod-b"}, what="watch resumed")
        assert discovery.health().connected
    assert all(snapshot for snapshot in sink.history)


@pytest.mark.parametrize("mode", ["reset", "503"])
async def test_outage_keeps_last_pods_reports_disconnected_and_recovers(
    kube: FakeKube, tmp_path: Path, mode: str
) -> None:
    kube.add_endpoint("pod-a", "10.0.0.1")
    kube.add_endpoint("pod-b", "10.0.0.2")
    sink = Snapshots()
    async with running(make(kube, tmp_path), sink) as discovery:
        await wait_until(lambda: len(sink.last) == 2, what="initial list")
        pushed = len(sink.history)
        kube.outage(mode)
        await wait_until(lambda: not discovery.health().connected, what="disconnected")
        failed = len(kube.requests)
        await wait_until(lambda: len(kube.requests) >= failed + 2, what="retries with backoff")
        health = discovery.health()
        assert health.last_error
        assert len(sink.history) == pushed  # nothing pushed: the last pods stay routable
        kube.add_endpoint("pod-c", "10.0.0.3")  # changes while unreachable
        kube.remove_endpoint("pod-a")
        kube.recover()
        await wait_until(lambda: discovery.health().connected, what="reconnected")
        await wait_until(lambda: set(sink.last) == {"pod-b", "pod-c"}, what="caught up")
        assert discovery.health().last_error is None
    assert all(snapshot for snapshot in sink.history)


async def test_no_credentials_and_forbidden_are_reported_not_raised(
    kube: FakeKube, tmp_path: Path
) -> None:
    missing = KubernetesDiscovery(
        discovery_settings(tmp_path / "no-such-kubeconfig"), backoff_initial_s=0.05
    )
    sink = Snapshots()
    async with running(missing, sink):
        await wait_until(lambda: missing.health().last_error is not None, what="config error")
        assert "credentials" in str(missing.health().last_error)
    assert sink.history == []
    forbidden = FakeKube(rules=[])
    async with forbidden:
        sink = Snapshots()
        async with running(make(forbidden, tmp_path), sink) as discovery:
            await wait_until(lambda: discovery.health().last_error is not None, what="403")
            assert "403" in str(discovery.health().last_error)
            assert not discovery.health().connected
        assert sink.history == []
