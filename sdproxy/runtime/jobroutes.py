"""Runtime: the job API's HTTP handlers — follow, fetch, cancel, list, through any replica.

    POST   /-/jobs/<sd-webui path>   -> the proxy's own handler, as a job (``submit_path``)
    GET    /-/jobs/{id}              the status document (synchronous jobs too, while held)
    GET    /-/jobs/{id}/result       what the synchronous call would have answered;
                                     ?wait=S long-polls; 409 before, 410 after retention
    DELETE /-/jobs/{id}              cancel: out of the queue, or the pod interrupted
    GET    /-/jobs                   the caller's jobs, newest first
    GET|DELETE /-/peer/jobs/{id}[/result]   the same for a peer, from this store only

The store, the runner and the documents are ``sdproxy.runtime.jobapi.AsyncJobs``'s; who
may do what is said there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from sdproxy import errors
from sdproxy.core.effects import InterruptReason
from sdproxy.runtime import forward
from sdproxy.runtime.jobapi import (
    MAX_PAGE,
    MAX_WAIT_S,
    PEER_PREFIX,
    PREFIX,
    READ_CHUNK,
    AsyncJobs,
    owners_of,
)
from sdproxy.runtime.jobrun import Live, open_io
from sdproxy.runtime.jobrun import run_io as _run_io
from sdproxy.runtime.jobs import JOB_HEADER, JOB_ID, identify
from sdproxy.runtime.jobstore import JobRecord, JobStatus
from sdproxy.runtime.proxy import ASYNC_KEY, error_response

log = logging.getLogger("sdproxy.jobs")


async def submit_path(jobs: AsyncJobs, request: web.Request) -> web.StreamResponse:
    """``POST /-/jobs/<path>``: the proxy's own handler, for ``<path>``, as a job."""
    clone = request.clone(rel_url=request.rel_url.raw_path_qs[len(PREFIX) :])
    clone[ASYNC_KEY] = True
    return await jobs.proxy.handle(clone)


def _sync_document(jobs: AsyncJobs, job_id: str) -> dict[str, Any] | None:
    """A synchronous heavy request's job, while this replica holds it."""
    held = jobs.proxy.jobs.by_id(job_id)
    if held is None:
        return None
    adm = jobs.proxy.gate.admission
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


async def _with_progress(jobs: AsyncJobs, doc: dict[str, Any]) -> dict[str, Any]:
    """While running: the pod's own progress, when the pod runs this job only (its
    progress endpoint describes whatever it runs; another caller's is never shown)."""
    pod_id = doc.get("pod")
    pod = jobs.proxy.gate.admission.pods.get(pod_id) if pod_id else None
    if doc["status"] != "running" or pod is None or len(pod.running) != 1 or pod.foreign:
        return doc
    timeout = aiohttp.ClientTimeout(total=2.0)
    try:
        url = pod.url + "/sdapi/v1/progress?skip_current_image=true"
        async with jobs.proxy.session.get(url, timeout=timeout) as resp:
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


def _record(jobs: AsyncJobs, request: web.Request) -> JobRecord | None:
    job_id = request.match_info["id"]
    if not JOB_ID.fullmatch(job_id):
        raise errors.JobNotFound(f"no job {job_id[:128]!r}")
    return jobs.store.get(job_id)


async def get_job(
    jobs: AsyncJobs, request: web.Request, *, local: bool = False
) -> web.StreamResponse:
    record = _record(jobs, request)
    if record is None:
        doc = _sync_document(jobs, request.match_info["id"])
        if doc is not None:
            return web.json_response(await _with_progress(jobs, doc))
        return await _from_peers(jobs, request, local=local)
    return web.json_response(await _with_progress(jobs, jobs.document(record)))


async def delete_job(
    jobs: AsyncJobs, request: web.Request, *, local: bool = False
) -> web.StreamResponse:
    record = _record(jobs, request)
    if record is None:
        held = jobs.proxy.jobs.by_id(request.match_info["id"])
        if held is not None:
            return await _cancel_sync(jobs, request.match_info["id"], held.ticket)
        return await _from_peers(jobs, request, local=local)
    if not record.status.finished:
        await jobs.runner.cancel(record.id)
        record = jobs.store.get(record.id) or record
    return web.json_response(jobs.document(record))


async def _cancel_sync(jobs: AsyncJobs, job_id: str, ticket: Any) -> web.Response:
    """A synchronous job: queued, its request gets ``409 job_cancelled``; running, its
    pod is interrupted when it runs this job alone (sd-webui's interrupt stops
    whatever the pod runs), and its caller gets what the pod answers; else 409."""
    adm = jobs.proxy.gate.admission
    if jobs.proxy.gate.cancel_queued(ticket):
        return web.json_response({"id": job_id, "status": "cancelled", "sync": True})
    running = adm.running(ticket)
    pod = adm.pods.get(running.pod_id) if running is not None else None
    if pod is None or len(pod.running) != 1 or pod.foreign:
        raise errors.JobCancelled(
            f"job {job_id} runs on a pod shared with other jobs: interrupt it with "
            "POST /sdapi/v1/interrupt and X-Sdproxy-Job, or wait for it"
        )
    await forward.post_interrupt(
        jobs.proxy.session, pod.url, timeout_s=jobs.proxy.settings.connect_timeout_s + 5
    )
    jobs.proxy.metrics.interrupt(InterruptReason.USER)
    return web.json_response({"id": job_id, "status": "interrupted", "sync": True})


async def get_result(
    jobs: AsyncJobs, request: web.Request, *, local: bool = False
) -> web.StreamResponse:
    record = _record(jobs, request)
    if record is None:
        return await _from_peers(jobs, request, local=local)
    wait_s = _wait_s(request)
    if not record.status.finished and wait_s > 0:
        record = await _wait(jobs, record, wait_s)
    if not record.status.finished:
        raise errors.JobNotFinished(
            f"job {record.id} is {record.status.value}; retry, or wait with ?wait=S",
            retry_after_s=1,
        )
    if jobs.expired(record):
        raise errors.JobExpired(f"job {record.id}'s result was kept {jobs.ttl_s:g} s")
    return await _send_result(jobs, request, record)


async def _wait(jobs: AsyncJobs, record: JobRecord, wait_s: float) -> JobRecord:
    live: Live | None = jobs.runner.live.get(record.id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while live is None and loop.time() < deadline:  # not taken up yet (a restart)
        await asyncio.sleep(0.1)
        live = jobs.runner.live.get(record.id)
    if live is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.done.wait(), max(0.0, deadline - loop.time()))
    return jobs.store.get(record.id) or record


async def _send_result(
    jobs: AsyncJobs, request: web.Request, record: JobRecord
) -> web.StreamResponse:
    response = web.StreamResponse(status=record.result_status or 200)
    response.headers.extend(record.result_headers)
    response.headers[JOB_HEADER] = record.id
    response.content_length = record.result_bytes
    path = jobs.store.result_path(record.id)
    try:
        handle = await open_io(path, "rb")
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


async def list_jobs(jobs: AsyncJobs, request: web.Request) -> web.StreamResponse:
    # scoped to its tenant as a submit is (401 without a known key): else it lists nothing
    caller = jobs.proxy.with_tenant(
        request, identify(request, by_address=jobs.proxy.settings.address_identity)
    )
    query = request.query
    status = query.get("status") or None
    if status is not None and status not in {s.value for s in JobStatus}:
        raise errors.BadRequest(f"status must be one of {', '.join(s.value for s in JobStatus)}")
    try:
        limit = int(query.get("limit", "50"))
        cursor = query.get("cursor") or None
        if cursor is not None:
            int(cursor)
    except ValueError as exc:
        raise errors.BadRequest("limit and cursor must be integers") from exc
    if not 1 <= limit <= MAX_PAGE:
        raise errors.BadRequest(f"limit must be within 1..{MAX_PAGE}")
    page = jobs.store.page(
        owners=owners_of(caller),
        status=JobStatus(status) if status else None,
        tenant=query.get("tenant") or None,
        limit=limit,
        cursor=cursor,
    )
    return web.json_response({"jobs": [jobs.document(r) for r in page.jobs], "cursor": page.cursor})


async def _from_peers(jobs: AsyncJobs, request: web.Request, *, local: bool) -> web.StreamResponse:
    """Ask every live peer at its /-/peer/jobs (which answers from its own store
    only); relay the first answer that is not a 404."""
    job_id = request.match_info["id"]
    peers = jobs.proxy.peers
    if not local and peers is not None:
        wait = _wait_s(request)
        timeout = aiohttp.ClientTimeout(total=wait + 10, connect=2)
        path_qs = PEER_PREFIX + request.rel_url.raw_path_qs[len(PREFIX) :]
        for url, _state in peers.live():
            try:
                upstream = await jobs.proxy.session.request(
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


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JobHandler = Callable[..., Awaitable[web.StreamResponse]]


def add_routes(app: web.Application, jobs_of: Callable[[web.Request], AsyncJobs]) -> None:
    """The /-/jobs routes (before the app's catch-all /-/ route); ``jobs_of`` finds the
    replica's AsyncJobs once the app runs."""

    def route(handler: JobHandler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(jobs_of(request), request)
            except errors.ClientFacingError as exc:
                return error_response(exc)

        return guarded

    app.router.add_get(PREFIX, route(list_jobs))
    app.router.add_post(PREFIX + "/{tail:.+}", route(submit_path))
    app.router.add_get(PREFIX + "/{id}", route(get_job))
    app.router.add_get(PREFIX + "/{id}/result", route(get_result))
    app.router.add_delete(PREFIX + "/{id}", route(delete_job))


def add_peer_routes(
    app: web.Application,
    jobs_of: Callable[[web.Request], AsyncJobs],
    *,
    guard: Callable[[Handler], Handler],
) -> None:
    """The /-/peer/jobs routes another replica asks (answered from this store only)."""

    def local(handler: JobHandler) -> Handler:
        async def answer(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(jobs_of(request), request, local=True)
            except errors.ClientFacingError as exc:
                return error_response(exc)

        return guard(answer)

    app.router.add_get(PEER_PREFIX + "/{id}", local(get_job))
    app.router.add_get(PEER_PREFIX + "/{id}/result", local(get_result))
    app.router.add_delete(PEER_PREFIX + "/{id}", local(delete_job))


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
