"""Runtime: relay a client's websocket to a pod, frame by frame (the browser UI's queue).

Gradio 3's queue runs over ``/queue/join``, a websocket (gradio/routes.py ``join_queue``;
the browser's client in gradio/templates/frontend). An Upgrade request cannot be
forwarded as a plain GET — the pod answers 404 and the UI shows "Error" — so the proxy
opens its own websocket to the pod with the client's headers (cookies, origin), and only
once the pod accepted it answers the client's handshake; from then on each text or
binary message goes on as it came, in both directions, until either side closes (its
close code is passed on). Pings are answered on each leg (aiohttp's autoping). A pod
that refuses the handshake or cannot be reached is ``502 backend_error``; a client
handshake that is not a valid websocket one is ``400 bad_request``, before the pod is
asked. A client message over ``max_msg_size`` closes that websocket (1009); ``until``
set (the UI session ended) closes both legs (1001). With ``heartbeat_s`` the client is
pinged that often and a client that does not answer within half of it (it vanished
without closing: a lost network) is closed, not held open for TCP keepalive's hours.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from sdproxy import errors

#: handshake headers aiohttp's ws_connect writes itself
HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "upgrade",
        "connection",
        "content-length",
        "transfer-encoding",
    }
)


def is_upgrade(request: web.Request) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


async def relay(
    request: web.Request,
    session: aiohttp.ClientSession,
    *,
    url: str,
    headers: Mapping[str, str],
    max_msg_size: int,
    heartbeat_s: float | None = None,
    on_message: Callable[[str, str], None] | None = None,
    until: asyncio.Event | None = None,
) -> web.WebSocketResponse:
    """Relay ``request``'s websocket to ``url`` (``ws://`` or ``http://``). ``on_message``
    sees every text message (``"up"``: towards the pod, ``"down"``: towards the client)."""
    wanted = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    protocols = tuple(p for p in wanted if p)
    client = web.WebSocketResponse(
        protocols=protocols, max_msg_size=max_msg_size, heartbeat=heartbeat_s
    )
    if not client.can_prepare(request).ok:
        raise errors.BadRequest(
            f"GET {request.path} asks for a websocket but is no valid websocket handshake "
            "(RFC 6455 4.1: Connection: Upgrade, Sec-WebSocket-Key, Sec-WebSocket-Version 13)"
        )
    outgoing = {k: v for k, v in headers.items() if k.lower() not in HANDSHAKE}
    try:
        upstream = await session.ws_connect(
            url,
            headers=outgoing,
            protocols=protocols,
            max_msg_size=0,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
            compress=0,
        )
    except aiohttp.WSServerHandshakeError as exc:
        raise errors.BackendError(
            f"the pod refused the websocket to {request.path}: {exc.status} {exc.message}"
        ) from exc
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise errors.BackendError(f"websocket to {url} failed: {exc!r}") from exc
    try:
        await client.prepare(request)
        await _pump_both(client, upstream, on_message, until)
    finally:
        await upstream.close()
        if client.prepared and not client.closed:
            await client.close(code=upstream.close_code or aiohttp.WSCloseCode.OK)
    return client


async def _pump_both(
    client: web.WebSocketResponse,
    upstream: aiohttp.ClientWebSocketResponse,
    on_message: Callable[[str, str], None] | None,
    until: asyncio.Event | None,
) -> None:
    up = asyncio.create_task(_pump(client, upstream, "up", on_message), name="ws-up")
    down = asyncio.create_task(_pump(upstream, client, "down", on_message), name="ws-down")
    tasks: set[asyncio.Task[Any]] = {up, down}
    if until is not None:
        tasks.add(asyncio.create_task(until.wait(), name="ws-until"))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
    if until is not None and until.is_set():
        # the client first: a pod that vanished may never answer the upstream close
        await client.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"UI session ended")
        await upstream.close(code=aiohttp.WSCloseCode.GOING_AWAY)
        return
    if up in done and not upstream.closed:
        await upstream.close(code=client.close_code or aiohttp.WSCloseCode.OK)
    if down in done and not client.closed:
        await client.close(code=upstream.close_code or aiohttp.WSCloseCode.OK)


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    direction: str,
    on_message: Callable[[str, str], None] | None,
) -> None:
    async for msg in source:
        if msg.type is aiohttp.WSMsgType.TEXT:
            if on_message is not None:
                on_message(direction, msg.data)
            await sink.send_str(msg.data)
        elif msg.type is aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type is aiohttp.WSMsgType.ERROR:
            return
