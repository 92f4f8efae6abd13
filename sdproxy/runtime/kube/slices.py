"""Runtime (pure helpers): EndpointSlices -> ``Endpoint`` snapshots.

Follows the discovery.k8s.io/v1 EndpointSlice reference
(https://kubernetes.io/docs/reference/kubernetes-api/service-resources/endpoint-slice-v1/):
``conditions.ready`` nil means ready, ``terminating`` nil means not terminating; a pod is
named by ``targetRef.name`` (else its address); the port is the one named ``port_name``
(else the slice's first port). A pod listed by several slices (slices being replaced)
appears once, preferring its ready entry. A slice labelled ``sdproxy.io/weight: "2"``
gives its endpoints that relative GPU speed (the first guess of their learned rate, as
``#weight=N`` on a static backend): slices managed by hand, or the Service's own labels,
which the EndpointSlice controller copies onto its slices (a bad value is logged and
ignored). No I/O here, so it is tested with plain dicts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from sdproxy.core.pods import Endpoint, PodId

log = logging.getLogger(__name__)


def _port(slice_obj: Mapping[str, Any], port_name: str) -> int | None:
    ports = slice_obj.get("ports") or []
    for port in ports:
        if port.get("port") is not None and (not port_name or port.get("name") == port_name):
            return int(port["port"])
    return None


def _url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address  # IPv6 literal (RFC 3986)
    return f"http://{host}:{port}"


WEIGHT_LABEL = "sdproxy.io/weight"


def _weight(slice_obj: Mapping[str, Any]) -> float:
    metadata = slice_obj.get("metadata") or {}
    value = (metadata.get("labels") or {}).get(WEIGHT_LABEL)
    if value is None:
        return 1.0
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = -1.0
    if not 0 < weight < float("inf"):
        log.warning("EndpointSlice %s: %s=%r is no weight; 1 used", metadata.get("name"),
                    WEIGHT_LABEL, value)  # fmt: skip
        return 1.0
    return weight


def _endpoint(raw: Mapping[str, Any], port: int, weight: float = 1.0) -> Endpoint | None:
    addresses = raw.get("addresses") or []
    if not addresses:
        return None
    conditions = raw.get("conditions") or {}
    terminating = conditions.get("terminating") is True
    ready = conditions.get("ready") is not False and not terminating
    target = raw.get("targetRef") or {}
    pod_id = PodId(str(target.get("name") or addresses[0]))
    return Endpoint(
        pod_id=pod_id,
        url=_url(str(addresses[0]), port),
        ready=ready,
        terminating=terminating,
        weight=weight,
    )


def _rank(endpoint: Endpoint) -> tuple[bool, bool]:
    return (endpoint.ready, not endpoint.terminating)


def endpoints_from_slices(slices: Iterable[Mapping[str, Any]], *, port_name: str) -> list[Endpoint]:
    """Merge the endpoints of every slice into one snapshot, sorted by pod id."""
    merged: dict[PodId, Endpoint] = {}
    for slice_obj in slices:
        port = _port(slice_obj, port_name)
        if port is None:
            name = (slice_obj.get("metadata") or {}).get("name")
            log.warning("EndpointSlice %s has no port named %r; skipped", name, port_name)
            continue
        weight = _weight(slice_obj)
        for raw in slice_obj.get("endpoints") or []:
            endpoint = _endpoint(raw, port, weight)
            if endpoint is None:
                continue
            known = merged.get(endpoint.pod_id)
            if known is None or _rank(endpoint) > _rank(known):
                merged[endpoint.pod_id] = endpoint
    return [merged[pod] for pod in sorted(merged)]
