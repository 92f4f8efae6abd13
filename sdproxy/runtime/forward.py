"""Runtime: move one HTTP exchange between a client and a pod, streaming both ways.

Large bodies are never buffered whole in memory. A light call's request is sent as the
already-read prefix followed by the rest of the client's stream; a heavy one was received
whole before it took a slot (``sdproxy.runtime.body``) and is sent from there, as often as
a retry needs. The response is copied chunk by chunk (one of at most ``SMALL_BODY`` bytes
with a known length is read whole and answered in one write, the cheap path for the many
small light calls). ``Expect`` is never forwarded: the proxy answers its client's itself
(aiohttp's expect handler) and asks a gated pod with its own (``send(expect100=True)``).
aiohttp's client is built with ``auto_decompress=False`` so encoded bodies pass through
untouched.
aiohttp's client errors are translated here, at the boundary, into the ``UpstreamError``
classes of sdproxy.errors (connect failed, timeout, reset, broke off mid-answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict

from sdproxy.errors import (
    BodyTooLarge,
    ConnectFailed,
    MalformedBody,
    ResponseBrokeOff,
    UpstreamReset,
    UpstreamTimeout,
)
from sdproxy.runtime.body import ReceivedBody

log = logging.getLogger("sdproxy.forward")

# RFC 9110 §7.6.1: connection-specific fields are not forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: not forwarded to the pod: the hop-by-hop fields, Host (the pod's own is sent) and
#: Expect (RFC 9110 §10.1.1: the proxy answered its client's 100-continue; forwarded, it
#: would make the exchange wait for a pod's 100 the client no longer needs)
NOT_UPSTREAM = HOP_BY_HOP | {"host", "expect"}
#: aiohttp's client adds ``Accept-Encoding: gzip, deflate`` to a request without one; the
#: pod must see the client's own (none → none): sd-webui gzips whatever the request allows
NO_AUTO_ENCODING = ("Accept-Encoding",)
CHUNK = 256 * 1024
#: a pod response with a Content-Length up to this is read whole and answered with one
#: ``web.Response``, whose head and body leave in one write; a StreamResponse sends its
#: head at ``prepare`` and then each chunk, and those sends were the largest item in the
#: profile of small requests (bench overhead). Larger or unsized responses stream.
SMALL_BODY = 256 * 1024


@dataclass(kw_only=True)
class RequestBody:
    """A client body: the prefix already read, and whether more is still on the socket."""

    prefix: bytes
    complete: bool
    stream: aiohttp.StreamReader
    limit_bytes: int
    started: bool = False
    #: set when the stream went over the limit; aiohttp wraps what a payload raises
    overflow: BodyTooLarge | None = None

    def payload(self) -> bytes | AsyncIterator[bytes]:
        return self.prefix if self.complete else self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        self.started = True
        total = len(self.prefix)
        yield self.prefix
        async for chunk in self.stream.iter_any():
            total += len(chunk)
            if total > self.limit_bytes:
                self.overflow = BodyTooLarge(f"request body over {self.limit_bytes} bytes")
                raise self.overflow
            yield chunk

    @property
    def retryable(self) -> bool:
        return self.complete or not self.started


async def read_prefix(request: web.Request, *, peek_bytes: int, limit_bytes: int) -> RequestBody:
    """Read at most ``peek_bytes`` of the body (all of it when it is that small)."""
    length = request.content_length
    if length is not None and length > limit_bytes:
        raise BodyTooLarge(f"request body of {length} bytes is over the {limit_bytes} limit")
    parts: list[bytes] = []
    size = 0
    complete = False
    while size < peek_bytes:
        try:
            chunk = await request.content.read(peek_bytes - size)
        except RequestPayloadError as exc:  # aiohttp's parser: a broken chunk, a short body
            raise MalformedBody(f"the request body is malformed: {exc}") from exc
        if not chunk:
            complete = True
            break
        parts.append(chunk)
        size += len(chunk)
    else:
        complete = request.content.at_eof()
    if size > limit_bytes:
        raise BodyTooLarge(f"request body over {limit_bytes} bytes")
    return RequestBody(
        prefix=b"".join(parts), complete=complete, stream=request.content, limit_bytes=limit_bytes
    )


def _connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    """Fields the sender named in ``Connection`` are hop-by-hop too (RFC 9110 §7.6.1)."""
    value = headers.get("Connection")
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


def upstream_headers(request: web.Request, extra: Mapping[str, str]) -> CIMultiDict[str]:
    headers = _without(request.headers, NOT_UPSTREAM | _connection_tokens(request.headers))
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = request.scheme
    if request.host:
        headers["X-Forwarded-Host"] = request.host
    headers.update(extra)
    return headers


async def send(
    session: aiohttp.ClientSession,
    *,
    method: str,
    url: str,
    headers: CIMultiDict[str],
    body: RequestBody | ReceivedBody | bytes | None,
    expect100: bool = False,
    continue_timeout_s: float = 5.0,
) -> aiohttp.ClientResponse:
    """Send the request and return once the pod's response headers arrived.

    ``Accept-Encoding`` goes exactly as the client sent it, absent included.
    ``expect100``: send the head with ``Expect: 100-continue`` and the body only after the
    pod's ``100 Continue`` (a pod-side gate refuses a busy pod before any body byte); a
    received body then records in ``started`` whether its first byte went. A gate answers
    at once (100, or 503 busy): with neither within ``continue_timeout_s`` the exchange
    is dropped as never sent (``UpstreamTimeout``, ``sent=False``: retried elsewhere).
    """
    data: bytes | AsyncIterator[bytes] | AsyncIterator[bytes | bytearray] | None
    if isinstance(body, ReceivedBody):
        data = body.payload(track=expect100)
        headers["Content-Length"] = str(body.size)  # known now, even for a chunked upload
    else:
        data = body.payload() if isinstance(body, RequestBody) else body
    skip = None if "Accept-Encoding" in headers else NO_AUTO_ENCODING
    exchange = session.request(
        method,
        url,
        headers=headers,
        data=data,
        allow_redirects=False,
        skip_auto_headers=skip,
        expect100=expect100,
    )
    try:
        if expect100 and isinstance(body, ReceivedBody):
            return await _continued(exchange, body, url=url, timeout_s=continue_timeout_s)
        return await exchange
    except aiohttp.ClientConnectorError as exc:
        raise ConnectFailed(f"cannot connect to {url}: {exc}") from exc
    except aiohttp.ConnectionTimeoutError as exc:
        # a TimeoutError too, but nothing reached the pod: retry elsewhere, eject this one
        raise ConnectFailed(f"connecting to {url} timed out") from exc
    except BodyTooLarge:
        raise
    except TimeoutError as exc:
        raise UpstreamTimeout(f"{url} did not answer in time", sent=True) from exc
    except aiohttp.ClientError as exc:
        if isinstance(body, RequestBody) and body.overflow is not None:
            raise body.overflow from exc  # the client's fault, not the pod's
        if isinstance(body, ReceivedBody):
            sent = body.started
        else:
            sent = not isinstance(body, RequestBody) or body.started or body.complete
        raise UpstreamReset(f"{url}: {exc!r}", sent=sent) from exc


#: sd-webui's interrupt: stops whatever that process generates (modules/api/api.py)
INTERRUPT_PATH = "/sdapi/v1/interrupt"


async def post_interrupt(
    session: aiohttp.ClientSession, base_url: str, *, timeout_s: float
) -> bool:
    """Tell the sd-webui at ``base_url`` to interrupt its generation; False (logged) when
    it could not be reached."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with session.post(base_url + INTERRUPT_PATH, timeout=timeout) as resp:
            await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("could not interrupt %s: %r", base_url, exc)
        return False
    return True


def response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    return _without(upstream.headers, HOP_BY_HOP | _connection_tokens(upstream.headers))


def _without(source: Mapping[str, str], names: frozenset[str]) -> CIMultiDict[str]:
    """A copy of ``source`` (order and repeated fields kept) minus ``names``."""
    headers: CIMultiDict[str] = CIMultiDict()
    _drop(headers, source, names)
    return headers


def _drop(into: CIMultiDict[str], source: Mapping[str, str], names: frozenset[str]) -> None:
    """Add ``source`` to the empty ``into`` minus ``names``: copying in C and deleting the
    few present is cheaper than testing every field in Python."""
    into.extend(source)
    for name in names:
        if name in into:
            del into[name]  # every occurrence


async def _continued(
    exchange: Coroutine[Any, Any, aiohttp.ClientResponse],
    body: ReceivedBody,
    *,
    url: str,
    timeout_s: float,
) -> aiohttp.ClientResponse:
    """``exchange`` with Expect: the pod must say ``100 Continue`` (the body's first byte
    goes) or answer within ``timeout_s``; after that, only the backend timeout bounds it."""
    task = asyncio.ensure_future(exchange)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done and not body.started:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await task
            raise UpstreamTimeout(f"{url} sent no 100 Continue within {timeout_s:g} s", sent=False)
        return await task
    finally:
        if not task.done():
            task.cancel()


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    *,
    extra_headers: Mapping[str, str],
    before_prepare: Callable[[web.StreamResponse], None] | None = None,
    on_upstream_done: Callable[[bool, bytes | None], None] | None = None,
) -> tuple[web.StreamResponse, int]:
    """Copy the pod's response to the client; returns it and the body bytes sent.

    ``before_prepare`` may still add to the head (cookies) before it is sent.
    ``on_upstream_done(failed, body)`` is called once the POD has sent its whole response
    (or broke off), with the whole body if it was small enough to be read whole (an
    error's JSON always is), else None: the pod reads ahead up to ``READ_AHEAD`` bytes,
    so a slow client never keeps a GPU slot once the pod is done, and memory stays
    bounded per exchange.
    A response of at most ``SMALL_BODY`` bytes is read whole first and returned
    unprepared, for aiohttp to send in one write.
    """
    length = upstream.content_length
    if length is not None and length <= SMALL_BODY:
        return await _relay_small(
            request,
            upstream,
            extra_headers=extra_headers,
            before_prepare=before_prepare,
            on_upstream_done=on_upstream_done,
        )
    response = await _start(request, upstream, extra_headers, before_prepare)
    pipe = _Pipe(READ_AHEAD)
    pump = asyncio.create_task(pipe.fill(upstream, on_upstream_done))
    sent = 0
    try:
        async for chunk in pipe.drain():
            await response.write(chunk)
            sent += len(chunk)
    finally:
        if not pump.done():  # the client left: stop reading; the pod finished its work
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
    if pipe.error is not None:
        detail = f"response from pod broke off after {sent} bytes: {pipe.error!r}"
        raise ResponseBrokeOff(detail, response=response) from pipe.error
    await response.write_eof()
    return response, sent


async def _start(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    extra_headers: Mapping[str, str],
    before_prepare: Callable[[web.StreamResponse], None] | None,
) -> web.StreamResponse:
    """Send the pod's head to the client (with ours added) and return the response."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.update(response_headers(upstream))
    response.headers.update(extra_headers)
    if before_prepare is not None:
        before_prepare(response)
    if upstream.content_length is None and "Content-Length" not in response.headers:
        if request.version < aiohttp.HttpVersion11:
            response.force_close()  # HTTP/1.0 has no chunked encoding: the close ends it
        else:
            response.enable_chunked_encoding()
    await response.prepare(request)
    return response


async def _relay_small(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    *,
    extra_headers: Mapping[str, str],
    before_prepare: Callable[[web.StreamResponse], None] | None,
    on_upstream_done: Callable[[bool, bytes | None], None] | None,
) -> tuple[web.StreamResponse, int]:
    """``relay`` for a response of known, small length: read it all, answer it whole.

    If the pod breaks off, the client gets what ``relay`` would have sent it — the head,
    what arrived — and then ``ResponseBrokeOff`` cuts its connection.
    """
    parts: list[bytes] = []
    error: aiohttp.ClientError | None = None
    try:
        while chunk := await upstream.content.readany():
            parts.append(chunk)
    except aiohttp.ClientError as exc:
        error = exc
    if on_upstream_done is not None:
        on_upstream_done(error is not None, b"".join(parts))
    if error is not None:
        response = await _start(request, upstream, extra_headers, before_prepare)
        for part in parts:
            await response.write(part)
        sent = sum(map(len, parts))
        detail = f"response from pod broke off after {sent} bytes: {error!r}"
        raise ResponseBrokeOff(detail, response=response) from error
    body = parts[0] if len(parts) == 1 else b"".join(parts)
    # a StreamResponse written at once, not a web.Response: aiohttp keeps a connection's
    # last web.Response (and its body) until the next request on that connection, so
    # 10,000 idle keep-alive clients held 100 MB of answers (bench queue, 64x64 images);
    # aiohttp still sends the head with the body in one write
    small = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    _drop(small.headers, upstream.headers, HOP_BY_HOP | _connection_tokens(upstream.headers))
    small.headers.update(extra_headers)
    if request.method != "HEAD":  # a HEAD answer keeps the pod's Content-Length
        small.content_length = len(body)
    if before_prepare is not None:
        before_prepare(small)
    await small.prepare(request)
    await small.write_eof(body)
    return small, len(body)


#: bytes of a pod's response read ahead of a slow client (a 512² response is ~0.6 MB)
READ_AHEAD = 8 * 1024 * 1024


class _Pipe:
    """A byte-bounded buffer between the pod (``fill``) and the client (``drain``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.done = False
        self.error: BaseException | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    async def fill(
        self, upstream: aiohttp.ClientResponse, on_done: Callable[[bool, bytes | None], None] | None
    ) -> None:
        try:
            async for chunk in upstream.content.iter_chunked(CHUNK):
                self.chunks.append(chunk)
                self.size += len(chunk)
                self._readable.set()
                if self.size >= self.limit:
                    self._writable.clear()
                    await self._writable.wait()
        except aiohttp.ClientError as exc:
            self.error = exc
        finally:
            self.done = True
            self._readable.set()
            if on_done is not None:
                on_done(self.error is not None, None)

    async def drain(self) -> AsyncIterator[bytes]:
        while True:
            await self._readable.wait()
            while self.chunks:
                chunk = self.chunks.popleft()
                self.size -= len(chunk)
                if self.size < self.limit:
                    self._writable.set()
                yield chunk
            if self.done:
                return
            self._readable.clear()
