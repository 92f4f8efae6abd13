"""Runtime: the operator's bearer token in front of the operational endpoints.

``--ops-token`` guards /-/status, /-/metrics, /-/peer* (and /metrics on --metrics-listen)
wherever they are served; the probes /-/healthz and /-/readyz stay open. The comparison
is constant-time, so the token cannot be learned byte by byte from answer timings.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from sdproxy.errors import Unauthorized

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def guarded(handler: Handler, token: str) -> Handler:
    """``handler`` behind ``Authorization: Bearer <token>`` (unguarded when no token)."""
    if not token:
        return handler
    expected = f"Bearer {token}".encode()

    async def check(request: web.Request) -> web.StreamResponse:
        given = request.headers.get(hdrs.AUTHORIZATION, "").encode("utf-8", "replace")
        if hmac.compare_digest(given, expected):
            return await handler(request)
        exc = Unauthorized("this endpoint needs the operator's bearer token (--ops-token)")
        return web.json_response(
            exc.body(),
            status=exc.status,
            headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="sdproxy"'},
        )

    return check
