"""deploy/base/rbac.yaml grants exactly what sdproxy.runtime.kube calls: no 403 anywhere.

The fake API server enforces the Role's rules; discovery, the Lease election (acquire,
renew, release) and the scaler (read/patch /scale, annotate pods) run through it. The file
must exist: a missing manifest fails this test, it never skips.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from sdproxy.core.pods import Endpoint, PodId
from sdproxy.runtime.kube import DELETION_COST, KubernetesDiscovery, KubernetesError
from sdproxy.runtime.kube.api import KubeApi
from tests.fakekube import FakeKube, load_role_rules, wait_until
from tests.integration.test_kube_discovery import discovery_settings
from tests.integration.test_kube_lease import replica

pytestmark = pytest.mark.timeout(30)

RBAC = Path(__file__).resolve().parents[2] / "deploy" / "base" / "rbac.yaml"


def role_rules() -> list[dict[str, object]]:
    assert RBAC.is_file(), f"{RBAC} is missing: sdproxy needs its Role"
    return load_role_rules(RBAC, role="sdproxy")


async def test_role_grants_everything_sdproxy_does(tmp_path: Path) -> None:
    async with FakeKube(rules=role_rules()) as kube:
        kube.add_deployment("sd-webui", replicas=2)
        kube.add_endpoint("pod-0", "10.0.0.1")
        kube.add_endpoint("pod-1", "10.0.0.2")
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")

        seen: list[list[Endpoint]] = []

        def sink(endpoints: Sequence[Endpoint]) -> None:
            seen.append(list(endpoints))

        discovery = KubernetesDiscovery(discovery_settings(kubeconfig), watch_timeout_s=1)
        task = asyncio.create_task(discovery.run(sink))
        scaler = replica(str(kubeconfig), "proxy-a")
        try:
            await wait_until(lambda: bool(seen) and len(seen[-1]) == 2, what="discovery")
            await scaler.start()
            await wait_until(scaler.is_leader, what="lease acquired")
            await asyncio.sleep(0.5)  # a renewal or two
            await scaler.scale_to(1, idle_pods=[PodId("pod-1")])
            assert kube.replicas("sd-webui") == 1
            assert DELETION_COST in kube.annotations("pod-1")
            await scaler.scale_to(3, idle_pods=[])  # clears the mark, scales up
            assert kube.replicas("sd-webui") == 3
            await wait_until(lambda: len(kube.calls(verb="watch")) >= 2, what="a re-watch")
        finally:
            await scaler.close()  # releases the Lease (update)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        lease = kube.lease("sdproxy-leader")
        assert lease is not None and not lease["spec"].get("holderIdentity")
        assert discovery.health().connected
        assert kube.denied == []
        verbs = {(c.verb, c.resource, c.subresource) for c in kube.requests}
        assert {
            ("list", "endpointslices", ""),
            ("watch", "endpointslices", ""),
            ("get", "deployments", "scale"),
            ("patch", "deployments", "scale"),
            ("patch", "pods", ""),
            ("get", "leases", ""),
            ("create", "leases", ""),
            ("update", "leases", ""),
        } <= verbs


async def test_the_fake_enforces_the_role(tmp_path: Path) -> None:
    """Guard against a fake that allows everything: ungranted calls get 403."""
    async with FakeKube(rules=role_rules()) as kube:
        kube.add_deployment("other", replicas=1)
        api = await KubeApi.connect(str(kube.write_kubeconfig(tmp_path / "kubeconfig")))
        try:
            with pytest.raises(KubernetesError) as caught:
                await api.get_scale("sd", "other")  # resourceNames: only sd-webui
            assert caught.value.status == 403
            with pytest.raises(KubernetesError) as caught:
                await api.read_lease("sd", "some-other-lease")
            assert caught.value.status == 403
        finally:
            await api.close()
        assert len(kube.denied) == 2
