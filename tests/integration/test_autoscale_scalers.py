"""The Kubernetes scaler and ``--scaler none`` (KEDA reads ``sdproxy_desired_pods``) follow
the same ``--wait-target-s`` decisions: two replicas' composition roots, one patching the
fake API server's Deployment ``/scale``, one only exporting the gauge, fed the same
arrivals and service times, tick by tick on a virtual clock. (Scale-in at the Deployment
is bounded by the idle pods the scaler can name, tests/integration/test_kube_scaler.py; no
pods are listed here, so only the way up is compared at the Deployment.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from sdproxy.core.autoscale import AutoscaleConfig
from sdproxy.core.queueing import ServiceStats
from sdproxy.runtime.app import Services
from sdproxy.runtime.kube import KubernetesScaler
from sdproxy.runtime.scaling import NoScaler
from sdproxy.settings import Settings
from tests.fakekube import FakeKube, wait_until

pytestmark = pytest.mark.timeout(30)


def exported_desired(services: Services) -> float:
    for line in generate_latest(services.metrics.registry).decode().splitlines():
        if line.startswith("sdproxy_desired_pods "):
            return float(line.split()[1])
    raise AssertionError("sdproxy_desired_pods not exported")


async def test_kubernetes_and_keda_signal_follow_the_same_decisions(tmp_path: Path) -> None:
    base = Settings()
    scaler_settings = dataclasses.replace(
        base.scaler,
        scaler="kubernetes",
        autoscale=AutoscaleConfig(max_pods=20, wait_target_s=10.0, scale_down_delay_s=60.0),
        lease_duration_s=1.0,
        identity="proxy-0",
    )
    settings = dataclasses.replace(base, scaler=scaler_settings)
    async with FakeKube() as kube:
        kube.add_deployment("sd-webui", replicas=0)
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        k8s = KubernetesScaler(scaler_settings, "sd", kubeconfig=str(kubeconfig))
        await k8s.start()
        try:
            await wait_until(k8s.is_leader, what="leadership")
            acting = Services(settings, discovery=None, scaler=k8s)
            keda = Services(settings, discovery=None, scaler=NoScaler())
            now = [0.0]
            for s in (acting, keda):
                s.autoscaler.clock = lambda: now[0]
                s.autoscaler.wall_clock = lambda: 1_795_996_800.0 + now[0]
                s.gate.service = ServiceStats()
                for seconds in (4.0, 5.0, 4.5, 5.3):
                    s.gate.service = s.gate.service.observe(seconds)
            seen = []
            # 0.5/s for two minutes, 1.5/s for two minutes, then nothing
            for t, rate in [
                (float(t), 0.5 if t < 120 else 1.5 if t < 240 else 0.0) for t in range(0, 400, 2)
            ]:
                now[0] = t
                for s in (acting, keda):
                    s.gate.arrivals += round(rate * 2)
                a = await acting.autoscaler.step()
                b = await keda.autoscaler.step()
                assert a.desired == b.desired, (t, a.reason, b.reason)
                if a.desired > a.previous:
                    assert kube.replicas("sd-webui") == a.desired
                else:  # scale-in removes only pods it can name idle; none are listed here
                    assert kube.replicas("sd-webui") >= a.desired
                assert exported_desired(keda) == b.desired
                seen.append(a.desired)
            assert max(seen) >= 7  # 1.5/s x 4.7 s = 7 erlangs: the model's pods
            assert 0 < seen[59] < max(seen)  # at 0.5/s, fewer
        finally:
            await k8s.close()
