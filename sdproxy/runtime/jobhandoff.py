"""Runtime: a replica that exits gracefully hands its asynchronous jobs to a peer.

Each replica keeps its own job store (its own ``--jobs-dir``), so a replica removed by a
scale-in or a rolling update would take its jobs' results with it. After its SIGTERM
drain (queued jobs were dispatched while it drained; what still runs past
``--drain-timeout-s`` stays behind) it sends every finished, unexpired job with its result
file, and every job still queued with its body file, to the first peer that takes it
(``POST /-/peer/jobs/import``: the record as JSON in ``X-Sdproxy-Job-Record``, the file as
the body), and then forgets it, so a restart with the same directory never runs a job a
peer took over. The peer stores it under the same id (ids are 96 random bits, the
capability the client holds), queues the queued ones and sends a finished one's callback
still pending (at least once: the leaving replica may have been sending it as it left).
A client then reaches its job through any remaining replica (``GET /-/jobs/{id}`` asks
the peers).

The import endpoint is an operational one (``--ops-listen``, ``--ops-token``, which the
replicas share and send) and answers only a sender that names itself with a replica id
this replica has heard from as a peer (``X-Sdproxy-Replica``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from sdproxy import errors
from sdproxy.core.sdapi import inspect_body
from sdproxy.runtime.jobrun import body_prefix, open_io, run_io
from sdproxy.runtime.jobs import JOB_ID
from sdproxy.runtime.jobstore import CALLBACK_PENDING, JobRecord, JobStatus
from sdproxy.runtime.podgate import REPLICA_HEADER

if TYPE_CHECKING:
    from sdproxy.runtime.jobapi import AsyncJobs

log = logging.getLogger("sdproxy.jobs")

IMPORT_PATH = "/-/peer/jobs/import"
RECORD_HEADER = "X-Sdproxy-Job-Record"
CHUNK = 256 * 1024


def _record_json(record: JobRecord) -> str:
    data = dataclasses.asdict(record)
    data["status"] = record.status.value
    data.pop("seq")
    return json.dumps(data, separators=(",", ":"))


def _record_from(text: str) -> JobRecord:
    data: dict[str, Any] = json.loads(text)
    data["status"] = JobStatus(data["status"])
    for name in ("headers", "result_headers"):
        data[name] = tuple((str(k), str(v)) for k, v in data[name])
    record = JobRecord(**data)
    if not isinstance(record.id, str) or not JOB_ID.fullmatch(record.id):
        raise ValueError("its id is not a job id")  # it names a file under --jobs-dir
    return record


async def hand_over(jobs: AsyncJobs, *, replica: str) -> int:
    """Send every finished (unexpired) and queued job to a peer; returns how many went."""
    peers = jobs.proxy.peers
    urls = peers.urls if peers is not None else []
    if not urls:
        return 0
    moved = 0
    for record in jobs.store.unfinished() + jobs.store.finished_unexpired():
        if record.status is JobStatus.RUNNING or jobs.runner.live.get(record.id):
            continue  # still running here past the drain: it stays (interrupted on restart)
        for url in urls:
            if await _send(jobs, url, record, replica=replica):
                jobs.store.delete(record.id)
                moved += 1
                break
    if moved:
        log.info("handed %d jobs over to peers", moved)
    return moved


async def _send(jobs: AsyncJobs, url: str, record: JobRecord, *, replica: str) -> bool:
    finished = record.status.finished
    path = jobs.store.result_path(record.id) if finished else jobs.store.body_path(record.id)

    async def content() -> AsyncIterator[bytes]:
        handle = await open_io(path, "rb")
        try:
            while chunk := await run_io(handle.read, CHUNK):
                yield chunk
        finally:
            await run_io(handle.close)

    peers = jobs.proxy.peers
    headers = {
        **(peers.headers if peers is not None else {}),
        RECORD_HEADER: _record_json(record),
        REPLICA_HEADER: replica,
    }
    timeout = aiohttp.ClientTimeout(total=60, connect=2)
    try:
        async with jobs.proxy.session.post(
            url + IMPORT_PATH, data=content(), headers=headers, timeout=timeout
        ) as resp:
            await resp.read()
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        log.info("peer %s did not take job %s: %r", url, record.id[:6], exc)
        return False


async def import_job(jobs: AsyncJobs, request: web.Request, *, replica: str) -> web.Response:
    """``POST /-/peer/jobs/import``: keep a job a leaving peer hands over."""
    sender = request.headers.get(REPLICA_HEADER, "")
    peers = jobs.proxy.peers
    known = peers.known if peers is not None else set()
    if sender == replica or sender not in known:
        raise errors.Forbidden("only a live peer replica hands jobs over")
    try:
        record = _record_from(request.headers[RECORD_HEADER])
    except (KeyError, ValueError, TypeError) as exc:
        raise errors.BadRequest(f"{RECORD_HEADER}: not a job record ({exc!r})") from exc
    if record.status is JobStatus.RUNNING or jobs.store.get(record.id) is not None:
        raise errors.BadRequest(f"job {record.id[:6]}… cannot be taken over here")
    finished = record.status.finished
    path = jobs.store.result_path(record.id) if finished else jobs.store.body_path(record.id)
    size = 0
    jobs.sweep(request.content_length or 0)  # the oldest finished results make room
    room = jobs.max_bytes - jobs.store.bytes
    handle = await open_io(path, "wb")
    try:
        async for chunk in request.content.iter_chunked(CHUNK):
            size += len(chunk)
            if size > room:
                break
            await run_io(handle.write, chunk)
    finally:
        await run_io(handle.close)
    if size > room:
        await run_io(path.unlink, True)
        raise errors.JobsFull(f"no room for job {record.id[:6]}… under --jobs-max-mb")
    if finished:
        record = dataclasses.replace(record, result_bytes=size, body_bytes=0)
    else:
        record = dataclasses.replace(record, body_bytes=size)
    record = jobs.store.insert(record)
    if finished and record.callback_url and record.callback_state == CALLBACK_PENDING:
        jobs.runner.notify(record)  # it ended as its replica drained: not yet called back
    if not finished:
        prefix, complete = await body_prefix(path)
        try:
            jobs.runner.start(record, inspect_body(prefix, complete=complete), caller=None)
        except errors.ClientFacingError as exc:
            await jobs.runner.finish(record, JobStatus.FAILED, exc)
    return web.json_response({"id": record.id, "status": record.status.value})
