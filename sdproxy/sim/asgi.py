"""Sim: serve an ASGI application (Gradio's FastAPI app) from an aiohttp handler.

``sdproxy sim --ui`` mounts a real Gradio app on each simulated pod, on the pod's own
port next to the sd-webui API, as sd-webui does (modules/api/api.py adds its routes to
Gradio's FastAPI app). The sim is aiohttp, so this adapter speaks the ASGI protocol
(asgi.readthedocs.io, "HTTP & WebSocket spec") to the app for one request: an HTTP
exchange streamed as the app sends it, or a websocket relayed message by message. Both
run on the sim's loop, so Gradio's functions share the pod's lock with the API.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Message, Receive, Send], Awaitable[None]]


def _scope(request: web.Request, kind: str) -> dict[str, Any]:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    scheme = "ws" if kind == "websocket" else "http"
    return {
        "type": kind,
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": f"{request.version.major}.{request.version.minor}",
        "method": request.method,
        "scheme": scheme,
        "path": request.path,
        "raw_path": request.raw_path.split("?", 1)[0].encode(),
        "query_string": request.query_string.encode(),
        "root_path": "",
        "headers": [(k.lower(), v) for k, v in request.raw_headers],
        "client": tuple(peer[:2]) if peer else None,
        "server": tuple(sock[:2]) if sock else None,
        "subprotocols": [],
    }


async def serve(app: AsgiApp, request: web.Request) -> web.StreamResponse:
    """Answer ``request`` with the ASGI ``app`` (a websocket upgrade or plain HTTP)."""
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _websocket(app, request)
    return await _http(app, request)


async def _http(app: AsgiApp, request: web.Request) -> web.StreamResponse:
    body = await request.read()
    delivered = False
    done = asyncio.Event()
    response: web.StreamResponse | None = None

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal response
        if message["type"] == "http.response.start":
            headers: CIMultiDict[str] = CIMultiDict()
            for key, value in message.get("headers", []):
                headers.add(key.decode("latin-1"), value.decode("latin-1"))
            response = web.StreamResponse(status=message["status"], headers=headers)
            return
        if message["type"] != "http.response.body" or response is None:
            return
        if not response.prepared:
            await response.prepare(request)
        chunk = message.get("body", b"")
        if chunk:
            await response.write(chunk)
        if not message.get("more_body", False):
            await response.write_eof()
            done.set()

    try:
        await app(_scope(request, "http"), receive, send)
    finally:
        done.set()
    if response is None:
        return web.Response(status=500, text="the ASGI app sent no response")
    if not response.prepared:
        await response.prepare(request)
        await response.write_eof()
    return response


async def _websocket(app: AsgiApp, request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(autoping=True)
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    inbox.put_nowait({"type": "websocket.connect"})
    reader: asyncio.Task[None] | None = None
    refused: web.Response | None = None

    async def read() -> None:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                inbox.put_nowait({"type": "websocket.receive", "text": msg.data})
            elif msg.type is aiohttp.WSMsgType.BINARY:
                inbox.put_nowait({"type": "websocket.receive", "bytes": msg.data})
        inbox.put_nowait({"type": "websocket.disconnect", "code": ws.close_code or 1000})

    async def send(message: Message) -> None:
        nonlocal reader, refused
        kind = message["type"]
        if kind == "websocket.accept":
            await ws.prepare(request)
            reader = asyncio.create_task(read(), name="sim-asgi-ws-read")
        elif kind == "websocket.send" and ws.prepared and not ws.closed:
            if message.get("text") is not None:
                await ws.send_str(message["text"])
            else:
                await ws.send_bytes(message.get("bytes") or b"")
        elif kind == "websocket.close":
            if ws.prepared:
                await ws.close(code=message.get("code", 1000))
            else:
                refused = web.Response(status=403, text="websocket refused")

    try:
        await app(_scope(request, "websocket"), inbox.get, send)
    finally:
        if reader is not None:
            await ws.close()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    if not ws.prepared:
        return refused or web.Response(status=403, text="websocket refused")
    return ws
