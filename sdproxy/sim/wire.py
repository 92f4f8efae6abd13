"""Sim: how sd-webui puts its answers on the wire — compact JSON, gzip from 1000 bytes.

Starlette's ``JSONResponse`` writes compact JSON. sd-webui adds Starlette's
``GZipMiddleware(minimum_size=1000)`` (modules/initialize_util.py ``setup_middleware``):
when the request's ``Accept-Encoding`` contains "gzip" (a plain substring test, q-values
ignored), an answer of 1000 bytes or more is compressed at level 9 and gets
``Content-Encoding: gzip``, its compressed ``Content-Length`` and ``Vary: Accept-Encoding``;
a smaller one, or any answer to a client that did not ask, leaves untouched and without
``Vary``. Every sd-webui answer is one body (no streaming), so the whole body is compressed.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

GZIP_MINIMUM_SIZE: Final = 1000
GZIP_LEVEL: Final = 9
#: bodies above this are compressed in a worker thread (zlib releases the GIL), so one
#: 512² image answer (~15 ms at level 9) does not stall every pod of the process
THREAD_ABOVE: Final = 64 * 1024


def _compact(data: object) -> str:
    return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def json_answer(data: object, *, status: int = 200) -> web.Response:
    """A JSON answer as Starlette's JSONResponse renders it."""
    return web.json_response(data, status=status, dumps=_compact)


def _add_vary(response: web.StreamResponse, field: str) -> None:
    """MutableHeaders.add_vary_header."""
    existing = response.headers.get("Vary")
    response.headers["Vary"] = f"{existing}, {field}" if existing is not None else field


def _gzip(body: bytes) -> bytes:
    # mtime 0 (Starlette writes the clock; nothing reads it) so equal answers are equal bytes
    return gzip.compress(body, GZIP_LEVEL, mtime=0)


@web.middleware
async def gzip_answers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """GZipMiddleware(minimum_size=1000) around the routes and their HTTP errors."""
    response = await handler(request)
    if "gzip" not in request.headers.get("Accept-Encoding", ""):
        return response
    if not isinstance(response, web.Response):
        return response
    body = response.body
    if not isinstance(body, bytes) or len(body) < GZIP_MINIMUM_SIZE:
        return response
    if len(body) > THREAD_ABOVE:
        packed = await asyncio.to_thread(_gzip, body)
    else:
        packed = _gzip(body)
    response.body = packed
    response.headers["Content-Encoding"] = "gzip"
    _add_vary(response, "Accept-Encoding")
    return response
