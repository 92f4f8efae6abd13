"""Runtime: relay a client's websocket to a pod, frame by frame (the browser UI's queue).

Gradio 3's queue runs over ``/queue/join``, a websocket (gradio/routes.py ``join_queue``;
the browser's client in gradio/templates/frontend). An Upgrade request cannot be
forwarded as a plain GET — the pod answers 404 and the UI shows "Error" — so the proxy
opens its own websocket to the pod with the client's headers (cookies, origin), and only
once the pod accepted it answers the client's handshake; from then on each text or
binary message goes on as it came, in both directions, until either side closes (its
close code is passed on). Pings are answered on each leg (aiohttp's autoping). A pod
that refuses the handshake answers the client with its status (``backend_error`` if it
cannot be reached).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

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
    on_message: Callable[[str, str], None] | None = None,
) -> web.WebSocketResponse:
    """Relay ``request``'s websocket to ``url`` (``ws://`` or ``http://``). ``on_message``
    sees every text message (``"up"``: towards the pod, ``"down"``: towards the client)."""
    wanted = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    protocols = tuple(p for p in wanted if p)
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
    client = web.WebSocketResponse(protocols=protocols, max_msg_size=0)
    try:
        await client.prepare(request)
        await _pump_both(client, upstream, on_message)
    finally:
        await upstream.close()
        if not client.closed:
            await client.close(code=upstream.close_code or aiohttp.WSCloseCode.OK)
    return client


async def _pump_both(
    client: web.WebSocketResponse,
    upstream: aiohttp.ClientWebSocketResponse,
    on_message: Callable[[str, str], None] | None,
) -> None:
    up = asyncio.create_task(_pump(client, upstream, "up", on_message), name="ws-up")
    down = asyncio.create_task(_pump(upstream, client, "down", on_message), name="ws-down")
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (up, down):
            task.cancel()
        for task in (up, down):
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
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
