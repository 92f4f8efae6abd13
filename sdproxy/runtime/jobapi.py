"""Runtime: the asynchronous job API's HTTP surface (``/-/jobs``) and its retention.

    POST   /-/jobs/<sd-webui path>   (or the path with Prefer: respond-async) -> 202
    GET    /-/jobs/{id}              the status document (synchronous jobs too, while held)
    GET    /-/jobs/{id}/result       what the synchronous call would have answered;
                                     ?wait=S long-polls; 409 before, 410 after retention
    DELETE /-/jobs/{id}              cancel: out of the queue, or the pod interrupted
    GET    /-/jobs                   the caller's jobs, newest first (status, tenant,
                                     limit, cursor)

Who may do what (README "Who can reach a job"): a job's id is its capability — 96
random bits, answered only to its submitter — so ``GET``/``DELETE``/``result`` by id work
for whoever holds it, from any replica. The list shows only the caller's own jobs
(``Caller.quota_key``: its X-Sdproxy-Client, cookie, else address), and an
``Idempotency-Key`` is scoped to that same caller.

A replica asked about an id it does not hold asks its live peers — the same request at
their ``/-/peer/jobs/{id}…`` (operational endpoints: on ``--ops-listen`` when set, behind
``--ops-token``), which answer from what they hold and never ask further — and relays the
first answer that is not a 404 (``_from_peers``). Retention: a finished job's result is
kept ``--jobs-ttl-s``, then it is deleted and the id answers ``410 job_expired`` for as
long again (then 404); past ``--jobs-max-mb`` the oldest finished results go first. The
sweeper runs every ``sweep_s`` and after every finished job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sdproxy import errors
from sdproxy.core.effects import InterruptReason
from sdproxy.core.sdapi import BodyInfo
from sdproxy.runtime import body as bodies
from sdproxy.runtime import forward
from sdproxy.runtime.callbacks import CALLBACK_HEADER, Callbacks
from sdproxy.runtime.jobrun import Live, Runner
from sdproxy.runtime.jobrun import run_io as _run_io
from sdproxy.runtime.jobs import JOB_HEADER, JOB_ID, Caller, identify, new_token
from sdproxy.runtime.jobstore import (
    CALLBACK_PENDING,
    JobRecord,
    JobStatus,
    JobStore,
    SqliteJobStore,
    StoreInUse,
    default_dir,
)
from sdproxy.runtime.proxy import ASYNC_KEY, Exchange, Proxy, error_response
from sdproxy.runtime.status import JobsStatus, RecentJob
from sdproxy.settings import HostPort, JobSettings

log = logging.getLogger("sdproxy.jobs")

PREFIX = "/-/jobs"
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: where peers ask each other about jobs (answered from the local store only)
PEER_PREFIX = "/-/peer/jobs"
#: the longest ?wait= honoured (a long-poll is a held connection)
MAX_WAIT_S = 300.0
MAX_PAGE = 500
#: headers of a submit that are the proxy's, not the pod's
_NOT_FORWARDED = frozenset(
    h.lower() for h in ("Prefer", IDEMPOTENCY_HEADER, CALLBACK_HEADER, JOB_HEADER, "Content-Length")
)
#: bytes of a body or result file read per write to the client
READ_CHUNK = 256 * 1024


def open_store(settings: JobSettings, listen: HostPort) -> tuple[JobStore, Path | None]:
    """The store under --jobs-dir. Its default is per listen address; on port 0, or when
    another process holds the default one (replicas in network namespaces or containers
    sharing a home directory), a temporary directory, removed at exit: jobs then do not
    survive a restart, which the log says. A --jobs-dir given and in use is an error."""
    if settings.jobs_dir:
        return SqliteJobStore(Path(settings.jobs_dir)), None
    if listen.port != 0:
        where = default_dir(os.environ, str(listen))
        try:
            return SqliteJobStore(where), None
        except StoreInUse:
            log.warning("the default --jobs-dir %s is in use by another process", where)
    temporary = Path(tempfile.mkdtemp(prefix="sdproxy-jobs-"))
    if listen.port != 0:
        log.warning("asynchronous jobs are kept in %s until exit (give --jobs-dir)", temporary)
    return SqliteJobStore(temporary), temporary


class AsyncJobs:
    """The job API of one replica: its store, its runner, its callbacks, its sweeper."""

    def __init__(
        self,
        *,
        settings: JobSettings,
        store: JobStore,
        proxy: Proxy,
        temporary: Path | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.proxy = proxy
        self.temporary = temporary
        self.ttl_s = settings.jobs_ttl_s
        self.max_bytes = int(settings.jobs_max_mb * 1024 * 1024)
        self.callbacks = Callbacks(
            secret=settings.callback_secret,
            allow=settings.callback_allow,
            retry_s=settings.callback_retry_s,
            count=proxy.metrics.callback,
        )
        self.runner = Runner(
            store=store,
            proxy=proxy,
            gate=proxy.gate,
            callbacks=self.callbacks,
            document=self.document,
            max_bytes=self.max_bytes,
            on_finish=self.sweep,
        )
        self.sweep_s = min(60.0, max(0.2, self.ttl_s / 4))
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifetime -------------------------------------------------------------------------

    def start(self, synced: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.runner.recover(synced), name="jobs-recover"),
            loop.create_task(self._sweeper(), name="jobs-sweeper"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.runner.close()
        await self.callbacks.close()
        self.store.close()
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            try:
                self.sweep()
            except Exception:
                log.exception("job store sweep failed")

    def sweep(self, need: int = 0) -> None:
        """Expire results past --jobs-ttl-s, forget tombstones past twice that, and
        expire the oldest results while the store (and ``need`` more bytes) is over
        --jobs-max-mb."""
        now = time.time()
        for record in self.store.expirable(finished_before=now - self.ttl_s):
            self._expire(record)
        for job_id in self.store.forgettable(finished_before=now - 2 * self.ttl_s):
            self.store.delete(job_id)
        while self.store.bytes + need > self.max_bytes:
            oldest = self.store.oldest_results(16)
            if not oldest:
                break
            for record in oldest:
                self._expire(record)
                if self.store.bytes + need <= self.max_bytes:
                    break

    def _expire(self, record: JobRecord) -> None:
        self.store.result_path(record.id).unlink(missing_ok=True)
        self.store.update(record.id, expired=True, result_bytes=0, idempotency_key=None)

    # ---- submit ---------------------------------------------------------------------------

    async def submit_path(self, request: web.Request) -> web.StreamResponse:
        """``POST /-/jobs/<path>``: the proxy's own handler, for ``<path>``, as a job."""
        clone = request.clone(rel_url=request.rel_url.raw_path_qs[len(PREFIX) :])
        clone[ASYNC_KEY] = True
        return await self.proxy.handle(clone)

    async def submit(
        self, request: web.Request, ex: Exchange, body: bodies.ReceivedBody, info: BodyInfo
    ) -> web.Response:
        """Store the job (body file, then its row: only then is it accepted) and queue it."""
        owner = ex.caller.quota_key
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and not 1 <= len(key) <= 255:
            raise errors.BadRequest(f"{IDEMPOTENCY_HEADER} must be 1 to 255 characters")
        found = self._idempotent(owners_of(ex.caller), key)
        if found is not None:
            return self._accepted(found, ex)
        callback = request.headers.get(CALLBACK_HEADER)
        if callback is not None:
            self.callbacks.check(callback)
        if self.store.bytes + body.size > self.max_bytes:
            self.sweep(body.size)  # the oldest finished results make room, if any
            if self.store.bytes + body.size > self.max_bytes:
                raise errors.JobsFull(
                    f"the job store holds {self.store.bytes} bytes of unfinished jobs and "
                    f"results (--jobs-max-mb); retry when some have finished",
                    retry_after_s=10,
                )
        job_id = ex.caller.job or new_token()
        if self.store.get(job_id) is not None:
            raise errors.BadRequest(f"{JOB_HEADER}: a job with that id exists")
        ex.job_id = job_id
        path = self.store.body_path(job_id)
        saving = asyncio.ensure_future(_save(body, path))
        try:
            # shielded: a client leaving mid-save must not leave a half file being written
            await asyncio.shield(saving)
        except asyncio.CancelledError:
            saving.add_done_callback(lambda f: _discard(f, path))
            raise
        # from here on nothing awaits: the row and the queue place come together
        record = self.store.insert(
            JobRecord(
                id=job_id,
                owner=owner,
                route=request.path,
                method=request.method,
                path_qs=request.path_qs,
                headers=_forwarded_headers(request),
                status=JobStatus.QUEUED,
                created_at=time.time(),
                idempotency_key=key,
                body_bytes=body.size,
                callback_url=callback,
                callback_state=CALLBACK_PENDING if callback else None,
            )
        )
        if record.id != job_id:  # the same key won a race meanwhile
            self.store.body_path(job_id).unlink(missing_ok=True)
            return self._accepted(record, ex)
        try:
            self.runner.start(record, info, caller=ex.caller)
        except errors.ClientFacingError:
            self.store.delete(job_id)  # refused at once (queue_full…): never accepted
            raise
        return self._accepted(record, ex)

    def _idempotent(self, owners: list[str], key: str | None) -> JobRecord | None:
        record = self.store.find_idempotent(owners, key) if key else None
        if record is not None and self._expired(record):
            return None
        return record

    def _accepted(self, record: JobRecord, ex: Exchange) -> web.Response:
        ex.job_id = record.id
        headers = {
            "Location": f"{PREFIX}/{record.id}",
            JOB_HEADER: record.id,
            # RFC 7240 §3: which preference was honoured (for /-/jobs/… too: it is one)
            "Preference-Applied": "respond-async",
        }
        return web.json_response(self.document(record, at_submit=True), status=202, headers=headers)

    # ---- documents ------------------------------------------------------------------------

    def document(self, record: JobRecord, *, at_submit: bool = False) -> dict[str, Any]:
        """The status document (``GET /-/jobs/{id}``, callbacks) without live progress.
        ``at_submit``: the queue place the core answered the submit with (O(1); a GET
        computes it anew, O(queue): 2,000 submits into a deep queue were CPU-bound on it)."""
        live = self.runner.live.get(record.id)
        adm = self.proxy.gate.admission
        position: int | None = None
        eta: float | None = None
        if live is not None and adm.is_queued(live.ticket):
            if at_submit and live.position is not None:
                position, eta = live.position, adm.eta_at(live.position, live.cost)
            else:
                position, eta = adm.position(live.ticket), adm.eta_s(live.ticket)
        base = f"{PREFIX}/{record.id}"
        return {
            "id": record.id,
            "status": record.status.value,
            "route": record.route,
            "queue_position": position,
            "eta_s": None if eta is None else round(eta, 2),
            "progress": None,
            "pod": record.pod,
            "created_at": record.created_at,
            "started_at": record.started_at,
            "finished_at": record.finished_at,
            "error": record.error,
            "tenant": record.tenant,
            "expired": self._expired(record),
            "urls": {"self": base, "result": base + "/result", "cancel": base},
        }

    def _sync_document(self, job_id: str) -> dict[str, Any] | None:
        """A synchronous heavy request's job, while this replica holds it."""
        held = self.proxy.jobs.by_id(job_id)
        if held is None:
            return None
        adm = self.proxy.gate.admission
        running = adm.running(held.ticket)
        queued = adm.is_queued(held.ticket)
        return {
            "id": job_id,
            "status": "running" if running is not None else "queued",
            "route": held.route,
            "queue_position": adm.position(held.ticket) if queued else None,
            "eta_s": round(adm.eta_s(held.ticket), 2) if queued else None,
            "progress": None,
            "pod": running.pod_id if running is not None else None,
            "created_at": held.created_at,
            "started_at": None,
            "finished_at": None,
            "error": None,
            "tenant": None,
            "expired": False,
            "sync": True,
        }

    async def _with_progress(self, doc: dict[str, Any]) -> dict[str, Any]:
        """While running: the pod's own progress, when the pod runs this job only (its
        progress endpoint describes whatever it runs; another caller's is never shown)."""
        pod_id = doc.get("pod")
        pod = self.proxy.gate.admission.pods.get(pod_id) if pod_id else None
        if doc["status"] != "running" or pod is None or len(pod.running) != 1 or pod.foreign:
            return doc
        timeout = aiohttp.ClientTimeout(total=2.0)
        try:
            url = pod.url + "/sdapi/v1/progress?skip_current_image=true"
            async with self.proxy.session.get(url, timeout=timeout) as resp:
                data = await resp.json() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return doc
        if isinstance(data, dict) and isinstance(data.get("state"), dict):
            state = data["state"]
            doc["progress"] = {
                "fraction": data.get("progress"),
                "eta_s": data.get("eta_relative"),
                "step": state.get("sampling_step"),
                "steps": state.get("sampling_steps"),
            }
        return doc

    def _expired(self, record: JobRecord) -> bool:
        finished = record.finished_at
        return record.expired or (finished is not None and finished < time.time() - self.ttl_s)

    # ---- handlers -------------------------------------------------------------------------

    def _record(self, request: web.Request) -> JobRecord | None:
        job_id = request.match_info["id"]
        if not JOB_ID.fullmatch(job_id):
            raise errors.JobNotFound(f"no job {job_id[:128]!r}")
        return self.store.get(job_id)

    async def get_job(self, request: web.Request, *, local: bool = False) -> web.StreamResponse:
        record = self._record(request)
        if record is None:
            doc = self._sync_document(request.match_info["id"])
            if doc is not None:
                return web.json_response(await self._with_progress(doc))
            return await self._from_peers(request, local=local)
        return web.json_response(await self._with_progress(self.document(record)))

    async def delete_job(self, request: web.Request, *, local: bool = False) -> web.StreamResponse:
        record = self._record(request)
        if record is None:
            held = self.proxy.jobs.by_id(request.match_info["id"])
            if held is not None:
                return await self._cancel_sync(request.match_info["id"], held.ticket)
            return await self._from_peers(request, local=local)
        if not record.status.finished:
            await self.runner.cancel(record.id)
            record = self.store.get(record.id) or record
        return web.json_response(self.document(record))

    async def _cancel_sync(self, job_id: str, ticket: Any) -> web.Response:
        """A synchronous job: queued, its request gets ``409 job_cancelled``; running, its
        pod is interrupted when it runs this job alone (sd-webui's interrupt stops
        whatever the pod runs), and its caller gets what the pod answers; else 409."""
        adm = self.proxy.gate.admission
        if self.proxy.gate.cancel_queued(ticket):
            return web.json_response({"id": job_id, "status": "cancelled", "sync": True})
        running = adm.running(ticket)
        pod = adm.pods.get(running.pod_id) if running is not None else None
        if pod is None or len(pod.running) != 1 or pod.foreign:
            raise errors.JobCancelled(
                f"job {job_id} runs on a pod shared with other jobs: interrupt it with "
                "POST /sdapi/v1/interrupt and X-Sdproxy-Job, or wait for it"
            )
        await forward.post_interrupt(
            self.proxy.session, pod.url, timeout_s=self.proxy.settings.connect_timeout_s + 5
        )
        self.proxy.metrics.interrupt(InterruptReason.USER)
        return web.json_response({"id": job_id, "status": "interrupted", "sync": True})

    async def get_result(self, request: web.Request, *, local: bool = False) -> web.StreamResponse:
        record = self._record(request)
        if record is None:
            return await self._from_peers(request, local=local)
        wait_s = _wait_s(request)
        if not record.status.finished and wait_s > 0:
            record = await self._wait(record, wait_s)
        if not record.status.finished:
            raise errors.JobNotFinished(
                f"job {record.id} is {record.status.value}; retry, or wait with ?wait=S",
                retry_after_s=1,
            )
        if self._expired(record):
            raise errors.JobExpired(f"job {record.id}'s result was kept {self.ttl_s:g} s")
        return await self._send_result(request, record)

    async def _wait(self, record: JobRecord, wait_s: float) -> JobRecord:
        live: Live | None = self.runner.live.get(record.id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while live is None and loop.time() < deadline:  # not taken up yet (a restart)
            await asyncio.sleep(0.1)
            live = self.runner.live.get(record.id)
        if live is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.done.wait(), max(0.0, deadline - loop.time()))
        return self.store.get(record.id) or record

    async def _send_result(self, request: web.Request, record: JobRecord) -> web.StreamResponse:
        response = web.StreamResponse(status=record.result_status or 200)
        response.headers.extend(record.result_headers)
        response.headers[JOB_HEADER] = record.id
        response.content_length = record.result_bytes
        path = self.store.result_path(record.id)
        try:
            handle = await _run_io(lambda: path.open("rb"))
        except OSError as exc:
            raise errors.JobExpired(f"job {record.id}'s result is gone") from exc
        try:
            await response.prepare(request)
            while chunk := await _run_io(handle.read, READ_CHUNK):
                await response.write(chunk)
        finally:
            await _run_io(handle.close)
        await response.write_eof()
        return response

    async def list_jobs(self, request: web.Request) -> web.StreamResponse:
        caller = identify(request, by_address=self.proxy.settings.address_identity)
        query = request.query
        status = query.get("status") or None
        if status is not None and status not in {s.value for s in JobStatus}:
            raise errors.BadRequest(
                f"status must be one of {', '.join(s.value for s in JobStatus)}"
            )
        try:
            limit = int(query.get("limit", "50"))
            cursor = query.get("cursor") or None
            if cursor is not None:
                int(cursor)
        except ValueError as exc:
            raise errors.BadRequest("limit and cursor must be integers") from exc
        if not 1 <= limit <= MAX_PAGE:
            raise errors.BadRequest(f"limit must be within 1..{MAX_PAGE}")
        page = self.store.page(
            owners=owners_of(caller),
            status=JobStatus(status) if status else None,
            tenant=query.get("tenant") or None,
            limit=limit,
            cursor=cursor,
        )
        return web.json_response(
            {"jobs": [self.document(r) for r in page.jobs], "cursor": page.cursor}
        )

    async def _from_peers(self, request: web.Request, *, local: bool) -> web.StreamResponse:
        """Ask every live peer at its /-/peer/jobs (which answers from its own store
        only); relay the first answer that is not a 404."""
        job_id = request.match_info["id"]
        peers = self.proxy.peers
        if not local and peers is not None:
            wait = _wait_s(request)
            timeout = aiohttp.ClientTimeout(total=wait + 10, connect=2)
            path_qs = PEER_PREFIX + request.rel_url.raw_path_qs[len(PREFIX) :]
            for url, _state in peers.live():
                try:
                    upstream = await self.proxy.session.request(
                        request.method, url + path_qs, headers=peers.headers, timeout=timeout
                    )
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.debug("peer %s about job %s: %r", url, job_id[:6], exc)
                    continue
                async with upstream:
                    if upstream.status == 404:
                        continue
                    response, _sent = await forward.relay(request, upstream, extra_headers={})
                    return response
        raise errors.JobNotFound(f"no job {job_id}")

    # ---- /-/status, metrics ---------------------------------------------------------------

    def status(self) -> JobsStatus:
        now = time.time()
        recent = tuple(
            RecentJob(
                id=r.id[:6] + "…",
                tenant=r.tenant,
                status=r.status.value,
                wait_s=round(((r.started_at or r.finished_at or now) - r.created_at), 3),
                pod=r.pod,
            )
            for r in self.store.recent(20)
        )
        return JobsStatus(
            counts={s.value: n for s, n in self.store.counts().items()},
            store_bytes=self.store.bytes,
            max_bytes=self.max_bytes,
            ttl_s=self.ttl_s,
            recent=recent,
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application, jobs_of: Callable[[web.Request], AsyncJobs]) -> None:
    """The /-/jobs routes (before the app's catch-all /-/ route); ``jobs_of`` finds the
    replica's AsyncJobs once the app runs."""

    def guard(pick: Callable[[AsyncJobs], Handler]) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                return await pick(jobs_of(request))(request)
            except errors.ClientFacingError as exc:
                return error_response(exc)

        return guarded

    app.router.add_get(PREFIX, guard(lambda j: j.list_jobs))
    app.router.add_post(PREFIX + "/{tail:.+}", guard(lambda j: j.submit_path))
    app.router.add_get(PREFIX + "/{id}", guard(lambda j: j.get_job))
    app.router.add_get(PREFIX + "/{id}/result", guard(lambda j: j.get_result))
    app.router.add_delete(PREFIX + "/{id}", guard(lambda j: j.delete_job))


def owners_of(caller: Caller) -> list[str]:
    """Whose jobs a caller lists and whose Idempotency-Keys it shares: the identity it
    gives, and (with --address-identity) the jobs its address sent with none — its
    first submit, before it had the cookie that answer gave it."""
    owners = [caller.quota_key]
    if caller.named and caller.by_address:
        owners.append(_address_key(caller))
    return owners


def _address_key(caller: Caller) -> str:
    return Caller(header=None, cookie=None, address=caller.address, new_cookie=None).quota_key


def add_peer_routes(
    app: web.Application,
    jobs_of: Callable[[web.Request], AsyncJobs],
    *,
    guard: Callable[[Handler], Handler],
) -> None:
    """The /-/peer/jobs routes another replica asks (answered from this store only)."""

    def local(pick: Callable[[AsyncJobs], Callable[..., Awaitable[web.StreamResponse]]]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                return await pick(jobs_of(request))(request, local=True)
            except errors.ClientFacingError as exc:
                return error_response(exc)

        return guard(handler)

    app.router.add_get(PEER_PREFIX + "/{id}", local(lambda j: j.get_job))
    app.router.add_get(PEER_PREFIX + "/{id}/result", local(lambda j: j.get_result))
    app.router.add_delete(PEER_PREFIX + "/{id}", local(lambda j: j.delete_job))


def _wait_s(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError as exc:
        raise errors.BadRequest("wait must be a number of seconds") from exc
    if not wait >= 0:  # NaN too
        raise errors.BadRequest("wait must be a number of seconds")
    return min(wait, MAX_WAIT_S)


def _forwarded_headers(request: web.Request) -> tuple[tuple[str, str], ...]:
    """The headers the pod will get (as a synchronous call's), minus the job API's."""
    headers = forward.upstream_headers(request, {})
    return tuple((k, v) for k, v in headers.items() if k.lower() not in _NOT_FORWARDED)


def _discard(saving: asyncio.Future[None], path: Path) -> None:
    """The end of a save whose client left: its file goes, its outcome is read."""
    if not saving.cancelled():
        saving.exception()
    path.unlink(missing_ok=True)


async def _save(body: bodies.ReceivedBody, path: Path) -> None:
    """The body to its file, in the executor, a chunk at a time."""
    try:
        if body.spool is None:  # in memory (up to 1 MiB): one hop
            await _run_io(path.write_bytes, body.data)
        else:
            handle = await _run_io(lambda: path.open("wb"))
            try:
                async for chunk in body.chunks():
                    await _run_io(handle.write, chunk)
            finally:
                await _run_io(handle.close)
    except OSError as exc:
        log.error("cannot store a job's body in %s: %r", path, exc)
        await _run_io(path.unlink, True)
        raise errors.InternalError(f"cannot store the job's body: {exc}") from exc
