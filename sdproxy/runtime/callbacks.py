"""Runtime: job callbacks — POST a finished job's status document to the caller's URL.

A job submitted with ``X-Sdproxy-Callback: <url>`` is announced there when it ends: the
status document (never the images: its ``urls.result`` says where they are), signed
``X-Sdproxy-Signature: sha256=<hex HMAC-SHA256 of the body with --callback-secret>``
(the shape GitHub's webhooks use), retried with doubling back-off (1 s, 2 s … 30 s) for
``--callback-retry-s``. A 2xx answer delivers it; anything else, or no answer, is retried.

Where a callback may go (SSRF: a job must not be a way to reach inside the cluster). With
``--callback-allow`` patterns, only a destination matching one is allowed: a host name
(``hooks.example.com``, ``*.example.com``) or an address range (``10.1.2.0/24``). Without
any, every public address is allowed and loopback, private (RFC 1918, fc00::/7),
link-local (169.254.0.0/16: cloud metadata), shared, reserved, multicast and unspecified
ones are refused, also when spelled as IPv6 that carries such an IPv4 address (mapped,
compatible, NAT64, 6to4); a numeric host that is no plain address (``2130706433``,
``0177.0.0.1``, ``127.1``) is refused outright. The check is made at submit (a refused
URL is ``400 bad_request``) and again on every address the name resolves to when it is
sent, inside the connector's resolver, so a name re-pointed to 127.0.0.1 after the submit
(DNS rebinding) is still refused. Redirects are never followed.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from sdproxy.errors import BadRequest, ConfigError

log = logging.getLogger("sdproxy.callbacks")

CALLBACK_HEADER = "X-Sdproxy-Callback"
SIGNATURE_HEADER = "X-Sdproxy-Signature"
#: sdproxy_callbacks_total{outcome}
OUTCOMES = ("delivered", "retried", "failed", "refused")
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0
ATTEMPT_TIMEOUT_S = 10.0

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refused(OSError):
    """A callback destination the policy does not allow (an OSError: aiohttp's connector
    wraps what its resolver raises so, in ``ClientConnectorError.os_error``)."""


class Policy:
    """Which callback destinations are allowed (see the module docstring)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.networks: list[Network] = []
        self.hosts: list[str] = []
        for pattern in patterns:
            try:
                self.networks.append(ipaddress.ip_network(pattern, strict=False))
            except ValueError:
                if not pattern or "/" in pattern:
                    raise ConfigError(f"--callback-allow {pattern!r}: not a host or CIDR") from None
                self.hosts.append(pattern.lower())

    def host_allowed(self, host: str) -> bool | None:
        """True: the name is allowed outright; None: decide by its addresses."""
        host = host.lower().rstrip(".")
        if any(fnmatch.fnmatchcase(host, p) for p in self.hosts):
            return True
        return None

    def address_allowed(self, address: Address) -> bool:
        if self.hosts or self.networks:
            return any(address in net for net in self.networks)
        inner = embedded_ipv4(address)
        if inner is not None and not (inner.is_global and not inner.is_multicast):
            return False
        return address.is_global and not address.is_multicast

    def check_url(self, url: str) -> str:
        """The URL's host if the URL may be a callback; raises ``Refused`` otherwise."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Refused(f"{CALLBACK_HEADER} must be an http(s) URL with a host")
        if parts.username or parts.password:
            raise Refused(f"{CALLBACK_HEADER} must not carry credentials")
        host = parts.hostname
        if self.host_allowed(host):
            return host
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if ":" in host or host.replace(".", "").isdigit():
                # 2130706433, 0177.0.0.1, 127.1: aiohttp takes an all-digit host for an
                # address and connects without asking the resolver (which would check
                # it), and getaddrinfo reads it as 127.0.0.1
                raise Refused(f"callback host {host} is not a plain IP address or name") from None
            return host  # a name: its addresses are checked as it is resolved, when sent
        if not self.address_allowed(address):
            raise Refused(f"callback destination {host} is not allowed (--callback-allow)")
        return host


#: NAT64's well-known prefix (RFC 6052): a gateway delivers 64:ff9b::a.b.c.d to a.b.c.d
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries to (mapped ``::ffff:``, compatible ``::``,
    NAT64 ``64:ff9b::``, 6to4 ``2002::``), judged as that address: ``::ffff:127.0.0.1``
    reaches loopback, a NAT64 or 6to4 gateway delivers the others."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


class CheckingResolver(AbstractResolver):
    """aiohttp's resolver, refusing every answer with an address the policy refuses."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self.policy.host_allowed(host):
            return results
        for result in results:
            if not self.policy.address_allowed(ipaddress.ip_address(result["host"])):
                raise Refused(f"callback destination {host} resolves to {result['host']}")
        return results

    async def close(self) -> None:
        await self._inner.close()


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Callbacks:
    """Sends callbacks on its own session (whose resolver applies the policy)."""

    def __init__(
        self,
        *,
        secret: str,
        allow: Sequence[str],
        retry_s: float,
        count: Callable[[str], None],
    ) -> None:
        self.secret = secret
        self.policy = Policy(allow)
        self.retry_s = retry_s
        self._count = count
        self._session: aiohttp.ClientSession | None = None

    def check(self, url: str) -> None:
        """At submit: a URL that can never be sent to is the client's 400."""
        if not self.secret:
            raise BadRequest(f"{CALLBACK_HEADER} needs the proxy to run with --callback-secret")
        if len(url) > 2048:
            raise BadRequest(f"{CALLBACK_HEADER} is over 2048 characters")
        try:
            self.policy.check_url(url)
        except Refused as exc:
            self._count("refused")
            raise BadRequest(str(exc)) from exc

    def _session_for_send(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=CheckingResolver(self.policy), limit=64)
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    async def deliver(self, url: str, document: dict[str, Any]) -> str:
        """POST ``document`` until delivered or ``retry_s`` passed; returns the outcome
        (delivered, failed, refused)."""
        body = json.dumps(document, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(self.secret, body),
        }
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_s
        delay = FIRST_RETRY_S
        while True:
            outcome = await self._attempt(url, body, headers)
            if outcome in ("delivered", "refused"):
                self._count(outcome)
                return outcome
            if loop.time() + delay > deadline:
                self._count("failed")
                log.warning("callback to %s for job %s failed; giving up", url, document["id"])
                return "failed"
            self._count("retried")
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_S)

    async def _attempt(self, url: str, body: bytes, headers: dict[str, str]) -> str:
        try:
            self.policy.check_url(url)
            timeout = aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT_S)
            async with self._session_for_send().post(
                url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                # the status is the answer; its body is never read (it could be endless):
                # leaving the block unread closes the connection
                ok = 200 <= resp.status < 300
                if not ok:
                    log.info("callback to %s answered %d", url, resp.status)
                return "delivered" if ok else "retry"
        except Refused as exc:
            log.warning("callback refused: %s", exc)
            return "refused"
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, Refused):
                log.warning("callback refused: %s", exc.os_error)
                return "refused"
            log.info("callback to %s: %r", url, exc)
            return "retry"
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("callback to %s: %r", url, exc)
            return "retry"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
