"""Runtime: the composition root — build the proxy from settings, run it, stop it cleanly.

Wires the admission core (through the Gate), a discovery source, a scaler, the autoscaler
loop, warm-up gating, each ready pod's checkpoints, metrics and the operational endpoints
(/-/healthz, /-/readyz, /-/status). Background tasks start in ``_lifecycle`` (an aiohttp
cleanup context), so they are cancelled exactly when the app stops. ``serve`` handles
SIGTERM: turn unready, stop accepting connections and new jobs, keep serving the queued
and running ones until done or the drain timeout, then answer what still waits 503
shutting_down, exit 0. The monotonic clock is chosen here, once (``CLOCK``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from sdproxy import __version__
from sdproxy.core.admission import Admission
from sdproxy.core.effects import RejectReason, Transition
from sdproxy.core.pods import Endpoint, PodId, PodState
from sdproxy.core.queue import Priority
from sdproxy.errors import ClientFacingError, ConfigError, NotFound
from sdproxy.runtime.auth import guarded
from sdproxy.runtime.autoscaler import Autoscaler
from sdproxy.runtime.catalog import Catalogs
from sdproxy.runtime.discovery import Discovery, StaticDiscovery
from sdproxy.runtime.gate import Gate
from sdproxy.runtime.gatewatch import GateWatch
from sdproxy.runtime.healthcheck import HealthChecker
from sdproxy.runtime.jobapi import AsyncJobs, open_store
from sdproxy.runtime.jobhandoff import IMPORT_PATH, hand_over, import_job
from sdproxy.runtime.jobroutes import add_peer_routes as add_peer_job_routes
from sdproxy.runtime.jobroutes import add_routes as add_job_routes
from sdproxy.runtime.jobs import new_token
from sdproxy.runtime.local import LocalPods
from sdproxy.runtime.logs import log_event, setup_logging
from sdproxy.runtime.metrics import Metrics, metrics_app
from sdproxy.runtime.peers import Peers
from sdproxy.runtime.proxy import Proxy, error_response
from sdproxy.runtime.scaling import NoScaler, Scaler
from sdproxy.runtime.status import (
    AutoscalerStatus,
    DiscoveryStatus,
    PodStatus,
    QueueStatus,
    Status,
    TenantStatus,
    UiStatus,
)
from sdproxy.runtime.status_page import status_response
from sdproxy.runtime.ui import UiFront
from sdproxy.runtime.warmup import Warmer
from sdproxy.settings import HostPort, Settings

log = logging.getLogger("sdproxy")
CLOCK = time.monotonic
#: the port of the proxy's own Service that peers are reached on (--peer-service): the
#: proxy port, or the operational one when the peer endpoints live there (--ops-listen)
PEER_PORT_NAME = "http"
OPS_PORT_NAME = "ops"


class Services:
    """Everything one proxy replica is made of; built without I/O, started by the app."""

    def __init__(
        self, settings: Settings, *, discovery: Discovery | None, scaler: Scaler | None
    ) -> None:
        self.settings = settings
        self.clock = CLOCK
        self.started_at = CLOCK()
        self.admission = Admission(settings.proxy.admission, tenants=settings.proxy.tenants)
        self.metrics = Metrics(snapshot=self.snapshot)
        self.gate = Gate(
            self.admission,
            clock=CLOCK,
            on_reject=self._on_reject,
            on_transitions=self._on_transitions,
            check_invariants=settings.proxy.check_invariants,
        )
        self.scaler = scaler or _scaler(settings)
        # the local scaler knows the pods it started: it is the discovery source too
        self.discovery = discovery or _discovery(settings, self.scaler)
        self.autoscaler = Autoscaler(
            settings=settings.scaler,
            gate=self.gate,
            scaler=self.scaler,
            metrics=self.metrics,
            clock=CLOCK,
        )
        self.proxy: Proxy | None = None
        self.warmer: Warmer | None = None
        self.catalogs: Catalogs | None = None
        self.gatewatch: GateWatch | None = None
        self.checker: HealthChecker | None = None
        self.peers: Peers | None = None
        self.jobs: AsyncJobs | None = None
        #: this replica's name at the pods' gates: its identity plus a token drawn at start,
        #: unique even for replicas sharing a host name (or restarted under the same one)
        self.replica = f"{settings.scaler.identity}/{new_token()[:8]}"
        self.synced = False
        self._appeared: dict[PodId, float] = {}
        self._arrivals_seen: dict[str, int] = {}
        self._arrivals_total = 0

    def _on_reject(self, reason: RejectReason) -> None:
        self.metrics.rejected(reason)

    def _on_transitions(self, transitions: Sequence[Transition]) -> None:
        if transitions and self.proxy is not None and self.proxy.ui is not None:
            self.proxy.ui.poke()  # a pod came or went: the lobby and sessions follow
        for pod_id, old, new in transitions:
            log_event(
                "pod_state",
                pod=pod_id,
                previous=old.value if old else None,
                state=new.value if new else "gone",
            )
            if old is None:
                self._appeared[pod_id] = self.clock()
                self._follow_gate(pod_id)
            if new is PodState.READY and pod_id in self._appeared:
                self.autoscaler.note_cold_start(self.clock() - self._appeared.pop(pod_id))
            if new is PodState.READY and self.catalogs is not None:
                self.catalogs.learn(pod_id)
            if new is None:
                self._appeared.pop(pod_id, None)
                self.metrics.forget_pod(pod_id)
                for tasks in (self.gatewatch, self.checker):
                    if tasks is not None:
                        tasks.forget(pod_id)
            elif new is PodState.WARMING and self.warmer is not None:
                self.warmer.warm(pod_id)

    def _follow_gate(self, pod_id: PodId) -> None:
        """Start following a new pod: its gate's occupancy, its health."""
        pod = self.admission.pods.get(pod_id)
        for tasks in (self.gatewatch, self.checker):
            if tasks is not None and pod is not None:
                tasks.follow(pod_id, pod.url)

    def on_peers(self, endpoints: Sequence[Endpoint]) -> None:
        """The proxy's own Service changed: every ready endpoint is a peer (this replica
        among them, recognised by its id when polled)."""
        if self.peers is not None:
            self.peers.set_urls([ep.url for ep in endpoints if ep.ready])

    def global_demand(self) -> tuple[int, int]:
        """(in flight, queued) over every replica: the queues of all, the in-flight work
        the gates see (whoever sent it), and every replica's work on ungated pods."""
        adm = self.admission
        peers_queued, peers_direct = self.peers.demand() if self.peers else (0, 0)
        inflight = sum(
            len(p.running) + (p.foreign if p.gated and p.gate_live else 0)
            for p in adm.pods.values()
        )
        ui_inflight, ui_queued = self.ui_demand()
        return inflight + peers_direct + ui_inflight, len(adm.queue) + peers_queued + ui_queued

    def ui_demand(self) -> tuple[int, int]:
        """(in flight, queued) of the browser UI in slots: a held pod is a whole pod's
        worth (its free slots too), and so is each ``--ui-sessions-per-pod`` waiters."""
        ui = self.proxy.ui if self.proxy is not None else None
        if ui is None:
            return 0, 0
        adm = self.admission
        view = ui.peer_view(self.clock())
        held_ids = {p.pod_id for p in adm.pods.values() if p.ui_held}
        held_ids |= {pod for pod, _seen in view.sessions.values()}
        held = [p for p in adm.pods.values() if p.pod_id in held_ids]
        inflight = sum(max(0, p.limit - len(p.running)) for p in held)
        per_pod = ui.config.ui_sessions_per_pod
        waiting_pods = -(-(len(ui.sessions.lobby) + view.lobby) // per_pod)
        return inflight, waiting_pods * adm.config.max_inflight

    def peer_document(self) -> dict[str, Any]:
        """What this replica tells its peers (``GET /-/peer``)."""
        adm = self.admission
        direct = sum(len(p.running) for p in adm.pods.values() if not p.gated)
        doc: dict[str, Any] = {
            "replica": self.replica,
            "queued": len(adm.queue),
            "inflight_direct": direct,
            "arrivals": self.gate.arrivals,
        }
        ui = self.proxy.ui if self.proxy is not None else None
        if ui is not None:
            doc["ui"] = ui.peer_document(self.clock())
        return doc

    def global_arrivals(self) -> int:
        """Heavy arrivals over every replica, as a counter that only grows: each replica's
        (this one's, every live peer's) increase since it was last seen is added; a peer
        seen for the first time adds nothing (its count is its past), one that restarted
        (its count went back) starts over from its new count, one gone adds no more."""
        counts = {self.replica: self.gate.arrivals}
        if self.peers is not None:
            counts.update(self.peers.arrivals())
        for replica, count in counts.items():
            last = self._arrivals_seen.get(replica)
            if last is None and replica == self.replica:
                last = 0
            if last is not None and count >= last:
                self._arrivals_total += count - last
            self._arrivals_seen[replica] = count
        return self._arrivals_total

    def on_snapshot(self, endpoints: Sequence[Endpoint]) -> None:
        """A discovery source pushed the pods it knows."""
        self.synced = True
        self.gate.reconcile(endpoints)

    def snapshot(self) -> Status:
        """The /-/status document; also the source of the state gauges in /metrics."""
        adm = self.admission
        now = self.clock()
        health = self.discovery.health()
        return Status(
            version=__version__,
            uptime_s=now - self.started_at,
            queue=QueueStatus(
                depth=len(adm.queue),
                max=adm.config.max_queue,
                oldest_wait_s=adm.oldest_wait_s(now),
                timeout_s=adm.config.queue_timeout_s,
                by_priority=by_priority(adm),
                policy=adm.config.policy,
            ),
            inflight=adm.inflight,
            pods=tuple(
                dataclasses.replace(
                    PodStatus.of(pod, now),
                    seconds_per_unit=round(adm.eta.rate(pod.pod_id, weight=pod.weight), 4),
                )
                for pod in adm.pods.values()
            ),
            tenants=tenant_statuses(adm),
            autoscaler=AutoscalerStatus(
                scaler=self.scaler.name,
                leader=self.scaler.is_leader(),
                desired=self.autoscaler.desired,
                ready=adm.count(PodState.READY),
                starting=adm.count(PodState.STARTING, PodState.WARMING),
                min_pods=self.settings.scaler.autoscale.min_pods,
                max_pods=self.settings.scaler.autoscale.max_pods,
                events=tuple(self.autoscaler.events),
                **self.autoscaler.model_status(),
            ),
            discovery=DiscoveryStatus(
                source=self.discovery.name,
                connected=health.connected,
                last_error=health.last_error,
            ),
            shutting_down=adm.closed,
            ui=self._ui_status(now),
            jobs=self.jobs.status() if self.jobs is not None else None,
        )

    def _ui_status(self, now: float) -> UiStatus | None:
        ui = self.proxy.ui if self.proxy is not None else None
        if ui is None:
            return None
        lobby = ui.sessions.lobby
        oldest = min((w.joined_at for w in lobby.values()), default=now)
        return UiStatus(
            sessions={str(pod): n for pod, n in ui.sessions.per_pod().items()},
            sessions_per_pod=ui.config.ui_sessions_per_pod,
            idle_s=ui.config.ui_idle_s,
            lobby_depth=len(lobby),
            lobby_oldest_wait_s=now - oldest,
        )


def by_priority(adm: Admission) -> dict[str, int]:
    depths = adm.depth_by_priority()
    return {name: depths.get(value, 0) for name, value in Priority.BY_NAME.items()}


def tenant_statuses(adm: Admission) -> tuple[TenantStatus, ...]:
    """Every tenant configured or seen (served, queued or running)."""
    book = adm.tenants
    names = sorted({*book.tenants, *book.served_s, *book.queued, *book.running})
    return tuple(
        TenantStatus(
            name=name,
            weight=book.get(name).weight,
            queued=book.queued.get(name, 0),
            running=book.running.get(name, 0),
            gpu_seconds=book.served_s.get(name, 0.0),
        )
        for name in names
    )


def _discovery(settings: Settings, scaler: Scaler) -> Discovery:
    if isinstance(scaler, LocalPods):
        return scaler
    if settings.discovery.discovery == "kubernetes":
        from sdproxy.runtime.kube import KubernetesDiscovery

        return KubernetesDiscovery(settings.discovery)
    return StaticDiscovery(settings.discovery.backend)


def _scaler(settings: Settings) -> Scaler:
    if settings.scaler.scaler == "kubernetes":
        from sdproxy.runtime.kube import KubernetesScaler

        return KubernetesScaler(
            settings.scaler, settings.discovery.namespace, kubeconfig=settings.discovery.kubeconfig
        )
    if settings.scaler.scaler == "local":
        return LocalPods(settings.scaler)
    return NoScaler()


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)


def build_app(
    settings: Settings, *, discovery: Discovery | None = None, scaler: Scaler | None = None
) -> web.Application:
    """The proxy as an aiohttp application (tests run it with aiohttp's test server)."""
    services = Services(settings, discovery=discovery, scaler=scaler)
    app = web.Application(client_max_size=int(settings.proxy.max_body_mb * 1024 * 1024))
    app[SERVICES] = services
    _add_probes(app)
    if settings.proxy.ops_listen is None:
        _add_ops_routes(app, settings.proxy.ops_token)
    # the browser UI's own endpoints are user-facing (the lobby page polls one): never
    # behind --ops-listen or --ops-token
    app.router.add_get("/-/ui/lobby", _ui_lobby)
    app.router.add_delete("/-/ui/session", _ui_session)
    add_job_routes(app, _jobs_of)
    # [\s\S]: "." would not match a newline, and a path with %0A would get aiohttp's
    # plain-text 404 instead of our JSON answer
    app.router.add_route("*", "/-/{tail:[\\s\\S]*}", _unknown_operational)
    app.router.add_route("*", "/{tail:[\\s\\S]*}", _proxy)
    app.cleanup_ctx.append(_lifecycle)
    return app


def build_ops_app(services: Services) -> web.Application:
    """The --ops-listen listener: the operational endpoints, the probes, /metrics too."""
    app = web.Application()
    app[SERVICES] = services
    _add_probes(app)
    _add_ops_routes(app, services.settings.proxy.ops_token)
    app.router.add_get("/metrics", guarded(_metrics, services.settings.proxy.ops_token))
    app.router.add_route("*", "/{tail:[\\s\\S]*}", _unknown_operational)
    return app


def _add_probes(app: web.Application) -> None:
    """Liveness and readiness: open on every listener (kubelet and load balancers)."""
    app.router.add_get("/-/healthz", _healthz)
    app.router.add_get("/-/readyz", _readyz)


def _add_ops_routes(app: web.Application, token: str) -> None:
    """What an operator or a peer replica reads: pod addresses, queue state, checkpoints,
    callers' queue places (--ops-listen decides where, --ops-token who)."""
    app.router.add_get("/-/status", guarded(_status, token))
    app.router.add_get("/-/metrics", guarded(_metrics, token))
    app.router.add_get("/-/peer", guarded(_peer, token))
    app.router.add_get("/-/peer/job", guarded(_peer_job, token))
    app.router.add_post("/-/peer/job/cancel", guarded(_peer_cancel, token))
    app.router.add_post(IMPORT_PATH, guarded(_peer_import, token))
    add_peer_job_routes(app, _jobs_of, guard=lambda handler: guarded(handler, token))


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    settings = services.settings
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=settings.proxy.connect_timeout_s,
        sock_read=settings.proxy.backend_timeout_s,
    )
    connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True)
    # No cookie jar: the session is shared by every caller; a cookie one pod set for one
    # caller must never ride along on another caller's request.
    async with aiohttp.ClientSession(
        timeout=timeout,
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        services.proxy = Proxy(
            settings=settings.proxy,
            gate=services.gate,
            session=session,
            metrics=services.metrics,
            clock=services.clock,
            replica=services.replica,
            light_timeout_s=settings.discovery.light_timeout_s,
        )
        services.gatewatch = GateWatch(
            session=session,
            gate=services.gate,
            replica=services.replica,
            connect_s=settings.proxy.connect_timeout_s,
        )
        if settings.discovery.health_interval_s > 0:
            services.checker = HealthChecker(
                session=session,
                gate=services.gate,
                interval_s=settings.discovery.health_interval_s,
                timeout_s=settings.discovery.health_timeout_s,
            )
        for pod_id in list(services.admission.pods):  # pods known before the app started
            services._follow_gate(pod_id)
        services.peers = Peers(
            session=session,
            replica=services.replica,
            urls=settings.proxy.peer,
            clock=services.clock,
            token=settings.proxy.ops_token,
        )
        services.proxy.gatewatch = services.gatewatch
        services.proxy.peers = services.peers
        if services.proxy.ui is not None:
            services.proxy.ui.peer_documents = services.peers.ui_documents
        store, temporary = open_store(settings.jobs, settings.proxy.listen)
        services.jobs = AsyncJobs(
            settings=settings.jobs, store=store, proxy=services.proxy, temporary=temporary
        )
        services.proxy.async_jobs = services.jobs
        services.autoscaler.demand = services.global_demand
        services.autoscaler.arrivals = services.global_arrivals
        services.warmer = Warmer(
            session=session, gate=services.gate, timeout_s=settings.discovery.warmup_timeout_s
        )
        services.catalogs = Catalogs(
            session=session, gate=services.gate, timeout_s=settings.proxy.connect_timeout_s + 10
        )
        for pod in list(services.admission.pods.values()):  # ready before the app started
            if pod.state is PodState.READY:
                services.catalogs.learn(pod.pod_id)
        tasks = [
            asyncio.create_task(services.discovery.run(services.on_snapshot), name="discovery"),
            asyncio.create_task(services.gate.run_ticker(), name="admission-ticker"),
            asyncio.create_task(services.autoscaler.run(), name="autoscaler"),
            asyncio.create_task(services.peers.run(), name="peers"),
        ]
        peer_source = _peer_discovery(settings)
        if peer_source is not None:
            tasks.append(
                asyncio.create_task(peer_source.run(services.on_peers), name="peer-discovery")
            )
        if services.proxy.ui is not None:
            tasks.append(asyncio.create_task(services.proxy.ui.run(), name="ui-sessions"))
        services.jobs.start(lambda: services.synced)
        start = getattr(services.scaler, "start", None)
        if start is not None:
            await start()
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await services.warmer.close()
            await services.catalogs.close()
            await services.gatewatch.close()
            if services.checker is not None:
                await services.checker.close()
            await services.jobs.close()
            await services.proxy.wait_background()
            await services.scaler.close()


async def _proxy(request: web.Request) -> web.StreamResponse:
    proxy = request.app[SERVICES].proxy
    assert proxy is not None, "the proxy starts with the app"
    return await proxy.handle(request)


def _ui_front(request: web.Request) -> UiFront:
    proxy = request.app[SERVICES].proxy
    if proxy is None or proxy.ui is None:
        raise NotFound(f"no proxy endpoint {request.path} (the browser UI needs --ui)")
    return proxy.ui


async def _ui_lobby(request: web.Request) -> web.Response:
    try:
        return await _ui_front(request).lobby(request)
    except ClientFacingError as exc:
        return error_response(exc)


async def _ui_session(request: web.Request) -> web.Response:
    try:
        return await _ui_front(request).leave(request)
    except ClientFacingError as exc:
        return error_response(exc)


def _jobs_of(request: web.Request) -> AsyncJobs:
    jobs = request.app[SERVICES].jobs
    assert jobs is not None, "the job API starts with the app"
    return jobs


async def _peer_import(request: web.Request) -> web.Response:
    """A leaving peer hands a job over (sdproxy.runtime.jobhandoff)."""
    services = request.app[SERVICES]
    try:
        return await import_job(_jobs_of(request), request, replica=services.replica)
    except ClientFacingError as exc:
        return error_response(exc)


async def _unknown_operational(request: web.Request) -> web.Response:
    """The /-/ prefix is the proxy's own: never forwarded to a pod."""
    return error_response(NotFound(f"no proxy endpoint {request.path}"))


async def _peer(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICES].peer_document())


async def _peer_job(request: web.Request) -> web.Response:
    """Where a caller's job waits in this replica's queue (asked by another replica)."""
    proxy = request.app[SERVICES].proxy
    found = proxy.queued_job(request.query.get("caller", "")) if proxy is not None else None
    if found is None:
        return error_response(NotFound("no queued job of that caller here"))
    return web.json_response(found)


async def _peer_cancel(request: web.Request) -> web.Response:
    proxy = request.app[SERVICES].proxy
    key = request.query.get("caller", "")
    return web.json_response({"cancelled": proxy is not None and proxy.cancel_queued_job(key)})


def _peer_discovery(settings: Settings) -> Discovery | None:
    if not settings.proxy.peer_service:
        return None
    from sdproxy.runtime.kube import KubernetesDiscovery

    # the replicas' Service port: "http" (the proxy port) or "ops" (deploy/base/sdproxy.yaml)
    own = dataclasses.replace(
        settings.discovery,
        service=settings.proxy.peer_service,
        port_name=PEER_PORT_NAME if settings.proxy.ops_listen is None else OPS_PORT_NAME,
    )
    return KubernetesDiscovery(own)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    """Ready to take traffic: discovery has reported once and we are not shutting down.
    Zero ready pods is still ready: the proxy holds requests while pods start."""
    services = request.app[SERVICES]
    if services.admission.closed:
        return web.json_response({"status": "shutting_down"}, status=503)
    if not services.synced:
        return web.json_response({"status": "discovery_not_synced"}, status=503)
    return web.json_response({"status": "ready"})


async def _status(request: web.Request) -> web.Response:
    return status_response(request, request.app[SERVICES].snapshot().to_json())


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[SERVICES].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def serve(
    settings: Settings,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    discovery: Discovery | None = None,
    scaler: Scaler | None = None,
) -> int:
    """Run ``sdproxy serve`` until SIGTERM/SIGINT (or ``stop``, whose owner then handles
    the signals: the demo runs several replicas in one process); returns the exit code."""
    setup_logging(settings.log)
    app = build_app(settings, discovery=discovery, scaler=scaler)
    services = app[SERVICES]
    # aiohttp closes a connection that has no request under way after keepalive_timeout,
    # counted from the connection's start or its last answer: a request head trickled in
    # byte by byte (slowloris) is cut then too. (aiohttp's own default is an hour.)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=settings.proxy.client_idle_timeout_s,
    )
    await runner.setup()
    metrics_runner: web.AppRunner | None = None
    ops_runner: web.AppRunner | None = None
    try:
        listen = settings.proxy.listen
        site = await listen_on(runner, listen, backlog=4096)
        metrics_runner = await _start_metrics(settings, services.metrics)
        ops_runner = await _start_ops(services)
        log.info("sdproxy %s listening on http://%s", __version__, listen)
        if stop is None:
            stop = stop_on_signals()
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down: draining %d in-flight generations", services.admission.inflight)
        # unready and no new connections; queued requests are still served (rolling
        # updates lose nothing that fits the drain time), then the rest is answered
        services.gate.close()
        await site.stop()
        await _drain(services, settings.proxy.drain_timeout_s)
    finally:
        for extra in (metrics_runner, ops_runner):
            if extra is not None:
                await extra.cleanup()
        await runner.cleanup()
    return 0


def stop_on_signals() -> asyncio.Event:
    """An event SIGTERM or SIGINT sets (serve, the gate and the demo stop on it)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def listen_on(runner: web.AppRunner, where: HostPort, *, backlog: int = 128) -> web.TCPSite:
    """Start a listener; an address in use or not ours is a configuration error."""
    site = web.TCPSite(runner, where.host, where.port, backlog=backlog)
    try:
        await site.start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    return site


async def _start_metrics(settings: Settings, metrics: Metrics) -> web.AppRunner | None:
    where = settings.proxy.metrics_listen
    if where is None:
        return None
    runner = await _start_extra(metrics_app(metrics, token=settings.proxy.ops_token), where)
    log.info("metrics on http://%s/metrics", where)
    return runner


async def _start_ops(services: Services) -> web.AppRunner | None:
    where = services.settings.proxy.ops_listen
    if where is None:
        return None
    runner = await _start_extra(build_ops_app(services), where)
    log.info("operational endpoints on http://%s/-/status", where)
    return runner


async def _start_extra(app: web.Application, where: HostPort) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await listen_on(runner, where)
    except ConfigError:
        await runner.cleanup()
        raise
    return runner


async def _drain(services: Services, timeout_s: float) -> None:
    """Serve what is queued and running until done or ``timeout_s``; then answer what
    still waits ``503 shutting_down``."""
    adm, gate = services.admission, services.gate
    deadline = services.clock() + timeout_s
    await gate.until(lambda a: not a.inflight and not len(a.queue), timeout_s=timeout_s)
    if len(adm.queue):
        log.warning("drain timeout: %d queued requests answered shutting_down", len(adm.queue))
    gate.shutdown()
    remaining = max(0.0, deadline - services.clock())
    if not await gate.until(lambda a: not a.inflight, timeout_s=remaining):
        log.warning("drain timeout: %d generations still running", adm.inflight)
    with contextlib.suppress(Exception):
        if services.proxy is not None:
            await asyncio.wait_for(services.proxy.wait_background(), timeout=5)
    if services.jobs is not None:  # results stay reachable through the other replicas
        await hand_over(services.jobs, replica=services.replica)
