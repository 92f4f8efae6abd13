"""Building the Kubernetes client from settings: --kubeconfig, in-cluster, $KUBECONFIG."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdproxy.errors import ConfigError
from sdproxy.runtime.kube import KubeApi, KubernetesScaler
from tests.fakekube import FakeKube
from tests.integration.test_kube_scaler import scaler_settings

pytestmark = pytest.mark.timeout(30)


async def test_explicit_kubeconfig_and_env_kubeconfig_reach_the_server(tmp_path: Path) -> None:
    async with FakeKube() as kube:
        kube.add_deployment("sd-webui", replicas=2)
        path = str(kube.write_kubeconfig(tmp_path / "kubeconfig"))
        for api in (
            await KubeApi.connect(path, env={}),
            await KubeApi.connect("", env={"KUBECONFIG": path}),
        ):
            try:
                assert await api.get_scale("sd", "sd-webui") == 2
            finally:
                await api.close()
        assert all(call.status == 200 for call in kube.requests)  # the bearer token was sent


async def test_in_cluster_wins_over_kubeconfig_env(tmp_path: Path) -> None:
    # in a pod (KUBERNETES_SERVICE_HOST set) the service account is used, not $KUBECONFIG;
    # here the token files do not exist, so that choice shows as a ConfigError
    env = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": "1",
        "KUBECONFIG": str(tmp_path / "unused"),
    }
    with pytest.raises(ConfigError, match="credentials"):
        await KubeApi.connect("", env=env)


async def test_missing_kubeconfig_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        await KubeApi.connect(str(tmp_path / "missing"), env={})
    scaler = KubernetesScaler(scaler_settings(), "sd", kubeconfig=str(tmp_path / "missing"))
    with pytest.raises(ConfigError):
        await scaler.start()
    await scaler.scale_to(1, idle_pods=[])  # logs, does not raise
    assert not scaler.is_leader()
    await scaler.close()
