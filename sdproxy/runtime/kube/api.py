"""Runtime: the one boundary to the Kubernetes API (kubernetes_asyncio, untyped).

Everything else in ``sdproxy.runtime.kube`` talks to Kubernetes through ``KubeApi``: typed
methods that take and return plain JSON-shaped dicts (the wire format, camelCase keys), and
that translate ``ApiException``, aiohttp and timeout errors into ``KubernetesError`` with
``raise ... from exc``. Credentials: an explicit kubeconfig path, else the in-cluster
service account, else ``$KUBECONFIG`` (or ~/.kube/config).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncGenerator, Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from sdproxy.errors import ConfigError, KubernetesError

JsonObj = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
#: a short per-call bound: the API server answers in milliseconds when healthy
CALL_TIMEOUT_S = 10.0


def translate(what: str, exc: BaseException) -> KubernetesError:
    """The KubernetesError for a client-side failure (ApiException, aiohttp, timeouts)."""
    if isinstance(exc, ApiException):
        return KubernetesError(what, status=exc.status, reason=str(exc.reason or "").strip())
    return KubernetesError(what, status=None, reason=f"{type(exc).__name__}: {exc}".rstrip(": "))


_CLIENT_ERRORS = (ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError)


async def _call(what: str, awaitable: Awaitable[Any]) -> Any:
    try:
        return await awaitable
    except _CLIENT_ERRORS as exc:
        raise translate(what, exc) from exc


async def _configuration(kubeconfig: str, env: Mapping[str, str]) -> Any:
    """A fresh Configuration: --kubeconfig, else in-cluster, else $KUBECONFIG."""
    conf = client.Configuration()
    try:
        if kubeconfig:
            await config.load_kube_config(config_file=kubeconfig, client_configuration=conf)
        elif env.get("KUBERNETES_SERVICE_HOST"):
            load_incluster: Any = config.load_incluster_config  # untyped
            load_incluster(client_configuration=conf)
        else:
            path = env.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
            # $KUBECONFIG may list several files; the first one is enough for us
            await config.load_kube_config(
                config_file=path.split(os.pathsep)[0], client_configuration=conf
            )
    except Exception as exc:  # ConfigException, OSError, YAML errors: all mean "no config"
        raise ConfigError(f"no usable Kubernetes credentials: {exc}") from exc
    return conf


@dataclass(frozen=True, kw_only=True)
class WatchEvent:
    """One watch event: ADDED, MODIFIED, DELETED or BOOKMARK with its raw object."""

    type: str
    obj: JsonObj


class KubeApi:
    """Typed, dict-in/dict-out calls to the few endpoints sdproxy uses."""

    def __init__(self, api_client: Any) -> None:
        self._client = api_client
        self._discovery: Any = client.DiscoveryV1Api(api_client)
        self._apps: Any = client.AppsV1Api(api_client)
        self._core: Any = client.CoreV1Api(api_client)
        self._coordination: Any = client.CoordinationV1Api(api_client)

    @classmethod
    async def connect(
        cls, kubeconfig: str = "", *, env: Mapping[str, str] | None = None
    ) -> KubeApi:
        """Build the client from settings (raises ConfigError without credentials)."""
        conf = await _configuration(kubeconfig, os.environ if env is None else env)
        return cls(client.ApiClient(configuration=conf))

    async def close(self) -> None:
        await self._client.close()

    def _plain(self, model: Any) -> JsonObj:
        """A model object as its wire-format dict (camelCase keys, no None values)."""
        data: JsonObj = self._client.sanitize_for_serialization(model)
        return data

    async def list_endpoint_slices(
        self, namespace: str, selector: str
    ) -> tuple[list[JsonObj], str]:
        """Every matching EndpointSlice and the list's resourceVersion."""
        result = await _call(
            "list endpointslices",
            self._discovery.list_namespaced_endpoint_slice(
                namespace, label_selector=selector, _request_timeout=CALL_TIMEOUT_S
            ),
        )
        data = self._plain(result)
        return list(data.get("items") or []), str(data["metadata"]["resourceVersion"])

    async def watch_endpoint_slices(
        self, namespace: str, selector: str, *, resource_version: str, timeout_s: int
    ) -> AsyncGenerator[WatchEvent, None]:
        """Events after ``resource_version`` until the server ends the watch.

        ``timeout_seconds`` makes the server close the stream (the iterator then ends) and
        keeps kubernetes_asyncio from retrying a 410 on its own: the caller re-lists.
        """
        stream = watch.Watch()
        try:
            events = stream.stream(
                self._discovery.list_namespaced_endpoint_slice,
                namespace,
                label_selector=selector,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_s,
                _request_timeout=timeout_s + CALL_TIMEOUT_S,
            )
            while True:
                try:
                    raw = await events.next()
                except StopAsyncIteration:
                    return
                except _CLIENT_ERRORS as exc:
                    raise translate("watch endpointslices", exc) from exc
                yield _watch_event(raw)
        finally:
            await stream.close()

    async def get_scale(self, namespace: str, deployment: str) -> int:
        result = await _call(
            "get deployments/scale",
            self._apps.read_namespaced_deployment_scale(
                deployment, namespace, _request_timeout=CALL_TIMEOUT_S
            ),
        )
        spec = self._plain(result).get("spec") or {}
        return int(spec.get("replicas") or 0)

    async def patch_scale(self, namespace: str, deployment: str, replicas: int) -> None:
        await _call(
            "patch deployments/scale",
            self._apps.patch_namespaced_deployment_scale(
                deployment,
                namespace,
                {"spec": {"replicas": replicas}},
                _content_type=MERGE_PATCH,
                _request_timeout=CALL_TIMEOUT_S,
            ),
        )

    async def patch_pod_annotations(
        self, namespace: str, pod: str, annotations: Mapping[str, str | None]
    ) -> None:
        """Merge-patch annotations (RFC 7386: a None value removes the key)."""
        await _call(
            "patch pods",
            self._core.patch_namespaced_pod(
                pod,
                namespace,
                {"metadata": {"annotations": dict(annotations)}},
                _content_type=MERGE_PATCH,
                _request_timeout=CALL_TIMEOUT_S,
            ),
        )

    async def read_lease(self, namespace: str, name: str) -> JsonObj | None:
        """The Lease, or None when it does not exist yet."""
        try:
            result = await _call(
                "get leases",
                self._coordination.read_namespaced_lease(
                    name, namespace, _request_timeout=CALL_TIMEOUT_S
                ),
            )
        except KubernetesError as exc:
            if exc.status == 404:
                return None
            raise
        return self._plain(result)

    async def create_lease(self, namespace: str, body: JsonObj) -> JsonObj:
        result = await _call(
            "create leases",
            self._coordination.create_namespaced_lease(
                namespace, body, _request_timeout=CALL_TIMEOUT_S
            ),
        )
        return self._plain(result)

    async def replace_lease(self, namespace: str, name: str, body: JsonObj) -> JsonObj:
        """PUT with metadata.resourceVersion: 409 when someone else wrote first."""
        result = await _call(
            "update leases",
            self._coordination.replace_namespaced_lease(
                name, namespace, body, _request_timeout=CALL_TIMEOUT_S
            ),
        )
        return self._plain(result)


def _watch_event(raw: Any) -> WatchEvent:
    """Validate one decoded event (a non-JSON line comes back as a plain string)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("raw_object"), dict):
        text = raw if isinstance(raw, str) else json.dumps(raw, default=str)
        raise KubernetesError("watch endpointslices", status=None, reason=f"bad event {text[:200]}")
    return WatchEvent(type=str(raw.get("type", "")).upper(), obj=raw["raw_object"])
