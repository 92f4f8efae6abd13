"""Runtime: Kubernetes adapters, split by concern.

``api`` (the only module touching kubernetes_asyncio: credentials, typed calls, error
translation), ``slices`` (EndpointSlices -> Endpoint snapshots, pure), ``discovery``
(EndpointSlice list+watch), ``lease`` (Lease leader election), ``scaler`` (Deployment
/scale with pod-deletion-cost).
"""

from sdproxy.errors import KubernetesError
from sdproxy.runtime.kube.api import KubeApi
from sdproxy.runtime.kube.discovery import KubernetesDiscovery
from sdproxy.runtime.kube.lease import LeaderElector
from sdproxy.runtime.kube.scaler import DELETION_COST, KubernetesScaler

__all__ = [
    "DELETION_COST",
    "KubeApi",
    "KubernetesDiscovery",
    "KubernetesError",
    "KubernetesScaler",
    "LeaderElector",
]
