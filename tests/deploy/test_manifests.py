"""Deploy: every kustomize overlay renders, validates and matches what sdproxy accepts.

How the output is validated:
- built-in kinds with kubernetes-validate's offline OpenAPI schemas, strict (unknown
  fields fail), against the oldest and the newest Kubernetes version we claim;
- custom resources (ServiceMonitor, PrometheusRule, ScaledObject) have no schema there:
  they are checked against closed subset schemas (crd_schemas.py), the ScaledObject's HPA
  behavior inside a synthetic HorizontalPodAutoscaler, and the alert rules by promtool;
- then the cross-references no schema sees: sdproxy's args parse with `sdproxy serve`
  and name the Service/Deployment/ports/Lease that exist, the gate sidecar's with
  `sdproxy gate` and sit in front of the pod's sd-webui, the Service port sdproxy uses is
  the gate's, the NetworkPolicy lets only the proxy reach it, selectors select, the Role
  grants exactly what the chosen scaler uses, the GPU Deployment keeps its invariants.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from sdproxy import settings
from tests.conftest import require_binary
from tests.deploy.conftest import (
    OVERLAYS,
    REPO,
    Obj,
    argv_of,
    containers,
    find,
    flags_in,
    image_name,
    iter_containers,
    one,
    parse,
)
from tests.deploy.crd_schemas import CRD_SCHEMAS

K8S_VERSIONS = ("1.29.0", "1.37.0")  # oldest supported by our manifests, newest known
NAMESPACE = "sd"
OVERLAY_PARAMS = [pytest.param(name, id=name) for name in OVERLAYS]
GPU_OVERLAYS = ("gpu", "keda", "gpu-ui")
PROXY_PRESTOP_S = 5  # `sleep 5` in the proxy's preStop hook
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}

# (apiGroup, resource, verb, resourceName or "") the proxy needs, by --scaler
DISCOVERY_GRANTS = {("discovery.k8s.io", "endpointslices", v, "") for v in ("get", "list", "watch")}
KUBERNETES_SCALER_GRANTS = {
    *(("apps", "deployments/scale", v, "{deployment}") for v in ("get", "patch")),
    *(("", "pods", v, "") for v in ("get", "patch")),
    ("coordination.k8s.io", "leases", "create", ""),
    *(("coordination.k8s.io", "leases", v, "{lease}") for v in ("get", "update", "patch")),
}


def _exported_metric_names() -> set[str]:
    """Every sample name the real exposition carries (with one pod), plus Prometheus' `up`."""
    from prometheus_client.parser import text_string_to_metric_families

    from sdproxy.errors import UpstreamKind
    from sdproxy.runtime.metrics import Metrics
    from sdproxy.runtime.status import Status
    from tests.integration.test_metrics import sample_snapshot

    snapshot = Status.from_json(sample_snapshot())
    metrics = Metrics(snapshot=lambda: snapshot)
    metrics.observe_queue_wait(1.0)
    metrics.backend_error(pod="p", kind=UpstreamKind.CONNECT)
    body, _ = metrics.exposition()
    families = text_string_to_metric_families(body.decode())
    return {"up"} | {sample.name for family in families for sample in family.samples}


KNOWN_METRICS = _exported_metric_names()


def test_the_three_overlays_exist() -> None:
    assert {"sim", "gpu", "keda"} <= set(OVERLAYS)


# --- schemas -----------------------------------------------------------------------------


def _is_crd(obj: Obj) -> bool:
    return (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_validate_strictly(
    rendered: dict[str, list[Obj]], overlay: str, version: str
) -> None:
    errors = []
    for obj in rendered[overlay]:
        if _is_crd(obj):
            continue
        try:  # SchemaNotFoundError (an unknown kind) is an error too, not a warning
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(exc.message)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_custom_resources_match_their_schemas(rendered: dict[str, list[Obj]], overlay: str) -> None:
    for obj in filter(_is_crd, rendered[overlay]):
        schema = CRD_SCHEMAS[(obj["apiVersion"], obj["kind"])]
        validator = jsonschema.Draft202012Validator(schema)
        errors = [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']}:\n" + "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_objects_live_in_namespace_sd(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    one(objs, "Namespace", NAMESPACE)
    misplaced = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in objs
        if o["kind"] not in CLUSTER_SCOPED and o["metadata"].get("namespace") != NAMESPACE
    ]
    assert not misplaced


# --- the sdproxy container ---------------------------------------------------------------


def _sdproxy_image(objs: Sequence[Obj], command: str) -> list[tuple[Obj, Obj]]:
    """(Deployment, container) of every container running `sdproxy <command>`."""
    return [
        (d, c)
        for d, c in iter_containers(objs)
        if image_name(c["image"]) == "sdproxy" and argv_of(c)[:1] == [command]
    ]


def _proxy(objs: Sequence[Obj]) -> tuple[Obj, Obj, dict[str, Any]]:
    """(Deployment, container, typed `sdproxy serve` settings) of the one proxy container;
    the settings merge the args over the defaults (no environment), as `serve` does."""
    found = _sdproxy_image(objs, "serve")
    assert len(found) == 1, "expected exactly one container running `sdproxy serve`"
    others = {
        argv_of(c)[0] if argv_of(c) else ""
        for _, c in iter_containers(objs)
        if image_name(c["image"]) == "sdproxy"
    } - {"serve", "gate"}
    assert not others, f"the sdproxy image runs `serve` or `gate`, not {sorted(others)}"
    deployment, container = found[0]
    return deployment, container, settings.resolve(parse(argv_of(container)), env={})


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_proxy_flags_are_serve_flags(rendered: dict[str, list[Obj]], overlay: str) -> None:
    _, container, values = _proxy(rendered[overlay])
    unknown = set(flags_in(argv_of(container))) - set(settings.flag_names())
    assert not unknown, f"not `sdproxy serve` flags: {sorted(unknown)}"
    # and the values pass the same validation `sdproxy serve` applies at start-up
    settings.build(values)


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_proxy_args_point_at_objects_that_exist(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    _, container, args = _proxy(objs)
    assert args["discovery"] == "kubernetes"
    assert args["namespace"] == NAMESPACE
    assert args["warmup"] is True, "--warmup gates pods on a real generation"
    service = one(objs, "Service", args["service"])
    assert args["port_name"] in {p["name"] for p in service["spec"]["ports"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args["listen"].port == ports["http"]
    # the operational endpoints on their own port, which the probes, Prometheus and the
    # peers use; the public port serves none of them (hardening: --ops-listen)
    assert args["ops_listen"].port == ports["ops"]
    assert args["metrics_listen"] is None
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "ops"
    if args["peer_service"]:
        peers = one(objs, "Service", args["peer_service"])
        assert {"http", "ops"} <= {p["name"] for p in peers["spec"]["ports"]}
    # the pod name is the replica's identity at the gates (and for the Lease): given by
    # the Downward API in every overlay, as --identity or through its POD_NAME default
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    identity = [a for a in argv_of(container) if a.startswith("--identity")]
    assert identity in ([], ["--identity=$(POD_NAME)"])
    if args["scaler"] == "kubernetes":
        one(objs, "Deployment", args["deployment"])
        assert args["identity"] == "$(POD_NAME)"


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_proxy_replicas_drain_within_their_grace_period(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    deployment, container, args = _proxy(rendered[overlay])
    spec = deployment["spec"]
    assert spec["replicas"] >= 2, "a front door needs two replicas"
    # a rolling update starts the new replica before an old one stops taking requests
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # SIGTERM comes after the preStop pause; the drain (queued and running requests) may
    # then take --drain-timeout-s; the grace period must cover both, with a margin
    assert container["lifecycle"]["preStop"]["exec"]["command"] == [
        "sleep",
        str(PROXY_PRESTOP_S),
    ]
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= PROXY_PRESTOP_S + args["drain_timeout_s"] + 10


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_the_proxy_bounds_what_one_request_may_ask(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    """steps 1e9 or width 1e6 must not reach a GPU: the bounds are off by default, the
    manifests set them."""
    _, _, args = _proxy(rendered[overlay])
    limits = settings.build(args).proxy.limits
    assert (limits.max_steps, limits.max_pixels, limits.max_batch) == (150, 2048 * 2048, 8)


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_proxy_probes_and_security(rendered: dict[str, list[Obj]], overlay: str) -> None:
    deployment, container, args = _proxy(rendered[overlay])
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "memory" in container["resources"]["limits"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "sdproxy"
    # large heavy bodies are spooled to $TMPDIR (else /tmp): writable, on disk
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    tmp = env.get("TMPDIR") or "/tmp"
    (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == tmp]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    spool = volumes[mount["name"]]["emptyDir"]
    assert spool.get("medium") != "Memory", "a tmpfs spool would count against the memory limit"
    assert not mount.get("readOnly")
    # every spooled body together fits the volume (else the disk fills before 503)
    units = {"Mi": 1, "Gi": 1024}
    size_mb = int(spool["sizeLimit"][:-2]) * units[spool["sizeLimit"][-2:]]
    assert 0 < settings.build(args).proxy.spool_max_mb < size_mb


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_the_job_store_is_on_a_writable_volume_it_fits(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    """The root filesystem is read-only: the default --jobs-dir (under $HOME) would stop
    the proxy at start."""
    deployment, container, args = _proxy(rendered[overlay])
    jobs = settings.build(args).jobs
    assert jobs.jobs_dir.startswith("/")
    mounts = [m for m in container["volumeMounts"] if jobs.jobs_dir.startswith(m["mountPath"])]
    (mount,) = mounts
    assert not mount.get("readOnly")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    size = volumes[mount["name"]]["emptyDir"]["sizeLimit"]
    units = {"Mi": 1, "Gi": 1024}
    assert 0 < jobs.jobs_max_mb < int(size[:-2]) * units[size[-2:]]


def test_sim_pods_run_sdproxy_sim(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["sim"]
    sims = [c for _, c in iter_containers(objs) if image_name(c["image"]) == "sdproxy-sim"]
    assert len(sims) == 1
    # the sim image's entry point is `sdproxy sim`
    parsed = parse(["sim", *argv_of({"args": sims[0]["args"]})])
    # like sd-webui in the GPU pods: only the gate beside it reaches it
    assert parsed.host == "127.0.0.1"
    assert parsed.port == 7860
    assert parsed.pods == 1


# --- the gate sidecar ----------------------------------------------------------------------


def _upstream_port(container: Obj) -> int:
    """The port sd-webui (or the simulator) listens on, from its args."""
    args = container["args"]
    return int(args[args.index("--port") + 1])


def _gate(objs: Sequence[Obj]) -> tuple[Obj, Obj, settings.GateSettings]:
    """(Deployment, container, settings) of the one gate; the settings are what
    `sdproxy gate` would start with (its args over the defaults, no environment)."""
    found = _sdproxy_image(objs, "gate")
    assert len(found) == 1, "expected exactly one container running `sdproxy gate`"
    deployment, container = found[0]
    return deployment, container, settings.load_gate(parse(argv_of(container)), env={})


def _generator(deployment: Obj) -> Obj:
    found: list[Obj] = deployment["spec"]["template"]["spec"]["containers"]
    (container,) = found
    return container


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_gate_sidecar_fronts_the_pods_sd_webui(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    deployment, gate, config = _gate(objs)
    _, proxy, proxy_args = _proxy(objs)
    assert deployment["metadata"]["name"] == "sd-webui"
    # a native sidecar: started before sd-webui, stopped only after it exited, so it
    # relays the generation that the preStop drain waits for
    init = deployment["spec"]["template"]["spec"].get("initContainers", [])
    assert gate in init and gate["restartPolicy"] == "Always"
    assert gate["image"] == proxy["image"], "the gate runs the proxy's image and version"
    ports = {p["name"]: p["containerPort"] for p in gate["ports"]}
    assert config.gate.listen.host == "0.0.0.0"
    assert config.gate.listen.port == ports["gate"]
    upstream = f"http://127.0.0.1:{_upstream_port(_generator(deployment))}"
    assert config.gate.upstream == upstream
    assert config.gate.max_inflight == proxy_args["max_inflight"]
    assert gate["securityContext"]["readOnlyRootFilesystem"] is True
    assert "memory" in gate["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_the_proxy_discovers_the_gate_port(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    _, _, args = _proxy(objs)
    _, gate, config = _gate(objs)
    service = one(objs, "Service", args["service"])
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == args["port_name"]]
    target = port["targetPort"]
    named = {p["name"]: p["containerPort"] for p in gate["ports"]}
    assert named.get(target, target) == config.gate.listen.port


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_pod_readiness_is_the_gates_readyz(rendered: dict[str, list[Obj]], overlay: str) -> None:
    deployment, gate, config = _gate(rendered[overlay])
    readiness = gate["readinessProbe"]
    assert readiness["httpGet"]["path"] == "/-/readyz"
    assert readiness["httpGet"]["port"] in ("gate", config.gate.listen.port)
    # the gate answers 503 itself once sd-webui did not connect in --connect-timeout-s
    assert readiness["timeoutSeconds"] > config.gate.connect_timeout_s
    assert gate["livenessProbe"]["httpGet"]["path"] == "/-/healthz"
    # no other readiness probe: the sd-webui container turns ready when its startupProbe
    # (the model is loaded) succeeded, the gate's then says "sd-webui answers"
    others = [c["name"] for c in containers(deployment) if c is not gate and "readinessProbe" in c]
    assert not others


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_only_the_gate_is_reachable_from_outside_the_pod(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    deployment, gate, _ = _gate(rendered[overlay])
    generator = _generator(deployment)
    assert not generator.get("ports"), "sd-webui is reached through the gate only"
    args = generator["args"]
    if image_name(generator["image"]) == "sd-webui":
        # --nowebui binds 0.0.0.0 unless --server-name says otherwise (docs/sd-webui.md)
        assert "--listen" not in args
        assert args[args.index("--server-name") + 1] == "127.0.0.1"
    else:
        assert args[args.index("--host") + 1] == "127.0.0.1"
    exposed = [p for c in containers(deployment) for p in c.get("ports", [])]
    assert exposed == gate["ports"]


# a stand-in sd-webui for the liveness command: /sdapi/v1/progress answers 200
class _Progress(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        ok = self.path.startswith("/sdapi/v1/progress")
        body = b'{"progress": 0}' if ok else b'{"detail": "Not Found"}'
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def progress_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Progress)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_sd_webui_liveness_asks_progress_on_loopback(
    rendered: dict[str, list[Obj]], overlay: str, progress_port: int
) -> None:
    deployment, _, _ = _gate(rendered[overlay])
    generator = _generator(deployment)
    port = _upstream_port(generator)
    command = generator["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    url = f"http://127.0.0.1:{port}/sdapi/v1/progress?"
    assert url in command[2]
    # the same program, run as kubelet would, against a stand-in on another port
    code = command[2].replace(f":{port}/", f":{progress_port}/")
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    code = command[2].replace(f":{port}/sdapi/v1/progress", f":{progress_port}/nothing")
    failed = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert failed.returncode != 0


# --- NetworkPolicy -------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_network_policy_lets_only_the_proxy_reach_the_gate(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    deployment, gate, config = _gate(objs)
    proxy, _, _ = _proxy(objs)
    (policy,) = find(objs, "NetworkPolicy")
    spec = policy["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    proxy_labels = proxy["spec"]["template"]["metadata"]["labels"]
    assert _selects(spec["podSelector"]["matchLabels"], pod_labels)
    assert not _selects(spec["podSelector"]["matchLabels"], proxy_labels)
    assert spec["policyTypes"] == ["Ingress"]
    named = {p["name"]: p["containerPort"] for p in gate["ports"]}
    for rule in spec["ingress"]:
        # pods of this namespace only (no namespaceSelector, no ipBlock): the proxy's
        assert [set(peer) for peer in rule["from"]] == [{"podSelector"}] * len(rule["from"])
        for peer in rule["from"]:
            assert _selects(peer["podSelector"]["matchLabels"], proxy_labels)
            assert not _selects(peer["podSelector"]["matchLabels"], pod_labels)
        ports = {(p.get("protocol", "TCP"), named.get(p["port"], p["port"])) for p in rule["ports"]}
        # the gate alone; the pods export no metrics, so there is nothing for Prometheus
        assert ports == {("TCP", config.gate.listen.port)}
    assert spec["ingress"], "an empty ingress list would cut the proxy off too"


# --- RBAC ----------------------------------------------------------------------------------


def _grants(role: Obj) -> set[tuple[str, str, str, str]]:
    out = set()
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [""]:
                        out.add((group, resource, verb, name))
    return out


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_role_grants_exactly_what_the_scaler_uses(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    _, _, args = _proxy(objs)
    expected = set(DISCOVERY_GRANTS)
    if args["scaler"] == "kubernetes":
        expected |= {
            (g, r, v, n.format(deployment=args["deployment"], lease=args["lease_name"]))
            for g, r, v, n in KUBERNETES_SCALER_GRANTS
        }
    role = one(objs, "Role", "sdproxy")
    assert _grants(role) == expected
    binding = one(objs, "RoleBinding", "sdproxy")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "sdproxy",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "sdproxy", "namespace": NAMESPACE}
    ]
    one(objs, "ServiceAccount", "sdproxy")


def test_rbac_lives_in_base_rbac_yaml() -> None:
    docs = list(yaml.safe_load_all((REPO / "deploy/base/rbac.yaml").read_text()))
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Role"] == ["sdproxy"]


# --- the GPU pods --------------------------------------------------------------------------


def _gpu_deployment(objs: Sequence[Obj]) -> tuple[Obj, Obj]:
    """The sd-webui Deployment and its generator container (the gate is a sidecar)."""
    deployment = one(objs, "Deployment", "sd-webui")
    return deployment, _generator(deployment)


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_deployment_invariants(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    deployment, container = _gpu_deployment(objs)
    pod = deployment["spec"]["template"]["spec"]
    assert image_name(container["image"]) == "sd-webui"
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert pod["runtimeClassName"] == "nvidia"
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["sd-models"]
    one(objs, "PersistentVolumeClaim", "sd-models")
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 600
    assert startup["exec"]["command"][0] == "sd-ready"
    # the grace period covers a long generation: the preStop drain's wait, then SIGTERM
    prestop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sd-drain"
    wait_s = float(prestop[prestop.index("--max-wait") + 1])
    settle_s = float(prestop[prestop.index("--settle") + 1])
    assert wait_s >= 300
    assert pod["terminationGracePeriodSeconds"] >= wait_s + settle_s + 20
    # the scaler owns the replica count; `kubectl apply` must not reset it
    assert "replicas" not in deployment["spec"]


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_sd_webui_serves_the_api_to_the_gate(rendered: dict[str, list[Obj]], overlay: str) -> None:
    _, container = _gpu_deployment(rendered[overlay])
    args = container["args"]
    assert "--api" in args
    # gpu-ui serves sd-webui's browser UI too (its gate and proxy run --ui)
    assert ("--nowebui" in args) is (overlay != "gpu-ui")
    assert args[args.index("--port") + 1] == "7860"


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_no_hostpath_and_non_root(rendered: dict[str, list[Obj]], overlay: str) -> None:
    for deployment in find(rendered[overlay], "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in containers(deployment):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert ":" in c["image"] and not c["image"].endswith(":latest")


def test_sim_overlay_needs_no_gpu(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["sim"]
    deployment, container = _gpu_deployment(objs)
    pod = deployment["spec"]["template"]["spec"]
    assert "runtimeClassName" not in pod
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert not find(objs, "PersistentVolumeClaim")
    assert not [o for o in objs if _is_crd(o)], "the sim overlay must apply without CRDs"


# --- selectors and ports -------------------------------------------------------------------


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_services_and_pdbs_select_one_deployment(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    deployments = find(objs, "Deployment")
    for svc in find(objs, "Service"):
        (target,) = [
            d
            for d in deployments
            if _selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        names = {p["name"] for c in containers(target) for p in c.get("ports", [])}
        numbers = {p["containerPort"] for c in containers(target) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names | numbers, f"Service {svc['metadata']['name']}"
    for pdb in find(objs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert [d for d in deployments if _selects(selector, d["spec"]["selector"]["matchLabels"])]
    for deployment in deployments:
        names = {p["name"] for c in containers(deployment) for p in c.get("ports", [])}
        for c in containers(deployment):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in names


# --- monitoring and KEDA -------------------------------------------------------------------


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_service_monitor_scrapes_the_proxy_metrics_port(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    monitor = one(objs, "ServiceMonitor", "sdproxy")
    service = one(objs, "Service", "sdproxy")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


def _metric_names(expr: str) -> set[str]:
    bare = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]', " ", expr)  # drop strings, matchers, ranges
    return {m for m in re.findall(r"\b[a-z_][a-z0-9_]*\b", bare) if "_" in m or m == "up"}


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_prometheus_rules_pass_promtool_and_use_known_metrics(
    rendered: dict[str, list[Obj]], overlay: str, tmp_path: Path
) -> None:
    rule = one(rendered[overlay], "PrometheusRule", "sdproxy")
    groups = rule["spec"]["groups"]
    exprs = [r["expr"] for g in groups for r in g["rules"]]
    functions = {"histogram_quantile", "humanize_duration"}
    used = set().union(*map(_metric_names, exprs)) - functions
    assert used <= KNOWN_METRICS, f"unknown metrics: {sorted(used - KNOWN_METRICS)}"
    assert {"sdproxy_queue_depth", "sdproxy_pods"} <= used
    promtool = require_binary("promtool", install="apt-get install prometheus")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_keda_scales_sd_webui_from_the_desired_pods_metric(
    rendered: dict[str, list[Obj]],
) -> None:
    objs = rendered["keda"]
    _, _, args = _proxy(objs)
    assert args["scaler"] == "none"
    scaled = one(objs, "ScaledObject", "sd-webui")
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", "sd-webui")
    one(objs, "Deployment", target["name"])
    assert spec["minReplicaCount"] == args["min_pods"]
    assert spec["maxReplicaCount"] == args["max_pods"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    assert trigger["metadata"]["threshold"] == "1"
    query = trigger["metadata"]["query"]
    assert _metric_names(query) == {"sdproxy_desired_pods"}
    # every replica exports the count of the global demand: one value, not one share each
    assert re.fullmatch(r"max\(sdproxy_desired_pods(\{[^}]*\})?\)", query.strip()), query
    # the HPA behavior KEDA passes through must be a valid autoscaling/v2 behavior
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-sd-webui"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sd-webui"},
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": behavior,
        },
    }
    kubernetes_validate.validate(hpa, K8S_VERSIONS[-1], strict=True)


# --- docs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_docs_show_how_to_apply_each_overlay(overlay: str) -> None:
    docs = (REPO / "docs" / "deploy.md").read_text()
    assert f"kubectl apply -k deploy/overlays/{overlay}" in docs


def _replica_commands() -> list[list[str]]:
    """The `sdproxy ...` command lines of README's "Running several replicas" sh blocks,
    continuation lines joined, comments and a trailing `&` dropped."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Running several replicas\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [
        [w for w in shlex.split(line, comments=True) if w != "&"]
        for line in lines
        if line.startswith("sdproxy ")
    ]


def test_readme_runs_two_replicas_over_gated_sim_pods() -> None:
    commands = _replica_commands()
    sims = [parse(argv[1:]) for argv in commands if argv[1] == "sim"]
    gates = [
        settings.load_gate(parse(argv[1:]), env={}).gate for argv in commands if argv[1] == "gate"
    ]
    serves = [
        settings.build(settings.resolve(parse(argv[1:]), env={}))
        for argv in commands
        if argv[1] == "serve"
    ]
    assert len(sims) == 1 and len(gates) == 2 and len(serves) == 2
    (sim,) = sims
    pods = {f"http://{sim.host}:{sim.port + i}" for i in range(sim.pods)}
    assert {g.upstream for g in gates} == pods, "one gate in front of each simulated pod"
    gate_urls = {f"http://{g.listen.host}:{g.listen.port}" for g in gates}
    for serve in serves:
        assert set(serve.discovery.backend) == gate_urls, "the replicas talk to the gates"
    addresses = [
        a
        for s in serves
        for a in (s.proxy.listen, s.proxy.metrics_listen, s.proxy.ops_listen)
        if a is not None
    ]
    assert len(set(addresses)) == len(addresses), "every listener needs its own port"


# --- the browser UI (gpu-ui) -----------------------------------------------------------------


def test_gpu_ui_serves_the_browser_ui_through_gate_and_proxy(
    rendered: dict[str, list[Obj]],
) -> None:
    objs = rendered["gpu-ui"]
    _, _, serve = _proxy(objs)
    deployment, _, gate = _gate(objs)
    assert serve["ui"] is True and gate.gate.ui, "--ui on both the proxy and the gate"
    args = _generator(deployment)["args"]
    assert "--nowebui" not in args and "--api" in args, "sd-webui serves its UI and API"
    (ingress,) = find(objs, "Ingress")
    notes = ingress["metadata"]["annotations"]
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 1800
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": "sdproxy", "port": {"name": "http"}}
    assert "affinity" not in " ".join(notes), "the sdproxy_ui cookie does the stickiness"
