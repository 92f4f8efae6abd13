"""Runtime: asynchronous jobs' lives — submit, wait in THE queue, run, store, finish.

An asynchronous job is the same admission ticket as a synchronous request (one queue, one
limit, ``Gate.enqueue``), with no client connection attached: its body waits on disk
(``JobStore.body_path``) and is opened only once a slot is bound (2,000 queued jobs hold
no file descriptor), it is sent by ``Proxy.bind_exchange`` exactly as a synchronous one
(pod_busy and refused connections retried, nothing else), and the pod's answer is written
to ``JobStore.result_path`` chunk by chunk as it arrives, the slot freed when the pod sent
its last byte. Cancelling a running job is what a client leaving is to a synchronous
request: the runner task is cancelled inside ``bind_exchange``, which interrupts the pod.

A job that ends without a pod's answer (queue_timeout, cancelled, a broken exchange,
interrupted_by_restart) stores as its result the JSON error the synchronous call would
have answered, so ``GET /-/jobs/{id}/result`` always answers what that call would have.

At start (``recover``): jobs that were running when the process died are failed
``interrupted_by_restart`` (a generation is not idempotent and may have finished on its
pod: we never run one twice without the caller asking; README "Crash safety"); queued ones
are submitted again in their original order once discovery has reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp
from multidict import CIMultiDict

from sdproxy import errors
from sdproxy.core.effects import Dispatch, Outcome
from sdproxy.core.queue import Priority
from sdproxy.core.routing import RouteClass
from sdproxy.core.sdapi import BodyInfo, inspect_body
from sdproxy.runtime import body as bodies
from sdproxy.runtime import forward
from sdproxy.runtime.callbacks import Callbacks
from sdproxy.runtime.gate import Gate, Slot
from sdproxy.runtime.jobs import Caller, job_key, new_request_id
from sdproxy.runtime.jobstore import (
    CALLBACK_DONE,
    CALLBACK_GAVE_UP,
    CALLBACK_PENDING,
    CALLBACK_REFUSED,
    JobRecord,
    JobStatus,
    JobStore,
)
from sdproxy.runtime.proxy import PEEK_BYTES, Exchange, Proxy, outcome_of
from sdproxy.runtime.tasks import Background
from sdproxy.runtime.tenants import priority_of

log = logging.getLogger("sdproxy.jobs")
#: how much of a 5xx answer is kept to tell a CUDA out-of-memory (the request's fault)
ERROR_HEAD_BYTES = 64 * 1024
T = TypeVar("T")

#: how long discovery may take to report before queued jobs are submitted again anyway
RECOVER_WAIT_S = 30.0


@dataclass(kw_only=True)
class Live:
    """An asynchronous job this process is running or holding in its queue."""

    ticket: Any
    keys: list[str]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    #: "queued", "running" (bound, the exchange under way), "result" (being stored)
    phase: str = "queued"
    cancel_requested: bool = False
    slot: Slot | None = None
    #: the queue position the core answered the submit with, and the job's cost
    position: int | None = None
    cost: float = 1.0


class Runner:
    """Owns every live asynchronous job of this replica."""

    def __init__(
        self,
        *,
        store: JobStore,
        proxy: Proxy,
        gate: Gate,
        callbacks: Callbacks,
        document: Callable[[JobRecord], dict[str, Any]],
        max_bytes: int,
        on_finish: Callable[[], None],
    ) -> None:
        self.store = store
        self.proxy = proxy
        self.gate = gate
        self.callbacks = callbacks
        self.document = document
        self.max_bytes = max_bytes
        self.on_finish = on_finish
        self.live: dict[str, Live] = {}
        self._background = Background()

    # ---- submit -------------------------------------------------------------------------

    def start(self, record: JobRecord, info: BodyInfo, *, caller: Caller | None) -> None:
        """Put ``record``'s job in the queue now; raises the client error if the queue
        refuses it at once (queue_full, no_backends, shutting_down)."""
        headers = dict(record.headers)
        job = self.proxy.new_job(
            record.route,
            info,
            tenant=record.tenant or "",
            priority=_priority(headers),
        )
        keys = [*caller.keys, job_key(record.id)] if caller else [job_key(record.id)]
        self.proxy.jobs.add_keys(
            keys, owner=record.owner, ticket=job.ticket, job_id=record.id, route=record.route
        )
        fut, position = self.gate.enqueue(job)
        if fut.done() and fut.exception() is not None:
            self.proxy.jobs.remove(job.ticket)
            exc = fut.exception()
            assert isinstance(exc, errors.ClientFacingError)
            raise exc
        live = Live(ticket=job.ticket, keys=keys, position=position, cost=job.cost)
        self.live[record.id] = live
        live.task = asyncio.get_running_loop().create_task(
            self._life(record, live, fut), name=f"job-{record.id[:6]}"
        )

    async def _life(self, record: JobRecord, live: Live, fut: asyncio.Future[Dispatch]) -> None:
        try:
            try:
                slot = await self.gate.slot_of(live.ticket, fut)
            except errors.ShuttingDown:
                return  # stays queued in the store: the next start takes it up
            except errors.ClientFacingError as exc:
                cancelled = isinstance(exc, errors.JobCancelled)
                await self.finish(
                    record, JobStatus.CANCELLED if cancelled else JobStatus.FAILED, exc
                )
                return
            live.slot = slot
            live.phase = "running"
            self.proxy.metrics.observe_queue_wait(slot.dispatch.queued_s)
            record = (
                self.store.update(
                    record.id, status=JobStatus.RUNNING, started_at=time.time(), pod=slot.pod_id
                )
                or record
            )
            await self._run(record, live, slot)
        except asyncio.CancelledError:
            if not live.cancel_requested:
                raise  # shutting down: the record stays as it is for the next start
            await self.finish(record, JobStatus.CANCELLED, cancelled_error())
        except Exception as exc:  # a bug: the job fails, the proxy goes on
            log.exception("job %s failed unexpectedly", record.id[:6])
            await self.finish(record, JobStatus.FAILED, errors.InternalError(repr(exc)))
        finally:
            self.proxy.jobs.remove(live.ticket)
            self.live.pop(record.id, None)
            live.done.set()

    async def _run(self, record: JobRecord, live: Live, slot: Slot) -> None:
        ex = Exchange(
            request_id=new_request_id(),
            caller=_NO_CALLER,
            route_class=RouteClass.HEAVY,
            started=self.proxy.clock(),
            job_id=record.id,
            job_keys=live.keys,
        )
        try:
            body = await bodies.from_file(str(self.store.body_path(record.id)), record.body_bytes)
        except BaseException:  # cancelled, or the file is unreadable: nothing was sent
            slot.release(Outcome.UNUSED)
            raise

        def send(url: str, expect: bool) -> Any:
            sent = CIMultiDict(record.headers)
            sent.update(self.proxy.upstream_extra(ex))
            return forward.send(
                self.proxy.session,
                method=record.method,
                url=url + record.path_qs,
                headers=sent,
                body=body,
                expect100=expect,
                continue_timeout_s=self.proxy.settings.connect_timeout_s,
            )

        try:
            upstream, slot, failed = await self.proxy.bind_exchange(ex, body, slot, send)
        except errors.ClientFacingError as exc:
            await self.finish(record, JobStatus.FAILED, exc)
            return
        finally:
            if not body.adopted:
                body.close()
        live.slot, live.phase = slot, "result"
        if slot.pod_id != record.pod:  # pod_busy or refused: it went to another pod
            record = self.store.update(record.id, pod=slot.pod_id) or record
        await self._store_answer(record, upstream, slot, failed=failed)

    async def _store_answer(
        self, record: JobRecord, upstream: aiohttp.ClientResponse, slot: Slot, *, failed: bool
    ) -> None:
        """Write the pod's answer to the result file as it arrives; free the slot when
        the pod sent its last byte."""
        out = ResultFile(self.store.result_path(record.id))
        broke = False
        error_head = bytearray()  # an error's first bytes say whose fault it was
        try:
            try:
                async for chunk in upstream.content.iter_chunked(forward.CHUNK):
                    if upstream.status >= 500 and len(error_head) < ERROR_HEAD_BYTES:
                        error_head += chunk[: ERROR_HEAD_BYTES - len(error_head)]
                    await out.write(chunk)
            except aiohttp.ClientError as exc:
                broke = True
                log.warning("pod %s broke off job %s: %r", slot.pod_id, record.id[:6], exc)
            finally:
                if broke or failed:
                    slot.release(Outcome.FAILED)
                else:
                    outcome, fault = outcome_of(upstream.status, bytes(error_head))
                    if fault is not None:
                        self.proxy.metrics.request_fault(fault)
                    slot.release(outcome)
                upstream.release()
        finally:
            await out.close()
        size = out.size
        if broke:
            self.proxy.metrics.backend_error(pod=slot.pod_id, kind=errors.UpstreamKind.BROKE_OFF)
            answer = errors.BackendError(f"pod {slot.pod_id}: the answer broke off")
            await self.finish(record, JobStatus.FAILED, answer)
            return
        ok = 200 <= upstream.status < 300 and not failed
        headers = tuple(
            (k, v)
            for k, v in forward.response_headers(upstream).items()
            if k.lower() != "content-length"
        )
        await self.finish(
            record,
            JobStatus.SUCCEEDED if ok else JobStatus.FAILED,
            None,
            error=None if ok else f"pod_status_{upstream.status}",
            result=(upstream.status, headers, size),
        )

    # ---- the end ------------------------------------------------------------------------

    async def finish(
        self,
        record: JobRecord,
        status: JobStatus,
        answer: errors.ClientFacingError | None,
        *,
        error: str | None = None,
        result: tuple[int, tuple[tuple[str, str], ...], int] | None = None,
    ) -> JobRecord:
        """Record the end; ``answer``: the error the synchronous call would have answered
        (stored as the result); ``result``: the pod's answer already in the result file."""
        if answer is not None:
            data = json.dumps(answer.body()).encode()
            await run_io(self.store.result_path(record.id).write_bytes, data)
            result = (answer.status, (("Content-Type", "application/json"),), len(data))
            error = answer.code
        status_code, headers, size = result or (None, (), 0)
        self.store.body_path(record.id).unlink(missing_ok=True)
        final = (
            self.store.update(
                record.id,
                status=status,
                error=error,
                finished_at=time.time(),
                result_status=status_code,
                result_headers=headers,
                result_bytes=size,
                body_bytes=0,
            )
            or record
        )
        self.on_finish()
        if final.callback_url and final.callback_state == CALLBACK_PENDING:
            self.notify(final)
        return final

    def notify(self, record: JobRecord) -> None:
        """Send ``record``'s callback in the background; its state is stored."""

        async def deliver() -> None:
            assert record.callback_url is not None
            outcome = await self.callbacks.deliver(record.callback_url, self.document(record))
            state = {"delivered": CALLBACK_DONE, "refused": CALLBACK_REFUSED}.get(
                outcome, CALLBACK_GAVE_UP
            )
            with contextlib.suppress(Exception):  # the store may be closed by now
                self.store.update(record.id, callback_state=state)

        self._background.spawn(deliver(), name=f"callback-{record.id[:6]}")

    # ---- cancel, restart, stop ----------------------------------------------------------

    async def cancel(self, job_id: str, *, wait_s: float = 10.0) -> None:
        """Queued: out of the queue. Running: the pod is interrupted (as when a client
        leaves). Being stored: it is as good as done; let it finish."""
        live = self.live.get(job_id)
        if live is None:
            return
        if live.phase == "queued" and self.gate.cancel_queued(live.ticket):
            pass  # its runner gets job_cancelled
        elif live.phase != "result" and live.task is not None:
            # running, or bound a moment ago (its runner has not resumed yet): cancel
            # the runner; the exchange's cancellation interrupts the pod or gives the
            # unused slot back
            live.cancel_requested = True
            live.task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.done.wait(), wait_s)

    async def recover(self, synced: Callable[[], bool]) -> None:
        """Account for every job the store holds from before this process started."""
        queued = []
        for record in self.store.unfinished():
            if record.status is JobStatus.RUNNING:
                detail = "the job was running when the proxy stopped; submit it again"
                await self.finish(record, JobStatus.FAILED, errors.InterruptedByRestart(detail))
            else:
                queued.append(record)
        for record in self.store.pending_callbacks():
            self.notify(record)
        if queued:  # static pods too are known only once discovery reported
            await self.gate.until(lambda _adm: synced(), timeout_s=RECOVER_WAIT_S)
        for record in queued:
            prefix, complete = await body_prefix(self.store.body_path(record.id))
            info = inspect_body(prefix, complete=complete)
            try:
                self.start(record, info, caller=None)
            except errors.ClientFacingError as exc:
                await self.finish(record, JobStatus.FAILED, exc)
        if queued:
            log.info("%d queued jobs taken up again from the job store", len(queued))

    async def close(self) -> None:
        tasks = [live.task for live in self.live.values() if live.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._background.cancel()


class ResultFile:
    """A pod's answer on its way to disk: held in memory up to ``BUFFER`` bytes, then
    written a ``BUFFER`` at a time in the executor (a small answer costs one hop)."""

    BUFFER = 1024 * 1024

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._parts: list[bytes] = []
        self._pending = 0
        self._handle: IO[bytes] | None = None
        self._inflight: asyncio.Future[None] | None = None

    async def write(self, chunk: bytes) -> None:
        self._parts.append(chunk)
        self._pending += len(chunk)
        self.size += len(chunk)
        if self._pending >= self.BUFFER:
            parts, self._parts, self._pending = self._parts, [], 0
            await self._in_thread(parts, False)

    async def close(self) -> None:
        if self._inflight is not None:  # a write its cancelled caller left running
            await asyncio.wait({self._inflight})
        parts, self._parts = self._parts, []
        await self._in_thread(parts, True)

    async def _in_thread(self, parts: list[bytes], last: bool) -> None:
        """One flush at a time: a cancelled caller leaves its thread to finish, and the
        next flush (``close``) waits for it instead of racing it for the handle."""
        future = asyncio.get_running_loop().run_in_executor(None, self._flush, parts, last)
        self._inflight = future
        await asyncio.shield(future)

    def _flush(self, parts: list[bytes], last: bool) -> None:  # in a thread
        if self._handle is None:
            self._handle = self.path.open("wb")
        self._handle.writelines(parts)
        if last:
            self._handle.close()


def cancelled_error() -> errors.JobCancelled:
    return errors.JobCancelled("the job was cancelled (DELETE /-/jobs/{id})")


#: an asynchronous job's exchange names no caller to the pod's gate beyond its keys
_NO_CALLER = Caller(header=None, cookie=None, address="", new_cookie=None, by_address=False)


async def body_prefix(path: Path) -> tuple[bytes, bool]:
    """The first bytes of a stored body (what ``inspect_body`` reads), and whether that
    is all of it."""

    def read() -> tuple[bytes, bool]:
        with path.open("rb") as fh:
            data = fh.read(PEEK_BYTES + 1)
        return data[:PEEK_BYTES], len(data) <= PEEK_BYTES

    try:
        return await run_io(read)
    except OSError:
        return b"", True


async def run_io(fn: Callable[..., T], *args: Any) -> T:
    """File I/O in the executor (a write may block on the disk)."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def open_io(path: Path, mode: str) -> IO[Any]:
    """``path.open(mode)`` in the executor. A caller cancelled while the thread opens it
    (a client gone) never leaks the file: it is closed as soon as the thread is done."""
    future = asyncio.get_running_loop().run_in_executor(None, path.open, mode)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_close_opened)
        raise


def _close_opened(future: asyncio.Future[IO[Any]]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def _priority(headers: dict[str, str]) -> int:
    """The job's X-Sdproxy-Priority as it was sent (checked at submit; a stored job taken
    up again after a restart keeps its class). Its deadline is not kept: an asynchronous
    job is polled for, it has no caller waiting on a deadline."""
    try:
        return priority_of(CIMultiDict(headers))
    except errors.BadRequest:
        return Priority.NORMAL
