"""Runtime: who is calling, and which heavy job is theirs (for job-bound routes).

sd-webui's progress/interrupt/skip act on whatever runs on THAT pod (modules/progress.py,
modules/shared_state.py), so the proxy sends them to the pod running the caller's job.
The caller is the ``X-Sdproxy-Client`` header, else the ``sdproxy_client`` cookie the proxy
sets, else the client address. A job is indexed under every identity the request had; a
poll is matched by the most specific identity it carries only — a caller that names itself
is never matched by an address it may share with other callers (NAT, a gateway), or it
would read, or interrupt, someone else's generation.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from urllib.parse import quote, unquote

from aiohttp import hdrs, web

from sdproxy.core.queue import TicketId

CLIENT_HEADER = "X-Sdproxy-Client"
COOKIE = "sdproxy_client"


#: random bytes drawn from the OS in batches: one getrandom() per request (a token, a
#: request id) showed in the proxy's profile; the bytes are the same CSPRNG's
_POOL_BYTES = 4096
_pool = b""
_pool_at = 0


def random_bytes(n: int) -> bytes:
    """``n`` bytes from ``os.urandom`` (as ``secrets`` uses), fetched 4 KiB at a time."""
    global _pool, _pool_at
    if _pool_at + n > len(_pool):
        _pool, _pool_at = os.urandom(max(_POOL_BYTES, n)), 0
    start = _pool_at
    _pool_at += n
    return _pool[start:_pool_at]


def new_token() -> str:
    """What ``secrets.token_urlsafe(12)`` returns: 16 URL-safe characters, 96 bits."""
    return base64.urlsafe_b64encode(random_bytes(12)).rstrip(b"=").decode("ascii")


def new_request_id() -> str:
    """32 hex digits, 128 random bits (like ``uuid4().hex``, without the UUID object)."""
    return random_bytes(16).hex()


@dataclass(frozen=True, kw_only=True, slots=True)
class Caller:
    """The identities of one request, most specific first."""

    header: str | None
    cookie: str | None
    address: str
    #: a cookie value to set on the response (the request had none)
    new_cookie: str | None

    @property
    def keys(self) -> list[str]:
        keys = []
        if self.header:
            keys.append("h:" + self.header)
        if self.cookie or self.new_cookie:
            keys.append("c:" + (self.cookie or self.new_cookie or ""))
        keys.append("a:" + self.address)
        return keys

    @property
    def own_key(self) -> str:
        """The one key a poll is matched by: the name the caller gave, else its address."""
        if self.header:
            return "h:" + self.header
        if self.cookie:
            return "c:" + self.cookie
        return "a:" + self.address

    @property
    def id(self) -> str:
        """The identity used in logs."""
        return self.header or self.cookie or self.new_cookie or self.address


#: the identities of the caller that sent a heavy request, for the pod's gate: another
#: replica finds a RUNNING job by the identity a job-bound call is matched by
CALLER_KEYS_HEADER = "X-Sdproxy-Caller"


def caller_keys_header(caller: Caller) -> str:
    return ",".join(quote(key, safe=":") for key in caller.keys)


def caller_keys_of(value: str | None) -> list[str]:
    return [unquote(k) for k in value.split(",")] if value else []


def identify(request: web.Request) -> Caller:
    header = request.headers.get(CLIENT_HEADER) or None
    cookie = request.cookies.get(COOKIE) or None
    return Caller(
        header=header[:128] if header else None,
        cookie=cookie[:128] if cookie else None,
        address=request.remote or "unknown",
        new_cookie=None if (cookie or header) else new_token(),
    )


def set_cookie(response: web.StreamResponse, caller: Caller) -> None:
    """Give a new caller its cookie (once, and only while the head can still change).

    The header is written directly: it is the exact text ``response.set_cookie(COOKIE,
    value, httponly=True, samesite="Lax", path="/")`` produces, without building a
    ``Morsel`` per response (the token is URL-safe base64, which needs no quoting).
    """
    if not caller.new_cookie or response.prepared:
        return
    value = f"{COOKIE}={caller.new_cookie}; HttpOnly; Path=/; SameSite=Lax"
    if value not in response.headers.getall(hdrs.SET_COOKIE, ()):
        response.headers.add(hdrs.SET_COOKIE, value)


class JobIndex:
    """caller identity -> their heavy jobs still in the proxy, oldest first.

    A caller may have several (UI tabs, batch scripts sharing one X-Sdproxy-Client):
    job-bound calls go to the newest, and when it ends the next newest is found again.
    """

    def __init__(self) -> None:
        self._by_key: dict[str, list[TicketId]] = {}
        self._keys: dict[TicketId, list[str]] = {}

    def add(self, caller: Caller, ticket: TicketId) -> None:
        keys = caller.keys
        self._keys[ticket] = keys
        for key in keys:
            self._by_key.setdefault(key, []).append(ticket)

    def remove(self, ticket: TicketId) -> None:
        for key in self._keys.pop(ticket, []):
            tickets = self._by_key.get(key)
            if tickets is None:
                continue
            tickets.remove(ticket)
            if not tickets:
                del self._by_key[key]

    def find(self, caller: Caller) -> TicketId | None:
        return self.find_key(caller.own_key)

    def find_key(self, key: str) -> TicketId | None:
        """The newest job indexed under ``key`` (a peer replica asks by key)."""
        tickets = self._by_key.get(key)
        return tickets[-1] if tickets else None

    def __len__(self) -> int:
        return len(self._keys)
