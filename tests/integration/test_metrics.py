"""Integration: the metrics module's exposition, promtool lint, pod forgetting, /metrics app."""

from __future__ import annotations

import copy
import platform
import subprocess
from collections.abc import Iterator
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sdproxy.core.effects import InterruptReason, RejectReason
from sdproxy.errors import UpstreamKind
from sdproxy.runtime.metrics import POD_STATES, Metrics, metrics_app
from sdproxy.runtime.status import Status
from tests.conftest import require_binary

POD_A = "10.0.0.7:7860"
POD_B = "10.0.0.8:7860"


def sample_snapshot(*, depth: int = 3) -> dict[str, Any]:
    """A /-/status document as the contract describes it, with two pods."""
    return {
        "version": "0.1.0",
        "uptime_s": 12.3,
        "queue": {
            "depth": depth,
            "max": 1000,
            "oldest_wait_s": 12.3,
            "timeout_s": 600,
            "by_priority": {"high": 0, "normal": depth, "low": 0},
            "policy": "fair",
        },
        "inflight": 1,
        "pods": [
            _pod(POD_A, state="ready", inflight=1, completed=10),
            _pod(POD_B, state="starting", inflight=0, completed=0),
        ],
        "autoscaler": {
            "scaler": "local",
            "leader": True,
            "desired": 2,
            "ready": 1,
            "starting": 1,
            "min_pods": 0,
            "max_pods": 4,
            "events": [{"at": "2026-11-25T18:00:00Z", "from": 1, "to": 2, "reason": "queue 3 > 1"}],
            "wait_target_s": 10.0,
            "model_target_s": 2.5,
            "wait_over_target_share": 0.043,
            "arrival_rate_per_s": 1.2,
            "predict": True,
            "forecast_rate_per_s": 1.1,
            "forecast_peak_per_s": 1.4,
            "forecast_trusted": True,
            "forecast_recent": 990.5,
            "actual_recent": 1080,
        },
        "discovery": {"source": "static", "connected": True, "last_error": None},
        "shutting_down": False,
        "tenants": [
            {"name": "batch", "weight": 1.0, "queued": 3, "running": 1, "gpu_seconds": 12.5}
        ],
    }


def _pod(pod_id: str, *, state: str, inflight: int, completed: int) -> dict[str, Any]:
    return {
        "id": pod_id,
        "url": f"http://{pod_id}",
        "state": state,
        "inflight": inflight,
        "limit": 1,
        "checkpoint": "a.safetensors",
        "completed": completed,
        "errors": 0,
        "ejected": False,
        "cordoned": False,
        "mode": "direct",
        "foreign": 0,
        "out": None,
        "weight": 1.0,
        "seconds_per_unit": 0.1,
    }


def exercise_all(metrics: Metrics) -> None:
    """Touch every event metric so each family has samples."""
    for route_class, code in (("heavy", 200), ("light", 200), ("job", 409), ("proxy", 503)):
        metrics.observe_request(route_class=route_class, code=code, duration_s=2.5)
    metrics.observe_request(route_class="admin", code=403, duration_s=0.002)
    metrics.observe_queue_wait(42.0)
    metrics.observe_queue_wait(0.001)
    metrics.rejected(RejectReason.QUEUE_FULL)
    metrics.rejected(RejectReason.QUEUE_TIMEOUT)
    for pod in (POD_A, POD_B):
        metrics.backend_error(pod=pod, kind=UpstreamKind.CONNECT)
        metrics.backend_error(pod=pod, kind=UpstreamKind.TIMEOUT)
    metrics.interrupt(InterruptReason.CLIENT_GONE)
    metrics.scale_event("up")
    metrics.scale_event("down")


def typed(make: Any) -> Any:
    """A snapshot callable answering the typed Status of a document factory."""
    return lambda: Status.from_json(make())


def samples(metrics: Metrics) -> Iterator[Sample]:
    body, _ = metrics.exposition()
    for family in text_string_to_metric_families(body.decode()):
        yield from family.samples


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = [s.value for s in samples(metrics) if s.name == name and s.labels == labels]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def test_promtool_finds_no_problems_in_the_exposition() -> None:
    promtool = require_binary("promtool", install="apt-get install prometheus")
    metrics = Metrics(snapshot=typed(sample_snapshot))
    exercise_all(metrics)
    body, _ = metrics.exposition()
    assert b'sdproxy_pod_inflight{pod="10.0.0.7:7860"}' in body  # lint ran with pods
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30, check=False
    )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, output
    assert output.strip() == ""


def test_state_gauges_are_read_from_the_snapshot_at_scrape_time() -> None:
    snap = sample_snapshot(depth=3)
    metrics = Metrics(snapshot=lambda: Status.from_json(snap))
    assert value(metrics, "sdproxy_queue_depth", priority="normal") == 3
    assert value(metrics, "sdproxy_queue_depth", priority="high") == 0
    assert value(metrics, "sdproxy_tenant_gpu_seconds_total", tenant="batch") == 12.5
    snap["queue"]["depth"] = snap["queue"]["by_priority"]["normal"] = 7
    snap["autoscaler"]["leader"] = False
    assert value(metrics, "sdproxy_queue_depth", priority="normal") == 7
    assert value(metrics, "sdproxy_queue_capacity") == 1000
    assert value(metrics, "sdproxy_queue_oldest_wait_seconds") == 12.3
    assert value(metrics, "sdproxy_desired_pods") == 2
    assert value(metrics, "sdproxy_leader") == 0
    assert value(metrics, "sdproxy_discovery_connected") == 1
    assert value(metrics, "sdproxy_pod_inflight", pod=POD_A) == 1
    assert value(metrics, "sdproxy_pod_limit", pod=POD_B) == 1
    assert value(metrics, "sdproxy_pod_completed_total", pod=POD_A) == 10
    assert value(metrics, "sdproxy_pods", state="ready") == 1
    assert value(metrics, "sdproxy_pods", state="starting") == 1


def test_every_pod_state_is_exported_even_with_no_pods() -> None:
    snap = sample_snapshot()
    snap["pods"] = []
    snap["queue"]["oldest_wait_s"] = 0.0
    metrics = Metrics(snapshot=lambda: Status.from_json(snap))
    for state in POD_STATES:
        assert value(metrics, "sdproxy_pods", state=state) == 0
    assert value(metrics, "sdproxy_queue_oldest_wait_seconds") == 0


def test_status_document_round_trips_through_the_typed_snapshot() -> None:
    snap = sample_snapshot()
    assert Status.from_json(snap).to_json() == snap
    with pytest.raises(KeyError):
        Status.from_json({k: v for k, v in snap.items() if k != "queue"})


def test_label_sets_come_from_the_enums_of_the_code_that_emits_them() -> None:
    """Every reason the core can emit is pre-created at 0, and none it cannot emit."""
    metrics = Metrics()
    rejected = {s.labels["reason"] for s in samples(metrics) if s.name == "sdproxy_rejected_total"}
    interrupted = {
        s.labels["reason"] for s in samples(metrics) if s.name == "sdproxy_interrupts_total"
    }
    # plus the refusals the proxy makes before the queue (client_quota, 429;
    # request_too_large, 422; spool_full, 503)
    refusals = {"client_quota", "request_too_large", "spool_full"}
    assert rejected == {r.value for r in RejectReason} | refusals
    assert interrupted == {r.value for r in InterruptReason} == {"client_gone", "user"}


def test_forgetting_a_pod_drops_its_series() -> None:
    snap = sample_snapshot()
    metrics = Metrics(snapshot=lambda: Status.from_json(snap))
    exercise_all(metrics)
    snap["pods"] = [p for p in snap["pods"] if p["id"] != POD_A]
    metrics.forget_pod(POD_A)
    pods_seen = {s.labels.get("pod") for s in samples(metrics)}
    assert POD_A not in pods_seen
    assert POD_B in pods_seen
    assert value(metrics, "sdproxy_backend_errors_total", pod=POD_B, kind="connect") == 1


def test_event_counters_count_and_common_reasons_start_at_zero() -> None:
    metrics = Metrics()
    assert value(metrics, "sdproxy_rejected_total", reason="no_backends") == 0
    assert value(metrics, "sdproxy_scale_events_total", direction="up") == 0
    exercise_all(metrics)
    assert value(metrics, "sdproxy_requests_total", route_class="job", code="409") == 1
    assert value(metrics, "sdproxy_request_duration_seconds_count", route_class="heavy") == 1
    assert value(metrics, "sdproxy_queue_wait_seconds_count") == 2
    assert value(metrics, "sdproxy_queue_wait_seconds_bucket", le="60.0") == 2
    assert value(metrics, "sdproxy_interrupts_total", reason="client_gone") == 1
    assert (
        value(metrics, "sdproxy_build_info", version="0.1.0", python=platform.python_version()) == 1
    )


@pytest.mark.parametrize(
    ("route_class", "code"),
    [
        pytest.param("ui", 200, id="route-class-outside-the-closed-set"),
        pytest.param("heavy", 42, id="not-an-http-status"),
    ],
)
def test_unbounded_labels_are_refused(route_class: str, code: int) -> None:
    with pytest.raises(ValueError):
        Metrics().observe_request(route_class=route_class, code=code, duration_s=1.0)


def test_instances_have_private_registries() -> None:
    first, second = (
        Metrics(snapshot=typed(sample_snapshot)),
        Metrics(snapshot=typed(sample_snapshot)),
    )
    first.rejected(RejectReason.QUEUE_FULL)
    assert value(second, "sdproxy_rejected_total", reason="queue_full") == 0
    assert prometheus_client.REGISTRY.get_sample_value("sdproxy_queue_depth") is None


async def test_metrics_app_serves_the_exposition(aiohttp_client: Any) -> None:
    snap = copy.deepcopy(sample_snapshot(depth=5))
    client = await aiohttp_client(metrics_app(Metrics(snapshot=lambda: Status.from_json(snap))))
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'sdproxy_queue_depth{priority="normal"} 5.0' in await response.text()
