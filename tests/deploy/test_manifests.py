"""Deploy: every kustomize overlay renders, validates and matches what sdproxy accepts.

How the output is validated:
- built-in kinds with kubernetes-validate's offline OpenAPI schemas, strict (unknown
  fields fail), against the oldest and the newest Kubernetes version we claim;
- custom resources (ServiceMonitor, PrometheusRule, ScaledObject) have no schema there:
  they are checked against closed subset schemas (crd_schemas.py), the ScaledObject's HPA
  behavior inside a synthetic HorizontalPodAutoscaler, and the alert rules by promtool;
- then the cross-references no schema sees: sdproxy's args parse with `sdproxy serve`
  and name the Service/Deployment/ports/Lease that exist, selectors select, the Role
  grants exactly what the chosen scaler uses, the GPU Deployment keeps its invariants.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
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
GPU_OVERLAYS = ("gpu", "keda")
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


def _proxy(objs: Sequence[Obj]) -> tuple[Obj, Obj, dict[str, Any]]:
    """(Deployment, container, typed `sdproxy serve` settings) of the one proxy container;
    the settings merge the args over the defaults (no environment), as `serve` does."""
    found = [(d, c) for d, c in iter_containers(objs) if image_name(c["image"]) == "sdproxy"]
    assert len(found) == 1, "expected exactly one container running the sdproxy image"
    deployment, container = found[0]
    argv = argv_of(container)
    assert argv[:1] == ["serve"], f"the sdproxy container must run `sdproxy serve`: {argv}"
    return deployment, container, settings.resolve(parse(argv), env={})


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
    deployment, container, args = _proxy(objs)
    assert args["discovery"] == "kubernetes"
    assert args["namespace"] == NAMESPACE
    assert args["warmup"] is True, "--warmup gates pods on a real generation"
    service = one(objs, "Service", args["service"])
    assert args["port_name"] in {p["name"] for p in service["spec"]["ports"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args["listen"].port == ports["http"]
    assert args["metrics_listen"].port == ports["metrics"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= args["drain_timeout_s"]
    if args["scaler"] == "kubernetes":
        one(objs, "Deployment", args["deployment"])
        env = {e["name"]: e for e in container.get("env", [])}
        assert args["identity"] == "$(POD_NAME)"
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


@pytest.mark.parametrize("overlay", OVERLAY_PARAMS)
def test_proxy_probes_and_security(rendered: dict[str, list[Obj]], overlay: str) -> None:
    deployment, container, _ = _proxy(rendered[overlay])
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "memory" in container["resources"]["limits"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "sdproxy"


def test_sim_pods_run_sdproxy_sim(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["sim"]
    sims = [c for _, c in iter_containers(objs) if image_name(c["image"]) == "sdproxy-sim"]
    assert len(sims) == 1
    # the sim image's entry point is `sdproxy sim`
    parsed = parse(["sim", *argv_of({"args": sims[0]["args"]})])
    assert parsed.host == "0.0.0.0"
    assert parsed.port == 7860
    assert parsed.pods == 1


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
    deployment = one(objs, "Deployment", "sd-webui")
    (container,) = containers(deployment)
    return deployment, container


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
    assert pod["terminationGracePeriodSeconds"] >= 300
    assert "preStop" in container["lifecycle"]
    # readiness must not be the model-loaded check (that is the startupProbe's job)
    assert container["readinessProbe"]["httpGet"]["path"].startswith("/sdapi/v1/progress")
    assert startup["exec"]["command"][0] == "sd-ready"
    # the scaler owns the replica count; `kubectl apply` must not reset it
    assert "replicas" not in deployment["spec"]


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_sd_webui_serves_the_api_on_all_interfaces(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    _, container = _gpu_deployment(rendered[overlay])
    args = container["args"]
    assert {"--api", "--listen"} <= set(args)
    assert args[args.index("--port") + 1] == "7860"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 7860}


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
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, f"Service {svc['metadata']['name']}: {port}"
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
    assert _metric_names(trigger["metadata"]["query"]) == {"sdproxy_desired_pods"}
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
