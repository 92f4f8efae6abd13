"""Runtime: what a request says about its scheduling — tenant, priority, deadline.

- Tenant. Without ``[tenants]`` in the config, ``X-Sdproxy-Tenant`` names it (trusted, as
  ``X-Sdproxy-Client`` is: put the proxy behind something that sets it, or configure keys);
  none is the anonymous tenant "", and one that is not printable text is ``400 bad_request``
  (it becomes a metric label), as is a new name once ``MAX_HEADER_TENANTS`` names came this
  way (each keeps fair-queue state and a metric series). With ``[tenants.<name>] keys =
  [...]``, the API key (``X-Sdproxy-Key: KEY`` or ``Authorization: Bearer KEY``) names it,
  the header is ignored, and a missing or unknown key is ``401 unauthorized`` on every
  proxied route; keys are compared as SHA-256 digests, in constant time. The key never
  reaches a pod (``X-Sdproxy-Key`` is dropped; a Bearer ``Authorization`` that carried a key
  too — sd-webui's own ``--api-auth`` is Basic).
- ``X-Sdproxy-Priority: high | normal | low`` (default normal; lowered to the tenant's
  ``max_priority`` by the core); anything else is ``400 bad_request``.
- ``X-Sdproxy-Deadline-S: <seconds>`` from arrival (a positive number, else 400).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable, Mapping

from sdproxy import errors
from sdproxy.core.queue import Priority
from sdproxy.core.tenants import Tenant

TENANT_HEADER = "X-Sdproxy-Tenant"
KEY_HEADER = "X-Sdproxy-Key"
PRIORITY_HEADER = "X-Sdproxy-Priority"
DEADLINE_HEADER = "X-Sdproxy-Deadline-S"
COST_HEADER = "X-Sdproxy-Cost-S"
#: longest tenant name taken from the header (it becomes a metric label)
MAX_TENANT_CHARS = 64
#: most distinct tenant names the header may bring into one process: each keeps state in
#: the fair queue and a metric series for ever, and any caller may make up names
MAX_HEADER_TENANTS = 256


class Tenants:
    """The configured tenants' keys, or none (then the header names the tenant)."""

    def __init__(self, tenants: Iterable[Tenant]) -> None:
        # digests: every comparison takes the same time, whatever the keys' lengths
        self._by_digest = [(_digest(key), t.name) for t in tenants for key in t.keys]
        self.keyed = bool(self._by_digest)
        #: header mode: the names seen so far (bounded by MAX_HEADER_TENANTS)
        self._seen: set[str] = set()

    def tenant_of(self, headers: Mapping[str, str]) -> str:
        if not self.keyed:
            return self._from_header(headers.get(TENANT_HEADER) or "")
        key = headers.get(KEY_HEADER) or _bearer(headers.get("Authorization"))
        if not key:
            raise errors.Unauthorized(
                f"an API key is required: {KEY_HEADER}: KEY or Authorization: Bearer KEY"
            )
        given = _digest(key)
        found: str | None = None
        for known, name in self._by_digest:  # all compared: no early exit to time
            if hmac.compare_digest(known, given) and found is None:
                found = name
        if found is None:
            raise errors.Unauthorized("unknown API key")
        return found

    def _from_header(self, value: str) -> str:
        name = _tenant_name(value)
        if name and name not in self._seen:
            if len(self._seen) >= MAX_HEADER_TENANTS:
                raise errors.BadRequest(
                    f"{TENANT_HEADER}: this proxy already serves {MAX_HEADER_TENANTS} "
                    "tenants named by the header; configure [tenants] with keys for more"
                )
            self._seen.add(name)
        return name

    def strips_authorization(self, headers: Mapping[str, str]) -> bool:
        """Whether the request's Authorization carried our key (not for the pod)."""
        return self.keyed and _bearer(headers.get("Authorization")) is not None


def _digest(key: str) -> bytes:
    """The key's SHA-256; a header's bytes that are not UTF-8 (aiohttp keeps them as
    surrogates) are taken as they came, not a 500."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _tenant_name(value: str) -> str:
    """The header's tenant: printable text (it becomes a metric label, a status entry
    and a job-store column), cut to ``MAX_TENANT_CHARS``."""
    if not value.isprintable():
        raise errors.BadRequest(
            f"{TENANT_HEADER} must be printable UTF-8 text (no control characters)"
        )
    return value[:MAX_TENANT_CHARS]


def _bearer(value: str | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def priority_of(headers: Mapping[str, str]) -> int:
    value = headers.get(PRIORITY_HEADER)
    if value is None:
        return Priority.NORMAL
    found = Priority.BY_NAME.get(value.strip().lower())
    if found is None:
        raise errors.BadRequest(f"{PRIORITY_HEADER} must be high, normal or low, not {value!r}")
    return found


def deadline_of(headers: Mapping[str, str]) -> float | None:
    value = headers.get(DEADLINE_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise errors.BadRequest(f"{DEADLINE_HEADER} must be a positive number of seconds")
    return seconds
