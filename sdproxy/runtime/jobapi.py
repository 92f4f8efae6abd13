"""Runtime: the asynchronous job API of one replica — submit, status documents, retention.

``AsyncJobs`` owns the replica's job store (``jobstore``), its runner (``jobrun``) and its
callbacks (``callbacks``); it answers a submit (``POST /-/jobs/<path>``, or the path with
``Prefer: respond-async``: ``202``), renders the status document and sweeps expired
results. The other handlers are in ``jobroutes``; a leaving replica's handoff in
``jobhandoff``.

Who may do what (README "Who can reach a job"): a job's id is its capability — 96
random bits, answered only to its submitter — so ``GET``/``DELETE``/``result`` by id work
for whoever holds it, from any replica. The list shows only the caller's own jobs
(``Caller.quota_key``: its X-Sdproxy-Client, cookie, else address), and an
``Idempotency-Key`` is scoped to that same caller.

A replica asked about an id it does not hold asks its live peers — the same request at
their ``/-/peer/jobs/{id}…`` (operational endpoints: on ``--ops-listen`` when set, behind
``--ops-token``), which answer from what they hold and never ask further — and relays the
first answer that is not a 404 (``jobroutes._from_peers``). Retention: a finished job's result is
kept ``--jobs-ttl-s``, then it is deleted and the id answers ``410 job_expired`` for as
long again (then 404); past ``--jobs-max-mb`` the oldest finished results go first. The
sweeper runs every ``sweep_s`` and after every finished job.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from sdproxy import errors
from sdproxy.core.sdapi import BodyInfo
from sdproxy.runtime import body as bodies
from sdproxy.runtime import forward
from sdproxy.runtime.callbacks import CALLBACK_HEADER, Callbacks
from sdproxy.runtime.jobrun import Runner, open_io
from sdproxy.runtime.jobrun import run_io as _run_io
from sdproxy.runtime.jobs import JOB_HEADER, Caller, new_token
from sdproxy.runtime.jobstore import (
    CALLBACK_PENDING,
    JobRecord,
    JobStatus,
    JobStore,
    SqliteJobStore,
    StoreInUse,
    default_dir,
)
from sdproxy.runtime.proxy import Exchange, Proxy
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
                headers=self._forwarded_headers(request),
                tenant=ex.caller.tenant or None,
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
        if record is not None and self.expired(record):
            if not record.expired:  # past retention, not swept yet: its key is free now
                self._expire(record)
            return None
        return record

    def _forwarded_headers(self, request: web.Request) -> tuple[tuple[str, str], ...]:
        """The headers the pod will get (as a synchronous call's), minus the job API's
        and a tenant's API key (kept out of the store too)."""
        headers = forward.upstream_headers(request, {})
        self.proxy.strip_tenant_key(request, headers)
        return tuple((k, v) for k, v in headers.items() if k.lower() not in _NOT_FORWARDED)

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
            "expired": self.expired(record),
            "urls": {"self": base, "result": base + "/result", "cancel": base},
        }

    def expired(self, record: JobRecord) -> bool:
        finished = record.finished_at
        return record.expired or (finished is not None and finished < time.time() - self.ttl_s)

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


def owners_of(caller: Caller) -> list[str]:
    """Whose jobs a caller lists and whose Idempotency-Keys it shares: the identity it
    gives, and (with --address-identity) the jobs its address sent with none — its
    first submit, before it had the cookie that answer gave it."""
    owners = [caller.quota_key]
    if caller.named and caller.by_address:
        owners.append(_address_key(caller))
    return owners


def _address_key(caller: Caller) -> str:
    anonymous = Caller(
        header=None, cookie=None, address=caller.address, new_cookie=None, tenant=caller.tenant
    )
    return anonymous.quota_key  # of the same tenant: never another tenant's jobs


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
            handle = await open_io(path, "wb")
            try:
                async for chunk in body.chunks():
                    await _run_io(handle.write, chunk)
            finally:
                await _run_io(handle.close)
    except OSError as exc:
        log.error("cannot store a job's body in %s: %r", path, exc)
        await _run_io(path.unlink, True)
        raise errors.InternalError(f"cannot store the job's body: {exc}") from exc
