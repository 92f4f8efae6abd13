"""Runtime: who is calling, and which heavy job is theirs (for job-bound routes).

sd-webui's progress/interrupt/skip act on whatever runs on THAT pod (modules/progress.py,
modules/shared_state.py), so the proxy sends them to the pod running the caller's job.

The trust model (README "Who can reach a job"). A caller names itself with the
``X-Sdproxy-Client`` header or holds the ``sdproxy_client`` cookie the proxy gave it; a job
started with such an identity is indexed under that one identity only, and reachable with
it only. The client address identifies only the jobs sent with no identity at all
(``--address-identity``, on by default; such a job is also indexed under the cookie its
answer gives the caller): behind an ingress or a NAT every client has the same address,
so a caller that shares one must name itself. A job-bound call may name the job itself
(``X-Sdproxy-Job``: the id every heavy answer carries, or the heavy request proposed): it
reaches exactly that job, whoever asks — an unguessable capability, indexed by a hash of
the id so the key the pods' gates publish and peers are asked by does not give it away.
A poll is matched by the one most specific key it carries (``Caller.own_key``).

Keys are built in one place, ``_key``: the tenant's name prefixes every identity key
(header, cookie, address — in the index, the gates' occupancy, the peer queries), so a
caller reaches only the jobs of its own tenant by them, whatever identity it claims
(sdproxy.runtime.tenants); a job id stays the capability it is, whoever holds it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote

from aiohttp import hdrs, web

from sdproxy.core.queue import TicketId

CLIENT_HEADER = "X-Sdproxy-Client"
COOKIE = "sdproxy_client"
#: names a job: on a heavy request its proposed id, on a job-bound call the job to reach;
#: every heavy answer carries the job's id in it
JOB_HEADER = "X-Sdproxy-Job"
#: a proposed job id: URL-safe, and long enough not to be guessed (ours: 16 characters,
#: 96 random bits)
JOB_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")


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


def _key(kind: str, value: str, tenant: str = "") -> str:
    """The index key of one identity, scoped to its tenant."""
    return f"{quote(tenant, safe='')}/{kind}:{value}" if tenant else f"{kind}:{value}"


def job_key(job_id: str) -> str:
    """The key of a job named by its id: a hash, so what gates and peers see of it is
    not the capability itself. Not scoped to a tenant: the id is the capability (an
    asynchronous job is reached by it from anywhere)."""
    return _key("j", hashlib.blake2b(job_id.encode(), digest_size=16).hexdigest())


@dataclass(frozen=True, kw_only=True, slots=True)
class Caller:
    """The identities of one request, most specific first."""

    header: str | None
    cookie: str | None
    address: str
    #: a cookie value to set on the response (the request had none)
    new_cookie: str | None
    #: the X-Sdproxy-Job header: the job a job-bound call names, a heavy request's proposal
    job: str | None = None
    #: whether the address identifies a caller that gives no identity (--address-identity)
    by_address: bool = True
    #: the tenant the request belongs to (sdproxy.runtime.tenants): scopes every key
    tenant: str = ""

    @property
    def named(self) -> str | None:
        """The key of the identity the caller gave: its header, else its cookie."""
        if self.header:
            return _key("h", self.header, self.tenant)
        return _key("c", self.cookie, self.tenant) if self.cookie else None

    @property
    def keys(self) -> list[str]:
        """The keys a heavy job of this caller is indexed under: the identity it gave,
        else the cookie its answer gives it and (with address identity) its address."""
        if self.named:
            return [self.named]
        keys = [_key("c", self.new_cookie, self.tenant)] if self.new_cookie else []
        return [*keys, _key("a", self.address, self.tenant)] if self.by_address else keys

    @property
    def own_key(self) -> str | None:
        """The one key a job-bound call is matched by: the job it names, else the identity
        it gave, else (with address identity) its address; None: it reaches nothing."""
        if self.job:
            return job_key(self.job)
        return self.quota_key if self.named or self.by_address else None

    @property
    def quota_key(self) -> str:
        """Whose queue places a heavy job takes (--max-queued-per-client): the identity the
        caller gave, else its address (a caller without one gets a new cookie each time)."""
        return self.named or _key("a", self.address, self.tenant)

    @property
    def id(self) -> str:
        """The identity used in logs."""
        return self.header or self.cookie or self.new_cookie or self.address


#: the identities of the caller that sent a heavy request, for the pod's gate: another
#: replica finds a RUNNING job by the identity a job-bound call is matched by
CALLER_KEYS_HEADER = "X-Sdproxy-Caller"


def caller_keys_header(keys: list[str]) -> str:
    return ",".join(quote(key, safe=":") for key in keys)


def caller_keys_of(value: str | None) -> list[str]:
    return [unquote(k) for k in value.split(",")] if value else []


def identify(request: web.Request, *, by_address: bool = True) -> Caller:
    header = request.headers.get(CLIENT_HEADER) or None
    cookie = request.cookies.get(COOKIE) or None
    job = request.headers.get(JOB_HEADER) or None
    return Caller(
        header=header[:128] if header else None,
        cookie=cookie[:128] if cookie else None,
        address=request.remote or "unknown",
        new_cookie=None if (cookie or header) else new_token(),
        job=job,
        by_address=by_address,
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


@dataclass(frozen=True, kw_only=True, slots=True)
class LiveJob:
    """A heavy job the proxy holds now, as ``GET /-/jobs/{id}`` shows a synchronous one."""

    ticket: TicketId
    route: str
    owner: str
    #: wall-clock seconds (the job API's timestamps survive restarts)
    created_at: float


class JobIndex:
    """identity key -> the heavy jobs indexed under it still in the proxy, oldest first.

    A caller may have several (UI tabs, batch scripts sharing one X-Sdproxy-Client):
    job-bound calls go to the newest, and when it ends the next newest is found again.
    Each job is also listed under its owner (``Caller.quota_key``), for the per-caller cap.
    """

    def __init__(self) -> None:
        self._by_key: dict[str, list[TicketId]] = {}
        self._by_owner: dict[str, list[TicketId]] = {}
        self._keys: dict[TicketId, tuple[list[str], str, str]] = {}
        self._by_id: dict[str, LiveJob] = {}

    def add(self, caller: Caller, ticket: TicketId, *, job_id: str, route: str = "") -> list[str]:
        """Index a new job; returns its keys (for the pod's gate: X-Sdproxy-Caller)."""
        keys = [*caller.keys, job_key(job_id)]
        self.add_keys(keys, owner=caller.quota_key, ticket=ticket, job_id=job_id, route=route)
        return keys

    def add_keys(
        self, keys: list[str], *, owner: str, ticket: TicketId, job_id: str, route: str
    ) -> None:
        """Index a job under ``keys`` for ``owner`` (an asynchronous job taken up again
        after a restart has only its id's key)."""
        self._keys[ticket] = (keys, owner, job_id)
        self._by_id[job_id] = LiveJob(
            ticket=ticket, route=route, owner=owner, created_at=time.time()
        )
        for key in keys:
            self._by_key.setdefault(key, []).append(ticket)
        self._by_owner.setdefault(owner, []).append(ticket)

    def remove(self, ticket: TicketId) -> None:
        found = self._keys.pop(ticket, None)
        if found is None:
            return
        keys, owner, job_id = found
        self._by_id.pop(job_id, None)
        for key in keys:
            _drop(self._by_key, key, ticket)
        _drop(self._by_owner, owner, ticket)

    def find(self, caller: Caller) -> TicketId | None:
        key = caller.own_key
        return None if key is None else self.find_key(key)

    def find_key(self, key: str) -> TicketId | None:
        """The newest job indexed under ``key`` (a peer replica asks by key)."""
        tickets = self._by_key.get(key)
        return tickets[-1] if tickets else None

    def by_id(self, job_id: str) -> LiveJob | None:
        """The job named ``job_id``, while the proxy holds it."""
        return self._by_id.get(job_id)

    def owned(self, caller: Caller) -> list[TicketId]:
        """The jobs the caller owns (``Caller.quota_key``), oldest first."""
        return list(self._by_owner.get(caller.quota_key, ()))

    def __len__(self) -> int:
        return len(self._keys)


def _drop(index: dict[str, list[TicketId]], key: str, ticket: TicketId) -> None:
    tickets = index.get(key)
    if tickets is None:
        return
    tickets.remove(ticket)
    if not tickets:
        del index[key]
