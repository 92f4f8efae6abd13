"""Tests: a fake Kubernetes API server that speaks the real wire protocol on loopback.

Just enough of the API for sdproxy, driven by the REAL kubernetes_asyncio client through a
kubeconfig (``write_kubeconfig``):

- ``discovery.k8s.io/v1`` EndpointSlices: LIST (labelSelector equality terms, list
  resourceVersion) and WATCH (``watch=true&resourceVersion=..&allowWatchBookmarks=true&
  timeoutSeconds=..``): newline-delimited JSON events ADDED/MODIFIED/DELETED/BOOKMARK;
  a resourceVersion older than the last ``compact()`` gets an ERROR event with a 410
  Status, as the real API server does after etcd compaction.
- ``apps/v1`` Deployments ``/scale``: GET, PUT, PATCH.
- ``v1`` Pods: GET, PATCH, DELETE.
- ``coordination.k8s.io/v1`` Leases: GET, LIST, POST, PUT, PATCH, DELETE, with
  resourceVersion preconditions (409 Conflict) and 409 AlreadyExists.

PATCH understands application/merge-patch+json (RFC 7386), application/json-patch+json
(RFC 6902: add, replace, remove, test) and application/strategic-merge-patch+json (treated
as a merge patch: none of the objects served here has a list with a merge key).

Test controls: ``add_endpoint`` / ``set_endpoint`` / ``remove_endpoint`` (also create and
delete the Pod object), ``bookmark()``, ``compact()``, ``expire_watches()`` (410 on every
open watch), ``on_scale`` (a hook, sync or async,
called with (deployment, old, new) before the PATCH is answered), ``outage("reset"|"503")``
and ``recover()``, ``requests`` (a log of every call: verb, group, resource, subresource,
name, status), ``scale_in_victims(n)`` (the pods a ReplicaSet would delete, by
pod-deletion-cost), and RBAC: ``FakeKube(rules=[...])`` takes Role rules (apiGroups,
resources incl. "deployments/scale", verbs, resourceNames) and answers 403 to anything
they do not grant. Every request must carry the kubeconfig's bearer token (else 401).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import itertools
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

Obj = dict[str, Any]
TOKEN = "fake-token"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
SERVICE_LABEL = "kubernetes.io/service-name"

_RESET = object()  # watcher queue sentinel: drop the connection
_END = object()  # watcher queue sentinel: end the stream cleanly


@dataclass
class Call:
    """One request as RBAC sees it, plus its answer (status 0 while in progress)."""

    verb: str
    group: str
    resource: str
    subresource: str
    name: str
    namespace: str
    status: int
    content_type: str = ""


@dataclass
class _Target:
    verb: str
    group: str
    resource: str
    subresource: str
    name: str
    namespace: str


@dataclass(eq=False)
class _Watcher:
    namespace: str
    selector: dict[str, str]
    bookmarks: bool
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


class KubeError(Exception):
    """Answered as a v1 Status."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def status_body(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _status_response(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(status_body(code, reason, message), status=code)


# ---- patches -------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON Merge Patch (a null value removes the key)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KubeError(422, "Invalid", f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(target: Obj, ops: Sequence[Mapping[str, Any]]) -> Obj:
    """RFC 6902 JSON Patch: add, replace, remove, test on object members."""
    doc = copy.deepcopy(target)
    for op in ops:
        *parents, last = _pointer(str(op["path"]))
        node: Any = doc
        for part in parents:
            if not isinstance(node, dict) or part not in node:
                raise KubeError(422, "Invalid", f"path {op['path']} does not exist")
            node = node[part]
        kind = op["op"]
        if kind in ("add", "replace"):
            if kind == "replace" and last not in node:
                raise KubeError(422, "Invalid", f"replace: {op['path']} does not exist")
            node[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            if last not in node:
                raise KubeError(422, "Invalid", f"remove: {op['path']} does not exist")
            del node[last]
        elif kind == "test":
            if node.get(last) != op["value"]:
                raise KubeError(422, "Invalid", f"test failed at {op['path']}")
        else:
            raise KubeError(422, "Invalid", f"unsupported op {kind!r}")
    return doc


def apply_patch(target: Obj, body: Any, content_type: str) -> Obj:
    if content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
        patched: Obj = merge_patch(target, body)
        return patched
    if content_type == "application/json-patch+json":
        if not isinstance(body, list):
            raise KubeError(400, "BadRequest", "a JSON patch is a list of operations")
        return json_patch(target, body)
    raise KubeError(415, "UnsupportedMediaType", f"unsupported patch type {content_type!r}")


# ---- RBAC ----------------------------------------------------------------------------


def rule_allows(rule: Mapping[str, Any], target: _Target) -> bool:
    """Whether one Role rule grants the request (Kubernetes RBAC semantics)."""
    groups = rule.get("apiGroups") or []
    resources = rule.get("resources") or []
    verbs = rule.get("verbs") or []
    names = rule.get("resourceNames") or []
    wanted = f"{target.resource}/{target.subresource}" if target.subresource else target.resource
    if "*" not in groups and target.group not in groups:
        return False
    if "*" not in resources and wanted not in resources:
        return False
    if "*" not in verbs and target.verb not in verbs:
        return False
    # resourceNames cannot authorize list/watch/create (no name at authorization time)
    return not names or (bool(target.name) and target.name in names)


def load_role_rules(path: Path, *, role: str = "sdproxy") -> list[Obj]:
    """The rules of the Role (or ClusterRole) named ``role`` in a multi-document YAML file."""
    import yaml

    with path.open() as fh:
        docs = [d for d in yaml.safe_load_all(fh) if isinstance(d, dict)]
    for doc in docs:
        if doc.get("kind") in ("Role", "ClusterRole") and doc["metadata"]["name"] == role:
            rules: list[Obj] = doc.get("rules") or []
            return rules
    raise LookupError(f"no Role named {role!r} in {path}")


# ---- the server ----------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_selector(text: str) -> dict[str, str]:
    terms: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = term.replace("==", "=").partition("=")
        if not sep or key.endswith("!"):
            raise KubeError(400, "BadRequest", f"unsupported label selector {term!r}")
        terms[key.strip()] = value.strip()
    return terms


def _labels_match(obj: Obj, selector: Mapping[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def parse_path(method: str, path: str, query: Mapping[str, str]) -> _Target:
    """/api/v1/namespaces/NS/RES[/NAME[/SUB]] or /apis/GROUP/VERSION/namespaces/NS/..."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        raise KubeError(404, "NotFound", f"the server could not find {path}")
    if len(rest) < 3 or rest[0] != "namespaces":
        raise KubeError(404, "NotFound", f"only namespaced resources are served: {path}")
    namespace, resource = rest[1], rest[2]
    name = rest[3] if len(rest) > 3 else ""
    sub = rest[4] if len(rest) > 4 else ""
    verbs = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
    if method == "GET":
        verb = "get" if name else ("watch" if _truthy(query.get("watch")) else "list")
    else:
        verb = verbs.get(method, method.lower())
    return _Target(verb, group, resource, sub, name, namespace)


class FakeKube:
    """The fake API server; use ``async with FakeKube() as kube`` (or start/close)."""

    def __init__(self, *, rules: Sequence[Mapping[str, Any]] | None = None) -> None:
        self.rules = list(rules) if rules is not None else None
        self.requests: list[Call] = []
        self.on_scale: Callable[[str, int, int], Any] | None = None
        self._rv = itertools.count(1)
        self.resource_version = 0
        self._slices: dict[tuple[str, str], Obj] = {}
        self._history: list[tuple[int, str, Obj]] = []  # (rv, type, slice)
        self._compacted = 0
        self._watchers: set[_Watcher] = set()
        self._scales: dict[tuple[str, str], Obj] = {}
        self.pods: dict[tuple[str, str], Obj] = {}
        self.leases: dict[tuple[str, str], Obj] = {}
        self._outage: str | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        self._signal_watchers(_END)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeKube:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        """A kubeconfig (JSON is valid YAML) pointing the client at this server."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": TOKEN}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config))
        return path

    # ---- faults -----------------------------------------------------------------------

    def outage(self, mode: str = "reset") -> None:
        """'reset': drop every connection (open watches too); '503': answer 503 Status."""
        assert mode in ("reset", "503")
        self._outage = mode
        self._signal_watchers(_RESET)

    def recover(self) -> None:
        self._outage = None

    def _signal_watchers(self, signal: object) -> None:
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(signal)

    # ---- request log ------------------------------------------------------------------

    def calls(self, *, verb: str | None = None, resource: str | None = None) -> list[Call]:
        """Logged calls, optionally filtered; ``resource`` may name a subresource
        ('deployments/scale'); 'deployments' alone does not match the subresource."""
        out = []
        for call in self.requests:
            full = f"{call.resource}/{call.subresource}" if call.subresource else call.resource
            if (verb is None or call.verb == verb) and (resource is None or resource == full):
                out.append(call)
        return out

    @property
    def denied(self) -> list[Call]:
        return [c for c in self.requests if c.status == 403]

    # ---- EndpointSlices ---------------------------------------------------------------

    def _bump(self, obj: Obj) -> int:
        self.resource_version = next(self._rv)
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.resource_version)
        return self.resource_version

    def put_slice(self, obj: Obj, *, namespace: str = "sd") -> None:
        """Create or replace a raw EndpointSlice (emits ADDED or MODIFIED)."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = namespace
        key = (namespace, meta["name"])
        kind = "MODIFIED" if key in self._slices else "ADDED"
        meta.setdefault("uid", str(uuid.uuid4()))
        obj.setdefault("addressType", "IPv4")
        obj.setdefault("endpoints", [])
        obj.update(kind="EndpointSlice", apiVersion="discovery.k8s.io/v1")
        self._slices[key] = obj
        self._emit(kind, obj)

    def delete_slice(self, name: str, *, namespace: str = "sd") -> None:
        obj = self._slices.pop((namespace, name))
        self._emit("DELETED", obj)

    def slice(self, name: str, *, namespace: str = "sd") -> Obj:
        return copy.deepcopy(self._slices[(namespace, name)])

    def _emit(self, kind: str, obj: Obj) -> None:
        rv = self._bump(obj)
        snapshot = copy.deepcopy(obj)
        self._history.append((rv, kind, snapshot))
        for watcher in list(self._watchers):
            if self._visible(watcher.namespace, watcher.selector, snapshot):
                watcher.queue.put_nowait({"type": kind, "object": snapshot})

    @staticmethod
    def _visible(namespace: str, selector: Mapping[str, str], obj: Obj) -> bool:
        return obj["metadata"]["namespace"] == namespace and _labels_match(obj, selector)

    def add_endpoint(
        self,
        pod: str,
        address: str,
        *,
        port: int = 7860,
        port_name: str = "http",
        ready: bool | None = True,
        serving: bool | None = None,
        terminating: bool | None = False,
        service: str = "sd-webui",
        slice_name: str | None = None,
        namespace: str = "sd",
        create_pod: bool = True,
    ) -> None:
        """Add a pod's endpoint to a slice of ``service`` (creating both as needed)."""
        name = slice_name or f"{service}-abcde"
        key = (namespace, name)
        obj = copy.deepcopy(self._slices.get(key)) or {
            "metadata": {"name": name, "labels": {SERVICE_LABEL: service}},
            "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
            "endpoints": [],
        }
        conditions = {
            "ready": ready,
            "serving": ready if serving is None else serving,
            "terminating": terminating,
        }
        endpoint = {
            "addresses": [address],
            "conditions": {k: v for k, v in conditions.items() if v is not None},
            "targetRef": {"kind": "Pod", "name": pod, "namespace": namespace},
        }
        obj["endpoints"] = [e for e in obj["endpoints"] if _pod_of(e) != pod] + [endpoint]
        self.put_slice(obj, namespace=namespace)
        if create_pod and (namespace, pod) not in self.pods:
            self.add_pod(pod, namespace=namespace, ip=address)

    def set_endpoint(self, pod: str, *, namespace: str = "sd", **conditions: bool | None) -> None:
        """Change conditions (ready, serving, terminating) of a pod's endpoint everywhere."""
        for (ns, _), obj in list(self._slices.items()):
            hits = [e for e in obj["endpoints"] if ns == namespace and _pod_of(e) == pod]
            if hits:
                obj = copy.deepcopy(obj)
                for e in obj["endpoints"]:
                    if _pod_of(e) == pod:
                        e["conditions"].update(conditions)
                self.put_slice(obj, namespace=ns)

    def remove_endpoint(self, pod: str, *, namespace: str = "sd", delete_pod: bool = True) -> None:
        for (ns, _), obj in list(self._slices.items()):
            if ns == namespace and any(_pod_of(e) == pod for e in obj["endpoints"]):
                obj = copy.deepcopy(obj)
                obj["endpoints"] = [e for e in obj["endpoints"] if _pod_of(e) != pod]
                self.put_slice(obj, namespace=ns)
        if delete_pod:
            self.pods.pop((namespace, pod), None)

    def bookmark(self) -> None:
        """Send a BOOKMARK with the current resourceVersion to bookmark-enabled watches."""
        event = {
            "type": "BOOKMARK",
            "object": {
                "kind": "EndpointSlice",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": str(self.resource_version)},
                "endpoints": [],
                "addressType": "IPv4",
            },
        }
        for watcher in list(self._watchers):
            if watcher.bookmarks:
                watcher.queue.put_nowait(event)

    def compact(self) -> None:
        """Forget history: a watch from an older resourceVersion now gets 410 Gone."""
        self._compacted = self.resource_version
        self._history.clear()

    def expire_watches(self) -> None:
        """Compact, and end every open watch with a 410 ERROR event, as an API server
        does when etcd compacts past a watch's resourceVersion: each client re-lists."""
        self.compact()
        status = status_body(410, "Expired", f"too old resource version ({self._compacted})")
        self._signal_watchers({"type": "ERROR", "object": status})
        self._signal_watchers(_END)

    def watch_count(self) -> int:
        return len(self._watchers)

    # ---- Deployments, Pods ------------------------------------------------------------

    def add_deployment(self, name: str, *, replicas: int = 0, namespace: str = "sd") -> None:
        scale: Obj = {"metadata": {"name": name, "namespace": namespace}, "replicas": replicas}
        self._bump(scale)
        self._scales[(namespace, name)] = scale

    def replicas(self, name: str, *, namespace: str = "sd") -> int:
        value: int = self._scales[(namespace, name)]["replicas"]
        return value

    def add_pod(self, name: str, *, namespace: str = "sd", ip: str = "10.0.0.1") -> None:
        pod: Obj = {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "labels": {"app": "sd-webui"},
                "annotations": {},
            },
            "spec": {"containers": [{"name": "sd-webui", "image": "sd-webui:fake"}]},
            "status": {"phase": "Running", "podIP": ip},
        }
        self._bump(pod)
        self.pods[(namespace, name)] = pod

    def annotations(self, pod: str, *, namespace: str = "sd") -> dict[str, str]:
        return dict(self.pods[(namespace, pod)]["metadata"].get("annotations") or {})

    def scale_in_victims(self, count: int, *, namespace: str = "sd") -> list[str]:
        """The pods a ReplicaSet removes first: lowest pod-deletion-cost (default 0)."""

        def cost(item: tuple[tuple[str, str], Obj]) -> tuple[int, str]:
            value = (item[1]["metadata"].get("annotations") or {}).get(DELETION_COST, "0")
            return int(value), item[0][1]

        mine = [item for item in self.pods.items() if item[0][0] == namespace]
        return [key[1] for key, _ in sorted(mine, key=cost)[:count]]

    def lease(self, name: str, *, namespace: str = "sd") -> Obj | None:
        found = self.leases.get((namespace, name))
        return copy.deepcopy(found) if found else None

    # ---- HTTP -------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[..., Any]
    ) -> web.StreamResponse:
        try:
            target = parse_path(request.method, request.path, request.query)
        except KubeError as exc:
            return _status_response(exc.code, exc.reason, exc.message)
        content_type = request.headers.get("Content-Type", "") if request.can_read_body else ""
        call = Call(
            target.verb,
            target.group,
            target.resource,
            target.subresource,
            target.name,
            target.namespace,
            0,
            content_type,
        )
        self.requests.append(call)  # logged on arrival: the order is the order of calls
        response = await self._guarded(request, handler, target)
        call.status = response.status
        return response

    async def _guarded(
        self, request: web.Request, handler: Callable[..., Any], target: _Target
    ) -> web.StreamResponse:
        if self._outage == "reset":
            _drop(request)
            return web.Response(status=503)  # never delivered: the connection is gone
        if self._outage == "503":
            return _status_response(503, "ServiceUnavailable", "fake outage")
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return _status_response(401, "Unauthorized", "Unauthorized")
        if self.rules is not None and not any(rule_allows(r, target) for r in self.rules):
            resource = (
                f"{target.resource}/{target.subresource}" if target.subresource else target.resource
            )
            message = (
                f'{target.resource} "{target.name}" is forbidden: User cannot {target.verb} '
                f'resource "{resource}" in API group "{target.group}"'
            )
            return _status_response(403, "Forbidden", message)
        try:
            response: web.StreamResponse = await handler(request)
        except KubeError as exc:
            return _status_response(exc.code, exc.reason, exc.message)
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        target = parse_path(request.method, request.path, request.query)
        route = (target.group, target.resource, target.subresource)
        handlers = {
            ("discovery.k8s.io", "endpointslices", ""): self._endpointslices,
            ("apps", "deployments", "scale"): self._scale,
            ("", "pods", ""): self._pod,
            ("coordination.k8s.io", "leases", ""): self._lease,
        }
        handler = handlers.get(route)
        if handler is None:
            raise KubeError(404, "NotFound", f"the server could not find {request.path}")
        return await handler(request, target)

    async def _body(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except ValueError as exc:
            raise KubeError(400, "BadRequest", f"bad JSON body: {exc}") from exc

    # EndpointSlices

    async def _endpointslices(self, request: web.Request, target: _Target) -> web.StreamResponse:
        selector = _parse_selector(request.query.get("labelSelector", ""))
        if target.verb == "list":
            items = [
                copy.deepcopy(o)
                for (ns, _), o in sorted(self._slices.items())
                if self._visible(target.namespace, selector, o)
            ]
            for item in items:
                item.pop("kind", None), item.pop("apiVersion", None)
            return web.json_response(
                {
                    "kind": "EndpointSliceList",
                    "apiVersion": "discovery.k8s.io/v1",
                    "metadata": {"resourceVersion": str(self.resource_version)},
                    "items": items,
                }
            )
        if target.verb == "watch":
            return await self._watch(request, target.namespace, selector)
        raise KubeError(405, "MethodNotAllowed", f"{target.verb} endpointslices not served")

    def _initial_events(self, since: str, namespace: str, selector: dict[str, str]) -> list[Obj]:
        if since in ("", "0"):  # "any version": synthetic ADDED for the current state
            return [
                {"type": "ADDED", "object": copy.deepcopy(o)}
                for o in self._slices.values()
                if self._visible(namespace, selector, o)
            ]
        if int(since) < self._compacted:
            status = status_body(
                410, "Expired", f"too old resource version: {since} ({self._compacted})"
            )
            return [{"type": "ERROR", "object": status}]
        return [
            {"type": kind, "object": copy.deepcopy(o)}
            for rv, kind, o in self._history
            if rv > int(since) and self._visible(namespace, selector, o)
        ]

    async def _watch(
        self, request: web.Request, namespace: str, selector: dict[str, str]
    ) -> web.StreamResponse:
        initial = self._initial_events(
            request.query.get("resourceVersion", ""), namespace, selector
        )
        timeout = float(request.query.get("timeoutSeconds", "1800"))
        bookmarks = _truthy(request.query.get("allowWatchBookmarks"))
        watcher = _Watcher(namespace, selector, bookmarks)
        expired = bool(initial) and initial[0]["type"] == "ERROR"
        if not expired:
            self._watchers.add(watcher)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for event in initial:
                await response.write(json.dumps(event).encode() + b"\n")
            if not expired:
                await self._pump(request, response, watcher, timeout)
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        finally:
            self._watchers.discard(watcher)
        return response

    async def _pump(
        self, request: web.Request, response: web.StreamResponse, watcher: _Watcher, limit_s: float
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while loop.time() < deadline:
            if request.transport is None or request.transport.is_closing():
                return
            try:
                item = await asyncio.wait_for(watcher.queue.get(), min(0.2, deadline - loop.time()))
            except TimeoutError:
                continue
            if item is _END:
                return
            if item is _RESET:
                _drop(request)
                return
            await response.write(json.dumps(item).encode() + b"\n")

    # Deployments /scale

    def _scale_obj(self, key: tuple[str, str]) -> Obj:
        stored = self._scales.get(key)
        if stored is None:
            raise KubeError(404, "NotFound", f'deployments.apps "{key[1]}" not found')
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": copy.deepcopy(stored["metadata"]),
            "spec": {"replicas": stored["replicas"]},
            "status": {"replicas": stored["replicas"], "selector": "app=sd-webui"},
        }

    async def _scale(self, request: web.Request, target: _Target) -> web.StreamResponse:
        key = (target.namespace, target.name)
        current = self._scale_obj(key)
        if target.verb == "get":
            return web.json_response(current)
        body = await self._body(request)
        if target.verb == "patch":
            updated = apply_patch(current, body, request.content_type)
        elif target.verb == "update":
            updated = body
        else:
            raise KubeError(405, "MethodNotAllowed", f"{target.verb} deployments/scale")
        self._precondition(current, updated)
        replicas = int((updated.get("spec") or {}).get("replicas") or 0)
        old = self._scales[key]["replicas"]
        self._scales[key]["replicas"] = replicas
        self._bump(self._scales[key])
        if replicas != old and self.on_scale is not None:
            result = self.on_scale(target.name, old, replicas)
            if inspect.isawaitable(result):
                await result
        return web.json_response(self._scale_obj(key))

    @staticmethod
    def _precondition(current: Obj, updated: Obj) -> None:
        wanted = (updated.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            name = current["metadata"]["name"]
            raise KubeError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on "{name}": '
                "the object has been modified; please apply your changes to the "
                "latest version and try again",
            )

    # Pods

    async def _pod(self, request: web.Request, target: _Target) -> web.StreamResponse:
        key = (target.namespace, target.name)
        pod = self.pods.get(key)
        if pod is None:
            raise KubeError(404, "NotFound", f'pods "{target.name}" not found')
        if target.verb == "get":
            return web.json_response(pod)
        if target.verb == "delete":
            del self.pods[key]
            return web.json_response(pod)
        if target.verb != "patch":
            raise KubeError(405, "MethodNotAllowed", f"{target.verb} pods")
        updated = apply_patch(pod, await self._body(request), request.content_type)
        self._precondition(pod, updated)
        updated["metadata"]["name"] = target.name
        self._bump(updated)
        self.pods[key] = updated
        return web.json_response(updated)

    # Leases

    async def _lease(self, request: web.Request, target: _Target) -> web.StreamResponse:
        if target.verb in ("list", "watch"):
            items = [o for (ns, _), o in self.leases.items() if ns == target.namespace]
            return web.json_response(
                {
                    "kind": "LeaseList",
                    "apiVersion": "coordination.k8s.io/v1",
                    "metadata": {"resourceVersion": str(self.resource_version)},
                    "items": items,
                }
            )
        if target.verb == "create":
            return self._create_lease(target.namespace, await self._body(request))
        key = (target.namespace, target.name)
        lease = self.leases.get(key)
        if lease is None:
            raise KubeError(
                404, "NotFound", f'leases.coordination.k8s.io "{target.name}" not found'
            )
        if target.verb == "get":
            return web.json_response(lease)
        if target.verb == "delete":
            del self.leases[key]
            return web.json_response(status_body(200, "", "deleted") | {"status": "Success"})
        body = await self._body(request)
        if target.verb == "update":
            updated = {**body, "metadata": {**lease["metadata"], **(body.get("metadata") or {})}}
        else:
            updated = apply_patch(lease, body, request.content_type)
        self._precondition(lease, updated)
        updated["metadata"].update(
            name=target.name, namespace=target.namespace, uid=lease["metadata"]["uid"]
        )
        updated.update(kind="Lease", apiVersion="coordination.k8s.io/v1")
        self._bump(updated)
        self.leases[key] = updated
        return web.json_response(updated)

    def _create_lease(self, namespace: str, body: Obj) -> web.Response:
        name = (body.get("metadata") or {}).get("name", "")
        key = (namespace, name)
        if key in self.leases:
            raise KubeError(
                409, "AlreadyExists", f'leases.coordination.k8s.io "{name}" already exists'
            )
        lease = copy.deepcopy(body)
        lease["metadata"].update(
            namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now()
        )
        lease["metadata"].pop("resourceVersion", None)
        lease.update(kind="Lease", apiVersion="coordination.k8s.io/v1")
        self._bump(lease)
        self.leases[key] = lease
        return web.json_response(lease, status=201)


def _truthy(value: str | None) -> bool:
    """A boolean query parameter as Go's strconv.ParseBool reads it (Python sends True)."""
    return (value or "").lower() in ("1", "t", "true")


def _pod_of(endpoint: Obj) -> str:
    return str((endpoint.get("targetRef") or {}).get("name") or "")


def _drop(request: web.Request) -> None:
    """Close the TCP connection under a request: the client sees a disconnect."""
    if request.transport is not None:
        request.transport.close()


async def wait_until(
    predicate: Callable[[], bool], *, timeout_s: float = 10.0, what: str = "condition"
) -> float:
    """Poll ``predicate`` until true (returns the seconds waited); fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        if loop.time() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)
    return loop.time() - start
