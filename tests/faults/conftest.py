"""Fault-injection tests use the integration fixtures (simulated pods, gated pods,
proxies on loopback)."""

from tests.integration.conftest import gated_pods, proxy_factory, sim_pods

__all__ = ["gated_pods", "proxy_factory", "sim_pods"]
