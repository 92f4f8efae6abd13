"""Runtime: Prometheus metrics for the proxy, on its own registry, served at GET /metrics.

Two kinds of metric live here:

* **Events** (requests, rejections, queue waits, backend errors, interrupts, scale
  events) are counters and histograms the proxy bumps as things happen.
* **State** (queue depth, oldest wait, pods by state, per-pod in-flight/limit, desired
  pods, leader, discovery) is NOT kept in gauges the proxy must remember to update: a
  custom collector reads the typed ``Status`` snapshot (sdproxy.runtime.status) at scrape
  time — the document ``/-/status`` serves — so the status page and /metrics can never
  disagree and a removed pod's state series vanish by themselves
  (client_python "Custom Collectors": https://prometheus.github.io/client_python/collector/custom/).

Cardinality is bounded, and every label set comes from an enum of the code that emits
it: ``route_class`` (RouteClass), ``reason`` (RejectReason, InterruptReason), ``kind``
(errors.UpstreamKind), ``state`` (PodState), ``code`` is an HTTP status, and ``pod``
labels of event counters are dropped with ``forget_pod`` when discovery removes a pod.

The registry is never the process-global one, so several proxies (tests, in-process
replicas) can live side by side.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

import sdproxy
from sdproxy.core.effects import InterruptReason, RejectReason
from sdproxy.core.pods import PodState
from sdproxy.core.routing import RouteClass
from sdproxy.errors import ClientQuota, RequestTooLarge, SpoolFull, UpstreamKind
from sdproxy.runtime.auth import guarded
from sdproxy.runtime.status import Status, count_states

Snapshot = Callable[[], Status]

ROUTE_CLASSES = frozenset(c.value for c in RouteClass)
#: every state is always exported (0 when empty) so alerts never see a missing series
POD_STATES = tuple(s.value for s in PodState)
SCALE_DIRECTIONS = ("up", "down")
#: pre-created at 0 so rate()/increase() see the first event (Prometheus "Instrumentation"
#: practices: avoid missing metrics)
#: the core's rejections, and those the proxy makes before a request takes a queue place
REFUSALS = (ClientQuota.code, RequestTooLarge.code, SpoolFull.code)
#: one label value each (a tenant's max_queued is a core reject with the client_quota code)
REJECT_REASONS = tuple(dict.fromkeys((*(r.value for r in RejectReason), *REFUSALS)))
INTERRUPT_REASONS = tuple(r.value for r in InterruptReason)
#: request faults (sdproxy.runtime.proxy.outcome_of): CUDA out of memory, a 422
REQUEST_FAULT_KINDS = ("oom", "invalid")
UPSTREAM_KINDS = tuple(k.value for k in UpstreamKind)
#: sdproxy_callbacks_total{outcome} (sdproxy.runtime.callbacks.OUTCOMES)
CALLBACK_OUTCOMES = ("delivered", "retried", "failed", "refused")
#: sdproxy_jobs{status} (sdproxy.runtime.jobstore.JobStatus)
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")

#: light calls take milliseconds, a txt2img seconds, a large hires batch many minutes
REQUEST_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800,
)  # fmt: skip
#: an idle pool answers at once; a cold start (scale from zero) waits minutes
QUEUE_BUCKETS = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1800,
)  # fmt: skip


class Metrics:
    """All sdproxy metrics on one private registry (``self.registry``)."""

    def __init__(self, *, snapshot: Snapshot | None = None) -> None:
        self.registry = CollectorRegistry()
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._declare_request_metrics(self.registry)
        self._declare_pod_event_metrics(self.registry)
        self._declare_ui_metrics(self.registry)
        self._pre_create()
        self._register_process_metrics(self.registry)
        if snapshot is not None:
            self.registry.register(StateCollector(snapshot))

    def _declare_request_metrics(self, reg: CollectorRegistry) -> None:
        self._requests = Counter(
            "sdproxy_requests_total",
            "Requests answered, by route class and HTTP status.",
            ["route_class", "code"],
            registry=reg,
        )
        self._duration = Histogram(
            "sdproxy_request_duration_seconds",
            "Time from request arrival to the end of the response, queue wait included.",
            ["route_class"],
            buckets=REQUEST_BUCKETS,
            registry=reg,
        )
        self._queue_wait = Histogram(
            "sdproxy_queue_wait_seconds",
            "Time heavy requests waited in the shared queue before a pod slot was bound.",
            buckets=QUEUE_BUCKETS,
            registry=reg,
        )
        self._rejected = Counter(
            "sdproxy_rejected_total",
            "Requests not forwarded, by reason (queue_full, queue_timeout, no_backends…).",
            ["reason"],
            registry=reg,
        )

    def _declare_pod_event_metrics(self, reg: CollectorRegistry) -> None:
        self._backend_errors = Counter(
            "sdproxy_backend_errors_total",
            "Failures talking to a pod, by pod and kind (connect, timeout, reset, broke_off).",
            ["pod", "kind"],
            registry=reg,
        )
        self._interrupts = Counter(
            "sdproxy_interrupts_total",
            "Generations interrupted on a pod, by reason (client_gone, user).",
            ["reason"],
            registry=reg,
        )
        self._request_faults = Counter(
            "sdproxy_request_faults_total",
            "Generations that failed by the request's own fault, by kind (oom: CUDA out "
            "of memory for its size; invalid: a 422): the pod keeps its place.",
            ["kind"],
            registry=reg,
        )
        self._scale_events = Counter(
            "sdproxy_scale_events_total",
            "Changes of the desired pod count, by direction (up, down).",
            ["direction"],
            registry=reg,
        )
        self._callbacks = Counter(
            "sdproxy_callbacks_total",
            "Job callbacks, by outcome (delivered, retried, failed: gave up, refused).",
            ["outcome"],
            registry=reg,
        )

    def _declare_ui_metrics(self, reg: CollectorRegistry) -> None:
        self._ui_lobby_wait = Histogram(
            "sdproxy_ui_lobby_wait_seconds",
            "Time browsers waited in the UI lobby before a pod took their session (--ui).",
            buckets=QUEUE_BUCKETS,
            registry=reg,
        )

    def observe_ui_lobby_wait(self, wait_s: float) -> None:
        self._ui_lobby_wait.observe(max(0.0, wait_s))

    def _pre_create(self) -> None:
        for reason in REJECT_REASONS:
            self._rejected.labels(reason=reason)
        for reason in INTERRUPT_REASONS:
            self._interrupts.labels(reason=reason)
        for direction in SCALE_DIRECTIONS:
            self._scale_events.labels(direction=direction)
        for kind in REQUEST_FAULT_KINDS:
            self._request_faults.labels(kind=kind)
        for outcome in CALLBACK_OUTCOMES:
            self._callbacks.labels(outcome=outcome)

    @staticmethod
    def _register_process_metrics(reg: CollectorRegistry) -> None:
        build = Info("sdproxy_build", "sdproxy version and Python runtime.", registry=reg)
        build.info({"version": sdproxy.__version__, "python": platform.python_version()})
        ProcessCollector(registry=reg)  # process_cpu_seconds_total, memory, fds, start time
        GCCollector(registry=reg)

    def observe_request(self, *, route_class: str, code: int, duration_s: float) -> None:
        """One answered request (any outcome, rejections included)."""
        children = self._request_children.get((route_class, code))
        if children is None:
            children = self._bind_request_children(route_class, code)
        children[0].inc()
        children[1].observe(max(0.0, duration_s))

    def _bind_request_children(self, route_class: str, code: int) -> tuple[Counter, Histogram]:
        """Look up the labelled series once per (class, status): ``.labels()`` hashes and
        locks on every call, which showed in the proxy's profile (bench overhead)."""
        if route_class not in ROUTE_CLASSES:
            raise ValueError(f"route_class {route_class!r} not in {sorted(ROUTE_CLASSES)}")
        if not 100 <= code <= 599:
            raise ValueError(f"HTTP status out of range: {code}")
        children = (
            self._requests.labels(route_class=route_class, code=str(code)),
            self._duration.labels(route_class=route_class),
        )
        # bounded: 5 route classes x 500 statuses at most
        self._request_children[(route_class, code)] = children
        return children

    def observe_queue_wait(self, wait_s: float) -> None:
        """How long a heavy request waited for a slot (also for those that timed out)."""
        self._queue_wait.observe(max(0.0, wait_s))

    def rejected(self, reason: RejectReason) -> None:
        self._rejected.labels(reason=reason.value).inc()

    def refused(self, exc: ClientQuota | RequestTooLarge | SpoolFull) -> None:
        """A heavy request refused before it took a queue place (counted with the
        rejections: the same question, "why did this not reach a pod")."""
        self._rejected.labels(reason=exc.code).inc()

    def backend_error(self, *, pod: str, kind: UpstreamKind) -> None:
        self._backend_errors.labels(pod=pod, kind=kind.value).inc()

    def request_fault(self, kind: str) -> None:
        self._request_faults.labels(kind=kind).inc()

    def interrupt(self, reason: InterruptReason) -> None:
        self._interrupts.labels(reason=reason.value).inc()

    def scale_event(self, direction: str) -> None:
        if direction not in SCALE_DIRECTIONS:
            raise ValueError(f"direction must be one of {SCALE_DIRECTIONS}, got {direction!r}")
        self._scale_events.labels(direction=direction).inc()

    def callback(self, outcome: str) -> None:
        if outcome not in CALLBACK_OUTCOMES:
            raise ValueError(f"outcome must be one of {CALLBACK_OUTCOMES}, got {outcome!r}")
        self._callbacks.labels(outcome=outcome).inc()

    def forget_pod(self, pod: str) -> None:
        """Drop every event series labelled with a pod that discovery removed.

        State series (in-flight, limit…) come from the snapshot and vanish on their own.
        """
        self._backend_errors.remove_by_labels({"pod": pod})

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition (format 0.0.4, which every Prometheus and promtool reads)."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


class StateCollector:
    """Gauges computed at scrape time from the typed ``Status`` snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        """Names only, so the registry can detect clashes without taking a snapshot."""
        return list(_state_metrics(None))

    def collect(self) -> Iterable[Metric]:
        return list(_state_metrics(self._snapshot()))


def _gauge(name: str, documentation: str, value: float | None) -> GaugeMetricFamily:
    if value is None:
        return GaugeMetricFamily(name, documentation)
    return GaugeMetricFamily(name, documentation, value=value)


def _state_metrics(snap: Status | None) -> Iterator[Metric]:
    yield from _queue_metrics(snap)
    yield from _pod_metrics(snap)
    yield from _ui_metrics(snap)
    yield from _job_metrics(snap)
    auto = snap.autoscaler if snap is not None else None
    desired = None if auto is None else float(auto.desired or 0)
    yield _gauge(
        "sdproxy_desired_pods",
        "Pods the autoscaler asks for (the KEDA/HPA signal with --scaler none).",
        desired,
    )
    yield _gauge(
        "sdproxy_leader",
        "1 if this replica holds the autoscaler leader Lease (always 1 without election).",
        None if auto is None else float(auto.leader),
    )
    yield _gauge(
        "sdproxy_discovery_connected",
        "1 if the discovery source (static list, EndpointSlice watch) is in touch.",
        None if snap is None else float(snap.discovery.connected),
    )


def _job_metrics(snap: Status | None) -> Iterator[Metric]:
    jobs = snap.jobs if snap is not None else None
    by_status = GaugeMetricFamily(
        "sdproxy_jobs", "Asynchronous jobs in the job store, by status.", labels=["status"]
    )
    if jobs is not None:
        for status in JOB_STATUSES:
            by_status.add_metric([status], jobs.counts.get(status, 0))
    yield by_status
    yield _gauge(
        "sdproxy_jobs_store_bytes",
        "Bytes of the job store's files (bodies of unfinished jobs, results).",
        None if jobs is None else jobs.store_bytes,
    )


def _queue_metrics(snap: Status | None) -> Iterator[Metric]:
    queue = snap.queue if snap is not None else None
    depth = GaugeMetricFamily(
        "sdproxy_queue_depth",
        "Heavy requests waiting in the shared queue, by priority (high, normal, low).",
        labels=["priority"],
    )
    if queue is not None:
        for priority, count in queue.by_priority.items():
            depth.add_metric([priority], count)
    yield depth
    served = CounterMetricFamily(
        "sdproxy_tenant_gpu_seconds",
        "GPU time served to each tenant's jobs (pod slot held, checkpoint loads included).",
        labels=["tenant"],
    )
    for tenant in snap.tenants if snap is not None else ():
        served.add_metric([tenant.name], tenant.gpu_seconds)
    yield served
    yield _gauge(
        "sdproxy_queue_capacity",
        "Bound of the shared queue (--max-queue); beyond it requests get 503 queue_full.",
        None if queue is None else queue.max,
    )
    yield _gauge(
        "sdproxy_queue_oldest_wait_seconds",
        "How long the oldest queued request has waited so far (0 when the queue is empty).",
        None if queue is None else queue.oldest_wait_s,
    )
    yield _gauge(
        "sdproxy_queue_timeout_seconds",
        "Longest a request may wait in the queue before 503 queue_timeout.",
        None if queue is None else queue.timeout_s,
    )


def _pod_metrics(snap: Status | None) -> Iterator[Metric]:
    pods = snap.pods if snap is not None else ()
    inflight = GaugeMetricFamily(
        "sdproxy_pod_inflight", "Heavy requests running on a pod.", labels=["pod"]
    )
    limit = GaugeMetricFamily(
        "sdproxy_pod_limit", "Heavy requests a pod may run at once (slots).", labels=["pod"]
    )
    completed = CounterMetricFamily(
        "sdproxy_pod_completed", "Heavy requests a pod has completed.", labels=["pod"]
    )
    checkpoint = GaugeMetricFamily(
        "sdproxy_pod_checkpoint_info",
        "1 for the checkpoint a pod has loaded, as last seen by the proxy.",
        labels=["pod", "checkpoint"],
    )
    for pod in pods:
        inflight.add_metric([pod.id], pod.inflight)
        limit.add_metric([pod.id], pod.limit)
        completed.add_metric([pod.id], pod.completed)
        if pod.checkpoint:
            checkpoint.add_metric([pod.id, pod.checkpoint], 1.0)
    states = GaugeMetricFamily("sdproxy_pods", "Known pods by lifecycle state.", labels=["state"])
    if snap is not None:
        for state, count in count_states(pods).items():
            states.add_metric([state.value], count)
    yield from (states, inflight, limit, completed, checkpoint)


def _ui_metrics(snap: Status | None) -> Iterator[Metric]:
    """Only with --ui (a proxy without it exports no UI series)."""
    ui = snap.ui if snap is not None else None
    if snap is not None and ui is None:
        return
    sessions = GaugeMetricFamily(
        "sdproxy_ui_sessions", "Browser UI sessions a pod holds (--ui).", labels=["pod"]
    )
    if ui is not None:
        for pod in snap.pods if snap is not None else ():
            sessions.add_metric([pod.id], ui.sessions.get(pod.id, 0))
    yield sessions
    yield _gauge(
        "sdproxy_ui_lobby_depth",
        "Browsers waiting in the UI lobby for a pod (--ui).",
        None if ui is None else ui.lobby_depth,
    )


METRICS_KEY = web.AppKey("metrics", Metrics)


async def _serve_metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS_KEY].exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


def metrics_app(metrics: Metrics, *, token: str = "") -> web.Application:
    """A small app serving GET /metrics (for the separate --metrics-listen port), behind
    the operator's token when one is set."""
    app = web.Application()
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", guarded(_serve_metrics, token))
    return app
