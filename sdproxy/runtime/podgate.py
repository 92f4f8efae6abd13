"""Runtime: ``sdproxy gate`` — the sidecar in front of ONE sd-webui pod that makes its
limit exact whoever sends the work (any number of front replicas, direct callers).

- Heavy requests (the route table of ``serve``) take a slot of the core's ``PodGate``;
  one over the limit is answered ``503 {"error": "pod_busy"}`` with ``X-Sdproxy-Gate:
  busy`` before any byte of its body reaches sd-webui: a sender using ``Expect:
  100-continue`` (the front replicas do) is refused in the expect step and never uploads
  the body; one that sends the body anyway has it discarded, never forwarded.
- The slot is freed only when sd-webui's response has ended. When the sender's
  connection drops mid-generation (the client left, or a front replica died) the gate
  POSTs ``/sdapi/v1/interrupt`` to its sd-webui itself and frees the slot when
  sd-webui's response for that job has ended.
- ``GET /-/gate`` is the occupancy as JSON (in flight, limit, the request/replica/caller
  ids it runs, the loaded checkpoint, a version); ``GET /-/gate/events`` streams it as
  server-sent events on every change, with a comment line every ``HEARTBEAT_S`` so a
  watcher notices a silent link (a partition) within a few heartbeats.
- Light and job-bound calls pass straight through; with ``--ui`` so does the browser
  UI, its websockets relayed and its generations claimed (sdproxy.runtime.podgate_ui).
  ``/-/healthz`` answers while the gate runs; ``/-/readyz`` while its sd-webui answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from sdproxy import errors
from sdproxy.core.podgate import Claim, Occupancy, PodGate
from sdproxy.core.queue import TicketId
from sdproxy.core.routing import RouteClass, RouteTable, classify_options
from sdproxy.core.sdapi import body_keys, inspect_body
from sdproxy.runtime import forward, podgate_ui
from sdproxy.runtime.jobs import CALLER_KEYS_HEADER, new_request_id
from sdproxy.runtime.logs import setup_logging
from sdproxy.runtime.tasks import Background
from sdproxy.settings import GateOptions, GateSettings

log = logging.getLogger("sdproxy.gate")

GATE_HEADER = "X-Sdproxy-Gate"
REPLICA_HEADER = "X-Sdproxy-Replica"
EVENTS_PATH = "/-/gate/events"
HEARTBEAT_S = 1.0
#: an occupancy follower that has not taken an event for this long is dropped
WRITE_TIMEOUT_S = 3 * HEARTBEAT_S
#: how often an unreachable sd-webui is asked again
PROBE_S = 1.0
PEEK_BYTES = 256 * 1024


def occupancy_json(
    occ: Occupancy, *, now: float, upstream: str, upstream_ok: bool
) -> dict[str, Any]:
    return {
        "gate": "sdproxy",
        "version": occ.version,
        "upstream_ok": upstream_ok,
        "inflight": occ.inflight,
        "limit": occ.limit,
        "checkpoint": occ.checkpoint,
        "upstream": upstream,
        "running": [
            {
                "request_id": c.request_id,
                "replica": c.replica,
                "caller": c.caller,
                "route": c.route,
                "running_s": round(max(0.0, now - c.started_at), 3),
            }
            for c in occ.claims
        ],
    }


class _Hold:
    """One claimed slot: freed once, at the latest when its request's task ends, unless
    a background drain of an abandoned generation took it over."""

    __slots__ = ("adopted", "gate", "released", "ticket")

    def __init__(self, gate: GateServer, ticket: TicketId) -> None:
        self.gate = gate
        self.ticket = ticket
        self.released = False
        self.adopted = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.gate.core.release(self.ticket)
            self.gate.changed()

    def on_task_done(self, _task: object) -> None:
        if not self.adopted:
            self.release()


HOLD_KEY: web.RequestKey[_Hold] = web.RequestKey("sdproxy_gate_hold", _Hold)


class GateServer:
    """The gate's state and handlers (one per process)."""

    def __init__(self, config: GateOptions, *, clock: Any) -> None:
        self.config = config
        self.clock = clock
        self.core = PodGate(limit=config.max_inflight)
        self.table = RouteTable.from_strings(config.route)
        self.limit_bytes = int(config.max_body_mb * 1024 * 1024)
        self.session: aiohttp.ClientSession | None = None
        self._changed: asyncio.Future[None] | None = None
        #: sd-webui answered the last connection attempt (published: a front replica
        #: sends a pod whose sd-webui is down nothing, instead of collecting fast errors)
        self.upstream_ok = True
        self._probe: asyncio.Task[None] | None = None
        #: stopping: the occupancy streams end (their followers reconnect elsewhere)
        self.closing = False
        self._adopted: asyncio.Task[None] | None = None
        self._background = Background()

    # ---- change notification ------------------------------------------------------------

    def changed(self) -> None:
        fut, self._changed = self._changed, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _next_change(self) -> asyncio.Future[None]:
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    def occupancy(self) -> dict[str, Any]:
        return occupancy_json(
            self.core.occupancy(),
            now=self.clock(),
            upstream=self.config.upstream,
            upstream_ok=self.upstream_ok,
        )

    def _upstream_down(self) -> None:
        """A connection to sd-webui failed: say so, and probe until it answers again."""
        if self.upstream_ok:
            self.upstream_ok = False
            self.core.version += 1
            self.changed()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_upstream())

    async def _probe_upstream(self) -> None:
        while True:  # an outside process: nothing to wait on but its answer
            if await self._upstream_answers():
                break
            await asyncio.sleep(PROBE_S)
        self.upstream_ok = True
        self.core.version += 1
        self.changed()
        log.info("sd-webui at %s answers again", self.config.upstream)

    async def _upstream_answers(self) -> bool:
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout_s)
        try:
            async with self.session.get(
                self.config.upstream + "/sdapi/v1/progress", timeout=timeout
            ) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            return False
        return True

    # ---- admission ----------------------------------------------------------------------

    def _claim(
        self, request: web.Request, checkpoint: str | None = None, *, restore: bool = True
    ) -> _Hold | None:
        claim = Claim(
            request_id=request.headers.get("X-Request-Id") or new_request_id(),
            replica=request.headers.get(REPLICA_HEADER),
            caller=request.headers.get(CALLER_KEYS_HEADER),
            route=request.path,
            started_at=self.clock(),
        )
        ticket = self.core.claim(claim, checkpoint=checkpoint, restore=restore)
        if ticket is None:
            return None
        hold = _Hold(self, ticket)
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(hold.on_task_done)
        self.changed()
        return hold

    def _ui(self, request: web.Request) -> bool:
        """--ui: browser UI traffic passes through (sdproxy.runtime.podgate_ui)."""
        return self.config.ui and podgate_ui.is_ui(request.path, self.config.ui_api_prefix)

    def _is_heavy(self, request: web.Request) -> bool:
        if self._ui(request):
            return False
        route_class = self.table.classify(request.method, request.path)
        return route_class in (RouteClass.HEAVY, RouteClass.ADMIN)

    @staticmethod
    def down_response(detail: str) -> web.Response:
        body = errors.PodDown(f"this pod's sd-webui is unreachable: {detail}").body()
        return web.json_response(
            body, status=errors.PodDown.status, headers={GATE_HEADER: "upstream_down"}
        )

    @staticmethod
    def failed_response(detail: str) -> web.Response:
        body = errors.BackendError(f"sd-webui: {detail}").body()
        return web.json_response(
            body, status=errors.BackendError.status, headers={GATE_HEADER: "upstream_failed"}
        )

    @staticmethod
    def busy_response(limit: int) -> web.Response:
        body = errors.PodBusy(f"this pod runs its limit of {limit} generations").body()
        return web.json_response(
            body, status=errors.PodBusy.status, headers={GATE_HEADER: "busy", "Retry-After": "1"}
        )

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: claim the slot BEFORE the sender uploads the body."""
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text="only Expect: 100-continue is supported")
        if self._is_heavy(request) and not self.table.needs_body_to_classify(
            request.method, request.path
        ):
            hold = self._claim(request)
            if hold is None:
                return self.busy_response(self.core.limit)
            request[HOLD_KEY] = hold
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    # ---- handlers -----------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            hold = request.get(HOLD_KEY)
            if hold is not None or self._is_heavy(request):
                return await self._heavy(request, hold)
            if self._ui(request):
                return await podgate_ui.relay(self, request)
            return await self._pass(request)
        except errors.ClientFacingError as exc:
            return web.json_response(exc.body(), status=exc.status)
        except errors.ResponseBrokeOff as exc:
            if request.transport is not None:
                request.transport.close()
            response: web.StreamResponse = exc.response
            return response

    async def _heavy(self, request: web.Request, hold: _Hold | None) -> web.StreamResponse:
        body = await forward.read_prefix(
            request, peek_bytes=PEEK_BYTES, limit_bytes=self.limit_bytes
        )
        options = self.table.needs_body_to_classify(request.method, request.path)
        if options and classify_options(body_keys(body.prefix), complete=body.complete) is not (
            RouteClass.HEAVY
        ):
            return await self._pass(request, body)
        if hold is None:
            info = inspect_body(body.prefix, complete=body.complete)
            hold = self._claim(request, info.checkpoint, restore=info.restore)
            if hold is None:
                return self.busy_response(self.core.limit)
        return await self._exchange(request, body, hold)

    async def _exchange(
        self, request: web.Request, body: forward.RequestBody, hold: _Hold
    ) -> web.StreamResponse:
        assert self.session is not None
        headers = forward.upstream_headers(request, {})
        exchange = asyncio.ensure_future(
            forward.send(
                self.session,
                method=request.method,
                url=self.config.upstream + request.path_qs,
                headers=headers,
                body=body,
            )
        )
        try:
            upstream = await asyncio.shield(exchange)
        except asyncio.CancelledError:
            hold.adopted = True
            self._spawn(self._abandon(hold, exchange), name=f"gate-abandon-{hold.ticket}")
            raise
        except errors.UpstreamError as exc:
            hold.release()
            if not exc.sent:  # nothing reached sd-webui: the sender may try another pod
                self._upstream_down()
                return self.down_response(exc.detail)
            return self.failed_response(exc.detail)
        try:
            response, _sent = await forward.relay(
                request,
                upstream,
                extra_headers={GATE_HEADER: "admitted"},
                on_upstream_done=lambda _failed, _body: hold.release(),
            )
            return response
        finally:
            upstream.release()
            hold.release()

    async def _abandon(self, hold: _Hold, exchange: asyncio.Future[aiohttp.ClientResponse]) -> None:
        """The sender left mid-generation: interrupt sd-webui, free the slot when its
        response has ended (earlier, a second job would run beside the dying one)."""
        try:
            await self._interrupt()
            upstream = await exchange
            async with upstream:
                async for _ in upstream.content.iter_chunked(forward.CHUNK):
                    pass
        except Exception as exc:  # a background task: whatever ended it, free the slot
            log.info("abandoned generation ended with %r", exc)
        finally:
            hold.release()

    async def _interrupt(self) -> None:
        assert self.session is not None
        timeout_s = self.config.connect_timeout_s + 5
        if await forward.post_interrupt(self.session, self.config.upstream, timeout_s=timeout_s):
            log.info("sender gone: interrupted the generation")

    async def _pass(
        self, request: web.Request, body: forward.RequestBody | None = None
    ) -> web.StreamResponse:
        """Light and job-bound calls: straight through."""
        assert self.session is not None
        if body is None and request.can_read_body:
            body = await forward.read_prefix(
                request, peek_bytes=PEEK_BYTES, limit_bytes=self.limit_bytes
            )
        try:
            upstream = await forward.send(
                self.session,
                method=request.method,
                url=self.config.upstream + request.path_qs,
                headers=forward.upstream_headers(request, {}),
                body=body,
            )
        except errors.UpstreamError as exc:
            raise errors.BackendError(f"sd-webui: {exc.detail}") from exc
        async with upstream:
            response, _sent = await forward.relay(request, upstream, extra_headers={})
        return response

    async def gate_json(self, request: web.Request) -> web.Response:
        return web.json_response(self.occupancy(), headers={"Cache-Control": "no-store"})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The occupancy as server-sent events: at once, on every change, and a comment
        line every HEARTBEAT_S while nothing changes."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        last = -1
        try:
            while not self.closing:
                change = self._next_change()
                if self.core.version != last:
                    last = self.core.version
                    data = json.dumps(self.occupancy(), separators=(",", ":"))
                    chunk = f"event: occupancy\ndata: {data}\n\n".encode()
                else:
                    chunk = b": ping\n\n"
                # a follower that stopped reading (cut off, gone for good) is dropped
                # after a few heartbeats instead of holding this handler until TCP gives up
                await asyncio.wait_for(response.write(chunk), WRITE_TIMEOUT_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(change), HEARTBEAT_S)
        except (ConnectionError, TimeoutError) as exc:  # the follower left: expected
            log.info("a follower of the occupancy stream left: %r", exc)
            if request.transport is not None:
                request.transport.close()
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if not await self._upstream_answers():
            return web.json_response({"status": "upstream_unreachable"}, status=503)
        return web.json_response({"status": "ready"})

    async def _busy_jobs(self) -> int | None:
        """How many jobs sd-webui says it is processing (None: it does not answer)."""
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout_s)
        try:
            async with self.session.get(
                self.config.upstream + "/sdapi/v1/progress?skip_current_image=true",
                timeout=timeout,
            ) as resp:
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        state = data.get("state") if isinstance(data, dict) else None
        count = state.get("job_count") if isinstance(state, dict) else None
        return count if isinstance(count, int) else None

    async def adopt_running(self) -> None:
        """A gate that (re)starts while its sd-webui still generates (the gate container
        restarted, the pod did not) must not admit a second job beside it: the running
        job holds a slot, as an unknown claim, until sd-webui reports it idle."""
        if not await self._busy_jobs():
            return
        claim = Claim(
            request_id="running-before-the-gate-started",
            replica=None,
            caller=None,
            route="(unknown)",
            started_at=self.clock(),
        )
        ticket = self.core.claim(claim)
        if ticket is None:
            return
        log.warning("sd-webui was already generating: holding a slot until it is idle")
        self._adopted = asyncio.get_running_loop().create_task(
            self._release_when_idle(ticket), name="gate-adopted"
        )

    async def _release_when_idle(self, ticket: TicketId) -> None:
        """Free the adopted slot once sd-webui is idle (or has not answered three times
        in a row: a dead sd-webui runs nothing)."""
        silent = 0
        try:
            while silent < 3:  # an outside process: nothing to wait on but its answer
                busy = await self._busy_jobs()
                if busy == 0:
                    break
                silent = silent + 1 if busy is None else 0
                await asyncio.sleep(PROBE_S)
        finally:
            self.core.release(ticket)
            self.changed()

    def _spawn(self, coro: Any, *, name: str) -> None:
        self._background.spawn(coro, name=name)

    async def wait_background(self) -> None:
        await self._background.wait()


GATE_KEY: web.AppKey[GateServer] = web.AppKey("gate", GateServer)


def build_gate_app(config: GateOptions, *, clock: Any = time.monotonic) -> web.Application:
    gate = GateServer(config, clock=clock)
    app = web.Application(client_max_size=gate.limit_bytes)
    app[GATE_KEY] = gate
    app.router.add_get("/-/gate", gate.gate_json)
    app.router.add_get(EVENTS_PATH, gate.events)
    app.router.add_get("/-/healthz", gate.healthz)
    app.router.add_get("/-/readyz", gate.readyz)
    app.router.add_route("*", "/{tail:[\\s\\S]*}", gate.handle, expect_handler=gate.expect)
    app.cleanup_ctx.append(_session)
    return app


async def _session(app: web.Application) -> Any:
    gate = app[GATE_KEY]
    timeout = aiohttp.ClientTimeout(
        total=None, connect=gate.config.connect_timeout_s, sock_read=gate.config.backend_timeout_s
    )
    async with aiohttp.ClientSession(
        timeout=timeout,
        connector=aiohttp.TCPConnector(limit=0),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        gate.session = session
        await gate.adopt_running()  # before the gate listens: nothing slips in meanwhile
        yield
        for task in (gate._probe, gate._adopted):
            if task is not None:
                task.cancel()
        await gate.wait_background()


async def serve_gate(settings: GateSettings, *, ready: asyncio.Event | None = None) -> int:
    """Run ``sdproxy gate`` until SIGTERM/SIGINT. Running generations finish first: the
    pod is being stopped anyway, and sd-webui goes down with it."""
    # the composition root's listener and signal helpers
    from sdproxy.runtime.app import listen_on, stop_on_signals

    setup_logging(settings.log)
    app = build_gate_app(settings.gate)
    # cancellation lets the gate notice a sender that went away mid-generation
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = await listen_on(runner, settings.gate.listen, backlog=1024)
        log.info(
            "sdproxy gate on http://%s -> %s (limit %d)",
            settings.gate.listen,
            settings.gate.upstream,
            settings.gate.max_inflight,
        )
        stop = stop_on_signals()
        if ready is not None:
            ready.set()
        await stop.wait()
        await site.stop()
        app[GATE_KEY].closing = True  # end the occupancy streams: they never end by
        app[GATE_KEY].changed()  # themselves, and the runner waits for every handler
    finally:
        await runner.cleanup()
    return 0
