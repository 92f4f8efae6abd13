"""Runtime: receive a heavy request's whole body before it may take a GPU slot.

A slot bound to a request whose body is still on its way is a GPU kept idle by the
client's upload: a slow phone sending a 10 MB img2img, a client that stalls or sends a
malformed chunk. So the proxy receives the body first (``receive``) and only then queues
it. The first ``MEMORY_BYTES`` stay in memory; a larger body goes whole to an unnamed
temporary file (``Spool``: ``tempfile.TemporaryFile``, in ``$TMPDIR`` or ``/tmp``; the file
has no name, so it is gone when closed and when the process dies), written and read
``SPOOL_CHUNK`` at a time in the default executor: a write can block on the disk, and the
loop serves every other request meanwhile. A body so received can be sent to a pod any
number of times (``payload``): a pod's gate that answers ``pod_busy`` is no loss.

``--max-body-mb`` still bounds the whole body (413), and the caller bounds the time the
upload may take (``--client-body-timeout-s``, 408); a body whose framing breaks (a
malformed chunk) is the client's ``400``. None of it ever reaches a pod.

All spools together stay within ``--spool-max-mb`` (``SpoolBudget``): a body whose size is
announced takes its whole share before its first byte is read, a chunked one grows its
share as it arrives; a body that does not fit is ``503 spool_full`` with Retry-After (it
fits once queued bodies have gone to their pods), and the share returns when the spool
is closed. Many concurrent large uploads thus never fill the disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import IO, Any, TypeVar

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from sdproxy.errors import BodyTooLarge, InternalError, MalformedBody, SpoolFull

log = logging.getLogger("sdproxy.body")

#: a body up to this stays in memory (and goes to a pod in one write); a larger one is
#: spooled to disk, so memory per request stays near this whatever the body's size
MEMORY_BYTES = 1024 * 1024
#: bytes per write to and read from the spool (one executor hop each)
SPOOL_CHUNK = 256 * 1024

T = TypeVar("T")
#: how soon a client refused spool_full may try again
SPOOL_RETRY_S = 5


class SpoolBudget:
    """The bytes every spool of this process may hold together (0: no bound)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, size: int) -> None:
        self.check(size)
        self.used += size

    def check(self, size: int) -> None:
        """Raise ``SpoolFull`` unless ``size`` more bytes fit now."""
        if self.max_bytes and self.used + size > self.max_bytes:
            raise SpoolFull(
                f"the proxy holds {self.used} bytes of request bodies waiting for pods, "
                f"at its --spool-max-mb bound; retry shortly",
                retry_after_s=SPOOL_RETRY_S,
            )

    def give_back(self, size: int) -> None:
        self.used -= size


UNBOUNDED = SpoolBudget(0)


class Spool:
    """An unnamed temporary file used from the loop, its I/O in executor threads.

    A thread still running after its caller was cancelled (the client left) must never
    find its descriptor closed, or reused by another file: ``close`` only marks the
    spool, and the file is closed once no thread uses it.
    """

    def __init__(self, budget: SpoolBudget = UNBOUNDED) -> None:
        self._file: IO[bytes] | None = None
        self._busy = 0
        self._closed = False
        self._budget = budget
        #: this spool's share of the budget
        self.reserved = 0

    def reserve(self, size: int) -> None:
        """Make sure the spool may hold ``size`` bytes (raises ``SpoolFull``)."""
        if size > self.reserved:
            self._budget.take(size - self.reserved)
            self.reserved = size

    async def open(self) -> None:
        await self._run(self._create)

    def _create(self) -> None:  # in a thread
        self._file = tempfile.TemporaryFile(buffering=0)  # noqa: SIM115 (closed by close)

    async def open_file(self, path: str) -> None:
        """Read an existing file instead (an asynchronous job's stored body)."""
        await self._run(self._open_path, path)

    def _open_path(self, path: str) -> None:  # in a thread
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close)

    async def write(self, parts: list[bytes]) -> None:
        """Append ``parts`` (handed over: the caller makes a new list)."""
        await self._run(self._write_all, parts)

    def _write_all(self, parts: list[bytes]) -> None:  # in a thread
        assert self._file is not None
        for part in parts:
            view = memoryview(part)
            while view:  # a raw file may write less than asked
                view = view[self._file.write(view) or 0 :]

    async def read(self, offset: int, size: int) -> bytearray:
        # the buffer is allocated here, on the loop's thread: bytes made in a worker
        # thread come from that thread's malloc arena, which keeps what it once held
        # (RSS grew by several MiB per executor thread)
        buffer = bytearray(size)
        got = await self._run(self._read_into, buffer, offset)
        del buffer[got:]
        return buffer

    def _read_into(self, buffer: bytearray, offset: int) -> int:  # in a thread
        assert self._file is not None
        return os.preadv(self._file.fileno(), [buffer], offset)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise OSError("the request body's spool is closed")
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._busy += 1
        future.add_done_callback(self._done)
        # shielded: a cancelled caller leaves the thread to finish; ``_done`` runs then
        return await asyncio.shield(future)

    def _done(self, _future: object) -> None:
        self._busy -= 1
        if self._closed and not self._busy:
            self._close_file()

    def close(self) -> None:
        if not self._closed:
            self._budget.give_back(self.reserved)
        self._closed = True
        if not self._busy:
            self._close_file()

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()


class ReceivedBody:
    """A client's whole body: in memory (``data``), or in a ``Spool``. ``close`` frees it
    (the spool's file); ``adopted`` says a background task (an abandoned exchange still
    sending it) took that over."""

    def __init__(self, *, data: bytes, size: int, spool: Spool | None) -> None:
        #: the whole body when ``spool`` is None (else empty: it is all in the spool)
        self.data = data
        self.size = size
        self.spool = spool
        #: the body's first byte was handed to a pod connection (``payload(track=True)``;
        #: an untracked payload counts as started at once)
        self.started = False
        self.adopted = False

    def payload(self, *, track: bool = False) -> bytes | AsyncIterator[bytes | bytearray]:
        """What aiohttp sends, from the start (every call). ``track``: record in
        ``started`` when the first byte goes (after a ``100 Continue``, with Expect)."""
        if self.spool is None and not track:
            self.started = True
            return self.data
        self.started = False
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes | bytearray]:
        self.started = True
        async for chunk in self.chunks():
            yield chunk

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()

    async def chunks(self) -> AsyncIterator[bytes | bytearray]:
        """The whole body again, without touching ``started`` (to copy it elsewhere)."""
        if self.spool is None:
            yield self.data
            return
        offset = 0
        while offset < self.size:
            chunk = await self.spool.read(offset, SPOOL_CHUNK)
            if not chunk:
                raise OSError(f"request body spool ended at {offset} of {self.size} bytes")
            offset += len(chunk)
            yield chunk


async def from_file(path: str, size: int) -> ReceivedBody:
    """A body stored in a file (read from there whenever it is sent)."""
    spool = Spool()
    await spool.open_file(path)
    return ReceivedBody(data=b"", size=size, spool=spool)


async def receive(
    request: web.Request,
    *,
    prefix: bytes,
    complete: bool,
    limit_bytes: int,
    budget: SpoolBudget = UNBOUNDED,
) -> ReceivedBody:
    """Read the rest of the body after the ``prefix`` already read (``complete``: that
    was all of it). Raises ``BodyTooLarge`` over ``limit_bytes``, ``MalformedBody`` when
    its framing breaks, ``SpoolFull`` when the spools' ``budget`` cannot hold it; the
    caller bounds the time it takes."""
    if complete:
        return ReceivedBody(data=prefix, size=len(prefix), spool=None)
    length = request.content_length
    if length is not None and length > limit_bytes:
        raise BodyTooLarge(f"request body of {length} bytes is over the {limit_bytes} limit")
    sink = _Sink(budget)
    try:
        if length is not None and length > MEMORY_BYTES:
            await sink.spill(length)  # it cannot stay in memory: to disk from the first byte
        await sink.add(prefix)
        while chunk := await _read(request):
            if sink.size + len(chunk) > limit_bytes:
                raise BodyTooLarge(f"request body over {limit_bytes} bytes")
            await sink.add(chunk)
        return await sink.finish()
    except BaseException:
        sink.close()
        raise


class _Sink:
    """Where ``receive`` puts the body: memory until ``MEMORY_BYTES``, then a spool,
    written ``SPOOL_CHUNK`` at a time."""

    def __init__(self, budget: SpoolBudget) -> None:
        self.parts: list[bytes] = []
        self.pending = 0
        self.size = 0
        self.spool: Spool | None = None
        self.budget = budget

    async def spill(self, expected: int = 0) -> None:
        spool = Spool(self.budget)
        spool.reserve(max(expected, self.size))  # before the file: SpoolFull costs nothing
        self.spool = spool
        await _spooling(spool.open())

    async def add(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.parts.append(chunk)
        self.pending += len(chunk)
        self.size += len(chunk)
        if self.spool is None and self.size > MEMORY_BYTES:
            await self.spill()
        if self.spool is not None:
            self.spool.reserve(self.size)  # a chunked body grows its share as it comes
        if self.spool is not None and self.pending >= SPOOL_CHUNK:
            await self._flush(self.spool)

    async def _flush(self, spool: Spool) -> None:
        parts, self.parts, self.pending = self.parts, [], 0
        await _spooling(spool.write(parts))

    async def finish(self) -> ReceivedBody:
        if self.spool is None:
            return ReceivedBody(data=b"".join(self.parts), size=self.size, spool=None)
        await self._flush(self.spool)
        return ReceivedBody(data=b"", size=self.size, spool=self.spool)

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()


async def _read(request: web.Request) -> bytes:
    """The next piece of the body as aiohttp received it (b"" at its end): ``readchunk``
    hands over its buffered pieces, where ``readany`` would copy them all into one."""
    try:
        while True:
            data, chunk_end = await request.content.readchunk()
            if data or not chunk_end:  # (b"", True) only marks an HTTP chunk's end
                return data
    except RequestPayloadError as exc:  # aiohttp's parser: a malformed chunk, a short body
        raise MalformedBody(f"the request body is malformed: {exc}") from exc


async def _spooling(operation: Awaitable[None]) -> None:
    """A spool operation; a failing disk is the proxy's 500, said once in the log."""
    try:
        await operation
    except OSError as exc:
        log.error("cannot spool a request body to a temporary file: %r", exc)
        raise InternalError(f"cannot spool the request body: {exc}") from exc
