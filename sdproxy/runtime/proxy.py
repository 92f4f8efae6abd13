"""Runtime: the aiohttp handler that classifies, admits and forwards every client request.

heavy  -> the whole body received first (``runtime.body``: memory, then a spool file;
          --client-body-timeout-s), then a slot from the Gate (queue if none) -> pod; on
          client disconnect mid-generation the pod is told to interrupt and the slot is
          released only when its response ends
light  -> least loaded ready pod at once (retried on another pod if the connect fails)
job    -> the pod running the caller's job; answered by the proxy while it is queued
          (which job is whose, and who may reach it: sdproxy.runtime.jobs)
admin  -> 403 unless --allow-admin (then treated as heavy)
Errors answer ``{"error": code, "detail": text}`` with the status from sdproxy.errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from sdproxy import errors
from sdproxy.core.admission import Job, TicketId
from sdproxy.core.cost import estimate_steps
from sdproxy.core.effects import InterruptReason, Outcome
from sdproxy.core.limits import check_request
from sdproxy.core.pods import PodId
from sdproxy.core.queue import Priority
from sdproxy.core.routing import RouteClass, RouteTable, classify_options, parse_rule
from sdproxy.core.sdapi import BodyInfo, body_keys, inspect_body
from sdproxy.errors import UpstreamKind
from sdproxy.runtime import body as bodies
from sdproxy.runtime import forward, websocket
from sdproxy.runtime.gate import Gate, Slot
from sdproxy.runtime.gatewatch import GateWatch
from sdproxy.runtime.jobs import (
    CALLER_KEYS_HEADER,
    JOB_HEADER,
    JOB_ID,
    Caller,
    JobIndex,
    caller_keys_header,
    identify,
    new_request_id,
    new_token,
    set_cookie,
)
from sdproxy.runtime.logs import AccessRecord, access_log_enabled, log_access
from sdproxy.runtime.metrics import Metrics
from sdproxy.runtime.peers import Peers
from sdproxy.runtime.podgate import GATE_HEADER, REPLICA_HEADER
from sdproxy.runtime.tasks import Background
from sdproxy.runtime.tenants import (
    COST_HEADER,
    KEY_HEADER,
    Tenants,
    deadline_of,
    priority_of,
)
from sdproxy.runtime.ui import UiFront, ui_cookie_header
from sdproxy.runtime.ui import classify as ui_classify

if TYPE_CHECKING:
    from sdproxy.runtime.jobapi import AsyncJobs
from sdproxy.settings import ProxySettings

log = logging.getLogger("sdproxy.proxy")

PEEK_BYTES = 256 * 1024  # enough for any txt2img body; img2img blobs are streamed past it
LIGHT_ATTEMPTS = 3
#: heavy bodies above this go to gated pods with Expect: 100-continue (img2img uploads)
EXPECT_OVER_BYTES = 64 * 1024
#: the status logged for a request whose client left before its answer (nginx's 499)
CLIENT_CLOSED = 499
#: Retry-After of 429 client_quota: a queued job of the caller may have started by then
QUOTA_RETRY_S = 5.0
#: sd-webui's CUDA out-of-memory answer: a 500 whose body names the exception
#: (modules/api/api.py api_error -> {"error": "OutOfMemoryError", ...})
OOM_MARK = b"OutOfMemoryError"


def outcome_of(status: int, body: bytes | None) -> tuple[Outcome, str | None]:
    """How a heavy exchange the pod answered in full ended, and the request-fault kind
    (``sdproxy_request_faults_total{kind}``) if it was the request's fault: CUDA out of
    memory (a 500 naming OutOfMemoryError: the request is too large for the GPU) or a 422
    (its fields are invalid). Any other 5xx is the pod's (outlier ejection counts it)."""
    if status == 422:
        return Outcome.REQUEST_FAULT, "invalid"
    if status >= 500:
        if body is not None and OOM_MARK in body:
            return Outcome.REQUEST_FAULT, "oom"
        return Outcome.POD_ERROR, None
    return Outcome.COMPLETED, None


@dataclass(kw_only=True, slots=True)
class Exchange:
    """Bookkeeping for one request, filled in as it goes (for the access log)."""

    request_id: str
    caller: Caller
    route_class: RouteClass
    started: float
    pod: str | None = None
    queue_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    status: int = 0
    error: str | None = None
    #: a relayed head went (or is going) to the client: no error response can follow
    answering: bool = False
    #: a heavy request's job: its id (X-Sdproxy-Job) and the keys it is indexed under
    job_id: str | None = None
    job_keys: list[str] | None = None
    #: its estimated GPU-seconds on the pod it was bound to (X-Sdproxy-Cost-S)
    cost_s: float | None = None
    #: --ui: the Set-Cookie of a session opened or adopted by this request
    ui_cookie: str | None = None
    #: submitted as an asynchronous job (/-/jobs/..., Prefer: respond-async)
    async_job: bool = False

    def before_prepare(self, response: web.StreamResponse) -> None:
        """A relayed response's head is sent before ``_finish``: give a new caller its
        cookie there (its later progress polls find its job by it)."""
        self.answering = True
        set_cookie(response, self.caller)
        if self.ui_cookie is not None:
            response.headers.add("Set-Cookie", self.ui_cookie)


def clean_path(path: str) -> bool:
    """No dot or empty segments: the pod would normalise them (``/x/../server-kill`` is
    ``/server-kill`` to it) after the proxy classified the raw path — an admin bypass.
    No control characters either (a decoded %0A, %00): no sd-webui route has them."""
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return False
    segments = path.split("/")[1:]
    return all(seg not in (".", "..") for seg in segments) and "" not in segments[:-1]


def error_response(exc: errors.ClientFacingError, ex: Exchange | None = None) -> web.Response:
    headers = {"X-Request-Id": ex.request_id} if ex else {}
    if ex is not None and ex.pod is not None:
        headers["X-Sdproxy-Pod"] = ex.pod
    if ex is not None and ex.job_id is not None:
        headers[JOB_HEADER] = ex.job_id
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    if ex is not None:
        ex.error = exc.code
    return web.json_response(exc.body(), status=exc.status, headers=headers)


class Proxy:
    """Forwards client requests to pods under the admission rules."""

    def __init__(
        self,
        *,
        settings: ProxySettings,
        gate: Gate,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        clock: Callable[[], float],
        replica: str = "",
        light_timeout_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.replica = replica
        self.light_timeout_s = light_timeout_s
        #: set by the composition root once the app runs (gates' occupancy, peers)
        self.gatewatch: GateWatch | None = None
        self.peers: Peers | None = None
        self.gate = gate
        self.session = session
        self.metrics = metrics
        self.clock = clock
        self.table = RouteTable.from_strings(settings.route)
        self.tenants = Tenants(settings.tenants)
        self.jobs = JobIndex()
        #: the asynchronous job API (set by the composition root)
        self.async_jobs: AsyncJobs | None = None
        self.limit_bytes = int(settings.max_body_mb * 1024 * 1024)
        self.spool_budget = bodies.SpoolBudget(int(settings.spool_max_mb * 1024 * 1024))
        self._background = Background()
        #: --ui: browser sessions bound to pods (sdproxy.runtime.ui)
        self.ui = (
            UiFront(
                config=settings.ui,
                gate=gate,
                metrics=metrics,
                clock=clock,
                api_prefixes=[
                    p for p in (parse_rule(rule).prefix for rule in settings.route) if p != "/"
                ],
            )
            if settings.ui.ui
            else None
        )

    # ---- entry ------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        caller = identify(request, by_address=self.settings.address_identity)
        ex = Exchange(
            request_id=request.headers.get("X-Request-Id") or new_request_id(),
            caller=caller,
            route_class=self.table.classify(request.method, request.path),
            started=self.clock(),
            async_job=wants_async(request),
        )
        response: web.StreamResponse | None = None
        malformed = False
        try:
            if not clean_path(request.path):
                raise errors.BadRequest(
                    "paths with '.', '..', empty segments or control characters are "
                    "refused: the proxy must classify the path the pod will route"
                )
            ex.caller = self.with_tenant(request, caller)
            response = await self._route(request, ex)
        except errors.BodyTimeout as exc:
            response = error_response(exc, ex)
            # no keep-alive: aiohttp reads (and drops) what still comes for a while, then
            # closes; closing at once could reset the connection before the 408 is read
            response.force_close()
        except errors.MalformedBody as exc:
            response = error_response(exc, ex)
            response.force_close()
            malformed = True
        except errors.ClientFacingError as exc:
            response = error_response(exc, ex)
        except errors.ResponseBrokeOff as exc:
            response = self._broke_off(request, ex, exc)
        except web.HTTPRequestEntityTooLarge:
            response = error_response(errors.BodyTooLarge("request body too large"), ex)
        except asyncio.CancelledError:
            raise  # the client went away (handler cancellation): nothing to answer
        except ConnectionError as exc:
            # the client's connection broke while we wrote to it: nothing to answer, and
            # nothing to log as an error (aiohttp would log a traceback for a re-raise);
            # this placeholder's own write fails quietly in aiohttp's finish_response
            log.debug("client of %s %s went away: %r", request.method, request.path, exc)
            response = web.Response(status=CLIENT_CLOSED)
        except Exception as exc:
            if ex.answering:
                raise
            log.exception("unexpected error answering %s %s", request.method, request.path)
            response = error_response(errors.InternalError(f"internal error: {exc!r}"), ex)
        finally:
            self._finish(request, ex, response)
        if malformed:
            await _answer_and_close(request, response)
        return response

    def _broke_off(
        self, request: web.Request, ex: Exchange, exc: errors.ResponseBrokeOff
    ) -> web.StreamResponse:
        """Too late for a JSON error: cut the client's connection so the truncation shows."""
        log.warning("pod %s: %s", ex.pod, exc.detail)
        ex.error = errors.BackendError.code
        self.metrics.backend_error(pod=ex.pod or "unknown", kind=exc.kind)
        if request.transport is not None:
            request.transport.close()
        response: web.StreamResponse = exc.response
        return response

    def _route(self, request: web.Request, ex: Exchange) -> Awaitable[web.StreamResponse]:
        """The coroutine that answers, returned rather than awaited here: one frame less
        for the event loop to step through on every resume (bench overhead profile)."""
        if self.ui is not None and self.ui.is_ui(request.path):
            return self._ui(request, ex, self.ui)
        if self.table.needs_body_to_classify(request.method, request.path):
            return self._route_by_body(request, ex)
        return self._dispatch(request, ex, None)

    async def _route_by_body(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        async with self._body_deadline(ex):
            body = await forward.read_prefix(
                request, peek_bytes=PEEK_BYTES, limit_bytes=self.limit_bytes
            )
        ex.route_class = classify_options(body_keys(body.prefix), complete=body.complete)
        return await self._dispatch(request, ex, body)

    def _dispatch(
        self, request: web.Request, ex: Exchange, body: forward.RequestBody | None
    ) -> Awaitable[web.StreamResponse]:
        if ex.async_job and ex.route_class is not RouteClass.HEAVY:
            raise errors.NotAJob(
                f"{request.method} {request.path} is a {ex.route_class.value} route; "
                "only heavy (generation) routes can be submitted as jobs"
            )
        if ex.route_class is RouteClass.ADMIN and not self.settings.allow_admin:
            raise errors.Forbidden(
                f"{request.method} {request.path} is unsafe while generations run; "
                "start the proxy with --allow-admin to forward it"
            )
        if ex.route_class in (RouteClass.HEAVY, RouteClass.ADMIN):
            return self._heavy(request, ex, body)
        if ex.route_class is RouteClass.JOB:
            return self._job_bound(request, ex)
        return self._light(request, ex, body)

    def _finish(
        self, request: web.Request, ex: Exchange, response: web.StreamResponse | None
    ) -> None:
        status = response.status if response is not None else CLIENT_CLOSED
        duration = self.clock() - ex.started
        if response is not None and not response.prepared:
            response.headers["X-Request-Id"] = ex.request_id
            set_cookie(response, ex.caller)
        self.metrics.observe_request(
            route_class=ex.route_class.value, code=status, duration_s=duration
        )
        if access_log_enabled():
            self._log_access(request, ex, status=status, duration=duration)

    @staticmethod
    def _log_access(request: web.Request, ex: Exchange, *, status: int, duration: float) -> None:
        log_access(
            AccessRecord(
                request_id=ex.request_id,
                client_id=ex.caller.id,
                method=request.method,
                path=request.path,
                route_class=ex.route_class.value,
                pod=ex.pod,
                queue_ms=round(ex.queue_ms, 1),
                duration_ms=round(duration * 1000, 1),
                status=status,
                bytes_in=ex.bytes_in or (request.content_length or 0),
                bytes_out=ex.bytes_out,
                error=ex.error,
                tenant=ex.caller.tenant or None,
                cost_s=None if ex.cost_s is None else round(ex.cost_s, 2),
            )
        )

    # ---- heavy ------------------------------------------------------------------------

    async def _heavy(
        self, request: web.Request, ex: Exchange, prefix: forward.RequestBody | None
    ) -> web.StreamResponse:
        """Check what the body's first bytes say, receive the whole body, then queue: a
        slot never waits for a client's upload (a stalled or slow one kept a GPU idle),
        and a body at hand can go again to another pod when a gate answers pod_busy."""
        length = request.content_length
        if length is not None and length > bodies.MEMORY_BYTES:
            with self._counted_refusal():
                self.spool_budget.check(length)  # refused before a byte of it is read
        if prefix is None:
            async with self._body_deadline(ex):
                prefix = await forward.read_prefix(
                    request, peek_bytes=PEEK_BYTES, limit_bytes=self.limit_bytes
                )
        info = inspect_body(prefix.prefix, complete=prefix.complete)
        priority = priority_of(request.headers)  # 400 before the body is uploaded
        deadline_s = deadline_of(request.headers)
        self._check_admissible(request, ex, info)  # before a refused body is uploaded
        body = await self._receive(request, ex, prefix)
        try:
            # again: the caller's queue may have filled while this body uploaded
            self._check_admissible(request, ex, info)
            if ex.async_job and self.async_jobs is not None:
                return await self.async_jobs.submit(request, ex, body, info)
            if deadline_s is not None:  # it counts from arrival: the upload took some
                deadline_s -= self.clock() - ex.started
            job = self.new_job(
                request.path,
                info,
                tenant=ex.caller.tenant,
                priority=priority,
                deadline_s=deadline_s,
            )
            ex.job_id = ex.caller.job or new_token()
            ex.job_keys = self.jobs.add(ex.caller, job.ticket, job_id=ex.job_id, route=request.path)
            try:
                slot = await self.gate.acquire(job)
                self.metrics.observe_queue_wait(slot.dispatch.queued_s)
                ex.queue_ms = slot.dispatch.queued_s * 1000
                upstream, slot, failed = await self.bind_exchange(
                    ex,
                    body,
                    slot,
                    lambda url, expect: self._send(request, ex, url, body, expect100=expect),
                )
                return await self._relay_heavy(request, ex, upstream, slot, pod_failed=failed)
            finally:
                self.jobs.remove(job.ticket)
        finally:
            if not body.adopted:  # else the abandoned exchange still sends it
                body.close()

    async def _receive(
        self, request: web.Request, ex: Exchange, prefix: forward.RequestBody
    ) -> bodies.ReceivedBody:
        async with self._body_deadline(ex):
            with self._counted_refusal():
                body = await bodies.receive(
                    request,
                    prefix=prefix.prefix,
                    complete=prefix.complete,
                    limit_bytes=self.limit_bytes,
                    budget=self.spool_budget,
                )
        ex.bytes_in = body.size
        return body

    @contextlib.contextmanager
    def _counted_refusal(self) -> Iterator[None]:
        """A body the spool budget cannot hold is counted in sdproxy_rejected_total."""
        try:
            yield
        except errors.SpoolFull as exc:
            self.metrics.refused(exc)
            raise

    @contextlib.asynccontextmanager
    async def _body_deadline(self, ex: Exchange) -> AsyncIterator[None]:
        """The client's upload must be whole within --client-body-timeout-s of its
        request's arrival: a total, so a trickle of bytes cannot keep it open."""
        limit = self.settings.client_body_timeout_s
        try:
            async with asyncio.timeout(max(0.0, ex.started + limit - self.clock())):
                yield
        except TimeoutError as exc:
            raise errors.BodyTimeout(f"the request body did not arrive within {limit:g} s") from exc

    def _check_admissible(self, request: web.Request, ex: Exchange, info: BodyInfo) -> None:
        """Refuse a heavy request before it takes a queue place: a guessable job id it
        proposes (400), a body over the request bounds (422), a caller whose queued jobs
        are at --max-queued-per-client (429; running ones do not count)."""
        proposed = ex.caller.job
        if proposed is not None and not JOB_ID.fullmatch(proposed):
            raise errors.BadRequest(
                f"{JOB_HEADER} must be 16 to 128 characters of A-Z a-z 0-9 _ - (a random id)"
            )
        route = request.path.rsplit("/", 1)[-1]
        excess = check_request(info.fields, route=route, limits=self.settings.limits)
        refusal: errors.ClientQuota | errors.RequestTooLarge | None = None
        if excess is not None:
            refusal = errors.RequestTooLarge(excess.detail, field=excess.field, limit=excess.limit)
        cap = self.settings.max_queued_per_client
        if refusal is None and cap and self.queued_of(ex.caller) >= cap:
            refusal = errors.ClientQuota(
                f"{cap} requests of this caller already wait in the queue "
                "(--max-queued-per-client); retry when one has started",
                retry_after_s=QUOTA_RETRY_S,
            )
        if refusal is not None:
            self.metrics.refused(refusal)
            raise refusal

    def queued_of(self, caller: Caller) -> int:
        """How many of the caller's jobs wait in this replica's queue."""
        return sum(1 for t in self.jobs.owned(caller) if self.gate.admission.is_queued(t))

    def new_job(
        self,
        path: str,
        info: BodyInfo,
        *,
        tenant: str = "",
        priority: int = Priority.NORMAL,
        deadline_s: float | None = None,
    ) -> Job:
        """The admission ticket of a heavy request (sent now, or an asynchronous job):
        its cost, checkpoint (and whether sd-webui restores the default after it),
        tenant, priority and own deadline."""
        return Job(
            ticket=self.gate.new_ticket(),
            enqueued_at=self.clock(),
            cost=estimate_steps(info.fields, route=path.rsplit("/", 1)[-1]),
            checkpoint=info.checkpoint,
            restore=info.restore,
            priority=priority,
            tenant=tenant,
            deadline_s=deadline_s,
        )

    def with_tenant(self, request: web.Request, caller: Caller) -> Caller:
        """``caller`` scoped to its tenant (by key: 401 without a known one; by header)."""
        tenant = self.tenants.tenant_of(request.headers)
        return dataclasses.replace(caller, tenant=tenant) if tenant else caller

    def strip_tenant_key(self, request: web.Request, headers: CIMultiDict[str]) -> None:
        """A tenant's API key is not the pod's business (nor the job store's)."""
        headers.popall(KEY_HEADER, None)
        if self.tenants.strips_authorization(request.headers):
            headers.popall("Authorization", None)

    async def bind_exchange(
        self,
        ex: Exchange,
        body: bodies.ReceivedBody,
        slot: Slot,
        send: Callable[[str, bool], Coroutine[Any, Any, aiohttp.ClientResponse]],
    ) -> tuple[aiohttp.ClientResponse, Slot, bool]:
        """Send (``send(pod_url, expect100)``) to the bound pod until one answers;
        retry elsewhere only if nothing reached it. Returns the pod's answer (its head),
        the slot it holds, and whether the pod's gate says sd-webui broke the exchange.
        A way out without an answer frees the slot through ``slot.release``; a
        cancellation (client gone, job cancelled) interrupts the pod (``_abandon``)."""
        while True:
            ex.pod = slot.pod_id
            # a large body goes to a pod behind a gate with Expect: 100-continue, so a pod
            # another replica just filled refuses before the body is uploaded; a small one
            # goes at once (one round trip less per job): a gate refuses it all the same
            # before anything reaches sd-webui
            expect = self._gated(slot.pod_id) and body.size > EXPECT_OVER_BYTES
            exchange = asyncio.ensure_future(send(slot.url, expect))
            try:
                upstream = await asyncio.shield(exchange)
            except asyncio.CancelledError:
                self._abandon(slot, exchange, body)
                raise
            except errors.UpstreamError as exc:
                self.metrics.backend_error(pod=slot.pod_id, kind=exc.kind)
                if exc.sent:
                    # the pod broke the exchange: FAILED rests it briefly (it may be
                    # restarting) rather than hand it the next job as the most recently used
                    slot.release(Outcome.FAILED)
                    raise errors.BackendError(f"pod {slot.pod_id}: {exc.detail}") from exc
                log.warning("pod %s refused: %s; retrying elsewhere", slot.pod_id, exc.detail)
                slot = await slot.refused()
                continue
            except BaseException:
                slot.release(Outcome.FAILED)
                raise
            verdict = upstream.headers.get(GATE_HEADER)
            if upstream.status == 503 and verdict in ("busy", "upstream_down"):
                upstream.close()  # its body may be unsent: the connection is not reusable
                # the whole body is here: it goes again, to whichever pod frees next
                # busy: another replica won the slot, back to the head of the queue;
                # upstream_down: nothing reached sd-webui, rest the pod and try another
                slot = await (slot.busy() if verdict == "busy" else slot.refused())
                continue
            return upstream, slot, verdict == "upstream_failed"

    def _gated(self, pod_id: str) -> bool:
        pod = self.gate.admission.pods.get(PodId(pod_id))
        return pod is not None and pod.gated

    async def _relay_heavy(
        self,
        request: web.Request,
        ex: Exchange,
        upstream: aiohttp.ClientResponse,
        slot: Slot,
        *,
        pod_failed: bool = False,
    ) -> web.StreamResponse:
        """Relay the pod's answer; ``pod_failed``: its gate says sd-webui broke the
        exchange (the 502 goes to the client, the pod counts an error and rests)."""
        ex.cost_s = slot.dispatch.cost_s
        extra = {
            "X-Sdproxy-Pod": slot.pod_id,
            "X-Sdproxy-Queue-Ms": f"{slot.dispatch.queued_s * 1000:.0f}",
            "X-Request-Id": ex.request_id,
            JOB_HEADER: ex.job_id or "",
            COST_HEADER: f"{slot.dispatch.cost_s:.2f}",
        }

        def pod_done(failed: bool, body: bytes | None) -> None:
            """The pod has sent its whole answer (or broke off): the slot is free now;
            a small answer is at hand whole (an error's body says whose fault it was)."""
            if failed or pod_failed:
                slot.release(Outcome.FAILED)
                return
            outcome, fault = outcome_of(upstream.status, body)
            if fault is not None and not slot.released:
                self.metrics.request_fault(fault)
            slot.release(outcome)

        try:
            response, ex.bytes_out = await forward.relay(
                request,
                upstream,
                extra_headers=extra,
                before_prepare=ex.before_prepare,
                on_upstream_done=pod_done,
            )
            return response
        finally:
            upstream.release()
            # relaying never started (client gone at once): the pod answered, it is done
            slot.release(Outcome.FAILED if pod_failed else outcome_of(upstream.status, None)[0])

    def _abandon(
        self,
        slot: Slot,
        exchange: asyncio.Future[aiohttp.ClientResponse],
        body: bodies.ReceivedBody,
    ) -> None:
        """The client left. Before its body's first byte went (a gated pod that has not
        sent ``100 Continue``) the pod runs nothing of it: drop the exchange, free the
        slot. Behind a gate: drop the exchange too — the gate interrupts its sd-webui
        itself when our connection closes, and holds its slot until that job ended (an
        interrupt sent from here could reach sd-webui while it runs ANOTHER sender's job,
        the gate having refused ours). Else mid-generation: interrupt the pod, keep the
        slot until the pod's response has ended (releasing earlier would put two jobs on
        one pod)."""
        if not body.started or self._gated(slot.pod_id):
            exchange.cancel()
            exchange.add_done_callback(_close_dropped)
            if body.started:  # the gate interrupts it for us
                self.metrics.interrupt(InterruptReason.CLIENT_GONE)
            slot.release(Outcome.INTERRUPTED if body.started else Outcome.UNUSED)
            return
        self.metrics.interrupt(InterruptReason.CLIENT_GONE)
        body.adopted = True  # the exchange may still be sending it
        self.spawn(self._finish_abandoned(slot, exchange, body), name=f"abandon-{slot.ticket}")

    async def _finish_abandoned(
        self,
        slot: Slot,
        exchange: asyncio.Future[aiohttp.ClientResponse],
        body: bodies.ReceivedBody,
    ) -> None:
        outcome = Outcome.INTERRUPTED  # not a completion, and no sample for the ETA
        try:
            await self._post_interrupt(slot.url)
            upstream = await exchange
            async with upstream:
                async for _ in upstream.content.iter_chunked(forward.CHUNK):
                    pass  # drain: the pod is done only when its response is
        except Exception as exc:  # a background task: whatever ended it, free the slot
            outcome = Outcome.FAILED
            log.info("abandoned job on %s ended with %r", slot.pod_id, exc)
        finally:
            body.close()
            slot.release(outcome)

    async def _post_interrupt(self, base_url: str) -> None:
        timeout_s = self.settings.connect_timeout_s + 5
        await forward.post_interrupt(self.session, base_url, timeout_s=timeout_s)

    def spawn(self, coro: Any, *, name: str) -> None:
        self._background.spawn(coro, name=name)

    async def wait_background(self) -> None:
        await self._background.wait()

    def _send(
        self,
        request: web.Request,
        ex: Exchange,
        base_url: str,
        body: forward.RequestBody | bodies.ReceivedBody | bytes | None,
        *,
        expect100: bool = False,
    ) -> Coroutine[Any, Any, aiohttp.ClientResponse]:
        """The client's request, as it goes to the pod at ``base_url`` (naming this replica
        and the caller, for the pod's gate)."""
        headers = forward.upstream_headers(request, self.upstream_extra(ex))
        self.strip_tenant_key(request, headers)
        url = base_url + request.path_qs
        return forward.send(
            self.session,
            method=request.method,
            url=url,
            headers=headers,
            body=body,
            expect100=expect100,
            continue_timeout_s=self.settings.connect_timeout_s,
        )

    def upstream_extra(self, ex: Exchange) -> dict[str, str]:
        """What the proxy adds to a request to a pod: this replica and the caller's
        keys (for the pod's gate)."""
        return {
            "X-Request-Id": ex.request_id,
            REPLICA_HEADER: self.replica,
            CALLER_KEYS_HEADER: caller_keys_header(ex.job_keys or ex.caller.keys),
        }

    async def _answer_from(
        self, request: web.Request, ex: Exchange, pod_id: str, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """Relay a light or job-bound answer (no slot to free)."""
        async with upstream:
            response, ex.bytes_out = await forward.relay(
                request,
                upstream,
                extra_headers={"X-Request-Id": ex.request_id, "X-Sdproxy-Pod": pod_id},
                before_prepare=ex.before_prepare,
            )
        return response

    # ---- browser UI (--ui) ------------------------------------------------------------

    async def _ui(self, request: web.Request, ex: Exchange, ui: UiFront) -> web.StreamResponse:
        """A UI request goes to its session's pod, never through the queue: the pod is
        held for the session (sdproxy.runtime.ui); websockets are relayed frame by frame."""
        ex.route_class = ui_classify(request.method, request.path)
        target = ui.resolve(request)
        if isinstance(target, web.StreamResponse):
            return target
        ex.pod = target.pod_id
        if target.cookie is not None:
            ex.ui_cookie = ui_cookie_header(request, target.cookie)
        with ui.in_use(target.sid):
            if websocket.is_upgrade(request):
                headers = forward.upstream_headers(request, {"X-Request-Id": ex.request_id})
                self.strip_tenant_key(request, headers)
                ex.answering = True
                with ui.ending(target.sid) as ended:
                    return await websocket.relay(
                        request,
                        self.session,
                        url=target.url + request.path_qs,
                        headers=headers,
                        max_msg_size=self.limit_bytes,
                        heartbeat_s=ui.heartbeat_s,
                        until=ended,
                    )
            body = None
            if request.can_read_body:  # streamed on past its first bytes, never held whole
                body = await forward.read_prefix(
                    request, peek_bytes=PEEK_BYTES, limit_bytes=self.limit_bytes
                )
            try:
                upstream = await self._send(request, ex, target.url, body)
            except errors.UpstreamError as exc:
                self.metrics.backend_error(pod=target.pod_id, kind=exc.kind)
                raise errors.BackendError(f"pod {target.pod_id}: {exc.detail}") from exc
            return await self._answer_from(request, ex, target.pod_id, upstream)

    # ---- light ------------------------------------------------------------------------

    async def _light(
        self, request: web.Request, ex: Exchange, body: forward.RequestBody | None
    ) -> web.StreamResponse:
        if body is None and request.can_read_body:
            body = await forward.read_prefix(
                request, peek_bytes=PEEK_BYTES, limit_bytes=self.limit_bytes
            )
        tried: list[Any] = []
        for _ in range(LIGHT_ATTEMPTS):
            pod = self.gate.pick_light(exclude=tried)
            if pod is None:
                break
            tried.append(pod.pod_id)
            ex.pod = pod.pod_id
            try:
                upstream = await self._send_light(request, ex, pod.pod_id, pod.url, body)
            except errors.UpstreamError as exc:
                self.metrics.backend_error(pod=pod.pod_id, kind=exc.kind)
                replayable = body is None or body.retryable
                # a light call has no side effect: one a pod sat on may go elsewhere too
                if not replayable or (exc.sent and exc.kind is not UpstreamKind.TIMEOUT):
                    raise errors.BackendError(f"pod {pod.pod_id}: {exc.detail}") from exc
                self.gate.eject(pod.pod_id)
                continue
            return await self._answer_from(request, ex, pod.pod_id, upstream)
        raise errors.NoBackends("no ready sd-webui pod to answer", retry_after_s=5)

    # ---- job-bound --------------------------------------------------------------------

    async def _job_bound(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        """The caller's job: running here -> its pod; queued here -> answered here; else,
        with peers: running on a gated pod (its gate names the caller) -> that pod;
        queued at another replica -> answered with what that replica says."""
        ticket = self.jobs.find(ex.caller)
        running = self.gate.admission.running(ticket) if ticket is not None else None
        if running is not None:
            return await self._to_job_pod(request, ex, running.pod_id, running.url)
        queued = ticket is not None and self.gate.admission.is_queued(ticket)
        if not queued:
            elsewhere = await self._job_elsewhere(request, ex)
            if elsewhere is not None:
                return elsewhere
        if request.path.endswith("/progress"):
            return web.json_response(self.progress(ticket if queued else None))
        if request.path.endswith("/interrupt") and queued and ticket is not None:
            self.gate.cancel_queued(ticket)  # counted as rejected{job_cancelled}
        return web.json_response({})  # sd-webui answers {} (modules/api/api.py interruptapi)

    async def _send_light(
        self,
        request: web.Request,
        ex: Exchange,
        pod_id: str,
        url: str,
        body: forward.RequestBody | bytes | None,
    ) -> aiohttp.ClientResponse:
        """Send a light or job-bound call; a pod that has not begun to answer within
        --light-timeout-s is ejected (it hangs: health checks will confirm)."""
        try:
            return await asyncio.wait_for(self._send(request, ex, url, body), self.light_timeout_s)
        except TimeoutError as exc:
            self.gate.eject(PodId(pod_id))
            raise errors.UpstreamTimeout(
                f"{url} did not begin to answer within {self.light_timeout_s:g} s", sent=True
            ) from exc

    async def _to_job_pod(
        self, request: web.Request, ex: Exchange, pod_id: str, url: str
    ) -> web.StreamResponse:
        ex.pod = pod_id
        body = await request.read() if request.can_read_body else None
        try:
            upstream = await self._send_light(request, ex, pod_id, url, body)
        except errors.UpstreamError as exc:
            self.metrics.backend_error(pod=pod_id, kind=exc.kind)
            raise errors.BackendError(f"pod {pod_id}: {exc.detail}") from exc
        if request.path.endswith("/interrupt"):
            self.metrics.interrupt(InterruptReason.USER)
        return await self._answer_from(request, ex, pod_id, upstream)

    async def _job_elsewhere(self, request: web.Request, ex: Exchange) -> web.StreamResponse | None:
        # the newest job first, as locally: one still queued at a peer is newer than one
        # already running
        key = ex.caller.own_key
        if key is None:
            return None  # no identity, and the address identifies nobody
        if self.peers is not None and self.peers.live():
            if request.path.endswith("/interrupt") and await self.peers.cancel_queued(key):
                return web.json_response({})
            if request.path.endswith("/progress"):
                info = await self.peers.find_queued(key)
                if info is not None:
                    eta = float(info["eta_s"])
                    return web.json_response(
                        progress_document(info["position"], info["depth"], eta)
                    )
        pod_id = self.gatewatch.find_caller(key) if self.gatewatch is not None else None
        pod = self.gate.admission.pods.get(pod_id) if pod_id is not None else None
        if pod is not None:
            return await self._to_job_pod(request, ex, pod.pod_id, pod.url)
        return None

    def queued_job(self, key: str) -> dict[str, Any] | None:
        """For a peer: where the caller matched by ``key`` waits in this replica's queue."""
        ticket = self.jobs.find_key(key)
        adm = self.gate.admission
        if ticket is None or not adm.is_queued(ticket):
            return None
        return {
            "position": adm.position(ticket),
            "depth": len(adm.queue),
            "eta_s": round(adm.eta_s(ticket), 2),
        }

    def cancel_queued_job(self, key: str) -> bool:
        ticket = self.jobs.find_key(key)
        return ticket is not None and self.gate.cancel_queued(ticket)

    def progress(self, ticket: TicketId | None) -> dict[str, Any]:
        """sd-webui's ProgressResponse shape, for a job still queued in the proxy."""
        adm = self.gate.admission
        position = adm.position(ticket) if ticket is not None else None
        eta = adm.eta_s(ticket) if ticket is not None else 0.0
        return progress_document(position, len(adm.queue), eta)


async def _answer_and_close(request: web.Request, response: web.StreamResponse) -> None:
    """Send the answer, then close: the rest of a malformed body cannot be read, and
    aiohttp's lingering read of it would only log the parse error again."""
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # the transport sends what it holds, then closes


def _close_dropped(exchange: asyncio.Future[aiohttp.ClientResponse]) -> None:
    """A dropped exchange's end: a response that came anyway is closed, unread."""
    if not exchange.cancelled() and exchange.exception() is None:
        exchange.result().close()


def progress_document(position: int | None, depth: int, eta: float) -> dict[str, Any]:
    """sd-webui's ProgressResponse shape for a job queued in sdproxy (or none)."""
    text = f"Queued in sdproxy: position {position} of {depth}" if position is not None else None
    return {
        "progress": 0.0,
        "eta_relative": round(eta, 2),
        "state": {
            "skipped": False,
            "interrupted": False,
            "job": "queued" if position is not None else "",
            "job_count": 0,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": 0,
        },
        "current_image": None,
        "textinfo": text,
        "sdproxy": {
            "queued": position is not None,
            "queue_position": position,
            "queue_depth": depth,
            "eta_s": round(eta, 2),
        },
    }


#: set on a request routed from /-/jobs/<path> (the path itself is then <path>)
ASYNC_KEY = web.RequestKey("sdproxy_async_job", bool)


def wants_async(request: web.Request) -> bool:
    """Sent to /-/jobs/<path>, or with ``Prefer: respond-async`` (RFC 7240 §4.1)."""
    if request.get(ASYNC_KEY):
        return True
    prefer = request.headers.get("Prefer")
    return prefer is not None and any(
        p.split(";", 1)[0].strip().lower() == "respond-async" for p in prefer.split(",")
    )


def json_body(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()
